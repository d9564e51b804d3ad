"""The vault's storage: log -> overlays -> base volume (claims 18-23, 34-41).

    append(records): chunks durable (fdatasync newest overlay) -> records durable
                     in the vault log (group fsync) -> records written into the
                     newest overlay and applied to the in-memory overlay view
    read_chunk:      overlays newest-first, then the base volume; BLAKE3-verified
    state answers:   base version table + overlay view, ABORT-voided records excluded
    compaction:      airlock.vault.compaction (oldest sealed overlay -> base)

Formats, recovery and garbage collection: docs/format/vault.md.

Concurrency: one event loop calls append (serialized by an asyncio lock);
put_chunk and compaction may run on worker threads.  All metadata (overlay
list and view, catalog connection) is guarded by `_lock`; chunk bytes are read
outside it, and a read that loses a race with compaction (overlay deleted)
walks the chain again.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice, takewhile

import blake3

from airlock.aio import retrieve_exception
from airlock.errors import FormatError, IntegrityError, VaultRejected
from airlock.fsutil import fsync_dir
from airlock.log.reader import read_log
from airlock.log.record import MAX_PAYLOAD
from airlock.log.writer import LogWriteError, LogWriter
from airlock.vault import compaction, snapshots
from airlock.vault.base import VOLUME_HEADER_SIZE, BaseVolume
from airlock.vault.catalog import (
    BUCKET_KINDS, CONFIG_KINDS, OBJECT_KINDS, RECORD_ABORT, Catalog, Entry, Retention, classify, remove_catalog, version_dict,
)
from airlock.vault.overlay import (
    NAME, OVERLAY_HEADER_SIZE, Overlay, decode_header, list_overlays,
)

__all__ = ["VaultStore", "RECORD_ABORT", "OVERLAY_MAX_BYTES", "OVERLAY_MAX_AGE_S"]

log = logging.getLogger("airlock.vault")

OVERLAY_MAX_BYTES = 256 * 2**20   # bytes; seal past this so one merge (and one recovery scan) stays bounded
OVERLAY_MAX_AGE_S = 600.0         # seconds; seal older overlays so compaction can reach recent changes
WRITEBACK_BYTES = 1 * 2**20       # chunk bytes received between early (background) overlay fdatasyncs
READ_RETRIES = 5                  # read-chain walks when compaction deletes an overlay under a reader


def _rejected(code: str, message: str, **attrs) -> VaultRejected:
    err = VaultRejected(message)
    err.code = code
    for k, v in attrs.items():
        setattr(err, k, v)
    return err


class _OverlayView:
    """Object/bucket history of the records held in overlays (not yet merged)."""

    def __init__(self, overlays: list[Overlay], known: dict[int, Entry] | None = None):
        self.by_seq: dict[int, Entry] = {}
        self.versions: dict[tuple[str, str], list[Entry]] = {}
        self.bucket_events: list[Entry] = []
        self.voids: set[int] = set()
        known = known or {}
        for ov in overlays:
            for r in ov.records:
                e = known.get(r.seq)
                self.apply(e if e is not None else classify(r.seq, r.rtype, r.payload))

    def apply(self, e: Entry) -> None:
        self.by_seq[e.seq] = e
        if e.kind in OBJECT_KINDS:
            self.versions.setdefault((e.bucket, e.key), []).append(e)
        elif e.kind in BUCKET_KINDS or e.kind in CONFIG_KINDS:
            self.bucket_events.append(e)
        self.voids.update(e.voids)

    def latest(self, bucket: str, key: str) -> Entry | None:
        for e in reversed(self.versions.get((bucket, key), ())):
            if e.seq not in self.voids:
                return e
        return None


class VaultStore:
    def __init__(self, data_dir: str, *, overlay_max_bytes: int = OVERLAY_MAX_BYTES,
                 overlay_max_age_s: float = OVERLAY_MAX_AGE_S, fsync: bool = True,
                 retention: Retention | None = None):
        self.data_dir = os.fspath(data_dir)
        self.log_dir = os.path.join(self.data_dir, "log")
        self.overlay_dir = os.path.join(self.data_dir, "overlays")
        self.base_dir = os.path.join(self.data_dir, "base")
        self.catalog_path = os.path.join(self.base_dir, "base.sqlite")
        self.volume_path = os.path.join(self.base_dir, "volume.dat")
        self.overlay_max_bytes = overlay_max_bytes
        self.overlay_max_age_s = overlay_max_age_s
        self.fsync = fsync
        self.retention = retention if retention is not None else Retention()   # default: keep forever
        self.clock_ns = time.time_ns      # vault clock of merges and retention (tests replace it)
        self.last_seq = 0
        self.recovery: dict = {}
        self._lock = threading.RLock()
        self._compact_lock = threading.RLock()   # re-entered by periodic_snapshot
        self._append_lock: asyncio.Lock | None = None
        self._unsynced = 0                       # chunk bytes appended since the last early writeback
        self._writeback: ThreadPoolExecutor | None = None
        self._writeback_job = None
        self._overlays: list[Overlay] = []
        self._view = _OverlayView([])
        self._log: LogWriter | None = None
        self._catalog: Catalog | None = None
        self._volume: BaseVolume | None = None
        self._failed: BaseException | None = None
        self._generation = 0                     # bumped when reopen swaps in recovered files
        self._floor_ns = 0

    # ================================================================== open / recovery
    def open(self) -> "VaultStore":
        """Recover (docs/format/vault.md, "Recovery") and get ready to append."""
        try:
            return self._recover()
        except BaseException:
            for ov in self._overlays:
                ov.close()
            for closeable in (self._log, self._catalog, self._volume):
                if closeable is not None:
                    try:
                        closeable.close()
                    except Exception:  # noqa: BLE001 - already failing; keep the first error
                        pass
            self._log = self._catalog = self._volume = None
            raise

    def _recover(self) -> "VaultStore":
        for d in (self.overlay_dir, self.base_dir):
            os.makedirs(d, exist_ok=True)
        rec = self.recovery = {"log_truncated_bytes": 0, "volume_truncated_bytes": 0,
                               "merged_overlays_deleted": [], "torn_overlays": [], "sealed_on_open": [],
                               "replayed": 0, "catalog_rebuilt": False}
        # 1. log
        self._log = LogWriter(self.log_dir).open()
        rec["log_truncated_bytes"] = self._log.truncated_bytes
        last = self._log.last_seq
        # 2. catalog
        catalog = None
        if os.path.exists(self.catalog_path):
            try:
                catalog = Catalog(self.catalog_path, self.fsync)
                catalog.merged_through_seq  # noqa: B018 - readable?
            except (sqlite3.DatabaseError, FormatError, TypeError) as e:
                log.error("vault catalog %s unreadable (%r); rebuilding it from the log (its snapshot "
                          "definitions cannot be rebuilt and are lost)", self.catalog_path, e)
                if catalog is not None:
                    catalog.close()
                catalog = None
        self._catalog = catalog
        # 3. base volume
        self._volume = BaseVolume(self.volume_path, self.fsync).open()
        if catalog is not None:
            rec["volume_truncated_bytes"] = self._volume.truncate(catalog.volume_end)
        # 4. overlays already merged
        merged = catalog.merged_names() if catalog is not None else set()
        found = list_overlays(self.overlay_dir)
        remaining = []
        for ns, path in found:
            if os.path.basename(path) in merged:
                os.unlink(path)
                rec["merged_overlays_deleted"].append(os.path.basename(path))
            else:
                remaining.append((ns, path))
        # 5. scan the rest
        overlays: list[Overlay] = []
        for i, (ns, path) in enumerate(remaining):
            newest = i == len(remaining) - 1
            if newest and os.path.getsize(path) <= OVERLAY_HEADER_SIZE and not _valid_header(path):
                os.unlink(path)          # torn while being created: holds nothing
                rec["torn_overlays"].append(os.path.basename(path))
                continue
            ov, end, status = Overlay.scan(path, ns)
            if status != "ok":
                log.warning("overlay %s: torn tail of %d bytes cut", ov.name, os.path.getsize(path) - end)
                rec["torn_overlays"].append(ov.name)
                ov.truncate(end, self.fsync)
            overlays.append(ov)
        if rec["merged_overlays_deleted"] or rec["torn_overlays"]:
            self._sync_dir()
        for ov in overlays[:-1]:
            if not ov.sealed:
                ov.open_for_append()
                ov.seal(self.fsync)
                rec["sealed_on_open"].append(ov.name)
        # 6. catalog rebuild
        if catalog is None:
            fresh = last == 0 and self._volume.size() == VOLUME_HEADER_SIZE and not overlays
            catalog = self._build_catalog(overlays, last, quiet=fresh)
            rec["catalog_rebuilt"] = not fresh
        self._catalog = catalog
        # names of merged (deleted) overlays are never reused, even if the clock went back
        self._floor_ns = max((int(n[3:23]) for n in catalog.merged_names() if NAME.match(n)), default=0)
        # 7. contiguity, then replay the log into the newest overlay
        expected = catalog.merged_through_seq + 1
        for ov in overlays:
            for r in ov.records:
                if r.seq != expected:
                    raise FormatError(f"overlay {ov.name}: record seq {r.seq}, expected {expected} "
                                      f"(base merged through {catalog.merged_through_seq})")
                expected += 1
        held = expected - 1
        if held > last:
            raise FormatError(f"overlays hold records through seq {held} but the vault log ends at {last}")
        if overlays and not overlays[-1].sealed:
            overlays[-1].open_for_append()
        else:
            overlays.append(self._new_overlay(overlays))
        self._overlays = overlays
        if held < last:
            newest = overlays[-1]
            for r in read_log(self.log_dir, held + 1):
                newest.append_record(r.seq, r.rtype, r.payload)
                rec["replayed"] += 1
            if self.fsync:
                newest.sync()
        self._rebuild_view()
        self.last_seq = last
        return self

    def _build_catalog(self, overlays: list[Overlay], last: int, quiet: bool = False,
                       carry_snapshots_from: str | None = None) -> Catalog:
        """A fresh catalog from volume.dat (chunk map) and the log (versions).

        Built under a temporary name and renamed into place: a crash midway
        must never leave a valid-looking empty catalog, whose volume_end would
        make the next open truncate the base volume."""
        tmp = self.catalog_path + ".rebuild"
        remove_catalog(tmp)
        catalog = Catalog(tmp, self.fsync)
        if carry_snapshots_from is not None:
            # before the policy is applied, so what the snapshots need is protected
            snapshots.copy_tables(catalog.db, carry_snapshots_from)
        chunks = []
        end = VOLUME_HEADER_SIZE
        for digest, off, n, ext_end in self._volume.scan():
            chunks.append((digest, off, n))
            end = ext_end
        if self._volume.damaged:
            # not repaired: kept in place, reported; the chunks in them are unmapped
            log.error("base volume %s: damaged regions %s skipped while rebuilding the chunk map",
                      self.volume_path, self._volume.damaged)
            self.recovery.setdefault("volume_damaged", []).extend(self._volume.damaged)
            if self._volume.damaged[-1][1] == self._volume.size() and self._volume.damaged[-1][0] >= end:
                self._volume.damaged.pop()       # a torn tail (an uncommitted merge): cut below
        self._volume.truncate(end)
        firsts = [ov.first_seq for ov in overlays if ov.first_seq is not None]
        through = min(firsts) - 1 if firsts else last
        entries = ((classify(r.seq, r.rtype, r.payload), r.payload)
                   for r in takewhile(lambda r: r.seq <= through, read_log(self.log_dir, 1)))
        # the log holds what retention pruned: apply the policy again (docs/format/vault.md,
        # "Retention"); the rebuild counts as the merge of 1..through at the vault's now
        now_ns = self.clock_ns()
        unmerged = [classify(r.seq, r.rtype, r.payload) for ov in overlays for r in ov.records]
        pruned = catalog.commit_merge(chunks, entries, end, through, f"rebuild-{now_ns}" if through else None,
                                      retention=self.retention, now_ns=now_ns,
                                      exclude={s for e in unmerged for s in e.voids},
                                      referenced=(d for e in unmerged for d in e.chunks))
        if pruned:
            log.info("retention pruned %d non-current versions from the rebuilt catalog", pruned)
        catalog.close()
        remove_catalog(self.catalog_path)
        os.replace(tmp, self.catalog_path)
        if self.fsync:
            fsync_dir(self.base_dir)
        catalog = Catalog(self.catalog_path, self.fsync)
        if not quiet:
            log.warning("vault catalog rebuilt: %d chunks, versions through seq %d", len(chunks), through)
        return catalog

    def rebuild_catalog_from_log(self) -> None:
        """Replace base.sqlite by one rebuilt from volume.dat and the log (claim 19)."""
        with self._compact_lock, self._lock:
            self._catalog.close()
            self._catalog = self._build_catalog(self._overlays, self.last_seq,
                                                carry_snapshots_from=self.catalog_path)
            self._rebuild_view()

    async def aclose(self) -> None:
        # an APPEND still being made durable (its session was cancelled by
        # the stop, the append is shielded) ends before the files close
        async with self._append_lock or contextlib.nullcontext():
            if self._log is not None:
                await self._log.aclose()
            self.close_sync()

    def _writeback_pool(self) -> ThreadPoolExecutor:
        if self._writeback is None:
            self._writeback = ThreadPoolExecutor(1, thread_name_prefix="vault-writeback")
        return self._writeback

    def close_sync(self) -> None:
        """Close files without awaiting the log (no appends may be in flight)."""
        if self._writeback is not None:
            self._writeback.shutdown(wait=True)     # an early writeback may hold a dup of the overlay fd
            self._writeback = None
        # the log first and outside the lock: its I/O thread may be in an
        # APPEND's overlay sync (_sync_for_append), which takes the lock
        if self._log is not None and self._log._flusher is None:
            self._log.close()
        with self._lock:
            for ov in self._overlays:
                ov.close()
            if self._catalog is not None:
                self._catalog.close()
                self._catalog = None
            if self._volume is not None:
                self._volume.close()
                self._volume = None

    # ================================================================== chunks
    def has_chunk(self, digest_hex: str) -> bool:
        with self._lock:
            return self._has_chunk(digest_hex)

    def _has_chunk(self, digest_hex: str) -> bool:
        return any(digest_hex in ov.chunks for ov in self._overlays) or self._catalog.chunk(digest_hex) is not None

    def put_chunk(self, digest_hex: str, data) -> None:
        """Keep a chunk (caller verified its digest) in the newest overlay unless
        the vault has it.  Durable only once an append that follows returns."""
        digest_hex = digest_hex.lower()
        with self._lock:
            if self._has_chunk(digest_hex):
                return                  # (as has_chunk: answered even while the store is failed)
            self._check_usable()
            self._seal_if_due()
            try:
                self._overlays[-1].append_chunk(digest_hex, data)
            except OSError as e:
                self._stop(e, "vault chunk write")
                raise
            self._unsynced += len(data)
            if self.fsync and self._unsynced >= WRITEBACK_BYTES and (
                    self._writeback_job is None or self._writeback_job.done()):
                # Start writing this data back now, while the rest of the upload
                # arrives, so that the fdatasync the APPEND waits for is short.
                self._unsynced = 0
                self._writeback_job = self._writeback_pool().submit(self._early_writeback)

    def missing_chunks(self, records) -> list[str]:
        """Chunk ids referenced by these (seq, rtype, payload) records that the vault lacks."""
        entries = []
        for seq, rtype, payload in records:
            try:
                entries.append(classify(seq, rtype, bytes(payload)))
            except FormatError:
                continue
        return self._missing_chunks(entries)

    def _missing_chunks(self, entries) -> list[str]:
        """... of records already classified (the APPEND has decoded them once)."""
        out: dict[str, None] = {}
        with self._lock:
            for e in entries:
                for d in e.chunks:
                    if d not in out and not self._has_chunk(d):
                        out[d] = None
        return list(out)

    def read_chunk(self, digest_hex: str) -> bytes:
        """A chunk's bytes: overlays newest-first, then the base volume (claims 37, 38)."""
        digest_hex = digest_hex.lower()
        for _ in range(READ_RETRIES):
            with self._lock:
                gen = self._generation
                where = None
                for ov in reversed(self._overlays):
                    loc = ov.chunks.get(digest_hex)
                    if loc is not None:
                        where = (ov, *loc)
                        break
                if where is None:
                    loc = self._catalog.chunk(digest_hex)
                    if loc is None:
                        raise KeyError(digest_hex)
                    volume = self._volume
            try:
                if where is not None:
                    ov, off, n = where
                    data = ov.read_chunk_at(off, n)
                    what = f"overlay {ov.name} chunk at {off}"
                else:
                    data = volume.read_data(*loc)
                    what = f"base volume extent at {loc[0]}"
            except FileNotFoundError:
                continue             # compaction merged and deleted the overlay: walk the chain again
            except (OSError, ValueError, TypeError, FormatError):
                if self._generation != gen:
                    continue         # a recovery in place closed these files meanwhile: walk the new chain
                raise
            actual = blake3.blake3(data).hexdigest()
            if actual != digest_hex:
                raise IntegrityError(what, digest_hex, actual)
            return data
        raise KeyError(digest_hex)

    # ================================================================== append
    async def append(self, records: list[tuple[int, int, bytes]]) -> int:
        """Make records durable (see module doc); returns the last durable seq."""
        if self._append_lock is None:
            self._append_lock = asyncio.Lock()
        # shielded: a cancelled caller must not leave records in the log but not the overlay
        task = asyncio.get_running_loop().create_task(self._append_serialized(records))
        task.add_done_callback(retrieve_exception)      # a failure is logged by _stop; the caller may be gone
        return await asyncio.shield(task)

    async def _append_serialized(self, records) -> int:
        async with self._append_lock:
            self._check_usable()
            new: list[tuple[int, int, bytes]] = []
            for seq, rtype, payload in records:
                payload = bytes(payload)
                if not new and seq <= self.last_seq:
                    held = self._stored_record(seq)
                    if held != (rtype, payload):
                        log.error("refused rewrite of seq %d (rtype %d, %d bytes)", seq, rtype, len(payload))
                        raise _rejected("rewrite_refused", f"seq {seq} is already held with different "
                                        f"content; the vault does not rewrite history", seq=seq)
                    continue                     # identical retransmission
                expect = new[-1][0] + 1 if new else self.last_seq + 1
                if seq != expect:
                    raise _rejected("sequence_gap", f"record seq {seq}, expected {expect}",
                                    last_seq=self.last_seq)
                new.append((seq, rtype, payload))
            if not new:
                return self.last_seq
            try:
                entries = [classify(*r) for r in new]
                for seq, _rtype, payload in new:
                    if len(payload) > MAX_PAYLOAD:
                        raise FormatError(f"record {seq}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
            except FormatError as e:
                raise _rejected("bad_record", str(e)) from e
            # A record voided by an ABORT in this same APPEND never takes
            # effect, so its chunks need not be here: the primary pushes a
            # 503'd record it holds together with the ABORT that voids it,
            # and may no longer have (or never have had) a good copy of a
            # chunk of it (docs/format/link.md, APPEND).
            voided = {s for e in entries for s in e.voids}
            missing = self._missing_chunks([e for e in entries if e.seq not in voided] if voided else entries)
            if missing:
                raise _rejected("missing_chunks", f"{len(missing)} referenced chunks are missing",
                                digests=missing)
            try:
                # 2. every chunk these records reference is durable, then
                # 3. the records are durable in the vault log (one group
                # fsync); both on the log's I/O thread, in one hop
                if self._log.last_seq != self.last_seq:
                    raise RuntimeError(f"vault log at {self._log.last_seq}, store at {self.last_seq}")
                try:
                    seqs = await self._log.append_many([(rtype, payload) for _s, rtype, payload in new],
                                                       before=self._sync_for_append)
                except LogWriteError as e:
                    if isinstance(e.__cause__, VaultRejected):
                        # a refusal by the sync (the store failed meanwhile) is reported as itself
                        raise e.__cause__ from None
                    raise
                if seqs != [seq for seq, _r, _p in new]:
                    raise RuntimeError(f"vault log assigned seqs {seqs[:3]}... to records {new[0][0]}..")
                # 4. into the newest overlay (claims 35, 36) and the overlay view
                with self._lock:
                    for (seq, rtype, payload), e in zip(new, entries):
                        self._overlays[-1].append_record(seq, rtype, payload)
                        self._view.apply(e)
                        self.last_seq = seq
                    self._seal_if_due()
            except BaseException as e:
                self._stop(e, "vault append")
                raise
            return self.last_seq

    # ================================================================== recovery in place
    async def reopen(self) -> bool:
        """Recover from a failed write without a restart (a full disk that has
        space again, docs/format/vault.md "Recovery in place").  Everything
        written after the last sync that succeeded is cut -- the log's active
        segment and the newest overlay go back to their durable ends, since
        after a failed write or fdatasync the page cache may hold bytes the
        disk does not -- and then the store recovers exactly as at start.
        Records the vault acknowledged were synced, so they are kept; records
        of the failed batch were never acknowledged, and the primary resends
        (or voids) them when it reconnects.  Returns True if the store takes
        appends again; on failure it stays failed (with the new error) and
        may be retried."""
        if self._failed is None:
            return True
        if self._append_lock is None:
            self._append_lock = asyncio.Lock()
        async with self._append_lock:          # no append in flight while the files are swapped
            if self._failed is None:
                return True
            if self._log is not None:
                await self._log.aclose()
            return await asyncio.to_thread(self._reopen_sync)

    _STATE = ("_log", "_overlays", "_view", "_catalog", "_volume", "last_seq", "recovery", "_floor_ns",
              "_unsynced", "_writeback", "_writeback_job")

    def _reopen_sync(self) -> bool:
        with self._compact_lock:               # no merge touches the overlays or the base meanwhile
            if self._writeback is not None:
                self._writeback.shutdown(wait=True)
                self._writeback = None
            with self._lock:
                cuts = []
                if self.fsync and self._log is not None:   # without fsync nothing was ever synced: no cut
                    cuts.append(self._log.durable_end)
                if self.fsync and self._overlays and not self._overlays[-1].sealed:
                    ov = self._overlays[-1]
                    cuts.append((ov.path, ov.synced_size))
                cause = self._failed
                if self._log is not None:
                    self._log.close()          # failed or idle: the append lock is held
            # Recover into a new store object while this one keeps serving
            # reads; swap only if that succeeds, so that a disk still full
            # leaves the reads working (the cut bytes were never acknowledged).
            try:
                for path, end in cuts:
                    _cut_to(path, end, self.fsync)
                fresh = VaultStore(self.data_dir, overlay_max_bytes=self.overlay_max_bytes,
                                   overlay_max_age_s=self.overlay_max_age_s, fsync=self.fsync,
                                   retention=self.retention)
                fresh.clock_ns = self.clock_ns
                fresh.open()
            except BaseException as e:  # noqa: BLE001 - still failed; the caller retries
                log.error("vault store could not recover in place (after %r): %r", cause, e)
                with self._lock:
                    self._failed = e
                return False
            with self._lock:
                old = (self._overlays, self._catalog, self._volume)
                for name in self._STATE:
                    setattr(self, name, getattr(fresh, name))
                self._generation += 1
                self._failed = None
            for ov in old[0]:
                ov.close()
            for closeable in old[1:]:
                if closeable is not None:
                    closeable.close()
            log.warning("vault store recovered in place after %r: log at %d, cut %s", cause,
                        self.last_seq, ", ".join(f"{os.path.basename(p)}@{n}" for p, n in cuts) or "nothing")
            return True

    def _stored_record(self, seq: int) -> tuple[int, bytes] | None:
        with self._lock:
            e = self._view.by_seq.get(seq)
            if e is not None:
                for ov in self._overlays:
                    if ov.first_seq is not None and ov.first_seq <= seq <= ov.last_seq:
                        r = ov.records[seq - ov.first_seq]
                        return r.rtype, r.payload
            held = self._catalog.record(seq)
        if held is not None:
            return held
        for r in read_log(self.log_dir, seq):
            return (r.rtype, r.payload) if r.seq == seq else None
        return None

    def _sync_newest(self) -> None:
        if not self.fsync:
            return
        # sync a duplicate descriptor outside the lock so reads and put_chunk
        # are not held up by the fdatasync; an overlay sealed meanwhile was
        # fdatasynced by its seal, which covers the same chunks.
        with self._lock:
            ov = self._overlays[-1]
            size = ov.size
            fd = os.dup(ov.fd) if ov.fd is not None else None
        if fd is not None:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            with self._lock:
                ov.synced_size = max(ov.synced_size, size)

    def _sync_for_append(self) -> None:
        """Before an APPEND's records are written to the log (on its I/O
        thread): the chunks they reference are durable."""
        self._sync_newest()
        # An early writeback running meanwhile may have seen the error this
        # sync did not: both sync dups of one open file, and Linux reports a
        # writeback error to one of them only.  Wait for it to have recorded
        # its outcome (_stop) before looking.  (Off the event loop, so the
        # wait costs no other request anything; the writeback takes no lock
        # this thread holds.)
        job = self._writeback_job
        if job is not None:
            job.exception()
        if self._failed is not None:
            raise _rejected("internal", f"vault store failed a write and is recovering: {self._failed!r}")

    def _early_writeback(self) -> None:
        try:
            self._sync_newest()
        except OSError as e:
            # the error may be reported to this fdatasync only, not to the
            # APPEND's: no append may succeed after it
            with self._lock:
                self._stop(e, "vault overlay writeback")

    def _stop(self, e: BaseException, what: str) -> None:
        """A write failed: refuse appends until `reopen` succeeds.  The first
        error is the one kept (later ones are its consequences)."""
        if self._failed is None:
            self._failed = e
            log.error("%s failed; refusing appends until recovered in place: %r", what, e)

    @property
    def announced_last_seq(self) -> int:
        """The last seq HELLO announces and GET_RECORDS serves up to.  After a
        failed write the log may hold durable records the overlay never took
        (store.last_seq lags): announcing those is what lets a primary that
        reconnects meanwhile void them instead of reusing their numbers, and
        it is what the recovery in place will keep."""
        if self._failed is not None and self._log is not None:
            return max(self.last_seq, self._log.last_seq)
        return self.last_seq

    @property
    def failed(self) -> BaseException | None:
        """The write error that stopped appends (until `reopen`), or None."""
        return self._failed

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise _rejected("internal", f"vault store failed a write and is recovering: {self._failed!r}")
        if self._catalog is None:
            raise RuntimeError("VaultStore is not open")

    # ================================================================== overlays
    def _new_overlay(self, overlays: list[Overlay]) -> Overlay:
        ns = max(time.time_ns(), self._floor_ns + 1)
        if overlays:
            ns = max(ns, overlays[-1].created_ns + 1)
        return Overlay.create(self.overlay_dir, ns, self.fsync)

    def maybe_seal(self) -> None:
        """Seal the open overlay if it reached its size or age limit (the
        vault daemon calls this on a timer, so an idle overlay still ages out)."""
        with self._lock:
            if self._failed is None:
                self._seal_if_due()

    def _seal_if_due(self) -> None:
        ov = self._overlays[-1]
        age = (time.time_ns() - ov.created_ns) / 1e9
        if ov.size >= self.overlay_max_bytes or (ov.has_content and age >= self.overlay_max_age_s):
            self._seal_newest()

    def _seal_newest(self) -> None:
        # SEAL is fdatasynced before the next overlay exists (invariant 5).  A
        # failure (the SEAL's sync, creating the next overlay) stops the store
        # like any failed write: the next put_chunk would find no open overlay
        try:
            self._overlays[-1].seal(self.fsync)
            self._overlays.append(self._new_overlay(self._overlays))
        except BaseException as e:
            self._stop(e, "sealing the open overlay")
            raise

    def seal(self) -> None:
        """Seal the newest overlay and open a new one."""
        with self._lock:
            self._check_usable()
            self._seal_newest()

    def _rebuild_view(self) -> None:
        self._view = _OverlayView(self._overlays, self._view.by_seq)

    def _sync_dir(self) -> None:
        if self.fsync:
            fsync_dir(self.overlay_dir)

    # ================================================================== compaction
    def compact_oldest(self, progress=None) -> dict | None:
        """Merge the oldest sealed overlay into the base volume; None if there is none."""
        return compaction.merge_oldest_overlay(self, progress)

    def compact(self, keep: int = 0, progress=None) -> list[dict]:
        """Seal the newest overlay (keep == 0) and merge until at most `keep` sealed overlays remain."""
        with self._lock:
            self._check_usable()
            if keep == 0 and self._overlays[-1].has_content:
                self._seal_newest()
            else:
                self._seal_if_due()
        out = []
        while True:
            with self._lock:
                sealed = sum(1 for ov in self._overlays if ov.sealed)
            if sealed <= keep:
                break
            result = self.compact_oldest(progress)
            if result is None:
                break
            out.append(result)
        if not out:
            compaction.prune_base(self)      # nothing merged: history still ages out
        return out

    # ================================================================== state answers
    def manifest(self, bucket: str, key: str, seq: int | None = None) -> dict | None:
        """The current manifest (None if deleted or absent), or the one record `seq` committed."""
        with self._lock:
            view = self._view
            if seq is not None:
                if seq in view.voids:
                    return None
                e = view.by_seq.get(seq)
                if e is not None:
                    ok = e.kind == "put" and e.bucket == bucket and e.key == key
                    return e.manifest if ok else None
                row = self._catalog.version_at(seq)
                if row is None:
                    # pruned from the base, but a snapshot may hold it
                    row = snapshots.held_record(self._catalog.db, seq)
                if row is None:
                    return None
                kind, b, k, m = row
                return m if kind == "put" and b == bucket and k == key else None
            e = view.latest(bucket, key)
            if e is not None:
                return e.manifest if e.kind == "put" else None
            row = self._catalog.latest_version(bucket, key, view.voids)
            if row is None:
                return None
            return row[2] if row[1] == "put" else None

    def versions(self, bucket: str, key: str) -> list[dict]:
        """Every version of a key incl. delete markers, oldest first; voided records excluded."""
        with self._lock:
            view = self._view
            out = {s: version_dict(s, k, m, b) for s, k, m, b in self._catalog.version_rows(bucket, key)
                   if s not in view.voids}
            for e in view.versions.get((bucket, key), ()):
                if e.seq not in view.voids:
                    out[e.seq] = version_dict(e.seq, e.kind, e.manifest, e.body)
        return [out[s] for s in sorted(out)]

    def buckets(self) -> list[dict]:
        with self._lock:
            return self._buckets_as_of(None)

    def _buckets_as_of(self, point: int | None) -> list[dict]:
        """Buckets that exist after record `point` (None: now), each with its
        configuration then: S3 versioning status ('' if never set) and tag
        set (URL query text, records.md type 12; None if none).  Lock held."""
        view = self._view
        events = {s: (k, b, body) for s, k, b, body in self._catalog.bucket_events()
                  if point is None or s <= point}
        for e in view.bucket_events:
            if point is None or e.seq <= point:
                events[e.seq] = (e.kind, e.bucket, e.body)
        current: dict[str, dict] = {}
        for s in sorted(events):
            if s in view.voids:
                continue
            kind, b, body = events[s]
            if kind == "bucket-create":
                current[b] = {"bucket": b, "owner": body.get("owner"), "created": body.get("created"),
                              "versioning": "", "tagging": None}
            elif kind == "bucket-delete":
                current.pop(b, None)
            elif b in current:
                if kind == "bucket-versioning":
                    current[b]["versioning"] = body["status"]
                else:
                    current[b]["tagging"] = body["tagging"]
        return [current[b] for b in sorted(current)]

    def list_objects(self, bucket: str, prefix: str = "", after: str | None = None,
                     limit: int = 1000) -> tuple[list[dict], bool]:
        """Current manifests in key order (overlay versions override the base)."""
        with self._lock:
            view = self._view
            ov = self._overlay_keys(bucket, prefix, after, lambda b, k: view.latest(b, k))
            base = self._catalog.current_objects(bucket, prefix, after, view.voids)
            return _merge_listing(ov, base, limit)

    def _overlay_keys(self, bucket: str, prefix: str, after: str | None, latest) -> dict[str, Entry]:
        """{key: the overlays' entry that decides it} for keys in scope.  Lock held."""
        lo = after if after is not None and after >= prefix else None
        out: dict[str, Entry] = {}
        for (b, k) in self._view.versions:
            if b == bucket and k.startswith(prefix) and (lo is None or k > lo):
                e = latest(b, k)
                if e is not None:
                    out[k] = e
        return out

    def records(self, from_seq: int, max_count: int) -> list[tuple[int, int, bytes]]:
        """Records from the vault log, seq >= from_seq, at most max_count, only durable ones."""
        last = self.announced_last_seq
        out = []
        for r in islice(read_log(self.log_dir, max(1, from_seq)), max_count):
            if r.seq > last:
                break
            out.append((r.seq, r.rtype, r.payload))
        return out

    def status(self) -> dict:
        with self._lock:
            if self._catalog is None:          # closed: a recovery in place failed (retried)
                return {"last_seq": self.last_seq, "failed": repr(self._failed), "overlays": []}
            overlays = [{"name": ov.name, "created": ov.created_ns / 1e9, "sealed": ov.sealed,
                         "bytes": ov.size, "chunks": len(ov.chunks), "records": len(ov.records)}
                        for ov in self._overlays]
            counts = self._catalog.counts()
            retention = {"keep_versions": self.retention.keep_versions, "keep_days": self.retention.keep_days,
                         **self._catalog.prune_stats()}
            return {"last_seq": self.last_seq, "overlays": overlays,
                    **({"failed": repr(self._failed)} if self._failed is not None else {}),
                    "base": {"bytes": self._catalog.volume_end, "chunks": counts["chunks"],
                             "versions": counts["versions"]},
                    "merged_through_seq": self._catalog.merged_through_seq,
                    "retention": retention,
                    "snapshots": snapshots.list_snapshots(self._catalog.db, with_accounting=False)}

    # ================================================================== snapshots
    # docs/format/vault.md, "Snapshots".  Changes hold the compaction lock (no
    # merge or prune runs meanwhile) and the store lock (the catalog connection).
    def _overlay_next(self, bucket: str, key: str, seq: int) -> int | None:
        view = self._view
        for e in view.versions.get((bucket, key), ()):
            if e.seq > seq and e.seq not in view.voids:
                return e.seq
        return None

    def _void_seqs(self) -> set[int]:
        return set(self._view.voids)

    def snapshot_create(self, name: str | None = None, mode: str = "cow", periodic: bool = False) -> dict:
        """A snapshot at the current point: `cow` records last_seq; `full` first
        merges every overlay into the base, then writes the complete map of the
        state at merged_through_seq into the snapshot (one transaction)."""
        if mode not in snapshots.MODES:
            raise ValueError(f"snapshot mode must be one of {', '.join(snapshots.MODES)}, not {mode!r}")
        if mode == "full":
            self.compact()
        with self._compact_lock, self._lock:
            self._check_usable()
            seq = self._catalog.merged_through_seq if mode == "full" else self.last_seq
            snap = snapshots.create(self._catalog.db, name=name, mode=mode, seq=seq, now_ns=self.clock_ns(),
                                    periodic=periodic, voids=self._void_seqs())
        log.info("snapshot %s (id %d, %s) created at seq %d: %d versions, %d chunks",
                 snap["name"], snap["id"], mode, seq, snap["versions"], snap["chunks"])
        return snap

    def snapshot_delete(self, ref) -> dict:
        with self._compact_lock, self._lock:
            self._check_usable()
            out = snapshots.delete(self._catalog.db, ref, voids=self._void_seqs(),
                                   overlay_next=self._overlay_next)
        log.info("snapshot %s (id %d) deleted: %d versions moved to other snapshots, %d freed",
                 out["deleted"]["name"], out["deleted"]["id"], out["moved_versions"], out["freed_versions"])
        return out

    def snapshot_merge(self, a, b, name: str | None = None) -> dict:
        with self._compact_lock, self._lock:
            self._check_usable()
            out = snapshots.merge(self._catalog.db, a, b, name=name, now_ns=self.clock_ns(),
                                  voids=self._void_seqs(), overlay_next=self._overlay_next)
        log.info("snapshots %s merged into %s (id %d, points %s); freed %s", out["merged"],
                 out["snapshot"]["name"], out["snapshot"]["id"], out["snapshot"]["points"], out["freed"])
        return out

    def periodic_snapshot(self, mode: str = "cow", keep: int = 0) -> dict:
        """The schedule's step: a periodic snapshot, then delete the oldest
        periodic ones beyond `keep` (0 = keep all).  Hand-made ones are never touched.
        One step under the store's locks: nobody lists `keep` + 1 periodic
        snapshots between the creation and the deletion."""
        with self._compact_lock, self._lock:
            snap = self.snapshot_create(mode=mode, periodic=True)
            deleted = []
            if keep > 0:
                periodic = [s for s in self.snapshots(accounting=False) if s["periodic"]]
                periodic.sort(key=lambda s: (s["created_ns"], s["id"]))
                for old in periodic[:-keep]:
                    deleted.append(self.snapshot_delete(old["id"])["deleted"]["id"])
            return {"created": snap, "deleted": deleted}

    def snapshots(self, accounting: bool = True) -> list[dict]:
        """Every snapshot (id, name, created, seq, points, mode, periodic, and the
        accounting: versions, table_bytes, chunks, data_bytes), oldest point first."""
        with self._lock:
            self._check_usable()
            return snapshots.list_snapshots(self._catalog.db, with_accounting=accounting)

    def snapshot(self, ref) -> dict:
        with self._lock:
            self._check_usable()
            snap = snapshots.get(self._catalog.db, ref)
            snap.update(snapshots.accounting(self._catalog.db, snap["id"]))
            return snap

    def _snapshot_point(self, ref, at: int | None) -> int:
        return snapshots.point_of(snapshots.get(self._catalog.db, ref), at)

    def _overlay_latest_at(self, bucket: str, key: str, p: int) -> Entry | None:
        view = self._view
        for e in reversed(view.versions.get((bucket, key), ())):
            if e.seq <= p and e.seq not in view.voids:
                return e
        return None

    def snapshot_manifest(self, snapshot_id, bucket: str, key: str, at: int | None = None) -> dict | None:
        """The manifest of bucket/key as of the snapshot's point (None if absent
        or deleted then); KeyError if there is no such snapshot."""
        with self._lock:
            p = self._snapshot_point(snapshot_id, at)
            e = self._overlay_latest_at(bucket, key, p)
            if e is not None:
                return e.manifest if e.kind == "put" else None
            row = snapshots.resolve(self._catalog.db, bucket, key, p, self._void_seqs())
            if row is None:
                return None
            return row[2] if row[1] == "put" else None

    def snapshot_buckets(self, snapshot_id, at: int | None = None) -> list[dict]:
        with self._lock:
            return self._buckets_as_of(self._snapshot_point(snapshot_id, at))

    def snapshot_list_objects(self, snapshot_id, bucket: str, prefix: str = "", after: str | None = None,
                              limit: int = 1000, at: int | None = None) -> tuple[list[dict], bool]:
        """Manifests as of the snapshot's point, in key order; (page, truncated)."""
        with self._lock:
            p = self._snapshot_point(snapshot_id, at)
            ov = self._overlay_keys(bucket, prefix, after, lambda b, k: self._overlay_latest_at(b, k, p))
            base = snapshots.objects_as_of(self._catalog.db, bucket, prefix, after, p, self._void_seqs())
            return _merge_listing(ov, base, limit)


def _merge_listing(ov: dict[str, Entry], base, limit: int) -> tuple[list[dict], bool]:
    """One page of manifests in key order from the overlays' deciding entries
    (newer) and the base's rows (key, seq, kind, manifest) (older); keys whose
    deciding version is a delete marker are skipped.  (page, truncated)."""
    ov_keys = sorted(ov)
    out: list[dict] = []
    i = 0
    nxt = next(base, None)
    while True:
        if nxt is None and i >= len(ov_keys):
            return out, False
        if i < len(ov_keys) and (nxt is None or ov_keys[i] <= nxt[0]):
            e = ov[ov_keys[i]]
            if nxt is not None and nxt[0] == ov_keys[i]:
                nxt = next(base, None)      # the overlays are newer than the base
            i += 1
            kind, manifest = e.kind, e.manifest
        else:
            kind, manifest = nxt[2], nxt[3]
            nxt = next(base, None)
        if kind != "put" or manifest is None:
            continue
        if len(out) == limit:
            return out, True
        out.append(manifest)


def _cut_to(path: str | None, end: int, fsync: bool) -> None:
    """Truncate `path` to `end` bytes if it is longer (and sync the cut)."""
    if path is None or not os.path.exists(path) or os.path.getsize(path) <= end:
        return
    with open(path, "r+b") as f:
        f.truncate(end)
        if fsync:
            os.fsync(f.fileno())


def _valid_header(path: str) -> bool:
    with open(path, "rb") as f:
        try:
            decode_header(f.read())
            return True
        except FormatError:
            return False
