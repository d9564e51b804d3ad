"""Pure-Python twin of `ext/_chunker.pyx`: FastCDC-style content-defined chunking.

The format (gear table, masks, cut rule) is specified in docs/format/chunking.md.
Boundaries must be byte-identical to the compiled module; tests/test_chunker.py
checks that with hypothesis and with frozen known answers.  This twin is
100-300x slower than the compiled module (docs/performance.md); it exists so
airlock runs without a C compiler and so the algorithm can be read in one page.
The compiled scan unrolls the same one-byte step; the boundaries are the same.
"""
from __future__ import annotations

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

_M64 = (1 << 64) - 1
_AVG_MIN = 1 << 6
_AVG_MAX = 1 << 30
_MAX_MAX = 1 << 31


def _splitmix64_table(seed: int) -> tuple[int, ...]:
    state = seed
    out = []
    for _ in range(256):
        state = (state + 0x9E3779B97F4A7C15) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        out.append(z ^ (z >> 31))
    return tuple(out)


_GEAR = _splitmix64_table(GEAR_SEED)


def gear_table() -> tuple[int, ...]:
    """The 256 gear values (uint64)."""
    return _GEAR


def validate_params(min_size: int, avg_size: int, max_size: int) -> None:
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


def masks(avg_size: int) -> tuple[int, int]:
    """(MASK_S, MASK_L): top log2(avg)+2 bits and top log2(avg)-2 bits of a uint64."""
    bits = avg_size.bit_length() - 1
    s, l = bits + 2, bits - 2
    return (((1 << s) - 1) << (64 - s)), (((1 << l) - 1) << (64 - l))


def _scan(data, pos: int, h: int, min_size: int, avg_size: int, max_size: int,
          mask_s: int, mask_l: int) -> tuple[int, int, int]:
    """Scan `data` (starts at a chunk boundary) from index `pos` (>= min_size) with hash `h`.

    Returns (cut, pos, h): cut is the chunk length or -1 (need more data); on -1,
    (pos, h) is where to resume once more bytes are appended.
    """
    n = len(data)
    end = n if n < max_size else max_size
    barrier = avg_size if avg_size < end else end
    gear = _GEAR
    i = pos
    while i < barrier:
        h = ((h << 1) + gear[data[i]]) & _M64
        if not h & mask_s:
            return i + 1, i + 1, h
        i += 1
    while i < end:
        h = ((h << 1) + gear[data[i]]) & _M64
        if not h & mask_l:
            return i + 1, i + 1, h
        i += 1
    if n >= max_size:
        return max_size, max_size, h
    return -1, i, h


def cut_point(data, min_size: int = MIN_SIZE, avg_size: int = AVG_SIZE, max_size: int = MAX_SIZE) -> int:
    """Length of the first chunk of `data`, or -1 if more data is needed to decide."""
    validate_params(min_size, avg_size, max_size)
    mask_s, mask_l = masks(avg_size)
    return _scan(memoryview(data).cast("B"), min_size, 0, min_size, avg_size, max_size, mask_s, mask_l)[0]


def chunk_boundaries(data, min_size: int = MIN_SIZE, avg_size: int = AVG_SIZE,
                     max_size: int = MAX_SIZE) -> list[int]:
    """End offsets of all chunks of a complete buffer (last == len(data)); [] for empty input."""
    validate_params(min_size, avg_size, max_size)
    mask_s, mask_l = masks(avg_size)
    mv = memoryview(data).cast("B")
    n = len(mv)
    out = []
    start = 0
    while start < n:
        cut = _scan(mv[start:], min_size, 0, min_size, avg_size, max_size, mask_s, mask_l)[0]
        start = n if cut < 0 else start + cut
        out.append(start)
    return out


def chunk_and_digest(data, min_size: int = MIN_SIZE, avg_size: int = AVG_SIZE,
                     max_size: int = MAX_SIZE) -> list[tuple[int, int, bytes]]:
    """(offset, length, blake3 digest) of every chunk of a complete buffer."""
    mv = memoryview(data).cast("B")
    out = []
    start = 0
    for end in chunk_boundaries(mv, min_size, avg_size, max_size):
        out.append((start, end - start, blake3.blake3(mv[start:end], max_threads=BLAKE3_THREADS).digest()))
        start = end
    return out


class StreamChunker:
    """Chunks a stream fed in arbitrary pieces; same chunks as chunk_boundaries on the whole.

    Holds fewer than max_size bytes between calls (a full max_size forces a cut),
    so the buffer never exceeds max_size + len(data) of the last update.
    """

    def __init__(self, min_size: int = MIN_SIZE, avg_size: int = AVG_SIZE, max_size: int = MAX_SIZE):
        validate_params(min_size, avg_size, max_size)
        self.min_size = min_size
        self.avg_size = avg_size
        self.max_size = max_size
        self._mask_s, self._mask_l = masks(avg_size)
        self._buf = bytearray()
        self._pos = min_size     # resume index within the unfinished chunk
        self._hash = 0
        self._finished = False

    @property
    def buffered(self) -> int:
        """Bytes held for the unfinished chunk."""
        return len(self._buf)

    def update(self, data) -> list[tuple[bytes, bytes]]:
        """Feed bytes; return the chunks completed by them as (blake3 digest, chunk bytes)."""
        if self._finished:
            raise ValueError("StreamChunker.update after finish")
        buf = self._buf
        buf += data
        out = []
        start = 0
        n = len(buf)
        mv = memoryview(buf)
        try:
            while True:
                cut, pos, h = _scan(mv[start:], self._pos, self._hash, self.min_size, self.avg_size,
                                    self.max_size, self._mask_s, self._mask_l)
                if cut < 0:
                    self._pos, self._hash = pos, h
                    break
                chunk = bytes(mv[start:start + cut])
                out.append((blake3.blake3(chunk, max_threads=BLAKE3_THREADS).digest(), chunk))
                start += cut
                self._pos, self._hash = self.min_size, 0
                if start == n:
                    break
        finally:
            mv.release()
        if start:
            del buf[:start]
        return out

    def finish(self) -> list[tuple[bytes, bytes]]:
        """Flush the remainder as the last chunk ([] if nothing is buffered)."""
        if self._finished:
            return []
        self._finished = True
        if not self._buf:
            return []
        chunk = bytes(self._buf)
        self._buf = bytearray()
        return [(blake3.blake3(chunk, max_threads=BLAKE3_THREADS).digest(), chunk)]
