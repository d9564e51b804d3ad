"""File-system durability helpers shared by every persisted format.

`fsync_dir` is the one directory fsync every format uses.

`write_around_cache` writes a large run of bytes so that its whole 4 KiB
blocks bypass the page cache (O_DIRECT) and only the partial blocks at its
two ends go through it.  Data the writer fdatasyncs at once and rarely reads
back (a chunk file, a vault overlay entry) gains nothing from being cached,
and copying it into newly allocated cache pages is the largest system-CPU
item of a large PUT: measured on the 2-core benchmark VM, 1 MiB chunk files
(tmp + fdatasync + rename, 4 threads) cost 1.5-2.7 ms of system CPU per MiB
written through the cache and 0.23-0.32 written around it (docs/performance.md).
The bytes on disk are the same either way; fdatasync is still what makes
them durable (O_DIRECT bypasses the cache, not the device's write cache, and
does not persist the file size).

Set AIRLOCK_DIRECT_IO=0 in the environment to write everything through the
cache (a diagnostic switch; file systems without O_DIRECT fall back by
themselves).
"""
from __future__ import annotations

import errno
import mmap
import os
import threading

O_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_BLOCK = 4096               # bytes; offset, length and buffer alignment of a direct write
DIRECT_MIN_BYTES = 128 * 1024     # bytes; shorter runs go through the page cache (no gain, two extra syscalls)
STAGING_BYTES = 1 << 20           # bytes; the aligned buffer a direct write is copied through, one per thread
DIRECT_IO = bool(O_DIRECT) and os.environ.get("AIRLOCK_DIRECT_IO", "1") != "0"

_local = threading.local()


def fsync_dir(directory) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_direct(path: str, flags: int = os.O_WRONLY) -> int | None:
    """A second descriptor of `path` with O_DIRECT, or None where direct I/O
    is off or the file system refuses it (callers then write through the cache)."""
    if not DIRECT_IO:
        return None
    try:
        return os.open(path, flags | O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


class CacheBypass:
    """The O_DIRECT descriptor of a file a writer keeps open (an overlay, the
    base volume), for `write_around_cache`; dropped for good once the file
    system refuses it, after which every write goes through the cache."""

    def __init__(self, path: str):
        self.fd = open_direct(path)

    def write(self, fd: int, offset: int, parts) -> None:
        if not write_around_cache(fd, self.fd, offset, parts):
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _staging() -> mmap.mmap:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, STAGING_BYTES)    # page-aligned, so DIRECT_BLOCK-aligned
    return buf


def write_around_cache(fd: int, dfd: int | None, offset: int, parts) -> bool:
    """Write the buffers `parts` back to back at `offset` of one file open as
    `fd` (normal) and `dfd` (O_DIRECT, or None).  The run's whole blocks go
    through `dfd`, copied via a per-thread aligned staging buffer; the
    partial blocks at its ends, and every run under DIRECT_MIN_BYTES, through
    `fd`.  So a block is only ever written one way: a run's partial end
    block, which the next run completes, is always written through the
    cache.  Returns False if `dfd` refused a write with EINVAL (alignment or
    file system): the run was completed through `fd` and the caller should
    stop using `dfd`.  Not durable until the caller fdatasyncs."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    end = offset + total
    first = -(-offset // DIRECT_BLOCK) * DIRECT_BLOCK        # first block boundary at or after offset
    last = end // DIRECT_BLOCK * DIRECT_BLOCK                # last block boundary at or before end
    ok = True
    if dfd is None or total < DIRECT_MIN_BYTES or last <= first:
        _write_run(fd, offset, views, 0, total)
        return ok
    _write_run(fd, offset, views, 0, first - offset)         # head: completes the partial block before
    pos = first
    staging = _staging()
    while pos < last:
        n = min(STAGING_BYTES, last - pos)
        _copy_run(views, pos - offset, n, staging)
        try:
            written = os.pwrite(dfd, memoryview(staging)[:n], pos) if ok else 0
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            ok = False
            written = 0
        if written < n:                                      # refused or short: the rest through the cache
            _pwritev_all(fd, [memoryview(staging)[written:n]], pos + written)
        pos += n
    _write_run(fd, last, views, last - offset, end - last)   # tail: the partial block the next run completes
    return ok


def _write_run(fd: int, offset: int, views: list, start: int, length: int) -> None:
    """Write bytes [start, start+length) of the concatenated views at `offset` (one pwritev)."""
    _pwritev_all(fd, list(_slices(views, start, length)), offset)


def _pwritev_all(fd: int, pending: list, offset: int) -> None:
    while pending:
        n = os.pwritev(fd, pending, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev at {offset} wrote nothing")
        offset += n
        while pending and n >= pending[0].nbytes:
            n -= pending[0].nbytes
            pending.pop(0)
        if pending and n:
            pending[0] = pending[0][n:]


def _copy_run(views: list, start: int, length: int, dest) -> None:
    o = 0
    for v in _slices(views, start, length):
        dest[o:o + v.nbytes] = v
        o += v.nbytes


def _slices(views: list, start: int, length: int):
    """The pieces of the views that hold bytes [start, start+length) of their concatenation."""
    if length <= 0:
        return
    for v in views:
        n = v.nbytes
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        yield v[start:start + take]
        length -= take
        start = 0
        if not length:
            return
