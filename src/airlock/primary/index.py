"""The primary's metadata index: a SQLite view of the log.

The log is the commit point and the truth; the index is derived state that
makes lookups and listings fast.  Every applied record advances
`applied_seq` in the same transaction, so after a crash the engine replays
exactly the records the index has not seen.  If the index file is missing or
unreadable it is rebuilt from the whole log (docs/format/index.md).

Keys are compared as SQLite BINARY (memcmp over UTF-8), which is the
code-point order S3 lists in.
"""
from __future__ import annotations

import json
import os
import sqlite3

from airlock import sqlerr
from airlock.log import payload as P
from airlock.primary.model import NULL_VERSION, Bucket, Manifest, ObjectMeta, ObjectVersion, Part, Upload

BUCKET_RECORDS = frozenset({P.BUCKET_CREATE, P.BUCKET_DELETE, P.BUCKET_VERSIONING, P.BUCKET_TAGGING})
INDEX_SCHEMA_VERSION = 2   # 2: buckets.versioning and the versions table (S3 versioning)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS buckets (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL,
    versioning TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
    manifest TEXT NOT NULL, PRIMARY KEY (bucket, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    bucket TEXT NOT NULL, key TEXT NOT NULL, version_id TEXT NOT NULL, seq INTEGER NOT NULL,
    is_delete_marker INTEGER NOT NULL, manifest TEXT NOT NULL,
    PRIMARY KEY (bucket, key, version_id)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS versions_by_seq ON versions (bucket, key, seq);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY, bucket TEXT NOT NULL, key TEXT NOT NULL,
    initiated REAL NOT NULL, info TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS uploads_by_key ON uploads (bucket, key, initiated);
CREATE TABLE IF NOT EXISTS parts (
    upload_id TEXT NOT NULL, part_number INTEGER NOT NULL, info TEXT NOT NULL,
    PRIMARY KEY (upload_id, part_number)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bucket_tagging (name TEXT PRIMARY KEY, tagging TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS completed_uploads (
    upload_id TEXT PRIMARY KEY, bucket TEXT NOT NULL, key TEXT NOT NULL, version_id TEXT NOT NULL,
    seq INTEGER NOT NULL, completed REAL NOT NULL);
CREATE INDEX IF NOT EXISTS completed_uploads_by_time ON completed_uploads (completed);
"""

# How long a completed multipart upload is remembered, so that a retried
# CompleteMultipartUpload (its answer lost) is answered as the first one was
# instead of NoSuchUpload.  Measured in the records' own clocks (the
# manifests' mtime), so that a rebuild from the log keeps the same rows.
COMPLETED_UPLOAD_RETENTION_S = 24 * 3600


OBJECT_ROW_CACHE_ROWS = 2048      # current-version manifests kept (bounded: small ones only, below)
OBJECT_ROW_CACHE_TEXT = 4096      # only manifests up to this many characters (small objects)

def _json_text(payload) -> str | None:
    """A record's payload as the text to store, or None (encode the decoded
    dict again) if it is not plain UTF-8 JSON of an object: json.loads also
    takes a byte-order mark or UTF-16/32, which the stored text must not
    carry (encode_payload never writes them; a record from elsewhere might)."""
    if payload[:1] != b"{":
        return None
    try:
        return str(payload, "utf-8")
    except UnicodeDecodeError:
        return None


class Index:
    def __init__(self, path: str, *, readonly: bool = False, generation=None):
        """`readonly`: a gateway worker's view of the leader's index (another
        process writes it); its caches are dropped whenever the leader says
        it committed since: by the index generation page `generation`
        (primary/generation.py; the writer's own index bumps it, a reader's
        reads it), or without one by SQLite's data_version (a query per
        lookup).  A writer may be given its page later (`.generation = ...`)."""
        self.path = path
        self.readonly = readonly
        self.db = self._open_readonly() if readonly else self._open()
        self.generation = generation
        self._data_version = None
        self._seen = (None, None)         # the generation's (applied, buckets) when the caches were last valid
        # bucket rows are read on every request (access checks, versioning
        # state) and change only through bucket records: cached, dropped in apply()
        self._bucket_rows: dict[str, tuple | None] = {}
        # current versions of small objects, decoded: a GET of a small object
        # then costs no SQLite query and no JSON parse.  Cleared by every
        # apply, so it never outlives a change (reads between writes gain).
        # The same Manifest is returned to every reader: callers treat what
        # the index returns as read-only (they build new manifests to commit).
        self._object_rows: dict[tuple[str, str], Manifest] = {}

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # The log is durable before the index is touched; the index may lag
            # after a crash and is caught up by replay, so it need not fsync.
            db.execute("PRAGMA synchronous=OFF")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
            if row is None:
                # both rows or neither: a file with a schema and no applied_seq
                # (the disk filled between the two) would not open again
                db.execute("BEGIN")
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(INDEX_SCHEMA_VERSION),))
                db.execute("INSERT OR IGNORE INTO meta VALUES ('applied_seq', '0')")
                db.execute("COMMIT")
            elif int(row[0]) != INDEX_SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"index schema {row[0]} != {INDEX_SCHEMA_VERSION}")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            # a full disk, an I/O error: not an unreadable index; open_or_rebuild must not delete it
            err = sqlerr.storage_error(e, self.path)
            if err is not None:
                raise err from e
            raise
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        from urllib.parse import quote
        db = sqlite3.connect(f"file:{quote(self.path)}?mode=ro", uri=True, isolation_level=None,
                             check_same_thread=False)
        row = db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
        if row is None or int(row[0]) != INDEX_SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"index schema {row and row[0]} != {INDEX_SCHEMA_VERSION}")
        return db

    def _sync(self) -> None:
        """Drop the caches if another connection has committed since the last
        look (read-only views only; the writer clears them in apply)."""
        if self.generation is not None:
            now = self.generation.read()
            seen = self._seen
            if now != seen:
                if now[0] != seen[0]:
                    self._object_rows.clear()
                if now[1] != seen[1]:
                    self._bucket_rows.clear()
                self._seen = now
            return
        v = self.db.execute("PRAGMA data_version").fetchone()[0]
        if v != self._data_version:
            self._data_version = v
            self._object_rows.clear()
            self._bucket_rows.clear()

    @classmethod
    def open_or_rebuild(cls, path: str) -> tuple["Index", bool]:
        """Open the index; if it is unreadable, delete it and start empty.
        Returns (index, rebuilt)."""
        try:
            idx = cls(path)
            idx.applied_seq()
            return idx, False
        except sqlite3.DatabaseError as e:
            err = sqlerr.storage_error(e, path)
            if err is not None:          # the storage failed, the file is not known to be damaged: keep it
                raise err from e
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(path + suffix)
                except FileNotFoundError:
                    pass
            return cls(path), True

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ apply
    def applied_seq(self) -> int:
        row = self.db.execute("SELECT v FROM meta WHERE k='applied_seq'").fetchone()
        if row is None:        # (a file an older build left half made on a full disk): unreadable, rebuilt
            raise sqlite3.DatabaseError(f"{self.path}: the index has no applied_seq")
        return int(row[0])

    def apply(self, records) -> None:
        """Apply (seq, rtype, payload_dict) records in one transaction.  A
        record may carry its payload's bytes as a fourth item: an
        object-put's manifest is then stored as that JSON text, not encoded
        again.

        Records at or below `applied_seq` are skipped: this index holds them
        already.  Applying one again would move a key back to an older
        version (`objects` takes whatever is applied last); it happens when
        the engine swaps in an index built from the vault's log
        (`_serve_from_vault`) while records of its own log, which that index
        already holds, are still on their way to being applied."""
        db = self.db
        buckets = any(r[1] in BUCKET_RECORDS for r in records)
        db.execute("BEGIN")
        try:
            applied = self.applied_seq()
            last = None
            for rec in records:
                if rec[0] <= applied:
                    continue
                last = applied = rec[0]
                self._apply_one(last, rec[1], rec[2], _json_text(rec[3]) if len(rec) > 3 else None)
            if last is not None:
                db.execute("UPDATE meta SET v=? WHERE k='applied_seq'", (str(last),))
            db.execute("COMMIT")
        except BaseException as e:
            # On some errors SQLite has rolled the transaction back itself (a
            # full disk, at COMMIT or mid-statement): a ROLLBACK would then
            # fail ("no transaction is active") and hide the error.
            if db.in_transaction:
                db.execute("ROLLBACK")
            err = sqlerr.storage_error(e, self.path)
            if err is not None:
                raise err from e
            raise
        finally:
            self._object_rows.clear()
            if buckets:
                self._bucket_rows.clear()
        if self.generation is not None:
            self.generation.bump(buckets)     # after COMMIT: the workers' caches go stale now

    def _put_version(self, seq: int, m: dict, text: str | None = None) -> None:
        """An object-put or upload-complete: a new version, the latest one; a
        "null" version replaces the key's previous null version (the same
        key and version id; a seq taken already stays an error).  `text`:
        `m` as JSON already (the record's payload), else encoded here."""
        db = self.db
        if text is None:
            text = json.dumps(m, ensure_ascii=False)
        bucket, key = m["bucket"], m["key"]
        db.execute("INSERT INTO versions VALUES (?,?,?,?,0,?) ON CONFLICT (bucket, key, version_id) "
                   "DO UPDATE SET seq=excluded.seq, is_delete_marker=0, manifest=excluded.manifest",
                   (bucket, key, m.get("version_id") or NULL_VERSION, seq, text))
        db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?)", (bucket, key, seq, text))

    def _delete(self, seq: int, b: dict) -> None:
        """An object-delete (docs/format/records.md): a delete marker if the
        record has "marker", else the permanent removal of one version
        ("version_id", "null" when absent), after which the newest remaining
        version (if it is not a delete marker) is the current object."""
        db = self.db
        bucket, key = b["bucket"], b["key"]
        marker = b.get("marker")
        if marker is not None:
            db.execute("DELETE FROM versions WHERE bucket=? AND key=? AND version_id=?", (bucket, key, marker))
            db.execute("INSERT INTO versions VALUES (?,?,?,?,1,?)",
                       (bucket, key, marker, seq, json.dumps(b, ensure_ascii=False)))
            db.execute("DELETE FROM objects WHERE bucket=? AND key=?", (bucket, key))
            return
        vid = b.get("version_id") or NULL_VERSION
        db.execute("DELETE FROM versions WHERE bucket=? AND key=? AND version_id=?", (bucket, key, vid))
        row = db.execute("SELECT seq, is_delete_marker, manifest FROM versions WHERE bucket=? AND key=? "
                         "ORDER BY seq DESC LIMIT 1", (bucket, key)).fetchone()
        if row is None or row[1]:
            db.execute("DELETE FROM objects WHERE bucket=? AND key=?", (bucket, key))
        else:
            db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?)", (bucket, key, row[0], row[2]))

    def _retag(self, b: dict) -> None:
        """An object-tagging record (docs/format/records.md, "Tags"): the
        version's tag set becomes the record's; it keeps its seq, so its
        place in the history and as the current object.  Only the tags are
        taken from the record: a re-tag cannot change a version's content,
        whatever a record fetched back from the vault holds.  A version that
        no longer exists is left alone."""
        db = self.db
        bucket, key, vid = b["bucket"], b["key"], b["version_id"]
        row = db.execute("SELECT seq, manifest FROM versions WHERE bucket=? AND key=? AND version_id=? "
                         "AND is_delete_marker=0", (bucket, key, vid)).fetchone()
        if row is None:
            return
        m = json.loads(row[1])
        m["meta"] = dict(m.get("meta") or {}, tagging=(b["manifest"].get("meta") or {}).get("tagging"))
        text = json.dumps(m, ensure_ascii=False)
        db.execute("UPDATE versions SET manifest=? WHERE bucket=? AND key=? AND version_id=?",
                   (text, bucket, key, vid))
        db.execute("UPDATE objects SET manifest=? WHERE bucket=? AND key=? AND seq=?", (text, bucket, key, row[0]))

    def _apply_one(self, seq: int, rtype: int, b: dict, text: str | None = None) -> None:
        """`text`: the payload as JSON text, if the caller has it (an object-put stores it as is)."""
        db = self.db
        if rtype == P.OBJECT_PUT:
            self._put_version(seq, b, text)
        elif rtype == P.OBJECT_DELETE:
            self._delete(seq, b)
        elif rtype == P.OBJECT_TAGGING:
            self._retag(b)
        elif rtype == P.BUCKET_CREATE:
            db.execute("INSERT OR REPLACE INTO buckets (name, owner, created) VALUES (?,?,?)",
                       (b["bucket"], b["owner"], b["created"]))
        elif rtype == P.BUCKET_VERSIONING:
            db.execute("UPDATE buckets SET versioning=? WHERE name=?", (b["status"], b["bucket"]))
        elif rtype == P.BUCKET_TAGGING:
            if b["tagging"] is None:
                db.execute("DELETE FROM bucket_tagging WHERE name=?", (b["bucket"],))
            else:
                db.execute("INSERT OR REPLACE INTO bucket_tagging VALUES (?,?)", (b["bucket"], b["tagging"]))
        elif rtype == P.BUCKET_DELETE:
            db.execute("DELETE FROM buckets WHERE name=?", (b["bucket"],))
            db.execute("DELETE FROM bucket_tagging WHERE name=?", (b["bucket"],))
            db.execute("DELETE FROM objects WHERE bucket=?", (b["bucket"],))
            db.execute("DELETE FROM versions WHERE bucket=?", (b["bucket"],))
            for (uid,) in db.execute("SELECT upload_id FROM uploads WHERE bucket=?", (b["bucket"],)).fetchall():
                db.execute("DELETE FROM parts WHERE upload_id=?", (uid,))
            db.execute("DELETE FROM uploads WHERE bucket=?", (b["bucket"],))
            db.execute("DELETE FROM completed_uploads WHERE bucket=?", (b["bucket"],))
        elif rtype == P.UPLOAD_CREATE:
            db.execute("INSERT OR REPLACE INTO uploads VALUES (?,?,?,?,?)",
                       (b["upload_id"], b["bucket"], b["key"], b["initiated"],
                        json.dumps(b, ensure_ascii=False)))
        elif rtype == P.UPLOAD_PART:
            db.execute("INSERT OR REPLACE INTO parts VALUES (?,?,?)",
                       (b["upload_id"], b["part_number"], json.dumps(b, ensure_ascii=False)))
        elif rtype == P.UPLOAD_COMPLETE:
            m = b["manifest"]
            self._put_version(seq, m)
            db.execute("DELETE FROM parts WHERE upload_id=?", (b["upload_id"],))
            db.execute("DELETE FROM uploads WHERE upload_id=?", (b["upload_id"],))
            done = float(m["mtime"])
            db.execute("DELETE FROM completed_uploads WHERE completed < ?", (done - COMPLETED_UPLOAD_RETENTION_S,))
            db.execute("INSERT OR REPLACE INTO completed_uploads VALUES (?,?,?,?,?,?)",
                       (b["upload_id"], m["bucket"], m["key"], m.get("version_id") or NULL_VERSION, seq, done))
        elif rtype == P.UPLOAD_ABORT:
            db.execute("DELETE FROM parts WHERE upload_id=?", (b["upload_id"],))
            db.execute("DELETE FROM uploads WHERE upload_id=?", (b["upload_id"],))

    # ------------------------------------------------------------------ buckets
    def _bucket_row(self, name: str) -> tuple | None:
        if self.readonly:
            self._sync()
        try:
            return self._bucket_rows[name]
        except KeyError:
            row = self.db.execute("SELECT name, owner, created, versioning FROM buckets WHERE name=?",
                                  (name,)).fetchone()
            self._bucket_rows[name] = row
            return row

    def bucket(self, name: str) -> Bucket | None:
        row = self._bucket_row(name)
        return Bucket(*row[:3]) if row else None

    def buckets(self, owner: str | None = None) -> list[Bucket]:
        if owner is None:
            rows = self.db.execute("SELECT name, owner, created FROM buckets ORDER BY name").fetchall()
        else:
            rows = self.db.execute("SELECT name, owner, created FROM buckets WHERE owner=? ORDER BY name",
                                   (owner,)).fetchall()
        return [Bucket(*r) for r in rows]

    def bucket_is_empty(self, name: str) -> bool:
        """No object versions and no delete markers (S3 refuses to delete a
        bucket that still has either)."""
        return self.db.execute("SELECT 1 FROM versions WHERE bucket=? LIMIT 1", (name,)).fetchone() is None

    def bucket_tagging(self, name: str) -> str | None:
        """The bucket's tag set (URL query text), None for none."""
        row = self.db.execute("SELECT tagging FROM bucket_tagging WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def versioning(self, name: str) -> str:
        """'' (never enabled), 'Enabled' or 'Suspended'."""
        row = self._bucket_row(name)
        return row[3] if row else ""

    # ------------------------------------------------------------------ versions
    def version(self, bucket: str, key: str, version_id: str) -> ObjectVersion | None:
        row = self.db.execute("SELECT key, version_id, seq, is_delete_marker, manifest FROM versions "
                              "WHERE bucket=? AND key=? AND version_id=?", (bucket, key, version_id)).fetchone()
        return _version(bucket, row) if row else None

    def latest_version(self, bucket: str, key: str) -> ObjectVersion | None:
        row = self.db.execute("SELECT key, version_id, seq, is_delete_marker, manifest FROM versions "
                              "WHERE bucket=? AND key=? ORDER BY seq DESC LIMIT 1", (bucket, key)).fetchone()
        return _version(bucket, row) if row else None

    def scan_versions(self, bucket: str, key: str, before_seq: int | None, limit: int) -> list[ObjectVersion]:
        """Versions of one key, newest first, with seq < before_seq."""
        rows = self.db.execute(
            "SELECT key, version_id, seq, is_delete_marker, manifest FROM versions "
            "WHERE bucket=? AND key=? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (bucket, key, before_seq if before_seq is not None else 1 << 62, limit)).fetchall()
        return [_version(bucket, r) for r in rows]

    def next_versioned_key(self, bucket: str, after: str | None, inclusive: bool = False) -> str | None:
        """The first key (> after, or >= after if inclusive) that has any version."""
        if after is None:
            row = self.db.execute("SELECT key FROM versions WHERE bucket=? ORDER BY key LIMIT 1",
                                  (bucket,)).fetchone()
        else:
            op = ">=" if inclusive else ">"
            row = self.db.execute(f"SELECT key FROM versions WHERE bucket=? AND key {op} ? ORDER BY key LIMIT 1",
                                  (bucket, after)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ objects
    def object(self, bucket: str, key: str) -> Manifest | None:
        if self.readonly:
            self._sync()
        m = self._object_rows.get((bucket, key))
        if m is not None:
            return m
        row = self.db.execute("SELECT seq, manifest FROM objects WHERE bucket=? AND key=?",
                              (bucket, key)).fetchone()
        if row is None:
            return None
        m = Manifest.from_json(json.loads(row[1]), seq=row[0])
        if len(row[1]) <= OBJECT_ROW_CACHE_TEXT:
            if len(self._object_rows) >= OBJECT_ROW_CACHE_ROWS:
                self._object_rows.clear()
            self._object_rows[(bucket, key)] = m
        return m

    def scan_objects(self, bucket: str, after: str | None, prefix: str, limit: int):
        """Yield manifests with key > after (or >= prefix) and key starting with
        prefix, in key order, at most `limit` per query batch (generator)."""
        lo = prefix
        inclusive = True
        if after is not None and after >= prefix:
            lo, inclusive = after, False
        while True:
            op = ">=" if inclusive else ">"
            rows = self.db.execute(
                f"SELECT seq, manifest, key FROM objects WHERE bucket=? AND key {op} ? "
                f"ORDER BY key LIMIT ?", (bucket, lo, limit)).fetchall()
            if not rows:
                return
            for seq, manifest, key in rows:
                if not key.startswith(prefix):
                    return
                yield key, seq, manifest
            lo, inclusive = rows[-1][2], False

    def all_objects(self):
        for seq, manifest in self.db.execute("SELECT seq, manifest FROM objects ORDER BY bucket, key"):
            yield Manifest.from_json(json.loads(manifest), seq=seq)

    # ------------------------------------------------------------------ uploads
    def upload(self, upload_id: str) -> Upload | None:
        row = self.db.execute("SELECT info FROM uploads WHERE upload_id=?", (upload_id,)).fetchone()
        return _upload(json.loads(row[0])) if row else None

    def uploads(self, bucket: str) -> list[Upload]:
        rows = self.db.execute("SELECT info FROM uploads WHERE bucket=? ORDER BY key, initiated, upload_id",
                               (bucket,)).fetchall()
        return [_upload(json.loads(r[0])) for r in rows]

    def parts(self, upload_id: str) -> list[Part]:
        rows = self.db.execute("SELECT info FROM parts WHERE upload_id=? ORDER BY part_number",
                               (upload_id,)).fetchall()
        return [Part.from_json(json.loads(r[0])) for r in rows]

    def completed_upload(self, upload_id: str) -> tuple[str, str, str, int] | None:
        """(bucket, key, version_id, seq) of the version a multipart upload
        completed as, if it completed within COMPLETED_UPLOAD_RETENTION_S of
        the newest completion (the version may be gone since)."""
        return self.db.execute("SELECT bucket, key, version_id, seq FROM completed_uploads WHERE upload_id=?",
                               (upload_id,)).fetchone()

    def part(self, upload_id: str, number: int) -> Part | None:
        row = self.db.execute("SELECT info FROM parts WHERE upload_id=? AND part_number=?",
                              (upload_id, number)).fetchone()
        return Part.from_json(json.loads(row[0])) if row else None


def _version(bucket: str, row) -> ObjectVersion:
    key, vid, seq, marker, text = row
    d = json.loads(text)
    m = None if marker else Manifest.from_json(d, seq=seq)
    return ObjectVersion(bucket=bucket, key=key, version_id=vid, seq=seq, mtime=float(d["mtime"]), manifest=m)


def _upload(b: dict) -> Upload:
    return Upload(upload_id=b["upload_id"], bucket=b["bucket"], key=b["key"], owner=b["owner"],
                  initiated=float(b["initiated"]), meta=ObjectMeta.from_json(b.get("meta") or {}),
                  checksum_algorithm=b.get("checksum_algorithm"), checksum_type=b.get("checksum_type"))
