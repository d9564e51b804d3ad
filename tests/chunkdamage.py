"""Damage the primary's copy of a chunk, wherever it lives (a test helper).

A chunk of at most 64 KiB is a row of `chunks/small.sqlite`, a larger one a
file `chunks/<hex[0:2]>/<hex>` (docs/format/chunkstore.md).  Tests that play
a disk fault or a power loss cut on the primary use these, so that they say
what happens to the chunk (flipped, truncated, emptied, deleted) and not
where it is stored.  The database is changed through SQLite, as another
process would: a running gateway sees the change on its next read.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path


def _db(data: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(Path(data) / "chunks" / "small.sqlite"), isolation_level=None, timeout=30)
    return db


def chunk_file(data: Path, digest: str) -> Path:
    return Path(data) / "chunks" / digest[:2] / digest


def is_row(data: Path, digest: str) -> bool:
    if not (Path(data) / "chunks" / "small.sqlite").exists():
        return False
    db = _db(data)
    try:
        return db.execute("SELECT 1 FROM chunks WHERE digest=?", (bytes.fromhex(digest),)).fetchone() is not None
    finally:
        db.close()


def exists(data: Path, digest: str) -> bool:
    return is_row(data, digest) or chunk_file(data, digest).exists()


def stored(data: Path, digest: str) -> bytes:
    """The chunk's stored bytes as they are (file: without its 16-byte header)."""
    if is_row(data, digest):
        db = _db(data)
        try:
            return db.execute("SELECT data FROM chunks WHERE digest=?", (bytes.fromhex(digest),)).fetchone()[0]
        finally:
            db.close()
    return chunk_file(data, digest).read_bytes()[16:]


def all_digests(data: Path) -> set[str]:
    """Every chunk the primary stores (rows and files)."""
    out = {p.name for p in (Path(data) / "chunks").glob("??/*") if p.is_file()}
    if (Path(data) / "chunks" / "small.sqlite").exists():
        db = _db(data)
        try:
            out.update(r[0].hex() for r in db.execute("SELECT digest FROM chunks"))
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise                   # otherwise: a process is creating the database right now
        finally:
            db.close()
    return out


def _set_row(data: Path, digest: str, value: bytes | None) -> None:
    db = _db(data)
    try:
        if value is None:
            db.execute("DELETE FROM chunks WHERE digest=?", (bytes.fromhex(digest),))
        else:
            db.execute("UPDATE chunks SET data=? WHERE digest=?", (value, bytes.fromhex(digest)))
    finally:
        db.close()


def flip(data: Path, digest: str, offset: int = 100, n: int = 8) -> None:
    """Invert `n` bytes of the chunk's data from `offset` (wrapping around)."""
    if is_row(data, digest):
        raw = bytearray(stored(data, digest))
        for i in range(offset, offset + n):
            raw[i % len(raw)] ^= 0xFF
        _set_row(data, digest, bytes(raw))
        return
    p = chunk_file(data, digest)
    raw = bytearray(p.read_bytes())
    for i in range(16 + offset, 16 + offset + n):
        raw[i % len(raw)] ^= 0xFF
    p.write_bytes(bytes(raw))


def truncate(data: Path, digest: str) -> None:
    """Keep the first half of what is stored."""
    if is_row(data, digest):
        raw = stored(data, digest)
        _set_row(data, digest, raw[: len(raw) // 2])
        return
    p = chunk_file(data, digest)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def empty(data: Path, digest: str) -> None:
    if is_row(data, digest):
        _set_row(data, digest, b"")
        return
    chunk_file(data, digest).write_bytes(b"")


def delete(data: Path, digest: str) -> None:
    if is_row(data, digest):
        _set_row(data, digest, None)
        return
    chunk_file(data, digest).unlink()


DAMAGE = {"flipped": flip, "truncated": truncate, "emptied": empty, "deleted": delete}
