"""Reading link frames without StreamReader's copies.

asyncio's StreamReader copies every received byte twice (into its buffer,
then out of it for `readexactly`) and the vault spent ~18% of its busy
samples there during 64 MiB PUTs (docs/performance.md).  `FrameProtocol` is
an `asyncio.BufferedProtocol`: the TLS layer decrypts straight into buffers
this class hands it -- a scratch buffer for headers and small frames, and,
once a frame's header says its payload does not fit there, that frame's own
payload buffer -- so a chunk's bytes are written to memory once, by the
decryption, and handed on as a `memoryview`.

Same rules as `protocol.read_frame` (docs/format/link.md): a header is
validated completely before any byte of its payload is accepted, the length
bound caps what is allocated, the checksum is verified before a frame is
handed on, and after the first malformed frame nothing more is read from the
stream (there is no way to resynchronise).  Frames queued but not yet read
are bounded (`max_queued` bytes): beyond it reading is paused.

`FrameWriter` is the write half with StreamWriter's `write`/`drain`/`close`
surface, so `protocol.write_frame` works on it unchanged.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Iterable

from airlock.link import protocol as W
from airlock.malloc import uninitialized

SCRATCH_BYTES = 256 * 1024            # headers and frames that fit are read here, then copied out
MAX_QUEUED_BYTES = 2 * W.MAX_FRAME_PAYLOAD
CORK_BYTES = 64 * 1024                # held small frames are released at once beyond this
WRITE_PIECE_BYTES = 256 * 1024        # larger writes reach the transport in pieces of this size


class FrameProtocol(asyncio.BufferedProtocol):
    def __init__(self, allowed_kinds: Iterable[int] | None = None, max_queued: int = MAX_QUEUED_BYTES):
        self._allowed = frozenset(allowed_kinds) if allowed_kinds is not None else None
        self._max_queued = max_queued
        self._scratch = bytearray(SCRATCH_BYTES)
        self._scratch_view = memoryview(self._scratch)
        self._held = 0                         # bytes of an unfinished header at the front of scratch
        self._payload: bytearray | None = None  # the frame being read into its own buffer
        self._payload_view: memoryview | None = None
        self._header: bytes = b""
        self._header_info: W.FrameHeader | None = None
        self._got = 0
        self._items: collections.deque = collections.deque()   # Frame or exception, in stream order
        self._queued = 0
        self._broken = False                   # a malformed frame was seen: read nothing more
        self._closed = False                    # connection_lost was called
        self._lost: BaseException | None = None  # ... with this error (None: a clean close)
        self._eof = False
        self._waiter: asyncio.Future | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._drain_waiters: list[asyncio.Future] = []
        self.transport: asyncio.Transport | None = None

    # ------------------------------------------------------------------ protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int):
        if self._payload_view is not None:
            return self._payload_view[self._got:]
        if self._broken:
            return self._scratch_view            # discarded (reading is paused by then)
        return self._scratch_view[self._held:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._broken:
            return
        if self._payload_view is not None:
            self._got += nbytes
            if self._got == len(self._payload):
                payload, self._payload, self._payload_view = self._payload, None, None
                self._finish(self._header, self._header_info, memoryview(payload))
            return
        end = self._held + nbytes
        start = 0
        sv = self._scratch_view
        while end - start >= W.HEADER_SIZE and not self._broken:
            header = bytes(sv[start:start + W.HEADER_SIZE])
            try:
                h = W.parse_header(header, self._allowed)
            except W.FrameError as e:
                self._fail(e)
                return
            body = start + W.HEADER_SIZE
            if end - body >= h.length:           # the whole frame is here
                self._finish(header, h, bytes(sv[body:body + h.length]))
                start = body + h.length
                continue
            # the payload continues past what was read: give it its own buffer
            self._header, self._header_info = header, h
            # written in full by the reads that follow before it is handed
            # on (and dropped if the stream ends first): no need to zero it
            self._payload = uninitialized(h.length)
            self._payload_view = memoryview(self._payload)
            have = end - body
            self._payload_view[:have] = sv[body:end]
            self._got = have
            start = end
            break
        rest = end - start
        if rest and start:
            sv[:rest] = sv[start:end]
        self._held = rest

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        self._closed, self._lost = True, exc
        self._eof = True
        self._wake()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(ConnectionResetError("link connection lost"))
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # ------------------------------------------------------------------ frames
    def _finish(self, header: bytes, h: W.FrameHeader, payload) -> None:
        try:
            W.verify(header, payload)
        except W.FrameError as e:
            self._fail(e)
            return
        self._push(W.Frame(h.kind, h.request_id, payload, h.flags), len(payload))

    def _fail(self, exc: BaseException) -> None:
        self._broken = True
        self._payload = self._payload_view = None
        self._push(exc, 0)
        if self.transport is not None and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()

    def _push(self, item, size: int) -> None:
        self._items.append((item, size))
        self._queued += size
        if self._queued > self._max_queued and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    def _partial(self) -> int:
        if self._payload is not None:
            return W.HEADER_SIZE + self._got
        return self._held

    async def read_frame(self) -> W.Frame:
        """The next frame; FrameError for a malformed one, ConnectionClosed at
        the end of the stream (clean or inside a frame) -- as protocol.read_frame."""
        while not self._items:
            if self._eof:
                partial = self._partial()
                if self._lost is not None:
                    raise W.ConnectionClosed(f"link connection lost: {self._lost}", partial=partial)
                if partial:
                    raise W.ConnectionClosed(f"link connection closed inside a frame ({partial} bytes read)",
                                             partial=partial)
                raise W.ConnectionClosed("link connection closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item, size = self._items.popleft()
        self._queued -= size
        if (self._paused_reading and not self._broken and self._queued <= self._max_queued // 2
                and self.transport is not None):
            self._paused_reading = False
            self.transport.resume_reading()
        if isinstance(item, BaseException):
            raise item
        return item

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("link connection lost")
        if not self._paused_writing:
            return
        w = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(w)
        await w


class FrameWriter:
    """The write half: StreamWriter's surface, as far as the link uses it.

    Small frames are corked: `bytes` written during one turn of the event
    loop are held and handed to the transport together at the end of that
    turn (`call_soon`), as one TLS record and one send() where they fit in
    `CORK_BYTES`.  Under load one turn writes many frames (chunk frames of
    several PUTs, the vault's answers to a run of queued requests); each
    separate write cost a TLS record, a send() and the transport's Python
    layers.  Order is kept: anything that is not small `bytes` -- a
    memoryview of chunk data, which its owner may reuse once the write
    returns, or bytes too large to be worth a copy -- first releases what is
    held, then goes to the transport at once, as before.
    `close()` releases what is held before closing.
    """

    def __init__(self, transport: asyncio.Transport, protocol: FrameProtocol):
        self.transport = transport
        self.protocol = protocol
        self._held: list[bytes] | None = None
        self._held_bytes = 0

    def write(self, data) -> None:
        if type(data) is bytes and len(data) < CORK_BYTES:
            if self._held is None:
                self._held = [data]
                self._held_bytes = len(data)
                asyncio.get_running_loop().call_soon(self._release)
            else:
                self._held.append(data)
                self._held_bytes += len(data)
            if self._held_bytes >= CORK_BYTES:
                self._release()
            return
        self._release()
        view = memoryview(data)
        if view.nbytes <= WRITE_PIECE_BYTES:
            self.transport.write(data)
            return
        # a large chunk goes to the TLS layer in pieces: encrypting one
        # 4 MiB write at once grows OpenSSL's outgoing memory buffer to that
        # size, realloc by realloc (each a copy and a wipe), and costs
        # ~0.42-0.55 ms/MiB against ~0.36 in 256 KiB pieces (measured on
        # SSLObject with memory BIOs, as asyncio's SSL transport uses them)
        view = view.cast("B")
        for off in range(0, view.nbytes, WRITE_PIECE_BYTES):
            if self.transport.is_closing():
                return          # lost or closed: one write fails (and warns) as before, not 16
            self.transport.write(view[off:off + WRITE_PIECE_BYTES])

    def _release(self) -> None:
        held, self._held = self._held, None
        if not held or self.transport.is_closing():
            return
        self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    async def drain(self) -> None:
        if self.transport.is_closing():
            await asyncio.sleep(0)           # let connection_lost run, as StreamWriter does
            if self.protocol._closed:
                raise ConnectionResetError("link connection lost")
        await self.protocol.drain()

    def get_extra_info(self, name: str, default=None):
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        self._release()
        self.transport.close()

    def abort(self) -> None:
        """Close the connection at once, dropping whatever is unsent: no
        TLS close_notify exchange.  A graceful close (`close()`) waits for
        the peer's close_notify -- up to asyncio's ssl_shutdown_timeout,
        30 s -- before the TCP connection is closed, so against a vault that
        does not answer (SIGSTOP, a hung host) the connection stayed open
        that long."""
        self._held = None
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    async def wait_closed(self) -> None:
        while not self.protocol._closed:
            w = asyncio.get_running_loop().create_future()
            self.protocol._drain_waiters.append(w)
            try:
                await w
            except ConnectionResetError:
                return
