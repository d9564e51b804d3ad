"""`airlock scrub`: find damaged or missing chunks in the primary store and
repair them from the vault.

    committed state (from the log) -> chunks every live object / open upload part references
    walk chunks/<2 hex>/<64 hex>   -> check each file: magic, version, length, BLAKE3
    referenced but not on disk     -> missing
    bad or missing                 -> GET_CHUNK from the vault, verify, replace atomically

Safe while the gateway runs: scrub never takes the data directory's lock,
never empties `chunks/tmp/` (the gateway's writes in progress live there) and
only ever replaces a chunk file by renaming a complete, verified, fdatasynced
file over it, so a concurrent reader sees the old file or the new one.
Corruption is never repaired silently: every repair is logged with the chunk
id and where the good copy came from, and listed in the report.

The helpers (`check_chunk`, `repair_chunk`, `fetch_verified`,
`repair_from_vault`, `live_chunks`) are shared with `airlock restore`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from airlock import errors as E
from airlock.chunk.store import ChunkStore, digest_of
from airlock.link.client import LinkClient
from airlock.primary.engine import committed_state
from airlock.primary.index import Index

log = logging.getLogger("airlock.scrub")

FETCH_WINDOW = 8           # GET_CHUNK requests in flight at once (the link pipelines; 8 x 4 MiB max in memory)
CHECK_THREADS = 4          # chunk files read + BLAKE3-verified in parallel (hashing releases the GIL)
SLICE = 64                 # chunks checked, then repaired, per step (bounds memory; progress granularity)
CHUNK_NAME = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int], None]   # (bytes done, bytes total)


# ---------------------------------------------------------------------- single chunks
def open_store_shared(data_dir: str, fsync: bool = True) -> ChunkStore:
    """A view of the chunk store that does not empty `chunks/tmp/` (opening a
    ChunkStore does, which would delete a running gateway's writes in progress)."""
    return ChunkStore(data_dir, fsync=fsync, clean_tmp=False)


def check_chunk(store: ChunkStore, digest: str) -> str | None:
    """None if the chunk file exists and verifies, else what is wrong with it."""
    try:
        store.read(digest)
    except FileNotFoundError:
        return "missing"
    except E.IntegrityError as e:
        if CHUNK_NAME.match(e.actual or ""):
            return f"digest mismatch (content hashes to {e.actual})"
        return e.actual                      # "truncated header", "bad magic", "length X != Y"
    except E.FormatError as e:
        return str(e)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def repair_chunk(store: ChunkStore, digest: str, data) -> None:
    """Write `data` as chunk `digest` over whatever file is there (or none).

    The bytes are verified first (IntegrityError if they are not the chunk);
    `ChunkStore.replace` then writes tmp + fdatasync + rename + directory
    fsync, so the file is at every moment the old one or the complete new one."""
    actual = digest_of(data)
    if actual != digest:
        raise E.IntegrityError(f"chunk {digest} (copy to repair with)", digest, actual)
    store.replace(digest, data)


async def fetch_verified(link: LinkClient, digest: str) -> bytes:
    """A chunk from the vault, verified against its digest on receipt."""
    data = await link.get_chunk(digest)
    actual = digest_of(data)
    if actual != digest:
        raise E.IntegrityError(f"chunk {digest} from the vault", digest, actual)
    return data


# ---------------------------------------------------------------------- many chunks
@dataclass
class Damage:
    """One bad chunk: what was wrong and what became of it."""

    digest: str
    problem: str                 # "missing", "digest mismatch (...)", "bad magic", ...
    referenced: bool = True      # some live object or upload part needs it
    repaired: bool = False
    source: str | None = None    # where the good copy came from ("vault")
    error: str | None = None     # why it could not be repaired


async def repair_from_vault(link: LinkClient, store: ChunkStore, damaged: list[Damage],
                            executor: ThreadPoolExecutor,
                            on_repaired: Callable[[Damage, int], None] | None = None,
                            missing_level: int = logging.WARNING) -> None:
    """Fetch each damaged chunk from the vault (FETCH_WINDOW at a time), verify
    it, replace the local file (durably).  Marks each Damage as
    repaired or records the error; only a lost link raises.  Every repair is
    logged (a missing chunk at `missing_level`: restore copies many)."""
    loop = asyncio.get_running_loop()
    window = asyncio.Semaphore(FETCH_WINDOW)

    async def one(dmg: Damage) -> None:
        async with window:
            try:
                data = await fetch_verified(link, dmg.digest)
            except E.VaultRejected as e:
                if getattr(e, "code", None) == "not_found":
                    dmg.error = "the vault has no copy of it"
                else:
                    dmg.error = str(e)
                return
            except E.IntegrityError as e:
                dmg.error = f"the vault's copy does not verify either: {e}"
                return
            try:
                await loop.run_in_executor(executor, repair_chunk, store, dmg.digest, data)
            except OSError as e:     # a full or failing local disk: this chunk stays damaged
                dmg.error = f"the vault's copy could not be written here: {e}"
                return
        dmg.repaired, dmg.source = True, "vault"
        log.log(missing_level if dmg.problem == "missing" else logging.WARNING,
                "repaired chunk %s (%s) with the copy from the vault", dmg.digest, dmg.problem)
        if on_repaired is not None:
            on_repaired(dmg, len(data))

    await asyncio.gather(*(one(d) for d in damaged))


def live_chunks(index: Index, bucket: str | None = None,
                prefix: str = "") -> tuple[int, int, dict[str, tuple[int, str]]]:
    """Chunks the committed state needs: of every live object, every kept
    version, and every part of an open multipart upload whose bucket/key is
    in scope.
    Returns (objects, parts, {digest: (size, "bucket/key" of the first referrer)})."""
    chunks: dict[str, tuple[int, str]] = {}
    objects = parts = 0
    db = index.db
    if bucket is None:
        rows = db.execute("SELECT bucket, key, manifest FROM objects")
    else:
        rows = db.execute("SELECT bucket, key, manifest FROM objects WHERE bucket=?", (bucket,))
    for b, k, manifest in rows:
        if not k.startswith(prefix):
            continue
        objects += 1
        for digest, size in json.loads(manifest)["chunks"]:
            chunks.setdefault(digest, (int(size), f"{b}/{k}"))
    # non-current versions of versioned buckets need their chunks too
    if bucket is None:
        rows = db.execute("SELECT bucket, key, version_id, manifest FROM versions "
                          "WHERE is_delete_marker=0 AND manifest IS NOT NULL")
    else:
        rows = db.execute("SELECT bucket, key, version_id, manifest FROM versions "
                          "WHERE is_delete_marker=0 AND manifest IS NOT NULL AND bucket=?", (bucket,))
    for b, k, vid, manifest in rows:
        if not k.startswith(prefix):
            continue
        for digest, size in json.loads(manifest)["chunks"]:
            chunks.setdefault(digest, (int(size), f"{b}/{k} (version {vid})"))
    rows = db.execute("SELECT u.bucket, u.key, p.info FROM parts p JOIN uploads u USING (upload_id)")
    for b, k, info in rows:
        if (bucket is not None and b != bucket) or not k.startswith(prefix):
            continue
        parts += 1
        for digest, size in json.loads(info)["chunks"]:
            chunks.setdefault(digest, (int(size), f"{b}/{k} (upload part)"))
    return objects, parts, chunks


# ---------------------------------------------------------------------- scrub
@dataclass
class ScrubReport:
    chunks_checked: int = 0      # files read and verified, plus referenced ones found missing
    bytes_checked: int = 0
    referenced: int = 0          # distinct chunks the committed state needs
    damage: list[Damage] = field(default_factory=list)

    @property
    def repaired(self) -> int:
        return sum(1 for d in self.damage if d.repaired)

    @property
    def remaining(self) -> int:
        return sum(1 for d in self.damage if not d.repaired)

    def line(self) -> str:
        """The machine-readable last line of `airlock scrub`."""
        return (f"scrub: chunks_checked={self.chunks_checked} bytes_checked={self.bytes_checked} "
                f"referenced={self.referenced} problems={len(self.damage)} repaired={self.repaired} "
                f"remaining={self.remaining}")


def _walk(store: ChunkStore) -> list[tuple[str, int]]:
    """(digest, stored size) of every chunk: the rows of the small-chunk
    database, then every chunk file in path order (a digest that is both is
    listed once: reads take the row)."""
    out = [(d.hex(), n) for d, n in store.small.sizes()]
    rows = {d for d, _n in out}
    for sub in sorted(os.listdir(store.root)):
        p = os.path.join(store.root, sub)
        if sub == "tmp" or len(sub) != 2 or not os.path.isdir(p):
            continue
        for name in sorted(os.listdir(p)):
            if not CHUNK_NAME.match(name) or name[:2] != sub or name in rows:
                continue
            try:
                out.append((name, os.lstat(os.path.join(p, name)).st_size))
            except FileNotFoundError:
                continue
    return out


async def scrub(data_dir: str, link: LinkClient | None, *, repair: bool = True,
                progress: Progress | None = None) -> ScrubReport:
    """Check every stored chunk and every referenced chunk; repair from the vault
    when `repair` (then `link` must be given).  The caller prints the report."""
    report = ScrubReport()
    index = committed_state(data_dir)          # read before the walk: every chunk it needs exists by then
    try:
        _objects, _parts, referenced = live_chunks(index)
    finally:
        index.close()
    report.referenced = len(referenced)
    store = open_store_shared(data_dir)
    files = _walk(store)
    total = sum(size for _d, size in files)
    done = 0
    on_disk = set()
    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="airlock-scrub") as executor:
        for i in range(0, len(files), SLICE):
            part = files[i:i + SLICE]
            problems = list(executor.map(lambda f: check_chunk(store, f[0]), part))
            for (digest, size), problem in zip(part, problems):
                on_disk.add(digest)
                report.chunks_checked += 1
                report.bytes_checked += size
                done += size
                if problem is not None:
                    report.damage.append(Damage(digest, problem, referenced=digest in referenced))
            if progress is not None:
                progress(done, total)
        for digest in sorted(referenced.keys() - on_disk):
            # the walk missed it: confirm (a chunk file written since is fine)
            problem = check_chunk(store, digest)
            report.chunks_checked += 1
            if problem is not None:
                report.damage.append(Damage(digest, problem))
        for d in report.damage:
            where = f", needed by {referenced[d.digest][1]}" if d.digest in referenced else \
                ", not referenced by any live object"
            log.warning("chunk %s: %s%s", d.digest, d.problem, where)
        if repair and report.damage:
            if link is None:
                raise E.ConfigError("repair needs the link to the vault")
            try:
                await link.connect()
            except (E.ReplicationError, OSError, asyncio.TimeoutError) as e:
                # the report still says what is damaged (and that it stays so)
                for d in report.damage:
                    d.error = f"the vault cannot be reached ({e})"
                return report
            try:
                await repair_from_vault(link, store, report.damage, executor)
            except (E.ReplicationError, OSError, asyncio.TimeoutError) as e:
                for d in report.damage:
                    if not d.repaired and not d.error:
                        d.error = f"the link to the vault was lost ({e})"
            finally:
                await link.close()
            for d in report.damage:
                if d.repaired and check_chunk(store, d.digest) is not None:   # belt and braces
                    d.repaired, d.error = False, "still does not verify after the repair"
    return report
