"""A gateway stopped (SIGTERM) while uploads are still sending their bodies
lets them finish: each gets its 200 on a connection that then closes, the
objects are there after a restart, and the process exits without waiting
out its grace period.  (aiohttp's own shutdown drops the data of a
connection it is closing: such an upload used to hang for the whole
SHUTDOWN_GRACE_S and then fail.)  Real vault and gateway processes, real
sockets, presigned PUTs sent by hand so that a body can stop half-way."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from urllib.parse import urlsplit

import pytest

from conftest import Deployment, recv_head, wait_for_port, wait_until


def _start_put(url: str, body: bytes, sent: int) -> socket.socket:
    """A presigned PUT whose first `sent` body bytes are on their way."""
    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    head = (f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    s.sendall(head + body[:sent])
    return s


def _response(s: socket.socket) -> tuple[int, dict[str, str]]:
    data = recv_head(s)
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    if not head or not head[0].startswith("HTTP/1.1 "):
        return 0, {}
    headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    return int(head[0].split()[1]), {k.lower(): v for k, v in headers.items()}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_uploads_still_sending_their_bodies_when_the_gateway_stops_finish_and_are_kept(tmp_path, workers):
    d = Deployment(tmp_path / "d")
    d.vault.start()
    try:
        d.gateway.extra_args = [*d._gateway_args(), "--workers", workers]
        d.gateway.start()
        c = d.gateway.client()
        c.create_bucket(Bucket="uploads")
        bodies = {f"k{i}": os.urandom(200_000 + i) for i in range(3)}
        urls = {k: c.generate_presigned_url("put_object", Params={"Bucket": "uploads", "Key": k}, ExpiresIn=300)
                for k in bodies}
        # with two processes the first busy connection stays in the leader
        # and the next ones go to the worker (primary/dispatch.py)
        socks = {}
        for k, body in bodies.items():
            socks[k] = _start_put(urls[k], body, len(body) // 2)
            time.sleep(0.2)
        d.gateway.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)                              # the stop has begun ...
        for k, body in bodies.items():
            socks[k].sendall(body[len(body) // 2:])   # ... and the bodies go on arriving
        for k, s in socks.items():
            status, headers = _response(s)
            s.close()
            assert status == 200, f"{k}: {status} {headers}"
            assert headers.get("connection", "").lower() == "close"
        d.gateway.proc.wait(30)
        assert d.gateway.proc.returncode in (0, -signal.SIGTERM)
        d.gateway.stop()
        d.gateway.start()
        c = d.gateway.client()
        for k, body in bodies.items():
            assert c.get_object(Bucket="uploads", Key=k)["Body"].read() == body
        wait_until(lambda: d.airlock("verify", check=False).returncode == 0, "the domains to be equal", 30)
    finally:
        d.stop()


def test_an_upload_that_stops_sending_is_cut_after_the_grace_and_the_gateway_exits(tmp_path):
    """A client that goes silent mid-body cannot hold a stop: after
    SHUTDOWN_GRACE_S of draining (and CUT_AFTER_DRAIN_S more) the gateway
    exits, and nothing of that upload is visible."""
    from airlock.gateway import CUT_AFTER_DRAIN_S, SHUTDOWN_GRACE_S
    d = Deployment(tmp_path / "d")
    d.vault.start()
    try:
        d.start_gateway()
        c = d.gateway.client()
        c.create_bucket(Bucket="uploads")
        url = c.generate_presigned_url("put_object", Params={"Bucket": "uploads", "Key": "silent"}, ExpiresIn=300)
        s = _start_put(url, os.urandom(100_000), 1000)          # and then nothing more
        time.sleep(0.3)
        t0 = time.monotonic()
        d.gateway.proc.send_signal(signal.SIGTERM)
        # a bound on "it ends", with room for a slow machine (not a performance claim)
        d.gateway.proc.wait(SHUTDOWN_GRACE_S + CUT_AFTER_DRAIN_S + 20)
        assert time.monotonic() - t0 >= SHUTDOWN_GRACE_S - 1       # the silent upload had its grace
        s.close()
        d.gateway.stop()
        d.gateway.start()
        assert d.gateway.client().list_objects_v2(Bucket="uploads").get("KeyCount") == 0
    finally:
        d.stop()


def test_ctrl_c_on_the_terminal_stops_the_gateway_first_so_its_uploads_in_flight_still_commit(tmp_path):
    """`airlock up` on a terminal: Ctrl-C reaches the whole foreground
    process group, so the vault used to stop at the same moment as the
    gateway and an upload the gateway was finishing could not commit.  The
    children now run in process groups of their own: `up` alone gets the
    SIGINT and stops the gateway (which finishes the upload) before the
    vault."""
    import pty
    import re
    import select
    import sys

    import boto3
    from botocore.config import Config

    from conftest import free_port

    port = free_port()
    data = tmp_path / "d"
    pid, fd = pty.fork()
    if pid == 0:                                    # the child: `airlock up` on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "airlock", "up", "--data", str(data), "--port", str(port)])
    out = b""

    def read_for(seconds: float, until: bytes | None = None) -> None:
        nonlocal out
        end = time.monotonic() + seconds
        while time.monotonic() < end and (until is None or until not in out):
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                out += chunk
    try:
        read_for(90, b"secret key:")
        read_for(5, b"\n")
        text = out.decode(errors="replace")
        access = re.search(r"access key: (\S+)", text).group(1)
        secret = re.search(r"secret key: (\S+)", text).group(1)
        c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                         aws_access_key_id=access, aws_secret_access_key=secret,
                         config=Config(retries={"total_max_attempts": 1}))
        c.create_bucket(Bucket="uploads")
        body = os.urandom(300_000)
        url = c.generate_presigned_url("put_object", Params={"Bucket": "uploads", "Key": "k"}, ExpiresIn=300)
        s = _start_put(url, body, len(body) // 2)
        time.sleep(0.3)
        os.write(fd, b"\x03")                       # Ctrl-C on the terminal
        time.sleep(0.5)
        s.sendall(body[len(body) // 2:])
        status, headers = _response(s)
        s.close()
        assert status == 200, (status, headers)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            read_for(0.5)
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(st) == 0, out.decode(errors="replace")[-2000:]
                break
        else:
            raise AssertionError("airlock up did not stop after Ctrl-C")
        pid = 0
        text = out.decode(errors="replace")
        assert text.index("stopping gateway") < text.index("stopping vault")
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)            # `up` stops its children in order
            os.waitpid(pid, 0)
        os.close(fd)
    # the upload is there, on both sides
    again = subprocess.Popen([sys.executable, "-m", "airlock", "up", "--data", str(data), "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, again, timeout=60)
        wait_until(lambda: _get_or_none(c, "uploads", "k") is not None, "the gateway to serve", 30)
        assert _get_or_none(c, "uploads", "k") == body
        verify = subprocess.run([sys.executable, "-m", "airlock", "verify", "--data", str(data)],
                                capture_output=True, text=True, timeout=120)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        again.send_signal(signal.SIGINT)
        again.communicate(timeout=90)


def _get_or_none(c, bucket: str, key: str) -> bytes | None:
    try:
        return c.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception:
        return None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_gateway_stopped_while_the_vault_is_frozen_answers_its_waiting_writes_503_when_the_grace_ends(
        tmp_path, workers):
    """Writes wait for a vault that does not answer (SIGSTOP), with an ack
    timeout far beyond the stop's grace; the gateway is stopped meanwhile.
    When the grace is over the writes still waiting answer 503 (on
    connections that then close), their records void as after an ack
    timeout, and the process exits: the stop does not wait out the ack
    timeout.  (It used to, silently, and then RECONNECT_TIMEOUT_S more for
    a reconnect attempted for the records queued behind the batch: a stop
    took ack_timeout + ~6 s, and the clients were cut without an answer.)
    Nothing of those writes is visible after a restart, no 'exception was
    never retrieved' in the log, and the two domains agree."""
    from airlock.gateway import CUT_AFTER_DRAIN_S, SHUTDOWN_GRACE_S
    ack_timeout = 3 * SHUTDOWN_GRACE_S
    d = Deployment(tmp_path / "d", ack_timeout=ack_timeout)
    d.vault.start()
    try:
        d.gateway.extra_args = [*d._gateway_args(), "--workers", workers]
        d.gateway.start()
        c = d.gateway.client()
        c.create_bucket(Bucket="uploads")
        urls = [c.generate_presigned_url("put_object", Params={"Bucket": "uploads", "Key": f"k{i}"},
                                         ExpiresIn=300) for i in range(4)]
        d.vault.proc.send_signal(signal.SIGSTOP)
        try:
            socks = [_start_put(u, b"v" * 5000, 5000) for u in urls]     # whole bodies; no answer comes
            time.sleep(1.0)
            t0 = time.monotonic()
            d.gateway.proc.send_signal(signal.SIGTERM)
            answers = [_response(s) for s in socks]
            d.gateway.proc.wait(ack_timeout + 30)
            took = time.monotonic() - t0
            for s in socks:
                s.close()
        finally:
            d.vault.proc.send_signal(signal.SIGCONT)
        for status, headers in answers:
            assert status == 503, answers
            assert headers.get("connection", "").lower() == "close"
        # the grace was given; the ack timeout was not waited out (a bound
        # with room for a slow machine, not a performance claim)
        assert SHUTDOWN_GRACE_S - 1 <= took < SHUTDOWN_GRACE_S + CUT_AFTER_DRAIN_S + 8 < ack_timeout, took
        time.sleep(0.5)
        log = d.gateway.log_text()
        assert "never retrieved" not in log, log[-3000:]
        d.gateway.stop()
        d.start_gateway()
        assert d.gateway.client().list_objects_v2(Bucket="uploads").get("KeyCount") == 0
        wait_until(lambda: d.airlock("verify", check=False).returncode == 0, "the domains to be equal", 60)
    finally:
        d.stop()


def test_the_processes_of_airlock_up_stop_when_up_itself_is_killed(tmp_path):
    """They run in process groups of their own (a terminal's Ctrl-C reaches
    `up` alone); should `up` die by SIGKILL, they get SIGTERM
    (PR_SET_PDEATHSIG) and stop in order instead of running on unseen."""
    import sys

    from conftest import free_port

    port = free_port()
    data = tmp_path / "d"
    up = subprocess.Popen([sys.executable, "-m", "airlock", "up", "--data", str(data), "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        wait_for_port(port, up, timeout=90)
        children = _children_of(up.pid)
        assert len(children) == 2                   # the vault and the gateway
        up.kill()
        up.wait(10)
        wait_until(lambda: not any(_alive(p) for p in children), "up's processes to stop", 60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for p in children or _children_of(up.pid):
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
