"""Streaming ingest of an object body: one pass over each buffer computes the
chunk boundaries, a BLAKE3 digest per chunk, the MD5 (ETag), the optional
SHA-256 (signed payloads) and the flexible checksum the client asked for, and
writes new chunks to the chunk store.

Data flow (one upload):

    event loop: read socket -> decoded buffer --(executor)--> Ingest.feed_md5: md5
                                                 `-(executor)--> Ingest.feed_rest: sha256 / checksum
                                                                  |-> StreamChunker -> ChunkStore.put
                                                                     (chunks >= ASYNC_WRITE_BYTES: put_async,
                                                                      on the store's writer threads)

    a whole body of at most ON_LOOP_BYTES: every digest and the chunker on
    the event loop (Ingest.chunk_on_loop), its row stored by the next group
    commit (ChunkStore.put_small_async): no executor hop

Each full buffer is fed as two jobs on two threads (MD5, and everything
else), each thread working through its own queue of the upload's buffers:
hashlib, blake3 and the compiled chunker all release the GIL, so uploads
proceed in parallel on both cores while the event loop keeps reading
sockets.  The loop reads a buffer only while fewer than WINDOW of the
upload's are queued or being hashed, so memory stays bounded whatever the
object size.  Large chunk files are written and fdatasynced on the chunk
store's own writer threads, up to MAX_WRITES_IN_FLIGHT per upload, while the
next buffer is hashed; `wait_durable` waits for all of them (and syncs the
chunk directories) before the upload may be committed, so the durability
order is unchanged: every chunk file is durable before a record references
it.  The last chunks are shipped to the vault before that wait, not after
it, so the two domains' disks sync an upload's tail at the same time.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor

from airlock.aio import retrieve_exception, settled_on_failure
from airlock.chunk.chunker import StreamChunker
from airlock.chunk.store import ChunkStore
from airlock.primary.checksums import new_checksum
from airlock.primary.model import BodyDigests, ChunkRef

log = logging.getLogger("airlock.ingest")

BATCH_BYTES = 1 * 1024 * 1024       # coalesce socket reads to ~1 MiB before handing to a thread
WINDOW = 4                          # buffers of one upload queued or being hashed at once
ASYNC_WRITE_BYTES = 256 * 1024      # chunks from this size are written on the store's writer threads ...
MAX_WRITES_IN_FLIGHT = 4            # ... at most this many per upload at once (bounds memory)
# A body of at most this many bytes is hashed and chunked on the event loop
# (~25 us of MD5 + chunker + BLAKE3 at 16 KiB: less than a thread hop costs)
# and its one chunk, a small-chunk row, joins the next row commit without an
# executor hop (ChunkStore.put_small_async).
ON_LOOP_BYTES = 16 * 1024


class Ingest:
    """Hashes and chunks one body.  Not thread-safe: `feed_md5` calls run one
    at a time and so do the calls that touch the rest of the state
    (`feed_rest`, `finish_rest`, `feed_and_finish`, `wait_durable`); the two kinds may run
    at once on two threads, as they share nothing.  `writing` is read on
    the event loop (a worker's shipper looks up the write of a chunk it
    ships) while a `feed_rest` may be adding later chunks to it: a dict
    lookup against inserts, which the GIL keeps whole."""

    def __init__(self, store: ChunkStore, *, want_sha256: bool = False,
                 checksum_algorithms: tuple[str, ...] = (), chunk_params: dict | None = None):
        self.store = store
        self._md5 = hashlib.md5()
        self._sha256 = hashlib.sha256() if want_sha256 else None
        self._checksums = {alg: new_checksum(alg) for alg in checksum_algorithms}
        self._chunker = StreamChunker(**(chunk_params or {}))
        self._chunks: list[ChunkRef] = []
        self._size = 0
        self._dirs: set[str] = set()
        self._writes: list = []            # chunk writes in flight on the store's writer threads
        self.writing: dict = {}            # digest hex -> future of its chunk file's write (large chunks)
        self.durable = False               # every chunk file and directory of this body is synced

    # A large buffer is fed as two jobs on two threads at once (all of this
    # releases the GIL): MD5, the costliest pass (~1.4 ms/MiB), on one; the
    # SHA-256 / flexible checksums, the chunker and the chunk writes on the
    # other.  Each job keeps its own state, so the two never touch the same
    # object; buffers of one upload are still fed strictly in order.
    def feed_md5(self, data) -> None:
        self._md5.update(data)

    def feed_rest(self, data) -> list[tuple[str, bytes]]:
        """Everything but the MD5 of one buffer; returns the chunks it
        completed that were new to the store, as (digest hex, bytes), for
        shipping to the vault."""
        self._feed_digests(data)
        return self._store_chunks(self._chunker.update(data))

    def _feed_digests(self, data) -> None:
        """The size, SHA-256 and flexible checksums of one buffer."""
        self._size += len(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        for c in self._checksums.values():
            c.update(data)

    def feed_and_finish(self, data) -> list[tuple[str, bytes]]:
        """The last buffer and the end of the body.  Returns the new chunks
        at once; if large chunk writes are still in flight they are left to
        `wait_durable`, so that the caller can ship those chunks to the vault
        while the disk syncs them (a small body's chunk files are durable on
        return, in this one thread hop)."""
        if data:
            self.feed_md5(data)
        return self.finish_rest(data)

    def finish_rest(self, data) -> list[tuple[str, bytes]]:
        """`feed_and_finish` without the MD5 (fed apart, by `feed_md5`): the
        end of a body of a buffer or more, whose last chunks need not wait
        for the MD5 of the buffers before them."""
        new = (self.feed_rest(data) if data else []) + self._store_chunks(self._chunker.finish())
        if not self._writes:
            self.wait_durable()
        return new

    def chunk_on_loop(self, data) -> list[tuple[str, bytes]]:
        """The whole body (at most ON_LOOP_BYTES) in one call on the event
        loop: every digest, and the chunks, which are NOT stored (the
        caller stores them with `ChunkStore.put_small_async`, then sets
        `durable`).  Returns every chunk, as (digest hex, bytes)."""
        if data:
            self.feed_md5(data)
            self._feed_digests(data)
        out = [(digest.hex(), chunk)
               for digest, chunk in (self._chunker.update(data) if data else []) + self._chunker.finish()]
        self._chunks.extend(ChunkRef(hexd, len(chunk)) for hexd, chunk in out)
        return out

    def wait_durable(self) -> None:
        """Wait for every chunk write of this upload and sync the chunk
        directories: after this a record may reference the chunks."""
        self._wait_writes(0)
        self.store.sync_dirs(self._dirs)
        self.durable = True

    def digests(self) -> BodyDigests:
        return BodyDigests(
            size=self._size,
            md5=self._md5.digest(),
            sha256=self._sha256.digest() if self._sha256 is not None else None,
            checksums={alg: c.digest() for alg, c in self._checksums.items()},
            chunks=self._chunks,
        )

    def _store_chunks(self, chunks) -> list[tuple[str, bytes]]:
        """Store the chunks a buffer completed; returns the ones new to the
        store.  A large chunk's file is written (and fdatasynced) on the
        store's writer threads while the caller goes on hashing: the disk
        works while the CPU does.  Small ones are written here (a thread hop
        would cost more than the write)."""
        new = []
        for digest, data in chunks:
            hexd = digest.hex()
            self._chunks.append(ChunkRef(hexd, len(data)))
            if len(data) >= ASYNC_WRITE_BYTES:
                if hexd in self.writing:
                    continue                    # written for this body already (or being written)
                if self.store.has(hexd, len(data)):
                    self._dirs.add(self.store.dir_of(hexd))     # see ChunkStore.put
                    continue
                self._wait_writes(MAX_WRITES_IN_FLIGHT - 1)
                fut = self.store.put_async(hexd, data)
                self._writes.append(fut)
                self.writing[hexd] = fut
                new.append((hexd, data))
                continue
            d, written = self.store.put(hexd, data)
            if d is not None:
                self._dirs.add(d)
            if written:
                new.append((hexd, data))
        return new

    def _wait_writes(self, keep: int) -> None:
        """Wait until at most `keep` chunk writes are in flight; the first
        failed one raises (the upload fails, as if it had been written here)."""
        while len(self._writes) > keep:
            d, _written = self._writes.pop(0).result()
            self._dirs.add(d)


ShipChunks = Callable[[list], Awaitable[None]]


class _Stopped(Exception):
    """A queued buffer that was not run: the queue was stopped or failed earlier."""


class _Serial:
    """Runs `fn` over queued buffers, in order, one at a time, on `executor`.

    A job that finishes a buffer starts the next queued one itself (on the
    same executor, from its own thread): a hash state that must see the
    body in order (MD5, the chunker) is never idle waiting for the event
    loop to notice one buffer's end and hand over the next.  (Measured on a
    64 MiB PUT: with one buffer in flight and the loop in between, the MD5
    thread sat idle as long as it worked -- every hand-over waited for the
    GIL behind the loop's own work.)  A job runs at most SLICE buffers
    before it goes back to the end of the executor's queue, so that a few
    large uploads cannot keep every thread from the other requests' jobs.
    Each buffer's result arrives on an asyncio future.  After a failure,
    or `stop()`, the buffers still queued are not run: their futures fail
    with _Stopped (or the failure)."""

    SLICE = 4

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: Executor, fn):
        self._loop = loop
        self._executor = executor
        self._fn = fn
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._running = False                        # a job of this queue is submitted or running
        self._idle: asyncio.Future | None = None     # resolved when that job's chain ends
        self._failed: BaseException | None = None

    def submit(self, buf, fn=None) -> asyncio.Future:
        """Queue `buf` for `fn` (default: the queue's own function)."""
        fut = self._loop.create_future()
        with self._lock:
            self._queue.append((fn or self._fn, buf, fut))
            if self._running:
                return fut                  # the running job will take it
            self._running = True
            self._idle = self._loop.create_future()
        self._start()                       # refused: fut fails with the executor's error
        return fut

    def _start(self) -> None:
        """Submit the next job of the chain (from the loop or from a job's
        thread); if the executor refuses, end the chain, failing what is queued."""
        try:
            job = self._executor.submit(self._run)
        except RuntimeError as e:           # shut down
            self._end_chain(e)
            return
        job.add_done_callback(self._job_done)

    def _job_done(self, job) -> None:
        if job.cancelled():                 # dropped by executor.shutdown(cancel_futures=True)
            self._end_chain(RuntimeError("the upload's hashing job was cancelled"))

    def _end_chain(self, exc: BaseException) -> None:
        with self._lock:
            if self._failed is None:
                self._failed = exc
            items = list(self._queue)
            self._queue.clear()
            self._running = False
            idle = self._idle
        for _fn, _buf, fut in items:
            self._call(_settle, fut, None, _Stopped(f"not run: {exc!r}"))
        if idle is not None:
            self._call(_settle, idle, None, None)

    def _run(self) -> None:
        for _ in range(self.SLICE):
            with self._lock:
                if not self._queue:
                    self._running = False
                    idle = self._idle
                    break
                fn, buf, fut = self._queue.popleft()
            if self._failed is not None:
                result, exc = None, _Stopped(f"not run: {self._failed!r}")
            else:
                try:
                    result, exc = fn(buf), None
                except BaseException as e:          # noqa: B036 -- handed to the awaiting coroutine
                    result, exc = None, e
                    self._failed = e
            self._call(_settle, fut, result, exc)
        else:
            # a slice is done: the chain's next job goes behind the executor's
            # other work (and ends the chain if nothing is queued by then)
            self._start()
            return
        self._call(_settle, idle, None, None)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:                # the loop is closed: nobody waits any more
            pass

    async def stop(self) -> None:
        """Drop the queued buffers and wait for the one being run."""
        with self._lock:
            if self._failed is None:
                self._failed = _Stopped()
            idle = self._idle if self._running else None
        if idle is not None:
            await idle


def _done(loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    fut = loop.create_future()
    fut.set_result(None)
    return fut


def _settle(fut: asyncio.Future, result, exc) -> None:
    if fut.done():                      # cancelled: the upload gave up on it
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


async def ingest_body(ingest: Ingest, body: AsyncIterator, executor: Executor,
                      ship: ShipChunks | None = None, defer_durable: bool = False,
                      store_small: Callable | None = None) -> BodyDigests:
    """Drive `ingest` over an async iterator of buffers; returns the digests.

    Every body longer than ON_LOOP_BYTES is fed on `executor`: writing a
    chunk file (create, write, rename, and fdatasync when the store syncs)
    can wait on the file system and must never block the event loop; a
    shorter one is hashed on the loop and its one row stored without a
    thread of its own (ChunkStore.put_small_async).  Bodies are coalesced to
    ~BATCH_BYTES per buffer.  Each buffer goes to two serial queues at once
    (`_Serial`): MD5 on one thread, everything else (other digests, the
    chunker, chunk writes) on another, each working through its queue
    without coming back to the event loop in between.  The event loop
    meanwhile reads the next buffers from the socket and ships the chunks
    finished buffers completed (`ship`, the commit point's way to stream
    chunks to the vault while the body is still arriving), in body order.
    The loop reads a buffer only while fewer than WINDOW of the upload's
    are queued or being hashed, so memory stays bounded whatever the
    object size.  A body shorter than one buffer (BATCH_BYTES) and longer
    than ON_LOOP_BYTES ends in one hop (`feed_and_finish`); a
    longer body ends through the two queues (`finish_rest` on the rest
    queue), so its last chunks are written, shipped and synced while MD5
    catches up.

    `defer_durable`: a body of at most ON_LOOP_BYTES returns before its row
    is committed, with the commit's future as `BodyDigests.durable`; every
    chunk is shipped (which are new to the store is not known yet).  The
    caller passes it to the commit point as `after`, so that the row commit
    and the vault's APPEND run at once (commit.py); it must not make a
    record that references the chunks durable before that future is done.
    `store_small(loop, chunks)`: how such a body's rows are stored (default
    `ChunkStore.put_small_async`); it may return None: the rows are stored
    elsewhere, with the commit (a gateway worker's go to the leader).
    """
    loop = asyncio.get_running_loop()
    md5 = _Serial(loop, executor, ingest.feed_md5)
    rest = _Serial(loop, executor, ingest.feed_rest)
    inflight: collections.deque = collections.deque()   # [md5 future, rest future] per buffer
    job: asyncio.Future | None = None                    # the last feed, or the durability wait
    batch: list = []
    batch_len = 0
    buffers = 0                                          # handed to the queues so far
    finished = False

    async def ship_chunks_of(r: asyncio.Future) -> None:
        new = await r
        if ship is not None and new:
            await ship(new)

    async def settle_oldest() -> None:
        m, r = inflight[0]
        await ship_chunks_of(r)
        await m
        inflight.popleft()

    try:
        async for data in body:
            if not data:
                continue
            batch.append(data)
            batch_len += len(data)
            if batch_len >= BATCH_BYTES:
                buf = batch[0] if len(batch) == 1 else b"".join(batch)
                batch, batch_len = [], 0
                buffers += 1
                pair = [md5.submit(buf)]
                inflight.append(pair)           # before the second submit: the cleanup sees both
                pair.append(rest.submit(buf))
                # ship what is finished; wait only when the window is full
                while inflight and (len(inflight) >= WINDOW
                                    or (inflight[0][0].done() and inflight[0][1].done())):
                    await settle_oldest()
        last = batch[0] if len(batch) == 1 else b"".join(batch)
        if buffers:
            # a body of a buffer or more ends like any buffer, through the two
            # queues, the chunker finishing on the rest queue: the last
            # chunks are written, shipped and synced while MD5 is still
            # catching up (a 1 MiB body's only chunk used to wait for its
            # whole MD5).  Also when every buffer is settled already and
            # only a few bytes came after them: the chunker still holds
            # what it has not cut, which is no small body (that mistake
            # answered 500 to a 64 MiB PUT now and then: its chunks are no
            # rows, 2026-11-27)
            pair = [md5.submit(last) if last else _done(loop)]
            inflight.append(pair)
            pair.append(rest.submit(last, ingest.finish_rest))
            # every buffer's chunks shipped in body order as its rest job
            # ends; the MD5s are waited for only after the durability wait
            for _m, r in list(inflight):
                await ship_chunks_of(r)
        elif len(last) <= ON_LOOP_BYTES:
            # a small body: hashed here, its row stored by the next group
            # commit; no thread hop of its own (ON_LOOP_BYTES).  Its chunks
            # are shipped whether or not the store had them: that is known
            # only once the row is committed, and a copy found there may be
            # one the vault never got (a refused upload's) and damaged since;
            # at this size sending it again costs less than finding out
            chunks = ingest.chunk_on_loop(last)
            stored = (store_small or ingest.store.put_small_async)(loop, chunks) if chunks else None
            if stored is not None:
                stored.add_done_callback(retrieve_exception)   # read below or by the commit; a failed upload may not
            if ship is not None and chunks:
                async with settled_on_failure(stored):
                    await ship(chunks)
            if stored is not None and defer_durable:
                digests = ingest.digests()
                digests.durable = stored
                finished = True
                return digests
            if stored is not None:
                await stored
            ingest.durable = True
        else:
            # the last piece and the end of the body in one hop to a worker: a
            # small object costs one thread hop in all (creating the chunk file
            # can wait on the file system's journal, never on the event loop).
            # Shielded: a cancelled upload must not see the job as done while
            # its thread still runs (the cleanup waits for the thread).
            job = loop.run_in_executor(executor, ingest.feed_and_finish, last)
            await ship_chunks_of(asyncio.shield(job))
        if not ingest.durable:
            # large chunks still being written and synced: the vault has been
            # receiving them meanwhile; the commit waits for both disks
            job = loop.run_in_executor(executor, ingest.wait_durable)
            await asyncio.shield(job)
        for m, _r in list(inflight):    # the MD5 of buffers still being hashed
            await m
        inflight.clear()
        finished = True
        return ingest.digests()
    finally:
        if not finished:
            # failed or cancelled mid-way.  The cleanup runs as a task of its
            # own, waited for until it is over even if this one is cancelled
            # again meanwhile (a server's shutdown cancels a handler that is
            # still waiting for its grace period): Ingest is not thread-safe,
            # so nothing may return while a thread still uses it.
            cleanup = asyncio.ensure_future(_clean_up(ingest, executor, md5, rest, inflight, job))
            cancelled = False
            while not cleanup.done():
                try:
                    await asyncio.shield(cleanup)
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError()


async def _clean_up(ingest: Ingest, executor: Executor, md5: _Serial, rest: _Serial,
                    inflight: collections.deque, job: asyncio.Future | None) -> None:
    if job is not None:
        # the last feed or the durability wait, perhaps still on its thread.
        # Waited for without raising: a job the executor dropped
        # (shutdown(cancel_futures=True)) ends cancelled, and the queues'
        # threads must still be waited for below
        await asyncio.wait([job])
        if not job.cancelled():
            job.exception()             # retrieved; the upload's own error is the one to report
    if inflight:
        # let the buffers being run finish (they use this upload's state);
        # queued ones are dropped
        await md5.stop()
        await rest.stop()
        for futs in inflight:
            for f in futs:
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()       # retrieved: no "never retrieved" warning
    if not ingest.durable and ingest.writing:
        # the upload failed (body, digest or shipping) with large chunk
        # writes started: their files stay in the store, where a later
        # upload may find them (dedup), so finish making them durable
        try:
            await asyncio.get_running_loop().run_in_executor(executor, ingest.wait_durable)
        except Exception as e:      # the upload's own error is the one to report
            log.warning("chunk files of a failed upload could not be synced: %r", e)
