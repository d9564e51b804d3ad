"""Run the primary domain's S3 gateway: open the engine, serve HTTP, stop cleanly."""
from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from airlock.config import GatewayConfig
from airlock.primary.engine import Engine
from airlock.s3.app import make_app

log = logging.getLogger("airlock.gateway")

SHUTDOWN_GRACE_S = 10.0   # seconds in-flight requests get to finish on SIGTERM


async def serve(cfg: GatewayConfig, on_ready=None, stop: asyncio.Event | None = None) -> None:
    engine = Engine(cfg.data, fsync=cfg.fsync)
    engine.open()
    app = make_app(engine, cfg)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024, reuse_address=True)
    await site.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(cfg)
    try:
        await stop.wait()
    finally:
        log.info("stopping gateway")
        await runner.cleanup()
        await engine.close()
