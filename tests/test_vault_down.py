"""The vault is down or the link is cut: writes answer 503, reads go on.

SPEC "Write path" 4: no acknowledgement (vault down, link cut) -> the client
gets 503 ServiceUnavailable, the change is visible nowhere, and nothing
already committed is harmed.  When the vault is back, writes resume and both
logs hold the same gap-free sequence numbers.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Deployment, proxied_deployment, wait_until  # noqa: E402

from airlock.log import payload as P  # noqa: E402

ACK_TIMEOUT_S = 5.0                       # the Deployment default
FAIL_BOUND_S = ACK_TIMEOUT_S + 6.0        # a 503 must come within this (a bound, not a performance claim)

EXISTING = {"a": b"alpha" * 100, "b": b"bravo", "dir/c": b"charlie" * 1000}


@pytest.fixture
def proxied(tmp_path):
    with proxied_deployment(tmp_path / "deploy", ACK_TIMEOUT_S) as dp:
        yield dp


# ---------------------------------------------------------------------- helpers


def vault_records(d: Deployment) -> list[tuple[int, int, bytes]]:
    """Every record of the vault's log, read over the link with the primary's key."""
    from airlock.config import GatewayConfig
    from airlock.gateway import make_link_client
    cfg = GatewayConfig()
    cfg.vault = ("127.0.0.1", d.vault.port)
    cfg.link_keys = str(d.root / "primary" / "keys")

    async def fetch():
        link = make_link_client(cfg)
        await link.connect()
        try:
            out, seq = [], 1
            while True:
                got = await link.get_records(seq, 1000)
                if not got:
                    return out
                out += got
                seq = got[-1][0] + 1
        finally:
            await link.close()

    return asyncio.run(fetch())


def start_vault(d: Deployment) -> None:
    """Vault.start() returns as soon as admin.sock exists, but a SIGKILLed vault
    leaves its socket file behind: wait until the new process answers on it."""
    d.vault.start()

    def answers() -> bool:
        try:
            d.vault.status()
            return True
        except OSError:
            return False

    wait_until(answers, "the restarted vault to answer on its admin socket")


def seed(s3) -> None:
    s3.create_bucket(Bucket="keep")
    for k, v in EXISTING.items():
        s3.put_object(Bucket="keep", Key=k, Body=v)


def assert_put_fails_503(s3, key: str, body: bytes = b"never visible") -> float:
    t0 = time.monotonic()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="keep", Key=key, Body=body)
    elapsed = time.monotonic() - t0
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable", e.value.response
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert elapsed < FAIL_BOUND_S, f"503 took {elapsed:.1f}s"
    return elapsed


def assert_reads_work(s3, absent: list[str], also: tuple[str, ...] = ()) -> None:
    for k, v in EXISTING.items():
        assert s3.head_object(Bucket="keep", Key=k)["ContentLength"] == len(v)
        assert s3.get_object(Bucket="keep", Key=k)["Body"].read() == v
    assert s3.get_object(Bucket="keep", Key="dir/c", Range="bytes=7-13")["Body"].read() == EXISTING["dir/c"][7:14]
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="keep")["Contents"])
    assert listed == sorted([*EXISTING, *also]), listed
    for k in absent:
        with pytest.raises(ClientError) as e:
            s3.head_object(Bucket="keep", Key=k)
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def assert_gap_free_and_equal(d: Deployment, committed: int, voided: list[int] = ()) -> None:
    """Both logs end at the same sequence number; the vault's log is 1..N without
    gaps and holds exactly `committed` applied records plus ABORT records voiding `voided`."""
    h = d.gateway.health()
    vlast = d.vault.status()["last_seq"]
    assert h["last_seq"] == vlast, (h, vlast)
    assert h["pending_aborts"] == 0
    recs = vault_records(d)
    assert [r[0] for r in recs] == list(range(1, vlast + 1))
    aborts = [r for r in recs if r[1] == P.ABORT]
    void = sorted(s for r in aborts for s in P.decode_payload(r[1], r[2])["seqs"])
    assert void == sorted(voided)
    assert len(recs) - len(aborts) - len(void) == committed
    r = d.airlock("verify", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_writes_fail_fast_and_reads_continue_while_the_vault_is_down(deployment, how):
    d = deployment
    s3 = d.gateway.client()
    seed(s3)
    committed = 1 + len(EXISTING)

    d.vault.stop() if how == "SIGTERM" else d.vault.kill()
    assert_put_fails_503(s3, "new")
    assert_put_fails_503(s3, "a", b"an overwrite that must not win")
    assert_put_fails_503(s3, "new")
    with pytest.raises(ClientError) as e:
        s3.delete_object(Bucket="keep", Key="b")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert_reads_work(s3, absent=["new"])
    h = d.gateway.health()
    assert h["status"] == "degraded" and h["vault_connected"] is False
    assert h["last_seq"] == committed

    start_vault(d)
    s3.put_object(Bucket="keep", Key="after", Body=b"the vault is back")
    committed += 1
    assert s3.get_object(Bucket="keep", Key="after")["Body"].read() == b"the vault is back"
    s3.delete_object(Bucket="keep", Key="after")
    committed += 1
    assert_reads_work(s3, absent=["new", "after"])
    assert_gap_free_and_equal(d, committed)


def test_link_cut_while_a_put_waits_for_its_ack(proxied):
    d, proxy = proxied
    s3 = d.gateway.client()
    seed(s3)
    committed = 1 + len(EXISTING)
    before = d.vault.status()["last_seq"]

    proxy.command("hold down")
    outcome: dict = {}

    def put() -> None:
        t0 = time.monotonic()
        try:
            s3.put_object(Bucket="keep", Key="cut", Body=b"cut off")
            outcome["status"] = 200
        except ClientError as e:
            outcome["code"] = e.response["Error"]["Code"]
        outcome["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=put, daemon=True)
    t.start()
    try:
        wait_until(lambda: d.vault.status()["last_seq"] > before, "the vault to append the record")
        proxy.command("cut")
    finally:
        proxy.command("pass")
    t.join(FAIL_BOUND_S)
    assert not t.is_alive()
    assert outcome.get("code") == "ServiceUnavailable", outcome
    assert outcome["elapsed"] < FAIL_BOUND_S
    assert_reads_work(s3, absent=["cut"])

    # the vault holds record before+1; the next write reconnects, voids it, and goes on
    s3.put_object(Bucket="keep", Key="later", Body=b"later")
    committed += 1
    with pytest.raises(ClientError):
        s3.head_object(Bucket="keep", Key="cut")
    assert s3.get_object(Bucket="keep", Key="later")["Body"].read() == b"later"
    s3.delete_object(Bucket="keep", Key="later")
    committed += 1
    assert_gap_free_and_equal(d, committed, voided=[before + 1])


def test_idle_link_cut_and_refused_connections(proxied):
    d, proxy = proxied
    s3 = d.gateway.client()
    seed(s3)
    committed = 1 + len(EXISTING)

    # a cut while idle: the link comes back on the next write
    proxy.command("cut")
    wait_until(lambda: not d.gateway.health()["vault_connected"], "the gateway to notice the cut")
    s3.put_object(Bucket="keep", Key="x1", Body=b"x1")
    committed += 1
    assert d.gateway.health()["vault_connected"]

    # the proxy refuses every connection for a while: writes 503, reads go on
    proxy.command("refuse on")
    proxy.command("cut")
    wait_until(lambda: not d.gateway.health()["vault_connected"], "the gateway to notice the cut")
    for _ in range(3):
        assert_put_fails_503(s3, "refused")
    assert_reads_work(s3, absent=["refused"], also=("x1",))
    assert s3.get_object(Bucket="keep", Key="x1")["Body"].read() == b"x1"
    assert proxy.stats()["refused"] >= 1

    proxy.command("refuse off")
    s3.put_object(Bucket="keep", Key="x2", Body=b"x2")
    committed += 1
    with pytest.raises(ClientError):
        s3.head_object(Bucket="keep", Key="refused")
    assert_gap_free_and_equal(d, committed)


def test_a_vault_that_was_stopped_answers_a_primary_gone_meanwhile_without_an_error_of_its_own(tmp_path):
    """The vault is frozen (SIGSTOP) while a PUT waits; the gateway answers
    503 and drops that link; the vault, resumed, processes the APPEND and
    finds nobody to answer: one log line, no unretrieved task error, and
    the change ends void on both sides once the gateway is back."""
    import signal
    d = Deployment(tmp_path / "deploy", ack_timeout=2.0).start()
    try:
        c = d.gateway.client()
        c.create_bucket(Bucket="frozen")
        c.put_object(Bucket="frozen", Key="before", Body=b"kept")
        d.vault.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(ClientError) as e:
                c.put_object(Bucket="frozen", Key="during", Body=b"void")
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            # the gateway has closed its old connection: the frozen vault's
            # kernel holds it half-closed (CLOSE_WAIT) until the vault runs again
            wait_until(lambda: _closed_by_peer(d.vault.port), "the gateway to close its old connection", 20)
        finally:
            d.vault.proc.send_signal(signal.SIGCONT)
        # "disconnected before its answer" when the APPEND was still to be
        # answered as the connection went, "disconnected" when it was not
        wait_until(lambda: "disconnected" in d.vault.log_text(), "the vault to see the old connection gone", 20)
        wait_until(lambda: _put_ok_in(c, "frozen"), "writes to succeed again", 30)
        assert c.get_object(Bucket="frozen", Key="before")["Body"].read() == b"kept"
        with pytest.raises(ClientError):
            c.head_object(Bucket="frozen", Key="during")
        wait_until(lambda: d.airlock("verify", check=False).returncode == 0, "the domains to be equal", 30)
        assert "never retrieved" not in d.vault.log_text()
        assert "Traceback" not in d.vault.log_text()
    finally:
        d.stop()


def test_a_vault_stopped_under_load_finishes_the_append_in_flight_before_closing_its_files(tmp_path):
    """SIGTERM to the vault while PUTs stream in: the stop cancels the link
    sessions, but an APPEND already being made durable finishes before the
    log and overlays close -- no "not open for writing" error, no
    unretrieved task, and after a restart the two domains agree."""
    import signal
    d = Deployment(tmp_path / "deploy", ack_timeout=2.0).start()
    try:
        c = d.gateway.client()
        c.create_bucket(Bucket="busy")
        stop = threading.Event()

        def writer(k: int) -> None:
            i = 0
            while not stop.is_set() and i < 2000:           # bounded
                i += 1
                try:        # small bodies and large ones (whose APPENDs wait for overlay syncs)
                    c.put_object(Bucket="busy", Key=f"t{k}/{i}", Body=os.urandom(3000 if k % 2 else 600_000))
                except Exception:
                    time.sleep(0.05)
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        time.sleep(3)
        d.vault.proc.send_signal(signal.SIGTERM)
        d.vault.proc.wait(60)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
        log = d.vault.log_text()
        assert "never retrieved" not in log and "not open for writing" not in log, log[-3000:]
        d.vault.stop()
        d.vault.start()
        wait_until(lambda: _put_ok_in(c, "busy"), "writes to succeed again", 60)
        wait_until(lambda: d.airlock("verify", check=False).returncode == 0, "the domains to be equal", 60)
    finally:
        d.stop()


def test_a_write_that_gets_no_ack_from_a_frozen_vault_closes_its_link_connection_at_once(tmp_path):
    """A vault that stopped answering (SIGSTOP) does not answer a TLS close
    either.  The link connection whose batch got no ack in time is closed
    with the 503, not gracefully: a graceful close waited 1 s for the
    vault's close_notify before the 503 went out, and left the connection
    open (half-open to a frozen vault) for asyncio's 30 s SSL shutdown
    timeout while reconnects were tried beside it."""
    d = Deployment(tmp_path / "d", ack_timeout=2.0)
    d.vault.start()
    try:
        d.gateway.extra_args = [*d._gateway_args(), "--workers", "1"]   # one process, one link
        d.gateway.start()
        s3 = d.gateway.client()
        s3.create_bucket(Bucket="keep")
        links = _connections_to(d.vault.port)
        assert len(links) == 1, links
        d.vault.proc.send_signal(signal.SIGSTOP)
        try:
            assert_put_fails_503(s3, "frozen")
            # the vault's end sees the gateway's FIN (the kernel answers for a stopped process)
            wait_until(lambda: _closed_by_peer_from(d.vault.port, links[0]),
                       "the failed link connection to be closed", 1.0)
        finally:
            d.vault.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: _put_ok_in(s3, "keep"), "writes to succeed again", 60)
        assert s3.list_objects_v2(Bucket="keep", Prefix="frozen").get("KeyCount") == 0
        wait_until(lambda: d.airlock("verify", check=False).returncode == 0, "the domains to be equal", 60)
    finally:
        d.stop()


def _connections_to(port: int) -> list[int]:
    """The local ports of the established TCP connections to 127.0.0.1:`port`."""
    remote = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f]
    return [int(cols[1].split(":")[1], 16) for cols in rows[1:] if cols[2] == remote and cols[3] == "01"]


def _closed_by_peer_from(port: int, client_port: int) -> bool:
    """The connection from 127.0.0.1:`client_port` to 127.0.0.1:`port` was
    closed by its client while the server has not closed its end (CLOSE_WAIT)."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as f:
        return any(cols[1] == local and cols[2] == remote and cols[3] == "08" for cols in (line.split() for line in f))


def _closed_by_peer(port: int) -> bool:
    """A TCP connection to 127.0.0.1:`port` was closed by its client while
    the server has not closed its end yet (state CLOSE_WAIT in /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(cols[1] == local and cols[3] == "08" for cols in (line.split() for line in f))


def _put_ok_in(c, bucket: str) -> bool:
    try:
        c.put_object(Bucket=bucket, Key="after", Body=b"x")
        return True
    except ClientError:
        return False
