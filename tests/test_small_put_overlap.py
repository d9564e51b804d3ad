"""A small body's row commit runs while its record goes to the vault.

A body of at most ON_LOOP_BYTES is stored as a row of the small-chunk store
(one group commit, one fsync).  Its record goes to the vault at once and
into the primary log only after the row is durable (commit.py, `after`):
the two disks work at the same time, and the rule "a record in the primary
log references chunks the primary holds" still holds.  If the row cannot be
stored, the record is void everywhere (the vault may hold it already: an
ABORT follows) and the client hears the error.  If the gateway dies with
the record in the vault and the row not yet committed, the restart takes
the chunk from the vault with the record.

The row commit is held for real: the test takes the small-chunk store's
lock file (flock, as another process of the gateway would), so the commit
waits on it.  The failure is real too: an engine whose small-chunk store
was closed refuses the row (OSError, as at shutdown).
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time

import blake3
import pytest
from botocore.exceptions import ClientError

import chunkdamage
from conftest import Deployment, wait_until


@pytest.fixture
def dep(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[gateway]\nworkers = 1\n")       # the leader parses every PUT
    d = Deployment(tmp_path / "deploy", ack_timeout=10.0, gateway_config=cfg)
    d.start()
    yield d
    d.stop()


def _warm_store(dep):
    """(gateway, client, the vault's last seq, a small body): a bucket
    "overlap" whose small-chunk store exists (one PUT made it)."""
    gw = dep.gateway
    s3 = gw.client()
    s3.create_bucket(Bucket="overlap")
    s3.put_object(Bucket="overlap", Key="warm", Body=b"the store exists")
    return gw, s3, dep.vault.status()["last_seq"], os.urandom(3000)


def _missing(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    return False


def test_a_small_put_reaches_the_vault_while_its_row_commits_and_is_answered_after_both(dep):
    gw = dep.gateway
    s3 = gw.client()
    s3.create_bucket(Bucket="overlap")
    s3.put_object(Bucket="overlap", Key="warm", Body=b"the store exists")
    vault_before = dep.vault.status()["last_seq"]
    local_before = gw.health()["last_seq"]
    assert vault_before == local_before
    body = os.urandom(3000)
    answer: dict = {}
    with open(gw.data / "chunks" / "small.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # the row commit waits for this
        try:
            t = threading.Thread(target=lambda: answer.update(put=s3.put_object(Bucket="overlap", Key="k", Body=body)))
            t.start()
            wait_until(lambda: dep.vault.status()["last_seq"] == vault_before + 1,
                       "the record durable in the vault while the row waits", timeout=10)
            time.sleep(0.3)
            assert t.is_alive(), "answered before the row was durable"
            assert gw.health()["last_seq"] == local_before, "in the primary log before its row"
            assert _missing(s3, "overlap", "k"), "visible before its row was durable"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(20)
    assert answer["put"]["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert s3.get_object(Bucket="overlap", Key="k")["Body"].read() == body
    assert gw.health()["last_seq"] == dep.vault.status()["last_seq"] == vault_before + 1
    gw.stop()                                        # the row is on the primary's disk
    gw.start()
    assert s3.get_object(Bucket="overlap", Key="k")["Body"].read() == body
    dep.airlock("verify")


def test_a_gateway_killed_between_the_vaults_ack_and_the_row_takes_the_chunk_from_the_vault(dep):
    """The record is durable in the vault, the row is not (its commit is held),
    and the gateway dies: the restart's reconcile takes the record from the
    vault, and with it the chunk, so the primary holds every chunk its log
    references."""
    gw, s3, vault_before, body = _warm_store(dep)
    with open(gw.data / "chunks" / "small.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            t = threading.Thread(target=lambda: _put_quietly(s3, "overlap", "k", body))
            t.start()
            wait_until(lambda: dep.vault.status()["last_seq"] == vault_before + 1,
                       "the record durable in the vault while the row waits", timeout=10)
            gw.kill()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(20)
    d = blake3.blake3(body).hexdigest()
    assert not chunkdamage.exists(gw.data, d)
    gw.start()
    wait_until(lambda: gw.health().get("vault_connected"), "the gateway to reconcile")
    assert chunkdamage.exists(gw.data, d) and chunkdamage.stored(gw.data, d) == body
    assert gw.health()["last_seq"] == dep.vault.status()["last_seq"]
    assert gw.client().get_object(Bucket="overlap", Key="k")["Body"].read() == body
    dep.airlock("verify")


def _put_quietly(s3, bucket: str, key: str, body: bytes) -> None:
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    except Exception:        # the gateway is killed under it
        pass


def test_a_small_put_whose_row_cannot_be_stored_fails_and_is_void_in_the_vault_too(dep):
    from airlock.config import GatewayConfig
    from airlock.gateway import make_engine
    from airlock.primary.model import ObjectMeta

    s3 = dep.gateway.client()
    s3.create_bucket(Bucket="overlap")
    s3.put_object(Bucket="overlap", Key="kept", Body=b"before")
    dep.gateway.stop()
    cfg = GatewayConfig()
    cfg.data = str(dep.gateway.data)
    cfg.vault = ("127.0.0.1", dep.link_port)
    cfg.link_keys = str(dep.root / "primary" / "keys")
    body = os.urandom(2000)

    async def body_of():
        yield body

    async def scenario() -> tuple[int, BaseException | None]:
        engine = make_engine(cfg)
        engine.open()
        await engine.start()
        try:
            await engine.commit_point.ensure_link()
            first = engine.commit_point.last_seq + 1
            engine.store.small.close()               # every row from now on is refused
            try:
                await engine.put_object("overlap", "lost", body_of(), ObjectMeta())
            except OSError as e:
                err = e
            else:
                err = None
            # the vault took the record; the ABORT voiding it follows without another write
            deadline = time.monotonic() + 10
            while dep.vault.status()["last_seq"] < first + 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert engine.index.object("overlap", "lost") is None
            listed = await engine.commit_point.link.list(bucket="overlap", limit=100)
            assert [m["key"] for m in listed["objects"]] == ["kept"], listed
            return first, err
        finally:
            await engine.close()

    first, err = asyncio.run(scenario())
    assert err is not None and "closed" in str(err), err
    assert dep.vault.status()["last_seq"] == first + 1          # the record and its ABORT
    assert not (dep.gateway.data / "pending-aborts.json").exists()
    dep.start_gateway()
    s3 = dep.gateway.client()
    assert _missing(s3, "overlap", "lost")
    assert s3.get_object(Bucket="overlap", Key="kept")["Body"].read() == b"before"
    again = os.urandom(2000)
    s3.put_object(Bucket="overlap", Key="lost", Body=again)            # the store takes rows again
    assert s3.get_object(Bucket="overlap", Key="lost")["Body"].read() == again
    assert dep.gateway.health()["last_seq"] == dep.vault.status()["last_seq"]
    dep.airlock("verify")


def test_a_row_that_fails_when_its_void_cannot_be_recorded_stands_as_the_vault_holds_it(dep):
    """The row fails and pending-aborts.json cannot be written either (both
    refused by RLIMIT_FSIZE, lowered on the running gateway with prlimit(2)
    while the row waits on its lock).  A void held only in memory would be
    forgotten by a restart, which takes the record from the vault: the
    client would have heard an error for an object that appears later.  The
    record stands instead (the vault holds it and its chunk): the client
    hears success, the gateway degrades and serves it from the vault, and
    the restart keeps it."""
    import resource
    gw, s3, vault_before, body = _warm_store(dep)
    answer: dict = {}

    def put():
        try:
            answer["put"] = s3.put_object(Bucket="overlap", Key="k", Body=body)["ResponseMetadata"]["HTTPStatusCode"]
        except ClientError as e:
            answer["put"] = e.response["Error"]["Code"]
    with open(gw.data / "chunks" / "small.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            t = threading.Thread(target=put)
            t.start()
            wait_until(lambda: dep.vault.status()["last_seq"] == vault_before + 1,
                       "the record durable in the vault while the row waits", timeout=10)
            # no file of the gateway may grow past 5 bytes: not the row's WAL
            # frame, not pending-aborts.json ({"seqs": [n]})
            resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (5, 5))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(20)
    assert answer == {"put": 200}, answer
    h = gw.health()
    assert h["status"] == "degraded" and "pending-aborts.json" not in os.listdir(gw.data), h
    assert s3.get_object(Bucket="overlap", Key="k")["Body"].read() == body      # from the vault

    gw.stop()                                        # storage repaired: a new process has no limit
    dep.start_gateway()
    wait_until(lambda: gw.health()["status"] == "ok", "gateway healthy", timeout=15)
    assert gw.health()["last_seq"] == dep.vault.status()["last_seq"] == vault_before + 1
    assert s3.get_object(Bucket="overlap", Key="k")["Body"].read() == body
    assert s3.get_object(Bucket="overlap", Key="warm")["Body"].read() == b"the store exists"
    s3.put_object(Bucket="overlap", Key="after", Body=b"writes work again")
    dep.airlock("verify")
