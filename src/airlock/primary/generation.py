"""The index generation page: how a gateway worker learns that its caches
of the leader's index are stale without asking SQLite on every lookup.

The leader owns a 64-byte shared memory file (docs/format/ipc.md, "Index
generation page") and bumps two counters after it commits an index
transaction: `applied` always, `buckets` when the transaction held a bucket
record.  Workers map it read-only and compare the counters with the ones
they saw when they filled their caches.
"""
from __future__ import annotations

import mmap
import os
import struct
import tempfile

MAGIC = b"ALIG"
VERSION = 1
SIZE = 64
_HEADER = struct.Struct("<4sI")
_APPLIED = 1          # u64 slots of the page (offset 8 and 16)
_BUCKETS = 2


class GenerationError(Exception):
    """The inherited descriptor is not an index generation page of this build."""


class Generation:
    """One process's view of the page.  `create()` in the leader (writable),
    `attach(fd)` in a worker (read-only)."""

    def __init__(self, fd: int, mm: mmap.mmap, writable: bool):
        self.fd = fd
        self._mm = mm
        self._q = memoryview(mm).cast("Q")        # aligned 8-byte loads and stores
        self.writable = writable

    @classmethod
    def create(cls) -> "Generation":
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("airlock-index-generation")   # close-on-exec: passed by pass_fds
        else:
            f = tempfile.TemporaryFile()
            fd = os.dup(f.fileno())
            f.close()
        try:
            os.ftruncate(fd, SIZE)
            mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        _HEADER.pack_into(mm, 0, MAGIC, VERSION)
        return cls(fd, mm, writable=True)

    @classmethod
    def attach(cls, fd: int) -> "Generation":
        try:
            size = os.fstat(fd).st_size
            if size != SIZE:
                raise GenerationError(f"index generation page of {size} bytes, expected {SIZE}")
            mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as e:
            raise GenerationError(f"index generation page not usable: {e}") from None
        magic, version = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC or version != VERSION:
            mm.close()
            raise GenerationError(f"index generation page has magic {magic!r} version {version}, "
                                  f"expected {MAGIC!r} {VERSION}")
        return cls(fd, mm, writable=False)

    def read(self) -> tuple[int, int]:
        """(applied, buckets)."""
        q = self._q
        return q[_APPLIED], q[_BUCKETS]

    def bump(self, buckets: bool) -> None:
        """After a committed index transaction (leader only)."""
        q = self._q
        q[_APPLIED] = (q[_APPLIED] + 1) & 0xFFFF_FFFF_FFFF_FFFF
        if buckets:
            q[_BUCKETS] = (q[_BUCKETS] + 1) & 0xFFFF_FFFF_FFFF_FFFF

    def close(self) -> None:
        self._q.release()
        self._mm.close()
        os.close(self.fd)
