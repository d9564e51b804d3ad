"""Hostile bytes on the link: the codec only ever raises FrameError or ConnectionClosed."""
from __future__ import annotations

import asyncio
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlock.link import protocol as p
from airlock.link.protocol import ConnectionClosed, FrameError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

kinds = st.sampled_from(sorted(p.KIND_NAMES))
small_payloads = st.binary(max_size=300)
valid_frames = st.builds(p.encode_frame, kinds, st.integers(0, 2**64 - 1), small_payloads)


@st.composite
def plausible_headers(draw):
    """Headers that get past the magic check, so the later checks are exercised too."""
    return (p.MAGIC + struct.pack("<BBHQII", draw(st.sampled_from([1, 1, 1, 0, 2, 255])),
                                  draw(st.integers(0, 255)), draw(st.sampled_from([0, 0, 0, 1, 0x8000])),
                                  draw(st.integers(0, 2**64 - 1)),
                                  draw(st.one_of(st.integers(0, 400), st.integers(0, 2**32 - 1))),
                                  draw(st.sampled_from([0, 0, 0, 1])))
            + draw(st.binary(min_size=8, max_size=8)))


@st.composite
def mutated_streams(draw):
    """A few valid frames, then byte flips, insertions and a possible cut."""
    buf = bytearray(b"".join(draw(st.lists(valid_frames, min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(buf) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif len(buf) > 1:
            del buf[i]
    if draw(st.booleans()):
        buf = buf[:draw(st.integers(0, len(buf)))]
    return bytes(buf)


async def _drain_frames(data: bytes, allowed=None) -> list[p.Frame]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while True:
        frames.append(await p.read_frame(reader, allowed))


def _read_all(data: bytes, allowed=None) -> BaseException:
    """Read frames until the codec gives up; return the exception it gave up with."""
    try:
        asyncio.run(_drain_frames(data, allowed))
    except (FrameError, ConnectionClosed) as e:
        return e
    raise AssertionError("unreachable: the stream ends with EOF")


@FUZZ
@given(st.one_of(st.binary(max_size=64), plausible_headers()))
def test_header_parser_only_raises_frame_error(buf):
    try:
        h = p.parse_header(buf)
    except FrameError as e:
        assert e.code in ("bad_frame", "unknown_kind")
        return
    assert len(buf) == p.HEADER_SIZE and buf[:4] == p.MAGIC
    assert h.kind in p.KIND_NAMES and h.flags == 0 and h.length <= p.MAX_FRAME_PAYLOAD


@FUZZ
@given(st.one_of(st.binary(max_size=200), plausible_headers().flatmap(
    lambda h: st.binary(max_size=300).map(lambda tail: h + tail)), mutated_streams()),
    st.sampled_from([None, p.REQUEST_KINDS, p.RESPONSE_KINDS]))
def test_read_frame_on_arbitrary_bytes_only_raises_frame_or_connection_errors(data, allowed):
    assert isinstance(_read_all(data, allowed), (FrameError, ConnectionClosed))


@FUZZ
@given(st.lists(valid_frames, min_size=1, max_size=3), st.data())
def test_truncated_valid_frames_are_connection_closed(frames, data):
    stream = b"".join(frames)
    cut = data.draw(st.integers(0, len(stream) - 1))
    err = _read_all(stream[:cut])
    assert isinstance(err, ConnectionClosed)


@FUZZ
@given(st.lists(valid_frames, max_size=3))
def test_valid_streams_decode_completely_then_close(frames):
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(frames))
        reader.feed_eof()
        got = []
        try:
            while True:
                got.append(await p.read_frame(reader))
        except ConnectionClosed as e:
            assert e.partial == 0
        return got

    got = asyncio.run(main())
    assert [p.encode_frame(f.kind, f.request_id, f.payload) for f in got] == frames


DECODERS = [p.decode_records, p.decode_json, p.decode_chunk, p.decode_digest, p.decode_u64,
            p.decode_get_records, p.decode_error]


@FUZZ
@given(st.sampled_from(DECODERS), st.one_of(
    st.binary(max_size=200),
    st.text(max_size=50).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 255), st.binary(max_size=20)), max_size=3)
      .map(lambda rs: p.encode_records([r for r in rs if r[0]]))
      .flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\x01" + b[i:]))))
def test_payload_decoders_only_raise_frame_error(decode, buf):
    try:
        decode(buf)
    except FrameError as e:
        assert e.code == "bad_frame"


@FUZZ
@given(st.lists(st.tuples(st.integers(1, 2**64 - 1), st.integers(0, 255), st.binary(max_size=64),
                          st.integers(0, 0xFFFF)), max_size=8))
def test_records_roundtrip(records):
    assert p.decode_records(p.encode_records(records)) == [p.LinkRecord(*r) for r in records]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15)


@settings(FUZZ, max_examples=100)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_json_roundtrip(obj):
    assert p.decode_json(p.encode_json(obj)) == obj
