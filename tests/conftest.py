"""Shared fixtures: real gateway processes on loopback, boto3 clients, aws-cli.

Nothing here mocks an airlock component: `Gateway` starts `python -m airlock
gateway` as its own OS process on a free port with its own data directory.
"""
from __future__ import annotations

import os
import signal
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Gateway:
    """An `airlock gateway` process.  stop() is SIGTERM, kill() is SIGKILL."""

    def __init__(self, data: Path, config: Path | None = None, extra_env: dict | None = None):
        self.data = Path(data)
        self.config = config
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data.parent / f"{self.data.name}-gateway.log"

    def start(self) -> "Gateway":
        env = dict(os.environ)
        env.setdefault("AIRLOCK_ACCESS_KEY", ACCESS_KEY)
        env.setdefault("AIRLOCK_SECRET_KEY", SECRET_KEY)
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "airlock", "gateway", "--data", str(self.data),
               "--listen", f"127.0.0.1:{self.port}"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        wait_for_port(self.port, self.proc)
        return self

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

    def restart(self) -> "Gateway":
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, **config):
        cfg = {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 1}}
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
