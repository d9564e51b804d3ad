"""The replicated commit point: a change is durable when the vault says so.

    commit(record) -> queue -> [batch] -> primary log append (group fsync)  \
                                       `-> APPEND over the link -> vault fsync -> ACK
                   -> both done -> on_durable (index) -> visible

Order of durability.  A batch is queued on the primary log just before its
APPEND goes out, so the two domains sync at the same time; nothing is applied
(visible) and no client is answered before the vault's ACK *and* the primary
log's sync.  The vault is the authority on what happened: the primary log is a
prefix of the vault log except for the one batch on its way (at most
MAX_BATCH_RECORDS records).  A record whose chunks are still being made
durable on the primary (a small body's row commit, the `after` of `commit`)
goes to the vault at once, and into the primary log only once they are; if
they fail, the record is made void before the log takes it (as a pending
abort, below: the vault may hold it already) and its client hears the
error; the ABORT goes out ahead of the next batch (or from the link keeper
when no batch comes).  Not when that void cannot hold (the primary log
failed already, or pending-aborts.json cannot be written): the record then
stands as the vault holds it, as below (`_void_unless_stored`).  With
chunk_sync = "vault" (`overlap` off: the primary's chunk files are not
durable) the primary log takes a batch after its ACK, or, void, after its
failure.  A record is assigned the next sequence number
when its batch is sent; batches go one at a time (window 1: while one batch
is in flight the next one accumulates, which is the group commit), so both
logs hold the same records in the same order.

No acknowledgement (vault down, link cut, ack timeout).  The vault may or may
not hold the records of the failed batch.  Before the clients hear 503 their
sequence numbers are written to `pending-aborts.json` (fsynced).  When the
link comes back the primary reconciles (`_reconcile`):
  1. HELLO tells the vault's last durable sequence number V; the primary's is L.
  1a. The primary log may hold records beyond V: the batch whose APPEND never
     arrived (or a gateway that died sending it).  No client heard they
     succeeded; they are sent to the vault now (V becomes L), with an ABORT
     voiding the pending aborts among them in the same APPEND frame.  A gap
     of more than MAX_BATCH_RECORDS, or a vault whose record V differs from
     the primary's, is refused (not this primary's vault, or it lost data).
  2. Records L+1..V are fetched from the vault and appended to the primary log
     (the vault holds them, so they happened) -- except that any of them listed
     in pending-aborts is *void*: kept in both logs, never applied.  The
     chunks they reference that the primary lacks (a small body's row not
     yet committed when the gateway died) are fetched first.
  3. If any pending abort is <= V, an ABORT record listing them is committed
     through the normal path, so the vault knows too.  Without `overlap` a
     failed batch is written to the primary log (void) when its ACK fails, so
     that its numbers are never reused: the vault may still take the lost
     APPEND after answering the next HELLO.
  4. pending-aborts.json is removed.
The result: a change that got 503 is visible nowhere, and no sequence number
is ever applied twice (the vault accepts a retransmission only if it is
byte-identical, docs/format/link.md).

The primary log fails after an acknowledgement (write or fdatasync error,
or the index refusing the batch).  The vault holds the records, so they
happened: their clients hear success, and `on_local_failure` (the engine:
degraded mode, reads served from the vault's log) runs before they do, so a
read that follows sees the change; the clients of a batch whose rows were
still pending when the log failed hear theirs once the rows' fate is known.
Nothing is sent to the vault after that:
a failed log (or a paused commit point) refuses batches before they go out,
with 503.  The same holds when the log refuses the records reconciliation
takes from the vault.  A restart on repaired storage reconciles them in.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable

from airlock import errors as E
from airlock.aio import retrieve_exception
from airlock.chunk.store import ChunkStore
from airlock.fsutil import fsync_dir
from airlock.link import protocol as W
from airlock.link.client import LinkClient
from airlock.log import payload as P
from airlock.log.reader import read_log
from airlock.log.writer import LogWriteError, LogWriter
from airlock.primary.scrub import fetch_verified

log = logging.getLogger("airlock.replication")

ACK_TIMEOUT_S = 10.0          # default wait for the vault's durable ack before answering 503
RECONNECT_TIMEOUT_S = 5.0     # a commit waits this long for a dead link to come back
RECONNECT_INTERVAL_S = 1.0    # a lost link is retried in the background this often
FETCH_BATCH = 1000            # records per GET_RECORDS while reconciling
MAX_BATCH_BYTES = 8 << 20    # records per APPEND frame, by size (the frame limit is 16 MiB)
MAX_BATCH_RECORDS = 4096     # ... and by count: the most records the primary log can hold beyond the vault's
MISSING_CHUNK_RETRIES = 2     # APPEND refused for missing chunks: resend them this many times


class ReplicatedCommitPoint:
    def __init__(self, log_dir: str, on_durable: Callable[[list], None], link: LinkClient,
                 store: ChunkStore, state_dir: str, ack_timeout: float = ACK_TIMEOUT_S,
                 executor=None,
                 on_local_failure: Callable[[BaseException], Awaitable[None]] | None = None):
        self._engine_on_durable = on_durable
        self.log = LogWriter(log_dir, on_durable=self._local_durable)
        self.log.open()
        self.link = link
        self.store = store
        self.ack_timeout = ack_timeout
        self.executor = executor
        self._aborts_path = os.path.join(state_dir, "pending-aborts.json")
        self.pending_aborts: set[int] = self._load_aborts()
        self.void: set[int] = set(self.pending_aborts)
        self._queue: list[tuple[int, bytes, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._reconnect_failed_at = float("-inf")   # monotonic time of the last failed reconnect
        self._ready = False
        self._keeper: asyncio.Task | None = None
        # set when the gateway stops waiting for the vault (`stop_waiting`)
        self._stopping = asyncio.Event()
        self.paused = False       # set by the engine in degraded mode: the primary log is unusable
        # awaited once when the primary log fails on records the vault holds
        # (the engine switches to serving from the vault); see the module doc
        self.on_local_failure = on_local_failure
        self._local_failure: asyncio.Task | None = None
        # per batch with small bodies (by its first seq): the task that decides,
        # once their rows' fate is known, which of its records are void
        # (`_void_unless_stored`); `_finish` answers their clients after it
        self._voiding: dict[int, asyncio.Future] = {}
        self._next_seq = self.log.last_seq + 1
        # Records the primary log made durable before the vault acknowledged
        # them wait here, in sequence order, until it does (or they are void):
        # nothing is applied (visible) before the vault's ACK.  Everything the
        # log held at open was replayed already.
        self._acked_seq = self.log.last_seq
        self._held: list[tuple[int, int, bytes]] = []
        self._apply_error: BaseException | None = None
        # The primary log takes a batch while it goes to the vault, not after
        # the ACK, when its records' chunks are durable locally (with
        # chunk_sync = "vault" they are not, so it waits for the ACK as before)
        self.overlap = store.fsync
        self.stats = {"batches": 0, "records": 0, "ack_failures": 0, "reconciled": 0,
                      "chunks_shipped": 0, "bytes_shipped": 0, "missing_chunks_resent": 0,
                      "pushed": 0, "chunks_taken": 0}

    # ------------------------------------------------------------------ state
    @property
    def last_seq(self) -> int:
        return self.log.last_seq

    @property
    def healthy(self) -> bool:
        return self._ready and self.link.ready

    @property
    def link_state(self) -> str:
        """For /_airlock/health, in the words a worker's link uses:
        "connecting" while connected but not yet reconciled."""
        return "connected" if self.healthy else "connecting" if self.link.ready else "not connected"

    def _load_aborts(self) -> set[int]:
        try:
            with open(self._aborts_path) as f:
                return set(int(s) for s in json.load(f)["seqs"])
        except FileNotFoundError:
            return set()

    def _save_aborts(self) -> None:
        if not self.pending_aborts:
            try:
                os.unlink(self._aborts_path)
            except FileNotFoundError:
                pass
            return
        tmp = self._aborts_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seqs": sorted(self.pending_aborts)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._aborts_path)
        fsync_dir(os.path.dirname(self._aborts_path) or ".")

    async def _save_aborts_or_stop(self) -> None:
        """Persist the pending aborts of a batch that got no ack.  If that
        fails the records stay void only in memory (a restart would apply
        them), so the primary's storage is treated as failed: nothing more is
        written here (degraded mode, served from the vault)."""
        try:
            self._save_aborts()
        except OSError as exc:
            log.error("pending-aborts.json could not be written (%s): stopping writes", exc)
            await self._primary_log_failed(exc, wait=False)

    def _local_durable(self, records) -> None:
        """The primary log made `records` durable (in order): apply those the
        vault has acknowledged; hold the others until it does."""
        self._held.extend(records)
        self._apply_held()

    def _apply_held(self) -> None:
        """Apply, in order, the held records the vault has acknowledged; void
        ones are dropped.  Raises what the engine's hook raised (and, after
        that, again: nothing more is applied once a record was not)."""
        if self._apply_error is not None:
            raise self._apply_error
        n = 0
        for seq, _r, _p in self._held:
            if seq > self._acked_seq and seq not in self.void:
                break
            n += 1
        if not n:
            return
        ready, self._held = self._held[:n], self._held[n:]
        live = [r for r in ready if r[0] not in self.void]
        if live:
            self._engine_on_durable(live)

    def _acknowledged(self, seq: int) -> None:
        """The vault holds every record up to `seq`: apply what the primary
        log holds of them.  A failure to apply is a failure of the primary's
        storage, as when the log's own hook fails (`_finish` reports it)."""
        self._acked_seq = max(self._acked_seq, seq)
        try:
            self._apply_held()
        except Exception as exc:  # noqa: BLE001
            log.error("applying acknowledged records failed: %r", exc)
            self._apply_error = exc
            self.paused = True

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        try:
            async with self._lock:
                await self._ensure_ready()
        except (E.ReplicationError, asyncio.TimeoutError) as e:
            log.warning("vault not reachable at start (%s); writes answer 503 until it is", e)
        self._keeper = asyncio.get_running_loop().create_task(self._keep_link())

    async def _keep_link(self) -> None:
        """Reconnect (and reconcile) a lost link in the background, so health
        tells the truth and pending aborts are settled without waiting for
        the next write."""
        while not self._stopping.is_set():
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            if self.paused or self._stopping.is_set():
                continue
            if self.healthy and not any(s <= self._acked_seq for s in self.pending_aborts):
                continue
            try:
                async with self._lock:
                    if self.paused:                     # paused while this waited: nothing goes out
                        continue
                    await self._ensure_ready()
                    await self._send_due_aborts()       # no batch came to take them along
            except (E.ReplicationError, asyncio.TimeoutError, OSError):
                pass
            except Exception:
                log.exception("reconnecting the link failed")

    def stop_waiting(self) -> None:
        """The gateway is stopping and its grace is over: nothing waits for
        the vault any more.  The batch on its way (if any) fails at once, as
        on an ack timeout -- its records void, pending-aborts.json fsynced,
        its clients answered 503 -- and so do the records queued behind it,
        unsent; no reconnect starts, and one in progress gives up.  The
        clients of the writes still waiting thus get their 503 before their
        connections are cut, and the stop does not wait out an ack timeout
        (until 2026-11-27 it did, and then a RECONNECT_TIMEOUT_S more for the
        queued records: a stop with a frozen vault took ack_timeout + 6 s).
        A vault that did take the batch voids it at the next reconcile, as
        after any ack failure (module doc)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._lock.locked():          # a batch, a reconnect or a reconcile is waiting for the vault
            self.link.abort()

    async def close(self) -> None:
        self.stop_waiting()
        if self._sender is not None:
            # what is left of its work is local: voiding a failed batch
            try:
                await asyncio.wait_for(asyncio.shield(self._sender), self.ack_timeout)
            except (asyncio.TimeoutError, Exception):
                pass
        if self._keeper is not None:
            self._keeper.cancel()
        if self.healthy:
            await self.link.close()
        else:
            self.link.abort()            # a frozen vault would not finish a graceful close
        await self.log.aclose()

    async def ensure_link(self, reconcile: bool = True) -> None:
        """A connected link for reads (GET_CHUNK, GET_RECORDS).  With
        reconcile=False (degraded mode: the primary log is unusable) the link
        is only connected, never reconciled."""
        if self.link.ready and (self._ready or not reconcile):
            return
        since = time.monotonic()
        async with self._lock:
            if reconcile:
                try:
                    await self._ensure_ready(since)
                except asyncio.TimeoutError:
                    raise E.VaultUnavailable("the vault did not answer in time") from None
            elif not self.link.ready:
                await self._connect()

    async def _connect(self) -> dict:
        """link.connect() within RECONNECT_TIMEOUT_S (asyncio.TimeoutError
        after it); VaultUnavailable at once when the gateway stops waiting
        for the vault (`stop_waiting`), before or during the attempt."""
        if self._stopping.is_set():
            raise E.VaultUnavailable("the gateway is stopping: the link is not reconnected")
        connect = asyncio.ensure_future(self.link.connect())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({connect, stopping}, timeout=RECONNECT_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not connect.done():
                connect.cancel()         # connect() closes what it opened when cancelled
                await asyncio.wait({connect})
        if not connect.cancelled():
            return connect.result()
        if self._stopping.is_set():
            raise E.VaultUnavailable("the gateway is stopping: the link is not reconnected")
        raise asyncio.TimeoutError

    async def _ensure_ready(self, waiting_since: float | None = None) -> None:
        """Connected and reconciled; call with the lock held.

        `waiting_since`: when the caller began to wait for the lock.  If a
        reconnect failed after that (another caller's, while this one
        queued), this caller shares its outcome -- VaultUnavailable at once
        -- instead of waiting out a RECONNECT_TIMEOUT_S of its own: while the
        vault does not answer, the callers queued on the lock would
        otherwise fail one after the other, each after the whole timeout.
        A caller that arrives later tries again itself."""
        if self._ready and self.link.ready:
            return
        if waiting_since is not None and self._reconnect_failed_at >= waiting_since:
            raise E.VaultUnavailable("the vault is not reachable (a reconnect failed while this waited)")
        self._ready = False
        try:
            hello = await self._connect()
            await self._reconcile(int(hello["last_seq"]))
        except BaseException:
            self._reconnect_failed_at = time.monotonic()
            raise
        self._ready = True

    async def _reconcile(self, vault_last: int) -> None:
        await self._settle_inflight()
        local_last = self.log.last_seq
        if vault_last < local_last:
            if local_last - vault_last > MAX_BATCH_RECORDS:
                await self.link.close()
                raise E.VaultRejected(
                    f"the vault's log ends at sequence {vault_last} but the primary's at {local_last}: "
                    f"this is not the vault this primary replicates to, or it lost data; refusing to write")
            if vault_last:
                await self._same_record(vault_last)
            vault_last = await self._push_tail(vault_last, local_last)
            local_last = self.log.last_seq
        self._acknowledged(vault_last)
        if self._apply_error is not None:
            await self._primary_log_failed(self._apply_error, wait=False)
            raise E.ReplicationError(f"the primary cannot apply records the vault holds: {self._apply_error!r}")
        seq = local_last + 1
        fetched = 0
        while seq <= vault_last:
            records = await self.link.get_records(seq, FETCH_BATCH)
            if not records:
                raise E.VaultRejected(f"vault announced records up to {vault_last} but returned none from {seq}")
            for s, rtype, payload in records:
                if s != seq:
                    raise E.VaultRejected(f"vault returned record {s} where {seq} was expected")
                if s in self.pending_aborts:
                    self.void.add(s)
                seq += 1
            await self._take_chunks_of(records)
            try:
                got = await asyncio.gather(*(self.log.append(rtype, payload) for _s, rtype, payload in records))
            except LogWriteError as e:
                # the vault holds records the primary cannot record: they are
                # served from the vault (not awaited: that needs this lock)
                await self._primary_log_failed(e, wait=False)
                raise E.ReplicationError(f"the primary log cannot take the vault's records: {e}") from None
            if list(got) != [r[0] for r in records]:
                raise E.ReplicationError(f"primary log sequence diverged while reconciling: {got[:3]}...")
            fetched += len(records)
        self._next_seq = vault_last + 1
        # Every failed number is in the primary log (`_replicate`), so the
        # push above made V cover them; nothing above V is void.
        self.void = {s for s in self.void if s <= vault_last}
        if fetched:
            log.info("reconciled: took %d record(s) the vault held beyond the primary log (up to %d)",
                     fetched, vault_last)
        voids = sorted(s for s in self.pending_aborts if s <= vault_last)
        if voids:
            log.warning("voiding %d record(s) the vault holds but whose clients got an error: %s",
                        len(voids), voids[:10])
            await self._abort_locally_too(await self._replicate([(P.ABORT, P.encode_payload({"seqs": voids}))]))
        self.pending_aborts.clear()
        self._save_aborts()
        self.stats["reconciled"] += 1

    async def _take_chunks_of(self, records) -> None:
        """Fetch from the vault, verify and store the chunks that records
        the vault holds beyond the primary log reference and the primary
        lacks, before the log takes them: a small body's record reaches the
        vault while its row is being committed, and a gateway killed in
        between left the record there and no row here.  Best effort: a
        chunk the vault cannot give (a record voided later) is left to the
        read path's repair."""
        loop = asyncio.get_running_loop()
        voids = set(self.pending_aborts)
        for _s, rtype, payload in records:
            if rtype == P.ABORT:
                voids.update(P.decode_payload(rtype, payload)["seqs"])
        wanted: dict[str, None] = {}
        for s, rtype, payload in records:
            if s in voids or rtype == P.ABORT:
                continue
            try:
                wanted.update((d, None) for d in P.chunks_referenced(rtype, P.decode_payload(rtype, payload)))
            except (KeyError, TypeError, ValueError, IndexError):
                continue
        for d in wanted:
            if await loop.run_in_executor(self.executor, self.store.has, d):
                continue
            try:
                data = await fetch_verified(self.link, d)
                await loop.run_in_executor(self.executor, self.store.replace, d, data)
                self.stats["chunks_taken"] += 1
            except (E.ReplicationError, E.IntegrityError, OSError) as e:
                log.warning("reconciling: chunk %s of a record the vault holds could not be stored here: %s", d, e)

    async def _settle_inflight(self) -> None:
        """Wait for the primary log appends of the last batch sent (its ACK
        failed while they were on their way): reconciling needs the log's end."""
        try:
            await asyncio.wait_for(self.log.drain(), self.ack_timeout)
        except asyncio.TimeoutError:
            raise E.ReplicationError("the primary log is still writing its last batch; reconciling later") from None
        if self.log.failed is not None:
            # the vault may hold what the primary log could not take: served from the vault
            await self._primary_log_failed(self.log.failed, wait=False)
            raise E.ReplicationError(f"the primary log cannot be written: {self.log.failed}")

    async def _abort_locally_too(self, local) -> None:
        """Wait for the primary log appends `local` of an ABORT the vault
        acknowledged.  Bounded, as this runs with the lock held: a stalled
        disk answers 503 (a later reconcile sends the same ABORT again;
        voiding twice is harmless).  If the log cannot take it, the vault
        holds what the primary cannot: served from the vault."""
        futs = [f for _s, f in local]
        if not futs:
            return
        _done, pending = await asyncio.wait(futs, timeout=self.ack_timeout)
        if pending:
            raise E.ReplicationError("the primary log did not take an ABORT in time; reconciling later")
        failed = next((f.exception() for f in futs if f.exception() is not None), self._apply_error)
        if failed is not None:
            await self._primary_log_failed(failed, wait=False)
            raise E.ReplicationError(f"the primary log cannot take the ABORT the vault holds: {failed}")

    async def _same_record(self, seq: int) -> None:
        """The vault's record `seq` is the primary log's: the two logs share
        their history up to it (checked before sending the vault more)."""
        directory = self.log.directory
        mine = await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: next(read_log(directory, seq), None))
        theirs = await self.link.get_records(seq, 1)
        if (mine is None or not theirs or theirs[0][0] != seq or theirs[0][1] != mine.rtype
                or bytes(theirs[0][2]) != bytes(mine.payload)):
            await self.link.close()
            raise E.VaultRejected(
                f"the vault's record {seq} is not the primary log's: this is not the vault this primary "
                f"replicates to; refusing to write")

    async def _push_tail(self, vault_last: int, local_last: int) -> int:
        """The primary log ends with records the vault does not hold: the
        batch that was on its way when its ACK failed or the gateway died, or
        records a vault restored from an older copy lost.  They go to the
        vault now, so that the two logs hold the same records again (sending
        is safe even if an APPEND of them from before is still being
        processed there: the vault takes a byte-identical record twice).
        Pending aborts among them (their clients were told 503) are voided by
        an ABORT record in the same APPEND frame, so the vault never holds
        them live.  Returns the vault's new last sequence number."""
        directory = self.log.directory

        def read_tail():
            return [(r.seq, r.rtype, bytes(r.payload)) for r in read_log(directory, vault_last + 1)
                    if r.seq <= local_last]
        tail = await asyncio.get_running_loop().run_in_executor(self.executor, read_tail)
        if [r[0] for r in tail] != list(range(vault_last + 1, local_last + 1)):
            raise E.ReplicationError(f"the primary log's records {vault_last + 1}..{local_last} are not readable")
        voids = sorted(s for s in self.pending_aborts if s <= local_last)
        log.warning("sending the vault %d record(s) it does not hold (%d..%d)%s", len(tail),
                    vault_last + 1, local_last, f", and an ABORT voiding {voids[:10]}" if voids else "")
        abort = [(P.ABORT, P.encode_payload({"seqs": voids}))] if voids else []
        self._next_seq = local_last + 1
        await self._abort_locally_too(await self._replicate(abort, resend=tail))
        self.pending_aborts.difference_update(voids)
        self.stats["pushed"] += len(tail)
        return self._next_seq - 1

    # ------------------------------------------------------------------ commit
    async def commit(self, rtype: int, payload: bytes, after: asyncio.Future | None = None) -> int:
        """Commit one record (module doc); `after`: the future of the primary's
        durability of the chunks it references (commit.py)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((rtype, payload, fut, after))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_loop())
        # shield: once queued, a record's fate no longer depends on its client
        # (whose request may be cut by a stop: its failure is then nobody's to read)
        fut.add_done_callback(retrieve_exception)
        return await asyncio.shield(fut)

    def _take_batch(self) -> list:
        """The queued records that fit one APPEND frame, oldest first."""
        size = 0
        for i, (_r, payload, _f, _a) in enumerate(self._queue):
            size += len(payload) + 64
            if i and (size > MAX_BATCH_BYTES or i >= MAX_BATCH_RECORDS):
                batch, self._queue = self._queue[:i], self._queue[i:]
                return batch
        batch, self._queue = self._queue, []
        return batch

    async def _send_loop(self) -> None:
        while self._queue:
            batch = self._take_batch()
            try:
                local = await self._commit_batch([(rtype, payload) for rtype, payload, _f, _a in batch],
                                                 [a for _r, _p, _f, a in batch])
            except Exception as exc:  # every client of the batch hears the same failure
                for _r, _p, fut, _a in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            # local durability (group fsync) runs while the next batch goes to the vault
            asyncio.get_running_loop().create_task(self._finish(batch, local))

    async def _finish(self, batch, local) -> None:
        """`local`: [(seq, task of its primary log append)] of an acknowledged batch."""
        results = await asyncio.gather(*(t for _s, t in local), return_exceptions=True)
        voiding = self._voiding.pop(local[0][0], None) if local else None
        if voiding is not None:
            # a failed log fails its appends without waiting for what they
            # waited for: a client hears its outcome once its row's is known,
            # and which records that made void
            await asyncio.wait([voiding])
        failed = next((r for r in results if isinstance(r, BaseException)), self._apply_error)
        if failed is not None:
            await self._primary_log_failed(failed)
        for (_r, _p, fut, after), (seq, _t), res in zip(batch, local, results):
            if fut.done():
                continue
            if after is not None and _failure(after) is not None and seq in self.void:
                fut.set_exception(_failure(after))      # void (_void_unless_stored): it never took effect
                continue
            # the vault acknowledged: the change happened even if the primary
            # log could not take it (it is served from the vault from now on),
            # or its row could not be stored once it was (_void_unless_stored)
            fut.set_result(seq if isinstance(res, BaseException) else res)

    async def _primary_log_failed(self, exc: BaseException, wait: bool = True) -> None:
        """Records the vault holds could not be made durable locally.  Switch
        (once) to serving from the vault and wait, within the ack timeout,
        until that is done, so that the records' clients can read them."""
        if self._local_failure is None:
            log.error("the primary log failed on records the vault holds: %s; "
                      "they are durable in the vault only", exc)
            self.paused = True
            hook = self.on_local_failure
            if hook is None:
                return
            # the hook degrades the engine at once and returns what loads the vault's state
            try:
                self._local_failure = asyncio.ensure_future(hook(exc))
            except Exception:      # never leave the batch's clients waiting on a broken hook
                log.exception("switching to degraded mode failed")
                return
            self._local_failure.add_done_callback(_log_failure_of)
        if not wait:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._local_failure), self.ack_timeout)
        except Exception as e:      # the vault's state not loaded yet: the records are durable all the same
            log.error("serving from the vault after the primary log failed: %r", e)

    async def settled(self) -> None:
        """Wait until no batch is on its way to the vault: the one holding the
        commit lock has its answer.  Once `paused` is set no batch starts
        after that (each refuses under the lock), so what the vault holds
        then is all any client will hear success for (the degraded load,
        `Engine._serve_from_vault`)."""
        async with self._lock:
            pass

    def _refuse_if_log_unusable(self) -> None:
        if self.paused or self.log.failed is not None:
            # the primary cannot record what the vault would acknowledge: send nothing
            raise E.ServiceUnavailable(
                "The primary's log cannot be written; writes are refused until the primary is restored.")

    async def _commit_batch(self, records: list[tuple[int, bytes]],
                            afters: list[asyncio.Future | None] | None = None) -> list[tuple[int, asyncio.Task]]:
        since = time.monotonic()
        async with self._lock:
            # checked with the lock held: the batch before may have failed the log meanwhile
            self._refuse_if_log_unusable()
            if self._stopping.is_set():
                raise E.VaultUnavailable("the gateway is stopping: nothing more goes to the vault; "
                                         "nothing was stored")
            try:
                await self._ensure_ready(since)
            except asyncio.TimeoutError:
                raise E.VaultUnavailable("the vault did not answer in time") from None
            await self._send_due_aborts()
            return await self._replicate(records, afters=afters)

    async def _send_due_aborts(self) -> None:
        """Void, in the vault too, the acknowledged records whose chunks the
        primary could not store (`_void_unless_stored`).  Lock held."""
        voids = sorted(s for s in self.pending_aborts if s <= self._acked_seq)
        if not voids:
            return
        log.warning("voiding %d acknowledged record(s) whose chunks the primary could not store: %s",
                    len(voids), voids[:10])
        await self._abort_locally_too(await self._replicate([(P.ABORT, P.encode_payload({"seqs": voids}))]))
        self.pending_aborts.difference_update(voids)
        await self._save_aborts_or_stop()

    async def _replicate(self, records: list[tuple[int, bytes]],
                         resend: list[tuple[int, int, bytes]] = (),
                         afters: list[asyncio.Future | None] | None = None) -> list[tuple[int, asyncio.Future]]:
        """Number one batch, start its primary log appends, await the vault's
        durable ack and return (seq, future of its local append) for each
        record.  With `overlap` the local appends start before the APPEND
        goes out, so both domains sync at once; nothing is applied (visible)
        before the ack all the same (`_local_durable`).  `resend`: records the
        primary log holds already and the vault lacks (`_push_tail`), sent
        ahead of the batch in the same frame; `afters`: per record, the future
        of its chunks' durability on the primary (`commit`).  Lock held."""
        first = self._next_seq
        numbered = [(first + i, rtype, payload) for i, (rtype, payload) in enumerate(records)]
        frame = list(resend) + numbered
        local = None
        if self.overlap:
            # raises (nothing numbered or sent) if the log is unusable
            local = self._start_local(numbered, afters=afters)
        self._next_seq = first + len(numbered)
        try:
            acked = await asyncio.wait_for(self._append_with_repair(frame), self.ack_timeout)
            if acked < frame[-1][0]:
                raise E.ReplicationError(f"vault acknowledged {acked}, expected {frame[-1][0]}")
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the vault may hold them
            self.stats["ack_failures"] += 1
            self._voiding.pop(first, None)      # no `_finish` for this batch: its records are void
            self._ready = False
            # at once, not gracefully: a vault that did not answer in time
            # would not answer the TLS close either, and the connection
            # stayed open (half-open: asyncio waits 30 s for the close) while
            # the next reconnect was tried
            self.link.abort()
            if numbered:
                # The vault may hold these records: they must never take effect.
                self.pending_aborts.update(s for s, _r, _p in numbered)
                self.void.update(s for s, _r, _p in numbered)
                await self._save_aborts_or_stop()
                if local is None and not self.paused:
                    # Without `overlap` the batch goes into the primary log
                    # now, void (pending-aborts.json is durable first), so
                    # that its numbers are never given to other records: the
                    # vault may still be processing the lost APPEND after
                    # answering the next HELLO, and a reused number would
                    # then collide there (and a later reconcile fetch the
                    # 503'd records as live).  Reconnecting sends them like
                    # any batch whose APPEND never arrived (`_push_tail`).
                    try:
                        void = self._start_local(numbered, acked=True)
                    except E.ReplicationError as e:
                        log.error("could not write a failed batch to the primary log: %s", e)
                    else:
                        # durable before the clients hear 503 (bounded: the lock is held)
                        await asyncio.wait([f for _s, f in void], timeout=self.ack_timeout)
            if isinstance(exc, asyncio.TimeoutError):
                raise E.AckTimeout(f"no durable ack from the vault within {self.ack_timeout:g}s") from None
            if self._stopping.is_set():
                # (a ReplicationError: the link keeper's ABORT fails as quietly as an ack timeout)
                raise E.VaultUnavailable("the gateway stopped before the vault acknowledged this change; "
                                         "nothing was stored") from None
            raise
        self.stats["batches"] += 1
        self.stats["records"] += len(numbered)
        if local is None:
            local = self._start_local(numbered, acked=True, afters=afters)
        self._acknowledged(frame[-1][0])
        return local

    def _start_local(self, numbered, acked: bool = False,
                     afters: list[asyncio.Future | None] | None = None) -> list[tuple[int, asyncio.Future]]:
        """Queue a batch's primary log appends (they take its sequence numbers
        at once, in order; they are written once `afters` are done, see
        `_void_unless_stored`).  Before the ack an unusable log refuses the batch;
        after it, the failure is the appends' (`_finish` handles it)."""
        if not numbered:
            return []
        if not acked:
            self._refuse_if_log_unusable()
        if self.log.failed is None and self.log.next_seq != numbered[0][0]:
            raise E.ReplicationError(
                f"primary log at {self.log.next_seq - 1}, replication at {numbered[0][0] - 1}")
        guard = None
        if afters and any(a is not None for a in afters):
            guard = asyncio.ensure_future(self._void_unless_stored([s for s, _r, _p in numbered], afters))
            guard.add_done_callback(retrieve_exception)
            self._voiding[numbered[0][0]] = guard
        futs = self.log.enqueue([(rtype, payload) for _s, rtype, payload in numbered], after=guard)
        for f in futs:
            f.add_done_callback(retrieve_exception)
        return [(s, f) for (s, _r, _p), f in zip(numbered, futs)]

    async def _void_unless_stored(self, seqs: list[int], afters: list[asyncio.Future | None]) -> None:
        """Wait until the chunks of a batch's records are durable on the
        primary; the log writes the batch after this.  A record whose chunks
        could not be stored (a full disk, an I/O error) is made void first,
        durably (pending-aborts.json), as a record whose ACK failed: the vault
        may hold it already, so an ABORT follows (`_send_due_aborts`), and
        its client hears the storage error (`_finish`).

        Unless the void cannot hold: when the primary log has failed already
        (or the gateway degraded otherwise), the gateway serves the vault's
        records -- these among them if the vault acknowledged them, with
        their chunks, which it refuses an APPEND without -- and no ABORT can
        reach the vault before a restart; when pending-aborts.json cannot
        be written, a restart would apply them.  Then they are not void: if
        the vault acknowledged them their clients hear success (served from
        the vault, "The primary log fails after the acknowledgement" in
        docs/architecture.md), else their ACK's failure voids them as any.
        The log never takes them (this raises: it refuses the batch) -- the
        primary lacks their chunks."""
        await asyncio.wait([a for a in afters if a is not None])
        errors = {s: _failure(a) for s, a in zip(seqs, afters) if a is not None and _failure(a) is not None}
        if not errors:
            return
        failed = list(errors)
        first_error = errors[failed[0]]
        if self.paused or self.log.failed is not None:
            log.error("the chunks of record(s) %s could not be stored on the primary (%r), whose log "
                      "is not written any more: they stand as the vault holds them", failed[:10], first_error)
            raise first_error
        log.error("the chunks of record(s) %s could not be stored on the primary (%r): void",
                  failed[:10], first_error)
        new = [s for s in failed if s not in self.void]     # (a batch whose ACK failed is void already)
        self.pending_aborts.update(new)
        self.void.update(new)
        try:
            self._save_aborts()
        except OSError as exc:
            # void in memory only, which a restart would not know: they stand
            self.pending_aborts.difference_update(new)
            self.void.difference_update(new)
            log.error("pending-aborts.json could not be written (%s): record(s) %s stand as the vault "
                      "holds them; stopping writes", exc, failed[:10])
            await self._primary_log_failed(exc, wait=False)
            raise

    async def _append_with_repair(self, numbered) -> int:
        for attempt in range(MISSING_CHUNK_RETRIES + 1):
            try:
                return await self.link.append(numbered)
            except E.VaultRejected as e:
                if getattr(e, "code", None) != "missing_chunks" or attempt == MISSING_CHUNK_RETRIES:
                    raise
                digests = list(e.info.get("digests") or [])
                log.warning("vault lacks %d chunk(s) a record references; resending them", len(digests))
                loop = asyncio.get_running_loop()
                for d in digests:
                    try:
                        data = await loop.run_in_executor(self.executor, self.store.read, d)
                    except (E.IntegrityError, OSError) as err:
                        # The local copy is gone or damaged (with chunk_sync = "vault" a
                        # chunk written just before a power loss may be; its first record
                        # was then never acknowledged, so the vault lacks it too).  Drop it
                        # so that the next upload of these bytes writes and ships it anew.
                        await loop.run_in_executor(self.executor, self.store.discard, d)
                        raise E.ReplicationError(
                            f"chunk {d} is missing on the vault and damaged locally ({err}); "
                            "dropped the local copy, the upload can be retried") from None
                    await self.link.put_chunk(d, data)
                    self.stats["missing_chunks_resent"] += 1
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ chunks
    async def ship_chunks(self, chunks: list[tuple[str, bytes]]) -> None:
        """Stream new chunks to the vault while the body is still arriving.
        Waits only for the socket (backpressure), not for the vault's OKs:
        the ACK of the APPEND that references them is the durability point."""
        if not self.healthy:
            since = time.monotonic()
            async with self._lock:
                try:
                    await self._ensure_ready(since)
                except asyncio.TimeoutError:
                    raise E.VaultUnavailable("the vault did not answer in time") from None
        for d, data in chunks:
            fut = await self.link.send_chunk(d, data)
            fut.add_done_callback(_log_chunk_refusal)
        self.stats["chunks_shipped"] += len(chunks)
        self.stats["bytes_shipped"] += sum(len(d) for _h, d in chunks)


def _log_failure_of(task: "asyncio.Task") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("switching to serving from the vault failed (retried by the storage watch): %r",
                  task.exception())


def _log_chunk_refusal(fut: "asyncio.Future") -> None:
    if fut.cancelled() or fut.exception() is not None:
        return  # link failures surface on the APPEND that follows
    frame = fut.result()
    if frame.kind == W.ERROR:
        log.warning("vault refused a chunk: %s", W.decode_json(frame.payload))


def _failure(fut: "asyncio.Future") -> BaseException | None:
    """The error of a done future (a cancelled one: cancelled is a failure too)."""
    if fut.cancelled():
        return E.ServiceUnavailable("storing the chunks of this change was cancelled")
    return fut.exception()
