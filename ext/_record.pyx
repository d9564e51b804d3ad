# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled log record framing — twin of airlock/log/_record_py.py.

Format (docs/format/log.md): a 28-byte little-endian header
    magic "ALRC" | version u8 | rtype u8 | flags u16 | length u32 | seq u64 | checksum 8
followed by `length` payload bytes; checksum = BLAKE3(header[0:20] ‖ payload)[:8].

Invariants:
  * encodings and decode results are identical to the pure-Python twin;
  * decode_records never raises on a damaged tail (bad magic, oversized or
    short length, checksum mismatch -> status "torn"); an intact record with an
    unknown version raises FormatError;
  * payloads are bounded by MAX_PAYLOAD on both encode and decode.

What lives here: header packing/unpacking with direct byte access (no struct
module, no intermediate tuples).  What stays in Python: BLAKE3 (the blake3
package) and FormatError, which is shared with the twin so that both raise the
same type.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memcmp
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

from collections import namedtuple

import blake3

from airlock.log._record_py import FormatError

__all__ = [
    "HEADER_SIZE", "RECORD_MAGIC", "RECORD_VERSION", "MAX_PAYLOAD", "MAX_SEQ",
    "FormatError", "Record", "encode_record", "decode_records",
]

RECORD_MAGIC = b"ALRC"
RECORD_VERSION = 1
HEADER_SIZE = 28                   # bytes: magic 4, version 1, rtype 1, flags 2, length 4, seq 8, checksum 8
MAX_PAYLOAD = 64 * 1024 * 1024     # bytes; bounds memory per record and what a torn length can claim
MAX_SEQ = (1 << 64) - 1

cdef enum:
    _HEADER = 28
    _CHECKSUM_AT = 20
    _CHECKSUM_LEN = 8
cdef uint32_t _MAX_PAYLOAD = MAX_PAYLOAD
cdef const char* _MAGIC = b"ALRC"

Record = namedtuple("Record", "seq rtype flags payload offset length")
Record.__doc__ = ("One decoded record; `offset` is where it starts in the buffer, "
                  "`length` = HEADER_SIZE + len(payload).")


cdef inline void _put_le(unsigned char* p, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        p[i] = <unsigned char>(v & 0xFF)
        v >>= 8


cdef inline uint64_t _get_le(const unsigned char* p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline const unsigned char[::1] _bytes_view(data) except *:
    try:
        return data
    except (TypeError, ValueError):
        return memoryview(data).cast("B")


def encode_record(seq, rtype, payload, flags=0):
    """Frame one record (header + payload)."""
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number out of range: {seq}")
    if not 0 <= rtype <= 0xFF:
        raise ValueError(f"record type out of range: {rtype}")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"record flags out of range: {flags}")
    cdef const unsigned char[::1] pv = _bytes_view(payload)
    cdef Py_ssize_t n = pv.shape[0]
    if n > MAX_PAYLOAD:
        raise ValueError(f"payload of {n} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    out = PyBytes_FromStringAndSize(NULL, _HEADER + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    memcpy(p, _MAGIC, 4)
    p[4] = <unsigned char>RECORD_VERSION
    p[5] = <unsigned char>rtype
    _put_le(p + 6, <uint64_t>flags, 2)
    _put_le(p + 8, <uint64_t>n, 4)
    _put_le(p + 12, <uint64_t>seq, 8)
    if n:
        memcpy(p + _HEADER, &pv[0], n)
    ov = memoryview(out)
    h = blake3.blake3(ov[:_CHECKSUM_AT])
    h.update(ov[_HEADER:])
    ov.release()
    digest = h.digest(_CHECKSUM_LEN)
    memcpy(p + _CHECKSUM_AT, PyBytes_AS_STRING(digest), _CHECKSUM_LEN)
    return out


def decode_records(buf, Py_ssize_t offset=0):
    """Parse consecutive records of buf[offset:].

    Returns (records, end, status): `end` is the offset just past the last good
    record; status is "ok" if that is the end of buf, else "torn".  Garbage never
    raises; an intact record with an unknown version raises FormatError.
    """
    mv = memoryview(buf).cast("B")
    cdef const unsigned char[::1] v = _bytes_view(mv)
    cdef Py_ssize_t n = v.shape[0]
    if not 0 <= offset <= n:
        raise ValueError(f"offset {offset} outside buffer of {n} bytes")
    cdef const unsigned char* base = &v[0] if n else NULL
    cdef const unsigned char* p
    cdef Py_ssize_t o = offset
    cdef Py_ssize_t r
    cdef uint32_t length
    cdef unsigned int version
    records = []
    while True:
        r = n - o
        if r == 0:
            return records, o, "ok"
        if r < _HEADER:
            break
        p = base + o
        if memcmp(p, _MAGIC, 4) != 0:
            break
        length = <uint32_t>_get_le(p + 8, 4)
        if length > _MAX_PAYLOAD or r < _HEADER + <Py_ssize_t>length:
            break
        h = blake3.blake3(mv[o:o + _CHECKSUM_AT])
        if length:
            h.update(mv[o + _HEADER:o + _HEADER + length])
        digest = h.digest(_CHECKSUM_LEN)
        if memcmp(PyBytes_AS_STRING(digest), p + _CHECKSUM_AT, _CHECKSUM_LEN) != 0:
            break
        version = p[4]
        if version != RECORD_VERSION:
            raise FormatError(f"log record at offset {o} has unsupported version {version} "
                              f"(this build reads version {RECORD_VERSION})")
        payload = PyBytes_FromStringAndSize(<const char*>(p + _HEADER), length)
        records.append(Record(_get_le(p + 12, 8), p[5], _get_le(p + 6, 2), payload, o, _HEADER + length))
        o += _HEADER + length
    return records, o, "torn"
