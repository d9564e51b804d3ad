"""Compaction: merge the oldest sealed overlay into the base volume (claims
22, 23, 39-41), crash-safe at every step (docs/format/vault.md, "Garbage
collection").

    1. pick the oldest overlay; it must be sealed
    2. append an extent at volume_end for each of its chunks the base lacks,
       then fdatasync volume.dat                     (allocate space, claim 22)
    3. one catalog transaction: chunk map, versions, voids, volume_end,
       merged_through_seq, merged overlay name       (write it, claims 23, 39, 40)
       and the vault-side retention policy (docs/format/vault.md, "Retention")
    4. unlink the overlay file, fsync overlays/      (delete it, claim 41)

Reads stay correct throughout: the overlay stays in the read chain until the
catalog commit, and the store swaps it out under its lock in the same
critical section as the commit.  Only one compaction runs at a time (the
store's compaction lock); appends only touch the newest, unsealed overlay.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import blake3

from airlock.errors import IntegrityError
from airlock.vault.catalog import classify
from airlock.fsutil import fsync_dir

if TYPE_CHECKING:
    from airlock.vault.store import VaultStore

log = logging.getLogger("airlock.vault.compaction")

Progress = Callable[[int, int], None]


def crash_point(step: str) -> None:
    """Test hook: called between the steps above (tests replace it to kill the
    process at `step`).  Steps: picked, extents-written, volume-synced,
    in-transaction, committed, unlinked."""


def merge_oldest_overlay(store: "VaultStore", progress: Progress | None = None) -> dict | None:
    with store._compact_lock:
        # 1. pick
        with store._lock:
            if not store._overlays or not store._overlays[0].sealed:
                return None
            ov = store._overlays[0]
            catalog = store._catalog
            new_chunks = [(d, off, n) for d, (off, n) in ov.chunks.items() if catalog.chunk(d) is None]
            start = catalog.volume_end
            merged_through = ov.last_seq if ov.last_seq is not None else catalog.merged_through_seq
        crash_point("picked")
        total = sum(n for _d, _o, n in new_chunks)
        done = 0
        if progress is not None:
            progress(0, total)

        # 2. allocate + write extents at volume_end, then fdatasync
        volume = store._volume
        end = start
        rows = []
        for digest, off, n in new_chunks:
            data = ov.read_chunk_at(off, n)
            actual = blake3.blake3(data).hexdigest()
            if actual != digest:
                raise IntegrityError(f"overlay {ov.name} chunk at {off}", digest, actual)
            rows.append((digest, end, n))
            end += volume.write_extent(end, digest, data)
            done += n
            if progress is not None:
                progress(done, total)
            if len(rows) == 1:
                crash_point("extent-partial")
        crash_point("extents-written")
        volume.sync()
        crash_point("volume-synced")

        # 3. one catalog transaction; swap the overlay out of the read chain with it
        entries = [(classify(r.seq, r.rtype, r.payload), r.payload) for r in ov.records]
        with store._lock:
            now_ns = store.clock_ns()
            pruned = catalog.commit_merge(rows, entries, end, merged_through, ov.name,
                                          before_commit=lambda: crash_point("in-transaction"),
                                          **_retention_args(store, now_ns, merged_through))
            store._overlays.remove(ov)
            store._rebuild_view()
        crash_point("committed")

        # 4. delete the overlay
        try:
            os.unlink(ov.path)
        except FileNotFoundError:
            pass
        crash_point("unlinked")
        if store.fsync:
            fsync_dir(store.overlay_dir)
        log.info("merged overlay %s: %d records, %d new chunks (%d bytes) at %d..%d",
                 ov.name, len(ov.records), len(rows), total, start, end)
        _log_prune(store, pruned, f"merging overlay {ov.name}")
        return {"overlay": ov.name, "records": len(ov.records), "chunks": len(ov.chunks),
                "new_chunks": len(rows), "bytes": total, "volume_end": end,
                "merged_through_seq": merged_through, "pruned": pruned}


def _retention_args(store: "VaultStore", now_ns: int, base_through: int) -> dict:
    """Retention arguments of a catalog transaction (caller holds store._lock):
    unmerged overlay records (seq > base_through) are never pruned, an ABORT
    among them voids base versions before the policy decides what is current,
    and the chunks they reference are still in use."""
    view = store._view
    return {"retention": store.retention, "now_ns": now_ns, "exclude": set(view.voids),
            "referenced": (d for e in view.by_seq.values() if e.seq > base_through for d in e.chunks)}


def _log_prune(store: "VaultStore", pruned: int, when: str) -> None:
    if pruned:
        log.info("retention pruned %d non-current versions from the base while %s "
                    "(keep_versions=%d, keep_days=%g)", pruned, when,
                    store.retention.keep_versions, store.retention.keep_days)


def prune_base(store: "VaultStore") -> int:
    """Apply the retention policy to the base in its own catalog transaction
    (compaction with nothing to merge: versions also age out)."""
    if not store.retention.prunes:
        return 0
    with store._compact_lock, store._lock:
        store._check_usable()
        args = _retention_args(store, store.clock_ns(), store._catalog.merged_through_seq)
        pruned = store._catalog.prune(args.pop("retention"), args.pop("now_ns"), **args)
    _log_prune(store, pruned, "compacting")
    return pruned
