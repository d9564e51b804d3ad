"""`airlock restore` with real vault and gateway processes: the primary's
data is rebuilt from the vault, copying only what is missing or corrupt.

Every test damages the primary by hand with the gateway stopped (restore
runs with the gateway stopped), restores, starts the gateway again and checks
every body byte for byte through boto3 and `airlock verify`.  Counts come
from restore's last line, `restore: objects=.. chunks_checked=.. ...`.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chunkdamage
import pytest

from airlock.log.reader import list_segments, read_log, segment_name
from airlock.log.record import encode_record, encode_segment_header
from airlock.primary.engine import committed_state

KiB = 1024
MiB = 1024 * KiB
PART = 5 * MiB
KILL_DEADLINE_S = 60.0


def content(key: str, size: int) -> bytes:
    return random.Random(key).randbytes(size)


def summary(stdout: str) -> dict[str, int]:
    line = [ln for ln in stdout.splitlines() if ln.startswith("restore: ")][-1]
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def chunks_by_object(primary: Path) -> dict[tuple[str, str], list[tuple[str, int]]]:
    index = committed_state(str(primary))
    try:
        return {(m.bucket, m.key): [(c.digest, c.size) for c in m.chunks] for m in index.all_objects()}
    finally:
        index.close()


def chunk_files(primary: Path) -> set[str]:
    """Every chunk the primary holds: small ones as rows, the others as files."""
    return chunkdamage.all_digests(primary)


def put_all(deployment, objects: dict[tuple[str, str], bytes], create: bool = True) -> None:
    s3 = deployment.gateway.client()
    for bucket in sorted({b for b, _k in objects}) if create else ():
        s3.create_bucket(Bucket=bucket)
    for (bucket, key), body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def check_all(deployment, objects: dict[tuple[str, str], bytes]) -> None:
    s3 = deployment.gateway.client()
    for (bucket, key), body in objects.items():
        got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert got == body, f"{bucket}/{key}: {len(got)} bytes, expected {len(body)}"
    deployment.airlock("verify")


def wipe_primary(primary: Path) -> None:
    """Everything of the primary's data but its link keys."""
    for p in primary.iterdir():
        if p.name == "keys":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def truncate_log_tail(primary: Path, records: int) -> int:
    """Cut the last `records` whole records off the primary log (a primary
    that lost its last writes); returns the new last sequence number."""
    first_seq, path = list_segments(primary / "log")[-1]
    recs = [r for r in read_log(primary / "log", from_seq=first_seq)]
    assert len(recs) >= records
    with open(path, "r+b") as f:
        f.truncate(recs[-records].offset)
    return recs[-records].seq - 1


SMALL_SET = {("photos", "cat.jpg"): content("cat", 40 * KiB),
             ("photos", "2026/dog.raw"): content("dog", 6 * MiB),
             ("photos", "empty"): b"",
             ("docs", "a.txt"): content("a", 1234),
             ("docs", "b.bin"): content("b", 2 * MiB + 17)}


# ---------------------------------------------------------------------------- (a) everything lost
def test_restore_rebuilds_a_wiped_primary_from_the_vault(deployment):
    objects = dict(SMALL_SET)
    put_all(deployment, objects)
    s3 = deployment.gateway.client()
    up = s3.create_multipart_upload(Bucket="docs", Key="multi")["UploadId"]
    part1 = content("part1", PART)
    etag1 = s3.upload_part(Bucket="docs", Key="multi", UploadId=up, PartNumber=1, Body=part1)["ETag"]
    primary = deployment.root / "primary"
    chunks = {d: n for refs in chunks_by_object(primary).values() for d, n in refs}
    vault_last = deployment.vault.status()["last_seq"]
    deployment.gateway.stop()

    wipe_primary(primary)
    assert sorted(p.name for p in primary.iterdir()) == ["keys"]
    r = deployment.airlock("restore")
    s = summary(r.stdout)
    assert s["records_fetched"] == vault_last
    assert s["objects"] == len(objects) and s["parts"] == 1
    assert s["chunks_copied"] == s["chunks_checked"] > len(chunks)     # + the open upload's part
    assert s["bytes_copied"] == s["bytes_checked"] == sum(chunks.values()) + len(part1)
    assert s["failed"] == 0

    deployment.start_gateway()
    check_all(deployment, objects)
    s3 = deployment.gateway.client()
    s3.complete_multipart_upload(Bucket="docs", Key="multi", UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag1}]})
    assert s3.get_object(Bucket="docs", Key="multi")["Body"].read() == part1


# ---------------------------------------------------------------------------- (b) a few things lost
def test_restore_copies_only_the_missing_chunks_and_the_lost_log_tail(deployment):
    objects = dict(SMALL_SET)
    put_all(deployment, objects)
    late = {("docs", "late-1"): content("late-1", 300 * KiB), ("docs", "late-2"): content("late-2", 5000)}
    put_all(deployment, late, create=False)
    objects.update(late)
    primary = deployment.root / "primary"
    refs = chunks_by_object(primary)
    deployment.gateway.stop()

    # the primary lost its last two writes (the vault has them) ...
    truncate_log_tail(primary, 2)
    # ... two chunks rotted, one vanished
    lost = [refs[("photos", "2026/dog.raw")][0], refs[("docs", "b.bin")][-1]]
    chunkdamage.flip(primary, lost[0][0], offset=24)
    chunkdamage.delete(primary, lost[1][0])
    chunkdamage.truncate(primary, refs[("photos", "cat.jpg")][0][0])      # a row of small.sqlite
    lost.append(refs[("photos", "cat.jpg")][0])

    r = deployment.airlock("restore")
    s = summary(r.stdout)
    distinct = {d for rs in refs.values() for d, _n in rs}
    assert s["records_fetched"] == 2
    assert s["objects"] == len(objects)
    assert s["chunks_checked"] == len(distinct)
    assert s["chunks_copied"] == 3 and s["bytes_copied"] == sum(n for _d, n in lost), r.stdout
    assert s["failed"] == 0

    again = summary(deployment.airlock("restore").stdout)
    assert (again["records_fetched"], again["chunks_copied"], again["bytes_copied"]) == (0, 0, 0)
    assert again["chunks_checked"] == len(distinct)

    deployment.start_gateway()
    check_all(deployment, objects)


def test_restore_moves_an_unreadable_log_aside_and_refetches_it(deployment):
    objects = dict(SMALL_SET)
    put_all(deployment, objects)
    primary = deployment.root / "primary"
    vault_last = deployment.vault.status()["last_seq"]
    deployment.gateway.stop()
    # damage inside a segment that is not the last one: corruption, not a torn tail
    path = Path(list_segments(primary / "log")[-1][1])
    (primary / "log" / segment_name(vault_last + 1)).write_bytes(encode_segment_header(vault_last + 1))
    with open(path, "r+b") as f:
        f.seek(32 + 30)
        f.write(b"\xff\xff")

    r = deployment.airlock("restore")
    assert "moved aside to" in r.stdout
    assert summary(r.stdout)["records_fetched"] == vault_last
    aside = [p for p in primary.iterdir() if p.name.startswith("log.damaged-")]
    assert len(aside) == 1 and (aside[0] / path.name).exists()
    deployment.start_gateway()
    check_all(deployment, objects)


def test_restore_refuses_a_log_that_differs_from_the_vaults(deployment):
    put_all(deployment, {("mine", "k"): b"v"})
    primary = deployment.root / "primary"
    deployment.gateway.stop()
    first_seq, name = list_segments(primary / "log")[-1]
    path = Path(name)
    last = [r for r in read_log(primary / "log", from_seq=first_seq)][-1]
    with open(path, "r+b") as f:                  # same seq, other (valid) bytes: another primary's record
        f.truncate(last.offset)
        f.seek(last.offset)
        f.write(encode_record(last.seq, last.rtype, bytes(last.payload).replace(b'"k"', b'"x"')))
    before = path.read_bytes()

    r = deployment.airlock("restore", check=False)
    assert r.returncode == 1
    assert f"record {last.seq} of the primary log differs from the vault's" in r.stderr
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------- (c) one bucket
def test_restore_with_bucket_copies_only_that_buckets_chunks(deployment):
    objects = dict(SMALL_SET)
    put_all(deployment, objects)
    primary = deployment.root / "primary"
    refs = chunks_by_object(primary)
    docs = {d for (b, _k), rs in refs.items() if b == "docs" for d, _n in rs}
    photos = {d for (b, _k), rs in refs.items() if b == "photos" for d, _n in rs}
    assert not docs & photos
    deployment.gateway.stop()
    shutil.rmtree(primary / "chunks")

    s = summary(deployment.airlock("restore", "--bucket", "docs").stdout)
    assert s["objects"] == sum(1 for b, _k in objects if b == "docs")
    assert s["chunks_copied"] == s["chunks_checked"] == len(docs)
    assert chunk_files(primary) == docs

    s = summary(deployment.airlock("restore", "--bucket", "photos", "--prefix", "2026/").stdout)
    assert s["objects"] == 1
    assert chunk_files(primary) == docs | {d for d, _n in refs[("photos", "2026/dog.raw")]}

    r = deployment.airlock("restore", "--bucket", "dcos", check=False)      # a typo
    assert r.returncode == 2 and "there is no bucket 'dcos'" in r.stderr, r.stderr
    s = summary(deployment.airlock("restore").stdout)
    assert s["chunks_copied"] == len(photos) - len(refs[("photos", "2026/dog.raw")])
    deployment.start_gateway()
    check_all(deployment, objects)


# ---------------------------------------------------------------------------- (d) interrupted
def test_restore_killed_midway_completes_when_rerun(deployment):
    objects = {("bulk", f"obj-{i:02d}"): content(f"bulk-{i}", 3 * MiB + i * 1000) for i in range(24)}
    put_all(deployment, objects)
    primary = deployment.root / "primary"
    total = len({d for rs in chunks_by_object(primary).values() for d, _n in rs})
    deployment.gateway.stop()
    wipe_primary(primary)

    (deployment.root / "deployment.json").write_text(json.dumps(
        {"gateway": f"127.0.0.1:{deployment.gateway.port}", "vault": f"127.0.0.1:{deployment.vault.port}",
         "primary": "primary", "vault_data": "vault"}))
    proc = subprocess.Popen([sys.executable, "-m", "airlock", "restore", "--data", str(deployment.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + KILL_DEADLINE_S
    while proc.poll() is None and len(chunk_files(primary)) < total // 3:
        assert time.monotonic() < deadline, "restore made no progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _out, err = proc.communicate()
    copied_before = len(chunk_files(primary))
    assert proc.returncode == -signal.SIGKILL, f"restore ended ({proc.returncode}) before it was killed: {err}"
    assert 0 < copied_before < total

    s = summary(deployment.airlock("restore").stdout)
    assert s["records_fetched"] == 0          # the log was complete before the chunks started
    assert s["chunks_checked"] == total
    assert s["chunks_copied"] <= total - copied_before + 8     # at most a window re-fetched
    assert chunk_files(primary) >= {d for rs in chunks_by_object(primary).values() for d, _n in rs}
    assert summary(deployment.airlock("restore").stdout)["chunks_copied"] == 0

    deployment.start_gateway()
    check_all(deployment, objects)


# ---------------------------------------------------------------------------- (e) the lock
def test_restore_refuses_while_another_process_holds_the_primary_lock(deployment):
    put_all(deployment, {("locked", "k"): b"v"})
    primary = deployment.root / "primary"
    deployment.gateway.stop()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from airlock.primary.datalock import PrimaryLock; "
                               f"l = PrimaryLock({str(primary)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: p.stat().st_size for p in (primary / "log").iterdir()}
        r = deployment.airlock("restore", check=False)
        assert r.returncode == 1
        assert f"in use by a running gateway (pid {holder.pid}) (stop it first)" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert {p.name: p.stat().st_size for p in (primary / "log").iterdir()} == before
    finally:
        holder.kill()
        holder.wait()
    assert summary(deployment.airlock("restore").stdout)["chunks_copied"] == 0


def test_restore_refuses_while_the_gateway_runs(deployment):
    put_all(deployment, {("running", "k"): b"v"})
    r = deployment.airlock("restore", check=False)
    assert r.returncode == 1
    assert f"in use by a running gateway (pid {deployment.gateway.proc.pid}) (stop it first)" in r.stderr
