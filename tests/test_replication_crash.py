"""Crashes of either domain under concurrent writes: what a client was told is
stored stays stored, on both sides, and nothing else appears.

A real vault process and a real gateway process (tests/conftest.py
`Deployment`), 7 boto3 threads with retries off writing deterministic content
(4 KiB, 1-6 MiB, some multipart).  Each round SIGKILLs one process at a random
moment, restarts it, and then checks:

* every object that got a 200 is listed and byte-identical through the gateway;
* `airlock verify` exits 0 (primary and vault hold the same manifests and chunk ids);
* nothing whose request got an S3 error response (503 when the vault is gone)
  is visible;
* an object whose request died with a connection error is absent or complete.

The gateway reconnects to a restarted vault by itself, on the next commit, so
the test waits for a probe PUT to succeed.  The seed is in every message.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.request

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from conftest import Deployment

KiB = 1024
MiB = 1024 * KiB
PART = 5 * MiB                  # S3's minimum size of every multipart part but the last

UPLOADERS = 7                   # concurrent client threads
# rounds per victim, alternating gateway / vault; AIRLOCK_CRASH_ROUNDS=10
# (with AIRLOCK_CRASH_SEED) digs deeper
ROUNDS_EACH = int(os.environ.get("AIRLOCK_CRASH_ROUNDS") or 3)
KILL_AFTER_S = (0.4, 2.5)       # random delay before SIGKILL, seconds
VAULT_DOWN_S = (0.2, 1.5)       # how long the vault stays dead; writes meanwhile wait or get 503
AFTER_RESTART_S = 0.8           # writes keep going this long after the vault is back (reconcile under load)
ROUND_BUDGET_S = 12.0           # an uploader gives up after this
MAX_OBJECTS_PER_THREAD = 30     # bound on work per uploader per round
ACK_TIMEOUT_S = 2.0             # gateway's wait for the vault's ack before 503
RECONNECT_WAIT_S = 30.0         # how long the test waits for the link to come back
TEST_BUDGET_S = 15.0 * 2 * ROUNDS_EACH
NO_RETRIES = {"mode": "standard", "total_max_attempts": 1}   # every error is seen by the test
BUCKET = "crash"
PROBE_BUCKET = "probe"


# ---------------------------------------------------------------------------- helpers
def content_for(key: str, size: int) -> bytes:
    """Deterministic bytes derived from the key: any object can be checked
    without the writer having kept its body."""
    return random.Random(hashlib.sha256(key.encode()).digest()).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def multipart_put(s3, bucket: str, key: str, body: bytes) -> dict:
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for i, off in enumerate(range(0, len(body), PART), start=1):
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=i,
                           Body=body[off:off + PART])
        parts.append({"PartNumber": i, "ETag": r["ETag"]})
    return s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                        MultipartUpload={"Parts": parts})


def list_keys(s3, bucket: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def health(gateway) -> dict:
    try:
        with urllib.request.urlopen(f"{gateway.endpoint}/_airlock/health", timeout=2) as r:
            return json.load(r)
    except OSError:
        return {}


def wait_until_replicating(dep: Deployment, seed: int) -> None:
    """The link is up and reconciled: the health check says so, or a probe PUT
    (which makes the gateway reconnect) gets a 200."""
    s3 = dep.gateway.client(connect_timeout=2, read_timeout=15, retries=NO_RETRIES)
    deadline = time.monotonic() + RECONNECT_WAIT_S
    n = 0
    while time.monotonic() < deadline:
        if health(dep.gateway).get("vault_connected"):
            return
        n += 1
        try:
            s3.put_object(Bucket=PROBE_BUCKET, Key=f"probe-{n}", Body=b"probe")
            return
        except (BotoCoreError, ClientError):
            time.sleep(0.2)
    raise AssertionError(f"seed={seed}: the gateway did not reconnect to the vault within "
                         f"{RECONNECT_WAIT_S}s\n{dep.gateway.log_text()[-3000:]}")


class Uploader(threading.Thread):
    """PUTs deterministic, never-reused keys until told to stop.

    acked[key] = etag for every 200; `rejected` holds keys whose request got an
    S3 error response (must never become visible); `died` holds keys whose
    request ended in a connection error (absent or complete)."""

    def __init__(self, gateway, prefix: str, rng: random.Random, stop: threading.Event):
        super().__init__(daemon=True)
        self.s3 = gateway.client(connect_timeout=2, read_timeout=20, retries=NO_RETRIES)
        self.prefix, self.rng, self.stop_event = prefix, rng, stop
        self.acked: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.rejected: dict[str, str] = {}
        self.died: set[str] = set()

    def run(self) -> None:
        deadline = time.monotonic() + ROUND_BUDGET_S
        for n in range(MAX_OBJECTS_PER_THREAD):
            if self.stop_event.is_set() or time.monotonic() > deadline:
                return
            roll = self.rng.random()
            key = f"{self.prefix}/obj-{n:03d}"
            if roll < 0.08:
                size, multipart = PART + self.rng.randrange(1, MiB), True
            elif roll < 0.35:
                size, multipart = self.rng.randrange(MiB, 6 * MiB), False
            else:
                size, multipart = 4 * KiB, False
            body = content_for(key, size)
            self.sizes[key] = size
            try:
                if multipart:
                    r = multipart_put(self.s3, BUCKET, key, body)
                else:
                    r = self.s3.put_object(Bucket=BUCKET, Key=key, Body=body)
                self.acked[key] = r["ETag"]
            except ClientError as e:
                err = e.response.get("Error", {})
                self.rejected[key] = f"{e.response['ResponseMetadata'].get('HTTPStatusCode')} {err.get('Code')}"
                time.sleep(0.05)
            except (BotoCoreError, OSError):
                self.died.add(key)
                time.sleep(0.05)


class Ledger:
    """What every client was told, over all rounds."""

    def __init__(self):
        self.acked: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.rejected: dict[str, str] = {}
        self.died: set[str] = set()
        self.checked: set[str] = set()      # bodies already verified in an earlier round

    def add(self, t: Uploader) -> None:
        self.acked.update(t.acked)
        self.sizes.update(t.sizes)
        self.rejected.update(t.rejected)
        self.died |= t.died


def check_round(dep: Deployment, ledger: Ledger, seed: int, label: str) -> None:
    s3 = dep.gateway.client(read_timeout=60)
    listed = list_keys(s3, BUCKET)
    assert listed == sorted(listed), f"seed={seed} {label}: listing out of order"
    listed_set = set(listed)
    missing = sorted(set(ledger.acked) - listed_set)
    if missing:
        later = {}
        for k in missing[:5]:
            try:
                later[k] = s3.head_object(Bucket=BUCKET, Key=k)["ETag"]
            except ClientError as e:
                later[k] = e.response["ResponseMetadata"]["HTTPStatusCode"]
        assert not missing, (f"seed={seed} {label}: acknowledged objects lost: {missing[:10]} "
                             f"(HEAD now: {later})\n{dep.gateway.log_text()[-4000:]}")
    leaked = sorted(listed_set & set(ledger.rejected))
    assert not leaked, (f"seed={seed} {label}: objects whose client got an S3 error are visible: "
                        f"{[(k, ledger.rejected[k]) for k in leaked[:10]]}")
    unknown = listed_set - set(ledger.acked) - ledger.died
    assert not unknown, f"seed={seed} {label}: objects nobody uploaded: {sorted(unknown)[:10]}"
    for key in listed:
        if key in ledger.checked:
            # verified byte for byte in an earlier round; the etag proves it is unchanged
            r = s3.head_object(Bucket=BUCKET, Key=key)
            assert r["ContentLength"] == ledger.sizes[key], f"seed={seed} {label}: {key} size changed"
        else:
            r = s3.get_object(Bucket=BUCKET, Key=key)
            body = r["Body"].read()
            assert len(body) == ledger.sizes[key], \
                f"seed={seed} {label}: {key} has {len(body)} bytes, wrote {ledger.sizes[key]}"
            assert sha(body) == sha(content_for(key, ledger.sizes[key])), f"seed={seed} {label}: {key} is corrupt"
            ledger.checked.add(key)
        if key in ledger.acked:
            assert r["ETag"] == ledger.acked[key], f"seed={seed} {label}: {key} etag changed"
    for key in (set(ledger.rejected) | ledger.died) - listed_set:
        with pytest.raises(ClientError) as ei:
            s3.head_object(Bucket=BUCKET, Key=key)
        assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404, f"seed={seed} {label}: {key}"
    # an interrupted multipart upload may stay open; it is abortable and never an object
    for u in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])
    r = dep.airlock("verify", check=False)
    assert r.returncode == 0, (f"seed={seed} {label}: airlock verify exited {r.returncode}:\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    assert "equal" in r.stdout, f"seed={seed} {label}: {r.stdout}"


def start_uploaders(dep: Deployment, label: str, rng: random.Random, stop: threading.Event) -> list[Uploader]:
    threads = [Uploader(dep.gateway, f"{label}/t{i}", random.Random(rng.random()), stop)
               for i in range(UPLOADERS)]
    for t in threads:
        t.start()
    return threads


def join_uploaders(threads: list[Uploader], ledger: Ledger, seed: int) -> None:
    for t in threads:
        t.join(timeout=40)
        assert not t.is_alive(), f"seed={seed}: uploader did not stop"
        ledger.add(t)


# ---------------------------------------------------------------------------- the test
@pytest.fixture
def dep(tmp_path):
    d = Deployment(tmp_path / "deploy", ack_timeout=ACK_TIMEOUT_S).start()
    yield d
    d.stop()


def test_kill_9_of_gateway_or_vault_keeps_acknowledged_objects_and_both_domains_equal(dep):
    seed = int(os.environ.get("AIRLOCK_CRASH_SEED") or int.from_bytes(os.urandom(4), "little"))
    rng = random.Random(seed)
    t_start = time.monotonic()
    s3 = dep.gateway.client()
    s3.create_bucket(Bucket=BUCKET)
    s3.create_bucket(Bucket=PROBE_BUCKET)
    ledger = Ledger()
    rounds = [who for _ in range(ROUNDS_EACH) for who in ("gateway", "vault")]
    for rnd, who in enumerate(rounds):
        label = f"r{rnd}-{who}"
        stop = threading.Event()
        acked_before = len(ledger.acked)
        threads = start_uploaders(dep, label, rng, stop)
        time.sleep(rng.uniform(*KILL_AFTER_S))
        if who == "gateway":
            dep.gateway.kill()
            stop.set()
            join_uploaders(threads, ledger, seed)
            dep.start_gateway()
        else:
            dep.vault.kill()
            time.sleep(rng.uniform(*VAULT_DOWN_S))
            dep.vault.start()
            wait_until_replicating(dep, seed)
            time.sleep(AFTER_RESTART_S)
            stop.set()
            join_uploaders(threads, ledger, seed)
        wait_until_replicating(dep, seed)
        check_round(dep, ledger, seed, label)
        assert len(ledger.acked) > acked_before, \
            f"seed={seed} {label}: no upload was acknowledged; the round proved nothing"
    if not ledger.rejected and not ledger.died:
        pytest.fail(f"seed={seed}: no request failed in any round; the kills hit nothing")
    elapsed = time.monotonic() - t_start
    print(f"seed={seed}: {len(ledger.acked)} acked, {len(ledger.rejected)} rejected, "
          f"{len(ledger.died)} died, {elapsed:.1f}s")
    assert elapsed < TEST_BUDGET_S, f"seed={seed}: crash test took {elapsed:.0f}s (budget {TEST_BUDGET_S:.0f}s)"
