"""The vault's link port refuses everyone but its primary, and even the primary
cannot rewrite history (SPEC "The two domains"; docs/format/link.md invariants 2-5).

Every test talks to a real vault process over loopback, next to a real
gateway that keeps replicating through it; after each attack the vault must
still be running, still serve the gateway, and still hold exactly what it held.
The tests take turns on one deployment (the next attack meets a vault that
survived the ones before); each reads the vault's log and counters from
where they were at its start.
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import sys
import time
from pathlib import Path

import blake3
from awscrt.checksums import crc64nvme
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from airlock.keys import create_identity  # noqa: E402
from airlock.link.server import HANDSHAKE_TIMEOUT_S  # noqa: E402
from airlock.link import protocol as W  # noqa: E402
from airlock.link.tls import VAULT_SERVER_NAME, client_context  # noqa: E402
from airlock.log import payload as P  # noqa: E402

IO_TIMEOUT_S = 5.0
WAIT_S = 10.0
NOT_REQUESTS = [0, 2, 4, 6, 16, 17, 99, 200, 254, 255]   # responses, ERROR, unknown: none is a verb


# ---------------------------------------------------------------------- helpers
def primary_keys(d) -> tuple[str, str, str]:
    k = d.root / "primary" / "keys"
    return str(k / "primary.crt"), str(k / "primary.key"), str(k / "vault.crt")


def tls_connect(d, cert: str, key: str, vault_cert: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", d.vault.port), timeout=IO_TIMEOUT_S)
    try:
        return client_context(cert, key, vault_cert).wrap_socket(raw, server_hostname=VAULT_SERVER_NAME)
    except BaseException:
        raw.close()
        raise


def recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += part
    return buf


def recv_frame(sock) -> W.Frame:
    header = recv_exact(sock, W.HEADER_SIZE)
    h = W.parse_header(header, W.RESPONSE_KINDS)
    payload = recv_exact(sock, h.length) if h.length else b""
    W.verify(header, payload)
    return W.Frame(h.kind, h.request_id, payload, h.flags)


def raw_header(kind: int, request_id: int, length: int, magic: bytes = W.MAGIC, version: int = W.VERSION,
               flags: int = 0, reserved: int = 0, payload: bytes = b"", bad_checksum: bool = False) -> bytes:
    """A frame header built by hand, so it can break any rule the codec enforces."""
    prefix = struct.pack("<4sBBHQII", magic, version, kind, flags, request_id, length, reserved)
    checksum = struct.pack("<Q", crc64nvme(prefix + payload))
    if bad_checksum:
        checksum = bytes(b ^ 0xFF for b in checksum)
    return prefix + checksum


def assert_closed(sock, timeout: float = IO_TIMEOUT_S) -> None:
    """The peer closes the connection (EOF, reset or a TLS alert) within `timeout`."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            return
        except socket.timeout:
            break
        if not data:
            return
        # a TLS session may still deliver what was sent before the close; keep reading
    raise AssertionError("the vault did not close the connection")


class Session:
    """A link session with the primary's real key, spoken frame by frame."""

    def __init__(self, d, hello: bool = True):
        self.sock = tls_connect(d, *primary_keys(d))
        self.rid = 0
        if hello:
            f = self.request(W.HELLO, W.encode_json({"protocol": W.VERSION, "primary_id": "test-attacker"}))
            assert f.kind == W.HELLO_OK, f

    def request(self, kind: int, payload=b"") -> W.Frame:
        self.rid += 1
        self.sock.sendall(W.encode_frame(kind, self.rid, payload))
        f = recv_frame(self.sock)
        assert f.request_id == self.rid
        return f

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def error_of(frame: W.Frame) -> dict:
    assert frame.kind == W.ERROR, (W.KIND_NAMES.get(frame.kind), bytes(frame.payload)[:200])
    return W.decode_error(frame.payload)


def log_since_start(d) -> str:
    """The vault's log since the current test began."""
    return d.vault.log_text()[d.log_mark:]


def wait_for_log(d, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while text not in log_since_start(d):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the vault log:\n{d.vault.log_text()[-3000:]}")
        time.sleep(0.05)


def vault_records(d, from_seq: int = 1) -> list[W.LinkRecord]:
    s = Session(d)
    try:
        f = s.request(W.GET_RECORDS, W.encode_get_records(from_seq, 10000))
        assert f.kind == W.RECORDS, f
        return W.decode_records(f.payload)
    finally:
        s.close()


def assert_vault_serves_the_gateway(d, key: str) -> None:
    """The vault is alive, the gateway still replicates through it, and both agree."""
    assert d.vault.proc.poll() is None, "the vault exited"
    s3 = d.gateway.client(retries={"total_max_attempts": 1})
    s3.put_object(Bucket="sec", Key=key, Body=key.encode())
    assert s3.get_object(Bucket="sec", Key=key)["Body"].read() == key.encode()
    assert d.vault.status()["last_seq"] == vault_records(d)[-1].seq
    r = d.airlock("verify", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def _deployment(tmp_path_factory):
    from conftest import Deployment
    d = Deployment(tmp_path_factory.mktemp("linksec") / "deploy").start()
    try:
        s3 = d.gateway.client(retries={"total_max_attempts": 1})
        s3.create_bucket(Bucket="sec")                  # record 1
        s3.put_object(Bucket="sec", Key="original", Body=b"the original bytes")    # record 2
        yield d
    finally:
        d.stop()


@pytest.fixture
def dep(_deployment):
    """The shared deployment, with the vault's log position and link
    counters at the start of this test (`log_mark`, `link_stats`)."""
    d = _deployment
    assert d.vault.proc.poll() is None, "the vault exited"
    d.log_mark = len(d.vault.log_text())
    d.link_stats = d.vault.status()["link"]
    return d


# ---------------------------------------------------------------------- (a) no TLS at all
def test_plain_tcp_garbage_is_refused(dep):
    for junk in (b"GET / HTTP/1.1\r\nHost: vault\r\n\r\n", os.urandom(4096),
                 W.encode_frame(W.HELLO, 1, W.encode_json({"protocol": 1, "primary_id": "no-tls"}))):
        with socket.create_connection(("127.0.0.1", dep.vault.port), timeout=IO_TIMEOUT_S) as s:
            s.sendall(junk)
            # about one random start in 540 reads to OpenSSL as the header of
            # a longer record (mostly SSLv2-style: high bit set, CLIENT-HELLO
            # type), and it rightly waits for the rest until the vault's
            # handshake timeout drops the peer; any other junk is refused at once
            assert_closed(s, HANDSHAKE_TIMEOUT_S + IO_TIMEOUT_S)
    wait_for_log(dep, "refused connection")
    assert_vault_serves_the_gateway(dep, "after-garbage")


# ---------------------------------------------------------------------- (b) the wrong key
def _attempt_hello(d, ctx: ssl.SSLContext) -> None:
    """Try TLS + HELLO; the vault must never answer.  (In TLS 1.3 the client may
    finish its half of the handshake before the server checks its certificate,
    so the refusal can surface on the first read.)"""
    raw = socket.create_connection(("127.0.0.1", d.vault.port), timeout=IO_TIMEOUT_S)
    try:
        try:
            s = ctx.wrap_socket(raw, server_hostname=VAULT_SERVER_NAME)
        except (ssl.SSLError, ConnectionError):
            return
        with s:
            try:
                s.sendall(W.encode_frame(W.HELLO, 1, W.encode_json({"protocol": 1, "primary_id": "intruder"})))
            except (ssl.SSLError, ConnectionError):
                return
            try:
                data = s.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return
            assert data == b"", f"the vault answered an unauthenticated client: {data[:64]!r}"
    finally:
        raw.close()


def test_foreign_identity_is_refused(dep, tmp_path):
    cert, key = create_identity(tmp_path / "foreign", "primary")     # right name, wrong key
    vault_cert = primary_keys(dep)[2]
    _attempt_hello(dep, client_context(cert, key, vault_cert))
    wait_for_log(dep, "refused connection")

    # no client certificate at all
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(vault_cert)
    _attempt_hello(dep, bare)

    # the vault's own certificate used as a client identity is not the primary's either
    vkeys = dep.vault.keys
    _attempt_hello(dep, client_context(str(vkeys / "vault.crt"), str(vkeys / "vault.key"), vault_cert))

    assert dep.vault.status()["link"]["bad_handshakes"] - dep.link_stats["bad_handshakes"] >= 3
    assert log_since_start(dep).count("refused connection") >= 3
    assert_vault_serves_the_gateway(dep, "after-foreign")


# ---------------------------------------------------------------------- (c) right key, bad frames
MALFORMED = {
    "bad-magic": raw_header(W.STATUS, 7, 0, magic=b"XLNK"),
    "bad-version": raw_header(W.STATUS, 7, 0, version=W.VERSION + 1),
    "old-version": raw_header(W.STATUS, 7, 0, version=1),
    "flags": raw_header(W.STATUS, 7, 0, flags=1),
    "reserved": raw_header(W.STATUS, 7, 0, reserved=5),
    "oversized": raw_header(W.APPEND, 7, W.MAX_FRAME_PAYLOAD + 1),   # and no payload follows
    "checksum": raw_header(W.STATUS, 7, 0, bad_checksum=True),
    "random-bytes": os.urandom(W.HEADER_SIZE * 3),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_from_the_real_primary_key_are_refused(dep, case):
    s = Session(dep)
    try:
        s.send_raw(MALFORMED[case])
        err = error_of(recv_frame(s.sock))
        assert err["code"] == "bad_frame", err
        assert_closed(s.sock)
    finally:
        s.close()
    wait_for_log(dep, "refusing frame")
    assert_vault_serves_the_gateway(dep, f"after-{case}")


def test_a_frame_torn_by_the_client_closing_is_harmless(dep):
    s = Session(dep)
    s.send_raw(raw_header(W.APPEND, 7, 1000)[:20])
    s.close()
    s = Session(dep)
    try:
        s.send_raw(raw_header(W.APPEND, 8, 1000) + b"x" * 10)
    finally:
        s.close()
    assert_vault_serves_the_gateway(dep, "after-torn")


def test_kinds_that_are_not_requests_are_refused(dep):
    """There is no delete verb, and answers or unknown numbers are not verbs either."""
    for kind in NOT_REQUESTS:
        s = Session(dep)
        try:
            s.send_raw(raw_header(kind, 9, 0))
            err = error_of(recv_frame(s.sock))
            assert err["code"] == "unknown_kind", (kind, err)
            assert_closed(s.sock)
        finally:
            s.close()
    assert log_since_start(dep).count("unknown_kind") >= len(NOT_REQUESTS)
    assert_vault_serves_the_gateway(dep, "after-kinds")


def test_requests_before_hello_are_refused(dep):
    s = Session(dep, hello=False)
    try:
        f = s.request(W.STATUS)
        assert error_of(f)["code"] == "bad_frame"
        assert_closed(s.sock)
    finally:
        s.close()
    assert_vault_serves_the_gateway(dep, "after-no-hello")


# ---------------------------------------------------------------------- (d, e) history is append-only
def test_rewriting_a_sequence_number_is_refused(dep):
    before = vault_records(dep)
    last = before[-1].seq
    put = next(r for r in before if r.rtype == P.OBJECT_PUT)
    forged = json.loads(put.payload)
    forged["size"] += 1
    forged_payload = P.encode_payload(forged)

    s = Session(dep)
    try:
        # a different record under an existing number: refused, the session goes on
        err = error_of(s.request(W.APPEND, W.encode_records([(put.seq, put.rtype, forged_payload)])))
        assert err["code"] == "rewrite_refused", err
        # the last record too, and a different record type under a held number
        err = error_of(s.request(W.APPEND, W.encode_records([(last, P.BUCKET_DELETE,
                                                              P.encode_payload({"bucket": "sec"}))])))
        assert err["code"] == "rewrite_refused", err
        # an identical retransmission is accepted and changes nothing
        ack = s.request(W.APPEND, W.encode_records([(put.seq, put.rtype, put.payload)]))
        assert ack.kind == W.ACK and W.decode_u64(ack.payload) == last
        # identical first, then a different one: the whole batch is refused
        first = before[0]
        assert first.seq + 1 == put.seq
        err = error_of(s.request(W.APPEND, W.encode_records([(first.seq, first.rtype, first.payload),
                                                             (put.seq, put.rtype, forged_payload)])))
        assert err["code"] == "rewrite_refused", err
        status = W.decode_json(s.request(W.STATUS).payload)
        assert status["last_seq"] == last
    finally:
        s.close()
    wait_for_log(dep, "tried to rewrite history")
    assert dep.vault.status()["link"]["refused_rewrites"] - dep.link_stats["refused_rewrites"] >= 3
    assert vault_records(dep) == before          # byte for byte
    assert dep.gateway.client().get_object(Bucket="sec", Key="original")["Body"].read() == b"the original bytes"
    assert_vault_serves_the_gateway(dep, "after-rewrite")


def test_appending_with_a_gap_is_refused(dep):
    before = vault_records(dep)
    last = before[-1].seq
    rec = (P.BUCKET_CREATE, P.encode_payload({"bucket": "gap", "owner": "x", "created": 0}))
    s = Session(dep)
    try:
        for seq in (last + 2, last + 1000):
            err = error_of(s.request(W.APPEND, W.encode_records([(seq, *rec)])))
            assert err["code"] == "sequence_gap", err
            assert err["last_seq"] == last
        # a batch that starts right but skips a number inside
        err = error_of(s.request(W.APPEND, W.encode_records([(last + 1, *rec), (last + 3, *rec)])))
        assert err["code"] == "sequence_gap", err
        assert W.decode_json(s.request(W.STATUS).payload)["last_seq"] == last
    finally:
        s.close()
    assert vault_records(dep) == before
    assert_vault_serves_the_gateway(dep, "after-gap")


def test_malformed_records_are_refused_with_an_error(dep):
    """An APPEND whose records are not valid commit records (unknown record type,
    payload that is not JSON) is answered with an ERROR, and the vault keeps running."""
    last = vault_records(dep)[-1].seq
    s = Session(dep)
    try:
        for rtype, payload in ((200, b"{}"), (P.OBJECT_PUT, b"not json")):
            err = error_of(s.request(W.APPEND, W.encode_records([(last + 1, rtype, payload)])))
            assert err["code"] == "bad_frame", err
    finally:
        s.close()
    assert dep.vault.status()["last_seq"] == last
    assert_vault_serves_the_gateway(dep, "after-bad-record")


@pytest.mark.parametrize("size", [4096, 1 << 20], ids=["small-chunk", "large-chunk"])
def test_a_chunk_whose_bytes_do_not_match_its_id_is_refused_and_not_kept(dep, size):
    """PUT_CHUNK names the chunk by its BLAKE3 digest; the vault verifies it
    (a small chunk on its event loop, a large one on a thread together with
    the store) and keeps nothing that does not match.  The session goes on."""
    data = os.urandom(size)
    good = blake3.blake3(data).digest()
    lie = blake3.blake3(data + b"!").digest()
    s = Session(dep)
    try:
        err = error_of(s.request(W.PUT_CHUNK, lie + data))
        assert err["code"] == "digest_mismatch", err
        err = error_of(s.request(W.GET_CHUNK, lie))
        assert err["code"] == "not_found", err
        # one flipped byte under the right id: refused too, and not kept under it
        bad = bytearray(data)
        bad[size // 2] ^= 1
        err = error_of(s.request(W.PUT_CHUNK, good + bytes(bad)))
        assert err["code"] == "digest_mismatch", err
        err = error_of(s.request(W.GET_CHUNK, good))
        assert err["code"] == "not_found", err
        # the session is still good: the right bytes are kept and served
        assert s.request(W.PUT_CHUNK, good + data).kind == W.OK
        got = s.request(W.GET_CHUNK, good)
        assert got.kind == W.CHUNK and bytes(got.payload) == data
    finally:
        s.close()
    assert_vault_serves_the_gateway(dep, f"after-bad-chunk-{size}")
