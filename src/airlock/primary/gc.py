"""`airlock gc`: remove the chunks nothing references from the primary's
chunk store, with the gateway stopped.

    the data directory's lock          -> refused while a gateway runs
    vault's last sequence vs the log   -> refused unless they are equal (vault ahead:
                                          records this primary has not applied yet;
                                          behind by a batch: the gateway has to send it;
                                          further behind: not this primary's vault)
    committed state (log replay)       -> live chunks: every object, kept version
                                          and open multipart upload part
    files chunks/<2 hex>/<64 hex> not live -> unlinked, each directory fsynced once
    rows of small.sqlite not live      -> deleted, a batch per transaction

Why the gateway must be stopped: an upload that finds a chunk already stored
does not write it again (dedup), so a chunk that looks unreferenced while
uploads run may be about to be referenced by one of them.  With the lock
held no gateway writes here (`airlock scrub`, which takes no lock, may
repair chunks meanwhile: it writes only under chunks/tmp/, which gc leaves
alone, and renames over chunk files; at worst a chunk it repairs that
nothing references stays).  Why the vault is asked first: records the
vault acknowledged but this primary's log does not hold yet (a crash after
the acknowledgement; the gateway fetches them when it starts) reference
chunks that are on this disk; deleting those would only cost fetching them
back from the vault, but there is no reason to.  And a vault behind the
primary is not one whose copies gc may count on.

Files go before rows: on a full disk, which is when gc is wanted, deleting
rows needs room for SQLite's write-ahead log, and unlinking files makes it.

Nothing here can lose data the vault does not also have: only chunks no
committed record references are removed, and a chunk read later that is
missing is fetched from the vault and written back (docs/architecture.md,
"Reads").  An interrupted run leaves some of the garbage; run it again.  The
space of removed rows stays in small.sqlite (SQLite reuses free pages for
new rows); when the free pages come to SHRINK_MIN_BYTES and SHRINK_MIN_SHARE
of the file, gc rewrites it without them (VACUUM: one transaction, and it
needs free space about the size of the rows kept; on a disk too full for
that, gc says so and leaves the file as it is).  Removed files free their
space at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from airlock import errors as E
from airlock.chunk.store import ChunkStore
from airlock.fsutil import fsync_dir
from airlock.link.client import LinkClient
from airlock.log import payload as P
from airlock.log.reader import last_sequence, read_log
from airlock.primary.replication import MAX_BATCH_RECORDS
from airlock.primary.datalock import PrimaryLock
from airlock.primary.engine import committed_state
from airlock.primary.scrub import CHUNK_NAME, live_chunks

ROW_BATCH = 1000           # small-chunk rows deleted per transaction
SHRINK_MIN_BYTES = 16 << 20   # small.sqlite is rewritten when at least this much of it is free ...
SHRINK_MIN_SHARE = 0.25       # ... and at least this share of it


@dataclass
class GcReport:
    objects: int = 0            # current objects (their kept versions are live too)
    parts: int = 0              # open upload parts
    files_kept: int = 0
    files_removed: int = 0
    file_bytes_removed: int = 0
    rows_kept: int = 0
    rows_removed: int = 0
    row_bytes_removed: int = 0
    other_files: int = 0        # entries under chunks/ that are not chunk files or their directories (left alone)
    dry_run: bool = False
    primary_last_seq: int = 0
    vault_last_seq: int | None = None
    small_db_shrunk: tuple[int, int] | None = None   # small.sqlite (+ its log) bytes before and after
    small_db_not_shrunk: str | None = None           # why it could not be rewritten (a full disk)

    def line(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (f"gc: {verb} {self.files_removed} chunk file(s) ({self.file_bytes_removed:,} bytes) and "
                f"{self.rows_removed} small chunk(s) ({self.row_bytes_removed:,} bytes); kept "
                f"{self.files_kept} file(s) and {self.rows_kept} small chunk(s), referenced by "
                f"{self.objects} object(s) (with their kept versions) and {self.parts} open upload part(s)")


async def vault_last_seq(link: LinkClient) -> int:
    await link.connect()
    try:
        return int(link.hello["last_seq"])
    finally:
        await link.close()


async def gc(data_dir: str, link: LinkClient | None, *, dry_run: bool = False,
             fsync: bool = True) -> GcReport:
    """Remove unreferenced chunks from the primary at `data_dir`.  `link`:
    the vault to check first (None skips the check)."""
    if not os.path.isdir(os.path.join(data_dir, "log")):
        raise E.ConfigError(f"{data_dir} is not a primary data directory (no log/)")
    lock = PrimaryLock(data_dir)            # PolicyError while a gateway runs
    try:
        r = GcReport(dry_run=dry_run, primary_last_seq=last_sequence(os.path.join(data_dir, "log")))
        if link is not None:
            r.vault_last_seq = await vault_last_seq(link)
            if r.vault_last_seq > r.primary_last_seq:
                raise E.PolicyError(
                    f"the vault holds records this primary has not applied (vault log at "
                    f"{r.vault_last_seq}, primary log at {r.primary_last_seq}): start the gateway once, "
                    f"so that it fetches them, then run gc again")
            if r.primary_last_seq - r.vault_last_seq in range(1, MAX_BATCH_RECORDS + 1):
                raise E.PolicyError(
                    f"the primary log ends with records the vault never acknowledged (primary log at "
                    f"{r.primary_last_seq}, vault log at {r.vault_last_seq}; a gateway stopped while "
                    f"sending them): start the gateway once, so that it sends them, then run gc again")
            if r.vault_last_seq < r.primary_last_seq:
                raise E.PolicyError(
                    f"the vault's log (at {r.vault_last_seq}) is behind the primary's (at "
                    f"{r.primary_last_seq}): it is not this primary's vault, or it lost data; "
                    f"gc removes nothing while the vault may lack copies")
        collect(data_dir, r, dry_run=dry_run, fsync=fsync, vault_checked=link is not None)
        return r
    finally:
        lock.release()


def collect(data_dir: str, r: GcReport, *, dry_run: bool, fsync: bool, vault_checked: bool = True) -> None:
    """The sweep itself (lock held).  Without a vault check the end of the
    primary log may be records the vault lacks, which the gateway will send
    (with their chunks) when it connects: their chunks are kept."""
    index = committed_state(data_dir)
    try:
        r.objects, r.parts, live = live_chunks(index)
    finally:
        index.close()
    if not vault_checked:
        live = set(live) | _chunks_of_log_tail(data_dir)
    # tmp/ is left alone: the gateway empties it when it starts, and a scrub may be writing there
    store = ChunkStore(data_dir, fsync=fsync, clean_tmp=False)
    try:
        _sweep_files(store, live, r, dry_run, fsync)      # first: frees room on a full disk
        _sweep_rows(store, live, r, dry_run)
    finally:
        store.close()


def _chunks_of_log_tail(data_dir: str) -> set[str]:
    """Chunks of the primary log's last records, as many as may be beyond
    the vault's log (MAX_BATCH_RECORDS, and an ABORT), void or not: the
    vault's APPEND wants every chunk a record references, so the gateway may
    still need them to send those records (primary/replication.py
    `_push_tail`)."""
    log_dir = os.path.join(data_dir, "log")
    first = max(1, last_sequence(log_dir) - MAX_BATCH_RECORDS)
    out: set[str] = set()
    for rec in read_log(log_dir, first):
        try:
            out.update(P.chunks_referenced(rec.rtype, P.decode_payload(rec.rtype, bytes(rec.payload))))
        except (E.FormatError, KeyError, TypeError, ValueError, IndexError):
            pass        # not a record the vault would take either
    return out


def _sweep_rows(store: ChunkStore, live, r: GcReport, dry_run: bool) -> None:
    dead = []
    for digest, size in store.small.sizes():
        if digest.hex() in live:
            r.rows_kept += 1
            continue
        dead.append(digest)
        r.rows_removed += 1
        r.row_bytes_removed += size
    if dry_run:
        return
    for i in range(0, len(dead), ROW_BATCH):
        store.small.delete_many(dead[i:i + ROW_BATCH])
    try:
        r.small_db_shrunk = store.small.shrink(SHRINK_MIN_BYTES, SHRINK_MIN_SHARE)
    except OSError as e:         # the rows are deleted all the same; their pages are reused
        r.small_db_not_shrunk = str(e)


def _sweep_files(store: ChunkStore, live, r: GcReport, dry_run: bool, fsync: bool) -> None:
    for sub in sorted(os.listdir(store.root)):
        d = os.path.join(store.root, sub)
        if sub == "tmp" or not os.path.isdir(d):
            continue                        # small.sqlite and its companions are files
        if not _is_fanout(sub):
            r.other_files += 1              # lost+found, or anything else not ours to judge
            continue
        removed_here = False
        with os.scandir(d) as entries:      # the entry's type comes with it: no stat per kept chunk
            dead = []
            for e in entries:
                if not (CHUNK_NAME.match(e.name) and e.name[:2] == sub) or e.is_dir(follow_symlinks=False):
                    r.other_files += 1
                elif e.name in live:
                    r.files_kept += 1
                else:
                    dead.append(e)
        for e in dead:
            try:
                size = e.stat(follow_symlinks=False).st_size
                if not dry_run:
                    os.unlink(e.path)
            except FileNotFoundError:
                continue
            r.files_removed += 1
            r.file_bytes_removed += size
            removed_here = True
        if removed_here and fsync and not dry_run:
            fsync_dir(d)


def _is_fanout(name: str) -> bool:
    """chunks/<2 lowercase hex>: the directories chunk files live in."""
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)
