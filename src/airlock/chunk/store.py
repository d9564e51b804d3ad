"""The primary's chunk store: chunks by their BLAKE3 digest, small ones as
rows of one database, the others one file each.

Layout (docs/format/chunkstore.md):

    <root>/chunks/small.sqlite            chunks of at most SMALL_CHUNK_MAX bytes (chunk/small.py)
    <root>/chunks/<hex[0:2]>/<hex>        chunk file = CHUNK_HEADER + data
    <root>/chunks/tmp/                    files being written (removed on open)

A small chunk is durable when `put` returns (its transaction committed,
shared with concurrent uploads).  A larger one is written to tmp, fsynced
(if `fsync`), then renamed into place; the directory is fsynced by
`sync_dirs` before the commit record that references it is written.  A
gateway with a vault and chunk_sync = "vault" runs this store with
`fsync=False`: the vault's durable copy is the guarantee and reads
repair what a power loss cut short.  Chunks
are stored once per digest (dedup).  Every read is verified against the digest;
a mismatch raises IntegrityError; the engine then fetches the chunk from the
vault and writes the good copy back (`replace`).
"""
from __future__ import annotations

import errno
import itertools
import os
import sqlite3
import struct
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import blake3

from airlock.chunk.small import SmallChunks
from airlock.errors import FormatError, IntegrityError
from airlock.fsutil import DIRECT_MIN_BYTES, fsync_dir, open_direct, write_around_cache
from airlock.malloc import uninitialized

CHUNK_MAGIC = b"ACHK"
CHUNK_VERSION = 1
# magic(4) version(u16) flags(u16) length(u64), little-endian
CHUNK_HEADER = struct.Struct("<4sHHQ")
CHUNK_HEADER_SIZE = CHUNK_HEADER.size  # 16
WRITER_THREADS = 4      # chunk files written (and fdatasynced) at once by `put_async`
SMALL_CHUNK_MAX = 64 * 1024     # bytes; chunks up to this size are rows of chunks/small.sqlite


def digest_of(data) -> str:
    return blake3.blake3(data).hexdigest()


def _file_length(digest: str, head, file_size: int) -> int:
    """The data length a chunk file's header states, checked against the
    file's size (trailing or missing bytes are damage)."""
    if len(head) < CHUNK_HEADER_SIZE:
        raise IntegrityError(f"chunk {digest}", digest, "truncated header")
    magic, version, _flags, length = CHUNK_HEADER.unpack(head)
    if magic != CHUNK_MAGIC:
        raise IntegrityError(f"chunk {digest}", digest, "bad magic")
    if version != CHUNK_VERSION:
        raise FormatError(f"chunk {digest}: unsupported chunk format version {version}")
    if file_size - CHUNK_HEADER_SIZE != length:
        raise IntegrityError(f"chunk {digest}", digest, f"length {file_size - CHUNK_HEADER_SIZE} != {length}")
    return length


class ChunkStore:
    def __init__(self, root: str, *, fsync: bool = True, clean_tmp: bool = True, owner: str | None = None):
        """`clean_tmp=False` for tools that share the store with a running
        gateway (scrub): its tmp/ holds that gateway's writes in progress.
        `owner` names this store's tmp files (default: a random id), so that
        another process can remove them once this one is gone (remove_tmp)."""
        self.root = os.path.join(root, "chunks")
        self.tmp = os.path.join(self.root, "tmp")
        self.fsync = fsync
        self._made: set[str] = set()
        self._nowait = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")   # read_cached can tell
        self._tmp_prefix = (owner or uuid.uuid4().hex[:12]) + "-"   # unique per open store ...
        self._tmp_ids = itertools.count()                # ... and per write (next() is atomic in CPython)
        self._lock = threading.Lock()
        self._writers: ThreadPoolExecutor | None = None
        self._direct = True      # large synced chunk files bypass the page cache (until the fs refuses)
        os.makedirs(self.tmp, exist_ok=True)
        self.small = SmallChunks(self.root, fsync=fsync)
        if not clean_tmp:
            return
        for name in os.listdir(self.tmp):  # leftovers of writes a crash interrupted
            try:
                os.unlink(os.path.join(self.tmp, name))
            except OSError:
                pass

    def path(self, digest: str) -> str:
        return os.path.join(self.root, digest[:2], digest)

    def dir_of(self, digest: str) -> str:
        return os.path.dirname(self.path(digest))

    def has(self, digest: str, size: int | None = None) -> bool:
        """Stored?  With the chunk's `size`, only where a chunk of that size
        is written (a large chunk costs no database lookup)."""
        if size is not None and size > SMALL_CHUNK_MAX:
            return os.path.exists(self.path(digest))
        return self.small.has(bytes.fromhex(digest)) or os.path.exists(self.path(digest))

    def put(self, digest: str, data) -> tuple[str | None, bool]:
        """Store `data` under `digest` unless present.  Returns (directory,
        written).  A small chunk is durable on return (directory None).  For
        a file, the directory needs an fsync before a record may reference
        the chunk even when this call did not write it: another writer may
        have renamed the file into place without having synced it yet."""
        if len(data) <= SMALL_CHUNK_MAX:
            return None, self.small.put(bytes.fromhex(digest), data)
        final = self.path(digest)
        d = os.path.dirname(final)
        if os.path.exists(final):
            return d, False
        if d not in self._made:
            os.makedirs(d, exist_ok=True)
            with self._lock:
                self._made.add(d)
        os.replace(self._write_tmp(digest, data), final)
        return d, True

    def put_small_async(self, loop, chunks: list[tuple[str, bytes]]):
        """Store small chunks (digest hex, data), each of at most
        SMALL_CHUNK_MAX bytes, from the thread running `loop` without
        blocking it (SmallChunks.put_async): an asyncio future of the
        chunks' written flags, set once they are durable."""
        if any(len(data) > SMALL_CHUNK_MAX for _d, data in chunks):
            raise ValueError("put_small_async takes small chunks only")
        return self.small.put_async(loop, [(bytes.fromhex(d), bytes(data)) for d, data in chunks])

    def put_async(self, digest: str, data) -> Future:
        """`put` on one of the store's writer threads (its own pool: callers
        may be threads of another pool that wait for the result).  Lets one
        upload write and sync several chunk files at once while it hashes
        the next buffer; the future's result is `put`'s."""
        with self._lock:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="airlock-chunk-writer")
        return self._writers.submit(self.put, digest, data)

    def _write_tmp(self, digest: str, data) -> str:
        """Write a complete chunk file under tmp/ and fdatasync it; returns its
        path.  A write that fails (ENOSPC, EIO) removes its tmp file: a full
        disk must not also fill with the leftovers of failed uploads."""
        tmp = os.path.join(self.tmp, f"{digest}.{self._tmp_prefix}{next(self._tmp_ids)}")
        try:
            self._write_file(tmp, data)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return tmp

    def _write_file(self, tmp: str, data) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            header = CHUNK_HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, 0, len(data))
            view = memoryview(data).cast("B")
            # a large chunk file is synced at once and read back only by
            # GETs: its whole blocks bypass the page cache (fsutil)
            dfd = None
            if self.fsync and self._direct and view.nbytes >= DIRECT_MIN_BYTES:
                dfd = open_direct(tmp)
                if dfd is None:
                    self._direct = False
            try:
                if not write_around_cache(fd, dfd, 0, [header, view]):
                    self._direct = False
            finally:
                if dfd is not None:
                    os.close(dfd)
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def remove_tmp(self, owner: str) -> int:
        """Remove the tmp files of the store opened with `owner` (a process
        that died mid-write; its writes never completed).  Returns how many."""
        mark = f".{owner}-"
        n = 0
        for name in os.listdir(self.tmp):
            if mark in name:
                try:
                    os.unlink(os.path.join(self.tmp, name))
                    n += 1
                except FileNotFoundError:
                    pass
        return n

    def replace(self, digest: str, data) -> None:
        """Write a good copy of a chunk over a missing or damaged one: a row
        (INSERT OR REPLACE, and a file of the same digest removed), or tmp +
        fdatasync + rename + directory fsync.  The caller has verified `data`
        against `digest`; repairs are logged and counted by the caller."""
        final = self.path(digest)
        if len(data) <= SMALL_CHUNK_MAX:
            self.small.put(bytes.fromhex(digest), data, replace=True)
            try:
                os.unlink(final)
            except FileNotFoundError:
                pass
            return
        d = os.path.dirname(final)
        os.makedirs(d, exist_ok=True)
        os.replace(self._write_tmp(digest, data), final)
        self.sync_dirs([d])

    def discard(self, digest: str) -> None:
        """Remove a damaged chunk (row and file) so that the next `put` of
        these bytes writes it again (dedup would otherwise keep the bad copy)."""
        self.small.delete(bytes.fromhex(digest))
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def sync_dirs(self, dirs) -> None:
        if not self.fsync:
            return
        for d in dirs:
            if d is not None:
                fsync_dir(d)

    def read(self, digest: str, verify: bool = True) -> bytes:
        """The chunk's bytes, verified against its digest: the row if there
        is one, else the file (FileNotFoundError if neither exists)."""
        try:
            data = self.small.get(bytes.fromhex(digest))
        except sqlite3.Error as e:
            raise IntegrityError(f"chunk {digest}", digest, f"small-chunk database unreadable: {e}") from None
        if data is not None:
            if verify:
                actual = digest_of(data)
                if actual != digest:
                    raise IntegrityError(f"chunk {digest}", digest, actual)
            return data
        # header and data read separately: the data arrives in its own bytes
        # object (no slice copy of a 1 MiB chunk); the file size is checked
        # so that trailing bytes are still caught
        fd = os.open(self.path(digest), os.O_RDONLY)
        try:
            length = _file_length(digest, os.pread(fd, CHUNK_HEADER_SIZE, 0), os.fstat(fd).st_size)
            data = os.pread(fd, length, CHUNK_HEADER_SIZE)
        finally:
            os.close(fd)
        if len(data) != length:
            raise IntegrityError(f"chunk {digest}", digest, f"length {len(data)} != {length}")
        if verify:
            actual = digest_of(data)
            if actual != digest:
                raise IntegrityError(f"chunk {digest}", digest, actual)
        return data

    def read_cached(self, digest: str, size: int) -> bytearray | None:
        """The verified bytes of a chunk *file* of `size` bytes if all of
        them are in the page cache, read without waiting for the disk
        (preadv2 with RWF_NOWAIT); else None, and the caller reads it with
        `read` on a thread.  So the event loop serves a hot chunk without a
        thread hop and never waits for the disk for it (opening the file may
        still read its inode).  Anything unexpected -- no such file, a short
        or damaged one, a digest mismatch, a file system without
        RWF_NOWAIT -- is also None: `read` then reports it as it always does.
        Rows (small chunks) are not looked for."""
        if not self._nowait:
            return None
        try:
            fd = os.open(self.path(digest), os.O_RDONLY)
        except OSError:
            return None
        # `data` is returned only when preadv filled all of it
        head, data = bytearray(CHUNK_HEADER_SIZE), uninitialized(size)
        try:
            # EAGAIN (BlockingIOError) when not all of it is in the page cache
            whole = (os.preadv(fd, [head, data], 0, os.RWF_NOWAIT) == CHUNK_HEADER_SIZE + size
                     and _file_length(digest, head, os.fstat(fd).st_size) == size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False          # this file system cannot tell: always `read`
            return None
        except (IntegrityError, FormatError):
            return None
        finally:
            os.close(fd)
        return data if whole and digest_of(data) == digest else None

    def iter_digests(self):
        """Every stored digest: rows, then files (a digest may be in both)."""
        for d in self.small.digests():
            yield d.hex()
        for sub in sorted(os.listdir(self.root)):
            if sub == "tmp":
                continue
            p = os.path.join(self.root, sub)
            if os.path.isdir(p):
                yield from sorted(os.listdir(p))

    def close(self) -> None:
        self.small.close()
