"""Snapshots of the vault (claims 24-33): points in the vault's log, kept
readable although retention prunes history (docs/format/vault.md, "Snapshots").

    full   at creation: the complete block map of the state at its point
           (current version of every key + chunk -> extent) in its own tables
    cow    at creation: only the point; a version a point still resolves to is
           copied into the most recent snapshot that needs it before retention
           deletes it (`protect`, called by Catalog._prune in its transaction)
    delete moves rows another point still needs, drops the rest
    merge  two adjacent snapshots -> one holding both points; rows nobody needs dropped

Everything here works on the catalog's SQLite connection; the caller
(VaultStore) holds its locks, and every public change is one transaction.
A point p resolves (bucket, key) to the largest non-void seq <= p among the
live versions, the overlay records and the rows of every snapshot.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

from airlock.errors import PolicyError

MODES = ("cow", "full")

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, created_ns INTEGER NOT NULL,
    seq INTEGER NOT NULL, points TEXT NOT NULL, mode TEXT NOT NULL, periodic INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS snapshot_versions (
    snapshot INTEGER NOT NULL, seq INTEGER NOT NULL, rtype INTEGER NOT NULL, kind TEXT NOT NULL,
    bucket TEXT, key TEXT, payload BLOB NOT NULL, manifest TEXT, taken_ns INTEGER NOT NULL,
    PRIMARY KEY (snapshot, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS snapshot_versions_by_key ON snapshot_versions (bucket, key, seq);
CREATE INDEX IF NOT EXISTS snapshot_versions_by_seq ON snapshot_versions (seq);
CREATE TABLE IF NOT EXISTS snapshot_chunks (
    snapshot INTEGER NOT NULL, digest TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY (snapshot, digest)) WITHOUT ROWID;
"""

# seqs that never took effect: voided in the base, or named by an unmerged ABORT (json list)
_NOT_VOID = ("seq NOT IN (SELECT seq FROM versions WHERE void=1) "
             "AND seq NOT IN (SELECT value FROM json_each(?))")

OverlayNext = Callable[[str, str, int], "int | None"]


def crash_point(step: str) -> None:
    """Test hook (tests replace it to kill the process): create-in-transaction,
    delete-in-transaction, merge-in-transaction."""


class _Txn:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")
        return False


# ---------------------------------------------------------------------- definitions
def _row(r) -> dict:
    sid, name, created_ns, seq, points, mode, periodic = r
    return {"id": sid, "name": name, "created": created_ns / 1e9, "created_ns": created_ns, "seq": seq,
            "points": json.loads(points), "mode": mode, "periodic": bool(periodic)}


_COLS = "id, name, created_ns, seq, points, mode, periodic"


def exists(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM snapshots LIMIT 1").fetchone() is not None


def get(db: sqlite3.Connection, ref) -> dict:
    """A snapshot by id (int or digits) or name; KeyError if there is none."""
    r = None
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        r = db.execute(f"SELECT {_COLS} FROM snapshots WHERE id=?", (int(ref),)).fetchone()
    if r is None:
        r = db.execute(f"SELECT {_COLS} FROM snapshots WHERE name=?", (str(ref),)).fetchone()
    if r is None:
        raise KeyError(f"snapshot {ref!r}")
    return _row(r)


def accounting(db: sqlite3.Connection, sid: int) -> dict:
    versions, table_bytes = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(length(payload) + COALESCE(length(CAST(manifest AS BLOB)), 0)), 0) "
        "FROM snapshot_versions WHERE snapshot=?", (sid,)).fetchone()
    chunks = db.execute("SELECT COUNT(*) FROM snapshot_chunks WHERE snapshot=?", (sid,)).fetchone()[0]
    data = db.execute(
        "SELECT COALESCE(SUM(n), 0) FROM (SELECT DISTINCT json_extract(j.value, '$[0]') AS d, "
        "json_extract(j.value, '$[1]') AS n FROM snapshot_versions sv, json_each(sv.manifest, '$.chunks') j "
        "WHERE sv.snapshot=? AND sv.manifest IS NOT NULL)", (sid,)).fetchone()[0]
    return {"versions": versions, "table_bytes": table_bytes, "chunks": chunks, "data_bytes": int(data)}


def list_snapshots(db: sqlite3.Connection, with_accounting: bool = True) -> list[dict]:
    out = [_row(r) for r in db.execute(f"SELECT {_COLS} FROM snapshots ORDER BY seq, id")]
    if with_accounting:
        for s in out:
            s.update(accounting(db, s["id"]))
    return out


def _points(db: sqlite3.Connection, skip: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """(point, snapshot id) of every point, ascending."""
    out = []
    for sid, pts in db.execute("SELECT id, points FROM snapshots"):
        if sid not in skip:
            out.extend((int(p), sid) for p in json.loads(pts))
    return sorted(out)


def _newest_needing(points: list[tuple[int, int]], lo: int, hi: int | None) -> int | None:
    """The snapshot owning the newest point in [lo, hi) (hi None: unbounded)."""
    owner = None
    for p, sid in points:
        if p >= lo and (hi is None or p < hi):
            owner = sid
    return owner


def _next_version(db: sqlite3.Connection, bucket: str, key: str, seq: int, voids: str,
                  overlay_next: OverlayNext | None) -> int | None:
    """The next newer non-void version of the key after `seq`: live, held or in an overlay."""
    row = db.execute(
        "SELECT MIN(seq) FROM (SELECT seq FROM versions WHERE bucket=? AND key=? "
        "  AND kind IN ('put','delete') AND void=0 AND seq>? "
        "  UNION ALL SELECT seq FROM snapshot_versions WHERE bucket=? AND key=? AND seq>?) "
        f"WHERE {_NOT_VOID}", (bucket, key, seq, bucket, key, seq, voids)).fetchone()
    nxt = row[0]
    if overlay_next is not None:
        o = overlay_next(bucket, key, seq)
        if o is not None and (nxt is None or o < nxt):
            nxt = o
    return nxt


# ---------------------------------------------------------------------- create
def create(db: sqlite3.Connection, *, name: str | None, mode: str, seq: int, now_ns: int,
           periodic: bool = False, voids: set[int] = frozenset()) -> dict:
    """One transaction: the snapshot row, and for `full` its complete map at `seq`
    (every version row <= seq must be in the base: the caller merged the overlays)."""
    if mode not in MODES:
        raise ValueError(f"snapshot mode must be one of {', '.join(MODES)}, not {mode!r}")
    if name is not None and (not name or name.isdigit() or "#" in name):
        raise ValueError(f"snapshot name {name!r}: must be non-empty, not all digits (ids are), without '#'")
    if name is not None and db.execute("SELECT 1 FROM snapshots WHERE name=?", (name,)).fetchone():
        raise PolicyError(f"a snapshot named {name!r} exists already")
    excl = json.dumps(sorted(voids))
    with _Txn(db):
        cur = db.execute("INSERT INTO snapshots (name, created_ns, seq, points, mode, periodic) "
                         "VALUES (?,?,?,?,?,?)", (name or f"#new-{now_ns}", now_ns, seq, json.dumps([seq]), mode,
                                                  int(periodic)))
        sid = cur.lastrowid
        if name is None:     # default name from the id: unique whatever the clock says
            db.execute("UPDATE snapshots SET name=? WHERE id=?",
                       (f"{'periodic' if periodic else 'snapshot'}-{sid}", sid))
        if mode == "full":
            db.execute(
                "INSERT INTO snapshot_versions SELECT ?, v.seq, v.rtype, v.kind, v.bucket, v.key, v.payload, "
                "v.manifest, ? FROM versions v WHERE v.seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() OVER "
                "  (PARTITION BY bucket, key ORDER BY seq DESC) AS rn FROM versions "
                "  WHERE kind IN ('put','delete') AND void=0 AND seq<=? "
                "  AND seq NOT IN (SELECT value FROM json_each(?))) WHERE rn=1)",
                (sid, now_ns, seq, excl))
            db.execute(
                "INSERT OR IGNORE INTO snapshot_chunks SELECT ?, c.digest, c.offset, c.length FROM chunks c "
                "WHERE c.digest IN (SELECT json_extract(j.value, '$[0]') FROM snapshot_versions sv, "
                "json_each(sv.manifest, '$.chunks') j WHERE sv.snapshot=? AND sv.manifest IS NOT NULL)",
                (sid, sid))
        crash_point("create-in-transaction")
    out = get(db, sid)
    out.update(accounting(db, sid))
    return out


def copy_tables(db: sqlite3.Connection, old_path: str) -> int:
    """Copy the snapshot tables of another catalog (a catalog rebuild of a
    readable one); returns the snapshots copied, 0 if it has none or is unreadable."""
    import logging
    try:
        db.execute("ATTACH DATABASE ? AS old", (old_path,))
    except sqlite3.DatabaseError as e:
        logging.getLogger("airlock.vault").error("snapshot tables of %s not carried over: %r", old_path, e)
        return 0
    try:
        with _Txn(db):
            for t in ("snapshots", "snapshot_versions", "snapshot_chunks"):
                db.execute(f"INSERT INTO main.{t} SELECT * FROM old.{t}")
        return db.execute("SELECT COUNT(*) FROM main.snapshots").fetchone()[0]
    except sqlite3.DatabaseError as e:
        logging.getLogger("airlock.vault").error("snapshot tables of %s not carried over: %r", old_path, e)
        return 0
    finally:
        db.execute("DETACH DATABASE old")


# ---------------------------------------------------------------------- protection (inside a prune)
def protect(db: sqlite3.Connection, victims: list[tuple[int, int | None, str, str]], now_ns: int,
            voids: set[int] | frozenset = frozenset()) -> int:
    """Before retention deletes `victims` ((seq, successor, bucket, key) of live
    versions), copy each one a snapshot point still resolves to, and that no
    snapshot holds, into the snapshot owning the newest such point (claims
    28-30).  Runs inside the caller's transaction; returns rows copied."""
    points = _points(db)
    if not points:
        return 0
    excl = json.dumps(sorted(voids))
    copied = 0
    for seq, successor, bucket, key in victims:
        if db.execute("SELECT 1 FROM snapshot_versions WHERE seq=? LIMIT 1", (seq,)).fetchone():
            continue
        held_next = db.execute("SELECT MIN(seq) FROM snapshot_versions WHERE bucket=? AND key=? AND seq>? "
                               f"AND {_NOT_VOID}", (bucket, key, seq, excl)).fetchone()[0]
        nxt = min(s for s in (successor, held_next) if s is not None) if (successor or held_next) else None
        owner = _newest_needing(points, seq, nxt)
        if owner is None:
            continue
        db.execute("INSERT INTO snapshot_versions SELECT ?, seq, rtype, kind, bucket, key, payload, manifest, ? "
                   "FROM versions WHERE seq=?", (owner, now_ns, seq))
        copied += 1
    return copied


def held_chunk_refs_sql() -> str:
    """SQL selecting chunk ids snapshot rows reference (for unreferenced_bytes)."""
    return ("SELECT json_extract(c.value, '$[0]') FROM snapshot_versions, "
            "json_each(snapshot_versions.manifest, '$.chunks') c WHERE snapshot_versions.manifest IS NOT NULL")


# ---------------------------------------------------------------------- delete / merge
def _drop_unneeded(db: sqlite3.Connection, sid: int, points: list[tuple[int, int]], excl: str,
                   overlay_next: OverlayNext | None) -> None:
    for seq, bucket, key in db.execute("SELECT seq, bucket, key FROM snapshot_versions WHERE snapshot=?",
                                       (sid,)).fetchall():
        nxt = _next_version(db, bucket, key, seq, excl, overlay_next)
        if _newest_needing(points, seq, nxt) is None:
            db.execute("DELETE FROM snapshot_versions WHERE snapshot=? AND seq=?", (sid, seq))


def delete(db: sqlite3.Connection, ref, *, voids: set[int] = frozenset(),
           overlay_next: OverlayNext | None = None) -> dict:
    """One transaction: rows another point still needs (and nothing else keeps)
    move to the snapshot owning the newest such point; the rest are freed."""
    snap = get(db, ref)
    sid = snap["id"]
    snap.update(accounting(db, sid))
    excl = json.dumps(sorted(voids))
    moved = 0
    with _Txn(db):
        others = _points(db, skip=(sid,))
        for seq, bucket, key in db.execute("SELECT seq, bucket, key FROM snapshot_versions WHERE snapshot=?",
                                           (sid,)).fetchall():
            if db.execute("SELECT 1 FROM versions WHERE seq=?", (seq,)).fetchone() or db.execute(
                    "SELECT 1 FROM snapshot_versions WHERE seq=? AND snapshot<>? LIMIT 1", (seq, sid)).fetchone():
                continue
            owner = _newest_needing(others, seq, _next_version(db, bucket, key, seq, excl, overlay_next))
            if owner is not None:
                db.execute("UPDATE snapshot_versions SET snapshot=? WHERE snapshot=? AND seq=?", (owner, sid, seq))
                moved += 1
        db.execute("DELETE FROM snapshot_versions WHERE snapshot=?", (sid,))
        db.execute("DELETE FROM snapshot_chunks WHERE snapshot=?", (sid,))
        db.execute("DELETE FROM snapshots WHERE id=?", (sid,))
        crash_point("delete-in-transaction")
    return {"deleted": snap, "moved_versions": moved, "freed_versions": snap["versions"] - moved}


def merge(db: sqlite3.Connection, ref_a, ref_b, *, name: str | None = None, now_ns: int,
          voids: set[int] = frozenset(), overlay_next: OverlayNext | None = None) -> dict:
    """Combine two adjacent snapshots into one that keeps both points (claims
    32, 33); A and B are deleted, rows neither point (nor any other) needs are freed."""
    a, b = get(db, ref_a), get(db, ref_b)
    if a["id"] == b["id"]:
        raise PolicyError("cannot merge a snapshot with itself")
    if (a["seq"], a["id"]) > (b["seq"], b["id"]):
        a, b = b, a
    order = [s["id"] for s in list_snapshots(db, with_accounting=False)]
    ia, ib = order.index(a["id"]), order.index(b["id"])
    if ib != ia + 1:
        between = get(db, order[ia + 1])
        raise PolicyError(f"snapshots {a['name']} (id {a['id']}, seq {a['seq']}) and {b['name']} "
                          f"(id {b['id']}, seq {b['seq']}) are not adjacent: {between['name']} "
                          f"(id {between['id']}, seq {between['seq']}) lies between them")
    before = {k: accounting(db, a["id"])[k] + accounting(db, b["id"])[k]
              for k in ("versions", "table_bytes", "chunks", "data_bytes")}
    name = name or f"{a['name']}+{b['name']}"
    if db.execute("SELECT 1 FROM snapshots WHERE name=? AND id NOT IN (?,?)", (name, a["id"], b["id"])).fetchone():
        raise PolicyError(f"a snapshot named {name!r} exists already")
    excl = json.dumps(sorted(voids))
    with _Txn(db):
        # free the names first (UNIQUE), then the combined row
        db.execute("UPDATE snapshots SET name = name || '#merging' WHERE id IN (?,?)", (a["id"], b["id"]))
        points = sorted(set(a["points"]) | set(b["points"]))
        mode = "full" if a["mode"] == b["mode"] == "full" else "cow"
        cid = db.execute("INSERT INTO snapshots (name, created_ns, seq, points, mode, periodic) "
                         "VALUES (?,?,?,?,?,?)", (name, b["created_ns"], b["seq"], json.dumps(points), mode,
                                                  int(a["periodic"] and b["periodic"]))).lastrowid
        for src in (b["id"], a["id"]):
            db.execute("INSERT OR IGNORE INTO snapshot_versions SELECT ?, seq, rtype, kind, bucket, key, payload, "
                       "manifest, taken_ns FROM snapshot_versions WHERE snapshot=?", (cid, src))
            db.execute("INSERT OR IGNORE INTO snapshot_chunks SELECT ?, digest, offset, length "
                       "FROM snapshot_chunks WHERE snapshot=?", (cid, src))
        for src in (a["id"], b["id"]):
            db.execute("DELETE FROM snapshot_versions WHERE snapshot=?", (src,))
            db.execute("DELETE FROM snapshot_chunks WHERE snapshot=?", (src,))
            db.execute("DELETE FROM snapshots WHERE id=?", (src,))
        _drop_unneeded(db, cid, _points(db), excl, overlay_next)
        if mode == "full":
            db.execute("DELETE FROM snapshot_chunks WHERE snapshot=? AND digest NOT IN (SELECT json_extract("
                       "j.value, '$[0]') FROM snapshot_versions sv, json_each(sv.manifest, '$.chunks') j "
                       "WHERE sv.snapshot=? AND sv.manifest IS NOT NULL)", (cid, cid))
        crash_point("merge-in-transaction")
    out = get(db, cid)
    out.update(accounting(db, cid))
    freed = {k: before[k] - out[k] for k in before}
    return {"merged": [a["id"], b["id"]], "snapshot": out, "freed": freed}


# ---------------------------------------------------------------------- reads as of a point
def point_of(snap: dict, at: int | None) -> int:
    if at is None:
        return snap["seq"]
    if int(at) not in snap["points"]:
        raise KeyError(f"snapshot {snap['name']} has no point {at} (points {snap['points']})")
    return int(at)


def resolve(db: sqlite3.Connection, bucket: str, key: str, p: int,
            voids: set[int]) -> tuple[int, str, dict | None] | None:
    """(seq, kind, manifest) of the newest version <= p in the base or any snapshot."""
    row = db.execute(
        "SELECT seq, kind, manifest FROM (SELECT seq, kind, manifest FROM versions WHERE bucket=? AND key=? "
        "  AND kind IN ('put','delete') AND void=0 AND seq<=? "
        "  UNION ALL SELECT seq, kind, manifest FROM snapshot_versions WHERE bucket=? AND key=? AND seq<=?) "
        f"WHERE {_NOT_VOID} ORDER BY seq DESC LIMIT 1",
        (bucket, key, p, bucket, key, p, json.dumps(sorted(voids)))).fetchone()
    if row is None:
        return None
    return row[0], row[1], (json.loads(row[2]) if row[2] else None)


def held_record(db: sqlite3.Connection, seq: int) -> tuple[str, str | None, str | None, dict | None] | None:
    """(kind, bucket, key, manifest) of a version only a snapshot may still hold."""
    row = db.execute("SELECT kind, bucket, key, manifest FROM snapshot_versions WHERE seq=? LIMIT 1",
                     (seq,)).fetchone()
    if row is None:
        return None
    return row[0], row[1], row[2], (json.loads(row[3]) if row[3] else None)


def objects_as_of(db: sqlite3.Connection, bucket: str, prefix: str, after: str | None, p: int,
                  voids: set[int], batch: int = 500):
    """(key, seq, kind, manifest) of the newest version <= p of every key in the
    base or any snapshot, with `prefix`, > after, in key order."""
    lo, op = prefix, ">="
    if after is not None and after >= prefix:
        lo, op = after, ">"
    excl = json.dumps(sorted(voids))
    while True:
        rows = db.execute(
            "SELECT key, MAX(seq), kind, manifest FROM ("
            f"  SELECT key, seq, kind, manifest FROM versions WHERE bucket=? AND key {op} ? "
            "   AND kind IN ('put','delete') AND void=0 AND seq<=? "
            "  UNION ALL SELECT key, seq, kind, manifest FROM snapshot_versions WHERE bucket=? "
            f"  AND key {op} ? AND kind IN ('put','delete') AND seq<=?) "
            f"WHERE {_NOT_VOID} GROUP BY key ORDER BY key LIMIT ?",
            (bucket, lo, p, bucket, lo, p, excl, batch)).fetchall()
        if not rows:
            return
        for key, seq, kind, m in rows:
            if not key.startswith(prefix):
                return
            yield key, seq, kind, (json.loads(m) if m else None)
        lo, op = rows[-1][0], ">"
