"""The compiled hot path must actually be in use (unless AIRLOCK_NO_EXTENSIONS=1)."""
import os

import pytest

import airlock.accelerated as accelerated
from airlock.chunk import chunker
from airlock.log import record

NO_EXTENSIONS = os.environ.get("AIRLOCK_NO_EXTENSIONS", "") not in ("", "0")


@pytest.mark.skipif(NO_EXTENSIONS, reason="AIRLOCK_NO_EXTENSIONS=1 forces the pure-Python twins")
def test_compiled_modules_are_loaded():
    import airlock.chunk._chunker  # noqa: F401  (the ImportError message says why it did not load)
    import airlock.log._record  # noqa: F401
    assert chunker.IMPLEMENTATION == "cython"
    assert record.IMPLEMENTATION == "cython"
    assert accelerated.ACCELERATED is True
    assert accelerated.IMPLEMENTATIONS == {"airlock.chunk.chunker": "cython", "airlock.log.record": "cython"}
    assert accelerated.describe().startswith("accelerated")


@pytest.mark.skipif(not NO_EXTENSIONS, reason="only meaningful with AIRLOCK_NO_EXTENSIONS=1")
def test_no_extensions_switch_forces_twins():
    assert chunker.IMPLEMENTATION == "python"
    assert record.IMPLEMENTATION == "python"
    assert accelerated.ACCELERATED is False
    assert "NOT accelerated" in accelerated.describe()


def test_dispatchers_export_the_same_names_as_the_twins():
    from airlock.chunk import _chunker_py
    from airlock.log import _record_py
    assert set(_chunker_py.__all__) <= set(chunker.__all__)
    assert set(_record_py.__all__) <= set(record.__all__)
    if not NO_EXTENSIONS:
        from airlock.chunk import _chunker
        from airlock.log import _record
        assert set(_chunker.__all__) == set(_chunker_py.__all__)
        assert set(_record.__all__) == set(_record_py.__all__)
