"""Which hot-path modules are compiled (Cython) and which run as pure-Python twins.

`ACCELERATED` is True iff every compiled module loaded; `IMPLEMENTATIONS`
maps each dispatcher module to "cython" or "python"; `describe()` is a
one-line summary for `airlock status` and logs.  AIRLOCK_NO_EXTENSIONS=1
forces all twins.
"""
from airlock.chunk import chunker as _chunker
from airlock.log import record as _record

IMPLEMENTATIONS: dict[str, str] = {
    "airlock.chunk.chunker": _chunker.IMPLEMENTATION,
    "airlock.log.record": _record.IMPLEMENTATION,
}

ACCELERATED: bool = all(impl == "cython" for impl in IMPLEMENTATIONS.values())


def describe() -> str:
    """E.g. "accelerated (airlock.chunk.chunker=cython, airlock.log.record=cython)"."""
    parts = ", ".join(f"{name}={impl}" for name, impl in IMPLEMENTATIONS.items())
    return f"{'accelerated' if ACCELERATED else 'NOT accelerated'} ({parts})"
