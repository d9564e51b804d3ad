"""The base volume file (`base/volume.dat`): a header and chunk extents,
allocated by appending at `volume_end` (claim 22).

Each extent is self-describing (magic, length, digest, data, checksum) so the
chunk map can be rebuilt by scanning (docs/format/vault.md).  The volume knows
nothing about the catalog: `volume_end` is the caller's (the catalog's) truth.
"""
from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

import blake3

from airlock.errors import FormatError
from airlock.fsutil import CacheBypass, fsync_dir

VOLUME_MAGIC = b"AVBASE\x00\x00"
VOLUME_VERSION = 1
VOLUME_HEADER = struct.Struct("<8sHHIQ")
VOLUME_HEADER_SIZE = 32

EXTENT_MAGIC = b"AVEX"
EXTENT_VERSION = 1
EXTENT_HEADER = struct.Struct("<4sHHQ32s")      # magic, version, flags, length, digest
EXTENT_HEADER_SIZE = 48
EXTENT_OVERHEAD = EXTENT_HEADER_SIZE + 8         # header + trailing checksum
MAX_EXTENT_DATA = 64 * 1024 * 1024               # bytes; bounds what a torn length field can claim


def encode_extent_parts(digest_hex: str, data) -> list:
    """The extent as [header, data, checksum]: written without joining them."""
    header = EXTENT_HEADER.pack(EXTENT_MAGIC, EXTENT_VERSION, 0, len(data), bytes.fromhex(digest_hex))
    h = blake3.blake3(header)
    h.update(data)
    return [header, data, h.digest(8)]


class BaseVolume:
    def __init__(self, path: str, fsync: bool = True):
        self.path = path
        self.fsync = fsync
        self.fd: int | None = None
        self._direct: CacheBypass | None = None     # its O_DIRECT descriptor (extents)

    def open(self) -> "BaseVolume":
        if not os.path.exists(path := self.path) or os.path.getsize(path) < VOLUME_HEADER_SIZE:
            # missing, or torn while being created (nothing can follow an unsynced header)
            prefix = VOLUME_HEADER.pack(VOLUME_MAGIC, VOLUME_VERSION, 0, 0, time.time_ns())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, prefix + blake3.blake3(prefix).digest(8))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if self.fsync:
                fsync_dir(os.path.dirname(path))
        self.fd = os.open(path, os.O_RDWR)
        self._direct = CacheBypass(path)
        header = os.pread(self.fd, VOLUME_HEADER_SIZE, 0)
        magic, version, flags, reserved, _created = VOLUME_HEADER.unpack_from(header, 0)
        if magic != VOLUME_MAGIC or blake3.blake3(header[:24]).digest(8) != header[24:32]:
            raise FormatError(f"{path}: not a base volume or header damaged")
        if version != VOLUME_VERSION or flags or reserved:
            raise FormatError(f"{path}: base volume version {version} flags {flags:#x} not supported")
        return self

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, end: int) -> int:
        """Cut everything past `end` (uncommitted extents); returns bytes cut."""
        size = self.size()
        if size < end:
            raise FormatError(f"{self.path}: {size} bytes but the catalog says volume_end={end} "
                              f"(committed extents lost)")
        if size > end:
            os.ftruncate(self.fd, end)
            if self.fsync:
                os.fsync(self.fd)
        return size - end

    def write_extent(self, offset: int, digest_hex: str, data) -> int:
        """Write one extent at `offset` (not synced); returns its size.
        Compaction writes extents back to back, so a large one's whole
        blocks bypass the page cache (fsutil.write_around_cache)."""
        parts = encode_extent_parts(digest_hex, data)
        self._direct.write(self.fd, offset, parts)
        return sum(memoryview(p).nbytes for p in parts)

    def sync(self) -> None:
        if self.fsync:
            os.fdatasync(self.fd)

    def read_data(self, offset: int, length: int) -> bytes:
        """Data bytes of the extent at `offset` (header checked, digest not)."""
        raw = os.pread(self.fd, EXTENT_HEADER_SIZE + length, offset)
        if len(raw) != EXTENT_HEADER_SIZE + length:
            raise FormatError(f"{self.path}: extent at {offset} truncated")
        magic, version, _flags, n, _digest = EXTENT_HEADER.unpack_from(raw, 0)
        if magic != EXTENT_MAGIC or n != length:
            raise FormatError(f"{self.path}: no extent of length {length} at {offset}")
        if version != EXTENT_VERSION:
            raise FormatError(f"{self.path}: extent version {version} not supported")
        return raw[EXTENT_HEADER_SIZE:]

    def scan(self) -> Iterator[tuple[str, int, int, int]]:
        """Yield (digest_hex, offset, length, end) of every intact extent from the
        header on.  A damaged region is skipped by searching for the next intact
        extent (its bounds are appended to `self.damaged`), so bit rot in the
        middle never hides, or lets a caller truncate, the extents after it."""
        self.damaged: list[tuple[int, int]] = []
        size = self.size()
        o = VOLUME_HEADER_SIZE
        while o < size:
            ext = self._extent_at(o, size)
            if ext is not None:
                yield ext
                o = ext[3]
                continue
            nxt = self._next_intact(o + 1, size)
            self.damaged.append((o, nxt if nxt is not None else size))
            if nxt is None:
                return
            o = nxt

    def _extent_at(self, o: int, size: int) -> tuple[str, int, int, int] | None:
        if size - o < EXTENT_OVERHEAD:
            return None
        head = os.pread(self.fd, EXTENT_HEADER_SIZE, o)
        magic, version, _flags, n, digest = EXTENT_HEADER.unpack_from(head, 0)
        if magic != EXTENT_MAGIC or n > MAX_EXTENT_DATA or size - o < EXTENT_OVERHEAD + n:
            return None
        rest = os.pread(self.fd, n + 8, o + EXTENT_HEADER_SIZE)
        h = blake3.blake3(head)
        h.update(memoryview(rest)[:n])
        if h.digest(8) != rest[n:]:
            return None
        if version != EXTENT_VERSION:
            raise FormatError(f"{self.path}: extent at {o} has unsupported version {version}")
        return digest.hex(), o, n, o + EXTENT_OVERHEAD + n

    def _next_intact(self, o: int, size: int, window: int = 1 << 20) -> int | None:
        """Offset of the next intact extent at or after `o`, or None."""
        while o < size:
            buf = os.pread(self.fd, window + 3, o)
            i = buf.find(EXTENT_MAGIC)
            while i != -1:
                if self._extent_at(o + i, size) is not None:
                    return o + i
                i = buf.find(EXTENT_MAGIC, i + 1)
            o += window
        return None

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
