"""A fault-injecting TCP proxy for the controlled link, run as its own process.

    python tests/faultproxy.py --listen-port P --target-port T --control-port C [--max-runtime S]

It sits between the gateway and the vault and forwards bytes both ways.  TLS
is end to end (the proxy never sees a key), so every fault is injected at the
byte level.  Direction names: "up" = gateway -> vault, "down" = vault -> gateway.

Control: a line protocol on 127.0.0.1:C, one command per line, one answer line
per command (`ok`, a JSON object, or `error: ...`):

    pass              forward everything (clears hold, delay, drop and refuse)
    hold up|down|both stop forwarding that direction; bytes wait in the socket
                      buffers (the proxy stops reading), nothing is lost
    release           forward held bytes again (both directions)
    delay MS          sleep MS milliseconds before forwarding each read
    drop              discard the vault->gateway bytes from now on (the TLS
                      stream breaks, so the connection dies or stalls)
    cut               close every current connection at once (both sides)
    refuse on|off     close new connections as soon as they are accepted
    stats             JSON: bytes each way, connections accepted/active/refused, mode

Bounded lifetime: the proxy exits when its parent process dies (polled) or
after --max-runtime seconds, whichever comes first.  Only loopback.

Port 0 for --listen-port or --control-port picks a free port; the proxy
prints one JSON line {"listen_port", "control_port", "pid"} on stdout when it
is ready, which is how `FaultProxy` learns the ports without a race.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
READ_SIZE = 64 * 1024            # bytes per forwarded read (the unit `delay` applies to)
PARENT_POLL_S = 0.5              # how often the proxy checks that its parent is alive
DEFAULT_MAX_RUNTIME_S = 900.0    # a forgotten proxy never outlives a test run by much
START_TIMEOUT_S = 15.0
CONTROL_TIMEOUT_S = 10.0
DIRECTIONS = ("up", "down")


# --------------------------------------------------------------------------
# the proxy process
# --------------------------------------------------------------------------
class _Proxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        # an event per direction: set = forwarding, clear = held
        self.flowing = {d: asyncio.Event() for d in DIRECTIONS}
        for ev in self.flowing.values():
            ev.set()
        self.delay_s = 0.0
        self.drop_down = False
        self.refuse = False
        self.bytes = {d: 0 for d in DIRECTIONS}
        self.dropped = 0
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        # (gateway side, vault side) -> the task forwarding that connection
        self.conns: dict[tuple[asyncio.StreamWriter, asyncio.StreamWriter], asyncio.Task] = {}

    # ------------------------------------------------------------ data path
    async def on_client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self.refuse:
            self.refused += 1
            _abort(cwriter)
            return
        self.accepted += 1
        try:
            vreader, vwriter = await asyncio.wait_for(asyncio.open_connection(HOST, self.target_port), 5.0)
        except (OSError, asyncio.TimeoutError):
            _abort(cwriter)
            return
        pair = (cwriter, vwriter)
        self.conns[pair] = asyncio.current_task()
        up = asyncio.ensure_future(self._pump("up", creader, vwriter))
        down = asyncio.ensure_future(self._pump("down", vreader, cwriter))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            # one side ended: give the other a moment to pass on its half-close, then stop both
            await asyncio.wait({up, down}, timeout=0.5)
        except asyncio.CancelledError:
            pass   # `cut`
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self.conns.pop(pair, None)
            _abort(cwriter)
            _abort(vwriter)

    async def _pump(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(READ_SIZE)
                # a held direction keeps this read (and everything behind it in
                # the socket) until release: buffered, never lost
                await self.flowing[direction].wait()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                    await self.flowing[direction].wait()
                if direction == "down" and self.drop_down:
                    self.dropped += len(data)
                    continue
                writer.write(data)
                await writer.drain()
                self.bytes[direction] += len(data)
        except (ConnectionError, OSError):
            return

    # ------------------------------------------------------------ control
    def handle(self, line: str) -> str:
        words = line.split()
        if not words:
            return "error: empty command"
        cmd, args = words[0].lower(), [w.lower() for w in words[1:]]
        if cmd == "pass" and not args:
            for ev in self.flowing.values():
                ev.set()
            self.delay_s = 0.0
            self.drop_down = False
            self.refuse = False
            return "ok"
        if cmd == "hold" and len(args) == 1 and args[0] in ("up", "down", "both"):
            for d in (DIRECTIONS if args[0] == "both" else (args[0],)):
                self.flowing[d].clear()
            return "ok"
        if cmd == "release" and not args:
            for ev in self.flowing.values():
                ev.set()
            return "ok"
        if cmd == "delay" and len(args) == 1:
            try:
                ms = float(args[0])
            except ValueError:
                return f"error: delay needs milliseconds, not {args[0]!r}"
            if ms < 0:
                return "error: delay must be >= 0"
            self.delay_s = ms / 1000.0
            return "ok"
        if cmd == "drop" and not args:
            self.drop_down = True
            return "ok"
        if cmd == "cut" and not args:
            self.cuts += 1
            for (cw, vw), task in list(self.conns.items()):
                _abort(cw)
                _abort(vw)
                task.cancel()
            return "ok"
        if cmd == "refuse" and len(args) == 1 and args[0] in ("on", "off"):
            self.refuse = args[0] == "on"
            return "ok"
        if cmd == "stats" and not args:
            return json.dumps({
                "up": self.bytes["up"], "down": self.bytes["down"], "dropped": self.dropped,
                "accepted": self.accepted, "active": len(self.conns), "refused": self.refused,
                "cuts": self.cuts, "held": [d for d in DIRECTIONS if not self.flowing[d].is_set()],
                "delay_ms": self.delay_s * 1000.0, "drop": self.drop_down, "refuse": self.refuse,
            }, sort_keys=True)
        return f"error: unknown command {line.strip()!r}"

    async def on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                writer.write((self.handle(line.decode("utf-8", "replace")) + "\n").encode())
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if transport is not None and not transport.is_closing():
        transport.abort()


async def _watch_lifetime(parent: int, max_runtime: float, stop: asyncio.Event) -> None:
    deadline = time.monotonic() + max_runtime
    while time.monotonic() < deadline:
        if os.getppid() != parent:
            break   # reparented: the parent died
        await asyncio.sleep(PARENT_POLL_S)
    stop.set()


async def _main(args) -> None:
    proxy = _Proxy(args.target_port)
    data_server = await asyncio.start_server(proxy.on_client, HOST, args.listen_port, reuse_address=True)
    control_server = await asyncio.start_server(proxy.on_control, HOST, args.control_port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = loop.create_task(_watch_lifetime(args.parent_pid or os.getppid(), args.max_runtime, stop))
    print(json.dumps({"listen_port": data_server.sockets[0].getsockname()[1],
                      "control_port": control_server.sockets[0].getsockname()[1],
                      "pid": os.getpid()}), flush=True)
    await stop.wait()
    watcher.cancel()
    data_server.close()
    control_server.close()
    for (cw, vw), task in list(proxy.conns.items()):
        _abort(cw)
        _abort(vw)
        task.cancel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fault-injecting TCP proxy for the airlock link (tests only)")
    p.add_argument("--listen-port", type=int, required=True, help="port the gateway connects to (0: any)")
    p.add_argument("--target-port", type=int, required=True, help="the vault's link port")
    p.add_argument("--control-port", type=int, required=True, help="port of the control line protocol (0: any)")
    p.add_argument("--max-runtime", type=float, default=DEFAULT_MAX_RUNTIME_S, help="exit after this many seconds")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is no longer our parent")
    args = p.parse_args(argv)
    asyncio.run(_main(args))
    return 0


# --------------------------------------------------------------------------
# the test-side handle
# --------------------------------------------------------------------------
class FaultProxy:
    """Start/stop the proxy process (by PID) and send it control commands."""

    def __init__(self, target_port: int, listen_port: int = 0, control_port: int = 0,
                 max_runtime: float = DEFAULT_MAX_RUNTIME_S):
        self.target_port = target_port
        self.listen_port = listen_port
        self.control_port = control_port
        self.max_runtime = max_runtime
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> "FaultProxy":
        cmd = [sys.executable, os.path.abspath(__file__), "--listen-port", str(self.listen_port),
               "--target-port", str(self.target_port), "--control-port", str(self.control_port),
               "--max-runtime", str(self.max_runtime), "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # the ready line carries the actual ports; a bounded wait on it
        import selectors
        deadline = time.monotonic() + START_TIMEOUT_S
        fd = self.proc.stdout.fileno()
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop()
                    raise TimeoutError("faultproxy did not report ready")
                if sel.select(min(left, 0.2)):
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        self.proc.wait(5)
                        raise RuntimeError(f"faultproxy exited during start ({self.proc.returncode})")
                    buf += chunk
        ready = json.loads(buf.splitlines()[0])
        self.listen_port = ready["listen_port"]
        self.control_port = ready["control_port"]
        return self

    def command(self, line: str) -> str:
        """Send one command; returns the answer line ('ok' or JSON).  Raises on 'error: ...'."""
        with socket.create_connection((HOST, self.control_port), timeout=CONTROL_TIMEOUT_S) as s:
            s.sendall(line.strip().encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                part = s.recv(65536)
                if not part:
                    break
                answer += part
        text = answer.decode().strip()
        if not text or text.startswith("error"):
            raise RuntimeError(f"faultproxy refused {line!r}: {text or 'no answer'}")
        return text

    def stats(self) -> dict:
        return json.loads(self.command("stats"))

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
