"""`airlock restore`: rebuild the primary's data from the vault, copying only
what is missing or corrupt.

Runs with the gateway stopped (it holds `PrimaryLock`), the vault running,
over one link session with the primary's identity:

1. Log.  The primary log must be a prefix of the vault log
   (primary/replication.py; a log ahead by at most one batch, which the
   gateway sends on when it connects, is refused with that advice).  An
   unreadable local log is moved aside to
   `log.damaged-<time>` and started empty.  The last local record (every
   one with `verify_log`) is compared with the vault's at the same sequence
   number: different bytes mean this is not a primary of this vault, and
   restore stops.  Records local_last+1 .. vault_last are fetched with
   GET_RECORDS and appended in order, one fsync per batch.
2. Pending aborts (`pending-aborts.json`) are kept: the gateway reconciles
   them with the vault on connect; until then they are void here too.
3. Index.  Rebuilt from the log into `index.sqlite.restore` and renamed
   over `index.sqlite`, so the gateway starts without a replay and a damaged
   index cannot survive a restore.
4. Chunks.  Every chunk of every live object and open upload part in scope
   (`bucket`, `prefix`) is read and verified once; the missing or corrupt
   ones are fetched from the vault, verified and written atomically
   (scrub.repair_chunk).

Every step is idempotent and every write is atomic or an append, so restore
can be killed at any point and rerun; a rerun copies only what is still
missing.  Until a run completes, some chunks the log references may be
absent locally.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from airlock import errors as E
from airlock.chunk.store import ChunkStore
from airlock.fsutil import fsync_dir
from airlock.link.client import LinkClient
from airlock.log.reader import read_log
from airlock.log.record import FormatError as LogFormatError
from airlock.log.writer import LogWriter
from airlock.primary.datalock import PrimaryLock
from airlock.primary.engine import replay_log
from airlock.primary.replication import MAX_BATCH_RECORDS
from airlock.primary.index import Index
from airlock.primary.scrub import (CHECK_THREADS, SLICE, Damage, Progress, check_chunk, live_chunks,
                                   repair_from_vault)

log = logging.getLogger("airlock.restore")

FETCH_RECORDS = 1000       # records asked for per GET_RECORDS (the vault also caps an answer at 8 MiB)
INDEX_FILE = "index.sqlite"


@dataclass
class RestoreSummary:
    objects: int = 0             # live objects in scope
    parts: int = 0               # parts of open multipart uploads in scope
    chunks_checked: int = 0      # distinct chunks in scope, each read and verified once
    bytes_checked: int = 0
    chunks_copied: int = 0       # fetched from the vault and written
    bytes_copied: int = 0
    records_fetched: int = 0     # log records appended from the vault
    log_last_seq: int = 0
    log_moved_aside: str | None = None  # where an unreadable log was moved
    log_tail_cut: int = 0                # bytes of a torn log tail cut when the log was opened
    failed: list[Damage] = field(default_factory=list)   # chunks that could not be restored

    def line(self) -> str:
        """The machine-readable last line of `airlock restore`."""
        return (f"restore: objects={self.objects} parts={self.parts} chunks_checked={self.chunks_checked} "
                f"bytes_checked={self.bytes_checked} chunks_copied={self.chunks_copied} "
                f"bytes_copied={self.bytes_copied} records_fetched={self.records_fetched} "
                f"failed={len(self.failed)}")


async def restore(data_dir: str, link: LinkClient, *, bucket: str | None = None, prefix: str = "",
                  verify_log: bool = False, progress: Progress | None = None) -> RestoreSummary:
    lock = PrimaryLock(data_dir)
    try:
        summary = RestoreSummary()
        await link.connect()
        try:
            void = _pending_aborts(data_dir)
            await _restore_log(data_dir, link, summary, verify_log)
            index = _rebuild_index(data_dir, void)
            try:
                if bucket is not None and index.bucket(bucket) is None:
                    # a typo must not read as "0 objects restored, all fine"
                    raise E.ConfigError(f"there is no bucket {bucket!r} (the primary log is restored from "
                                        f"the vault; no chunks were checked)")
                summary.objects, summary.parts, referrers = live_chunks(index, bucket, prefix)
            finally:
                index.close()
            await _restore_chunks(data_dir, link, referrers, summary, progress)
        finally:
            await link.close()
        return summary
    finally:
        lock.release()


# ---------------------------------------------------------------------- 1. log
def _open_log(log_dir: str, summary: RestoreSummary) -> LogWriter:
    try:
        return LogWriter(log_dir).open()
    except (E.FormatError, LogFormatError, OSError) as e:
        aside = f"{log_dir}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        n = 1
        while os.path.exists(aside):
            n += 1
            aside = f"{log_dir}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{n}"
        os.rename(log_dir, aside)
        fsync_dir(os.path.dirname(os.path.abspath(log_dir)))
        summary.log_moved_aside = aside
        log.warning("the primary log is unreadable (%s); moved it aside to %s and starting an empty "
                    "one, to be filled from the vault", e, aside)
        return LogWriter(log_dir).open()


async def _restore_log(data_dir: str, link: LinkClient, summary: RestoreSummary, verify_log: bool) -> None:
    log_dir = os.path.join(data_dir, "log")
    writer = _open_log(log_dir, summary)
    summary.log_tail_cut = writer.truncated_bytes
    if writer.truncated_bytes:
        log.warning("cut %d bytes of a torn or damaged tail off the primary log's last segment "
                    "(the records come back from the vault)", writer.truncated_bytes)
    try:
        local_last = writer.last_seq
        vault_last = int(link.hello["last_seq"])
        if 0 < local_last - vault_last <= MAX_BATCH_RECORDS:
            raise E.VaultRejected(
                f"the primary log ends at sequence {local_last}, the vault's at {vault_last}: the gateway "
                f"stopped while sending it these records (or the vault lost them); start the gateway "
                f"once, so that it sends them, then run restore again; nothing was changed")
        if local_last > vault_last:
            raise E.VaultRejected(
                f"the primary log ends at sequence {local_last} but the vault's at {vault_last}: the "
                f"primary log must be a prefix of the vault's (wrong vault, or the vault lost data); "
                f"nothing was changed")
        if local_last:
            await _compare_log(log_dir, link, 1 if verify_log else local_last, local_last)
        seq = local_last + 1
        while seq <= vault_last:
            records = await link.get_records(seq, FETCH_RECORDS)
            if not records:
                raise E.VaultRejected(f"the vault announced records up to {vault_last} but returned none from {seq}")
            for i, (s, _rtype, _payload) in enumerate(records):
                if s != seq + i:
                    raise E.VaultRejected(f"the vault returned record {s} where {seq + i} was expected")
            # queued together, written with one fsync (group commit)
            got = await asyncio.gather(*(writer.append(rtype, payload) for _s, rtype, payload in records))
            if list(got) != [s for s, _r, _p in records]:
                raise E.ReplicationError(f"primary log sequence diverged while restoring at {got[0]}")
            seq += len(records)
            summary.records_fetched += len(records)
        summary.log_last_seq = writer.last_seq
        if summary.records_fetched:
            log.info("appended %d record(s) from the vault to the primary log (%d..%d)",
                     summary.records_fetched, local_last + 1, vault_last)
    finally:
        await writer.aclose()


async def _compare_log(log_dir: str, link: LinkClient, first: int, last: int) -> None:
    """The local records first..last must be byte-identical to the vault's."""
    local = read_log(log_dir, from_seq=first)
    seq = first
    while seq <= last:
        theirs = await link.get_records(seq, min(FETCH_RECORDS, last - seq + 1))
        if not theirs:
            raise E.VaultRejected(f"the vault returned no record at sequence {seq}")
        for s, rtype, payload in theirs:
            mine = next(local)
            if s != mine.seq or rtype != mine.rtype or payload != bytes(mine.payload):
                raise E.VaultRejected(
                    f"record {mine.seq} of the primary log differs from the vault's record {s}: "
                    f"this data directory is not a primary of this vault; nothing was changed")
            seq += 1
            if seq > last:
                break


def _pending_aborts(data_dir: str) -> set[int]:
    import json
    try:
        with open(os.path.join(data_dir, "pending-aborts.json")) as f:
            return {int(s) for s in json.load(f)["seqs"]}
    except FileNotFoundError:
        return set()


# ---------------------------------------------------------------------- 3. index
def _rebuild_index(data_dir: str, void: set[int]) -> Index:
    """Replay the whole log into a new index, swap it in, return it opened."""
    path = os.path.join(data_dir, INDEX_FILE)
    tmp = path + ".restore"
    _unlink_db(tmp)
    index = Index(tmp)
    replay_log(index, os.path.join(data_dir, "log"), void)
    index.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    index.close()
    for suffix in ("-wal", "-shm"):
        _unlink(tmp + suffix)
    # the old WAL first: without it the old main file is still a consistent (older) index
    _unlink_db(path)
    os.replace(tmp, path)
    fsync_dir(data_dir)
    return Index(path)


def _unlink_db(path: str) -> None:
    for suffix in ("-wal", "-shm", ""):
        _unlink(path + suffix)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass




# ---------------------------------------------------------------------- 4. chunks
async def _restore_chunks(data_dir: str, link: LinkClient, referrers: dict[str, tuple[int, str]],
                          summary: RestoreSummary, progress: Progress | None) -> None:
    store = ChunkStore(data_dir)      # we hold the lock: emptying chunks/tmp/ is safe
    digests = sorted(referrers)
    total = sum(size for size, _who in referrers.values())
    done = 0
    loop = asyncio.get_running_loop()

    def copied(dmg: Damage, nbytes: int) -> None:
        summary.chunks_copied += 1
        summary.bytes_copied += nbytes

    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="airlock-restore") as executor:
        if progress is not None:
            progress(0, total)
        for i in range(0, len(digests), SLICE):
            part = digests[i:i + SLICE]
            problems = await asyncio.gather(*(loop.run_in_executor(executor, check_chunk, store, d)
                                              for d in part))
            damaged = [Damage(d, p) for d, p in zip(part, problems) if p is not None]
            for d in damaged:
                if d.problem != "missing":
                    log.warning("chunk %s (%s): %s", d.digest, referrers[d.digest][1], d.problem)
            if damaged:
                await repair_from_vault(link, store, damaged, executor, on_repaired=copied,
                                        missing_level=logging.DEBUG)
            for d in damaged:
                if not d.repaired:
                    log.error("chunk %s (%s): %s; could not restore it: %s",
                              d.digest, referrers[d.digest][1], d.problem, d.error)
                    summary.failed.append(d)
            summary.chunks_checked += len(part)
            n = sum(referrers[d][0] for d in part)
            summary.bytes_checked += n
            done += n
            if progress is not None:
                progress(done, total)
