"""Shared fixtures: real gateway processes on loopback, boto3 clients, aws-cli.

Nothing here mocks an airlock component: `Gateway` starts `python -m airlock
gateway` as its own OS process on a free port with its own data directory.
"""
from __future__ import annotations

import contextlib
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

ACCESS_KEY = "AKIATESTAIRLOCK00001"
SECRET_KEY = "test-secret-key-for-airlock-0000000000000"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
# Gateways run with the default process count ("auto": one per CPU, at most
# 4) unless AIRLOCK_TEST_WORKERS=N (or "auto") says otherwise for the whole
# suite; test_gateway_workers.py sets its own.
GATEWAY_WORKERS = os.environ.get("AIRLOCK_TEST_WORKERS")


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def _xdist_worker() -> tuple[int, int]:
    """(this worker's index, number of workers); (0, 1) without pytest-xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if name.startswith("gw") and name[2:].isdigit() and count > 1:
        return int(name[2:]) % count, count
    return 0, 1


def free_port() -> int:
    """A free port, never the same one twice in this test run, and OUTSIDE
    the kernel's ephemeral range.  bind(0) can return the same port to two
    calls made before either server listens (a vault and its gateway got
    the same port once), and a port from the ephemeral range can be taken
    as the source port of an outgoing connection (a link, a client) before
    its server starts; either way the server fails with "address already
    in use"."""
    import random
    lo, hi = _ephemeral_range()
    candidates = [p for p in range(10000, 30000) if not lo <= p <= hi] or list(range(1024, 10000))
    # Under pytest-xdist each worker process draws from its own contiguous
    # slice, so two workers never hand out the same port (nor, but at a
    # slice's edge, the port after it, which `airlock up` takes for its vault).
    worker, workers = _xdist_worker()
    step = len(candidates) // workers
    candidates = candidates[worker * step:(worker + 1) * step - 1]
    for _ in range(200):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:       # give up on the range; take any
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_head(sock: socket.socket) -> bytes:
    """What a raw socket receives up to the end of an HTTP response head (or
    until the peer closes): the head, and any body bytes that came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def cannot_mount(what: str, tools: tuple[str, ...]) -> str | None:
    """Why a test that mounts `what` (in a private mount namespace) cannot
    run here, or None: it needs root and these commands."""
    if os.geteuid() != 0:
        return f"mounting {what} needs root"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def wait_until(pred, what: str, timeout: float = 10.0, interval: float = 0.05):
    """Poll `pred` until it returns something true; that value is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class _Daemon:
    """A server process started by a test: stop() is SIGTERM, kill() is SIGKILL,
    both by PID; the log file is closed either way."""

    proc: subprocess.Popen | None = None
    log_path: Path

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Gateway(_Daemon):
    """An `airlock gateway` process.  stop() is SIGTERM, kill() is SIGKILL."""

    def __init__(self, data: Path, config: Path | None = None, extra_env: dict | None = None,
                 extra_args: list[str] | None = None, cwd: Path | None = None):
        self.data = Path(data)
        self.cwd = cwd               # the gateway's current directory (default: the test's)
        self.extra_args = extra_args or []
        self.config = config
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.extra_env = extra_env or {}
        self.prefix: list[str] = []      # a command that runs the gateway's (e.g. in its own mount namespace)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data.parent / f"{self.data.name}-gateway.log"

    def start(self) -> "Gateway":
        env = dict(os.environ)
        env.setdefault("AIRLOCK_ACCESS_KEY", ACCESS_KEY)
        env.setdefault("AIRLOCK_SECRET_KEY", SECRET_KEY)
        env.update(self.extra_env)
        # -P: the airlock under test, never one in the current directory
        # (as the installed `airlock` script runs: its sys.path[0] is its bin/)
        cmd = [sys.executable, "-P", "-m", "airlock", "gateway", "--data", str(self.data),
               "--listen", f"127.0.0.1:{self.port}"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        if GATEWAY_WORKERS and "--workers" not in self.extra_args:
            cmd += ["--workers", GATEWAY_WORKERS]
        cmd += self.extra_args
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.prefix, *cmd], stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.cwd)
        wait_for_port(self.port, self.proc)
        self._wait_healthy()
        return self

    def _wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Ready = this process answers its health call.  An open port alone
        is not proof: right after a kill -9 the old gateway's worker may
        still hold the port for a moment, and a connect would reach it."""
        import urllib.error
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.health().get("status"):
                    return
            except (OSError, urllib.error.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway on port {self.port} did not become healthy within {timeout}s")

    def restart(self) -> "Gateway":
        self.stop()
        return self.start()

    def health(self) -> dict:
        """The gateway's /_airlock/health document."""
        import json
        import urllib.request
        with urllib.request.urlopen(f"{self.endpoint}/_airlock/health", timeout=5) as r:
            return json.load(r)

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, **config):
        # total_max_attempts=1: no retry at all (botocore's max_attempts counts retries)
        cfg = {"s3": {"addressing_style": "path"}, "retries": {"total_max_attempts": 1}}
        cfg.update(config)
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=access_key,
                            aws_secret_access_key=secret_key, region_name=REGION, config=Config(**cfg))

    def aws(self, *args: str, check: bool = True, input: bytes | None = None,
            access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, timeout: float = 300):
        """Run the real aws-cli against this gateway."""
        env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key,
                   AWS_DEFAULT_REGION=REGION, AWS_CONFIG_FILE=os.devnull,
                   AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_PAGER="")
        cmd = [sys.executable, "-m", "awscli", "--endpoint-url", self.endpoint, *args]
        r = subprocess.run(cmd, env=env, input=input, capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"aws {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stdout.decode(errors='replace')}\n{r.stderr.decode(errors='replace')}")
        return r


@pytest.fixture
def gateway_factory(tmp_path):
    started: list[Gateway] = []

    def make(name: str = "primary", config: Path | None = None, **kw) -> Gateway:
        g = Gateway(tmp_path / name, config=config, **kw)
        started.append(g)
        return g.start()

    yield make
    for g in started:
        g.stop()


@pytest.fixture
def gateway(gateway_factory) -> Gateway:
    return gateway_factory()


@pytest.fixture
def s3(gateway):
    return gateway.client()


_bucket_counter = iter(range(1_000_000))


@pytest.fixture
def bucket(s3) -> str:
    name = f"test-bucket-{next(_bucket_counter)}"
    s3.create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------
# Two domains: a vault process and a gateway process joined by the link
# --------------------------------------------------------------------------
class Vault(_Daemon):
    """An `airlock vault` process with its own data dir and keys."""

    def __init__(self, root: Path, port: int | None = None, extra_args: list[str] | None = None):
        self.root = Path(root)
        self.data = self.root / "vault"
        self.keys = self.data / "keys"
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "vault.log"

    def start(self) -> "Vault":
        cmd = [sys.executable, "-m", "airlock", "vault", "--data", str(self.data),
               "--listen", f"127.0.0.1:{self.port}", "--keys", str(self.keys), *self.extra_args]
        sock = self.data / "admin.sock"
        if sock.exists():
            sock.unlink()   # left behind by a killed vault; readiness is the new socket appearing
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vault exited early with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("vault did not start")
            time.sleep(0.05)
        return self

    def admin(self, request: dict) -> dict:
        from airlock.vault.daemon import admin_request
        ans = admin_request(str(self.data / "admin.sock"), request)
        assert ans.get("ok"), ans
        return ans["result"]

    def status(self) -> dict:
        return self.admin({"op": "status"})


class Deployment:
    """Vault + gateway as two OS processes, keys per domain, optionally with a
    fault proxy (tests/faultproxy.py) on the link between them."""

    def __init__(self, root: Path, ack_timeout: float = 5.0, vault_args: list[str] | None = None,
                 gateway_config: Path | None = None):
        from airlock.keys import ensure_local_pair
        self.root = Path(root)
        ensure_local_pair(self.root)
        self.vault = Vault(self.root, extra_args=vault_args)
        self.link_port = self.vault.port      # where the gateway connects (the proxy's port if one is used)
        self.ack_timeout = ack_timeout
        self.gateway = Gateway(self.root / "primary", config=gateway_config)
        self.proxy = None

    def use_proxy(self, proxy) -> None:
        self.proxy = proxy
        self.link_port = proxy.listen_port

    def _gateway_args(self) -> list[str]:
        return ["--vault", f"127.0.0.1:{self.link_port}", "--link-keys", str(self.root / "primary" / "keys"),
                "--ack-timeout", str(self.ack_timeout)]

    def start(self) -> "Deployment":
        self.vault.start()
        try:
            self.start_gateway()
        except BaseException:
            self.vault.stop()        # a fixture whose setup fails gets no teardown
            raise
        return self

    def start_gateway(self) -> Gateway:
        self.gateway.extra_args = self._gateway_args()
        return self.gateway.start()

    def stop(self) -> None:
        self.gateway.stop()
        self.vault.stop()
        if self.proxy is not None:
            self.proxy.stop()

    def airlock(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run an operator command (verify, compact, status) against this deployment."""
        dep = self.root / "deployment.json"
        import json as _json
        dep.write_text(_json.dumps({"gateway": f"127.0.0.1:{self.gateway.port}",
                                    "vault": f"127.0.0.1:{self.vault.port}",
                                    "primary": "primary", "vault_data": "vault"}))
        r = subprocess.run([sys.executable, "-m", "airlock", *args, "--data", str(self.root)],
                           capture_output=True, timeout=timeout, text=True)
        if check and r.returncode != 0:
            raise AssertionError(f"airlock {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r


@contextlib.contextmanager
def proxied_deployment(root: Path, ack_timeout: float, gateway_config: Path | None = None):
    """A Deployment whose link runs through a fault proxy (tests/faultproxy.py)."""
    from faultproxy import FaultProxy
    d = Deployment(root, ack_timeout=ack_timeout, gateway_config=gateway_config)
    d.vault.start()
    proxy = FaultProxy(d.vault.port).start()
    d.use_proxy(proxy)
    try:
        d.start_gateway()
        yield d, proxy
    finally:
        d.stop()


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path / "deploy").start()
    yield d
    d.stop()
