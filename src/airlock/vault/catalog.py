"""The vault catalog (`base/base.sqlite`) and what a record means to the vault.

The catalog holds the chunk map of the base volume, the version table (every
record merged into the base, append-only apart from the `void` flag and
vault-side retention pruning) and the meta values `volume_end` and
`merged_through_seq`.  It is changed only by compaction, in one transaction
per merged overlay, which also applies the retention policy
(docs/format/vault.md, "Retention"), and by snapshot changes (the snapshot
tables, vault/snapshots.py).
Not thread-safe by itself: VaultStore serializes access under its lock.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from airlock.errors import FormatError
from airlock.log import payload as P
from airlock.vault import snapshots as SN

CATALOG_SCHEMA_VERSION = 2       # 2: snapshot tables (docs/format/vault.md, "Snapshots"); 1 is migrated
RECORD_ABORT = 9                  # {"seqs": [int, ...]}: those earlier records never took effect

KIND = {
    P.BUCKET_CREATE: "bucket-create", P.BUCKET_DELETE: "bucket-delete",
    P.OBJECT_PUT: "put", P.OBJECT_DELETE: "delete",
    P.UPLOAD_CREATE: "upload-create", P.UPLOAD_PART: "upload-part",
    P.UPLOAD_COMPLETE: "put", P.UPLOAD_ABORT: "upload-abort",
    RECORD_ABORT: "abort",
    # a bucket's S3 versioning state: the vault keeps every version whatever
    # it is, so the record changes nothing in the vault's state
    P.BUCKET_VERSIONING: "bucket-versioning",
    P.BUCKET_TAGGING: "bucket-tagging",      # bucket configuration: nothing in the vault's state either
    # a new tag set: a put of the re-tagged manifest if that version is the
    # key's current object, else VERSION_TAGGING_KIND (docs/format/records.md, "Tags")
    P.OBJECT_TAGGING: "put",
}
# An object-delete that permanently removes one non-latest version
# (docs/format/records.md): the key's current state is unchanged.
VERSION_DELETE_KIND = "version-delete"
# An object-tagging of a non-latest version: the key's current state is unchanged.
VERSION_TAGGING_KIND = "version-tagging"
OBJECT_KINDS = ("put", "delete")
BUCKET_KINDS = ("bucket-create", "bucket-delete")
# a bucket's configuration: what `airlock restore --snapshot` sets back
CONFIG_KINDS = ("bucket-versioning", "bucket-tagging")
DAY_NS = 86400 * 10**9


@dataclass(frozen=True)
class Retention:
    """Vault-side retention (docs/format/vault.md, "Retention").  Each setting is
    a guarantee to keep; a non-current put or delete marker in the base is pruned
    only when it is outside every guarantee that is set.  Both 0: keep forever."""
    keep_versions: int = 0        # newest non-current versions kept per key; 0 = no count limit
    keep_days: float = 0          # days a version is kept after the vault merged its successor; 0 = forever

    def __post_init__(self):
        for name in ("keep_versions", "keep_days"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0 or v == float("inf"):
                raise ValueError(f"retention {name} must be a finite number >= 0, not {v!r}")
        if isinstance(self.keep_versions, float) and not self.keep_versions.is_integer():
            raise ValueError(f"retention keep_versions must be a whole number, not {self.keep_versions!r}")
        object.__setattr__(self, "keep_versions", int(self.keep_versions))

    @property
    def prunes(self) -> bool:
        return self.keep_versions > 0 or self.keep_days > 0


class Entry(NamedTuple):
    """One record as the vault sees it."""
    seq: int
    rtype: int
    kind: str
    bucket: str | None
    key: str | None
    manifest: dict | None          # object manifest for kind "put"
    body: dict                     # the decoded payload
    chunks: tuple[str, ...]        # chunk ids the record references
    voids: tuple[int, ...]         # seqs an ABORT record voids


def classify(seq: int, rtype: int, payload: bytes) -> Entry:
    """Decode a record; FormatError if its type or payload is not understood."""
    kind = KIND.get(rtype)
    if kind is None:
        raise FormatError(f"record {seq}: unknown record type {rtype}")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"record {seq} ({kind}): payload is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise FormatError(f"record {seq} ({kind}): payload is not a JSON object")
    try:
        bucket = key = manifest = None
        chunks: tuple[str, ...] = ()
        voids: tuple[int, ...] = ()
        if rtype == P.OBJECT_PUT:
            manifest = body
        elif rtype == P.OBJECT_DELETE and "version_id" in body:
            # removal of one version on the primary; the vault keeps it.  The
            # key's current state after it: unchanged (the version was not the
            # latest), the older version it "restores" (a put), or absent.
            if not body["was_latest"]:
                kind = VERSION_DELETE_KIND
            elif body.get("restores") is not None:
                kind, manifest = "put", body["restores"]
                if (manifest["bucket"], manifest["key"]) != (body["bucket"], body["key"]):
                    raise FormatError(f"record {seq} (delete): restores another key")
        elif rtype == P.OBJECT_TAGGING:
            m = body["manifest"]
            if not isinstance(m, dict) or not isinstance(body["version_id"], str) \
                    or (m["bucket"], m["key"], m.get("version_id") or "null") \
                    != (body["bucket"], body["key"], body["version_id"]):
                raise FormatError(f"record {seq} (object-tagging): not the manifest of the version it names")
            if body["was_latest"]:
                manifest = m
            else:
                kind = VERSION_TAGGING_KIND
        elif rtype == P.BUCKET_TAGGING:
            if body["tagging"] is not None and not isinstance(body["tagging"], str):
                raise FormatError(f"record {seq} (bucket-tagging): tagging is not text")
        elif rtype == P.BUCKET_VERSIONING:
            if body["status"] not in ("Enabled", "Suspended"):
                raise FormatError(f"record {seq} (bucket-versioning): bad status {body['status']!r}")
        elif rtype == P.UPLOAD_COMPLETE:
            manifest = body["manifest"]
        elif rtype == RECORD_ABORT:
            voids = tuple(int(s) for s in body["seqs"])
            if any(not 1 <= s < seq for s in voids):
                raise FormatError(f"record {seq} (abort): can only void earlier records: {voids}")
        chunks = P.chunks_referenced(rtype, body)
        if manifest is not None:
            bucket, key = str(manifest["bucket"]), str(manifest["key"])
        elif rtype in (P.OBJECT_DELETE, P.UPLOAD_CREATE, P.OBJECT_TAGGING):
            bucket, key = str(body["bucket"]), str(body["key"])
        elif rtype in (P.BUCKET_CREATE, P.BUCKET_DELETE, P.BUCKET_VERSIONING, P.BUCKET_TAGGING):
            bucket = str(body["bucket"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"record {seq} ({kind}): malformed payload: {e!r}") from e
    return Entry(seq, rtype, kind, bucket, key, manifest, body, chunks, voids)


def version_dict(seq: int, kind: str, manifest: dict | None, body: dict) -> dict:
    """What versions() returns for one put or delete."""
    mtime = manifest.get("mtime") if manifest is not None else body.get("mtime")
    return {"seq": seq, "kind": kind, "manifest": manifest, "mtime": mtime}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS merged_overlays (
    name TEXT PRIMARY KEY, through_seq INTEGER NOT NULL, merged_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    digest TEXT PRIMARY KEY, offset INTEGER NOT NULL, length INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    seq INTEGER PRIMARY KEY, rtype INTEGER NOT NULL, kind TEXT NOT NULL,
    bucket TEXT, key TEXT, payload BLOB NOT NULL, manifest TEXT, void INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS versions_by_key ON versions (bucket, key, seq);
"""


class Catalog:
    def __init__(self, path: str, fsync: bool = True):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=DELETE")
        # The catalog commits merges; the overlay is deleted right after, so the
        # commit must be on stable storage first.
        self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self.db.executescript(_SCHEMA)
        self.db.executescript(SN.SCHEMA)
        row = self.db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
        if row is None:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(CATALOG_SCHEMA_VERSION),))
            self.db.execute("INSERT INTO meta VALUES ('volume_end', '32')")
            self.db.execute("INSERT INTO meta VALUES ('merged_through_seq', '0')")
            self.db.execute("COMMIT")
        elif int(row[0]) == 1:
            # schema 1 -> 2: the snapshot tables were just created (empty)
            self.db.execute("UPDATE meta SET v=? WHERE k='schema'", (str(CATALOG_SCHEMA_VERSION),))
        elif int(row[0]) != CATALOG_SCHEMA_VERSION:
            raise FormatError(f"{path}: catalog schema {row[0]} is not supported "
                              f"(this build reads {CATALOG_SCHEMA_VERSION})")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ meta
    def _meta(self, k: str) -> int:
        return int(self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()[0])

    @property
    def volume_end(self) -> int:
        return self._meta("volume_end")

    @property
    def merged_through_seq(self) -> int:
        return self._meta("merged_through_seq")

    def merged_names(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM merged_overlays")}

    def _meta_opt(self, k: str) -> int | None:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return int(row[0]) if row else None

    def _set_meta(self, k: str, v: int) -> None:
        self.db.execute("INSERT INTO meta VALUES (?,?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (k, str(v)))

    def prune_stats(self) -> dict:
        """What retention removed so far (meta `pruned_versions`, `last_prune_ns`,
        `unreferenced_bytes`; absent until the first prune)."""
        last = self._meta_opt("last_prune_ns")
        return {"pruned_versions": self._meta_opt("pruned_versions") or 0,
                "last_prune": last / 1e9 if last is not None else None,
                "unreferenced_bytes": self._meta_opt("unreferenced_bytes") or 0}

    def counts(self) -> dict:
        chunks, nbytes = self.db.execute("SELECT COUNT(*), COALESCE(SUM(length), 0) FROM chunks").fetchone()
        versions = self.db.execute("SELECT COUNT(*) FROM versions WHERE kind IN ('put','delete')").fetchone()[0]
        return {"chunks": chunks, "chunk_bytes": nbytes, "versions": versions}

    # ------------------------------------------------------------------ merging (one transaction)
    def commit_merge(self, chunks: Iterable[tuple[str, int, int]], entries: Iterable[tuple[Entry, bytes]],
                     volume_end: int, merged_through_seq: int, overlay: str | None,
                     before_commit: Callable[[], None] | None = None, *,
                     retention: Retention | None = None, now_ns: int | None = None,
                     exclude: Iterable[int] = (), referenced: Iterable[str] = ()) -> int:
        """Insert chunk map rows and version rows, apply voids, advance the meta
        values, record the overlay as merged and apply the retention policy to
        the base: all or nothing.  `exclude`: seqs that unmerged overlays void;
        `referenced`: chunk ids unmerged overlay records reference.  Returns the
        number of versions pruned."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO chunks VALUES (?,?,?)", chunks)
            voids: list[int] = []
            for e, payload in entries:
                db.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,0)",
                           (e.seq, e.rtype, e.kind, e.bucket, e.key, payload,
                            json.dumps(e.manifest, ensure_ascii=False) if e.manifest is not None else None))
                voids.extend(e.voids)
            db.executemany("UPDATE versions SET void=1 WHERE seq=?", [(s,) for s in voids])
            db.execute("UPDATE meta SET v=? WHERE k='volume_end'", (str(volume_end),))
            db.execute("UPDATE meta SET v=? WHERE k='merged_through_seq'", (str(merged_through_seq),))
            if overlay is not None:
                db.execute("INSERT INTO merged_overlays VALUES (?,?,?)",
                           (overlay, merged_through_seq, now_ns))
            pruned = self._prune(retention, now_ns, exclude, referenced) if retention is not None else 0
            if before_commit is not None:
                before_commit()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return pruned

    def prune(self, retention: Retention, now_ns: int, exclude: Iterable[int] = (),
              referenced: Iterable[str] = ()) -> int:
        """Apply the retention policy in a transaction of its own."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            pruned = self._prune(retention, now_ns, exclude, referenced)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return pruned

    # ------------------------------------------------------------------ retention (inside a transaction)
    def superseded_cutoff_seq(self, before_ns: int) -> int:
        """The largest seq s such that every version with seq <= s was merged into
        the base (vault clock, merged_overlays.merged_ns) at or before `before_ns`.
        Taken as a prefix in seq order, so a clock that jumped around never
        makes a later merge look older than an earlier one."""
        cutoff = 0
        for through, merged_ns in self.db.execute(
                "SELECT through_seq, merged_ns FROM merged_overlays ORDER BY through_seq, merged_ns DESC"):
            if merged_ns > before_ns:
                break
            cutoff = through
        return cutoff

    def _prune(self, retention: Retention, now_ns: int, exclude: Iterable[int],
               referenced: Iterable[str]) -> int:
        """Delete the non-current put/delete versions outside every keep
        guarantee.  Current versions (incl. delete markers), voided records,
        bucket and upload records are never touched; versions voided by an
        unmerged ABORT (`exclude`) neither count nor supersede."""
        if not retention.prunes:
            return 0
        exclude = set(exclude)
        n = retention.keep_versions
        cutoff = (self.superseded_cutoff_seq(now_ns - int(retention.keep_days * DAY_NS))
                  if retention.keep_days > 0 else None)
        db = self.db
        # `newer`: entries after this one (0: the key's current state);
        # `content_newer`: those that are not a re-tag (object-tagging, the same
        # version with other tags), which is what keep_versions counts, so
        # changing tags never pushes older content out of the history
        rows = db.execute(
            "SELECT seq, successor, bucket, key FROM (SELECT seq, bucket, key, "
            "  ROW_NUMBER() OVER w - 1 AS newer, LAG(seq) OVER w AS successor, "
            "  COALESCE(SUM(rtype != ?) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) "
            "    AS content_newer "
            "  FROM versions WHERE kind IN ('put','delete') AND void=0 "
            "  AND seq NOT IN (SELECT value FROM json_each(?)) "
            "  WINDOW w AS (PARTITION BY bucket, key ORDER BY seq DESC)) "
            "WHERE newer > 0 AND (? = 0 OR content_newer > ?) AND (? IS NULL OR successor <= ?)",
            (P.OBJECT_TAGGING, json.dumps(sorted(set(exclude))), n, n, cutoff, cutoff)).fetchall()
        if not rows:
            return 0
        # a version a snapshot point still resolves to goes to the snapshot first (claim 30)
        SN.protect(db, rows, now_ns, set(exclude))
        victims = [r[0] for r in rows]
        db.executemany("DELETE FROM versions WHERE seq=?", [(s,) for s in victims])
        self._set_meta("pruned_versions", (self._meta_opt("pruned_versions") or 0) + len(victims))
        self._set_meta("last_prune_ns", now_ns)
        self._set_meta("unreferenced_bytes", self._unreferenced_bytes(referenced))
        return len(victims)

    def _unreferenced_bytes(self, referenced: Iterable[str]) -> int:
        """Bytes of base-volume chunks no base version, no snapshot row and no
        unmerged overlay record references (space a future volume rewrite could reclaim)."""
        row = self.db.execute(
            "WITH used(d) AS ("
            "  SELECT json_extract(c.value, '$[0]') FROM versions, json_each(versions.manifest, '$.chunks') c "
            "  WHERE versions.manifest IS NOT NULL "
            "  UNION SELECT json_extract(c.value, '$[0]') FROM versions, "
            "    json_each(CAST(versions.payload AS TEXT), '$.chunks') c WHERE versions.kind = 'upload-part' "
            f"  UNION {SN.held_chunk_refs_sql()} "
            "  UNION SELECT value FROM json_each(?)) "
            "SELECT COALESCE(SUM(length), 0) FROM chunks WHERE digest NOT IN (SELECT d FROM used)",
            (json.dumps(sorted(set(referenced))),)).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ lookups
    def chunk(self, digest_hex: str) -> tuple[int, int] | None:
        row = self.db.execute("SELECT offset, length FROM chunks WHERE digest=?", (digest_hex,)).fetchone()
        return (row[0], row[1]) if row else None

    def record(self, seq: int) -> tuple[int, bytes] | None:
        row = self.db.execute("SELECT rtype, payload FROM versions WHERE seq=?", (seq,)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def version_rows(self, bucket: str, key: str) -> list[tuple[int, str, dict | None, dict]]:
        """(seq, kind, manifest, body) of every non-void put/delete, oldest first."""
        rows = self.db.execute(
            "SELECT seq, kind, manifest, payload FROM versions WHERE bucket=? AND key=? "
            "AND kind IN ('put','delete') AND void=0 ORDER BY seq", (bucket, key)).fetchall()
        return [(s, k, json.loads(m) if m else None, json.loads(p)) for s, k, m, p in rows]

    def latest_version(self, bucket: str, key: str, exclude: set[int]) -> tuple[int, str, dict | None] | None:
        cur = self.db.execute(
            "SELECT seq, kind, manifest FROM versions WHERE bucket=? AND key=? "
            "AND kind IN ('put','delete') AND void=0 ORDER BY seq DESC", (bucket, key))
        for seq, kind, m in cur:
            if seq not in exclude:
                return seq, kind, (json.loads(m) if m else None)
        return None

    def version_at(self, seq: int) -> tuple[str, str | None, str | None, dict | None] | None:
        row = self.db.execute("SELECT kind, bucket, key, manifest FROM versions WHERE seq=? AND void=0",
                              (seq,)).fetchone()
        if row is None:
            return None
        return row[0], row[1], row[2], (json.loads(row[3]) if row[3] else None)

    def bucket_events(self) -> list[tuple[int, str, str, dict]]:
        """Every non-void bucket create, delete and configuration change (BUCKET_KINDS, CONFIG_KINDS)."""
        kinds = BUCKET_KINDS + CONFIG_KINDS
        rows = self.db.execute(f"SELECT seq, kind, bucket, payload FROM versions WHERE kind IN "
                               f"({','.join('?' * len(kinds))}) AND void=0 ORDER BY seq", kinds)
        return [(s, k, b, json.loads(p)) for s, k, b, p in rows]

    def current_objects(self, bucket: str, prefix: str, after: str | None,
                        exclude: set[int], batch: int = 500) -> Iterator[tuple[str, int, str, dict | None]]:
        """(key, seq, kind, manifest) of the newest non-void put/delete of every
        key in `bucket` starting with `prefix` and > after, in key order."""
        lo, op = prefix, ">="
        if after is not None and after >= prefix:
            lo, op = after, ">"
        excl = json.dumps(sorted(exclude))
        while True:
            rows = self.db.execute(
                f"SELECT key, MAX(seq), kind, manifest FROM versions WHERE bucket=? AND key {op} ? "
                f"AND kind IN ('put','delete') AND void=0 "
                f"AND seq NOT IN (SELECT value FROM json_each(?)) "
                f"GROUP BY key ORDER BY key LIMIT ?", (bucket, lo, excl, batch)).fetchall()
            if not rows:
                return
            for key, seq, kind, m in rows:
                if not key.startswith(prefix):
                    return
                yield key, seq, kind, (json.loads(m) if m else None)
            lo, op = rows[-1][0], ">"


def remove_catalog(path: str) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
