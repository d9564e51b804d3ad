"""A server process stops on SIGTERM / SIGINT; one whose event loop is stuck
(a coroutine that never yields, so the loop never runs its stop) still ends,
by the watchdog the first signal starts, and says where it was stuck
(airlock.aio.stop_on_signals; used by the gateway, its workers and the
vault).  The processes here are real Python processes running the helper;
the servers' orderly stop on SIGTERM is covered by every test that stops a
deployment."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from airlock.aio import STUCK_EXIT

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from airlock.aio import stop_on_signals

    async def spin_without_yielding():
        while True:
            pass

    async def main(mode):
        stop = asyncio.Event()
        stop_on_signals(stop, "test", deadline_s=1.0)
        print("ready", flush=True)
        if mode == "stuck":
            await spin_without_yielding()
        await stop.wait()
        print("stopped in order", flush=True)

    asyncio.run(main(sys.argv[1]))
""")


def start(mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_process_whose_event_loop_is_stuck_still_ends_after_a_stop_signal_and_says_where(sig):
    p = start("stuck")
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == STUCK_EXIT, (p.returncode, err)
    assert 0.9 <= time.monotonic() - t0 < 30
    assert "still running 1 s after a stop signal" in err
    assert "spin_without_yielding" in err          # the traceback shows where the loop is stuck
    assert "stopped in order" not in out


def test_a_process_that_stops_in_time_ends_in_order_without_the_watchdog():
    p = start("well")
    try:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "stopped in order" in out and "still running" not in err
