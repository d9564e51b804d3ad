"""Damaged chunks on the primary are detected on read, served correctly from
the vault's copy, and repaired in place (claims 5, 10, 14).

Real processes: a vault and a gateway joined by the link; the damage is done
to the primary's chunk files on disk; reads go through boto3 and aws-cli.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import chunkdamage
from conftest import Deployment

MiB = 1 << 20


def chunk_files(data: Path) -> list[Path]:
    root = data / "chunks"
    return sorted(p for p in root.glob("??/*") if p.is_file())


def chunks_of(gw, bucket: str, key: str) -> list[str]:
    """The chunk ids of an object, from the primary's committed state."""
    from airlock.primary.engine import committed_state
    m = committed_state(str(gw.data)).object(bucket, key)
    return [c.digest for c in m.chunks]


def chunk_path(gw, digest: str) -> Path:
    return gw.data / "chunks" / digest[:2] / digest


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    """One deployment for the file: each test damages and reads back the
    chunks of objects of its own (random bodies, no chunk shared with
    another test) in a bucket of its own, and counts from the gateway's
    counters as they were at its start."""
    d = Deployment(tmp_path_factory.mktemp("corrupt") / "deploy").start()
    yield d
    d.stop()


def store_objects(dep) -> tuple:
    """A new bucket with one multi-chunk object and one small one: (s3, bodies, bucket)."""
    bucket = f"damage-{os.urandom(4).hex()}"
    s3 = dep.gateway.client()
    s3.create_bucket(Bucket=bucket)
    big = os.urandom(6 * MiB + 12345)
    small = f"small object body {bucket}\n".encode() * 10
    s3.put_object(Bucket=bucket, Key="big.bin", Body=big)
    s3.put_object(Bucket=bucket, Key="small.txt", Body=small)
    return s3, {"big.bin": big, "small.txt": small}, bucket


@pytest.fixture
def stored(dep):
    return store_objects(dep)


def flip_bytes(path: Path, offset: int = 100) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + 8):
        raw[i % len(raw)] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


DAMAGE = {"flipped": flip_bytes, "truncated": truncate, "deleted": lambda p: p.unlink()}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_chunk_is_served_from_the_vault_and_repaired(dep, stored, damage):
    s3, bodies, bucket = stored
    gw = dep.gateway
    digests = chunks_of(gw, bucket, "big.bin")
    assert len(digests) >= 2, "the test needs a multi-chunk object"
    victim = digests[1]
    stats0 = gw.health()["stats"]
    DAMAGE[damage](chunk_path(gw, victim))

    body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(bodies["big.bin"]).digest()

    # repaired in place: the file verifies again, and the repair was counted
    from airlock.chunk.store import ChunkStore
    assert ChunkStore(str(gw.data), fsync=False).read(victim)
    stats = gw.health()["stats"]
    assert stats["chunks_repaired"] > stats0["chunks_repaired"]
    assert stats["chunks_from_vault"] > stats0["chunks_from_vault"]
    assert "repaired chunk " + victim in gw.log_text()
    # a second read needs the vault no more
    before = gw.health()["stats"]["chunks_from_vault"]
    assert s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == bodies["big.bin"]
    assert gw.health()["stats"]["chunks_from_vault"] == before


@pytest.mark.parametrize("damage", sorted(chunkdamage.DAMAGE))
def test_a_damaged_small_chunk_row_is_served_from_the_vault_and_repaired(dep, stored, damage):
    """A small object's chunk is a row of chunks/small.sqlite: damaged there,
    it is served from the vault and written back like a chunk file."""
    s3, bodies, bucket = stored
    gw = dep.gateway
    (victim,) = chunks_of(gw, bucket, "small.txt")
    assert chunkdamage.is_row(gw.data, victim)
    chunkdamage.DAMAGE[damage](gw.data, victim)
    assert s3.get_object(Bucket=bucket, Key="small.txt")["Body"].read() == bodies["small.txt"]
    assert chunkdamage.stored(gw.data, victim) == bodies["small.txt"]        # repaired in place
    assert "repaired chunk " + victim in gw.log_text()
    before = gw.health()["stats"]["chunks_from_vault"]
    assert s3.get_object(Bucket=bucket, Key="small.txt")["Body"].read() == bodies["small.txt"]
    assert gw.health()["stats"]["chunks_from_vault"] == before


def test_ranged_read_of_a_damaged_chunk_is_correct(dep, stored):
    s3, bodies, bucket = stored
    gw = dep.gateway
    victim = chunks_of(gw, bucket, "big.bin")[0]
    flip_bytes(chunk_path(gw, victim), offset=5000)
    got = s3.get_object(Bucket=bucket, Key="big.bin", Range="bytes=1000-2999999")["Body"].read()
    assert got == bodies["big.bin"][1000:3000000]


def test_object_partly_local_partly_only_in_the_vault_is_served_whole(dep, stored):
    """Claims 5 and 10: some chunks read locally, the others requested from the vault."""
    s3, bodies, bucket = stored
    gw = dep.gateway
    # chunk files only: the random body's last chunk may be under 64 KiB,
    # a row of small.sqlite with no file of its own
    digests = [d for d in chunks_of(gw, bucket, "big.bin") if chunk_path(gw, d).exists()]
    before = gw.health()["stats"]["chunks_from_vault"]
    for d in digests[::2]:
        chunk_path(gw, d).unlink()
    assert s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == bodies["big.bin"]
    assert gw.health()["stats"]["chunks_from_vault"] - before == len(digests[::2])


def test_aws_cli_download_of_damaged_objects_is_byte_identical(deployment, tmp_path):
    """Every chunk file of the store damaged (a deployment of its own: conftest's)."""
    dep = deployment
    _s3, bodies, bucket = store_objects(dep)
    gw = dep.gateway
    for i, p in enumerate(chunk_files(gw.data)):
        list(DAMAGE.values())[i % 3](p)
    out = tmp_path / "down"
    gw.aws("s3", "cp", "--recursive", f"s3://{bucket}/", str(out))
    for key, body in bodies.items():
        assert (out / key).read_bytes() == body
    # every chunk file verifies after the reads repaired them
    from airlock.chunk.store import ChunkStore
    store = ChunkStore(str(gw.data), fsync=False)
    for p in chunk_files(gw.data):
        store.read(p.name)
    dep.airlock("verify")
