"""The server processes tune glibc's allocator once at start
(airlock.malloc); the switch AIRLOCK_MALLOC_TUNE=0 leaves its defaults."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")

PROBE = "from airlock import malloc; print(malloc.tune(), malloc.tune())"


def _probe(**env) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_tuning_takes_effect_once_per_process():
    assert _probe(AIRLOCK_MALLOC_TUNE="1") == "True True"


def test_the_switch_leaves_glibc_defaults():
    assert _probe(AIRLOCK_MALLOC_TUNE="0") == "False False"
