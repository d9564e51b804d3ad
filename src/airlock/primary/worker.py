"""A gateway worker process: serves S3 on the leader's port, commits through it.

With `[gateway] workers = N` the gateway is one leader and N-1 workers
(docs/architecture.md, "Gateway processes").  The leader accepts every
connection on the port and hands each to the process with the fewest busy
(primary/dispatch.py); a worker receives its connections on a channel of
their own and does the per-request work itself: HTTP, SigV4,
reading the body, MD5 / chunking / BLAKE3, writing chunk files, reading the
index and chunk files for GETs and listings.  What must happen in one place
goes to the leader over the private channel (docs/format/ipc.md):

    worker: body -> Ingest (chunks into the shared chunk store; a body of
                   at most 16 KiB: its rows go to the leader with the commit)
                 -> large chunks ---------------> vault, on the worker's own link
                 -> small chunks (ship_chunks) -> leader: commit point -> vault
                 -> (vault answered the large ones)
                 -> commit_object(manifest) ----> leader: key lock, precondition,
                                                  version id, log + vault ack, index
            <- manifest (seq, version id) ------  (visible in every process now)

The index is the leader's SQLite file, opened read-only; the leader applies a
record before it answers the call, so a read in any process that starts
after a write was acknowledged sees it.  A worker that finds the primary's
storage gone tells the leader and exits (the leader serves degraded reads
alone); a worker whose channel closes (leader gone) exits.

Run as `python -m airlock.primary.worker FD CONN_FD GEN_FD` by the leader only
(FD: the IPC channel, CONN_FD: the connection channel, GEN_FD: the index
generation page; docs/format/ipc.md).
"""
from __future__ import annotations

import asyncio
import contextvars
import faulthandler
import logging
import os
import socket
import sys
import time

from aiohttp import web

from airlock import errors as E
from airlock import malloc
from airlock.aio import retrieve_exception, stop_on_signals
from airlock.chunk.store import ChunkStore
from airlock.primary.dispatch import Activity, Inlet
from airlock.primary.engine import Engine
from airlock.primary.generation import Generation, GenerationError
from airlock.primary.index import Index
from airlock.primary.ipc import CODE_CHANGED_EXIT, VERSION, Peer, code_fingerprint
from airlock.primary.model import ChunkRef
from airlock.link import protocol as W

log = logging.getLogger("airlock.worker")

# The engine's write methods; a worker forwards each one to the leader,
# whose engine runs it (locks, preconditions, commit, index) and returns its result.
FORWARDED = ("create_bucket", "delete_bucket", "set_versioning", "set_bucket_tagging", "commit_object",
             "delete_object", "set_object_tagging", "create_upload", "commit_part", "abort_upload",
             "complete_upload")


HOLD_BYTES = 256 * 1024
SHIP_BY_REFERENCE = 64 * 1024      # chunks this large are sent as (digest, size); see ship_chunks
LINK_RETRY_S = 2.0                 # after a failed connect, large chunks go through the leader this long


class _BodyChunks:
    """The new chunks of the body this request is ingesting, on their way to
    the vault: `held`, small enough to ride along with the commit call
    instead of costing a call of their own (`held_bytes` in all); `direct`,
    sent on this worker's own link, as (digest, size, future of the vault's
    answer), to be settled before the commit call (_LeaderCommitPoint)."""

    __slots__ = ("held", "held_bytes", "direct", "rows")

    def __init__(self):
        self.held: list = []
        self.held_bytes = 0
        self.direct: list = []
        self.rows: list = []         # a small body's chunks, for the leader to store with the commit


# the request's _BodyChunks (each request is its own asyncio task, so its own context)
_body: contextvars.ContextVar[_BodyChunks | None] = contextvars.ContextVar("airlock_body_chunks", default=None)


def tmp_owner(pid: int) -> str:
    """The name a worker's chunk store gives its tmp files: the leader removes
    them when that worker dies (ChunkStore.remove_tmp)."""
    return f"worker{pid}"


class _LeaderCommitPoint:
    """The commit point as a worker sees it: records and small chunks go to
    the leader's; large chunks go to the vault over the worker's own link.

    Large chunks (SHIP_BY_REFERENCE and up) of a request served here are
    sent to the vault on a link connection of this process (`link`, same
    keys as the leader's, opened in the background on first use; until it
    is ready they go through the leader), with their bytes still in hand:
    the leader no longer reads them back from the chunk store and encrypts
    them on its own event loop, which made a large PUT on a worker markedly
    slower than one on the leader (docs/performance.md).  The vault's
    answers to those frames are awaited, for at most the ack timeout,
    before the commit call goes to the leader (`take_for_leader`; past the
    limit the link is closed and reopened later): a chunk is in the vault's
    newest overlay once it answered OK, and the leader's APPEND, which
    syncs that overlay before its records, comes after.  (The vault keeps one order per
    connection only, so the wait is what orders the two connections.)  A
    chunk the direct link could not deliver goes to the leader by
    reference with the commit call, as before; and if the vault lost it all
    the same (it recovered in place in between), its APPEND answers
    missing_chunks and the leader's repair sends it again (replication.py).
    """

    def __init__(self, peer: Peer, replicated: bool, link=None, link_timeout: float = 30.0):
        self.peer = peer
        self.replicated = replicated
        self.last_seq = 0
        self.link = link                  # LinkClient, or None: everything through the leader
        self.link_timeout = link_timeout  # the gateway's ack timeout: for a send, and for the answers
        self._connecting: asyncio.Task | None = None
        self._link_retry_at = 0.0
        self.stats = {"chunks_shipped_direct": 0, "bytes_shipped_direct": 0, "direct_fallbacks": 0}

    @property
    def link_state(self) -> str | None:
        """This worker's own vault connection, for /_airlock/health: None
        without one (local-only), else "connected", "connecting" or "not
        connected" (not opened yet -- it opens on the first large chunk --
        or down, retried LINK_RETRY_S after a failed connect)."""
        if self.link is None:
            return None
        if self.link.ready:
            return "connected"
        return "connecting" if self._connecting is not None else "not connected"

    def _usable_link(self):
        """The link if it is ready; else None, and a connect is started in
        the background (at most one at a time, none within LINK_RETRY_S of a
        failed one).  No request ever waits for a connect: until the link is
        ready, large chunks go through the leader."""
        link = self.link
        if link is None or link.ready:
            return link
        if self._connecting is None and time.monotonic() >= self._link_retry_at:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return None

    async def _connect(self) -> None:
        try:
            await self.link.connect()
        except Exception as e:            # VaultUnavailable, VaultRejected, anything: try again later
            self._link_retry_at = time.monotonic() + LINK_RETRY_S
            log.warning("worker %d: no link of its own to the vault (%s); large chunks go "
                        "through the leader", os.getpid(), e)
        finally:
            self._connecting = None

    def _give_up_link(self, why: str) -> None:
        """The vault did not take or answer direct chunks in time: close this
        worker's link (its outstanding answers fail, the requests waiting for
        them fall back to the leader) and reconnect later."""
        log.warning("worker %d: %s; closing its own link to the vault", os.getpid(), why)
        self._link_retry_at = time.monotonic() + LINK_RETRY_S
        self.link.abort()

    async def _ship_direct(self, chunks, direct: list) -> list:
        """Send the large chunks on this worker's link; returns the chunks
        left for the leader (small ones, and all when the link is down)."""
        if not any(len(data) >= SHIP_BY_REFERENCE for _d, data in chunks):
            return chunks
        link = self._usable_link()
        if link is None:
            return chunks
        rest = []
        for d, data in chunks:
            if len(data) < SHIP_BY_REFERENCE:
                rest.append((d, data))
                continue
            try:
                # the frame is written before the first await; the wait is
                # for the socket to drain, bounded like every vault answer
                fut = await asyncio.wait_for(link.send_chunk(d, data), self.link_timeout)
            except asyncio.TimeoutError:
                self._give_up_link(f"a chunk was not taken within {self.link_timeout:g} s")
                rest.append((d, data))
                continue
            except E.VaultUnavailable:
                rest.append((d, data))
                continue
            fut.add_done_callback(retrieve_exception)     # its request may fail before it settles
            direct.append((d, len(data), fut))
            self.stats["chunks_shipped_direct"] += 1
            self.stats["bytes_shipped_direct"] += len(data)
        return rest

    async def take_for_leader(self) -> list:
        """What the leader must still ship for this request's body, taken
        (once) before its commit call or after its failure: the held small
        chunks, then the direct chunks the vault did not take -- waited for
        at most the ack timeout -- as references."""
        body = _body.get()
        if body is None:
            return []
        _body.set(None)
        return body.held + await self._settle(body.direct)

    async def _settle(self, direct: list) -> list[tuple[str, int]]:
        if not direct:
            return []
        futs = [fut for _d, _size, fut in direct]
        _done, pending = await asyncio.wait(futs, timeout=self.link_timeout)
        if pending:
            self._give_up_link(f"{len(pending)} chunk(s) not answered within {self.link_timeout:g} s")
        failed = []
        for d, size, fut in direct:
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                failed.append((d, size))         # the link failed or was given up before the answer
                continue
            frame = fut.result()
            if frame.kind == W.ERROR:
                log.warning("vault refused a chunk sent by worker %d: %s", os.getpid(),
                            W.decode_json(frame.payload))
                failed.append((d, size))
        self.stats["direct_fallbacks"] += len(failed)
        return failed

    async def ship_chunks(self, chunks: list[tuple[str, bytes]], inline: frozenset = frozenset()) -> None:
        if not self.replicated:
            return                   # local-only: the leader's commit point ships nothing either
        body = _body.get()
        if body is not None and self.link is not None:
            chunks = await self._ship_direct(chunks, body.direct)
            if not chunks:
                return
        # Large chunks go by reference: their files are in the shared chunk
        # store already, and the leader reading one costs less than copying
        # it through the channel.  Those in `inline` do not have their file
        # yet (still being written and synced, see WorkerEngine._shipper):
        # their bytes go through the channel.
        chunks = [(d, len(data) if len(data) >= SHIP_BY_REFERENCE and d not in inline else bytes(data))
                  for d, data in chunks]
        if body is not None:
            size = sum(data if isinstance(data, int) else len(data) for _d, data in chunks)
            if body.held_bytes + size <= HOLD_BYTES:
                body.held.extend(chunks)
                body.held_bytes += size
                return
            if body.held:          # keep the order: what was held goes first
                chunks = body.held + chunks
                body.held, body.held_bytes = [], 0
        await self.peer.call("ship_chunks", chunks)

    async def commit(self, rtype: int, payload: bytes, after=None) -> int:   # never: writes are forwarded whole
        raise E.InternalError("a gateway worker does not commit records itself")

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self.link is not None:
            await self.link.close()


class WorkerEngine(Engine):
    """The engine of a worker: local reads and ingest, writes through the leader."""

    def __init__(self, data_dir: str, peer: Peer, *, replicated: bool, link=None, link_timeout: float = 30.0,
                 generation: Generation | None = None, **kw):
        super().__init__(data_dir, **kw)
        self.generation = generation                # when the leader's index changed (docs/format/ipc.md)
        self.peer = peer
        self.replicated = replicated
        self.link = link                            # this worker's own link, for large chunks
        self.link_timeout = link_timeout
        self.stop: asyncio.Event | None = None     # set: the worker process winds down

    def open(self) -> None:
        # clean_tmp=False: tmp/ holds the other processes' writes in progress
        self.store = ChunkStore(self.data_dir, fsync=self.chunk_fsync, clean_tmp=False,
                                owner=tmp_owner(os.getpid()))
        self.index = Index(os.path.join(self.data_dir, "index.sqlite"), readonly=True,
                           generation=self.generation)
        self.commit_point = _LeaderCommitPoint(self.peer, self.replicated, self.link, self.link_timeout)

    @property
    def vault_link(self):
        # only tested for "is there a vault to fall back to"; the leader holds the link
        return self.peer if self.replicated else None

    async def ingest(self, body, **kw):
        # the new chunks of a small body go to the leader with the commit
        # call that follows (commit_object / commit_part), in one message
        # (if the upload fails before that call, see SHIP_HELD_ON_FAILURE)
        _body.set(_BodyChunks())
        return await super().ingest(body, **kw)

    def _store_small(self, loop, chunks):
        # not stored here: the rows ride with the commit call, and the leader
        # stores them while the record goes to the vault (leader._ship_and);
        # nothing to wait for here (a future cannot cross the channel)
        _body.get().rows.extend((d, bytes(data)) for d, data in chunks)
        return None

    def _shipper(self, ingest):
        async def ship(chunks):
            # A chunk sent by reference is read from its file by the leader,
            # and Ingest writes large chunk files on the store's writer
            # threads.  One whose write (create, write, fdatasync, rename) is
            # still in flight goes inline instead of waiting for it: the vault
            # then receives it while this disk syncs it, as in a single
            # process.  (The commit still waits for the write: Ingest.wait_durable.)
            inline = set()
            for d, data in chunks:
                fut = ingest.writing.get(d)
                if fut is None or len(data) < SHIP_BY_REFERENCE:
                    continue
                if not fut.done():
                    inline.add(d)
                elif fut.exception() is not None:
                    raise fut.exception()      # the upload fails, as it would have at the wait
            await self.commit_point.ship_chunks(chunks, frozenset(inline))
        return ship

    async def _ship_held(self) -> None:
        """The request failed after storing chunks it still holds, or sent
        on its own link without an answer (a bad digest, a refused
        precondition, a dropped client): ship them anyway,
        as a single-process gateway would have during the body, so that the
        vault has every chunk file the store has and a later upload that
        reuses them (dedup) finds them there."""
        try:
            chunks = await self.commit_point.take_for_leader()
            if chunks:
                await self.peer.call("ship_chunks", chunks)
        except Exception as e:          # best effort; the missing-chunk repair covers the rest
            log.warning("could not ship the chunks of a failed upload: %s", e)

    async def _chunk_from_vault(self, loop, ref: ChunkRef, problem: str) -> bytes:
        # the leader fetches, verifies, repairs the local copy and counts it
        return await self.peer.call("chunk_from_vault", ref, problem)

    async def health(self) -> dict:
        return await self.peer.call("health")

    async def _serve_from_vault(self) -> None:
        pass                         # the leader does, once it knows (storage_failed)

    async def enter_degraded_mode(self, reason: str) -> None:
        if self.degraded is not None:
            return
        self.degraded = reason
        log.error("worker %d: %s; handing over to the leader and exiting", os.getpid(), reason)
        try:
            await self.peer.call("storage_failed", reason)
        finally:
            if self.stop is not None:
                self.stop.set()


# commit calls that carry the request's held chunks to the leader (as ship_and_<name>)
CARRY_CHUNKS = ("commit_object", "commit_part")


def _forward(name: str):
    async def forwarded(self, *args, **kwargs):
        self._refuse_writes_if_degraded()
        if name in CARRY_CHUNKS:
            # the vault has this request's direct chunks before the record goes
            # out; the held ones, and any it did not take (by reference: their
            # files are durable, ingest waited for them), ride with the call,
            # and so do a small body's rows, which the leader stores
            body = _body.get()
            rows = body.rows if body is not None else []
            chunks = await self.commit_point.take_for_leader()
            if rows:
                mine = {d for d, _data in rows}
                chunks = [c for c in chunks if c[0] not in mine]
                return await self.peer.call("ship_and_" + name, chunks, *args, rows=rows, **kwargs)
            if chunks:
                return await self.peer.call("ship_and_" + name, chunks, *args, **kwargs)
        return await self.peer.call(name, *args, **kwargs)
    forwarded.__name__ = name
    forwarded.__doc__ = f"Engine.{name}, run by the leader."
    return forwarded


for _name in FORWARDED:
    setattr(WorkerEngine, _name, _forward(_name))

# the engine methods that ingest a body and then commit it: if one fails in
# between (bad digest, client gone), the chunks it held are shipped anyway
SHIP_HELD_ON_FAILURE = ("put_object", "upload_part")


def _ship_held_on_failure(name: str):
    method = getattr(Engine, name)

    async def wrapped(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except BaseException:
            await self._ship_held()
            raise
    wrapped.__name__ = name
    wrapped.__doc__ = method.__doc__
    return wrapped


for _name in SHIP_HELD_ON_FAILURE:
    setattr(WorkerEngine, _name, _ship_held_on_failure(_name))


async def run(fd: int, conn_fd: int, gen_fd: int, code: str) -> None:
    from airlock.s3.app import make_app
    from airlock.gateway import CUT_AFTER_DRAIN_S, stop_serving
    sock = socket.socket(fileno=fd)
    conn_sock = socket.socket(fileno=conn_fd)
    try:
        generation = Generation.attach(gen_fd)
    except GenerationError as e:
        raise SystemExit(f"gateway worker: {e}") from None
    inlet: Inlet | None = None
    stop = asyncio.Event()

    async def on_stop() -> None:
        stop.set()

    engine: WorkerEngine | None = None      # the leader may ask for counters before it exists

    async def on_stats() -> dict:
        if engine is None:
            return {}
        stats = dict(engine.stats)
        stats.update(getattr(engine.commit_point, "stats", {}))
        proc = {"pid": os.getpid(), "role": "worker", "stats": stats}
        if inlet is not None:
            proc.update(inlet.counts())
        state = getattr(engine.commit_point, "link_state", None)
        if state is not None:
            proc["vault_link"] = state
        return proc

    def leader_lost() -> None:
        # The leader is gone (crashed, killed).  A write this worker forwarded
        # may or may not have been committed before it died, so its client
        # must not get an S3 error (an error means "not visible, ever",
        # docs/architecture.md): leave now, before any waiting request can
        # answer, and let every connection drop as in a crash.  This also
        # frees the port for the next gateway at once.
        log.error("gateway worker %d: the leader is gone; exiting", os.getpid())
        logging.shutdown()
        os._exit(1)

    peer = Peer(sock, {"stop": on_stop, "stats": on_stats}, on_lost=leader_lost)
    await peer.start()
    hello = await peer.call("hello")
    if hello[0] != VERSION:
        raise SystemExit(f"gateway worker: channel version {hello[0]} != {VERSION}")
    _version, leaders_code, cfg, port, replicated = hello
    if leaders_code != code:
        log.error("gateway worker %d: the airlock installation changed since the gateway started "
                  "(code %s..., the leader's %s...); not serving", os.getpid(), code[:12], leaders_code[:12])
        await peer.aclose()
        raise SystemExit(CODE_CHANGED_EXIT)
    chunk_fsync = cfg.fsync and (cfg.vault is None or cfg.chunk_sync == "local")
    link = None
    if replicated:
        from airlock.gateway import make_link_client
        link = make_link_client(cfg)     # connected in the background on first use (large chunks)
    engine = WorkerEngine(cfg.data, peer, replicated=replicated, link=link, link_timeout=cfg.ack_timeout,
                          generation=generation, fsync=cfg.fsync, chunk_fsync=chunk_fsync)
    engine.stop = stop
    engine.open()
    await engine.start()
    activity = Activity()
    app = make_app(engine, cfg, activity)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=CUT_AFTER_DRAIN_S)
    await runner.setup()
    inlet = Inlet(conn_sock, runner.server, activity)
    stop_on_signals(stop, "gateway worker")
    inlet.start()                    # the leader hands this process connections from now on
    log.info("gateway worker %d serving connections on port %d", os.getpid(), port)
    await asyncio.wait([asyncio.ensure_future(stop.wait()), asyncio.ensure_future(peer.closed.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    inlet.close()                    # no more connections ...
    await stop_serving(runner)       # ... and the open ones finish their in-flight requests
    await engine.close()
    await peer.aclose()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s "
                        f"%(name)s: %(message)s")
    if len(argv) != 4 or not all(a.isdigit() for a in argv[1:]):
        print("usage: python -m airlock.primary.worker FD CONN_FD GEN_FD (started by the gateway's leader)",
              file=sys.stderr)
        return 2
    code = code_fingerprint()           # what this process imports, as near its imports as it gets
    malloc.tune()
    faulthandler.enable()               # a fatal signal leaves its traceback in the log
    asyncio.run(run(int(argv[1]), int(argv[2]), int(argv[3]), code))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
