"""Log record framing (compiled module if it loaded, else the pure-Python twin)
plus the segment header, which is not on the hot path and lives here only.

Formats: docs/format/log.md.  `IMPLEMENTATION` says which record codec is live
("cython" or "python"); AIRLOCK_NO_EXTENSIONS=1 forces the twin.
"""
import os
import struct

import blake3

if os.environ.get("AIRLOCK_NO_EXTENSIONS", "") not in ("", "0"):
    from airlock.log._record_py import *  # noqa: F401,F403
    from airlock.log._record_py import __all__ as _names
    IMPLEMENTATION = "python"
else:
    try:
        from airlock.log._record import *  # noqa: F401,F403
        from airlock.log._record import __all__ as _names
        IMPLEMENTATION = "cython"
    except ImportError:
        from airlock.log._record_py import *  # noqa: F401,F403
        from airlock.log._record_py import __all__ as _names
        IMPLEMENTATION = "python"

from airlock.log._record_py import FormatError  # noqa: E402  (same class in both codecs)

SEGMENT_MAGIC = b"ALOGSEG\x00"
SEGMENT_VERSION = 1
SEGMENT_HEADER_SIZE = 32           # bytes: magic 8, version 2, flags 2, reserved 4, first_seq 8, checksum 8
_SEGMENT_PREFIX = struct.Struct("<8sHHIQ")

__all__ = [*_names, "IMPLEMENTATION", "SEGMENT_MAGIC", "SEGMENT_VERSION", "SEGMENT_HEADER_SIZE",
           "encode_segment_header", "decode_segment_header"]


def encode_segment_header(first_seq: int) -> bytes:
    """The 32-byte header of a segment whose first record has sequence number `first_seq`."""
    if not 1 <= first_seq <= MAX_SEQ:  # noqa: F405
        raise ValueError(f"first sequence number out of range: {first_seq}")
    prefix = _SEGMENT_PREFIX.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, 0, first_seq)
    return prefix + blake3.blake3(prefix).digest(8)


def decode_segment_header(buf) -> int:
    """Validate a segment header and return its first sequence number; FormatError if invalid."""
    mv = memoryview(buf).cast("B")
    if len(mv) < SEGMENT_HEADER_SIZE:
        raise FormatError(f"segment header truncated ({len(mv)} of {SEGMENT_HEADER_SIZE} bytes)")
    magic, version, flags, reserved, first_seq = _SEGMENT_PREFIX.unpack_from(mv, 0)
    if magic != SEGMENT_MAGIC:
        raise FormatError(f"not a log segment (magic {bytes(magic)!r})")
    if blake3.blake3(mv[:24]).digest(8) != mv[24:32]:
        raise FormatError("log segment header checksum mismatch")
    if version != SEGMENT_VERSION:
        raise FormatError(f"log segment version {version} is not supported "
                          f"(this build reads version {SEGMENT_VERSION})")
    if flags or reserved:
        raise FormatError(f"log segment uses unknown features (flags {flags:#x}, reserved {reserved:#x})")
    if first_seq < 1:
        raise FormatError("log segment first sequence number is 0")
    return first_seq
