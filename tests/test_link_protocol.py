"""The link frame codec and payload codecs (docs/format/link.md), including real loopback TCP."""
from __future__ import annotations

import asyncio
import json
import socket
import struct

import blake3
import pytest

from airlock.errors import FormatError
from airlock.link import protocol as p
from airlock.link.protocol import ConnectionClosed, FrameError

TIMEOUT_S = 5.0


# --------------------------------------------------------------------------
# constants and the worked example
# --------------------------------------------------------------------------
def test_worked_example_status_frame_matches_the_doc():
    frame = p.encode_frame(p.STATUS, 7)
    prefix = bytes.fromhex("414c4e4b020d0000" "0700000000000000" "0000000000000000")
    assert frame == prefix + bytes.fromhex("30462d73b26be043")
    assert len(frame) == p.HEADER_SIZE == 32


def test_frame_checksum_is_crc64_nvme_with_its_published_check_value():
    # CRC-64/NVME check value (CRC catalogue): "123456789" -> 0xae8b14860a799888
    assert p._checksum(b"123456789", []) == 0xAE8B14860A799888
    assert p._checksum(b"1234", [memoryview(b"56789")]) == 0xAE8B14860A799888


def test_kinds_split_into_requests_and_responses():
    assert p.REQUEST_KINDS.isdisjoint(p.RESPONSE_KINDS)
    assert p.REQUEST_KINDS | p.RESPONSE_KINDS == set(p.KIND_NAMES)
    assert all(k % 2 == 1 for k in p.REQUEST_KINDS)
    assert p.ERROR in p.RESPONSE_KINDS
    assert p.RESPONSE_TO[p.APPEND] == p.ACK and p.RESPONSE_TO[p.GET_RECORDS] == p.RECORDS
    assert set(p.RESPONSE_TO.values()) == p.RESPONSE_KINDS - {p.ERROR}
    assert p.KIND_NAMES[p.ERROR] == "ERROR" and p.ERROR == 255


def test_frame_error_is_a_format_error_with_a_link_code():
    e = FrameError("x")
    assert isinstance(e, FormatError) and e.code == "bad_frame"


# --------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(p.KIND_NAMES))
def test_every_kind_roundtrips_through_header_and_checksum(kind):
    payload = bytes(range(256)) * 3
    frame = p.encode_frame(kind, 2**64 - 1, payload)
    h = p.parse_header(frame[:32])
    assert h == (kind, 0, 2**64 - 1, len(payload))
    p.verify(frame[:32], frame[32:])


def test_header_over_parts_equals_header_over_the_concatenation():
    digest, data = b"\x01" * 32, memoryview(bytearray(b"chunk" * 1000))
    assert p.encode_header(p.PUT_CHUNK, 3, [digest, data]) == p.encode_header(p.PUT_CHUNK, 3, digest + bytes(data))
    assert p.encode_frame(p.PUT_CHUNK, 3, [digest, data]) == p.encode_frame(p.PUT_CHUNK, 3, p.encode_chunk(digest, data))
    p.verify(p.encode_header(p.PUT_CHUNK, 3, [digest, data]), [digest, data])


def test_encoder_refuses_caller_mistakes():
    with pytest.raises(ValueError):
        p.encode_frame(42, 1)
    with pytest.raises(ValueError):
        p.encode_frame(p.OK, -1)
    with pytest.raises(ValueError):
        p.encode_frame(p.OK, 2**64)
    with pytest.raises(ValueError):
        p.encode_header(p.CHUNK, 1, [b"x", memoryview(bytearray(p.MAX_FRAME_PAYLOAD))])
    assert p.parse_header(p.encode_header(p.CHUNK, 1, memoryview(bytearray(p.MAX_FRAME_PAYLOAD)))).length \
        == p.MAX_FRAME_PAYLOAD


def _patched(header: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(header)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


GOOD = p.encode_frame(p.APPEND, 9, b"abc")[:32]


@pytest.mark.parametrize("header, code, reason", [
    (_patched(GOOD, 0, "<4s", b"ALNX"), "bad_frame", "magic"),
    (_patched(GOOD, 4, "<B", p.VERSION + 1), "bad_frame", "version"),
    (_patched(GOOD, 4, "<B", 1), "bad_frame", "version"),
    (_patched(GOOD, 4, "<B", 0), "bad_frame", "version"),
    (_patched(GOOD, 6, "<H", 1), "bad_frame", "flags"),
    (_patched(GOOD, 6, "<H", 0x8000), "bad_frame", "flags"),
    (_patched(GOOD, 20, "<I", 1), "bad_frame", "reserved"),
    (_patched(GOOD, 16, "<I", p.MAX_FRAME_PAYLOAD + 1), "bad_frame", "length"),
    (_patched(GOOD, 16, "<I", 0xFFFFFFFF), "bad_frame", "length"),
    (_patched(GOOD, 5, "<B", 0), "unknown_kind", "kind"),
    (_patched(GOOD, 5, "<B", 17), "unknown_kind", "kind"),
    (_patched(GOOD, 5, "<B", 254), "unknown_kind", "kind"),
    (GOOD[:31], "bad_frame", "size"),
    (GOOD + b"\0", "bad_frame", "size"),
], ids=["magic", "version-next", "version1-blake3", "version0", "flag-bit0", "flag-bit15", "reserved", "length+1", "length-max",
        "kind0", "kind17", "kind254", "short", "long"])
def test_bad_headers_are_refused_with_the_right_code(header, code, reason):
    with pytest.raises(FrameError) as ei:
        p.parse_header(header)
    assert (ei.value.code, ei.value.reason) == (code, reason)


def test_header_refusal_carries_the_request_id_when_it_is_known():
    with pytest.raises(FrameError) as ei:
        p.parse_header(_patched(GOOD, 5, "<B", 99))
    assert ei.value.request_id == 9


def test_kind_not_allowed_on_this_side_is_unknown_kind():
    ack = p.encode_frame(p.ACK, 1, p.encode_u64(5))[:32]
    assert p.parse_header(ack, p.RESPONSE_KINDS).kind == p.ACK
    with pytest.raises(FrameError) as ei:
        p.parse_header(ack, p.REQUEST_KINDS)
    assert ei.value.code == "unknown_kind"


def test_checksum_covers_header_and_payload():
    frame = bytearray(p.encode_frame(p.PUT_CHUNK, 1, b"\x07" * 32 + b"data"))
    p.verify(frame[:32], frame[32:])
    for i in (0, 8, 16, 24, 31, 32, len(frame) - 1):
        bad = bytearray(frame)
        bad[i] ^= 0x01
        with pytest.raises(FrameError) as ei:
            p.verify(bad[:32], bad[32:])
        assert (ei.value.code, ei.value.reason) == ("bad_frame", "checksum")


# --------------------------------------------------------------------------
# payload codecs
# --------------------------------------------------------------------------
def test_records_roundtrip_and_keep_flags():
    recs = [(1, 1, b"put {...}"), p.LinkRecord(2, 7, b"", 0), p.LinkRecord(2**64 - 1, 255, b"\0" * 1000, 0xBEEF)]
    out = p.decode_records(p.encode_records(recs))
    assert out == [p.LinkRecord(1, 1, b"put {...}", 0), recs[1], recs[2]]
    assert out[2].flags == 0xBEEF
    assert p.decode_records(p.encode_records([])) == []
    assert p.encode_records([]) == b"\0\0\0\0"


def test_records_layout_matches_the_doc():
    buf = p.encode_records([(42, 3, b"xy")])
    assert buf == struct.pack("<I", 1) + struct.pack("<QBHI", 42, 3, 0, 2) + b"xy"
    assert p.RECORD_ENTRY_HEADER_SIZE == 15


@pytest.mark.parametrize("buf", [
    b"", b"\x01\0\0", struct.pack("<I", 1),
    struct.pack("<I", 1) + struct.pack("<QBHI", 1, 1, 0, 3) + b"ab",          # payload short
    struct.pack("<I", 1) + struct.pack("<QBHI", 1, 1, 0, 2) + b"abc",         # trailing byte
    struct.pack("<I", 2) + struct.pack("<QBHI", 1, 1, 0, 0),                   # count too big
    struct.pack("<I", 0xFFFFFFFF) + b"\0" * 100,                              # absurd count
    struct.pack("<I", 1) + struct.pack("<QBHI", 0, 1, 0, 0),                   # seq 0
    struct.pack("<I", 0) + b"\0",                                             # trailing after zero
], ids=["empty", "short-count", "no-entry", "payload-short", "trailing", "count-big", "count-absurd",
        "seq0", "zero-trailing"])
def test_records_decoder_refuses_inconsistent_lengths(buf):
    with pytest.raises(FrameError) as ei:
        p.decode_records(buf)
    assert ei.value.code == "bad_frame"


def test_records_encoder_refuses_bad_fields():
    for bad in [(0, 1, b""), (2**64, 1, b""), (1, 256, b""), (1, 1, b"", 0x10000)]:
        with pytest.raises(ValueError):
            p.encode_records([bad])


def test_json_roundtrip_and_refusals():
    obj = {"protocol": 1, "primary_id": "prim\u00e4ry", "n": [1, 2.5, None, True], "nested": {"a": "b"}}
    assert p.decode_json(p.encode_json(obj)) == obj
    assert p.decode_json(memoryview(p.encode_json({}))) == {}
    for bad in [b"", b"[]", b"1", b'"x"', b"null", b"{", b"\xff{}", b'{"a": NaN}', b"[" * 100_000]:
        with pytest.raises(FrameError) as ei:
            p.decode_json(bad)
        assert ei.value.code == "bad_frame"
    with pytest.raises(ValueError):
        p.encode_json([1])
    with pytest.raises(ValueError):
        p.encode_json({"x": float("nan")})


def test_chunk_and_digest_roundtrip():
    d = blake3.blake3(b"data").digest()
    digest, data = p.decode_chunk(p.encode_chunk(d, b"data"))
    assert digest == d and bytes(data) == b"data" and isinstance(data, memoryview)
    assert bytes(p.decode_chunk(d)[1]) == b""
    assert p.decode_digest(p.encode_digest(d)) == d
    for bad in [b"", d[:31]]:
        with pytest.raises(FrameError):
            p.decode_chunk(bad)
    for bad in [b"", d[:31], d + b"\0"]:
        with pytest.raises(FrameError):
            p.decode_digest(bad)
    with pytest.raises(ValueError):
        p.encode_chunk(d[:16], b"x")


def test_u64_and_get_records_roundtrip_exactly():
    for v in (0, 1, 41, 2**64 - 1):
        assert p.decode_u64(p.encode_u64(v)) == v
    assert p.decode_get_records(p.encode_get_records(42, 1000)) == (42, 1000)
    assert p.decode_get_records(p.encode_get_records(2**64 - 1, 2**32 - 1)) == (2**64 - 1, 2**32 - 1)
    for bad in [b"", b"\0" * 7, b"\0" * 9]:
        with pytest.raises(FrameError):
            p.decode_u64(bad)
    for bad in [b"", b"\0" * 11, b"\0" * 13]:
        with pytest.raises(FrameError):
            p.decode_get_records(bad)
    with pytest.raises(ValueError):
        p.encode_u64(-1)
    with pytest.raises(ValueError):
        p.encode_get_records(1, 2**32)


def test_error_payload_roundtrip():
    buf = p.error_payload("sequence_gap", "expected 42", last_seq=41)
    assert json.loads(buf) == {"code": "sequence_gap", "message": "expected 42", "last_seq": 41}
    assert p.decode_error(buf)["last_seq"] == 41
    assert p.decode_error(p.error_payload("missing_chunks", "m", digests=["ab"]))["digests"] == ["ab"]
    with pytest.raises(ValueError):
        p.error_payload("no_such_code", "x")
    with pytest.raises(FrameError):
        p.decode_error(b'{"code": 1, "message": "x"}')


# --------------------------------------------------------------------------
# read_frame / write_frame over a real TCP loopback connection
# --------------------------------------------------------------------------
class SpyReader:
    """Wraps a StreamReader and records every readexactly() size asked for."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader
        self.asked: list[int] = []

    async def readexactly(self, n: int) -> bytes:
        self.asked.append(n)
        return await self.reader.readexactly(n)


async def _loopback(allowed_kinds=None):
    """A server that reads frames until an error; returns (server, port, results queue, spies)."""
    results: asyncio.Queue = asyncio.Queue()
    spies: list[SpyReader] = []

    async def handle(reader, writer):
        spy = SpyReader(reader)
        spies.append(spy)
        try:
            while True:
                results.put_nowait(await p.read_frame(spy, allowed_kinds))
        except (FrameError, ConnectionClosed) as e:
            results.put_nowait(e)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], results, spies


async def _connect(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def test_frames_cross_a_real_tcp_connection_intact():
    big = bytes(range(256)) * (4 * 1024 * 1024 // 256)   # a maximal chunk, 4 MiB
    digest = blake3.blake3(big).digest()

    async def main():
        server, port, results, _ = await _loopback(p.REQUEST_KINDS)
        async with server:
            _, writer = await _connect(port)
            await p.write_frame(writer, p.HELLO, 1, p.encode_json({"protocol": 1, "primary_id": "x"}))
            await p.write_frame(writer, p.PUT_CHUNK, 2, [digest, memoryview(big)])
            await p.write_frame(writer, p.APPEND, 3, p.encode_records([(42, 1, b"{}")]))
            await p.write_frame(writer, p.STATUS, 4)
            writer.close()
            got = [await asyncio.wait_for(results.get(), TIMEOUT_S) for _ in range(5)]
        return got

    hello, chunk, append, status, end = asyncio.run(main())
    assert (hello.kind, hello.request_id) == (p.HELLO, 1)
    assert p.decode_json(hello.payload) == {"protocol": 1, "primary_id": "x"}
    d, data = p.decode_chunk(chunk.payload)
    assert (chunk.kind, chunk.request_id, d) == (p.PUT_CHUNK, 2, digest) and data == big
    assert p.decode_records(append.payload) == [(42, 1, b"{}", 0)]
    assert status == p.Frame(p.STATUS, 4, b"", 0)
    assert isinstance(end, ConnectionClosed) and end.partial == 0


def test_a_frame_split_byte_by_byte_is_reassembled():
    frames = [p.encode_frame(p.APPEND, 10, p.encode_records([(1, 1, b"first")])),
              p.encode_frame(p.GET_RECORDS, 11, p.encode_get_records(1, 5))]

    async def main():
        server, port, results, _ = await _loopback(p.REQUEST_KINDS)
        async with server:
            _, writer = await _connect(port)
            for byte in b"".join(frames):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
            got = [await asyncio.wait_for(results.get(), TIMEOUT_S) for _ in range(2)]
            writer.close()
            got.append(await asyncio.wait_for(results.get(), TIMEOUT_S))
        return got

    append, get_records, end = asyncio.run(main())
    assert p.decode_records(append.payload) == [(1, 1, b"first", 0)]
    assert (get_records.request_id, p.decode_get_records(get_records.payload)) == (11, (1, 5))
    assert isinstance(end, ConnectionClosed)


def test_oversized_length_is_refused_before_any_payload_is_read():
    header = bytearray(p.encode_frame(p.PUT_CHUNK, 5))
    struct.pack_into("<I", header, 16, p.MAX_FRAME_PAYLOAD + 1)

    async def main():
        server, port, results, spies = await _loopback(p.REQUEST_KINDS)
        async with server:
            _, writer = await _connect(port)
            writer.write(bytes(header))          # only the header; the connection stays open
            await writer.drain()
            err = await asyncio.wait_for(results.get(), TIMEOUT_S)
            asked = list(spies[0].asked)
            writer.close()
        return err, asked

    err, asked = asyncio.run(main())
    assert isinstance(err, FrameError)
    assert (err.code, err.reason, err.request_id) == ("bad_frame", "length", 5)
    assert asked == [p.HEADER_SIZE]   # the payload was never asked for


def test_response_kind_sent_to_the_vault_is_unknown_kind():
    async def main():
        server, port, results, _ = await _loopback(p.REQUEST_KINDS)
        async with server:
            _, writer = await _connect(port)
            await p.write_frame(writer, p.ACK, 8, p.encode_u64(1))
            err = await asyncio.wait_for(results.get(), TIMEOUT_S)
            writer.close()
        return err

    err = asyncio.run(main())
    assert isinstance(err, FrameError) and err.code == "unknown_kind" and err.request_id == 8


def test_corrupt_payload_over_tcp_is_a_checksum_error():
    frame = bytearray(p.encode_frame(p.APPEND, 1, p.encode_records([(1, 1, b"payload")])))
    frame[-1] ^= 0xFF

    async def main():
        server, port, results, _ = await _loopback()
        async with server:
            _, writer = await _connect(port)
            writer.write(bytes(frame))
            await writer.drain()
            err = await asyncio.wait_for(results.get(), TIMEOUT_S)
            writer.close()
        return err

    err = asyncio.run(main())
    assert isinstance(err, FrameError) and err.reason == "checksum"


def test_connection_closed_mid_payload_is_connection_closed():
    frame = p.encode_frame(p.CHUNK, 1, b"x" * 1000)

    async def main():
        server, port, results, _ = await _loopback()
        async with server:
            _, writer = await _connect(port)
            writer.write(frame[:500])
            await writer.drain()
            writer.close()
            return await asyncio.wait_for(results.get(), TIMEOUT_S)

    err = asyncio.run(main())
    assert isinstance(err, ConnectionClosed) and err.partial == 500
