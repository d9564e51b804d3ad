"""`airlock scrub` against a running deployment (real vault and gateway
processes): chunk files damaged on the primary's disk are found and repaired
from the vault while the gateway keeps running.

Damage is done by hand to the primary's copies: bytes flipped in a small
chunk's row (chunks/small.sqlite, through tests/chunkdamage.py), a chunk
file at DATA/primary/chunks/<hex[:2]>/<hex> truncated, another deleted.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import chunkdamage

from airlock.primary.engine import committed_state

KiB = 1024
MiB = 1024 * KiB
BUCKET = "scrubbed"


def content(key: str, size: int) -> bytes:
    return random.Random(key).randbytes(size)


def chunk_digests(primary: Path, bucket: str) -> dict[str, list[str]]:
    """key -> chunk ids, from the primary's committed state (its log)."""
    index = committed_state(str(primary))
    try:
        return {m.key: [c.digest for c in m.chunks] for m in index.all_objects() if m.bucket == bucket}
    finally:
        index.close()


def chunk_path(primary: Path, digest: str) -> Path:
    return primary / "chunks" / digest[:2] / digest


def summary(stdout: str) -> dict[str, int]:
    line = [ln for ln in stdout.splitlines() if ln.startswith("scrub: ")][-1]
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def upload(deployment) -> dict[str, bytes]:
    s3 = deployment.gateway.client()
    s3.create_bucket(Bucket=BUCKET)
    bodies = {"small.txt": content("small", 3000), "big.bin": content("big", 10 * MiB),
              "medium.bin": content("medium", 700 * KiB)}
    for key, body in bodies.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return bodies


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_scrub_repairs_flipped_truncated_and_deleted_chunks_from_the_vault(deployment):
    bodies = upload(deployment)
    primary = deployment.root / "primary"
    chunks = chunk_digests(primary, BUCKET)
    assert len(chunks["big.bin"]) >= 3
    flipped, truncated, deleted = chunks["small.txt"][0], chunks["big.bin"][0], chunks["big.bin"][-1]
    assert chunkdamage.is_row(primary, flipped)                   # small.txt: a row of small.sqlite
    chunkdamage.flip(primary, flipped, offset=100, n=1)
    with open(chunk_path(primary, truncated), "r+b") as f:
        f.truncate(16 + 1000)
    os.unlink(chunk_path(primary, deleted))

    r = deployment.airlock("scrub")                               # the gateway keeps running
    s = summary(r.stdout)
    assert (s["problems"], s["repaired"], s["remaining"]) == (3, 3, 0), r.stdout
    for digest, what in ((flipped, "digest mismatch"), (truncated, "length"), (deleted, "missing")):
        line = next(ln for ln in r.stdout.splitlines() if digest in ln)
        assert what in line and "repaired from the vault" in line, line
        assert f"repaired chunk {digest}" in r.stderr                 # every repair is logged
    assert r.stdout.splitlines()[-2].startswith("clean:")

    again = summary(deployment.airlock("scrub").stdout)
    assert (again["problems"], again["remaining"]) == (0, 0)
    assert again["chunks_checked"] >= len({d for ds in chunks.values() for d in ds})

    s3 = deployment.gateway.client()
    for key, body in bodies.items():
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body, key
    deployment.airlock("verify")


def test_scrub_no_repair_reports_damage_and_exits_1(deployment):
    upload(deployment)
    primary = deployment.root / "primary"
    digest = chunk_digests(primary, BUCKET)["medium.bin"][0]
    flip_byte(chunk_path(primary, digest), 16)
    damaged = chunk_path(primary, digest).read_bytes()

    r = deployment.airlock("scrub", "--no-repair", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    s = summary(r.stdout)
    assert (s["problems"], s["repaired"], s["remaining"]) == (1, 0, 1)
    assert digest in r.stdout and "not repaired" in r.stdout
    assert chunk_path(primary, digest).read_bytes() == damaged     # nothing was touched

    assert summary(deployment.airlock("scrub").stdout)["repaired"] == 1
    assert summary(deployment.airlock("scrub", "--no-repair").stdout)["problems"] == 0


def test_scrub_reports_a_damaged_chunk_the_vault_cannot_replace(deployment):
    """A corrupt chunk file no object references and the vault never received
    (here: planted by hand) stays damaged: exit 1, and the report says why."""
    upload(deployment)
    primary = deployment.root / "primary"
    stray = "ab" * 32
    chunk_path(primary, stray).parent.mkdir(parents=True, exist_ok=True)
    chunk_path(primary, stray).write_bytes(b"ACHK\x01\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00xyz")

    r = deployment.airlock("scrub", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if stray in ln)
    assert "not referenced" in line and "vault has no copy" in line, line
    assert summary(r.stdout)["remaining"] == 1


def test_scrub_with_the_vault_down_still_reports_the_damage(deployment):
    """The vault unreachable: nothing can be repaired, but the report (each
    damaged chunk, the summary line for scripts) is printed all the same."""
    upload(deployment)
    primary = deployment.root / "primary"
    digest = chunk_digests(primary, BUCKET)["medium.bin"][0]
    flip_byte(chunk_path(primary, digest), 16)
    deployment.vault.stop()
    r = deployment.airlock("scrub", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if digest in ln)
    assert "NOT repaired" in line and "vault cannot be reached" in line, line
    assert summary(r.stdout)["remaining"] == 1
