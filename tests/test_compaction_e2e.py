"""Compaction end to end: a vault that seals small overlays, overwritten keys
spread over many of them, and `airlock compact` merging them into the base
volume while the vault keeps serving and the gateway keeps writing.

The vault's view is read the only way the primary domain can read it: over
the controlled link with the primary's identity (GET_MANIFEST + GET_CHUNK,
LIST), and with `airlock verify`.  Every read must return the newest
acknowledged version of a key (or a newer one still in flight), byte for
byte, before, during and after compaction.

Crashes: the vault is SIGKILLed while `airlock compact` runs through its admin
socket, and a direct `airlock compact --data` (vault stopped, data dir lock
taken) is SIGKILLed at a random moment.  A rerun finishes the job and the
state is the same as before the crash.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from conftest import Deployment

KiB = 1024
MiB = 1024 * KiB
OVERLAY_MAX_BYTES = 2 * MiB       # the vault seals an overlay past this: many overlays from little data
BUCKET = "compact"
KEYS = 16                         # keys, each overwritten several times
VERSIONS = 5                      # versions of every key written before compaction
SIZES = (64 * KiB, 700 * KiB)     # object sizes (several chunks each, several objects per overlay)
KILL_JITTER_S = 0.03              # random extra delay after the chosen progress line before SIGKILL


# ---------------------------------------------------------------------------- helpers
def body_for(key: str, version: int) -> bytes:
    seed = hashlib.sha256(f"{key}#{version}".encode()).digest()
    r = random.Random(seed)
    return r.randbytes(r.randrange(*SIZES))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Ledger:
    """Versions written per key: etag -> version, and the newest acknowledged version."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_etag: dict[str, dict[str, int]] = {}
        self.acked: dict[str, int] = {}
        self.next_version: dict[str, int] = {}

    def put(self, s3, key: str) -> None:
        with self.lock:
            v = self.next_version.get(key, 0)
            self.next_version[key] = v + 1
        body = body_for(key, v)
        with self.lock:
            self.by_etag.setdefault(key, {})[md5(body)] = v   # registered before the vault can hold it
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        with self.lock:
            self.acked[key] = max(self.acked.get(key, -1), v)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.acked)


def link_client(dep: Deployment):
    """A link client with the primary's identity (what `airlock verify` uses)."""
    from airlock.config import GatewayConfig
    from airlock.gateway import make_link_client
    cfg = GatewayConfig()
    cfg.vault = ("127.0.0.1", dep.vault.port)
    cfg.link_keys = str(dep.root / "primary" / "keys")
    return make_link_client(cfg)


async def _read_vault_view(dep: Deployment, ledger: Ledger, label: str) -> dict[str, tuple]:
    """Read every key's current manifest and bytes from the vault over the link.
    Asserts each is the newest acknowledged version (or newer) and intact.
    Returns key -> (etag, chunk ids)."""
    link = link_client(dep)
    await link.connect()
    try:
        out = {}
        for key in sorted(ledger.snapshot()):
            floor = ledger.snapshot()[key]
            m = await link.get_manifest(BUCKET, key)
            with ledger.lock:
                v = ledger.by_etag[key].get(m["etag"])
            assert v is not None, f"{label}: vault holds {key} with etag {m['etag']} nobody wrote"
            assert v >= floor, f"{label}: vault returned version {v} of {key}, version {floor} was acknowledged"
            parts = [await link.get_chunk(d) for d, _n in m["chunks"]]
            data = b"".join(parts)
            assert data == body_for(key, v), f"{label}: {key} version {v} read from the vault is corrupt"
            out[key] = (m["etag"], tuple(d for d, _n in m["chunks"]))
        return out
    finally:
        await link.close()


def read_vault_view(dep: Deployment, ledger: Ledger, label: str) -> dict[str, tuple]:
    return asyncio.run(_read_vault_view(dep, ledger, label))


async def _list_vault(dep: Deployment) -> tuple[list[dict], dict]:
    link = link_client(dep)
    await link.connect()
    try:
        objects, after = [], None
        while True:
            q = {"bucket": BUCKET, "limit": 1000}
            if after is not None:
                q["after"] = after
            page = await link.list(**q)
            objects += page["objects"]
            if not page["truncated"]:
                break
            after = objects[-1]["key"]
        return objects, await link.status()
    finally:
        await link.close()


def vault_state(dep: Deployment) -> tuple[list[dict], int]:
    """Everything the vault answers about the bucket: current manifests and its last seq."""
    objects, status = asyncio.run(_list_vault(dep))
    return objects, status["last_seq"]


def check_gateway(dep: Deployment, ledger: Ledger, label: str) -> None:
    s3 = dep.gateway.client()
    for key, v in ledger.snapshot().items():
        got = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert got == body_for(key, v), f"{label}: {key} through the gateway is not version {v}"


def overlay_counts(status: dict) -> tuple[int, int]:
    """(sealed overlays, all overlays)."""
    ovs = status["overlays"]
    return sum(1 for o in ovs if o["sealed"]), len(ovs)


def write_versions(dep: Deployment, ledger: Ledger, versions: int) -> None:
    s3 = dep.gateway.client()
    for _ in range(versions):
        for i in range(KEYS):
            ledger.put(s3, f"key-{i:02d}")


def compact_cmd(dep: Deployment, *extra: str) -> list[str]:
    return [sys.executable, "-m", "airlock", "compact", "--data", str(dep.root), *extra]


class StderrWatch(threading.Thread):
    """Collects a child's stderr; `progress` is set at the `kill_at`-th
    "compacting" line (or when the child's stderr ends)."""

    def __init__(self, proc: subprocess.Popen, kill_at: int = 1):
        super().__init__(daemon=True)
        self.proc, self.kill_at, self.lines, self.progress = proc, kill_at, [], threading.Event()
        self.seen = 0

    def run(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "compacting" in line:
                self.seen += 1
                if self.seen >= self.kill_at:
                    self.progress.set()
        self.progress.set()


def start_compact(dep: Deployment, kill_at: int) -> tuple[subprocess.Popen, StderrWatch]:
    dep.airlock("status", check=False)           # writes deployment.json for the CLI
    proc = subprocess.Popen(compact_cmd(dep), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = StderrWatch(proc, kill_at)
    watch.start()
    return proc, watch


def restart_vault(dep: Deployment) -> None:
    """Start the vault after a SIGKILL.  Its admin socket file outlives it, and
    Vault.start() returns as soon as that file exists, so remove the stale one
    first (the vault replaces it anyway) and wait until the new one answers."""
    try:
        (dep.vault.data / "admin.sock").unlink()
    except FileNotFoundError:
        pass
    dep.vault.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            dep.vault.status()
            return
        except (OSError, AssertionError):
            assert time.monotonic() < deadline, dep.vault.log_text()[-3000:]
            time.sleep(0.05)


@pytest.fixture
def dep(tmp_path):
    d = Deployment(tmp_path / "deploy", vault_args=["--overlay-max-bytes", str(OVERLAY_MAX_BYTES)]).start()
    d.gateway.client().create_bucket(Bucket=BUCKET)
    yield d
    d.stop()


# ---------------------------------------------------------------------------- merging under load
def test_compaction_merges_overlays_while_reads_and_writes_continue(dep):
    ledger = Ledger()
    write_versions(dep, ledger, VERSIONS)
    before = dep.vault.status()
    sealed_before, total_before = overlay_counts(before)
    assert sealed_before >= 5, f"expected many sealed overlays, got {before['overlays']}"
    assert before["merged_through_seq"] == 0
    read_vault_view(dep, ledger, "before compaction")
    dep.airlock("verify")

    # compaction runs while one thread keeps overwriting through the gateway
    # and another keeps reading the vault's view over the link
    stop = threading.Event()
    errors: list[str] = []
    passes = [0]

    def writer():
        s3 = dep.gateway.client()
        i = 0
        while not stop.is_set():
            try:
                ledger.put(s3, f"key-{i % KEYS:02d}")
            except (BotoCoreError, ClientError) as e:
                errors.append(f"write: {e}")
            i += 1

    def reader():
        while not stop.is_set():
            try:
                read_vault_view(dep, ledger, "during compaction")
                passes[0] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"read: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=reader, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    passes_at_start = passes[0]
    r = subprocess.run(compact_cmd(dep), capture_output=True, text=True, timeout=120)
    passes_during = passes[0] - passes_at_start
    time.sleep(0.5)       # reads and writes continue after it, too
    stop.set()
    for t in threads:
        t.join(60)
    assert r.returncode == 0, f"compact exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "compacting" in r.stderr, f"compact showed no progress:\n{r.stderr}"
    assert "merged overlay" in r.stdout, r.stdout
    assert not errors, errors[:5]
    assert passes[0] >= 1, "the reader never completed a pass"
    print(f"compaction: {passes_during} full read pass(es) during the command; stderr:\n{r.stderr}")

    after = dep.vault.status()
    sealed_after, total_after = overlay_counts(after)
    assert sealed_after < sealed_before and total_after < total_before, (before["overlays"], after["overlays"])
    assert after["base"]["bytes"] > before["base"]["bytes"]
    assert after["merged_through_seq"] > 0
    read_vault_view(dep, ledger, "after compaction")
    check_gateway(dep, ledger, "after compaction")
    dep.airlock("verify")

    # --keep N leaves N sealed overlays
    write_versions(dep, ledger, 3)
    sealed, _ = overlay_counts(dep.vault.status())
    assert sealed > 2, dep.vault.status()["overlays"]
    base_before = dep.vault.status()["base"]["bytes"]
    r = dep.airlock("compact", "--keep", "2")
    st = dep.vault.status()
    assert overlay_counts(st)[0] == 2, (r.stdout, st["overlays"])
    assert st["base"]["bytes"] > base_before
    read_vault_view(dep, ledger, "after compact --keep 2")
    dep.airlock("verify")

    # compacting with nothing sealed beyond --keep is a no-op
    r = dep.airlock("compact", "--keep", "2")
    assert "nothing to compact" in r.stdout
    assert overlay_counts(dep.vault.status())[0] == 2


# ---------------------------------------------------------------------------- kill -9 during compaction
def random_progress_line(dep: Deployment, rng: random.Random) -> int:
    """Kill after this many progress lines: the CLI prints about 6-11 lines per
    merged overlay when not on a terminal, so this lands anywhere in the run."""
    return rng.randrange(1, 6 * overlay_counts(dep.vault.status())[0])


def _crash_fixture_data(dep: Deployment) -> tuple[Ledger, list[dict], int]:
    ledger = Ledger()
    write_versions(dep, ledger, VERSIONS + 2)
    assert overlay_counts(dep.vault.status())[0] >= 5
    objects, last_seq = vault_state(dep)
    read_vault_view(dep, ledger, "before the crash")
    return ledger, objects, last_seq


def _same_state(dep, ledger, objects, last_seq, label) -> None:
    now, now_seq = vault_state(dep)
    assert now_seq == last_seq, f"{label}: vault last_seq {now_seq}, was {last_seq}"
    assert now == objects, f"{label}: the vault's manifests changed"
    read_vault_view(dep, ledger, label)
    st = dep.vault.status()
    assert overlay_counts(st)[0] == 0, f"{label}: sealed overlays left: {st['overlays']}"
    r = dep.airlock("verify", check=False)
    assert r.returncode == 0, f"{label}: verify exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    check_gateway(dep, ledger, label)


def test_vault_killed_during_compaction_recovers_and_a_rerun_finishes(dep):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    ledger, objects, last_seq = _crash_fixture_data(dep)

    kill_at = random_progress_line(dep, rng)
    proc, watch = start_compact(dep, kill_at)
    assert watch.progress.wait(60), f"seed={seed}: compact never showed progress"
    time.sleep(rng.uniform(0, KILL_JITTER_S))
    dep.vault.kill()
    proc.wait(30)
    watch.join(5)
    stderr = "".join(watch.lines)
    assert "compacting" in stderr, f"seed={seed}: {stderr}"
    print(f"seed={seed}: vault killed at progress line {kill_at}; compact exited {proc.returncode}: "
          f"{stderr.splitlines()[-1]}")

    restart_vault(dep)
    r = dep.airlock("compact")
    assert "compacting" in r.stderr or "nothing to compact" in r.stdout, f"seed={seed}: {r.stderr}"
    _same_state(dep, ledger, objects, last_seq, f"seed={seed} after vault kill + rerun")


def test_direct_compact_killed_at_a_random_moment_and_rerun_leaves_identical_state(dep):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    ledger, objects, last_seq = _crash_fixture_data(dep)
    sealed_before = overlay_counts(dep.vault.status())[0]
    kill_at = random_progress_line(dep, rng)
    dep.vault.stop()
    assert not (dep.vault.data / "admin.sock").exists()

    proc, watch = start_compact(dep, kill_at)
    assert watch.progress.wait(60), f"seed={seed}: compact never showed progress"
    time.sleep(rng.uniform(0, KILL_JITTER_S))
    killed_running = proc.poll() is None
    if killed_running:
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    watch.join(5)
    assert "compacting" in "".join(watch.lines)

    # the vault's data dir lock died with the process: a rerun takes it and finishes
    r = subprocess.run(compact_cmd(dep), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"seed={seed}: rerun exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    print(f"seed={seed}: killed at progress line {kill_at} while running: {killed_running} "
          f"({sealed_before} sealed overlays); rerun merged {r.stdout.count('merged overlay')}")
    dep.vault.start()
    _same_state(dep, ledger, objects, last_seq, f"seed={seed} after killed direct compact + rerun")
    # and the vault takes writes again
    s3 = dep.gateway.client()
    deadline = time.monotonic() + 20
    while True:
        try:
            ledger.put(s3, "key-00")
            break
        except ClientError:
            assert time.monotonic() < deadline, f"seed={seed}: the gateway never reconnected"
            time.sleep(0.3)
    read_vault_view(dep, ledger, f"seed={seed} after a new write")
