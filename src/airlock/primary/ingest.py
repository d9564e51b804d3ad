"""Streaming ingest of an object body: one pass over each buffer computes the
chunk boundaries, a BLAKE3 digest per chunk, the MD5 (ETag), the optional
SHA-256 (signed payloads) and the flexible checksum the client asked for, and
writes new chunks to the chunk store.

Data flow (one upload):

    event loop: read socket -> decoded buffer --(executor)--> Ingest.feed
                                                   |-> md5 / sha256 / checksum
                                                   |-> StreamChunker -> ChunkStore.put
                                                        (chunks >= ASYNC_WRITE_BYTES: put_async,
                                                         on the store's writer threads)

`feed` runs on a worker thread (for buffers of SPLIT_BYTES and more, as two
jobs on two threads: MD5, and everything else): hashlib, blake3 and the
compiled chunker all release the GIL, so uploads proceed in parallel on both
cores while the event loop keeps reading sockets.  At most two buffers of one upload are in
flight (one hashing, one being read), so memory stays bounded whatever the
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
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor

from airlock.chunk.chunker import StreamChunker
from airlock.chunk.store import ChunkStore
from airlock.primary.model import BodyDigests, ChunkRef

log = logging.getLogger("airlock.ingest")

BATCH_BYTES = 1 * 1024 * 1024       # coalesce socket reads to ~1 MiB before handing to a thread
SPLIT_BYTES = 256 * 1024            # from this size a buffer is fed as two parallel jobs (MD5 | the rest)
ASYNC_WRITE_BYTES = 256 * 1024      # chunks from this size are written on the store's writer threads ...
MAX_WRITES_IN_FLIGHT = 4            # ... at most this many per upload at once (bounds memory)


def _new_checksum(name: str):
    from airlock.s3.checksums import new_checksum  # the algorithms live with the S3 layer's helpers
    return new_checksum(name)


class Ingest:
    """Hashes and chunks one body.  Not thread-safe: feed calls are serialised."""

    def __init__(self, store: ChunkStore, *, want_sha256: bool = False,
                 checksum_algorithms: tuple[str, ...] = (), chunk_params: dict | None = None):
        self.store = store
        self._md5 = hashlib.md5()
        self._sha256 = hashlib.sha256() if want_sha256 else None
        self._checksums = {alg: _new_checksum(alg) for alg in checksum_algorithms}
        self._chunker = StreamChunker(**(chunk_params or {}))
        self._chunks: list[ChunkRef] = []
        self._size = 0
        self._dirs: set[str] = set()
        self._writes: list = []            # chunk writes in flight on the store's writer threads
        self.writing: dict = {}            # digest hex -> future of its chunk file's write (large chunks)
        self.durable = False               # every chunk file and directory of this body is synced

    def feed(self, data) -> list[tuple[str, bytes]]:
        """Consume one buffer; return the chunks it completed that were new to
        the store, as (digest hex, bytes), for shipping to the vault."""
        self.feed_md5(data)
        return self.feed_rest(data)

    # A large buffer is fed as two jobs on two threads at once (all of this
    # releases the GIL): MD5, the costliest pass (~1.4 ms/MiB), on one; the
    # SHA-256 / flexible checksums, the chunker and the chunk writes on the
    # other.  Each job keeps its own state, so the two never touch the same
    # object; buffers of one upload are still fed strictly in order.
    def feed_md5(self, data) -> None:
        self._md5.update(data)

    def feed_rest(self, data) -> list[tuple[str, bytes]]:
        self._size += len(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        for c in self._checksums.values():
            c.update(data)
        return self._store_chunks(self._chunker.update(data))

    def feed_and_finish(self, data) -> list[tuple[str, bytes]]:
        """The last buffer and the end of the body.  Returns the new chunks
        at once; if large chunk writes are still in flight they are left to
        `wait_durable`, so that the caller can ship those chunks to the vault
        while the disk syncs them (a small body's chunk files are durable on
        return, in this one thread hop)."""
        new = (self.feed(data) if data else []) + self._store_chunks(self._chunker.finish())
        if not self._writes:
            self.wait_durable()
        return new

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


async def _second(both: Awaitable[list]):
    return (await both)[1]


async def ingest_body(ingest: Ingest, body: AsyncIterator, executor: Executor | None,
                      ship: ShipChunks | None = None) -> BodyDigests:
    """Drive `ingest` over an async iterator of buffers; returns the digests.

    Every body is fed on `executor`: writing a chunk file (create, write,
    rename, and fdatasync when the store syncs) can wait on the file system
    and must never block the event loop.  Bodies are coalesced to
    ~BATCH_BYTES per hop; the last piece and the end of the body share one
    hop (`feed_and_finish`), so a small object costs a single one.  While one buffer is hashed and chunked on a worker thread,
    the event loop reads the next one from the socket and ships the chunks the
    previous buffer completed (`ship`, the commit point's way to stream chunks
    to the vault while the body is still arriving).  Feeds of one upload run
    one after the other, so chunk order holds.
    """
    loop = asyncio.get_running_loop()
    pending: asyncio.Future | None = None
    batch: list = []
    batch_len = 0

    async def settle() -> None:
        nonlocal pending
        if pending is not None:
            fut, pending = pending, None
            new = await fut
            if ship is not None and new:
                await ship(new)

    def start_feed(buf) -> asyncio.Future:
        if len(buf) < SPLIT_BYTES:
            return loop.run_in_executor(executor, ingest.feed, buf)
        md5 = loop.run_in_executor(executor, ingest.feed_md5, buf)
        rest = loop.run_in_executor(executor, ingest.feed_rest, buf)
        return asyncio.ensure_future(_second(asyncio.gather(md5, rest)))

    async def submit(buf) -> None:
        nonlocal pending
        if pending is not None:
            fut, pending = pending, None
            new = await fut
            pending = start_feed(buf)
            if ship is not None and new:
                await ship(new)
        else:
            pending = start_feed(buf)

    try:
        async for data in body:
            if not data:
                continue
            batch.append(data)
            batch_len += len(data)
            if batch_len >= BATCH_BYTES:
                buf = batch[0] if len(batch) == 1 else b"".join(batch)
                batch, batch_len = [], 0
                await submit(buf)
        await settle()
        last = batch[0] if len(batch) == 1 else b"".join(batch)
        # the last piece and the end of the body in one hop to a worker: a
        # small object costs one thread hop in all (creating the chunk file
        # can wait on the file system's journal, never on the event loop)
        new = await loop.run_in_executor(executor, ingest.feed_and_finish, last)
        if ship is not None and new:
            await ship(new)
        if not ingest.durable:
            # large chunks still being written and synced: the vault has been
            # receiving them meanwhile; the commit waits for both disks
            await loop.run_in_executor(executor, ingest.wait_durable)
        return ingest.digests()
    finally:
        if pending is not None and not pending.done():
            # the body failed mid-way: let the in-flight feed finish before we return
            try:
                await pending
            except Exception:
                pass
        if not ingest.durable and ingest.writing:
            # the upload failed (body, digest or shipping) with large chunk
            # writes started: their files stay in the store, where a later
            # upload may find them (dedup), so finish making them durable
            try:
                await loop.run_in_executor(executor, ingest.wait_durable)
            except Exception as e:      # the upload's own error is the one to report
                log.warning("chunk files of a failed upload could not be synced: %r", e)
