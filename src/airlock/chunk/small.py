"""Small chunks as rows of one SQLite database, with group commit.

Format and rules: docs/format/chunkstore.md, "Small-chunk database".  A chunk
file costs a create, a write, an fdatasync, a rename and a directory fsync;
for a 4 KiB chunk that is more CPU than the rest of its PUT.  Here a chunk
costs an INSERT, and the rows of concurrent uploads share one commit (one
WAL fsync): the first writer to find no commit in progress becomes the
committer and writes everything queued; the others wait for that commit.
Writers of other processes are kept out by an exclusive flock on a lock file
(kernel queueing, not SQLite's sleeping busy handler).

Callers on an event loop (`put_async`) do not each take a thread: their
rows join the next commit, which the store's own committer thread runs, and
each commit wakes each waiting loop once (`call_soon_threadsafe`) for all
of its callers.  A small PUT then costs no executor hop at all.

Reads use one connection per thread (WAL readers never wait for the writer).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from airlock import sqlerr
from airlock.errors import FormatError

FORMAT_NAME = "airlock-small-chunks"
FORMAT_VERSION = 1
DB_NAME = "small.sqlite"
LOCK_NAME = "small.lock"
OPEN_NAME = "small.open"    # every process with the database open holds a shared flock on it
log = logging.getLogger("airlock.chunks")

BUSY_TIMEOUT_S = 30.0     # a reader (or another tool) holding SQLite locks longer than this is an error
# After a checkpoint has emptied the write-ahead log it is cut back to this
# size when the next transaction starts over at its beginning; without a
# limit the file keeps the largest size it ever reached (24 MB after a few
# hundred 60 KiB uploads whose commits overlapped readers).  Above the
# ~4 MB SQLite's automatic checkpoint lets it reach in steady use, so that
# it is cut only after bursts.
WAL_SIZE_LIMIT = 8 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (digest BLOB PRIMARY KEY, data BLOB NOT NULL);
"""


def as_oserror(e: sqlite3.Error) -> OSError:
    """A database error as the OSError a chunk file's would be (callers
    handle storage failures as OSError: repair paths, the S3 error mapping):
    a full disk stays ENOSPC, anything else is EIO."""
    return OSError(sqlerr.storage_errno(e) or errno.EIO, f"small-chunk database: {e}")


def _size_with_wal(path: str) -> int:
    """Bytes of the database file and its write-ahead log."""
    n = 0
    for suffix in ("", "-wal"):
        try:
            n += os.path.getsize(path + suffix)
        except FileNotFoundError:
            pass
    return n


def _open_lock_file(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:             # a read-only view (scrub --no-repair by another user)
        return os.open(path, os.O_RDONLY)


class _Batch:
    __slots__ = ("rows", "done", "error", "written", "waiters")

    def __init__(self):
        self.rows: list[tuple[str, bytes, bytes | None]] = []    # (verb, digest, data)
        self.done = False
        self.error: BaseException | None = None
        self.written: list[bool] = []
        self.waiters: list = []       # (loop, future, first row, rows) of `put_async` callers


def _closed_error() -> OSError:
    return OSError(errno.EIO, "small-chunk database: the store is closed")


def _resolve(waiters: list, batch: _Batch) -> None:
    """On the loop: settle the futures of one commit's `put_async` callers."""
    for fut, i, n in waiters:
        if fut.done():                  # the caller was cancelled meanwhile
            continue
        if batch.error is not None:
            fut.set_exception(batch.error)
        else:
            fut.set_result(batch.written[i:i + n])


class SmallChunks:
    def __init__(self, directory: str, *, fsync: bool = True):
        self.path = os.path.join(directory, DB_NAME)
        self.fsync = fsync
        self._lock_path = os.path.join(directory, LOCK_NAME)
        self._local = threading.local()
        self._cond = threading.Condition()
        self._queue = _Batch()              # rows waiting for the next commit
        self._committing = False
        self._committer: ThreadPoolExecutor | None = None     # runs the commits `put_async` callers wait for
        self._closed = False
        self._writer: sqlite3.Connection | None = None
        self._lock_fd = _open_lock_file(self._lock_path)
        # Held shared for as long as this store is open.  Taken exclusively
        # first (without waiting): only a process that finds the database
        # open nowhere else may move a damaged one aside, since one that has
        # it open would go on writing into the moved file.
        self._open_fd = _open_lock_file(os.path.join(directory, OPEN_NAME))
        try:
            fcntl.flock(self._open_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            fcntl.flock(self._open_fd, fcntl.LOCK_SH)
            alone = False
        try:
            with self._flock():
                self._open_or_move_aside(alone)
        except BaseException:
            os.close(self._open_fd)         # not open after all: others may move it aside
            os.close(self._lock_fd)
            raise
        if alone:
            fcntl.flock(self._open_fd, fcntl.LOCK_SH)         # downgrade: others may open it now

    def _open_or_move_aside(self, alone: bool) -> None:
        try:
            self._open_checked()
        except sqlite3.DatabaseError as e:
            if not sqlerr.is_damage(e):
                # locked, full, I/O error: not damage; never move those aside
                raise (sqlerr.storage_error(e, self.path) or as_oserror(e)) from e
            if not alone:
                raise                    # the process that has it open decides (at its next start)
            # unreadable (a disk fault): keep it for forensics and start an
            # empty one; its chunks now read as missing, and reads, scrub
            # and restore fetch them from the vault (chunkstore.md)
            aside = f"{self.path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            log.error("small-chunk database %s is unreadable (%s); moved to %s, starting empty",
                      self.path, e, aside)
            self._open_checked()

    def _open_checked(self) -> None:
        """Create or check the schema and the format row (caller holds the flock)."""
        db = self._connect()
        try:
            db.executescript(_SCHEMA)
            rows = dict(db.execute("SELECT k, v FROM meta").fetchall())
            if not rows:
                with db:
                    db.execute("INSERT INTO meta VALUES ('format', ?), ('version', ?)",
                               (FORMAT_NAME, str(FORMAT_VERSION)))
            elif rows.get("format") != FORMAT_NAME or rows.get("version") != str(FORMAT_VERSION):
                raise FormatError(f"{self.path}: format {rows.get('format')!r} version "
                                  f"{rows.get('version')!r}; this build reads {FORMAT_NAME} {FORMAT_VERSION}")
        finally:
            db.close()

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        return db

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    @contextlib.contextmanager
    def _flock(self):
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reads
    def get(self, digest: bytes) -> bytes | None:
        row = self._reader().execute("SELECT data FROM chunks WHERE digest=?", (digest,)).fetchone()
        return None if row is None else row[0]

    def has(self, digest: bytes) -> bool:
        try:
            return self._reader().execute("SELECT 1 FROM chunks WHERE digest=?", (digest,)).fetchone() is not None
        except sqlite3.Error as e:
            raise as_oserror(e) from e

    def digests(self) -> list[bytes]:
        return [r[0] for r in self._reader().execute("SELECT digest FROM chunks ORDER BY digest")]

    def sizes(self) -> list[tuple[bytes, int]]:
        """(digest, stored length) of every row, in digest order."""
        return self._reader().execute("SELECT digest, length(data) FROM chunks ORDER BY digest").fetchall()

    # ------------------------------------------------------------------ writes (group commit)
    def put(self, digest: bytes, data, replace: bool = False) -> bool:
        """Store a row (`replace`: over an existing one); returns once it is
        durable, True if it added (or replaced) a row."""
        return self._submit("INSERT OR REPLACE" if replace else "INSERT OR IGNORE", digest, bytes(data))

    def delete(self, digest: bytes) -> None:
        self._submit("DELETE", digest, None)

    def delete_many(self, digests) -> None:
        """Delete these rows in one transaction (`airlock gc`)."""
        self._submit_rows([("DELETE", d, None) for d in digests])

    def _submit(self, verb: str, digest: bytes, data: bytes | None) -> bool:
        return self._submit_rows([(verb, digest, data)])[0]

    def put_async(self, loop: asyncio.AbstractEventLoop, items: list[tuple[bytes, bytes]]) -> asyncio.Future:
        """Store rows (digest, data), as `put` does, from the thread running
        `loop`, without blocking it and without a thread of its own: the
        rows join the next commit, run on the store's committer thread.
        The future (of `loop`) gets the rows' written flags once they are
        durable, or the commit's OSError."""
        fut = loop.create_future()
        with self._cond:
            if self._closed:
                fut.set_exception(_closed_error())
                return fut
            batch = self._queue
            batch.waiters.append((loop, fut, len(batch.rows), len(items)))
            batch.rows.extend(("INSERT OR IGNORE", digest, data) for digest, data in items)
            if self._committing:
                return fut              # the commit in progress hands this batch on when it ends
            self._committing = True
            self._queue = _Batch()
        self._hand_over(batch)
        return fut

    def _submit_rows(self, rows: list) -> list[bool]:
        """Queue changes and wait until the transaction holding them commits
        (every change goes through the one committer: the writer connection
        is never used by two threads at once).  A failed commit raises
        OSError for every change of its batch (`as_oserror`)."""
        with self._cond:
            if self._closed:
                raise _closed_error()
            batch = self._queue
            i = len(batch.rows)
            batch.rows.extend(rows)
            while self._committing and not batch.done:
                self._cond.wait()
            if not batch.done:
                # no commit in progress: this thread commits everything queued
                self._committing = True
                self._queue = _Batch()
                lead = True
            else:
                lead = False
        if lead:
            # closed while this thread waited: its batch fails whole
            nxt = self._run(batch, _closed_error() if self._closed else None)
            if nxt is not None:
                self._hand_over(nxt)
        if batch.error is not None:
            raise batch.error
        return batch.written[i:i + len(rows)]

    def _run(self, batch: _Batch, error: BaseException | None = None) -> _Batch | None:
        """Commit one batch (this thread is the committer; with `error`,
        fail it instead) and settle its callers.  If `put_async` callers
        wait in the next batch, that batch is returned, still marked as
        committing, for the caller to hand to the committer thread: no
        thread in it may be waiting to lead it."""
        try:
            if error is not None:
                raise error
            batch.written = self._commit(batch.rows)
        except sqlite3.Error as e:
            batch.error = as_oserror(e)
        except BaseException as e:
            batch.error = e
        finally:
            with self._cond:
                batch.done = True
                nxt = None
                if self._queue.waiters:
                    nxt, self._queue = self._queue, _Batch()
                else:
                    self._committing = False
                self._cond.notify_all()
            by_loop: dict = {}
            for loop, fut, i, n in batch.waiters:
                by_loop.setdefault(loop, []).append((fut, i, n))
            for loop, waiters in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_resolve, waiters, batch)
                except RuntimeError:
                    pass                # that loop is closed: nobody waits any more
        return nxt

    def _hand_over(self, batch: _Batch) -> None:
        """Commit `batch` (already taken off the queue, marked committing)
        on the committer thread, and the batches after it while `put_async`
        callers keep arriving."""
        def lead(b: _Batch | None, error: BaseException | None = None) -> None:
            while b is not None:
                b = self._run(b, error)
        with self._cond:
            if self._committer is None and not self._closed:
                self._committer = ThreadPoolExecutor(1, thread_name_prefix="airlock-small-commit")
            committer = self._committer
        try:
            if committer is None:
                raise RuntimeError("closed")
            committer.submit(lead, batch)
        except RuntimeError:            # closed: no commit runs any more, the callers learn it
            lead(batch, _closed_error())

    def _commit(self, rows) -> list[bool]:
        with self._flock():
            if self._writer is None:
                self._writer = self._connect()
            db = self._writer
            written = []
            db.execute("BEGIN IMMEDIATE")
            try:
                for verb, digest, data in rows:
                    if data is None:
                        cur = db.execute("DELETE FROM chunks WHERE digest=?", (digest,))
                    else:
                        cur = db.execute(f"{verb} INTO chunks VALUES (?, ?)", (digest, data))
                    written.append(cur.rowcount > 0)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return written

    # ------------------------------------------------------------------ shrinking (airlock gc)
    def shrink(self, min_free_bytes: int, min_free_share: float) -> tuple[int, int] | None:
        """Rewrite the database without its free pages (VACUUM) when they
        come to at least `min_free_bytes` and `min_free_share` of it;
        returns (bytes before, bytes after), or None when not worth it.
        For `airlock gc`, which holds the data directory's lock: no gateway
        has the database open.  VACUUM is one transaction (a crash leaves
        the old file); it needs free disk space about the size of the rows
        kept, and raises OSError (`as_oserror`) without it."""
        with self._flock():
            if self._writer is None:
                self._writer = self._connect()
            db = self._writer            # no commit runs meanwhile: gc deletes, then shrinks, in one thread
            try:
                page = db.execute("PRAGMA page_size").fetchone()[0]
                total = db.execute("PRAGMA page_count").fetchone()[0] * page
                free = db.execute("PRAGMA freelist_count").fetchone()[0] * page
                if free < min_free_bytes or free < min_free_share * total:
                    return None
                before = _size_with_wal(self.path)
                db.execute("VACUUM")
                # the new pages went through the write-ahead log: copy them
                # into the database file (synced: synchronous=FULL) and empty the log
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                raise as_oserror(e) from e
            return before, _size_with_wal(self.path)

    def close(self) -> None:
        """Close the store once the commit in progress (and any batch of
        `put_async` rows queued behind it) has ended; writes after this
        fail with OSError.  Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._committing:
                self._cond.wait()
            committer, self._committer = self._committer, None
        if committer is not None:
            committer.shutdown(wait=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        os.close(self._lock_fd)
        os.close(self._open_fd)         # releases the shared flock
