"""The primary log cannot be written after the vault acknowledged a change.

The vault's durable ack is the commit point: a change the vault acknowledged
happened, whatever the primary's disk does next.  So when the primary log
refuses a write after the ack, the client still hears success (its change is
served from the vault: the gateway degrades, claim 9), and nothing after that
is sent to the vault: later writes answer 503 and exist nowhere.  A restart on
repaired storage takes the acknowledged change from the vault (reconcile).

The fault is real and needs no privilege: the gateway's leader (the process
that writes the primary log) gets RLIMIT_FSIZE = the active log segment's
size (prlimit(2)), so its next append gets a short write and then EFBIG, a
torn tail that recovery cuts after the restart.  The warm-up records (each
with ~1.9 KB of metadata) make the segment larger than any chunk file the
leader writes afterwards; those bodies are above 64 KiB, so their chunks are
files: a small chunk's row would be written to small.sqlite's WAL, which
the warm-up has already made larger than the segment.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from conftest import wait_until


def _active_segment(gw) -> Path:
    return sorted((gw.data / "log").glob("seg-*.log"))[-1]


def _fail_next_log_append(gw) -> None:
    """The leader can no longer grow any file past the active segment's size."""
    size = _active_segment(gw).stat().st_size
    resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (size, size))


WARM_META = {"pad": "m" * 1900}       # a ~2.3 KB record per warm-up PUT
BODY = 70_000                          # a chunk file (> 64 KiB), smaller than the warmed-up segment


def _warm(s3, bucket: str, n: int = 70) -> None:
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"warm{i:02d}", Body=b"w", Metadata=WARM_META)


def test_a_change_the_vault_acknowledged_succeeds_when_the_primary_log_fails(deployment):
    dep = deployment
    gw = dep.gateway
    s3 = gw.client()
    s3.create_bucket(Bucket="ledger")
    s3.put_object(Bucket="ledger", Key="before", Body=b"written while all was well")
    _warm(s3, "ledger")
    _fail_next_log_append(gw)

    assert _active_segment(gw).stat().st_size > BODY + 20_000
    body = os.urandom(BODY)
    put = s3.put_object(Bucket="ledger", Key="acked", Body=body)
    assert put["ResponseMetadata"]["HTTPStatusCode"] == 200

    def health():
        try:
            return gw.health()
        except OSError:          # a worker going away as the gateway degrades
            return {}
    h = health()
    assert h["status"] == "degraded" and h["primary_storage"] == "failed", h
    assert "log" in h["degraded_reason"], h
    # the acknowledged change is readable at once (served from the vault)
    assert s3.get_object(Bucket="ledger", Key="acked")["Body"].read() == body
    assert s3.get_object(Bucket="ledger", Key="before")["Body"].read() == b"written while all was well"
    vault_last = dep.vault.status()["last_seq"]

    # nothing more reaches the vault: later writes are refused
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="ledger", Key="refused", Body=os.urandom(BODY))
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert dep.vault.status()["last_seq"] == vault_last

    # storage repaired (a new process has no limit), gateway restarted: the
    # primary cuts the torn tail and takes the change from the vault
    gw.stop()
    dep.start_gateway()
    wait_until(lambda: gw.health()["status"] == "ok", "gateway healthy", timeout=15)
    assert gw.health()["last_seq"] == vault_last
    assert s3.get_object(Bucket="ledger", Key="acked")["Body"].read() == body
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket="ledger", Key="refused")
    assert e.value.response["Error"]["Code"] == "404"
    s3.put_object(Bucket="ledger", Key="after", Body=b"writes work again")
    dep.airlock("verify")


def test_concurrent_writes_when_the_primary_log_fails_are_visible_exactly_when_they_succeeded(deployment):
    """Writes racing the failure: those answered 200 are kept (in the vault,
    then on the restarted primary), those answered 503 exist nowhere."""
    from concurrent.futures import ThreadPoolExecutor
    dep = deployment
    gw = dep.gateway
    s3 = gw.client()
    s3.create_bucket(Bucket="race")
    _warm(s3, "race")
    bodies = {f"k{i:02d}": os.urandom(BODY + i) for i in range(24)}

    def put(key):
        try:
            gw.client().put_object(Bucket="race", Key=key, Body=bodies[key])
            return key, "ok"
        except ClientError as e:
            return key, e.response["Error"]["Code"]
        except (OSError, BotoCoreError) as e:
            # a connection still in the listen queue of a worker that stops as
            # the gateway degrades is reset unanswered: no claim either way
            return key, f"connection: {e}"

    _fail_next_log_append(gw)
    with ThreadPoolExecutor(12) as pool:
        outcome = dict(pool.map(put, sorted(bodies)))
    assert "ok" in outcome.values(), outcome
    assert set(outcome.values()) <= {"ok", "ServiceUnavailable"} | {v for v in outcome.values()
                                                                     if v.startswith("connection")}, outcome

    gw.stop()
    dep.start_gateway()
    wait_until(lambda: gw.health()["status"] == "ok", "gateway healthy", timeout=15)
    s3 = gw.client()
    for key, result in outcome.items():
        if result == "ok":
            assert s3.get_object(Bucket="race", Key=key)["Body"].read() == bodies[key], key
        elif result == "ServiceUnavailable":
            with pytest.raises(ClientError) as e:
                s3.head_object(Bucket="race", Key=key)
            assert e.value.response["Error"]["Code"] == "404", key
    dep.airlock("verify")


def test_records_the_vault_holds_beyond_a_failed_primary_log_are_served_from_the_vault(tmp_path):
    """At reconnect the primary takes the records the vault holds beyond its
    log (reconcile); if its log refuses them, it degrades instead of failing
    every write with an error and hiding those records."""
    from conftest import proxied_deployment
    with proxied_deployment(tmp_path / "deploy", ack_timeout=2.0) as (d, proxy):
        gw = d.gateway
        s3 = gw.client()
        s3.create_bucket(Bucket="keep")
        s3.put_object(Bucket="keep", Key="base", Body=b"durable everywhere")
        _warm(s3, "keep")
        # a PUT whose ACK is held past the timeout: 503, the vault holds it, the primary does not
        before = d.vault.status()["last_seq"]
        proxy.command("hold down")
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket="keep", Key="void", Body=b"answered 503")
        assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
        assert d.vault.status()["last_seq"] == before + 1
        time.sleep(0.5)
        _fail_next_log_append(gw)
        proxy.command("pass")            # the link comes back: reconcile meets the failed log

        def health():
            try:
                return gw.health()
            except OSError:
                return {}
        wait_until(lambda: health().get("vault_state_loaded") is True, "serving from the vault", timeout=20)
        h = health()
        assert h["primary_storage"] == "failed" and "log" in h["degraded_reason"], h
        assert s3.get_object(Bucket="keep", Key="base")["Body"].read() == b"durable everywhere"
        with pytest.raises(ClientError) as e:
            s3.head_object(Bucket="keep", Key="void")      # a 503 stays invisible
        assert e.value.response["Error"]["Code"] == "404"
        # the primary log took the 503'd record while its APPEND was on the way,
        # so reconciling met the failed log on the ABORT that voids it, which
        # reached the vault at the same time as the log failed to take it
        degraded_at = d.vault.status()["last_seq"]
        assert degraded_at in (before + 1, before + 2)
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket="keep", Key="later", Body=b"refused")
        assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
        assert d.vault.status()["last_seq"] == degraded_at  # nothing goes to the vault after the log failed

        gw.stop()
        d.start_gateway()
        wait_until(lambda: gw.health()["status"] == "ok", "gateway healthy", timeout=15)
        assert gw.health()["pending_aborts"] == 0
        with pytest.raises(ClientError) as e:
            s3.head_object(Bucket="keep", Key="void")
        assert e.value.response["Error"]["Code"] == "404"
        assert s3.get_object(Bucket="keep", Key="base")["Body"].read() == b"durable everywhere"
        s3.put_object(Bucket="keep", Key="after", Body=b"writes work again")
        d.airlock("verify")
