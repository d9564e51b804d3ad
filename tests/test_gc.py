"""`airlock gc` against a real deployment (vault and gateway processes):
chunks of deleted and overwritten objects leave the primary's disk, every
chunk a live object, a kept version or an open upload part needs stays, and
the data reads back byte for byte afterwards."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import chunkdamage

from airlock.primary.engine import committed_state

KiB = 1024
MiB = 1024 * KiB
BUCKET = "collected"
VERSIONED = "kept-versions"


def content(key: str, size: int) -> bytes:
    return random.Random(key).randbytes(size)


def digests_of(primary: Path) -> dict[tuple[str, str], list[str]]:
    """(bucket, key) -> chunk ids of the current objects, from the primary's log."""
    index = committed_state(str(primary))
    try:
        return {(m.bucket, m.key): [c.digest for c in m.chunks] for m in index.all_objects()}
    finally:
        index.close()


def stored(primary: Path, digest: str) -> bool:
    return (primary / "chunks" / digest[:2] / digest).exists() or chunkdamage.is_row(primary, digest)


def gc_line(stdout: str) -> str:
    return next(ln for ln in stdout.splitlines() if ln.startswith("gc: "))


def test_gc_removes_only_chunks_nothing_references_and_everything_reads_back(deployment):
    s3 = deployment.gateway.client()
    primary = deployment.root / "primary"
    s3.create_bucket(Bucket=BUCKET)
    keep = {"keep.bin": content("keep", 3 * MiB), "keep.txt": content("keep-small", 3000)}
    for key, body in keep.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    for key, size in (("gone.bin", 2 * MiB), ("gone.txt", 2500), ("over.bin", 2 * MiB)):
        s3.put_object(Bucket=BUCKET, Key=key, Body=content(key, size))
    before = digests_of(primary)
    gone = before[(BUCKET, "gone.bin")] + before[(BUCKET, "gone.txt")] + before[(BUCKET, "over.bin")]
    s3.delete_object(Bucket=BUCKET, Key="gone.bin")
    s3.delete_object(Bucket=BUCKET, Key="gone.txt")
    keep["over.bin"] = content("over-2", 2 * MiB)
    s3.put_object(Bucket=BUCKET, Key="over.bin", Body=keep["over.bin"])

    # a versioned bucket: the overwritten version is kept, so are its chunks
    s3.create_bucket(Bucket=VERSIONED)
    s3.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=VERSIONED, Key="doc", Body=content("doc-1", MiB))["VersionId"]
    s3.put_object(Bucket=VERSIONED, Key="doc", Body=content("doc-2", MiB))
    # an open multipart upload: its part's chunks are live until it completes or aborts
    up = s3.create_multipart_upload(Bucket=BUCKET, Key="parts.bin")["UploadId"]
    part = content("part-1", 5 * MiB)
    etag = s3.upload_part(Bucket=BUCKET, Key="parts.bin", UploadId=up, PartNumber=1, Body=part)["ETag"]

    busy = deployment.airlock("gc", check=False)
    assert busy.returncode != 0 and "in use by a running gateway" in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr

    deployment.gateway.stop()
    live = {d for ds in digests_of(primary).values() for d in ds}
    assert not set(gone) & live
    assert all(stored(primary, d) for d in gone)
    rows = [d for d in gone if chunkdamage.is_row(primary, d)]
    files = len(gone) - len(rows)
    assert len(rows) == 1 and files >= 4                          # gone.txt; two 2 MiB bodies

    dry = deployment.airlock("gc", "--dry-run")
    assert gc_line(dry.stdout).startswith(f"gc: would remove {files} chunk file(s)"), dry.stdout
    assert "and 1 small chunk(s) (2,500 bytes)" in gc_line(dry.stdout), dry.stdout
    assert all(stored(primary, d) for d in gone)              # a dry run removes nothing

    r = deployment.airlock("gc")
    assert gc_line(r.stdout).startswith(f"gc: removed {files} chunk file(s)"), r.stdout
    assert not any(stored(primary, d) for d in gone)
    assert all(stored(primary, d) for d in live)
    assert "removed 0 chunk file(s)" in gc_line(deployment.airlock("gc").stdout)   # nothing left to do
    scrub = deployment.airlock("scrub", "--no-repair")       # every referenced chunk present and sound
    assert scrub.stdout.splitlines()[-2].startswith("clean:"), scrub.stdout

    deployment.start_gateway()
    s3 = deployment.gateway.client()
    for key, body in keep.items():
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body, key
    old = s3.get_object(Bucket=VERSIONED, Key="doc", VersionId=v1)["Body"].read()
    assert old == content("doc-1", MiB)
    s3.complete_multipart_upload(Bucket=BUCKET, Key="parts.bin", UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert s3.get_object(Bucket=BUCKET, Key="parts.bin")["Body"].read() == part
    deployment.airlock("verify")
    health = deployment.gateway.health()
    assert health["status"] == "ok", health


def test_gc_waits_for_records_the_vault_has_and_the_primary_log_lacks(deployment):
    """A crash between the vault's acknowledgement and the primary's log
    append leaves chunks on disk that only the vault's record references:
    gc refuses until the gateway has fetched that record.  Forced with
    --no-vault-check it removes them, and the object still reads back
    (the chunks come back from the vault)."""
    s3 = deployment.gateway.client()
    primary = deployment.root / "primary"
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="a.bin", Body=content("a", MiB))
    deployment.gateway.stop()
    saved_log = deployment.root / "saved-log"
    shutil.copytree(primary / "log", saved_log)
    deployment.start_gateway()
    s3 = deployment.gateway.client()
    b = content("b", 2 * MiB)
    s3.put_object(Bucket=BUCKET, Key="b.bin", Body=b)
    b_chunks = digests_of(primary)[(BUCKET, "b.bin")]
    deployment.gateway.stop()
    # the primary loses b's record; its chunks stay (the index is rebuilt from the log)
    shutil.rmtree(primary / "log")
    shutil.copytree(saved_log, primary / "log")
    for p in primary.glob("index.sqlite*"):
        p.unlink()

    r = deployment.airlock("gc", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "vault holds records this primary has not applied" in r.stderr, r.stderr
    assert all(stored(primary, d) for d in b_chunks)

    forced = deployment.airlock("gc", "--no-vault-check")
    assert gc_line(forced.stdout).startswith(f"gc: removed {len(b_chunks)} chunk file(s)"), forced.stdout
    assert not any(stored(primary, d) for d in b_chunks)

    deployment.start_gateway()                    # fetches b's record from the vault
    s3 = deployment.gateway.client()
    assert s3.get_object(Bucket=BUCKET, Key="b.bin")["Body"].read() == b
    assert s3.get_object(Bucket=BUCKET, Key="a.bin")["Body"].read() == content("a", MiB)
    assert all(stored(primary, d) for d in b_chunks)       # written back when read
    deployment.airlock("verify")


def test_gc_of_a_directory_that_is_not_a_deployment_is_a_one_line_error(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "airlock", "gc", "--data", str(tmp_path), "--no-vault-check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.startswith("airlock: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
