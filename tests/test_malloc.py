"""The server processes tune glibc's allocator once at start
(airlock.malloc); the switch AIRLOCK_MALLOC_TUNE=0 leaves its defaults.
Large buffers that are written in full before use are not zero-filled."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from airlock import malloc

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")

PROBE = "from airlock import malloc; print(malloc.tune(), malloc.tune())"


def _probe(**env) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


@glibc_only
def test_tuning_takes_effect_once_per_process():
    assert _probe(AIRLOCK_MALLOC_TUNE="1") == "True True"


@glibc_only
def test_the_switch_leaves_glibc_defaults():
    assert _probe(AIRLOCK_MALLOC_TUNE="0") == "False False"


@pytest.mark.parametrize("n", [0, 1, 4096, malloc.UNINITIALIZED_MIN - 1, malloc.UNINITIALIZED_MIN, 4 << 20])
def test_an_uninitialized_buffer_is_a_writable_bytearray_of_the_asked_length(n):
    b = malloc.uninitialized(n)
    assert type(b) is bytearray and len(b) == n
    b[:] = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert bytes(b[:256]) == bytes(range(256))[:n]
    if n < malloc.UNINITIALIZED_MIN:
        assert malloc.uninitialized(n) == bytearray(n)      # small ones are zero-filled as ever


def test_an_uninitialized_buffer_is_freed_when_dropped():
    import sys
    import tracemalloc
    b = malloc.uninitialized(1 << 20)
    assert sys.getrefcount(b) == 2          # ours and getrefcount's argument: no reference leaked
    del b
    tracemalloc.start()
    try:
        for _ in range(50):
            malloc.uninitialized(4 << 20)
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 4 << 20                # 200 MiB allocated, none of it kept
