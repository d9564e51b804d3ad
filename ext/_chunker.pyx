# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled content-defined chunker (FastCDC-style) — twin of airlock/chunk/_chunker_py.py.

Algorithm: gear rolling hash h = (h << 1) + GEAR[byte] (mod 2**64) with
FastCDC 2020 normalised chunking: the first `min_size` bytes of a chunk are
skipped, the strict mask MASK_S (top log2(avg)+2 bits) is used while the chunk
is shorter than `avg_size`, the loose mask MASK_L (top log2(avg)-2 bits) after
that, and a cut is forced at `max_size`.  Reference: Xia et al., "The Design
of Fast Content-Defined Chunking for Data Deduplication Based Storage
Systems", IEEE TPDS 2020.  Byte-level specification, gear table seed and
worked numbers: docs/format/chunking.md.

Invariants:
  * boundaries are byte-identical to the pure-Python twin (hypothesis tests and
    tests/known_answers/chunker.json);
  * the hash restarts at every boundary, so streaming in any split gives the
    same chunks as chunking the whole buffer;
  * StreamChunker holds < max_size bytes between calls.

What lives here: the gear table (generated at import from the documented
splitmix64 seed, identical to the twin) and the scan loop, which runs with the
GIL released over a const unsigned char pointer into any C-contiguous buffer
(bytes, bytearray, memoryview).  What stays in Python: parameter validation,
list building and BLAKE3 (the blake3 package, which itself releases the GIL
for large inputs).
"""
from libc.stdint cimport uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize

import blake3

__all__ = [
    "MIN_SIZE", "AVG_SIZE", "MAX_SIZE", "GEAR_SEED",
    "gear_table", "validate_params", "masks",
    "cut_point", "chunk_boundaries", "chunk_and_digest", "StreamChunker",
]

MIN_SIZE = 256 * 1024        # bytes; no content-defined cut before this (bounds per-chunk overhead)
AVG_SIZE = 1024 * 1024       # bytes; target mean chunk size, must be a power of two (mask width)
MAX_SIZE = 4 * 1024 * 1024   # bytes; forced cut (bounds memory per chunk and worst-case latency)

GEAR_SEED = 0x6169726C6F636B21   # ASCII "airlock!" big-endian; splitmix64 seed of the gear table
BLAKE3_THREADS = 1               # chunks are hashed one per call; parallelism comes from uploads

cdef Py_ssize_t _AVG_MIN = 1 << 6
cdef Py_ssize_t _AVG_MAX = 1 << 30
cdef Py_ssize_t _MAX_MAX = 1 << 31

cdef uint64_t GEAR[256]


cdef void _init_gear(uint64_t seed) noexcept:
    cdef uint64_t state = seed
    cdef uint64_t z
    cdef int i
    for i in range(256):
        state = state + <uint64_t>0x9E3779B97F4A7C15ULL
        z = state
        z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
        z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
        GEAR[i] = z ^ (z >> 31)


_init_gear(<uint64_t>GEAR_SEED)


def gear_table():
    """The 256 gear values (uint64)."""
    return tuple([GEAR[i] for i in range(256)])


def validate_params(min_size, avg_size, max_size):
    """Raise ValueError unless 1 <= min < avg < max, avg a power of two in [2**6, 2**30], max <= 2**31."""
    for name, v in (("min_size", min_size), ("avg_size", avg_size), ("max_size", max_size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if not 1 <= min_size < avg_size < max_size:
        raise ValueError(f"need 1 <= min_size < avg_size < max_size, got {min_size}/{avg_size}/{max_size}")
    if avg_size & (avg_size - 1) or not _AVG_MIN <= avg_size <= _AVG_MAX:
        raise ValueError(f"avg_size must be a power of two in [{_AVG_MIN}, {_AVG_MAX}], got {avg_size}")
    if max_size > _MAX_MAX:
        raise ValueError(f"max_size must be <= {_MAX_MAX}, got {max_size}")


def masks(avg_size):
    """(MASK_S, MASK_L): top log2(avg)+2 bits and top log2(avg)-2 bits of a uint64."""
    bits = avg_size.bit_length() - 1
    s, l = bits + 2, bits - 2
    return (((1 << s) - 1) << (64 - s)), (((1 << l) - 1) << (64 - l))


cdef struct Params:
    Py_ssize_t min_size
    Py_ssize_t avg_size
    Py_ssize_t max_size
    uint64_t mask_s
    uint64_t mask_l


cdef Params _params(min_size, avg_size, max_size) except *:
    validate_params(min_size, avg_size, max_size)
    cdef Params p
    p.min_size = min_size
    p.avg_size = avg_size
    p.max_size = max_size
    ms, ml = masks(avg_size)
    p.mask_s = ms
    p.mask_l = ml
    return p


cdef Py_ssize_t _scan(const unsigned char* d, Py_ssize_t n, Py_ssize_t* pos, uint64_t* hp,
                      const Params* p) noexcept nogil:
    """Chunk length of d[0..n) (a chunk boundary at 0), resuming at *pos with hash *hp.

    Returns -1 if more data is needed; then *pos and *hp hold the resume state.
    """
    cdef Py_ssize_t end = n if n < p.max_size else p.max_size
    cdef Py_ssize_t barrier = p.avg_size if p.avg_size < end else end
    cdef Py_ssize_t i = pos[0]
    cdef uint64_t h = hp[0]
    cdef uint64_t mask_s = p.mask_s
    cdef uint64_t mask_l = p.mask_l
    while i < barrier:
        h = (h << 1) + GEAR[d[i]]
        if (h & mask_s) == 0:
            return i + 1
        i += 1
    while i < end:
        h = (h << 1) + GEAR[d[i]]
        if (h & mask_l) == 0:
            return i + 1
        i += 1
    if n >= p.max_size:
        return p.max_size
    pos[0] = i
    hp[0] = h
    return -1


cdef inline const unsigned char[::1] _bytes_view(data) except *:
    try:
        return data
    except (TypeError, ValueError):
        return memoryview(data).cast("B")


def cut_point(data, min_size=MIN_SIZE, avg_size=AVG_SIZE, max_size=MAX_SIZE):
    """Length of the first chunk of `data`, or -1 if more data is needed to decide."""
    cdef Params p = _params(min_size, avg_size, max_size)
    cdef const unsigned char[::1] v = _bytes_view(data)
    cdef Py_ssize_t n = v.shape[0]
    cdef Py_ssize_t pos = p.min_size
    cdef uint64_t h = 0
    cdef Py_ssize_t cut
    if n == 0:
        return -1
    with nogil:
        cut = _scan(&v[0], n, &pos, &h, &p)
    return cut


cdef list _boundaries(const unsigned char[::1] v, const Params* p):
    cdef Py_ssize_t n = v.shape[0]
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t pos, cut
    cdef uint64_t h
    cdef const unsigned char* base
    out = []
    if n == 0:
        return out
    base = &v[0]
    while start < n:
        pos = p.min_size
        h = 0
        with nogil:
            cut = _scan(base + start, n - start, &pos, &h, p)
        start = n if cut < 0 else start + cut
        out.append(start)
    return out


def chunk_boundaries(data, min_size=MIN_SIZE, avg_size=AVG_SIZE, max_size=MAX_SIZE):
    """End offsets of all chunks of a complete buffer (last == len(data)); [] for empty input."""
    cdef Params p = _params(min_size, avg_size, max_size)
    return _boundaries(_bytes_view(data), &p)


def chunk_and_digest(data, min_size=MIN_SIZE, avg_size=AVG_SIZE, max_size=MAX_SIZE):
    """(offset, length, blake3 digest) of every chunk of a complete buffer."""
    cdef Params p = _params(min_size, avg_size, max_size)
    mv = memoryview(data).cast("B")
    out = []
    start = 0
    for end in _boundaries(_bytes_view(mv), &p):
        out.append((start, end - start, blake3.blake3(mv[start:end], max_threads=BLAKE3_THREADS).digest()))
        start = end
    return out


cdef class StreamChunker:
    """Chunks a stream fed in arbitrary pieces; same chunks as chunk_boundaries on the whole.

    Holds fewer than max_size bytes between calls (a full max_size forces a cut),
    so the buffer never exceeds max_size + len(data) of the last update.
    Not thread-safe; the scan itself runs without the GIL.
    """
    cdef Params _p
    cdef bytearray _buf
    cdef Py_ssize_t _pos
    cdef uint64_t _hash
    cdef bint _finished

    def __init__(self, min_size=MIN_SIZE, avg_size=AVG_SIZE, max_size=MAX_SIZE):
        self._p = _params(min_size, avg_size, max_size)
        self._buf = bytearray()
        self._pos = self._p.min_size
        self._hash = 0
        self._finished = False

    @property
    def min_size(self):
        return self._p.min_size

    @property
    def avg_size(self):
        return self._p.avg_size

    @property
    def max_size(self):
        return self._p.max_size

    @property
    def buffered(self):
        """Bytes held for the unfinished chunk."""
        return len(self._buf)

    cdef Py_ssize_t _drain(self, list out) except -1:
        # Scan the buffer, append completed chunks to `out`, return bytes consumed.
        # The memoryview lives only in this frame, so the caller may resize _buf after.
        cdef const unsigned char[::1] v = self._buf
        cdef Py_ssize_t n = v.shape[0]
        cdef Py_ssize_t start = 0
        cdef Py_ssize_t cut, pos
        cdef uint64_t h
        cdef const unsigned char* base
        if n == 0:
            return 0
        base = &v[0]
        while start < n:
            pos = self._pos
            h = self._hash
            with nogil:
                cut = _scan(base + start, n - start, &pos, &h, &self._p)
            if cut < 0:
                self._pos = pos
                self._hash = h
                break
            chunk = PyBytes_FromStringAndSize(<const char*>(base + start), cut)
            out.append((blake3.blake3(chunk, max_threads=BLAKE3_THREADS).digest(), chunk))
            start += cut
            self._pos = self._p.min_size
            self._hash = 0
        return start

    def update(self, data):
        """Feed bytes; return the chunks completed by them as (blake3 digest, chunk bytes)."""
        if self._finished:
            raise ValueError("StreamChunker.update after finish")
        self._buf += data
        out = []
        cdef Py_ssize_t consumed = self._drain(out)
        if consumed:
            del self._buf[:consumed]
        return out

    def finish(self):
        """Flush the remainder as the last chunk ([] if nothing is buffered)."""
        if self._finished:
            return []
        self._finished = True
        if not self._buf:
            return []
        chunk = bytes(self._buf)
        self._buf = bytearray()
        return [(blake3.blake3(chunk, max_threads=BLAKE3_THREADS).digest(), chunk)]
