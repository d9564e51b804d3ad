"""The vault's end of the controlled link.

Accepts TLS connections whose client certificate is the pinned primary
certificate (the TLS context refuses anything else), expects HELLO first,
then serves the narrow set of requests in docs/format/link.md, in order, one
answer per request.  There is no verb that deletes or rewrites vault data.
A malformed frame, an unknown kind or a request out of place is logged, answered
with one ERROR frame when possible, and the connection is closed.

Several sessions may be open at once (the gateway's, and `airlock verify` or
`airlock restore` run by an operator with the primary's key); appends from any
of them go through the store one batch at a time and must continue the
vault's sequence exactly, so they can never interleave or rewrite records.
"""
from __future__ import annotations

import asyncio
import logging
import ssl

import blake3

from airlock import errors as E
from airlock.link import protocol as W
from airlock.link.stream import FrameProtocol, FrameWriter

log = logging.getLogger("airlock.vault.link")

INLINE_VERIFY_BYTES = 64 * 1024   # below this, verify a chunk's digest on the event loop
MAX_RECORDS_BYTES = 8 << 20       # cap of one RECORDS answer (the frame limit is 16 MiB)
MAX_LIST_LIMIT = 1000
HANDSHAKE_TIMEOUT_S = 10.0        # a peer that does not finish TLS in this time is dropped


class LinkServer:
    def __init__(self, store, ssl_context: ssl.SSLContext | None, vault_id: str, executor=None):
        self.store = store
        self.ssl_context = ssl_context
        self.vault_id = vault_id
        self.executor = executor
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[asyncio.Task] = set()
        self.stats = {"sessions": 0, "refused_frames": 0, "refused_rewrites": 0, "chunks": 0,
                      "records": 0, "bad_handshakes": 0}

    async def start(self, host: str, port: int) -> None:
        # TLS is started per connection by `_handshake`, not by create_server,
        # so that a refused handshake -- a client without the pinned primary
        # key -- is logged and counted with the peer's address (asyncio only
        # reports those in debug mode).
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Paused(self), host, port, reuse_address=True)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        # frames are read by a BufferedProtocol: TLS decrypts straight into
        # their buffers (link/stream.py), no StreamReader copies
        protocol = FrameProtocol(W.REQUEST_KINDS)
        if self.ssl_context is not None:
            try:
                transport = await asyncio.wait_for(
                    loop.start_tls(transport, protocol, self.ssl_context, server_side=True),
                    HANDSHAKE_TIMEOUT_S)
            except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as e:
                self.stats["bad_handshakes"] += 1
                log.warning("link: refused connection from %s: TLS handshake failed (%s)", peer,
                            getattr(e, "reason", None) or type(e).__name__)
                transport.abort()
                return
            protocol.connection_made(transport)
        else:
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            transport.resume_reading()
        await self._accept(protocol, FrameWriter(transport, protocol))

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._sessions):
            task.cancel()
        for task in list(self._sessions):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def _accept(self, reader: FrameProtocol, writer: FrameWriter) -> None:
        peer = writer.get_extra_info("peername")
        sslobj = writer.get_extra_info("ssl_object")
        fp = None
        if sslobj is not None:
            from airlock.link.tls import peer_fingerprint
            fp = peer_fingerprint(sslobj)
        me = asyncio.current_task()
        self._sessions.add(me)
        self.stats["sessions"] += 1
        log.info("primary connected from %s (certificate %s)", peer, (fp or "-")[:16])
        try:
            await self._serve(reader, writer, peer)
        except asyncio.CancelledError:
            pass
        except OSError as e:
            # the primary went away while this vault was still answering it
            # (it gave up waiting: the vault was stopped or slow); what the
            # request did stands, the primary settles it when it reconnects
            log.info("primary %s disconnected before its answer (%s)", peer, e)
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (Exception, asyncio.CancelledError):
                pass
            self._sessions.discard(me)

    async def _refuse(self, writer, request_id: int, code: str, message: str, peer, **extra) -> None:
        self.stats["refused_frames"] += 1
        log.warning("link: refusing frame from %s: %s: %s", peer, code, message)
        try:
            await W.write_frame(writer, W.ERROR, request_id, W.error_payload(code, message, **extra))
        except Exception:
            pass

    async def _serve(self, reader, writer, peer) -> None:
        hello_done = False
        while True:
            try:
                frame = await reader.read_frame()
            except W.ConnectionClosed:
                log.info("primary %s disconnected", peer)
                return
            except W.FrameError as e:
                await self._refuse(writer, e.request_id or 0, e.code, str(e), peer)
                return
            except (ssl.SSLError, OSError) as e:
                log.warning("link connection from %s failed: %s", peer, e)
                return
            if not hello_done and frame.kind != W.HELLO:
                await self._refuse(writer, frame.request_id, "bad_frame", "HELLO must come first", peer)
                return
            try:
                kind, payload = await self._dispatch(frame)
            except E.VaultRejected as e:
                code = getattr(e, "code", None) or "internal"
                if code not in W.ERROR_CODES:
                    # a refusal without a link error code of its own (the store's "bad_record":
                    # a record that is not a valid commit record) is a bad request payload
                    code = "bad_frame"
                if code == "rewrite_refused":
                    self.stats["refused_rewrites"] += 1
                    log.error("link: primary %s tried to rewrite history: %s", peer, e)
                extra = {}
                if getattr(e, "digests", None):
                    extra["digests"] = list(e.digests)
                if code == "sequence_gap":
                    extra["last_seq"] = self.store.last_seq
                await W.write_frame(writer, W.ERROR, frame.request_id, W.error_payload(code, str(e), **extra))
                continue
            except W.FrameError as e:
                await self._refuse(writer, frame.request_id, e.code, str(e), peer)
                return
            except KeyError as e:
                await W.write_frame(writer, W.ERROR, frame.request_id,
                                    W.error_payload("not_found", f"not found: {e}"))
                continue
            except E.IntegrityError as e:
                log.error("vault integrity error serving %s: %s", W.KIND_NAMES.get(frame.kind), e)
                await W.write_frame(writer, W.ERROR, frame.request_id,
                                    W.error_payload("digest_mismatch", str(e)))
                continue
            except Exception as e:  # never crash the vault on one request
                if isinstance(e, OSError):      # a full disk, an I/O error: one line, the store says the rest
                    log.error("vault failed serving %s: %r", W.KIND_NAMES.get(frame.kind), e)
                else:
                    log.exception("vault failed serving %s", W.KIND_NAMES.get(frame.kind))
                await W.write_frame(writer, W.ERROR, frame.request_id, W.error_payload("internal", str(e)))
                continue
            if frame.kind == W.HELLO:
                hello_done = True
            await W.write_frame(writer, kind, frame.request_id, payload)

    async def _dispatch(self, frame: W.Frame):
        k = frame.kind
        st = self.store
        loop = asyncio.get_running_loop()
        if k == W.PUT_CHUNK:
            digest, data = W.decode_chunk(frame.payload)
            hexd = digest.hex()
            if len(data) > INLINE_VERIFY_BYTES:
                # verified and stored in one thread hop; the store's lock is not taken on the
                # loop, where it could wait for a chunk write of another connection's thread
                await loop.run_in_executor(self.executor, _verify_and_put, st, digest, hexd, data)
            else:
                _verify(digest, hexd, data)
                st.put_chunk(hexd, data)        # keeps nothing it already has (one catalog lookup)
            self.stats["chunks"] += 1
            return W.OK, b""
        if k == W.APPEND:
            records = [(r.seq, r.rtype, bytes(r.payload)) for r in W.decode_records(frame.payload)]
            if not records:
                return W.ACK, W.encode_u64(st.last_seq)
            last = await st.append(records)
            self.stats["records"] += len(records)
            return W.ACK, W.encode_u64(last)
        if k == W.HELLO:
            hello = W.decode_json(frame.payload)
            if hello.get("protocol") != W.VERSION:
                raise W.FrameError(f"unsupported link protocol {hello.get('protocol')!r}")
            # A store that failed a write may hold durable records past its
            # last_seq (the log took them, the overlay did not): announce them,
            # so that a primary reconciling meanwhile voids them instead of
            # reusing their sequence numbers (docs/format/vault.md).
            return W.HELLO_OK, W.encode_json({"protocol": W.VERSION, "vault_id": self.vault_id,
                                              "last_seq": st.announced_last_seq})
        if k == W.GET_CHUNK:
            hexd = W.decode_digest(frame.payload).hex()
            data = await loop.run_in_executor(self.executor, st.read_chunk, hexd)
            return W.CHUNK, data
        if k == W.GET_MANIFEST:
            q = W.decode_json(frame.payload)
            if q.get("snapshot") is not None:
                # read-only: the manifest as of a vault snapshot's point (docs/format/link.md)
                m = st.snapshot_manifest(_snapshot_ref(q["snapshot"]), str(q.get("bucket", "")),
                                         str(q.get("key", "")), at=_opt_int(q.get("at")))
            else:
                m = st.manifest(str(q.get("bucket", "")), str(q.get("key", "")), q.get("seq"))
            if m is None:
                raise KeyError(f"{q.get('bucket')}/{q.get('key')}")
            return W.MANIFEST, W.encode_json(m)
        if k == W.LIST:
            q = W.decode_json(frame.payload)
            limit = max(1, min(int(q.get("limit", MAX_LIST_LIMIT)), MAX_LIST_LIMIT))
            if q.get("snapshots"):
                return W.LIST_PAGE, W.encode_json({"snapshots": st.snapshots(), "objects": [], "truncated": False})
            if q.get("snapshot") is not None:
                ref, at = _snapshot_ref(q["snapshot"]), _opt_int(q.get("at"))
                if "bucket" not in q:
                    return W.LIST_PAGE, W.encode_json({"buckets": st.snapshot_buckets(ref, at=at), "objects": [],
                                                       "truncated": False})
                objects, truncated = st.snapshot_list_objects(ref, str(q["bucket"]), prefix=str(q.get("prefix", "")),
                                                              after=q.get("after"), limit=limit, at=at)
                return W.LIST_PAGE, W.encode_json({"objects": objects, "truncated": truncated})
            if "bucket" not in q:
                return W.LIST_PAGE, W.encode_json({"buckets": st.buckets(), "objects": [], "truncated": False})
            objects, truncated = st.list_objects(str(q["bucket"]), prefix=str(q.get("prefix", "")),
                                                 after=q.get("after"), limit=limit)
            return W.LIST_PAGE, W.encode_json({"objects": objects, "truncated": truncated})
        if k == W.STATUS:
            status = dict(st.status())
            status["link"] = dict(self.stats)
            return W.STATUS_OK, W.encode_json(status)
        if k == W.GET_RECORDS:
            from_seq, max_count = W.decode_get_records(frame.payload)
            records = st.records(from_seq, min(max_count, 10000))
            out, size = [], 0
            for r in records:
                size += len(r[2]) + W.RECORD_ENTRY_HEADER_SIZE
                if out and size > MAX_RECORDS_BYTES:
                    break
                out.append(r)
            return W.RECORDS, W.encode_records(out)
        raise W.FrameError(f"kind {k} is not a request the vault serves", code="unknown_kind")


class _Paused(asyncio.Protocol):
    """Holds a fresh connection with reading paused until TLS starts, so the
    client's first bytes stay in the socket for the handshake to read."""

    def __init__(self, server: LinkServer):
        self.server = server

    def connection_made(self, transport) -> None:
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self.server._handshake(transport))

    def connection_lost(self, exc) -> None:
        pass


def _snapshot_ref(v) -> int | str:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise W.FrameError(f"snapshot must be an id or a name, not {v!r}")
    return v


def _opt_int(v) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise W.FrameError(f"at must be an integer sequence number, not {v!r}")
    return v


def _verify(digest: bytes, hexd: str, data) -> None:
    actual = blake3.blake3(data).digest()
    if actual != digest:
        raise E.IntegrityError(f"chunk {hexd} from the primary", hexd, actual.hex())


def _verify_and_put(store, digest: bytes, hexd: str, data) -> None:
    _verify(digest, hexd, data)
    store.put_chunk(hexd, data)         # keeps nothing it already has
