"""The private channel between the gateway's leader and a worker process.

One `Peer` per end of a socketpair (docs/format/ipc.md): framed calls in both
directions, each CALL run as its own task, answers matched by call id.
Errors raised by a handler travel as their `airlock.errors` type, message,
S3 fields and headers, and are raised again on the caller's side.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable

from airlock import errors as E

log = logging.getLogger("airlock.ipc")

MAGIC = b"ALGW"
VERSION = 3        # 2: workers take connections from the leader (primary/dispatch.py); 3: hello names the code
CODE_CHANGED_EXIT = 3   # a worker's exit status when its code is not the leader's (not restarted)
CALL, REPLY, ERROR = 1, 2, 3
HEADER = struct.Struct("<4sBBII")
MAX_BODY = 256 << 20
COALESCE_BYTES = 64 * 1024      # messages up to this size are written with their header in one piece

Handler = Callable[..., Awaitable]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # .../airlock


def code_fingerprint(root: str = _PACKAGE) -> str:
    """BLAKE3 over the airlock package as it is on disk now: every .py file
    and compiled module, by relative path.  The leader takes it as it
    starts, a worker as it starts; they differ when the installation was
    changed while the gateway ran (an upgrade), and a worker started then
    would speak another version of this channel's calls than its leader
    (a changed method's arguments are not a frame version).  ~2 MB read."""
    from blake3 import blake3
    h = blake3()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if not name.endswith((".py", ".so")):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).encode()
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:        # not code Python can import either (an editor's dangling lock link)
                continue
            h.update(struct.pack("<I", len(rel)) + rel + struct.pack("<Q", len(data)))
            h.update(data)
    return h.hexdigest()


class ChannelClosed(E.InternalError):
    """The other process of the gateway is gone."""


def encode_error(e: BaseException) -> tuple:
    if isinstance(e, E.S3Error):
        return (type(e).__name__, e.message, dict(e.extra), getattr(e, "headers", None))
    if isinstance(e, E.AirlockError) and getattr(E, type(e).__name__, None) is type(e):
        return (type(e).__name__, str(e), {}, None)
    if isinstance(e, OSError) and isinstance(e.errno, int):
        # the receiver maps it as its own (a full disk is a 503, s3/errors.py)
        return ("OSError", e.strerror or str(e), {"errno": e.errno}, None)
    log.error("gateway call failed: %r", e, exc_info=e)
    return ("InternalError", None, {}, None)


def decode_error(name: str, message: str | None, extra: dict, headers) -> BaseException:
    if name == "OSError" and isinstance(extra.get("errno"), int):
        return OSError(extra["errno"], message)
    cls = getattr(E, name, None)
    if not (isinstance(cls, type) and issubclass(cls, E.AirlockError)):
        cls = E.InternalError
    if issubclass(cls, E.S3Error):
        err = cls(message, **extra)
    else:
        err = cls.__new__(cls)
        Exception.__init__(err, message)
    if headers is not None:
        err.headers = headers
    return err


class Peer:
    def __init__(self, sock: socket.socket, handlers: dict[str, Handler],
                 on_lost: Callable[[], None] | None = None):
        """`on_lost` runs synchronously when the OTHER side closes the
        channel (or it breaks), before any pending call learns of it."""
        self.sock = sock
        self.handlers = handlers
        self.on_lost = on_lost
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task] = set()        # calls being served
        self._reader_task: asyncio.Task | None = None
        self.closed = asyncio.Event()

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sock, limit=1 << 20)
        self._reader_task = asyncio.get_running_loop().create_task(self._run())

    async def call(self, name: str, *args, **kwargs):
        if self.closed.is_set():
            raise ChannelClosed("the gateway's leader process is gone")
        cid = next(self._ids) & 0xFFFFFFFF
        fut = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        try:
            try:
                self._send(CALL, cid, (name, args, kwargs))
                await self._writer.drain()
            except (ConnectionError, OSError):
                self._lost()
            return await fut
        finally:
            self._waiting.pop(cid, None)

    def _send(self, kind: int, cid: int, obj) -> None:
        body = pickle.dumps(obj, protocol=5)
        if len(body) > MAX_BODY:
            raise E.InternalError(f"gateway channel frame of {len(body)} bytes is over the bound")
        head = HEADER.pack(MAGIC, VERSION, kind, cid, len(body))
        if len(body) <= COALESCE_BYTES:
            self._writer.write(head + body)     # one send() for a small message, not two
        else:
            self._writer.write(head)
            self._writer.write(body)

    async def _run(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(HEADER.size)
                magic, version, kind, cid, n = HEADER.unpack(head)
                if magic != MAGIC or version != VERSION or kind not in (CALL, REPLY, ERROR) or n > MAX_BODY:
                    log.error("gateway channel: bad frame header %r; closing", head)
                    return
                obj = pickle.loads(await self._reader.readexactly(n))
                if kind == CALL:
                    t = asyncio.get_running_loop().create_task(self._serve(cid, *obj))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                    continue
                fut = self._waiting.get(cid)
                if fut is None or fut.done():
                    continue
                if kind == REPLY:
                    fut.set_result(obj)
                else:
                    fut.set_exception(decode_error(*obj))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._lost()

    async def _serve(self, cid: int, name: str, args, kwargs) -> None:
        handler = self.handlers.get(name)
        try:
            if handler is None:
                raise E.InternalError(f"unknown gateway call {name!r}")
            result = await handler(*args, **kwargs)
            kind, body = REPLY, result
        except asyncio.CancelledError:
            raise
        except BaseException as e:   # noqa: BLE001 -- every failure goes back to the caller
            kind, body = ERROR, encode_error(e)
        if self.closed.is_set():
            return                   # the caller is gone; the work itself was done
        try:
            try:
                self._send(kind, cid, body)
            except (ConnectionError, OSError):
                raise
            except Exception as e:   # an answer that cannot be sent (pickling, size): say so
                self._send(ERROR, cid, encode_error(E.InternalError(f"gateway call {name!r}: {e}")))
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._lost()

    def _lost(self) -> None:
        """The channel broke or the other side closed it (not `aclose`)."""
        if self.on_lost is not None and not self.closed.is_set():
            self.on_lost()
        self._close()

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("the other gateway process is gone"))
        if self._writer is not None:
            self._writer.close()

    async def aclose(self) -> None:
        """Close the channel.  Calls being served are NOT cancelled: a write
        the leader runs for a worker holds the key's lock until its record is
        applied, whether or not the worker is still there for the answer."""
        self._close()
        if self._reader_task is not None:
            self._reader_task.cancel()
