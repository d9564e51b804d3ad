"""Run the primary domain's S3 gateway: open the engine, connect the link to
the vault, serve HTTP, stop cleanly."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os

from aiohttp import web

from airlock.aio import stop_on_signals
from airlock.config import GatewayConfig, gateway_processes
from airlock.errors import ConfigError
from airlock.primary.engine import Engine
from airlock.s3.app import make_app

log = logging.getLogger("airlock.gateway")

SHUTDOWN_GRACE_S = 10.0   # seconds in-flight requests get to finish on SIGTERM (S3App.drain);
                          # then writes still waiting for the vault answer 503 (Engine.stop_waiting_for_vault)
CUT_AFTER_DRAIN_S = 1.0   # then aiohttp's own shutdown: what still runs is cancelled after this
PORT_WAIT_S = 3.0         # how long a taken port is retried before giving up


def link_paths(keys_dir: str) -> tuple[str, str, str]:
    """(own cert, own key, pinned vault cert) in a primary keys directory."""
    paths = tuple(os.path.join(keys_dir, n) for n in ("primary.crt", "primary.key", "vault.crt"))
    for p in paths:
        if not os.path.exists(p):
            raise ConfigError(f"link key file missing: {p} (create keys with `airlock keys`)")
    return paths


def make_link_client(cfg: GatewayConfig):
    from airlock.link.client import LinkClient
    from airlock.link.tls import client_context
    if not cfg.link_keys:
        raise ConfigError("[link] vault is set but [link] keys (the primary's key directory) is not")
    cert, key, vault_cert = link_paths(cfg.link_keys)
    ctx = client_context(cert, key, vault_cert)
    with open(cert, "rb") as f:
        primary_id = hashlib.sha256(f.read()).hexdigest()[:16]
    host, port = cfg.vault
    return LinkClient(host, port, ctx, primary_id)


def make_engine(cfg: GatewayConfig) -> Engine:
    factory = None
    if cfg.vault is not None:
        link = make_link_client(cfg)

        def factory(engine: Engine, log_dir: str):
            from airlock.primary.replication import ReplicatedCommitPoint
            return ReplicatedCommitPoint(log_dir, engine._on_durable, link, engine.store,
                                         engine.data_dir, ack_timeout=cfg.ack_timeout,
                                         executor=engine.executor,
                                         on_local_failure=engine._primary_log_failed)
    else:
        log.warning("no vault configured: commits are durable in the primary log only "
                    "(local-only mode, for tests and benchmarks)")
    # With a vault, every chunk a record references is on the vault's stable
    # storage before the record is acknowledged, and every local read is
    # verified and repaired from the vault: fsyncing the primary's chunk files
    # as well can be turned off (chunk_sync = "vault": +20-30% on 4 KiB PUTs,
    # docs/performance.md; "local" stays the default because it lets the
    # primary stand alone through a double failure, docs/architecture.md).
    # Without a vault the chunk files are the only copy and are always fsynced.
    chunk_fsync = cfg.fsync and (cfg.vault is None or cfg.chunk_sync == "local")
    return Engine(cfg.data, fsync=cfg.fsync, chunk_fsync=chunk_fsync, commit_point_factory=factory,
                  min_free_bytes=cfg.min_free_mib << 20)


def refuse_taken_port(host: str, port: int) -> None:
    """ConfigError if something listens on host:port already, before the
    data directory is opened.  A plain bind (no SO_REUSEPORT) fails if
    anyone listens there.  (Until 2026-11-26 every gateway process listened
    with SO_REUSEPORT, and this check was also what kept a second gateway
    from sharing the port of a running one; now only the leader listens,
    without SO_REUSEPORT.)"""
    if port == 0:
        return
    import errno
    import socket
    import time
    deadline = time.monotonic() + PORT_WAIT_S
    for family, kind, proto, _name, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        while True:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(addr)
                    break
                except OSError as e:
                    # a gateway killed a moment ago may still hold the port
                    # for a few milliseconds: give it that long
                    if e.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


async def serve(cfg: GatewayConfig, on_ready=None, stop: asyncio.Event | None = None) -> None:
    from airlock.primary.datalock import PrimaryLock
    processes = gateway_processes(cfg)
    code = None
    if processes > 1:
        # the code this process runs, taken before opening the engine (a
        # replay may take long, and the installation may change meanwhile):
        # a worker must run the same (ipc.code_fingerprint)
        from airlock.primary import dispatch, leader  # noqa: F401  (imported before the fingerprint)
        from airlock.primary.ipc import code_fingerprint
        code = code_fingerprint()
    refuse_taken_port(cfg.host, cfg.port)   # a clear error, before anything is opened
    lock = PrimaryLock(cfg.data)     # one gateway per data directory; restore takes it too
    try:
        engine = make_engine(cfg)
        engine.open()
    except BaseException:
        lock.release()
        raise
    await engine.start()
    runner = pool = dispatcher = None
    try:
        # With workers, the leader alone listens and hands each connection to the
        # process with the fewest busy (primary/dispatch.py, leader.py, worker.py).
        activity = None
        if processes > 1:
            from airlock.primary.dispatch import Activity, Dispatcher
            from airlock.primary.leader import WorkerPool
            activity = Activity()
        runner = web.AppRunner(make_app(engine, cfg, activity), access_log=None, handle_signals=False,
                               shutdown_timeout=CUT_AFTER_DRAIN_S)
        await runner.setup()
        if processes > 1:
            dispatcher = Dispatcher(runner.server, activity)
            engine.connections = dispatcher.counts
            try:
                port = dispatcher.listen(cfg.host, cfg.port, backlog=1024)
            except OSError as e:
                raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
            pool = WorkerPool(engine, cfg, port, processes, dispatcher, code)
            await pool.start()
        else:
            site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024, reuse_address=True)
            await site.start()
        stop = stop or asyncio.Event()
        stop_on_signals(stop, "gateway")
        if on_ready is not None:
            on_ready(cfg)
        await stop.wait()
    finally:
        log.info("stopping gateway")
        # the grace is the whole gateway's: once it is over, writes still
        # waiting for the vault answer 503 (the vault may be frozen: their
        # clients would otherwise be cut without an answer, and the engine's
        # close wait out an ack timeout), also those of workers that commit here
        grace_over = asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, engine.stop_waiting_for_vault)
        if dispatcher is not None:
            dispatcher.stop_accepting()      # first: no connection is handed to a stopping worker
        stopping = []
        if pool is not None:
            stopping.append(pool.stop())    # each worker drains its own connections, committing here
        if runner is not None:
            stopping.append(stop_serving(runner))
        for r in await asyncio.gather(*stopping, return_exceptions=True):
            if isinstance(r, Exception):     # the engine still closes, the lock is still released
                log.error("stopping the gateway's connections failed: %r", r)
        grace_over.cancel()
        await engine.close()
        lock.release()


async def stop_serving(runner: web.AppRunner) -> None:
    """Stop a gateway process's HTTP side: no new connections, the requests
    in flight finish (up to SHUTDOWN_GRACE_S) on connections that close
    after them, then aiohttp's own shutdown of what is left (the runner's
    shutdown_timeout, CUT_AFTER_DRAIN_S: the grace was the drain's; within
    the leader's STOP_GRACE_S for a worker).  The engine is still open
    meanwhile (the caller closes it after); in the process that commits
    (`serve`), writes still waiting for the vault's ACK when the grace ends
    answer 503 then, before this cut."""
    for site in list(runner.sites):
        await site.stop()                # a single process: stop listening
    await runner.app["s3"].drain(SHUTDOWN_GRACE_S)
    await runner.cleanup()
