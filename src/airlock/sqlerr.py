"""SQLite errors told apart: a damaged file, or the storage under it failing.

The primary's two SQLite files (the small-chunk store, chunk/small.py; the
index, primary/index.py) treat them differently: a damaged file is moved
aside or rebuilt, a storage failure (a full disk, an I/O error, a lock held
too long) is raised as the OSError a plain file's would be -- never a
reason to throw a good file away.  s3/errors.py maps ENOSPC to 503, the
CLI prints an OSError as one line.
"""
from __future__ import annotations

import errno
import os
import sqlite3

SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26     # result codes (the low byte) that mean a damaged file
SQLITE_FULL = 13
# ... and those that mean the storage (or the system) failed under a sound file:
# PERM, BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL, NOLFS
STORAGE_CODES = frozenset({3, 5, 6, 7, 8, 10, SQLITE_FULL, 14, 15, 22})
SQLITE_IOERR_SHMSIZE = 10 | (19 << 8)      # extended code: the -shm file could not grow (a full disk)


def is_damage(e: BaseException) -> bool:
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def storage_errno(e: BaseException, path: str | None = None) -> int | None:
    """ENOSPC or EIO if `e` is SQLite's report of a storage failure
    (STORAGE_CODES); None for damage, for SQLite's other errors (a
    constraint, a bad statement: not the storage's fault) and for errors that
    did not come from SQLite (ours, e.g. a schema check, carry no code).  A
    full disk is SQLITE_FULL, the -shm file that could not grow, or any
    storage error while the file system of `path` has no byte left."""
    code = getattr(e, "sqlite_errorcode", None) if isinstance(e, sqlite3.Error) else None
    if code is None or (code & 0xFF) not in STORAGE_CODES:
        return None
    if (code & 0xFF) == SQLITE_FULL or code == SQLITE_IOERR_SHMSIZE or (path is not None and _no_room(path)):
        return errno.ENOSPC
    return errno.EIO


def storage_error(e: BaseException, path: str) -> OSError | None:
    """`e` as the OSError naming the file `path` a plain file's failure would
    be, if it is a storage failure (storage_errno); else None."""
    n = storage_errno(e, path)
    return None if n is None else OSError(n, f"{os.strerror(n)} ({e})", path)


def _no_room(path: str) -> bool:
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return False
    return st.f_bavail == 0
