"""No durable ack within the ack timeout: 503, and the change is void everywhere.

The fault proxy holds the vault->gateway direction longer than the gateway's
ack timeout (2 s here).  The vault has the record (it appended and fsynced
it), but the client heard 503, so the primary must void it
(primary/replication.py: pending-aborts.json, then an ABORT record once the
link is back).  The object must never become visible: not after the release,
not after the link reconnects, not after a gateway restart (SIGTERM or
SIGKILL right after the 503).  The vault keeps the record in its history but
its state does not show it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Deployment, proxied_deployment, wait_until  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402

from airlock import errors as E  # noqa: E402
from airlock.log import payload as P  # noqa: E402

ACK_TIMEOUT_S = 2.0
FAIL_BOUND_S = ACK_TIMEOUT_S + 6.0   # generous upper bound on the 503 (not a performance claim)


@pytest.fixture
def proxied(tmp_path):
    with proxied_deployment(tmp_path / "deploy", ACK_TIMEOUT_S) as dp:
        yield dp


@pytest.fixture(params=["local", "vault"], ids=lambda m: f"chunk_sync={m}")
def proxied_either_chunk_sync(tmp_path, request):
    """`proxied` with each chunk_sync mode: with "local" the primary log takes
    a batch while its APPEND is on the way, with "vault" only once its ACK
    came or failed."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nchunk_sync = "{request.param}"\n')
    with proxied_deployment(tmp_path / "deploy", ACK_TIMEOUT_S, gateway_config=cfg) as dp:
        yield dp


@pytest.fixture
def vault_behind_proxy(tmp_path):
    """A vault and the fault proxy in front of it, no gateway: for a test
    that speaks the link itself."""
    d = Deployment(tmp_path / "deploy", ack_timeout=ACK_TIMEOUT_S)
    d.vault.start()
    try:
        proxy = FaultProxy(d.vault.port).start()
        d.use_proxy(proxy)
        yield d, proxy
    finally:
        d.stop()


# ---------------------------------------------------------------------- helpers


def on_vault(d: Deployment, fn):
    """Run `await fn(link)` on a link session of our own, straight to the vault
    (not through the proxy), with the primary's key."""
    from airlock.config import GatewayConfig
    from airlock.gateway import make_link_client
    cfg = GatewayConfig()
    cfg.vault = ("127.0.0.1", d.vault.port)
    cfg.link_keys = str(d.root / "primary" / "keys")

    async def run():
        link = make_link_client(cfg)
        await link.connect()
        try:
            return await fn(link)
        finally:
            await link.close()

    return asyncio.run(run())


def vault_manifest(d: Deployment, bucket: str, key: str, seq: int | None = None) -> dict | None:
    async def get(link):
        try:
            return await link.get_manifest(bucket, key, seq)
        except E.VaultRejected as e:
            assert e.code == "not_found", e.info
            return None
    return on_vault(d, get)


def vault_record(d: Deployment, seq: int):
    got = on_vault(d, lambda link: link.get_records(seq, 1))
    return got[0] if got else None


def vault_voids(d: Deployment) -> list[int]:
    recs = on_vault(d, lambda link: link.get_records(1, 10000))
    assert [r[0] for r in recs] == list(range(1, len(recs) + 1))   # gap-free
    return sorted(s for r in recs if r[1] == P.ABORT for s in P.decode_payload(r[1], r[2])["seqs"])


def put_times_out(d: Deployment, proxy: FaultProxy, s3, key: str, body: bytes) -> int:
    """PUT with the ack held past the timeout; returns the sequence number the vault gave it."""
    before = d.vault.status()["last_seq"]
    proxy.command("hold down")
    t0 = time.monotonic()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="keep", Key=key, Body=body)
    elapsed = time.monotonic() - t0
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable", e.value.response
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert ACK_TIMEOUT_S - 0.5 <= elapsed < FAIL_BOUND_S, f"503 after {elapsed:.2f}s"
    # the vault holds the record: the APPEND went through, only the ACK was held
    assert d.vault.status()["last_seq"] == before + 1
    return before + 1


def assert_invisible(s3, key: str, old: bytes | None = None) -> None:
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket="keep").get("Contents", [])}
    if old is None:
        with pytest.raises(ClientError) as e:
            s3.head_object(Bucket="keep", Key=key)
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        with pytest.raises(ClientError) as e:
            s3.get_object(Bucket="keep", Key=key)
        assert e.value.response["Error"]["Code"] == "NoSuchKey"
        assert key not in listed
    else:
        assert s3.get_object(Bucket="keep", Key=key)["Body"].read() == old
        assert key in listed


def assert_voided_everywhere(d: Deployment, s3, key: str, seq: int, old: bytes | None = None) -> None:
    assert_invisible(s3, key, old)
    h = d.gateway.health()
    assert h["pending_aborts"] == 0, h
    assert h["last_seq"] == d.vault.status()["last_seq"]
    # the vault's history keeps the record, an ABORT voids it, its state does not show it
    rec = vault_record(d, seq)
    assert rec is not None and rec[1] == P.OBJECT_PUT
    assert P.decode_payload(rec[1], rec[2])["key"] == key
    assert seq in vault_voids(d)
    assert vault_manifest(d, "keep", key, seq) is None     # the voided version is not state either
    m = vault_manifest(d, "keep", key)
    if old is None:
        assert m is None, m
    else:
        assert m is not None and m["size"] == len(old), m
        assert hashlib.md5(old).hexdigest() in m["etag"], m
    r = d.airlock("verify", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("overwrite", [False, True], ids=["new-key", "overwrite"])
def test_put_without_ack_in_time_is_void(proxied, overwrite):
    d, proxy = proxied
    s3 = d.gateway.client()
    s3.create_bucket(Bucket="keep")
    s3.put_object(Bucket="keep", Key="a", Body=b"the original")
    key, old = ("a", b"the original") if overwrite else ("late", None)

    try:
        seq = put_times_out(d, proxy, s3, key, os.urandom(5000))
        assert_invisible(s3, key, old)
        assert d.gateway.health()["pending_aborts"] == 1
    finally:
        proxy.command("release")
    time.sleep(0.5)   # whatever the proxy held has gone through by now
    assert_invisible(s3, key, old)

    # the next write reconnects, reconciles (voids `seq`) and succeeds
    s3.put_object(Bucket="keep", Key="next", Body=b"next")
    assert s3.get_object(Bucket="keep", Key="next")["Body"].read() == b"next"
    assert_voided_everywhere(d, s3, key, seq, old)
    s3.put_object(Bucket="keep", Key="next2", Body=b"next2")
    assert_voided_everywhere(d, s3, key, seq, old)


def test_writes_queued_on_a_key_behind_one_the_vault_failed_share_its_503(proxied):
    """Writes to one key commit one at a time (the key's lock).  While the
    vault does not answer, each used to wait out an ack timeout or reconnect
    of its own once the one before it had failed: the n-th waited n times as
    long (25 s for a few writers with the vault stopped).  Those that queued
    behind the failure now fail with it; a write that arrives later tries
    the vault again itself."""
    from concurrent.futures import ThreadPoolExecutor
    d, proxy = proxied
    s3 = d.gateway.client()
    s3.create_bucket(Bucket="keep")
    s3.put_object(Bucket="keep", Key="busy", Body=b"the original")

    def put(i):
        try:
            d.gateway.client().put_object(Bucket="keep", Key="busy", Body=f"writer {i}".encode())
            return "ok"
        except ClientError as e:
            return e.response["Error"]["Code"] + ": " + e.response["Error"]["Message"]

    proxy.command("hold both")
    try:
        with ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(put, range(5)))
    finally:
        proxy.command("pass")
    assert all(o.startswith("ServiceUnavailable") for o in outcomes), outcomes
    shared = [o for o in outcomes if "a write to the same key failed on it while this waited" in o]
    assert len(shared) >= 3, outcomes
    assert_invisible(s3, "busy", b"the original")
    # the vault answers again: the next write reconnects and succeeds
    s3.put_object(Bucket="keep", Key="busy", Body=b"after")
    assert s3.get_object(Bucket="keep", Key="busy")["Body"].read() == b"after"
    d.airlock("verify")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_void_survives_a_gateway_restart(proxied, how):
    d, proxy = proxied
    s3 = d.gateway.client()
    s3.create_bucket(Bucket="keep")
    try:
        seq = put_times_out(d, proxy, s3, "late", b"answered 503")
        # stop the gateway right after the 503, before the link could reconcile
        d.gateway.stop() if how == "SIGTERM" else d.gateway.kill()
    finally:
        proxy.command("release")
    pending = json.loads((d.gateway.data / "pending-aborts.json").read_text())
    assert seq in pending["seqs"]

    d.start_gateway()
    s3 = d.gateway.client()
    wait_until(lambda: d.gateway.health()["pending_aborts"] == 0, "the restarted gateway to reconcile")
    assert_invisible(s3, "late")
    s3.put_object(Bucket="keep", Key="after", Body=b"after the restart")
    assert s3.get_object(Bucket="keep", Key="after")["Body"].read() == b"after the restart"
    assert_voided_everywhere(d, s3, "late", seq)

    d.gateway.restart()   # and once more, from a clean state
    assert_invisible(d.gateway.client(), "late")


@pytest.mark.parametrize("fault,cancel_after", [("hold down", 0.5), ("hold down", 2.5), ("delay 1500", 2.2), ("delay 1500", 5.0)])
def test_a_link_connect_cancelled_midway_leaves_no_half_open_connection(vault_behind_proxy, fault, cancel_after):
    """connect() cancelled by its caller's time limit (the commit point's
    reconnect wraps it in one) -- while it closes the old connection, in the
    TLS handshake, or waiting for HELLO_OK -- stays cancelled and closes what
    it opened: the link is neither connected nor ready, and the next connect
    succeeds.  Before, a cancel during HELLO left the connection open without
    its HELLO (every request on it refused as not connected), and a cancel
    while the old connection closed was swallowed."""
    d, proxy = vault_behind_proxy
    from airlock.config import GatewayConfig
    from airlock.gateway import make_link_client
    cfg = GatewayConfig()
    cfg.vault = ("127.0.0.1", proxy.listen_port)
    cfg.link_keys = str(d.root / "primary" / "keys")

    async def run():
        link = make_link_client(cfg)
        await link.connect()                      # TLS session up and past HELLO
        assert link.ready
        assert proxy.command(fault) == "ok"       # the vault's answers stop, or crawl
        connecting = asyncio.ensure_future(link.connect())
        await asyncio.sleep(cancel_after)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        assert not link.connected and not link.ready
        with pytest.raises(E.VaultUnavailable):
            await link.status()
        assert proxy.command("release") == "ok" and proxy.command("pass") == "ok"
        await asyncio.wait_for(link.connect(), 10)
        assert link.ready and "last_seq" in (await link.status())
        await link.close()

    asyncio.run(run())


def test_a_put_whose_append_never_reached_the_vault_is_sent_at_reconnect_and_void(proxied_either_chunk_sync):
    """The primary log takes a batch while its APPEND is on the way (or, with
    chunk_sync = "vault", once the ACK failed).  Here the APPEND (and the
    chunk before it) never arrive: the client hears 503, the primary log
    holds a record the vault lacks, so its number is never given to another
    record.  Reconnecting sends it with the ABORT that voids it, so both logs
    hold the same records and the object is nowhere."""
    d, proxy = proxied_either_chunk_sync
    s3 = d.gateway.client()
    s3.create_bucket(Bucket="keep")
    s3.put_object(Bucket="keep", Key="a", Body=b"before")
    before = d.vault.status()["last_seq"]
    proxy.command("hold up")
    try:
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket="keep", Key="late", Body=os.urandom(5000))
        assert e.value.response["Error"]["Code"] == "ServiceUnavailable", e.value.response
        assert d.vault.status()["last_seq"] == before          # nothing reached the vault
        assert d.gateway.health()["last_seq"] == before + 1    # the primary log has it
        assert_invisible(s3, "late")
        proxy.command("cut")                                   # the held bytes die with the connection
    finally:
        proxy.command("pass")
    s3.put_object(Bucket="keep", Key="next", Body=b"next")     # reconnects, sends the record, voids it
    assert s3.get_object(Bucket="keep", Key="next")["Body"].read() == b"next"
    assert_voided_everywhere(d, s3, "late", before + 1)
    d.gateway.restart()
    assert_invisible(d.gateway.client(), "late")
    assert_voided_everywhere(d, d.gateway.client(), "late", before + 1)


def test_a_void_record_whose_chunk_is_gone_on_both_sides_is_still_sent_and_voided(proxied_either_chunk_sync):
    """As above, and the primary's copy of the 503'd record's chunk is gone
    too before the reconnect (deleted here; a disk fault or, with chunk_sync
    = "vault", a power cut): nobody has the chunk any more.  The record is
    void, so the vault takes it without its chunk in the same APPEND as the
    ABORT that voids it; reconciling does not fail on it again and again,
    and both logs hold the same records."""
    import chunkdamage
    from airlock.chunk.store import digest_of
    d, proxy = proxied_either_chunk_sync
    s3 = d.gateway.client()
    s3.create_bucket(Bucket="keep")
    s3.put_object(Bucket="keep", Key="a", Body=b"before")
    before = d.vault.status()["last_seq"]
    body = os.urandom(5000)
    proxy.command("hold up")
    try:
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket="keep", Key="late", Body=body)
        assert e.value.response["Error"]["Code"] == "ServiceUnavailable", e.value.response
        assert d.vault.status()["last_seq"] == before
        assert d.gateway.health()["last_seq"] == before + 1
        proxy.command("cut")
        digest = digest_of(body)
        assert chunkdamage.exists(d.gateway.data, digest)
        chunkdamage.delete(d.gateway.data, digest)
    finally:
        proxy.command("pass")
    s3.put_object(Bucket="keep", Key="next", Body=b"next")     # reconnects, sends the record, voids it
    assert s3.get_object(Bucket="keep", Key="next")["Body"].read() == b"next"
    assert_voided_everywhere(d, s3, "late", before + 1)


def _gateway_killed_with_an_unsent_record(d: Deployment, proxy: FaultProxy, key: str, body: bytes) -> int:
    """A PUT whose record the primary log took while its APPEND (held in the
    proxy) never reached the vault, and then SIGKILL of the gateway.  Returns
    the vault's last sequence number (the record's is one more)."""
    import threading
    s3 = d.gateway.client(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=30)
    s3.create_bucket(Bucket="keep")
    s3.put_object(Bucket="keep", Key="base", Body=b"acknowledged")
    before = d.vault.status()["last_seq"]
    proxy.command("hold up")
    t = threading.Thread(target=lambda: _put_ignoring_errors(s3, key, body), daemon=True)
    t.start()
    try:
        wait_until(lambda: d.gateway.health()["last_seq"] == before + 1, "the primary log to take the record",
                   timeout=ACK_TIMEOUT_S - 0.5, interval=0.02)
        d.gateway.kill()
        proxy.command("cut")
    finally:
        proxy.command("pass")
    t.join(10)
    assert d.vault.status()["last_seq"] == before
    return before


def test_a_put_cut_short_by_a_gateway_crash_before_its_append_arrived_ends_the_same_on_both_sides(proxied):
    """The gateway dies (SIGKILL) with a record in its log whose APPEND never
    reached the vault.  Its client heard nothing, so the change may happen or
    not, but the same on both sides: the restarted gateway sends it on."""
    d, proxy = proxied
    body = os.urandom(5000)
    before = _gateway_killed_with_an_unsent_record(d, proxy, "cut", body)
    r = d.airlock("gc", check=False)      # the vault may lack copies of what the tail references
    assert r.returncode == 1 and "never acknowledged" in r.stderr, r.stdout + r.stderr
    d.start_gateway()
    s3 = d.gateway.client()
    wait_until(lambda: d.vault.status()["last_seq"] == before + 1, "the restarted gateway to send the record")
    assert s3.get_object(Bucket="keep", Key="cut")["Body"].read() == body
    r = d.airlock("verify", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    s3.put_object(Bucket="keep", Key="after", Body=b"after")
    assert d.gateway.health()["last_seq"] == d.vault.status()["last_seq"] == before + 2


def test_restore_of_a_primary_log_ahead_by_one_batch_asks_for_a_gateway_start_first(proxied):
    """`airlock restore` does not guess about records the vault lacks: it
    changes nothing and says to start the gateway once (which sends them);
    after that, restore has nothing to fetch."""
    d, proxy = proxied
    body = os.urandom(5000)
    before = _gateway_killed_with_an_unsent_record(d, proxy, "cut", body)
    r = d.airlock("restore", check=False)
    assert r.returncode != 0 and "start the gateway once" in r.stderr, r.stdout + r.stderr
    d.start_gateway()
    wait_until(lambda: d.vault.status()["last_seq"] == before + 1, "the restarted gateway to send the record")
    d.gateway.stop()
    r = d.airlock("restore")
    assert "records_fetched=0" in r.stdout, r.stdout
    d.start_gateway()
    assert d.gateway.client().get_object(Bucket="keep", Key="cut")["Body"].read() == body


def test_gc_without_the_vault_keeps_what_a_killed_gateway_still_has_to_send(proxied):
    """With the vault's check skipped (`gc --no-vault-check`), gc cannot know
    what the vault lacks: the chunks of the primary log's last batch stay,
    so the restarted gateway can still send that batch to the vault."""
    d, proxy = proxied
    body = os.urandom(300 * 1024)            # a chunk file of its own, not a small row
    before = _gateway_killed_with_an_unsent_record(d, proxy, "cut", body)
    r = d.airlock("gc", "--no-vault-check")
    assert "gc: removed 0 chunk file(s)" in r.stdout, r.stdout
    d.start_gateway()
    wait_until(lambda: d.vault.status()["last_seq"] == before + 1, "the restarted gateway to send the record")
    assert d.gateway.client().get_object(Bucket="keep", Key="cut")["Body"].read() == body
    r = d.airlock("verify", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _put_ignoring_errors(s3, key: str, body: bytes) -> None:
    try:
        s3.put_object(Bucket="keep", Key=key, Body=body)
    except Exception:  # noqa: BLE001 - the gateway is killed under it
        pass
