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

from airlock.log import payload as P
from airlock.primary.model import Bucket, Manifest, ObjectMeta, Part, Upload

INDEX_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS buckets (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
    manifest TEXT NOT NULL, PRIMARY KEY (bucket, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY, bucket TEXT NOT NULL, key TEXT NOT NULL,
    initiated REAL NOT NULL, info TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS uploads_by_key ON uploads (bucket, key, initiated);
CREATE TABLE IF NOT EXISTS parts (
    upload_id TEXT NOT NULL, part_number INTEGER NOT NULL, info TEXT NOT NULL,
    PRIMARY KEY (upload_id, part_number)) WITHOUT ROWID;
"""


class Index:
    def __init__(self, path: str):
        self.path = path
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # The log is durable before the index is touched; the index may lag
        # after a crash and is caught up by replay, so it need not fsync.
        db.execute("PRAGMA synchronous=OFF")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(INDEX_SCHEMA_VERSION),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('applied_seq', '0')")
        elif int(row[0]) != INDEX_SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"index schema {row[0]} != {INDEX_SCHEMA_VERSION}")
        return db

    @classmethod
    def open_or_rebuild(cls, path: str) -> tuple["Index", bool]:
        """Open the index; if it is unreadable, delete it and start empty.
        Returns (index, rebuilt)."""
        try:
            idx = cls(path)
            idx.applied_seq()
            return idx, False
        except sqlite3.DatabaseError:
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
        return int(self.db.execute("SELECT v FROM meta WHERE k='applied_seq'").fetchone()[0])

    def apply(self, records) -> None:
        """Apply (seq, rtype, payload_dict) records in one transaction."""
        db = self.db
        db.execute("BEGIN")
        try:
            last = None
            for seq, rtype, body in records:
                self._apply_one(seq, rtype, body)
                last = seq
            if last is not None:
                db.execute("UPDATE meta SET v=? WHERE k='applied_seq'", (str(last),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _apply_one(self, seq: int, rtype: int, b: dict) -> None:
        db = self.db
        if rtype == P.OBJECT_PUT:
            db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?)",
                       (b["bucket"], b["key"], seq, json.dumps(b, ensure_ascii=False)))
        elif rtype == P.OBJECT_DELETE:
            db.execute("DELETE FROM objects WHERE bucket=? AND key=?", (b["bucket"], b["key"]))
        elif rtype == P.BUCKET_CREATE:
            db.execute("INSERT OR REPLACE INTO buckets VALUES (?,?,?)",
                       (b["bucket"], b["owner"], b["created"]))
        elif rtype == P.BUCKET_DELETE:
            db.execute("DELETE FROM buckets WHERE name=?", (b["bucket"],))
            db.execute("DELETE FROM objects WHERE bucket=?", (b["bucket"],))
            for (uid,) in db.execute("SELECT upload_id FROM uploads WHERE bucket=?", (b["bucket"],)).fetchall():
                db.execute("DELETE FROM parts WHERE upload_id=?", (uid,))
            db.execute("DELETE FROM uploads WHERE bucket=?", (b["bucket"],))
        elif rtype == P.UPLOAD_CREATE:
            db.execute("INSERT OR REPLACE INTO uploads VALUES (?,?,?,?,?)",
                       (b["upload_id"], b["bucket"], b["key"], b["initiated"],
                        json.dumps(b, ensure_ascii=False)))
        elif rtype == P.UPLOAD_PART:
            db.execute("INSERT OR REPLACE INTO parts VALUES (?,?,?)",
                       (b["upload_id"], b["part_number"], json.dumps(b, ensure_ascii=False)))
        elif rtype == P.UPLOAD_COMPLETE:
            m = b["manifest"]
            db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?)",
                       (m["bucket"], m["key"], seq, json.dumps(m, ensure_ascii=False)))
            db.execute("DELETE FROM parts WHERE upload_id=?", (b["upload_id"],))
            db.execute("DELETE FROM uploads WHERE upload_id=?", (b["upload_id"],))
        elif rtype == P.UPLOAD_ABORT:
            db.execute("DELETE FROM parts WHERE upload_id=?", (b["upload_id"],))
            db.execute("DELETE FROM uploads WHERE upload_id=?", (b["upload_id"],))

    # ------------------------------------------------------------------ buckets
    def bucket(self, name: str) -> Bucket | None:
        row = self.db.execute("SELECT name, owner, created FROM buckets WHERE name=?", (name,)).fetchone()
        return Bucket(*row) if row else None

    def buckets(self, owner: str | None = None) -> list[Bucket]:
        if owner is None:
            rows = self.db.execute("SELECT name, owner, created FROM buckets ORDER BY name").fetchall()
        else:
            rows = self.db.execute("SELECT name, owner, created FROM buckets WHERE owner=? ORDER BY name",
                                   (owner,)).fetchall()
        return [Bucket(*r) for r in rows]

    def bucket_is_empty(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM objects WHERE bucket=? LIMIT 1", (name,)).fetchone() is None

    # ------------------------------------------------------------------ objects
    def object(self, bucket: str, key: str) -> Manifest | None:
        row = self.db.execute("SELECT seq, manifest FROM objects WHERE bucket=? AND key=?",
                              (bucket, key)).fetchone()
        if row is None:
            return None
        return Manifest.from_json(json.loads(row[1]), seq=row[0])

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

    def part(self, upload_id: str, number: int) -> Part | None:
        row = self.db.execute("SELECT info FROM parts WHERE upload_id=? AND part_number=?",
                              (upload_id, number)).fetchone()
        return Part.from_json(json.loads(row[0])) if row else None


def _upload(b: dict) -> Upload:
    return Upload(upload_id=b["upload_id"], bucket=b["bucket"], key=b["key"], owner=b["owner"],
                  initiated=float(b["initiated"]), meta=ObjectMeta.from_json(b.get("meta") or {}),
                  checksum_algorithm=b.get("checksum_algorithm"), checksum_type=b.get("checksum_type"))
