"""Streaming ingest of an object body: one pass over each buffer computes the
chunk boundaries, a BLAKE3 digest per chunk, the MD5 (ETag), the optional
SHA-256 (signed payloads) and the flexible checksum the client asked for, and
writes new chunks to the chunk store.

Data flow (one upload):

    event loop: read socket -> decoded buffer --(executor)--> Ingest.feed
                                                   |-> md5 / sha256 / checksum
                                                   |-> StreamChunker -> ChunkStore.put

`feed` runs on a worker thread: hashlib, blake3 and the compiled chunker all
release the GIL, so several uploads proceed in parallel on both cores while the
event loop keeps reading sockets.  At most two buffers of one upload are in
flight (one hashing, one being read), so memory stays bounded whatever the
object size.
"""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor

from airlock.chunk.chunker import StreamChunker
from airlock.chunk.store import ChunkStore
from airlock.primary.model import BodyDigests, ChunkRef

INLINE_FEED_BYTES = 64 * 1024       # below this a thread hop costs more than hashing inline (no-fsync stores only)
BATCH_BYTES = 1 * 1024 * 1024       # coalesce socket reads to ~1 MiB before handing to a thread


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

    def feed(self, data) -> list[tuple[str, bytes]]:
        """Consume one buffer; return the chunks it completed that were new to
        the store, as (digest hex, bytes), for shipping to the vault."""
        self._size += len(data)
        self._md5.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        for c in self._checksums.values():
            c.update(data)
        return self._store_chunks(self._chunker.update(data))

    def finish(self) -> list[tuple[str, bytes]]:
        """End of body: store the last chunk and make the chunk directories durable."""
        new = self._store_chunks(self._chunker.finish())
        self.store.sync_dirs(self._dirs)
        return new

    def digests(self) -> BodyDigests:
        return BodyDigests(
            size=self._size,
            md5=self._md5.digest(),
            sha256=self._sha256.digest() if self._sha256 is not None else None,
            checksums={alg: c.digest() for alg, c in self._checksums.items()},
            chunks=self._chunks,
        )

    def _store_chunks(self, chunks) -> list[tuple[str, bytes]]:
        new = []
        for digest, data in chunks:
            hexd = digest.hex()
            d = self.store.put(hexd, data)
            if d is not None:
                self._dirs.add(d)
                new.append((hexd, data))
            self._chunks.append(ChunkRef(hexd, len(data)))
        return new


ShipChunks = Callable[[list], Awaitable[None]]


async def ingest_body(ingest: Ingest, body: AsyncIterator, executor: Executor | None,
                      ship: ShipChunks | None = None) -> BodyDigests:
    """Drive `ingest` over an async iterator of buffers; returns the digests.

    Small bodies are hashed inline on the event loop when the store does not
    fsync (a thread hop costs more than hashing 4 KiB); with fsync on, the
    chunk file's fdatasync must never block the event loop, so every body is
    fed on `executor`.  Larger bodies are coalesced to ~BATCH_BYTES and fed on
    `executor`.  While one buffer is hashed and chunked on a worker thread,
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

    async def submit(buf) -> None:
        nonlocal pending
        if pending is not None:
            fut, pending = pending, None
            new = await fut
            pending = loop.run_in_executor(executor, ingest.feed, buf)
            if ship is not None and new:
                await ship(new)
        else:
            pending = loop.run_in_executor(executor, ingest.feed, buf)

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
        if batch:
            buf = batch[0] if len(batch) == 1 else b"".join(batch)
            if len(buf) <= INLINE_FEED_BYTES and ingest._size == 0 and not ingest.store.fsync:
                new = ingest.feed(buf) + ingest.finish()
                if ship is not None and new:
                    await ship(new)
                return ingest.digests()
            await submit(buf)
            await settle()
        if ingest._size <= INLINE_FEED_BYTES and not ingest.store.fsync:
            new = ingest.finish()
        else:
            new = await loop.run_in_executor(executor, ingest.finish)
        if ship is not None and new:
            await ship(new)
        return ingest.digests()
    finally:
        if pending is not None and not pending.done():
            # the body failed mid-way: let the in-flight feed finish before we return
            try:
                await pending
            except Exception:
                pass
