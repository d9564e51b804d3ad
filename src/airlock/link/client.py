"""The primary's end of the controlled link.

One TLS connection to the vault.  Requests are pipelined: `send()` writes a
frame (frames never interleave: one writer lock) and returns a future that the
receiver task resolves when the answer with the same request id arrives;
`request()` also waits for that answer.  The
vault answers in order, so a dead connection fails every outstanding request
at once with VaultUnavailable.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import ssl

from airlock import errors as E
from airlock.link import protocol as W
from airlock.link.stream import FrameProtocol, FrameWriter
from airlock.link.tls import VAULT_SERVER_NAME

log = logging.getLogger("airlock.link")

CONNECT_TIMEOUT_S = 5.0     # TCP + TLS handshake + HELLO



class LinkClient:
    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, primary_id: str,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.primary_id = primary_id
        self.connect_timeout = connect_timeout
        self._reader: FrameProtocol | None = None
        self._writer: FrameWriter | None = None
        self._wlock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._receiver: asyncio.Task | None = None
        self.hello: dict | None = None
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def ready(self) -> bool:
        """Connected and past HELLO: other requests may be sent.  (While
        connect() waits for HELLO_OK the connection is up but a frame sent
        then could reach the vault before the HELLO, which it refuses.)"""
        return self.connected and self.hello is not None

    async def connect(self) -> dict:
        """Open the connection and say HELLO; returns the vault's HELLO_OK."""
        await self.close()
        self.hello = None
        try:
            transport, protocol = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: FrameProtocol(W.RESPONSE_KINDS), self.host, self.port, ssl=self.ssl_context,
                    server_hostname=VAULT_SERVER_NAME if self.ssl_context else None),
                self.connect_timeout)
            self._reader, self._writer = protocol, FrameWriter(transport, protocol)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            self._reader = self._writer = None
            raise E.VaultUnavailable(f"cannot connect to the vault at {self.host}:{self.port}: {e}") from None
        self._receiver = asyncio.get_running_loop().create_task(self._receive())
        try:
            frame = await asyncio.wait_for(
                self.request(W.HELLO, W.encode_json({"protocol": W.VERSION, "primary_id": self.primary_id})),
                self.connect_timeout)
        except asyncio.TimeoutError:
            self.abort()
            raise E.VaultUnavailable("the vault did not answer HELLO") from None
        except BaseException:
            # refused, link lost, or this connect() cancelled (a caller's own
            # time limit): no connection stays open without its HELLO
            self._drop(abort=True)
            raise
        self.hello = W.decode_json(frame.payload)
        if self.hello.get("protocol") != W.VERSION:
            await self.close()
            raise E.VaultRejected(f"vault speaks link protocol {self.hello.get('protocol')}, we speak {W.VERSION}")
        self.connects += 1
        log.info("link up to vault %s at %s:%d (vault last_seq %s)", self.hello.get("vault_id"),
                 self.host, self.port, self.hello.get("last_seq"))
        return self.hello

    async def close(self) -> None:
        w = self._drop()
        if w is not None:
            try:
                await asyncio.wait_for(w.wait_closed(), 1.0)
            except Exception:            # not CancelledError: a cancelled caller stays cancelled
                pass

    def abort(self) -> None:
        """Close the connection at once, for a link that failed (no answer
        in time): every outstanding request fails with VaultUnavailable and
        the TCP connection is closed now, without the TLS close_notify
        exchange a frozen vault would never finish (`close()` waits for it
        up to 1 s, and asyncio keeps the connection open up to 30 s)."""
        self._drop(abort=True)

    def _drop(self, abort: bool = False):
        """Close the connection now, failing every outstanding request;
        returns the closed writer (None if there was none)."""
        w, self._writer = self._writer, None
        if self._receiver is not None:
            self._receiver.cancel()
            self._receiver = None
        if w is not None:
            if abort:
                w.abort()
            else:
                w.close()
        self._fail_all(E.VaultUnavailable("link closed"))
        return w

    def _fail_all(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)

    async def _receive(self) -> None:
        try:
            while True:
                frame = await self._reader.read_frame()
                fut = self._waiting.pop(frame.request_id, None)
                if fut is None:
                    log.warning("link: answer to unknown request %d (kind %s)", frame.request_id,
                                W.KIND_NAMES.get(frame.kind, frame.kind))
                    continue
                if not fut.done():
                    fut.set_result(frame)
        except asyncio.CancelledError:
            raise
        except W.ConnectionClosed:
            log.warning("link: vault closed the connection")
        except (W.FrameError, OSError, ssl.SSLError) as e:
            log.warning("link: connection failed: %s", e)
        w, self._writer = self._writer, None
        if w is not None:
            w.close()
        self._fail_all(E.VaultUnavailable("link to the vault lost"))

    async def request(self, kind: int, payload=b"") -> W.Frame:
        """Send a request and wait for its answer.  Raises VaultRejected for an
        ERROR answer, VaultUnavailable if the link fails first."""
        return await self._answer(kind, await self.send(kind, payload))

    async def send(self, kind: int, payload=b"") -> "asyncio.Future":
        """Write a request frame (waiting only for the socket to take it) and
        return the future of its raw answer frame."""
        self._check_may_send(kind)
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            async with self._wlock:
                self._check_may_send(kind)      # a concurrent connect() may have replaced the connection
                await W.write_frame(self._writer, kind, rid, payload)
        except (OSError, ssl.SSLError) as e:
            self._waiting.pop(rid, None)
            raise E.VaultUnavailable(f"link write failed: {e}") from None
        except BaseException:
            self._waiting.pop(rid, None)
            raise
        return fut

    def _check_may_send(self, kind: int) -> None:
        """Nothing but the HELLO goes out before the HELLO_OK: the vault
        refuses any other first frame."""
        if not (self.connected if kind == W.HELLO else self.ready):
            raise E.VaultUnavailable("not connected to the vault")

    async def _answer(self, kind: int, fut: "asyncio.Future") -> W.Frame:
        frame = await fut
        if frame.kind == W.ERROR:
            err = W.decode_json(frame.payload)
            exc = E.VaultRejected(f"vault refused {W.KIND_NAMES.get(kind, kind)}: "
                                  f"{err.get('code')}: {err.get('message')}")
            exc.code = err.get("code")
            exc.info = err
            raise exc
        return frame

    # ------------------------------------------------------------------ verbs
    async def put_chunk(self, digest_hex: str, data) -> None:
        await self.request(W.PUT_CHUNK, [bytes.fromhex(digest_hex), data])

    async def send_chunk(self, digest_hex: str, data) -> "asyncio.Future":
        """Write a chunk frame without waiting for the vault's OK.  The vault
        handles frames in order, so the ACK of a later APPEND covers it (a
        chunk the vault refused makes that APPEND fail with missing_chunks)."""
        return await self.send(W.PUT_CHUNK, [bytes.fromhex(digest_hex), data])

    async def append(self, records: list[tuple[int, int, bytes]]) -> int:
        frame = await self.request(W.APPEND, W.encode_records(records))
        return W.decode_u64(frame.payload)

    async def get_chunk(self, digest_hex: str) -> bytes:
        frame = await self.request(W.GET_CHUNK, bytes.fromhex(digest_hex))
        return bytes(frame.payload)

    async def get_manifest(self, bucket: str, key: str, seq: int | None = None) -> dict:
        q = {"bucket": bucket, "key": key}
        if seq is not None:
            q["seq"] = seq
        frame = await self.request(W.GET_MANIFEST, W.encode_json(q))
        return W.decode_json(frame.payload)

    async def list(self, **query) -> dict:
        frame = await self.request(W.LIST, W.encode_json(query))
        return W.decode_json(frame.payload)

    async def iter_objects(self, bucket: str, page: int = 1000, **query):
        """Every object manifest of a bucket in key order, paging LIST
        (extra query fields, e.g. snapshot=, pass through)."""
        after = None
        while True:
            q = dict(query, bucket=bucket, limit=page)
            if after is not None:
                q["after"] = after
            got = await self.list(**q)
            for m in got["objects"]:
                yield m
            if not got["truncated"] or not got["objects"]:
                return
            after = got["objects"][-1]["key"]

    async def status(self) -> dict:
        frame = await self.request(W.STATUS)
        return W.decode_json(frame.payload)

    async def get_records(self, from_seq: int, max_count: int) -> list[tuple[int, int, bytes]]:
        frame = await self.request(W.GET_RECORDS, W.encode_get_records(from_seq, max_count))
        return [(r.seq, r.rtype, bytes(r.payload)) for r in W.decode_records(frame.payload)]
