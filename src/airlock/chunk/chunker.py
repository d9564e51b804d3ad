"""Content-defined chunker: the compiled module if it loaded, else the pure-Python twin.

Both export the same names (see docs/format/chunking.md); `IMPLEMENTATION`
says which one is live ("cython" or "python").  AIRLOCK_NO_EXTENSIONS=1 in the
environment forces the twin.  `airlock.accelerated` reports this for all
compiled modules.
"""
import os

if os.environ.get("AIRLOCK_NO_EXTENSIONS", "") not in ("", "0"):
    from airlock.chunk._chunker_py import *  # noqa: F401,F403
    from airlock.chunk._chunker_py import __all__ as _names
    IMPLEMENTATION = "python"
else:
    try:
        from airlock.chunk._chunker import *  # noqa: F401,F403
        from airlock.chunk._chunker import __all__ as _names
        IMPLEMENTATION = "cython"
    except ImportError:
        from airlock.chunk._chunker_py import *  # noqa: F401,F403
        from airlock.chunk._chunker_py import __all__ as _names
        IMPLEMENTATION = "python"

__all__ = [*_names, "IMPLEMENTATION"]
