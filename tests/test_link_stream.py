"""link/stream.py: frames read by the BufferedProtocol come out exactly as
protocol.read_frame would return them, however the bytes are split by the
network, and malformed input is refused the same way.

The transport here is a recorder of pause/resume calls; the bytes are fed
through the protocol's own get_buffer/buffer_updated, as asyncio's TLS layer
does.
"""
from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airlock.link import protocol as W
from airlock.link.stream import SCRATCH_BYTES, WRITE_PIECE_BYTES, FrameProtocol, FrameWriter


class Recorder:
    def __init__(self):
        self.paused = False
        self.calls = []

    def pause_reading(self):
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self):
        self.paused = False
        self.calls.append("resume")


def feed(proto: FrameProtocol, data: bytes, cuts: list[int]) -> None:
    """Deliver `data` split at `cuts`, each piece possibly over several get_buffer calls."""
    pos = 0
    for end in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
        while pos < end:
            buf = proto.get_buffer(end - pos)
            n = min(len(buf), end - pos)
            assert n > 0
            buf[:n] = data[pos:pos + n]
            proto.buffer_updated(n)
            pos += n


def frames_of(sizes):
    out = []
    for i, n in enumerate(sizes):
        payload = [os.urandom(32), os.urandom(n)] if n % 2 else os.urandom(n)
        out.append((W.PUT_CHUNK if n % 2 else W.APPEND, i + 1, b"".join(payload) if isinstance(payload, list) else payload,
                    W.encode_frame(W.PUT_CHUNK if n % 2 else W.APPEND, i + 1, payload)))
    return out


async def drain_frames(proto, n):
    return [await proto.read_frame() for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 31, 32, 4096, SCRATCH_BYTES - 32, SCRATCH_BYTES, 3 * SCRATCH_BYTES + 7]),
                      min_size=1, max_size=6),
       cuts=st.lists(st.integers(min_value=0, max_value=4 * SCRATCH_BYTES), max_size=12))
def test_frames_survive_any_split_of_the_byte_stream(sizes, cuts):
    frames = frames_of(sizes)
    stream = b"".join(f[3] for f in frames)
    proto = FrameProtocol(W.REQUEST_KINDS)
    proto.connection_made(Recorder())
    feed(proto, stream, cuts)
    got = asyncio.run(drain_frames(proto, len(frames)))
    for (kind, rid, payload, _raw), g in zip(frames, got):
        assert (g.kind, g.request_id, bytes(g.payload)) == (kind, rid, payload)


def test_a_bad_checksum_after_good_frames_is_raised_in_order_and_reading_stops():
    good = W.encode_frame(W.STATUS, 1)
    bad = bytearray(W.encode_frame(W.APPEND, 2, os.urandom(5000)))
    bad[-1] ^= 1
    rec = Recorder()
    proto = FrameProtocol(W.REQUEST_KINDS)
    proto.connection_made(rec)
    feed(proto, good + bytes(bad) + good, [10, 40, 2000])

    async def run():
        assert (await proto.read_frame()).request_id == 1
        with pytest.raises(W.FrameError) as e:
            await proto.read_frame()
        assert e.value.reason == "checksum"
    asyncio.run(run())
    assert rec.paused and "resume" not in rec.calls


@pytest.mark.parametrize("raw, reason", [
    (b"XLNK" + W.encode_frame(W.STATUS, 1)[4:], "magic"),
    (W.encode_frame(W.OK, 1), "kind"),                      # a response kind sent as a request
])
def test_a_bad_header_is_refused_before_its_payload_is_read(raw, reason):
    proto = FrameProtocol(W.REQUEST_KINDS)
    proto.connection_made(Recorder())
    feed(proto, raw, [])

    async def run():
        with pytest.raises(W.FrameError) as e:
            await proto.read_frame()
        assert e.value.reason == reason
    asyncio.run(run())


def test_an_oversized_length_is_refused_without_allocating_it():
    header = bytearray(W.encode_frame(W.APPEND, 3, b""))
    header[16:20] = (W.MAX_FRAME_PAYLOAD + 1).to_bytes(4, "little")
    proto = FrameProtocol(W.REQUEST_KINDS)
    proto.connection_made(Recorder())
    feed(proto, bytes(header), [])

    async def run():
        with pytest.raises(W.FrameError) as e:
            await proto.read_frame()
        assert e.value.reason == "length"
    asyncio.run(run())
    assert proto._payload is None


@pytest.mark.parametrize("cut", [0, 20, W.HEADER_SIZE + 100])
def test_the_end_of_the_stream_inside_or_between_frames_is_connection_closed(cut):
    raw = W.encode_frame(W.APPEND, 4, os.urandom(SCRATCH_BYTES * 2))
    proto = FrameProtocol(W.REQUEST_KINDS)
    proto.connection_made(Recorder())
    feed(proto, raw[:cut], [])
    proto.connection_lost(None)

    async def run():
        with pytest.raises(W.ConnectionClosed) as e:
            await proto.read_frame()
        assert e.value.partial == cut
    asyncio.run(run())


def test_reading_pauses_while_too_many_frames_wait_and_resumes_when_they_are_read():
    rec = Recorder()
    proto = FrameProtocol(W.REQUEST_KINDS, max_queued=100_000)
    proto.connection_made(rec)
    frames = [W.encode_frame(W.APPEND, i, os.urandom(30_000)) for i in range(1, 6)]
    feed(proto, b"".join(frames), [])
    assert rec.paused

    async def run():
        for i in range(1, 6):
            assert (await proto.read_frame()).request_id == i
    asyncio.run(run())
    assert not rec.paused and rec.calls == ["pause", "resume"]


class WriteRecorder:
    """A transport that records what FrameWriter hands it, copying each write
    (a memoryview's owner may reuse it once write() returns)."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data):
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True


def test_small_frames_written_in_one_turn_reach_the_transport_as_one_write_in_order():
    async def go():
        t = WriteRecorder()
        w = FrameWriter(t, FrameProtocol())
        big = bytearray(os.urandom(200_000))
        expect = []
        for i in range(5):
            payload = os.urandom(100 + i)
            await W.write_frame(w, W.APPEND, i + 1, payload)
            expect.append(W.encode_frame(W.APPEND, i + 1, payload))
        assert t.writes == []                      # held until the turn ends
        await asyncio.sleep(0)
        assert t.writes == [b"".join(expect)]
        # a large frame's chunk data is not held: what was held goes first,
        # then the data, and the owner may reuse its buffer right after
        t.writes.clear()
        await W.write_frame(w, W.APPEND, 6, b"small")
        await W.write_frame(w, W.PUT_CHUNK, 7, [b"d" * 32, memoryview(big)])
        big[:] = bytes(len(big))                   # reused at once
        await asyncio.sleep(0)
        got = b"".join(t.writes)
        assert got == (W.encode_frame(W.APPEND, 6, b"small")
                       + W.encode_frame(W.PUT_CHUNK, 7, [b"d" * 32, bytes(got[-len(big):])]))
        assert got[-len(big):] != bytes(len(big))  # the bytes as written, not the reused buffer

    asyncio.run(go())


def test_frames_held_when_the_writer_closes_are_written_before_the_close():
    async def go():
        t = WriteRecorder()
        w = FrameWriter(t, FrameProtocol())
        await W.write_frame(w, W.ERROR, 3, W.error_payload("bad_frame", "bye"))
        w.close()
        assert t.closed and t.writes == [W.encode_frame(W.ERROR, 3, W.error_payload("bad_frame", "bye"))]
        await asyncio.sleep(0)                     # the scheduled release finds nothing more
        assert len(t.writes) == 1

    asyncio.run(go())


def test_large_bytes_are_not_held_or_copied_into_the_held_frames():
    async def go():
        t = WriteRecorder()
        w = FrameWriter(t, FrameProtocol())
        w.write(b"head")
        big = os.urandom(200_000)
        w.write(big)
        assert t.writes == [b"head", big]          # released in order, the large one on its own
        await asyncio.sleep(0)
        assert t.writes == [b"head", big]

    asyncio.run(go())


def test_a_large_write_reaches_the_transport_in_pieces_in_order():
    async def go():
        t = WriteRecorder()
        w = FrameWriter(t, FrameProtocol())
        w.write(b"head")
        big = os.urandom(4 * WRITE_PIECE_BYTES + 5)
        w.write(memoryview(big))
        assert t.writes[0] == b"head"
        assert [len(x) for x in t.writes[1:]] == [WRITE_PIECE_BYTES] * 4 + [5]
        assert b"".join(t.writes[1:]) == big

    asyncio.run(go())


def test_a_large_write_stops_once_the_transport_is_closing():
    class ClosesAfterOneWrite(WriteRecorder):
        def write(self, data):
            super().write(data)
            self.closed = True               # the connection is lost during the first piece

    async def go():
        t = ClosesAfterOneWrite()
        w = FrameWriter(t, FrameProtocol())
        w.write(os.urandom(3 * WRITE_PIECE_BYTES))
        assert len(t.writes) == 1            # no write after close (the recorder would fail)

    asyncio.run(go())
