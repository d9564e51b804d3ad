"""Point-in-time restore: `airlock restore --snapshot S [--bucket B] [--to-bucket B2]`.

Brings the primary -- or a new bucket -- back to the state a vault snapshot
recorded.  Nothing is rewritten: every object that differs from the snapshot
is written again as a *new* change through the normal write path (the
replicated commit point, so the vault acknowledges each one and keeps the
history of what is being undone), and objects that did not exist at the
snapshot are deleted (a new delete record; the vault keeps them too).  A
bucket's configuration -- S3 versioning status and tag set -- is set back to
what it was at the snapshot first, also as new records, so the objects are
written back into the bucket as it was configured then.

Runs with the gateway stopped (it holds the primary's data-directory lock and
opens the engine itself).  Chunks the snapshot's manifests reference but the
primary lacks (or holds damaged) are fetched from the vault first, verified,
and stored.  Idempotent: a rerun finds everything equal and writes nothing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from airlock import errors as E
from airlock.chunk.store import digest_of
from airlock.config import GatewayConfig
from airlock.primary.model import Manifest

log = logging.getLogger("airlock.pitr")

LIST_PAGE = 1000
COMMIT_WINDOW = 64        # objects restored concurrently (they share the vault's group commit)


@dataclass
class PitrSummary:
    snapshot: str = ""
    buckets: int = 0
    objects: int = 0            # objects in the snapshot's scope
    unchanged: int = 0
    written: int = 0
    deleted: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    config: int = 0             # bucket settings (versioning, tag set) set back

    def line(self) -> str:
        return (f"restore-snapshot: snapshot={self.snapshot} buckets={self.buckets} objects={self.objects} "
                f"unchanged={self.unchanged} written={self.written} deleted={self.deleted} "
                f"chunks_fetched={self.chunks_fetched} bytes_fetched={self.bytes_fetched} config={self.config}")


def _same(cur: Manifest | None, snap: dict) -> bool:
    return (cur is not None and cur.etag == snap["etag"] and cur.size == snap["size"]
            and [[c.digest, c.size] for c in cur.chunks] == [list(c) for c in snap["chunks"]]
            and cur.meta.to_json() == Manifest.from_json(snap).meta.to_json())


async def restore_snapshot(cfg: GatewayConfig, snapshot: str, bucket: str | None = None,
                           to_bucket: str | None = None, progress=None) -> PitrSummary:
    from airlock.gateway import make_engine
    from airlock.primary.datalock import PrimaryLock
    if cfg.vault is None:
        raise E.ConfigError("restoring from a snapshot needs the vault: the gateway config has no [link] vault")
    if to_bucket is not None and bucket is None:
        raise E.ConfigError("--to-bucket needs --bucket (the snapshot's bucket to copy from)")
    ref: int | str = int(snapshot) if snapshot.isdigit() else snapshot
    summary = PitrSummary(snapshot=str(snapshot))
    lock = PrimaryLock(cfg.data)
    try:
        engine = make_engine(cfg)
        engine.open()
        await engine.start()
        try:
            await engine.commit_point.ensure_link()
            link = engine.vault_link
            snaps = (await link.list(snapshots=True))["snapshots"]
            if not any(str(s.get("id")) == str(ref) or s.get("name") == ref for s in snaps):
                raise E.ConfigError(f"the vault has no snapshot {snapshot!r} "
                                    f"(airlock snapshot list shows the ones it has)")
            snap_buckets = {b["bucket"]: b for b in (await link.list(snapshot=ref))["buckets"]}
            if bucket is not None and bucket not in snap_buckets:
                raise E.ConfigError(f"bucket {bucket!r} did not exist at snapshot {snapshot!r}")
            if to_bucket is not None and engine.bucket(to_bucket) is not None \
                    and not engine.index.bucket_is_empty(to_bucket):
                # side by side means side by side: never written over what a bucket holds
                raise E.ConfigError(f"bucket {to_bucket!r} exists and holds objects; --to-bucket restores into "
                                    f"a new or empty bucket (remove it first, or choose another name)")
            for src in ([bucket] if bucket else sorted(snap_buckets)):
                await _restore_bucket(engine, link, ref, src, to_bucket or src, snap_buckets[src],
                                      in_place=to_bucket is None, summary=summary, progress=progress)
                summary.buckets += 1
        finally:
            await engine.close()
    finally:
        lock.release()
    return summary


async def _restore_config(engine, bucket: str, snap: dict, summary: PitrSummary) -> None:
    """Set `bucket`'s versioning status and tag set back to the snapshot's
    (`snap`: the vault's bucket entry as of the snapshot, docs/format/link.md,
    LIST).  S3 has no way back to "never versioned": a bucket that was not
    versioned at the snapshot and is now is suspended, which stores new
    objects as "null" versions, as an unversioned bucket does."""
    if "versioning" not in snap:
        log.warning("the vault does not report bucket %s's configuration as of the snapshot (a vault "
                    "older than this gateway): its versioning and tags are left as they are", bucket)
        return
    want, have = snap["versioning"], engine.versioning(bucket)
    if want == "" and have != "":
        want = "Suspended"
    if want != have:
        await engine.set_versioning(bucket, want)
        summary.config += 1
        log.info("bucket %s: versioning %s -> %s (as at the snapshot)", bucket, have or "never set", want)
    if engine.bucket_tagging(bucket) != snap["tagging"]:
        await engine.set_bucket_tagging(bucket, snap["tagging"])
        summary.config += 1
        log.info("bucket %s: tag set as at the snapshot (%s)", bucket,
                 "none" if snap["tagging"] is None else snap["tagging"])


async def _restore_bucket(engine, link, ref, src: str, dst: str, src_info: dict, *, in_place: bool,
                          summary: PitrSummary, progress) -> None:
    owner = src_info.get("owner")
    before = (summary.written, summary.unchanged, summary.deleted)     # the summary counts every bucket
    existing = engine.bucket(dst)
    if existing is None:
        await engine.create_bucket(dst, owner)
    elif existing.owner != owner:
        raise E.PolicyError(f"bucket {dst!r} belongs to another user; choose another --to-bucket")
    await _restore_config(engine, dst, src_info, summary)
    loop = asyncio.get_running_loop()
    in_snapshot: set[str] = set()
    pending: list = []

    async def put_back(m: dict) -> None:
        for digest, size in m["chunks"]:
            ok = False
            try:
                data = await loop.run_in_executor(engine.executor, engine.store.read, digest)
                ok = len(data) == size
            except (E.IntegrityError, E.FormatError, OSError):
                pass
            if not ok:
                data = await link.get_chunk(digest)
                if digest_of(data) != digest:
                    raise E.IntegrityError(f"chunk {digest} from the vault", digest, digest_of(data))
                await loop.run_in_executor(engine.executor, engine.store.replace, digest, data)
                summary.chunks_fetched += 1
                summary.bytes_fetched += len(data)
        restored = Manifest.from_json(m)
        restored.bucket, restored.mtime = dst, time.time()
        await engine.commit_object(restored)
        summary.written += 1

    async for m in link.iter_objects(src, page=LIST_PAGE, snapshot=ref):
        summary.objects += 1
        in_snapshot.add(m["key"])
        if _same(engine.index.object(dst, m["key"]), m):
            summary.unchanged += 1
            continue
        pending.append(put_back(m))
        if len(pending) >= COMMIT_WINDOW:
            await asyncio.gather(*pending)
            pending = []
            if progress:
                progress(summary)
    if pending:
        await asyncio.gather(*pending)
    if in_place:
        # objects created after the snapshot: a delete is a new record, the vault keeps them
        stale = [key for key, _seq, _m in engine.index.scan_objects(dst, None, "", LIST_PAGE)
                 if key not in in_snapshot]
        for i in range(0, len(stale), COMMIT_WINDOW):
            await asyncio.gather(*(engine.delete_object(dst, k) for k in stale[i:i + COMMIT_WINDOW]))
            summary.deleted += len(stale[i:i + COMMIT_WINDOW])
    if progress:
        progress(summary)
    log.info("bucket %s restored from snapshot %s into %s: %d written, %d unchanged, %d deleted",
             src, ref, dst, summary.written - before[0], summary.unchanged - before[1],
             summary.deleted - before[2])
