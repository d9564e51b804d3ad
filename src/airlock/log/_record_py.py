"""Pure-Python twin of `ext/_record.pyx`: log record framing.

Byte layout, decoding rules and a worked example: docs/format/log.md.
Encodings and decode results must be identical to the compiled module
(tests/test_log.py checks both, plus frozen vectors in tests/known_answers/record.json).
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import blake3

try:  # the project-wide exception tree; kept importable from airlock.log.record either way
    from airlock.errors import FormatError
except ImportError:  # pragma: no cover - errors.py is being written concurrently
    class FormatError(ValueError):
        """A persisted structure has bad magic, an unknown version or is malformed."""

__all__ = [
    "HEADER_SIZE", "RECORD_MAGIC", "RECORD_VERSION", "MAX_PAYLOAD", "MAX_SEQ",
    "FormatError", "Record", "encode_record", "decode_records",
]

RECORD_MAGIC = b"ALRC"
RECORD_VERSION = 1
HEADER_SIZE = 28                   # bytes: magic 4, version 1, rtype 1, flags 2, length 4, seq 8, checksum 8
MAX_PAYLOAD = 64 * 1024 * 1024     # bytes; bounds memory per record and what a torn length can claim
MAX_SEQ = (1 << 64) - 1

_PREFIX = struct.Struct("<4sBBHIQ")   # header bytes 0..20, covered by the checksum
_CHECKSUM_AT = 20
_CHECKSUM_LEN = 8


class Record(NamedTuple):
    """One decoded record; `offset` is where it starts in the buffer, `length` = HEADER_SIZE + len(payload)."""
    seq: int
    rtype: int
    flags: int
    payload: bytes
    offset: int
    length: int


def encode_record(seq: int, rtype: int, payload, flags: int = 0) -> bytes:
    """Frame one record (header + payload)."""
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number out of range: {seq}")
    if not 0 <= rtype <= 0xFF:
        raise ValueError(f"record type out of range: {rtype}")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"record flags out of range: {flags}")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    prefix = _PREFIX.pack(RECORD_MAGIC, RECORD_VERSION, rtype, flags, len(payload), seq)
    h = blake3.blake3(prefix)
    h.update(payload)
    return b"".join((prefix, h.digest(_CHECKSUM_LEN), payload))


def decode_records(buf, offset: int = 0) -> tuple[list[Record], int, str]:
    """Parse consecutive records of buf[offset:].

    Returns (records, end, status): `end` is the offset just past the last good
    record; status is "ok" if that is the end of buf, else "torn".  Garbage never
    raises; an intact record with an unknown version raises FormatError.
    """
    mv = memoryview(buf).cast("B")
    n = len(mv)
    if not 0 <= offset <= n:
        raise ValueError(f"offset {offset} outside buffer of {n} bytes")
    records = []
    o = offset
    try:
        while True:
            r = n - o
            if r == 0:
                return records, o, "ok"
            if r < HEADER_SIZE:
                break
            magic, version, rtype, flags, length, seq = _PREFIX.unpack_from(mv, o)
            if magic != RECORD_MAGIC or length > MAX_PAYLOAD or r < HEADER_SIZE + length:
                break
            h = blake3.blake3(mv[o:o + _CHECKSUM_AT])
            h.update(mv[o + HEADER_SIZE:o + HEADER_SIZE + length])
            if h.digest(_CHECKSUM_LEN) != mv[o + _CHECKSUM_AT:o + HEADER_SIZE]:
                break
            if version != RECORD_VERSION:
                raise FormatError(f"log record at offset {o} has unsupported version {version} "
                                  f"(this build reads version {RECORD_VERSION})")
            payload = bytes(mv[o + HEADER_SIZE:o + HEADER_SIZE + length])
            records.append(Record(seq, rtype, flags, payload, o, HEADER_SIZE + length))
            o += HEADER_SIZE + length
        return records, o, "torn"
    finally:
        mv.release()
