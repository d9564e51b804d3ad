"""Small asyncio helpers shared by the layers."""
from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

STOP_DEADLINE_S = 60.0     # after SIGTERM / SIGINT a server process is gone within this, stuck or not
STUCK_EXIT = 70            # its exit status when the watchdog had to end it (EX_SOFTWARE)


def retrieve_exception(fut: asyncio.Future) -> None:
    """A done callback for a future whose outcome may never be awaited (its
    caller was cancelled, its request failed): fetch its exception so that
    asyncio does not log it as never retrieved."""
    if not fut.cancelled():
        fut.exception()


@contextlib.asynccontextmanager
async def settled_on_failure(fut: asyncio.Future | None):
    """If the block fails, wait (without cancelling it) for `fut` -- work the
    request started and does not wait for on success -- before the failure
    goes on: the caller answers only once that work's fate is known."""
    try:
        yield
    except BaseException:
        if fut is not None:
            await asyncio.wait([fut])
        raise


def stop_on_signals(stop: asyncio.Event, what: str, deadline_s: float = STOP_DEADLINE_S) -> None:
    """SIGINT and SIGTERM set `stop` on the running loop, and make sure the
    process ends even if its event loop never gets to it.

    The handler is a plain Python one, not `loop.add_signal_handler` (whose
    callback runs on the loop): Python runs it between two bytecodes of the
    main thread even while a coroutine that never yields holds the loop, so
    the first signal also starts a watchdog thread.  If the process is
    still running `deadline_s` later, the watchdog writes every thread's
    traceback to stderr -- where it is stuck -- and exits with STUCK_EXIT.
    Every store here is crash-safe, so that exit loses nothing
    acknowledged; it only skips the orderly close."""
    loop = asyncio.get_running_loop()
    armed = threading.Event()

    def watchdog() -> None:
        time.sleep(deadline_s)
        # no logging here: the stuck thread may hold the logging lock
        sys.stderr.write(f"airlock {what} (pid {os.getpid()}): still running {deadline_s:g} s after "
                         f"a stop signal; its event loop looks stuck. Tracebacks:\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(STUCK_EXIT)

    def on_signal(_signum, _frame) -> None:
        if not armed.is_set():
            armed.set()
            threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            pass                        # the loop is closed: the process is on its way out anyway

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
