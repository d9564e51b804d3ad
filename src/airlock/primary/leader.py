"""The leader's side of a multi-process gateway: start, serve and supervise workers.

The leader is the gateway process that owns the commit point (primary log,
vault link), the index writer and the data-directory lock.  It alone listens
on the port, serves S3 like every worker, hands each new connection to the
process with the fewest busy (primary/dispatch.py), and answers its workers' calls
(docs/format/ipc.md) by running its own engine's methods, so every write
still goes through one commit point, one set of key locks and one index.
See primary/worker.py for the worker's side.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time

from airlock.aio import retrieve_exception, settled_on_failure
from airlock.config import GatewayConfig
from airlock.interpreter import child_env, module_command
from airlock.primary.dispatch import Dispatcher, connection_channel
from airlock.primary.engine import Engine
from airlock.primary.generation import Generation
from airlock.primary.ipc import CODE_CHANGED_EXIT, VERSION, Peer
from airlock.primary.worker import CARRY_CHUNKS, FORWARDED, tmp_owner

log = logging.getLogger("airlock.leader")

RESTART_DELAY_S = 1.0        # a worker that died is started again after this long ...
MAX_RESTART_DELAY_S = 30.0   # ... doubled up to this while it keeps dying young
STATS_TIMEOUT_S = 5.0        # a worker's counters for /_airlock/health, or left out
STABLE_S = 60.0              # a worker that lived this long died "old": back to RESTART_DELAY_S
STOP_GRACE_S = 15.0          # a stopping worker gets this long to finish, then SIGKILL


class Worker:
    def __init__(self, slot: int):
        self.slot = slot
        self.proc: asyncio.subprocess.Process | None = None
        self.peer: Peer | None = None
        self.restarts = 0


class WorkerPool:
    def __init__(self, engine: Engine, cfg: GatewayConfig, port: int, processes: int,
                 dispatcher: Dispatcher, code: str):
        self.engine = engine
        self.cfg = cfg
        self.port = port
        self.dispatcher = dispatcher
        self.workers = [Worker(i) for i in range(1, processes)]
        self.stopping = False
        self.code = code        # code_fingerprint() as this process started: a worker must run the same
        # tells the workers when their index caches are stale (docs/format/ipc.md);
        # the engine's index bumps it after every transaction it commits
        self.generation = Generation.create()
        engine.index.generation = self.generation
        self._supervisors: list[asyncio.Task] = []
        self._tasks: set[asyncio.Task] = set()
        self.handlers = {name: getattr(engine, name) for name in FORWARDED}
        for name in CARRY_CHUNKS:
            self.handlers["ship_and_" + name] = self._ship_and(getattr(engine, name))
        self.handlers.update(hello=self._hello, ship_chunks=self._ship_chunks,
                             chunk_from_vault=self._chunk_from_vault, health=engine.health,
                             storage_failed=self._storage_failed)
        engine.stats_sources.extend(self._stats_of(w) for w in self.workers)
        engine.on_degraded.append(self._on_degraded)

    # ------------------------------------------------------------------ calls from workers
    async def _hello(self):
        return VERSION, self.code, self.cfg, self.port, self.engine.vault_link is not None

    async def _ship_chunks(self, chunks):
        """`chunks`: [(digest, bytes)] or, for large chunks, [(digest, size)]
        whose files the worker has stored already: read them here."""
        self.engine._refuse_writes_if_degraded()
        if any(isinstance(data, int) for _d, data in chunks):
            chunks = await asyncio.get_running_loop().run_in_executor(self.engine.executor, self._load, chunks)
        await self.engine.commit_point.ship_chunks(chunks)

    def _load(self, chunks):
        out = []
        for d, data in chunks:
            if isinstance(data, int):
                # not verified here: the vault checks every chunk against its
                # digest and refuses a bad one, and the record that references
                # it then goes through the missing-chunk repair (replication.py)
                data = self.engine.store.read(d, verify=False)
            out.append((d, data))
        return out

    def _ship_and(self, method):
        """A commit call that carries the body's new chunks: ship, then commit
        (the chunks are on their way to the vault before the record is).
        `rows`: a small body's chunks, which the worker did not store: stored
        here, while they and the record go to the vault (the commit's
        `after`); the worker leaves them out of `chunks`."""
        async def call(chunks, *args, rows=(), **kwargs):
            if not rows:
                await self._ship_chunks(chunks)
                return await method(*args, **kwargs)
            self.engine._refuse_writes_if_degraded()
            stored = self.engine.store.put_small_async(asyncio.get_running_loop(), rows)
            stored.add_done_callback(retrieve_exception)
            async with settled_on_failure(stored):     # as in Engine.put_object
                await self._ship_chunks([*rows, *chunks])
                return await method(*args, after=stored, **kwargs)
        return call

    async def _chunk_from_vault(self, ref, problem):
        return await self.engine._chunk_from_vault(asyncio.get_running_loop(), ref, problem)

    async def _storage_failed(self, reason: str):
        # the switch runs in a task of the leader's own: it stops the worker
        # that called, and must not depend on that worker's channel
        self._spawn_task(self.engine.enter_degraded_mode(reason))

    def _spawn_task(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("gateway leader task failed: %r", t.exception())

    def _stats_of(self, w: Worker):
        async def stats() -> dict:
            if w.peer is None or w.peer.closed.is_set():
                return {}
            proc = await asyncio.wait_for(w.peer.call("stats"), STATS_TIMEOUT_S)
            return {**proc, "restarts": w.restarts} if proc else proc
        return stats

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.engine.degraded is not None:
            return              # degraded already at start (its log refused the vault's records): serve alone
        for w in self.workers:
            await self._spawn(w)
            self._supervisors.append(asyncio.get_running_loop().create_task(self._supervise(w)))

    async def _spawn(self, w: Worker) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        conns, their_conns = connection_channel()
        try:
            w.proc = await asyncio.create_subprocess_exec(
                # this process's own airlock, whatever the current directory holds
                *module_command("airlock.primary.worker"), str(theirs.fileno()), str(their_conns.fileno()),
                str(self.generation.fd), pass_fds=(theirs.fileno(), their_conns.fileno(), self.generation.fd),
                env=child_env())
        except BaseException:
            mine.close()
            conns.close()
            raise
        finally:
            theirs.close()
            their_conns.close()
        w.peer = Peer(mine, self.handlers)
        try:
            await w.peer.start()
        except BaseException:
            conns.close()
            raise
        if self.stopping or self.engine.degraded is not None:
            conns.close()                # stopped meanwhile: no connections for it (stop_one ends it)
            self._terminate(w)
        else:
            # the worker gets connections from its first report on (it is serving then)
            self.dispatcher.add_worker(w.slot, conns, on_broken=lambda _slot: self._terminate(w))
        log.info("gateway worker %d started (pid %d)", w.slot, w.proc.pid)

    def _terminate(self, w: Worker) -> None:
        """SIGTERM a worker (it finishes its requests and exits; the supervisor restarts it unless stopping)."""
        if w.proc is not None and w.proc.returncode is None:
            try:
                w.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def _supervise(self, w: Worker) -> None:
        delay = RESTART_DELAY_S
        while True:
            started = time.monotonic()
            rc = await w.proc.wait()
            self.dispatcher.remove_worker(w.slot)
            await w.peer.aclose()
            await self._remove_tmp_of(w)
            if self.stopping or self.engine.degraded is not None:
                return
            if rc == CODE_CHANGED_EXIT:
                # started again, it would run the same other code: the gateway goes on without it
                log.error("gateway worker %d not started again: the airlock installation changed since "
                          "the gateway started; restart the gateway to run the new code with all its "
                          "processes (serving with the others until then)", w.slot)
                self.engine.workers_not_running.append(
                    f"worker {w.slot}: the airlock installation changed since the gateway started; "
                    "restart the gateway")
                return
            # a worker that keeps dying is started again less and less often
            delay = RESTART_DELAY_S if time.monotonic() - started > STABLE_S else min(delay * 2, MAX_RESTART_DELAY_S)
            w.restarts += 1
            log.error("gateway worker %d (pid %d) exited with %s; starting it again in %.0f s",
                      w.slot, w.proc.pid, rc, delay)
            await asyncio.sleep(delay)
            if self.stopping or self.engine.degraded is not None:
                return
            try:
                await self._spawn(w)
            except OSError as e:
                log.error("could not start gateway worker %d: %s", w.slot, e)
                return

    async def _remove_tmp_of(self, w: Worker) -> None:
        """A worker that died mid-upload leaves the chunk files it was writing
        in chunks/tmp/; they never completed (a completed write is renamed)."""
        if self.engine.degraded is not None:
            return
        try:
            n = await asyncio.get_running_loop().run_in_executor(
                self.engine.executor, self.engine.store.remove_tmp, tmp_owner(w.proc.pid))
        except OSError as e:
            log.warning("could not remove the unfinished chunk files of worker %d: %s", w.slot, e)
            return
        if n:
            log.info("removed %d unfinished chunk file(s) of gateway worker %d (pid %d)", n, w.slot, w.proc.pid)

    def _on_degraded(self) -> None:
        """The primary's storage failed: the leader serves (from the vault) alone."""
        self._spawn_task(self._stop_workers())

    async def _stop_workers(self) -> None:
        async def stop_one(w: Worker) -> None:
            self.dispatcher.remove_worker(w.slot)       # no new connections for it
            if w.proc is None or w.proc.returncode is not None:
                return
            self._terminate(w)
            try:
                await asyncio.wait_for(w.proc.wait(), STOP_GRACE_S)
            except asyncio.TimeoutError:
                log.error("gateway worker %d did not stop in %.0f s; killing it", w.slot, STOP_GRACE_S)
                w.proc.kill()
                await w.proc.wait()
        await asyncio.gather(*(stop_one(w) for w in self.workers))

    async def stop(self) -> None:
        self.stopping = True
        await self._stop_workers()
        for t in self._supervisors:
            t.cancel()
        for w in self.workers:
            if w.peer is not None:
                await w.peer.aclose()
        # no worker reads the page now; the engine may still apply records
        if getattr(self.engine.index, "generation", None) is self.generation:
            self.engine.index.generation = None
        self.generation.close()
