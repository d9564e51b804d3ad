"""The primary engine: the write path and the read path of the primary domain.

    request body -> Ingest (chunker, digests, chunk store) -> commit record
                 -> CommitPoint (primary log fsync [+ vault ack]) -> index -> visible

Nothing is visible before its commit record is durable: the index is only
touched from the commit point's `on_durable` hook, in log order.  The index is
derived state and is caught up from the log on open (docs/architecture.md).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from airlock import errors as E
from airlock.aio import settled_on_failure
from airlock.chunk.store import SMALL_CHUNK_MAX, ChunkStore, digest_of
from airlock.log import payload as P
from airlock.log.reader import read_log
from airlock.primary import checksums as C
from airlock.primary.commit import CommitPoint, LocalCommitPoint
from airlock.primary.index import Index
from airlock.primary.ingest import Ingest, ingest_body
from airlock.primary.model import (NULL_VERSION, BodyDigests, Bucket, ChunkRef, ListResult, Manifest,
                                   ObjectMeta, ObjectVersion, Part, Upload, VersionListResult)

log = logging.getLogger("airlock.engine")

MIN_PART_SIZE = 5 * 1024 * 1024          # S3's minimum size of every part but the last
MAX_PARTS = 10000                        # S3's part-number limit
WORKER_THREADS = 8                       # hashing/chunking/IO threads; GIL released in each
REPLAY_BATCH = 1000                      # records per index transaction during replay
LIST_QUERY_BATCH = 1000                  # rows fetched per index query while listing
STORAGE_PROBE_INTERVAL_S = 1.0           # how often the primary's data directory is checked
VAULT_FETCH_BATCH = 1000                 # records per GET_RECORDS when rebuilding state from the vault
# free-space reserve (min_free_mib): with at least this much more free than
# the reserve, the next look at statvfs may wait this long (a write cannot use
# up the margin in that time); closer to the reserve, every commit looks
SPACE_MARGIN_BYTES = 1024 * 1024 * 1024   # 10 GB/s of writes for SPACE_RECHECK_S: beyond this gateway
SPACE_RECHECK_S = 0.1
VERSIONING_STATES = ("Enabled", "Suspended")

Verifier = Callable[[BodyDigests], None]


def _after(digests: BodyDigests) -> dict:
    """The commit's `after` keyword for an ingested body, if its chunks are
    still being stored; none otherwise (a worker's forwarded commit takes
    no future)."""
    return {"after": digests.durable} if digests.durable is not None else {}


class Engine:
    def __init__(self, data_dir: str, *, fsync: bool = True, chunk_fsync: bool | None = None,
                 chunk_params: dict | None = None,
                 commit_point_factory: Callable[["Engine", str], CommitPoint] | None = None,
                 min_free_bytes: int = 0):
        self.data_dir = data_dir
        self.fsync = fsync
        self.chunk_fsync = fsync if chunk_fsync is None else (fsync and chunk_fsync)
        self.chunk_params = chunk_params or {}
        self._commit_point_factory = commit_point_factory
        # Below this much free space in data_dir no record is committed (503):
        # once the vault has acknowledged a change the primary log and index
        # must take it, and a full disk there would degrade the gateway until
        # an operator restores it; refused up front, writes resume by
        # themselves when there is room (docs/operations.md).
        self.min_free_bytes = min_free_bytes
        self._space_ok_until = 0.0              # monotonic time before which free space need not be looked at
        self.executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="airlock-io")
        self.store: ChunkStore | None = None
        self.index: Index | None = None
        self.commit_point: CommitPoint | None = None
        self.stats = {"puts": 0, "gets": 0, "integrity_errors": 0, "replayed": 0, "chunk_reads_cached": 0,
                      "chunks_from_vault": 0, "chunks_repaired": 0, "repair_failures": 0}
        self.degraded: str | None = None      # why the primary's storage is not used, if it is not
        self.serving_from_vault = False       # degraded, and the index now comes from the vault
        self._monitor: asyncio.Task | None = None
        # Writes to one key are committed one at a time: a version removal
        # records what becomes current (for the vault), which must not race
        # another write to the same key.  {(bucket, key): [lock, users]}
        self._key_locks: dict[tuple[str, str], list] = {}
        # async callables returning another gateway process's {"pid", "role", "stats"} (workers)
        self.stats_sources: list[Callable[[], Awaitable[dict]]] = []
        # gateway processes the leader gave up on, with why (leader.py; in the health document)
        self.workers_not_running: list[str] = []
        # with workers: the leader's client connections and requests begun
        # (primary/dispatch.py `counts`)
        self.connections: Callable[[], dict] | None = None
        # called on entering degraded mode (the leader stops its workers)
        self.on_degraded: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        log_dir = os.path.join(self.data_dir, "log")
        os.makedirs(log_dir, exist_ok=True)
        self.store = ChunkStore(self.data_dir, fsync=self.chunk_fsync)
        if self._commit_point_factory is not None:
            self.commit_point = self._commit_point_factory(self, log_dir)
        else:
            self.commit_point = LocalCommitPoint(log_dir, self._on_durable)
        index_path = os.path.join(self.data_dir, "index.sqlite")
        self.index, rebuilt = Index.open_or_rebuild(index_path)
        if rebuilt:
            log.warning("index was unreadable; rebuilding it from the log")
        elif self.index.applied_seq() > self.commit_point.last_seq:
            # the index has seen records the log no longer holds (a log restored
            # from an older copy): it describes a state that did not survive
            log.warning("index is ahead of the log (%d > %d); rebuilding it from the log",
                        self.index.applied_seq(), self.commit_point.last_seq)
            self.index.close()
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(index_path + suffix)
                except FileNotFoundError:
                    pass
            self.index = Index(index_path)
        self._replay(log_dir)

    def _replay(self, log_dir: str) -> None:
        n = replay_log(self.index, log_dir, void=getattr(self.commit_point, "void", ()))
        self.stats["replayed"] = n
        if n:
            log.info("replayed %d log records into the index", n)

    async def start(self) -> None:
        """Async part of opening: bring up the commit point (the vault link)
        and the watch on the primary's storage."""
        start = getattr(self.commit_point, "start", None)
        if start is not None:
            await start()
        self._monitor = asyncio.get_running_loop().create_task(self._watch_storage())

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self.commit_point is not None:
            await self.commit_point.close()
        if self.index is not None:
            self.index.close()
        self.executor.shutdown(wait=True)
        if self.store is not None:
            self.store.close()

    def stop_waiting_for_vault(self) -> None:
        """A stop's grace is over (gateway.serve): the writes still waiting
        for the vault's ack answer 503 now, nothing more is sent and the link
        is not reconnected (ReplicatedCommitPoint.stop_waiting)."""
        stop = getattr(self.commit_point, "stop_waiting", None)
        if stop is not None:
            stop()

    def _on_durable(self, records) -> None:
        # the payload goes along: an object-put's JSON is stored as it is
        self.index.apply([(seq, rtype, P.decode_payload(rtype, payload), payload)
                          for seq, rtype, payload in records])

    async def _commit(self, rtype: int, body: dict, after: asyncio.Future | None = None) -> int:
        self._refuse_writes_if_degraded()
        self._refuse_if_storage_low()
        return await self.commit_point.commit(rtype, P.encode_payload(body), after=after)

    def _refuse_if_storage_low(self) -> None:
        if not self.min_free_bytes:
            return
        now = time.monotonic()
        if now < self._space_ok_until:
            return
        st = os.statvfs(self.data_dir)
        free = st.f_bavail * st.f_frsize
        self._space_ok_until = now + SPACE_RECHECK_S if free >= self.min_free_bytes + SPACE_MARGIN_BYTES else 0.0
        if free < self.min_free_bytes:
            log.error("primary storage full: %d bytes free in %s, writes need %d", free, self.data_dir,
                      self.min_free_bytes)
            raise E.PrimaryStorageFull()

    async def _commit_key(self, bucket: str, key: str, decide: Callable[[], tuple[int, dict] | None],
                          after: asyncio.Future | None = None):
        """Run `decide` (reads the index, returns the record to commit or None)
        and commit its record while holding the key's write lock.  Returns
        (seq or None, body or None).  `after`: as for CommitPoint.commit."""
        slot = self._key_locks.setdefault((bucket, key), [asyncio.Lock(), 0, float("-inf")])
        slot[1] += 1
        since = time.monotonic()
        try:
            async with slot[0]:
                if slot[2] >= since:
                    # the write ahead of this one on the key failed on the vault
                    # while this waited: fail with it, instead of each queued
                    # write waiting out an ack timeout or reconnect of its own
                    raise E.VaultUnavailable("the vault is not reachable (a write to the same key failed "
                                             "on it while this waited)")
                rec = decide()
                if rec is None:
                    return None, None
                rtype, body = rec
                try:
                    return await self._commit(rtype, body, after), body
                except E.ReplicationError as e:
                    if not isinstance(e, E.VaultRejected):     # a refusal is this record's own
                        slot[2] = time.monotonic()
                    raise
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                self._key_locks.pop((bucket, key), None)

    async def health(self) -> dict:
        """The health document (/_airlock/health): commit point, link, storage,
        counters (summed over the gateway's processes, see `stats_sources`)."""
        cp = self.commit_point
        replicated = hasattr(cp, "link")
        stats = dict(self.stats)
        processes = [{"pid": os.getpid(), "role": "leader", "stats": dict(self.stats)}]
        if replicated:
            processes[0]["vault_link"] = cp.link_state
        if self.connections is not None:
            processes[0].update(self.connections())
        for source in self.stats_sources:
            try:
                proc = await source()
            except Exception as e:     # a worker restarting: its counters are missing this once
                log.debug("counters of a gateway process not available: %s", e)
                continue
            if proc:
                processes.append(proc)
                for k, v in proc["stats"].items():
                    stats[k] = stats.get(k, 0) + v
        body = {
            "status": "ok",
            "last_seq": cp.last_seq,
            "replication": "vault" if replicated else "local-only",
            "stats": stats,
        }
        if len(processes) > 1:
            body["processes"] = processes
        if replicated:
            body["vault_connected"] = cp.healthy
            body["pending_aborts"] = len(cp.pending_aborts)
            body["replication_stats"] = cp.stats
            if not cp.healthy:
                body["status"] = "degraded"
        body["primary_storage"] = "ok" if self.degraded is None else "failed"
        if self.workers_not_running:
            body["workers_not_running"] = list(self.workers_not_running)
        if self.degraded is not None:
            body["status"] = "degraded"
            body["degraded_reason"] = self.degraded
            body["serving_reads_from"] = "vault"
            # False while the vault's state could not be loaded yet (retried every second)
            body["vault_state_loaded"] = self.serving_from_vault
        return body

    # ------------------------------------------------------------------ degraded mode
    @property
    def vault_link(self):
        """The commit point's link to the vault, or None when running local-only."""
        return getattr(self.commit_point, "link", None)

    def _refuse_writes_if_degraded(self) -> None:
        if self.degraded:
            raise E.ServiceUnavailable(
                f"The primary's storage has failed ({self.degraded}); reads are served from the vault "
                f"and writes are refused until it is restored (airlock restore).")

    def storage_ok(self) -> bool:
        """Is the primary's data directory there and usable?"""
        try:
            return (os.path.isdir(self.store.root) and os.path.isdir(self.store.tmp)
                    and os.path.isdir(os.path.join(self.data_dir, "log"))
                    and os.access(self.data_dir, os.R_OK | os.W_OK | os.X_OK)
                    and os.access(self.store.root, os.R_OK | os.W_OK | os.X_OK))
        except OSError:
            return False

    async def _watch_storage(self) -> None:
        while True:
            await asyncio.sleep(STORAGE_PROBE_INTERVAL_S)
            try:
                if self.degraded is None and not self.storage_ok():
                    await self.enter_degraded_mode("the primary data directory is gone or unreadable")
                elif self.degraded is not None and not self.serving_from_vault and self.vault_link is not None:
                    await self._serve_from_vault()      # the first try failed (vault unreachable?)
            except Exception:
                log.exception("could not switch to serving from the vault; trying again")

    def _primary_log_failed(self, exc: BaseException) -> Awaitable[None]:
        """The replicated commit point could not write records the vault
        holds (replication.py): they are served from the vault from now on.
        Degraded at once (writes refused); returns the awaitable that loads
        the vault's state."""
        if self.degraded is None:
            self._mark_degraded(f"the primary log or index cannot be written ({exc})")
        return self._serve_from_vault()

    async def enter_degraded_mode(self, reason: str) -> None:
        """The primary's storage failed outright: serve reads from the vault.

        The index is rebuilt in memory from the vault's log (same replay as at
        start, voids included), so lookups and listings answer exactly as
        before; chunks come over the link (`_read_chunk` falls back to the
        vault already).  Writes answer 503 until the primary is restored."""
        if self.degraded is not None:
            return
        self._mark_degraded(reason)
        if self.vault_link is None:
            log.error("no vault configured: nothing to serve from")
            return
        await self._serve_from_vault()

    def _mark_degraded(self, reason: str) -> None:
        """Degraded mode's first half: writes refused from now on, workers stopped."""
        self.degraded = reason
        if hasattr(self.commit_point, "paused"):
            self.commit_point.paused = True   # no reconciling into a log that is gone
        log.error("DEGRADED: %s; serving reads from the vault, refusing writes", reason)
        for hook in self.on_degraded:
            hook()

    async def _serve_from_vault(self) -> None:
        """Degraded mode's second half: the index rebuilt in memory from the
        vault's log.  Retried by the storage watch until it succeeds (writes
        are refused from the moment `degraded` is set)."""
        link = self.vault_link
        await self.commit_point.ensure_link(reconcile=False)
        # A batch may be on its way to the vault still (past its check for a
        # usable log when the log failed, or sent during a reconcile): the
        # vault may take it after these reads and its clients hear success;
        # read only once it has its answer, or its objects would not be
        # served until a restart.  (Writes are refused from now on: paused.)
        # Bounded: a reconcile holding the lock may wait on a stalled disk,
        # and degraded mode must serve reads all the same.
        try:
            await asyncio.wait_for(self.commit_point.settled(), self.commit_point.ack_timeout)
        except asyncio.TimeoutError:
            log.error("DEGRADED: a batch still holds the commit point after %gs; loading the vault's "
                      "records without waiting for it", self.commit_point.ack_timeout)
        records: list[tuple[int, int, bytes]] = []
        seq = 1
        while True:
            batch = await link.get_records(seq, VAULT_FETCH_BATCH)
            if not batch:
                break
            records.extend(batch)
            seq = batch[-1][0] + 1
        void = set(getattr(self.commit_point, "void", ()))
        for _s, rtype, payload in records:
            if rtype == P.ABORT:
                void.update(P.decode_payload(rtype, payload)["seqs"])
        index = Index(":memory:")
        index.apply([(s, rtype, P.decode_payload(rtype, payload))
                     for s, rtype, payload in records if s not in void])
        self.index = index
        self.serving_from_vault = True
        log.error("DEGRADED: serving %d vault records' state from memory", len(records))

    # ------------------------------------------------------------------ buckets
    def bucket(self, name: str) -> Bucket | None:
        return self.index.bucket(name)

    def list_buckets(self, owner: str | None = None) -> list[Bucket]:
        return self.index.buckets(owner)

    async def create_bucket(self, name: str, owner: str) -> Bucket:
        existing = self.index.bucket(name)
        if existing is not None:
            if existing.owner == owner:
                raise E.BucketAlreadyOwnedByYou(BucketName=name)
            raise E.BucketAlreadyExists(BucketName=name)
        created = time.time()
        await self._commit(P.BUCKET_CREATE, {"bucket": name, "owner": owner, "created": created})
        return self.index.bucket(name)

    async def delete_bucket(self, name: str) -> None:
        if self.index.bucket(name) is None:
            raise E.NoSuchBucket(BucketName=name)
        if not self.index.bucket_is_empty(name):
            raise E.BucketNotEmpty(BucketName=name)
        await self._commit(P.BUCKET_DELETE, {"bucket": name})

    def versioning(self, bucket: str) -> str:
        """'' (never enabled), 'Enabled' or 'Suspended'."""
        self._need_bucket(bucket)
        return self.index.versioning(bucket)

    async def set_versioning(self, bucket: str, status: str) -> None:
        self._need_bucket(bucket)
        if status not in VERSIONING_STATES:
            raise E.MalformedXML()
        await self._commit(P.BUCKET_VERSIONING, {"bucket": bucket, "status": status})

    def bucket_tagging(self, bucket: str) -> str | None:
        self._need_bucket(bucket)
        return self.index.bucket_tagging(bucket)

    async def set_bucket_tagging(self, bucket: str, tagging: str | None) -> None:
        """PutBucketTagging / DeleteBucketTagging (`tagging` None)."""
        self._need_bucket(bucket)
        await self._commit(P.BUCKET_TAGGING, {"bucket": bucket, "tagging": tagging})

    def _version_id_for(self, bucket: str) -> str:
        """A new unique opaque id in an Enabled bucket, "null" otherwise."""
        if self.index.versioning(bucket) == "Enabled":
            return _new_version_id()
        return NULL_VERSION

    def _need_bucket(self, name: str) -> Bucket:
        b = self.index.bucket(name)
        if b is None:
            raise E.NoSuchBucket(BucketName=name)
        return b

    # ------------------------------------------------------------------ objects
    def head_object(self, bucket: str, key: str, version_id: str | None = None,
                    method: str = "GET") -> Manifest:
        """The current object, or the version `version_id`.  NoSuchKey /
        NoSuchVersion if absent; a delete marker raises NoSuchKey (latest) or
        MethodNotAllowed (asked for by version id), carrying the
        x-amz-delete-marker headers S3 sends."""
        self._need_bucket(bucket)
        if version_id is None:
            m = self.index.object(bucket, key)
            if m is not None:
                return m
            err = E.NoSuchKey(Key=key)
            latest = self.index.latest_version(bucket, key)
            if latest is not None and latest.is_delete_marker:
                err.headers = {"x-amz-delete-marker": "true", "x-amz-version-id": latest.version_id}
            raise err
        v = self.index.version(bucket, key, version_id)
        if v is None:
            raise E.NoSuchVersion(Key=key, VersionId=version_id)
        if v.is_delete_marker:
            err = E.MethodNotAllowed(Method=method, ResourceType="DeleteMarker")
            err.headers = {"x-amz-delete-marker": "true", "x-amz-version-id": v.version_id,
                           "Last-Modified": email.utils.formatdate(int(v.mtime), usegmt=True),
                           "Allow": "DELETE"}
            raise err
        return v.manifest

    async def ingest(self, body: AsyncIterator, *, want_sha256: bool = False,
                     checksum_algorithms: tuple[str, ...] = ()) -> BodyDigests:
        """Chunk, digest and store a body; nothing is committed."""
        self._refuse_writes_if_degraded()
        ing = Ingest(self.store, want_sha256=want_sha256, checksum_algorithms=checksum_algorithms,
                     chunk_params=self.chunk_params)
        # a small body's row commit runs while its record goes to the vault
        # (BodyDigests.durable, CommitPoint.commit's `after`)
        return await ingest_body(ing, body, self.executor, ship=self._shipper(ing),
                                 defer_durable=True, store_small=self._store_small)

    def _store_small(self, loop, chunks):
        """A small body's rows (ingest_body's `store_small`)."""
        return self.store.put_small_async(loop, chunks)

    def _shipper(self, ingest: Ingest):
        """How one upload's new chunks go to the vault while its body arrives."""
        return self.commit_point.ship_chunks

    async def put_object(self, bucket: str, key: str, body: AsyncIterator, meta: ObjectMeta, *,
                         want_sha256: bool = False, checksum_algorithms: tuple[str, ...] = (),
                         verify: Verifier | None = None,
                         precondition: Callable[[Manifest | None], None] | None = None) -> Manifest:
        """Store a body as bucket/key.  `verify` sees the digests after the body
        ended and before the commit (it raises to refuse the upload);
        `precondition` sees the current object just before the commit."""
        self._need_bucket(bucket)
        digests = await self.ingest(body, want_sha256=want_sha256, checksum_algorithms=checksum_algorithms)
        # if anything fails before the commit returns, the upload answers once
        # the row's storing has ended: the store holds the chunk then (dedup)
        async with settled_on_failure(digests.durable):
            if verify is not None:
                verify(digests)
            checksums = {alg: base64.b64encode(v).decode() for alg, v in digests.checksums.items()}
            m = Manifest(bucket=bucket, key=key, size=digests.size, etag=digests.md5.hex(),
                         mtime=time.time(), meta=meta, chunks=digests.chunks, checksums=checksums,
                         checksum_type="FULL_OBJECT" if checksums else None)
            return await self.commit_object(m, precondition=precondition, **_after(digests))

    async def commit_object(self, m: Manifest,
                            precondition: Callable[[Manifest | None], None] | None = None,
                            after: asyncio.Future | None = None) -> Manifest:
        """Commit a manifest as its key's object; `after`: the durability of
        its chunks on the primary, if still running (CommitPoint.commit)."""
        self._need_bucket(m.bucket)

        def decide():
            if precondition is not None:
                precondition(self.index.object(m.bucket, m.key))
            m.version_id = self._version_id_for(m.bucket)
            return P.OBJECT_PUT, m.to_json()
        m.seq, _ = await self._commit_key(m.bucket, m.key, decide, after)
        self.stats["puts"] += 1
        return m

    async def copy_object(self, src: Manifest, dst_bucket: str, dst_key: str,
                          meta: ObjectMeta | None,
                          precondition: Callable[[Manifest | None], None] | None = None,
                          checksum_algorithm: str | None = None) -> Manifest:
        """Copy by reference: the new manifest points at the same chunks.
        The source's checksums go with it, unless `checksum_algorithm` names
        one the source has no whole-object value of: then the copy has that
        checksum alone (FULL_OBJECT), computed over the source's bytes."""
        checksums, ctype, part_checksums = dict(src.checksums), src.checksum_type, src.part_checksums
        if checksum_algorithm is not None and not (checksum_algorithm in src.checksums
                                                   and src.checksum_type == "FULL_OBJECT"):
            c = C.new_checksum(checksum_algorithm)
            loop = asyncio.get_running_loop()
            async for piece in self.read_object(src):     # hashed off the loop: a copy may be GiBs
                await loop.run_in_executor(self.executor, c.update, piece)
            checksums, ctype, part_checksums = {checksum_algorithm: c.b64()}, "FULL_OBJECT", None
        m = Manifest(bucket=dst_bucket, key=dst_key, size=src.size, etag=src.etag, mtime=time.time(),
                     meta=meta if meta is not None else src.meta, chunks=list(src.chunks),
                     checksums=checksums, checksum_type=ctype,
                     parts=src.parts, part_checksums=part_checksums)
        return await self.commit_object(m, precondition=precondition)

    async def delete_object(self, bucket: str, key: str, version_id: str | None = None, *,
                            precondition: Callable[[Manifest | None], None] | None = None,
                            ) -> tuple[str | None, bool]:
        """S3 DeleteObject.  Returns (version id to report, is a delete marker).

        Without `version_id`: in a never-versioned bucket the object is
        removed (nothing is reported); in an Enabled bucket a delete marker
        with a new version id is added; in a Suspended one a "null" delete
        marker replaces the null version.  With `version_id`: that version or
        delete marker is removed for good (on the primary; the vault keeps the
        history) and the newest remaining version becomes current.
        `precondition` (a conditional delete) sees the object the request
        would delete -- the current one, or the version named; None for a
        delete marker or nothing -- just before the commit, under the key's
        write lock, and raises to refuse."""
        self._need_bucket(bucket)
        now = time.time()
        status = self.index.versioning(bucket)
        if version_id is None and status == "":
            def legacy():
                current = self.index.object(bucket, key)
                if precondition is not None:
                    precondition(current)
                if current is None:
                    return None
                return P.OBJECT_DELETE, {"bucket": bucket, "key": key, "mtime": now}
            await self._commit_key(bucket, key, legacy)
            return None, False
        if version_id is None:
            marker = _new_version_id() if status == "Enabled" else NULL_VERSION

            def add_marker():
                if precondition is not None:
                    precondition(self.index.object(bucket, key))
                return P.OBJECT_DELETE, {"bucket": bucket, "key": key, "mtime": now, "marker": marker}
            await self._commit_key(bucket, key, add_marker)
            return marker, True

        found: list[ObjectVersion] = []

        def remove():
            v = self.index.version(bucket, key, version_id)
            if precondition is not None:
                precondition(None if v is None or v.is_delete_marker else v.manifest)
            if v is None:
                return None
            found.append(v)
            latest = self.index.latest_version(bucket, key)
            body = {"bucket": bucket, "key": key, "mtime": now, "version_id": version_id,
                    "was_latest": latest.version_id == version_id, "restores": None}
            if body["was_latest"]:
                older = self.index.scan_versions(bucket, key, v.seq, 1)
                if older and not older[0].is_delete_marker:
                    body["restores"] = older[0].manifest.to_json()
            return P.OBJECT_DELETE, body
        await self._commit_key(bucket, key, remove)
        if status == "" and version_id == NULL_VERSION:
            return None, False        # as a plain delete in a never-versioned bucket
        return version_id, bool(found and found[0].is_delete_marker)

    async def set_object_tagging(self, bucket: str, key: str, version_id: str | None,
                                 tagging: str | None, method: str = "PUT") -> Manifest:
        """PutObjectTagging / DeleteObjectTagging (`tagging` None): the tag set
        of the current object, or of version `version_id`, becomes `tagging`
        (canonical URL query text, docs/format/records.md "Tags").  No new
        version: the version id, ETag and Last-Modified stay.  Errors as
        head_object's (`method`: the request's, for a delete marker's 405).
        Returns the version as re-tagged."""
        self._need_bucket(bucket)
        done: list[Manifest] = []

        def retag():
            m = self.head_object(bucket, key, version_id, method=method)
            latest = self.index.latest_version(bucket, key)
            new = m.replace(meta=dataclasses.replace(m.meta, tagging=tagging))
            done.append(new)
            return P.OBJECT_TAGGING, {"bucket": bucket, "key": key, "version_id": m.version_id,
                                      "was_latest": latest is not None and latest.version_id == m.version_id,
                                      "manifest": new.to_json()}
        await self._commit_key(bucket, key, retag)
        return done[0]

    def list_versions(self, bucket: str, *, prefix: str = "", delimiter: str = "",
                      key_marker: str = "", version_id_marker: str = "",
                      max_keys: int = 1000) -> VersionListResult:
        """ListObjectVersions: versions and delete markers in key order, newest
        first per key, resuming after (key_marker, version_id_marker)."""
        self._need_bucket(bucket)
        entries: list[tuple[ObjectVersion, bool]] = []
        prefixes: list[str] = []
        if max_keys <= 0:
            return VersionListResult([], [], False, None, None)
        idx = self.index
        key: str | None
        before: int | None = None
        if key_marker:
            if version_id_marker:
                mv = idx.version(bucket, key_marker, version_id_marker)
                if mv is None:
                    key = idx.next_versioned_key(bucket, key_marker)
                else:
                    key, before = key_marker, mv.seq
            else:
                key = idx.next_versioned_key(bucket, key_marker)
        else:
            key = idx.next_versioned_key(bucket, prefix or None, inclusive=True)
        if key is not None and prefix and key < prefix:
            key, before = idx.next_versioned_key(bucket, prefix, inclusive=True), None
        last: tuple[str, str | None] | None = None
        while key is not None:
            if not key.startswith(prefix):
                break
            if delimiter:
                i = key.find(delimiter, len(prefix))
                if i >= 0:
                    cp = key[:i + len(delimiter)]
                    if not (key_marker and cp <= key_marker) and cp not in prefixes:
                        if len(entries) + len(prefixes) >= max_keys:
                            return VersionListResult(entries, prefixes, True, *last)
                        prefixes.append(cp)
                        last = (cp, None)
                    key, before = idx.next_versioned_key(bucket, cp + "\U0010ffff"), None
                    continue
            latest_seq = idx.latest_version(bucket, key).seq
            while True:
                batch = idx.scan_versions(bucket, key, before, LIST_QUERY_BATCH)
                for v in batch:
                    if len(entries) + len(prefixes) >= max_keys:
                        return VersionListResult(entries, prefixes, True, *last)
                    entries.append((v, v.seq == latest_seq))
                    last = (v.key, v.version_id)
                if len(batch) < LIST_QUERY_BATCH:
                    break
                before = batch[-1].seq
            key, before = idx.next_versioned_key(bucket, key), None
        return VersionListResult(entries, prefixes, False, None, None)

    async def read_object(self, m: Manifest, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield bytes [start, end) of the object, chunk by chunk, each chunk
        verified against its digest before a byte of it is served."""
        end = m.size if end is None else end
        loop = asyncio.get_running_loop()
        self.stats["gets"] += 1
        offset = 0
        for ref in m.chunks:
            c_start, c_end = offset, offset + ref.size
            offset = c_end
            if c_end <= start:
                continue
            if c_start >= end:
                break
            data = await self._read_chunk(loop, ref)
            lo = max(start - c_start, 0)
            hi = min(end, c_end) - c_start
            yield data if (lo == 0 and hi == ref.size) else memoryview(data)[lo:hi]

    async def _read_chunk(self, loop, ref: ChunkRef) -> bytes:
        """A chunk's bytes, verified.  A missing or corrupt local copy is
        fetched from the vault (claims 5, 10, 14), served, and written back
        over the bad one; every repair is logged and counted."""
        try:
            if ref.size <= SMALL_CHUNK_MAX:        # a row (or a small file): read on the loop
                data = self.store.read(ref.digest)
            else:
                # a chunk file in the page cache is read and verified here on
                # the loop: a thread hop and the GIL handoffs around it cost
                # more than the copy and the BLAKE3 (docs/performance.md);
                # one that is not is read on a thread, never waited for here
                data = self.store.read_cached(ref.digest, ref.size)
                if data is None:
                    data = await loop.run_in_executor(self.executor, self.store.read, ref.digest)
                else:
                    self.stats["chunk_reads_cached"] += 1
            if len(data) != ref.size:
                raise E.IntegrityError(f"chunk {ref.digest}", f"{ref.size} bytes", f"{len(data)} bytes")
            return data
        except (E.IntegrityError, E.FormatError, OSError) as e:
            problem = "missing" if isinstance(e, FileNotFoundError) else f"unreadable: {e}"
            if not isinstance(e, FileNotFoundError):
                self.stats["integrity_errors"] += 1
            if self.vault_link is None:
                raise
        return await self._chunk_from_vault(loop, ref, problem)

    async def _chunk_from_vault(self, loop, ref: ChunkRef, problem: str) -> bytes:
        await self.commit_point.ensure_link(reconcile=self.degraded is None)
        data = await self.vault_link.get_chunk(ref.digest)
        actual = await loop.run_in_executor(self.executor, digest_of, data)
        if actual != ref.digest or len(data) != ref.size:
            raise E.IntegrityError(f"chunk {ref.digest} from the vault", ref.digest, actual)
        self.stats["chunks_from_vault"] += 1
        if self.degraded is None:
            try:
                await loop.run_in_executor(self.executor, self.store.replace, ref.digest, data)
                self.stats["chunks_repaired"] += 1
                log.warning("repaired chunk %s (%s) with the vault's copy", ref.digest, problem)
            except OSError as e:
                self.stats["repair_failures"] += 1
                log.error("chunk %s (%s) served from the vault but could not be repaired: %s",
                          ref.digest, problem, e)
        return data

    def list_objects(self, bucket: str, *, prefix: str = "", delimiter: str = "",
                     marker: str | None = None, max_keys: int = 1000) -> ListResult:
        self._need_bucket(bucket)
        contents: list[Manifest] = []
        prefixes: list[str] = []
        if max_keys <= 0:
            return ListResult([], [], False, None)
        lo, inclusive = prefix, True
        if marker is not None and marker >= prefix:
            lo, inclusive = marker, False
        last: str | None = None
        db = self.index.db
        while True:
            op = ">=" if inclusive else ">"
            rows = db.execute(f"SELECT key, seq, manifest FROM objects WHERE bucket=? AND key {op} ? "
                              f"ORDER BY key LIMIT ?", (bucket, lo, LIST_QUERY_BATCH)).fetchall()
            if not rows:
                return ListResult(contents, prefixes, False, None)
            jumped = False
            for key, seq, manifest in rows:
                if not key.startswith(prefix):
                    return ListResult(contents, prefixes, False, None)
                if delimiter:
                    i = key.find(delimiter, len(prefix))
                    if i >= 0:
                        cp = key[:i + len(delimiter)]
                        if (marker is not None and cp <= marker) or (prefixes and prefixes[-1] == cp):
                            continue
                        if len(contents) + len(prefixes) >= max_keys:
                            return ListResult(contents, prefixes, True, last)
                        prefixes.append(cp)
                        last = cp
                        # skip the rest of this common prefix with one seek
                        lo, inclusive, jumped = cp + "\U0010ffff", False, True
                        break
                if len(contents) + len(prefixes) >= max_keys:
                    return ListResult(contents, prefixes, True, last)
                contents.append(Manifest.from_json(json.loads(manifest), seq=seq))
                last = key
            if not jumped:
                lo, inclusive = rows[-1][0], False

    # ------------------------------------------------------------------ multipart
    async def create_upload(self, bucket: str, key: str, owner: str, meta: ObjectMeta,
                            checksum_algorithm: str | None = None,
                            checksum_type: str | None = None) -> Upload:
        self._need_bucket(bucket)
        up = Upload(upload_id=_new_upload_id(), bucket=bucket, key=key, owner=owner,
                    initiated=time.time(), meta=meta, checksum_algorithm=checksum_algorithm,
                    checksum_type=checksum_type)
        await self._commit(P.UPLOAD_CREATE, {
            "upload_id": up.upload_id, "bucket": bucket, "key": key, "owner": owner,
            "initiated": up.initiated, "meta": meta.to_json(),
            "checksum_algorithm": checksum_algorithm, "checksum_type": checksum_type})
        return up

    def upload(self, bucket: str, key: str, upload_id: str) -> Upload:
        self._need_bucket(bucket)
        up = self.index.upload(upload_id)
        if up is None or up.bucket != bucket or up.key != key:
            raise E.NoSuchUpload(UploadId=upload_id)
        return up

    async def upload_part(self, up: Upload, part_number: int, body: AsyncIterator, *,
                          want_sha256: bool = False, checksum_algorithms: tuple[str, ...] = (),
                          verify: Verifier | None = None) -> Part:
        digests = await self.ingest(body, want_sha256=want_sha256, checksum_algorithms=checksum_algorithms)
        async with settled_on_failure(digests.durable):         # as in put_object
            if verify is not None:
                verify(digests)
            checksums = {a: base64.b64encode(v).decode() for a, v in digests.checksums.items()}
            return await self.commit_part(up, part_number, digests.size, digests.md5.hex(), digests.chunks,
                                          checksums, **_after(digests))

    async def commit_part(self, up: Upload, part_number: int, size: int, etag: str,
                          chunks: list[ChunkRef], checksums: dict[str, str],
                          after: asyncio.Future | None = None) -> Part:
        if self.index.upload(up.upload_id) is None:
            raise E.NoSuchUpload(UploadId=up.upload_id)
        part = Part(upload_id=up.upload_id, part_number=part_number, etag=etag, size=size,
                    mtime=time.time(), chunks=chunks, checksums=checksums)
        await self._commit(P.UPLOAD_PART, part.to_json(), after)
        return part

    def list_parts(self, up: Upload) -> list[Part]:
        return self.index.parts(up.upload_id)

    def list_uploads(self, bucket: str) -> list[Upload]:
        self._need_bucket(bucket)
        return self.index.uploads(bucket)

    async def abort_upload(self, up: Upload) -> None:
        """Under the key's write lock, as a Complete is: an Abort racing a
        Complete of the same upload either ends it first (the Complete then
        finds no upload) or finds it completed (NoSuchUpload), never both
        answering success for one upload."""
        def decide():
            if self.index.upload(up.upload_id) is None:
                raise E.NoSuchUpload(UploadId=up.upload_id)
            return P.UPLOAD_ABORT, {"upload_id": up.upload_id}
        await self._commit_key(up.bucket, up.key, decide)

    async def complete_upload(self, bucket: str, key: str, upload_id: str,
                              requested: list[tuple[int, str, dict[str, str]]],
                              precondition: Callable[[Manifest | None], None] | None = None,
                              claim: tuple[str, str] | None = None,
                              claimed_type: str | None = None) -> Manifest:
        """`requested` is [(part_number, etag_without_quotes, {alg: b64})] as the
        client listed them.  `claim`: (algorithm, base64) of the whole
        object's checksum the client named, checked against the one computed
        from the parts (FULL_OBJECT or COMPOSITE, as the upload was created);
        `claimed_type` the checksum type it named.

        A retry of a Complete that succeeded (its answer lost: a timeout, a
        cut connection; SDKs retry it) gets the first one's result again,
        as long as that version is still there (`completed_upload`); so
        does a Complete that waited for the key while the same upload was
        being completed."""
        self._need_bucket(bucket)
        up = self.index.upload(upload_id)
        if up is None or up.bucket != bucket or up.key != key:
            return self.completed_upload(bucket, key, upload_id, requested, claim, claimed_type)
        if not requested:
            raise E.MalformedXML()
        alg = up.checksum_algorithm
        utype = C.stored_upload_checksum_type(alg, up.checksum_type)
        have = {p.part_number: p for p in self.index.parts(up.upload_id)}
        chosen: list[Part] = []
        prev = 0
        for number, etag, cks in requested:
            if number <= prev:
                raise E.InvalidPartOrder(UploadId=up.upload_id)
            prev = number
            _check_part_checksum_listed(alg, utype, number, cks)
            p = have.get(number)
            if p is None or p.etag != etag:
                raise E.InvalidPart(UploadId=up.upload_id, PartNumber=str(number), ETag=etag)
            _check_listed_part_checksums(up.upload_id, number, etag, cks, p.checksums)
            chosen.append(p)
        for p in chosen[:-1]:
            if p.size < MIN_PART_SIZE:
                raise E.EntityTooSmall(ProposedSize=str(p.size), MinSizeAllowed=str(MIN_PART_SIZE),
                                       PartNumber=str(p.part_number), ETag=p.etag)
        md5s = b"".join(bytes.fromhex(p.etag) for p in chosen)
        etag = f"{hashlib.md5(md5s).hexdigest()}-{len(chosen)}"
        chunks = [c for p in chosen for c in p.chunks]
        checksums: dict[str, str] = {}
        ctype = None
        _check_claimed_type(claimed_type, utype)
        if alg and all(alg in p.checksums for p in chosen):
            checksums[alg] = C.multipart_object_checksum(alg, utype, [(p.checksums[alg], p.size) for p in chosen])
            ctype = utype
        if claim is not None:
            C.check_object_claim(claim, alg, utype, checksums.get(alg), len(chosen))
        m = Manifest(bucket=up.bucket, key=up.key, size=sum(p.size for p in chosen), etag=etag,
                     mtime=time.time(), meta=up.meta, chunks=chunks, checksums=checksums,
                     checksum_type=ctype, parts=[p.size for p in chosen],
                     part_checksums=[p.checksums for p in chosen] if checksums else None)

        def decide():
            if self.index.upload(up.upload_id) is None:
                return None            # completed (or aborted) while this waited for the key
            if precondition is not None:
                precondition(self.index.object(m.bucket, m.key))
            m.version_id = self._version_id_for(m.bucket)
            return P.UPLOAD_COMPLETE, {"upload_id": up.upload_id, "manifest": m.to_json()}
        m.seq, _ = await self._commit_key(m.bucket, m.key, decide)
        if m.seq is None:
            return self.completed_upload(bucket, key, upload_id, requested, claim, claimed_type)
        return m

    def completed_upload(self, bucket: str, key: str, upload_id: str,
                         requested: list[tuple[int, str, dict[str, str]]],
                         claim: tuple[str, str] | None = None, claimed_type: str | None = None) -> Manifest:
        """The version this multipart upload completed as, if `requested`
        names the same parts (in order; their ETags give its multipart ETag;
        the part checksums it lists are the parts') and the version is still
        the one the completion made; else NoSuchUpload.  A checksum or
        checksum type the retry claims is checked against that version as
        the first Complete checked it.  Not checked: the part numbers (the
        record keeps the parts' sizes and checksums, not their numbers) and
        preconditions (the first Complete's held, and its own object now
        exists)."""
        row = self.index.completed_upload(upload_id)
        v = None
        if row is not None and row[:2] == (bucket, key) and requested:
            v = self.index.version(bucket, key, row[2])
            if v is None or v.manifest is None or v.seq != row[3]:
                v = None
        if v is None:
            raise E.NoSuchUpload(UploadId=upload_id)
        numbers = [n for n, _e, _c in requested]
        if any(b <= a for a, b in zip(numbers, numbers[1:])):
            raise E.InvalidPartOrder(UploadId=upload_id)
        m = v.manifest
        alg = next(iter(m.checksums), None)
        for number, _etag, cks in requested:
            _check_part_checksum_listed(alg, m.checksum_type, number, cks)
        try:
            md5s = b"".join(bytes.fromhex(etag) for _n, etag, _c in requested)
        except ValueError:
            md5s = None
        if md5s is None or m.etag != f"{hashlib.md5(md5s).hexdigest()}-{len(requested)}":
            raise E.NoSuchUpload(UploadId=upload_id)
        for (number, etag, cks), stored in zip(requested, m.part_checksums or [{}] * len(requested)):
            _check_listed_part_checksums(upload_id, number, etag, cks, stored)
        _check_claimed_type(claimed_type, m.checksum_type)
        if claim is not None:
            C.check_object_claim(claim, alg, m.checksum_type, m.checksums.get(alg) if alg else None,
                                 len(requested))
        return m


def _check_part_checksum_listed(alg: str | None, upload_type: str | None, number: int,
                                listed: dict[str, str]) -> None:
    """A CompleteMultipartUpload of an upload with a COMPOSITE checksum must
    list every part's checksum of the upload's algorithm (S3 refuses it
    otherwise); with a FULL_OBJECT checksum (CRC32, CRC32C, CRC64NVME) a
    part's checksum is optional, as in S3."""
    if alg is not None and upload_type == "COMPOSITE" and alg not in listed:
        raise E.InvalidRequest(f"The upload was created using a {alg.lower()} checksum. The complete request "
                               f"must include the checksum for each part. It was missing for part {number} "
                               "in the request.")


def _check_listed_part_checksums(upload_id: str, number: int, etag: str, listed: dict[str, str],
                                 stored: dict[str, str]) -> None:
    """A part checksum a CompleteMultipartUpload lists must be the one the part was stored with."""
    if any(alg in stored and stored[alg] != v for alg, v in listed.items()):
        raise E.InvalidPart("The checksum listed for a part does not match the part's checksum.",
                            UploadId=upload_id, PartNumber=str(number), ETag=etag)


def _check_claimed_type(claimed: str | None, upload_type: str | None) -> None:
    """The checksum type a CompleteMultipartUpload names must be the upload's."""
    if claimed is not None and upload_type is not None and claimed != upload_type:
        raise E.InvalidRequest(f"The upload was created using the {upload_type} checksum type. "
                               f"The complete request referenced the {claimed} checksum type.")


def replay_log(index: Index, log_dir: str, void=()) -> int:
    """Apply every log record after the index's `applied_seq` to it; returns
    how many.  Records voided by a later ABORT record (or listed in `void`,
    the pending aborts of primary/replication.py) are skipped, so the tail is
    read twice: once for the voids, once to apply."""
    applied = index.applied_seq()
    void = set(void)
    for rec in read_log(log_dir, from_seq=applied + 1):
        if rec.rtype == P.ABORT:
            void.update(P.decode_payload(rec.rtype, rec.payload)["seqs"])
    n = 0
    batch = []
    for rec in read_log(log_dir, from_seq=applied + 1):
        if rec.seq in void:
            continue
        batch.append((rec.seq, rec.rtype, P.decode_payload(rec.rtype, rec.payload)))
        if len(batch) >= REPLAY_BATCH:
            index.apply(batch)
            n += len(batch)
            batch = []
    if batch:
        index.apply(batch)
        n += len(batch)
    return n


def committed_state(data_dir: str) -> Index:
    """The primary's committed state rebuilt from its log alone, in memory
    (what `airlock verify` compares with the vault; never the live index,
    which may lag the log after a crash)."""
    import json as _json
    index = Index(":memory:")
    void: set[int] = set()
    try:
        with open(os.path.join(data_dir, "pending-aborts.json")) as f:
            void.update(int(s) for s in _json.load(f)["seqs"])
    except FileNotFoundError:
        pass
    replay_log(index, os.path.join(data_dir, "log"), void)
    return index


def _random_id(nbytes: int) -> str:
    """URL-safe base64 of `nbytes` random bytes that does not begin with "-":
    command lines take such a value for an option (`aws s3api upload-part
    --upload-id -Xb2...` fails: "expected one argument"), and S3's ids never
    begin with one."""
    while True:
        s = base64.urlsafe_b64encode(secrets.token_bytes(nbytes)).decode().rstrip("=")
        if s[0] != "-":
            return s


def _new_version_id() -> str:
    """32 URL-safe characters, random (192 bits), like S3's; order comes from
    the sequence number, not the id."""
    return _random_id(24)


def _new_upload_id() -> str:
    return _random_id(36)
