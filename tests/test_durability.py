"""Durability of the primary: what a client was told is stored, stays stored.

Real gateway processes on loopback, real boto3 (retries off, so every error
the gateway returns is seen by the test).  Three failure modes:

* a clean restart (SIGTERM) keeps everything, byte for byte;
* SIGKILL in the middle of concurrent uploads keeps every acknowledged object
  and never exposes a partial or corrupt one;
* a torn tail on the last log segment is cut on restart, the data before it is
  intact, and new writes after it survive another restart.
"""
from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from airlock.log.reader import list_segments, read_log
from airlock.log.record import encode_record

KiB = 1024
MiB = 1024 * KiB
PART = 5 * MiB                     # S3's minimum size of every multipart part but the last


# ---------------------------------------------------------------------------- helpers
def content_for(key: str, size: int) -> bytes:
    """Deterministic bytes derived from the key: a reader can check any object
    without the writer having kept its body."""
    return random.Random(hashlib.sha256(key.encode()).digest()).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_keys(s3, bucket: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 100}):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def snapshot(s3) -> dict:
    """Everything a client can observe: buckets, listings, bodies, etags, metadata."""
    state = {}
    for b in sorted(x["Name"] for x in s3.list_buckets()["Buckets"]):
        objects = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b):
            for o in page.get("Contents", []):
                r = s3.get_object(Bucket=b, Key=o["Key"])
                objects[o["Key"]] = {
                    "size": o["Size"], "list_etag": o["ETag"], "etag": r["ETag"],
                    "sha256": sha(r["Body"].read()), "meta": r["Metadata"],
                    "content_type": r.get("ContentType"),
                }
        delim = s3.list_objects_v2(Bucket=b, Delimiter="/")
        state[b] = {"objects": objects,
                    "prefixes": [p["Prefix"] for p in delim.get("CommonPrefixes", [])]}
    return state


def multipart_put(s3, bucket: str, key: str, body: bytes, part_size: int = PART, **extra) -> dict:
    up = s3.create_multipart_upload(Bucket=bucket, Key=key, **extra)
    parts = []
    for i, off in enumerate(range(0, len(body), part_size), start=1):
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=i,
                           Body=body[off:off + part_size])
        parts.append({"PartNumber": i, "ETag": r["ETag"]})
    return s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                        MultipartUpload={"Parts": parts})


# ---------------------------------------------------------------------------- clean restart
def test_everything_survives_a_clean_restart(gateway):
    s3 = gateway.client()
    for b in ("alpha", "beta", "gamma"):
        s3.create_bucket(Bucket=b)
    bodies = {
        "small.txt": b"hello airlock\n",
        "empty": b"",
        "dir/a/4k": content_for("dir/a/4k", 4 * KiB),
        "dir/b/3mib": content_for("dir/b/3mib", 3 * MiB + 17),
        "unicode/ключ ✓": content_for("unicode", 1000),
    }
    for key, body in bodies.items():
        s3.put_object(Bucket="alpha", Key=key, Body=body, Metadata={"origin": key.split("/")[0][:20]},
                      ContentType="application/x-test")
    multipart_put(s3, "beta", "mp/object", content_for("mp/object", 2 * PART + 123),
                  Metadata={"kind": "multipart"})
    # an upload left open must survive too
    open_up = s3.create_multipart_upload(Bucket="beta", Key="pending")
    s3.upload_part(Bucket="beta", Key="pending", UploadId=open_up["UploadId"], PartNumber=1, Body=b"x" * 100)
    # overwrite, delete, and a bucket that is created and deleted again
    s3.put_object(Bucket="alpha", Key="small.txt", Body=b"second version")
    s3.put_object(Bucket="alpha", Key="doomed", Body=b"bye")
    s3.delete_object(Bucket="alpha", Key="doomed")
    s3.delete_bucket(Bucket="gamma")
    s3.copy_object(Bucket="beta", Key="copy-of-3mib", CopySource={"Bucket": "alpha", "Key": "dir/b/3mib"})

    before = snapshot(s3)
    assert set(before) == {"alpha", "beta"}
    assert before["alpha"]["objects"]["small.txt"]["sha256"] == sha(b"second version")
    assert "doomed" not in before["alpha"]["objects"]
    assert before["beta"]["objects"]["mp/object"]["etag"].endswith('-3"')
    assert before["beta"]["objects"]["mp/object"]["meta"] == {"kind": "multipart"}

    assert gateway.stop() == 0, gateway.log_text()[-3000:]
    gateway.start()
    s3 = gateway.client()
    assert snapshot(s3) == before
    uploads = s3.list_multipart_uploads(Bucket="beta").get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [open_up["UploadId"]]
    parts = s3.list_parts(Bucket="beta", Key="pending", UploadId=open_up["UploadId"])["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, 100)]
    # and the store keeps working after the restart
    s3.put_object(Bucket="alpha", Key="after-restart", Body=b"new")
    assert s3.get_object(Bucket="alpha", Key="after-restart")["Body"].read() == b"new"


# ---------------------------------------------------------------------------- kill -9
UPLOADERS = 8                   # concurrent client threads
ROUNDS = int(os.environ.get("AIRLOCK_CRASH_ROUNDS") or 3)   # kill/restart cycles in one test (see test_replication_crash)
KILL_AFTER_S = (0.5, 3.0)       # random delay before SIGKILL, seconds
ROUND_BUDGET_S = 15.0           # an uploader gives up after this even if the gateway lives
MAX_OBJECTS_PER_THREAD = 40     # bound on work per uploader per round


class Uploader(threading.Thread):
    """PUTs deterministic objects until the gateway dies (or the bounds hit).
    `acked[key] = etag` for every 200; `failed` holds keys whose upload raised."""

    def __init__(self, gateway, bucket: str, prefix: str, rng: random.Random, stop: threading.Event):
        super().__init__(daemon=True)
        self.s3 = gateway.client(connect_timeout=2, read_timeout=20)
        self.bucket, self.prefix, self.rng, self.stop_event = bucket, prefix, rng, stop
        self.acked: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.failed: set[str] = set()
        self.errors: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + ROUND_BUDGET_S
        for n in range(MAX_OBJECTS_PER_THREAD):
            if self.stop_event.is_set() or time.monotonic() > deadline:
                return
            roll = self.rng.random()
            key = f"{self.prefix}/obj-{n:03d}"
            if roll < 0.1:
                size, multipart = PART + self.rng.randrange(1, MiB), True
            elif roll < 0.4:
                size, multipart = self.rng.randrange(MiB, 6 * MiB), False
            else:
                size, multipart = 4 * KiB, False
            body = content_for(key, size)
            self.sizes[key] = size
            try:
                if multipart:
                    r = multipart_put(self.s3, self.bucket, key, body)
                else:
                    r = self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
                self.acked[key] = r["ETag"]
            except (BotoCoreError, ClientError, OSError) as e:
                self.failed.add(key)
                self.errors.append(f"{key}: {type(e).__name__}: {e}")
                if self.stop_event.is_set():
                    return
                time.sleep(0.05)


def test_kill_9_during_uploads_keeps_every_acknowledged_object_and_no_other(gateway):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    t_start = time.monotonic()
    bucket = "crash"
    gateway.client().create_bucket(Bucket=bucket)
    acked: dict[str, str] = {}          # every key ever acknowledged, with its etag
    failed: set[str] = set()            # keys whose upload ended in an error
    sizes: dict[str, int] = {}
    for rnd in range(ROUNDS):
        stop = threading.Event()
        threads = [Uploader(gateway, bucket, f"r{rnd}/t{i}", random.Random(rng.random()), stop)
                   for i in range(UPLOADERS)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(*KILL_AFTER_S))
        gateway.kill()
        stop.set()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), f"seed={seed}: uploader did not stop"
            acked.update(t.acked)
            failed |= t.failed
            sizes.update(t.sizes)
        gateway.start()
        s3 = gateway.client()
        listed = list_keys(s3, bucket)
        assert listed == sorted(listed), f"seed={seed}: listing out of order"
        listed_set = set(listed)
        missing = sorted(set(acked) - listed_set)
        assert not missing, f"seed={seed} round {rnd}: acknowledged objects lost: {missing[:10]}"
        unknown = listed_set - set(acked) - failed
        assert not unknown, f"seed={seed}: objects nobody uploaded: {sorted(unknown)[:10]}"
        for key in listed:
            r = s3.get_object(Bucket=bucket, Key=key)
            body = r["Body"].read()
            assert len(body) == sizes[key], f"seed={seed}: {key} has {len(body)} bytes, wrote {sizes[key]}"
            assert sha(body) == sha(content_for(key, sizes[key])), f"seed={seed}: {key} is corrupt"
            if key in acked:
                assert r["ETag"] == acked[key], f"seed={seed}: {key} etag changed"
        for key in failed - listed_set:
            with pytest.raises(ClientError) as ei:
                s3.head_object(Bucket=bucket, Key=key)
            assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        # an upload interrupted mid-way may leave an open multipart upload; it must be
        # abortable and must not be visible as an object
        for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        assert acked, f"seed={seed}: no upload was acknowledged in round {rnd}; the test proved nothing"
    assert time.monotonic() - t_start < 30 * ROUNDS, "crash test exceeded its time budget"


# ---------------------------------------------------------------------------- torn log tail
def _last_segment(gateway) -> Path:
    segs = list_segments(gateway.data / "log")
    assert segs, "no log segment"
    return Path(segs[-1][1])


def test_damage_inside_the_primary_log_stops_the_gateway_and_restore_takes_the_vaults_copy(tmp_path):
    """A flipped byte in the middle of the primary log (intact records after
    it) is a disk fault, not a torn tail: the gateway refuses to start with
    a line naming the segment, and cuts nothing (it used to cut the log
    there and serve without the acknowledged objects behind the damage).
    `airlock restore` puts the log aside and takes the vault's copy."""
    from conftest import Deployment
    d = Deployment(tmp_path / "deploy").start()
    try:
        s3 = d.gateway.client()
        s3.create_bucket(Bucket="rot")
        bodies = {f"k{i}": content_for(f"k{i}", 3000 + i) for i in range(30)}
        for k, v in bodies.items():
            s3.put_object(Bucket="rot", Key=k, Body=v)
        d.gateway.stop()
        seg = _last_segment(d.gateway)
        recs = list(read_log(seg.parent))
        data = bytearray(seg.read_bytes())
        data[recs[len(recs) // 2].offset + 40] ^= 0xFF
        seg.write_bytes(bytes(data))
        with pytest.raises(RuntimeError, match="exited early"):
            d.start_gateway()
        errors = [line for line in d.gateway.log_text().splitlines() if "damaged record at offset" in line]
        assert errors and seg.name in errors[-1] and "airlock restore" in errors[-1], d.gateway.log_text()[-2000:]
        assert seg.stat().st_size == len(data)              # nothing cut
        r = d.airlock("restore")
        assert "failed=0" in r.stdout.strip().splitlines()[-1], r.stdout
        d.start_gateway()
        s3 = d.gateway.client()
        for k, v in bodies.items():
            assert s3.get_object(Bucket="rot", Key=k)["Body"].read() == v
        d.airlock("verify")
    finally:
        d.stop()


@pytest.mark.parametrize("tail", ["garbage", "half_record"])
def test_torn_log_tail_is_cut_on_restart_and_writes_continue(gateway, tail):
    s3 = gateway.client()
    s3.create_bucket(Bucket="torn")
    bodies = {f"k{i}": content_for(f"k{i}", 4 * KiB if i % 3 else 2 * MiB) for i in range(12)}
    for k, v in bodies.items():
        s3.put_object(Bucket="torn", Key=k, Body=v)
    before = snapshot(s3)
    assert gateway.stop() == 0

    seg = _last_segment(gateway)
    size = seg.stat().st_size
    if tail == "garbage":
        junk = random.Random(7).randbytes(3000)
    else:
        # a record that was being written when the power went: the right seq,
        # a plausible header, only part of the payload on disk
        next_seq = sum(1 for _ in read_log(gateway.data / "log")) + 1
        rec = encode_record(next_seq, 3, b'{"bucket":"torn","key":"ghost"}' * 40)
        junk = rec[: len(rec) // 2]
    with open(seg, "ab") as f:
        f.write(junk)

    gateway.start()
    s3 = gateway.client()
    assert snapshot(s3) == before
    assert seg.stat().st_size == size, "the torn tail was not cut"

    s3.put_object(Bucket="torn", Key="after", Body=b"written after the torn tail")
    s3.delete_object(Bucket="torn", Key="k0")
    assert gateway.stop() == 0
    gateway.start()
    s3 = gateway.client()
    assert s3.get_object(Bucket="torn", Key="after")["Body"].read() == b"written after the torn tail"
    keys = list_keys(s3, "torn")
    assert keys == sorted(set(bodies) - {"k0"} | {"after"})
    for k in set(bodies) - {"k0"}:
        assert sha(s3.get_object(Bucket="torn", Key=k)["Body"].read()) == sha(bodies[k])
