"""Overlay storage objects: time-ordered files of chunks and records not yet
merged into the base volume (claims 34-38).

Format, recovery and garbage collection: docs/format/vault.md.  An `Overlay`
keeps an in-memory index of its file (chunk id -> (offset, length) of the
data, records in seq order).  Only the newest overlay is written to; writing
is not thread-safe by itself (VaultStore serializes it under its lock).
"""
from __future__ import annotations

import os
import re
import struct
import time
from typing import NamedTuple

import blake3

from airlock.errors import FormatError
from airlock.fsutil import CacheBypass, fsync_dir

OVERLAY_MAGIC = b"AVOVL\x00\x00\x00"
OVERLAY_VERSION = 1
OVERLAY_HEADER = struct.Struct("<8sHHIQ")          # + 8 checksum bytes
OVERLAY_HEADER_SIZE = 32

ENTRY_MAGIC = b"AVOE"
ENTRY_VERSION = 1
ENTRY_PREFIX = struct.Struct("<4sBBHI")             # magic, etype, version, reserved, length
ENTRY_HEADER_SIZE = 20
CHECKSUM_LEN = 8
RECORD_PREFIX = struct.Struct("<QBBH")              # seq, rtype, reserved, flags
SEAL_BODY = struct.Struct("<QII")                   # sealed_ns, chunks, records
MAX_ENTRY_BODY = 64 * 1024 * 1024 + 16              # bytes: a max log payload + the record prefix, with room

E_CHUNK = 1
E_RECORD = 2
E_SEAL = 3

NAME = re.compile(r"^ov-(\d{20})\.ovl$")


def overlay_name(created_ns: int) -> str:
    return f"ov-{created_ns:020d}.ovl"


def list_overlays(directory: str) -> list[tuple[int, str]]:
    """(created_ns, path) of every overlay file, oldest first."""
    out = []
    for name in os.listdir(directory):
        m = NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    out.sort()
    return out


def encode_header(created_ns: int) -> bytes:
    prefix = OVERLAY_HEADER.pack(OVERLAY_MAGIC, OVERLAY_VERSION, 0, 0, created_ns)
    return prefix + blake3.blake3(prefix).digest(CHECKSUM_LEN)


def decode_header(buf) -> int:
    mv = memoryview(buf)
    if len(mv) < OVERLAY_HEADER_SIZE:
        raise FormatError(f"overlay header truncated ({len(mv)} of {OVERLAY_HEADER_SIZE} bytes)")
    magic, version, flags, reserved, created_ns = OVERLAY_HEADER.unpack_from(mv, 0)
    if magic != OVERLAY_MAGIC:
        raise FormatError(f"not an overlay (magic {bytes(magic)!r})")
    if blake3.blake3(mv[:24]).digest(CHECKSUM_LEN) != mv[24:32]:
        raise FormatError("overlay header checksum mismatch")
    if version != OVERLAY_VERSION:
        raise FormatError(f"overlay version {version} is not supported (this build reads {OVERLAY_VERSION})")
    if flags or reserved:
        raise FormatError(f"overlay uses unknown features (flags {flags:#x}, reserved {reserved:#x})")
    return created_ns


def encode_entry(etype: int, *body_parts) -> bytes:
    return b"".join(encode_entry_parts(etype, *body_parts))


def encode_entry_parts(etype: int, *body_parts) -> list:
    """The entry as [header, *body_parts]: written with one writev, so a
    chunk's bytes are not copied into a joined buffer first."""
    parts = [memoryview(p).cast("B") for p in body_parts]
    length = sum(p.nbytes for p in parts)
    if length > MAX_ENTRY_BODY:
        raise ValueError(f"overlay entry body of {length} bytes exceeds {MAX_ENTRY_BODY}")
    prefix = ENTRY_PREFIX.pack(ENTRY_MAGIC, etype, ENTRY_VERSION, 0, length)
    h = blake3.blake3(prefix)
    for p in parts:
        h.update(p)
    return [prefix + h.digest(CHECKSUM_LEN), *parts]


class OverlayRecord(NamedTuple):
    seq: int
    rtype: int
    payload: bytes


class Overlay:
    """One overlay file and its in-memory index."""

    def __init__(self, path: str, created_ns: int):
        self.path = path
        self.name = os.path.basename(path)
        self.created_ns = created_ns
        self.chunks: dict[str, tuple[int, int]] = {}    # chunk id -> (data offset, data length)
        self.records: list[OverlayRecord] = []
        self.sealed = False
        self.size = OVERLAY_HEADER_SIZE
        # bytes known durable: the size at the last fdatasync that succeeded
        # (the whole file, for one found on disk at open)
        self.synced_size = OVERLAY_HEADER_SIZE
        self.fd: int | None = None                       # write fd, newest overlay only
        self._direct: CacheBypass | None = None          # its O_DIRECT descriptor (large chunk entries)

    @property
    def first_seq(self) -> int | None:
        return self.records[0].seq if self.records else None

    @property
    def last_seq(self) -> int | None:
        return self.records[-1].seq if self.records else None

    @property
    def has_content(self) -> bool:
        return bool(self.chunks or self.records)

    # ------------------------------------------------------------------ create / scan
    @classmethod
    def create(cls, directory: str, created_ns: int, fsync: bool = True) -> "Overlay":
        path = os.path.join(directory, overlay_name(created_ns))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, encode_header(created_ns))
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        if fsync:
            fsync_dir(directory)
        ov = cls(path, created_ns)
        ov.fd = fd
        ov._direct = CacheBypass(path)
        return ov

    @classmethod
    def scan(cls, path: str, created_ns: int) -> tuple["Overlay", int, str]:
        """Decode a whole overlay file.  Returns (overlay, end, status): `end` is
        the offset past the last good entry, status "ok" or "torn".  Raises
        FormatError on a bad header or an intact entry this build cannot read."""
        with open(path, "rb") as f:
            data = f.read()
        header_ns = decode_header(data)
        if header_ns != created_ns:
            raise FormatError(f"{path}: header created_ns {header_ns} does not match the file name")
        ov = cls(path, created_ns)
        mv = memoryview(data)
        n = len(mv)
        o = OVERLAY_HEADER_SIZE
        status = "ok"
        while o < n:
            r = n - o
            if r < ENTRY_HEADER_SIZE:
                status = "torn"
                break
            magic, etype, version, _res, length = ENTRY_PREFIX.unpack_from(mv, o)
            if magic != ENTRY_MAGIC or length > MAX_ENTRY_BODY or r < ENTRY_HEADER_SIZE + length:
                status = "torn"
                break
            body = mv[o + ENTRY_HEADER_SIZE:o + ENTRY_HEADER_SIZE + length]
            h = blake3.blake3(mv[o:o + 12])
            h.update(body)
            if h.digest(CHECKSUM_LEN) != mv[o + 12:o + 20]:
                status = "torn"
                break
            if version != ENTRY_VERSION:
                raise FormatError(f"{path}: entry at {o} has unsupported version {version}")
            if ov.sealed:
                raise FormatError(f"{path}: entry at {o} follows the SEAL entry")
            if etype == E_CHUNK:
                if length < 32:
                    raise FormatError(f"{path}: CHUNK entry at {o} shorter than a digest")
                ov.chunks[bytes(body[:32]).hex()] = (o + ENTRY_HEADER_SIZE + 32, length - 32)
            elif etype == E_RECORD:
                if length < RECORD_PREFIX.size:
                    raise FormatError(f"{path}: RECORD entry at {o} shorter than its prefix")
                seq, rtype, _r, _flags = RECORD_PREFIX.unpack_from(body, 0)
                if ov.records and seq != ov.records[-1].seq + 1:
                    raise FormatError(f"{path}: record seq {seq} at {o} follows {ov.records[-1].seq}")
                ov.records.append(OverlayRecord(seq, rtype, bytes(body[RECORD_PREFIX.size:])))
            elif etype == E_SEAL:
                ov.sealed = True
            else:
                raise FormatError(f"{path}: entry at {o} has unknown type {etype}")
            o += ENTRY_HEADER_SIZE + length
        ov.size = ov.synced_size = o
        return ov, o, status

    def open_for_append(self) -> None:
        """Writes go at `size` (the file's size after `scan`, and `truncate`
        of a torn tail), by pwrite: not O_APPEND, which Linux lets override
        pwrite's offset."""
        self.fd = os.open(self.path, os.O_WRONLY)
        self._direct = CacheBypass(self.path)

    # ------------------------------------------------------------------ writing (newest overlay)
    def append_chunk(self, digest_hex: str, data) -> None:
        digest = bytes.fromhex(digest_hex)
        parts = encode_entry_parts(E_CHUNK, digest, data)
        start = self.size
        self._append_parts(parts)
        self.chunks[digest_hex] = (start + ENTRY_HEADER_SIZE + 32, self.size - start - ENTRY_HEADER_SIZE - 32)

    def append_record(self, seq: int, rtype: int, payload: bytes) -> None:
        if self.records and seq != self.records[-1].seq + 1:
            raise ValueError(f"overlay record seq {seq} does not follow {self.records[-1].seq}")
        self._append(encode_entry(E_RECORD, RECORD_PREFIX.pack(seq, rtype, 0, 0), payload))
        self.records.append(OverlayRecord(seq, rtype, bytes(payload)))

    def seal(self, fsync: bool = True) -> None:
        body = SEAL_BODY.pack(time.time_ns(), len(self.chunks), len(self.records))
        self._append(encode_entry(E_SEAL, body))
        if fsync:
            os.fdatasync(self.fd)
            self.synced_size = self.size
        self.sealed = True
        self.close()

    def sync(self) -> None:
        if self.fd is not None:
            size = self.size
            os.fdatasync(self.fd)
            self.synced_size = max(self.synced_size, size)

    def truncate(self, end: int, fsync: bool = True) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(end)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        self.size = end
        self.synced_size = min(self.synced_size, end)

    def _append(self, entry: bytes) -> None:
        self._append_parts([entry])

    def _append_parts(self, parts: list) -> None:
        if self.fd is None:
            raise RuntimeError(f"overlay {self.name} is not open for writing")
        if self.sealed:
            raise RuntimeError(f"overlay {self.name} is sealed")
        total = sum(memoryview(p).nbytes for p in parts)
        # a large chunk's whole blocks bypass the page cache (fsutil): the
        # vault fdatasyncs them before its ACK and seldom reads them back
        self._direct.write(self.fd, self.size, parts)
        self.size += total

    # ------------------------------------------------------------------ reading
    def read_chunk_at(self, offset: int, length: int) -> bytes:
        """Raw chunk bytes (unverified).  FileNotFoundError if the overlay was deleted."""
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        if len(data) != length:
            raise FormatError(f"{self.path}: chunk at {offset} truncated ({len(data)} of {length} bytes)")
        return data

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


