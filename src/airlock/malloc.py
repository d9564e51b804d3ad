"""The C allocator's settings for airlock's server processes (gateway
leader, gateway workers, vault).

A large PUT moves every byte through buffers of 64 KiB to 4 MiB (socket
reads coalesced to 1 MiB, chunks, link frames, the gateway channel), freed
as soon as they are passed on.  glibc's malloc serves buffers over its
dynamic mmap threshold with fresh mmaps and gives a heap's free top back to
the kernel once it exceeds the trim threshold, so in steady state most of
those buffers land on pages the kernel has to fault in and zero again.  On
the 2-core benchmark VM that fault-and-zero is the largest system-CPU item
left in a 64 MiB PUT that a gateway worker receives (docs/performance.md,
2026-11-26).  Keeping up to TRIM_THRESHOLD of freed memory per heap, and
serving buffers up to MMAP_THRESHOLD from it, lets them reuse warm pages.
ARENA_MAX bounds how many heaps (one per thread by default, up to 8 per
core) may each keep that much: the threads that allocate large buffers run
Python code and mostly hold the GIL anyway.

Peak RSS stays bounded: see `benchmarks/rss_5gib.py` figures in
docs/performance.md.  Only glibc is tuned (other C libraries are left as
they are); `AIRLOCK_MALLOC_TUNE=0` in the environment leaves glibc's
defaults (a diagnostic switch, used for A/B measurements).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger("airlock.malloc")

M_TRIM_THRESHOLD = -1        # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

TRIM_THRESHOLD = 32 << 20    # bytes of free memory a heap keeps at its top
MMAP_THRESHOLD = 8 << 20     # bytes; larger requests get their own mmap (chunks are at most 4 MiB)
ARENA_MAX = 4                # heaps per process

_done: bool | None = None


def tune() -> bool:
    """Apply the settings once per process; True if they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("AIRLOCK_MALLOC_TUNE", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, ARENA_MAX), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not ok:
        log.warning("mallopt refused airlock's allocator settings; glibc's defaults stay")
    _done = ok
    return ok


# ---------------------------------------------------------------------------- buffers
# `bytearray(n)` zero-fills: a memset of every byte before the buffer is
# written again in full (a link frame's payload by the TLS decryption, a
# cached chunk read by preadv).  For a 64 MiB PUT that memset was 3.5% of the
# vault's CPU samples (docs/performance.md).  CPython's C API makes a bytearray
# without initialising it when given no source (PyByteArray_FromStringAndSize
# with NULL); ctypes reaches it without a compiled module.
UNINITIALIZED_MIN = 64 * 1024   # smaller buffers are zero-filled: the memset costs next to nothing

try:
    _from_string_and_size = ctypes.pythonapi.PyByteArray_FromStringAndSize
    _from_string_and_size.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _from_string_and_size.restype = ctypes.py_object
except (AttributeError, OSError):       # not CPython: zero-filled buffers
    _from_string_and_size = None


def uninitialized(n: int) -> bytearray:
    """A bytearray of `n` bytes whose contents are whatever the allocator
    held (possibly other buffers' bytes).  Only for a buffer the caller
    writes in full before anything reads it or hands it on -- and drops
    unread if that write fails or stops short."""
    if n < UNINITIALIZED_MIN or _from_string_and_size is None:
        return bytearray(n)
    return _from_string_and_size(None, n)
