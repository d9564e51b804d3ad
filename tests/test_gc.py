"""`airlock gc` against a real deployment (vault and gateway processes):
chunks of deleted and overwritten objects leave the primary's disk, every
chunk a live object, a kept version or an open upload part needs stays, and
the data reads back byte for byte afterwards."""
from __future__ import annotations

import json
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import chunkdamage
from botocore.config import Config
from conftest import free_port, proxied_deployment, wait_until
from test_ack_timeout import ACK_TIMEOUT_S, put_times_out

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


def version_digests(primary: Path, bucket: str, key: str, version_id: str) -> list[str]:
    index = committed_state(str(primary))
    try:
        row = index.db.execute("SELECT manifest FROM versions WHERE bucket=? AND key=? AND version_id=?",
                               (bucket, key, version_id)).fetchone()
        return [d for d, _size in json.loads(row[0])["chunks"]]
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
    for key, size in (("gone.bin", 2 * MiB), ("gone.txt", 2500), ("over.bin", 2 * MiB),
                      ("copied.bin", 2 * MiB)):
        s3.put_object(Bucket=BUCKET, Key=key, Body=content(key, size))
    before = digests_of(primary)
    gone = before[(BUCKET, "gone.bin")] + before[(BUCKET, "gone.txt")] + before[(BUCKET, "over.bin")]
    s3.delete_object(Bucket=BUCKET, Key="gone.bin")
    s3.delete_object(Bucket=BUCKET, Key="gone.txt")
    keep["over.bin"] = content("over-2", 2 * MiB)
    s3.put_object(Bucket=BUCKET, Key="over.bin", Body=keep["over.bin"])
    # a copy shares its source's chunks: they stay after the source is deleted
    s3.copy_object(Bucket=BUCKET, Key="copy.bin", CopySource={"Bucket": BUCKET, "Key": "copied.bin"})
    s3.delete_object(Bucket=BUCKET, Key="copied.bin")
    keep["copy.bin"] = content("copied.bin", 2 * MiB)

    # a versioned bucket: overwritten versions are kept, so are their chunks,
    # also behind a delete marker
    s3.create_bucket(Bucket=VERSIONED)
    s3.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=VERSIONED, Key="doc", Body=content("doc-1", MiB))["VersionId"]
    v2 = s3.put_object(Bucket=VERSIONED, Key="doc", Body=content("doc-2", MiB))["VersionId"]
    s3.delete_object(Bucket=VERSIONED, Key="doc")
    versioned = [d for v in (v1, v2) for d in version_digests(primary, VERSIONED, "doc", v)]
    assert len(versioned) >= 2
    # an open multipart upload: its part's chunks are live until it completes or aborts
    up = s3.create_multipart_upload(Bucket=BUCKET, Key="parts.bin")["UploadId"]
    part = content("part-1", 5 * MiB)
    etag = s3.upload_part(Bucket=BUCKET, Key="parts.bin", UploadId=up, PartNumber=1, Body=part)["ETag"]

    busy = deployment.airlock("gc", check=False)
    assert busy.returncode != 0 and "in use by a running gateway" in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr

    deployment.gateway.stop()
    live = {d for ds in digests_of(primary).values() for d in ds} | set(versioned)
    assert not set(gone) & live
    assert all(stored(primary, d) for d in gone)
    # not ours: a file system's lost+found, a stray file in a chunk directory
    (primary / "chunks" / "lost+found").mkdir()
    stray = primary / "chunks" / gone[0][:2] / "notes.txt"
    stray.write_text("left here by hand")
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
    assert "left alone: 2 file(s)" in r.stdout and stray.exists() and (primary / "chunks" / "lost+found").is_dir()
    assert "removed 0 chunk file(s)" in gc_line(deployment.airlock("gc").stdout)   # nothing left to do
    scrub = deployment.airlock("scrub", "--no-repair")       # every referenced chunk present and sound
    assert scrub.stdout.splitlines()[-2].startswith("clean:"), scrub.stdout

    deployment.start_gateway()
    s3 = deployment.gateway.client()
    for key, body in keep.items():
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body, key
    for vid, body in ((v1, content("doc-1", MiB)), (v2, content("doc-2", MiB))):
        assert s3.get_object(Bucket=VERSIONED, Key="doc", VersionId=vid)["Body"].read() == body
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


def test_gc_bad_invocations_are_one_line_errors(tmp_path):
    (tmp_path / "gw.toml").write_text('[gateway]\ndata = "%s"\n' % (tmp_path / "nothing"))
    for args in (["--data", str(tmp_path), "--no-vault-check"],        # not a deployment
                 [],                                                      # neither --data nor --config
                 ["--data", str(tmp_path), "--config", str(tmp_path / "gw.toml")],
                 ["--config", str(tmp_path / "gw.toml")],                 # no vault to ask
                 ["--config", str(tmp_path / "gw.toml"), "--no-vault-check"]):   # no data directory
        r = subprocess.run([sys.executable, "-m", "airlock", "gc", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0, (args, r.stdout)
        assert r.stderr.startswith("airlock: ") and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_gc_with_the_vault_down_says_how_to_run_without_it(deployment):
    deployment.stop()
    r = deployment.airlock("gc", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "--no-vault-check" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_gc_removes_the_chunks_of_a_put_that_was_answered_503(tmp_path):
    """A PUT whose ack came too late was answered 503 and voided: its chunks
    are on the primary's disk, and no committed state references them.  Both
    logs hold its record (the primary log took it while the APPEND was on
    its way), void on the primary (pending-aborts.json) until the gateway
    reconciles and an ABORT record voids it on the vault too.  gc removes its
    chunks (the vault holds the record; nothing needs them), before that
    reconcile or after it, and nothing else."""
    with proxied_deployment(tmp_path / "deploy", ACK_TIMEOUT_S) as (d, proxy):
        s3 = d.gateway.client()
        primary = d.root / "primary"
        s3.create_bucket(Bucket="keep")
        kept = content("kept", MiB)
        s3.put_object(Bucket="keep", Key="kept.bin", Body=kept)
        kept_chunks = digests_of(primary)[("keep", "kept.bin")]
        files_before = {p.name for p in (primary / "chunks").glob("??/*")}
        try:
            seq = put_times_out(d, proxy, s3, "late.bin", content("late", 2 * MiB))
            d.gateway.stop()                       # before the link could reconcile
        finally:
            proxy.command("release")
        late_files = {p.name for p in (primary / "chunks").glob("??/*")} - files_before
        assert late_files                          # written before the commit was refused
        assert json.loads((primary / "pending-aborts.json").read_text())["seqs"] == [seq]
        time.sleep(0.5)

        r = d.airlock("gc")          # both logs hold the void record: nothing needs its chunks
        assert gc_line(r.stdout).startswith(f"gc: removed {len(late_files)} chunk file(s)"), r.stdout
        assert not any((primary / "chunks" / f[:2] / f).exists() for f in late_files)
        assert all(stored(primary, c) for c in kept_chunks)

        d.start_gateway()                          # reconciles: an ABORT record voids it on the vault
        wait_until(lambda: d.gateway.health()["pending_aborts"] == 0, "the gateway to reconcile")
        d.gateway.stop()
        r = d.airlock("gc")
        assert gc_line(r.stdout).startswith("gc: removed 0 chunk file(s)"), r.stdout
        assert all(stored(primary, c) for c in kept_chunks)

        d.start_gateway()
        s3 = d.gateway.client()
        assert s3.get_object(Bucket="keep", Key="kept.bin")["Body"].read() == kept
        assert "Contents" not in s3.list_objects_v2(Bucket="keep", Prefix="late")
        d.airlock("verify")


class _Up:
    """`airlock up` as a user runs it; its output is drained by a thread (a
    full pipe would stall it) and searched by `wait_line`."""

    def __init__(self, data: Path, port: int, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "airlock", "up", "--data", str(data),
                                      "--port", str(port), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_line(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if needle in line:
                return
        self.proc.kill()
        raise AssertionError(f"{needle!r} never printed:\n{''.join(self.seen)}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)        # Ctrl-C, as a user stops `airlock up`
        assert self.proc.wait(timeout=30) == 0, self.proc.returncode


def test_local_deployment_gc_with_airlock_up_vault_only(tmp_path):
    """The local workflow the docs give: stop `airlock up`, start the vault
    alone (`airlock up --vault-only`), run gc, start everything again."""
    data, port = tmp_path / "airlock-data", free_port()
    up = _Up(data, port)
    try:
        up.wait_line("airlock is up")
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="AIRLOCKDEVACCESSKEY0",
                          aws_secret_access_key="airlock-dev-secret-key-change-me-0000000",
                          config=Config(retries={"max_attempts": 0}))
        s3.create_bucket(Bucket="local")
        s3.put_object(Bucket="local", Key="keep", Body=content("local-keep", 2 * MiB))
        s3.put_object(Bucket="local", Key="drop", Body=content("local-drop", 2 * MiB))
        s3.delete_object(Bucket="local", Key="drop")
    finally:
        up.stop()
    chunks = data / "primary" / "chunks"
    before = {p.name for p in chunks.glob("??/*")}

    vault = _Up(data, port, "--vault-only")
    try:
        vault.wait_line("is up alone")
        r = subprocess.run([sys.executable, "-m", "airlock", "gc", "--data", str(data)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert gc_line(r.stdout).startswith("gc: removed "), r.stdout
    finally:
        vault.stop()
    after = {p.name for p in chunks.glob("??/*")}
    assert after < before and len(after) >= 1

    up = _Up(data, port)
    try:
        up.wait_line("airlock is up")
        body = s3.get_object(Bucket="local", Key="keep")["Body"].read()
        assert body == content("local-keep", 2 * MiB)
    finally:
        up.stop()


def test_gc_shrinks_the_small_chunk_database_once_most_of_it_is_free(deployment):
    """Deleting many small objects frees pages of small.sqlite; gc rewrites
    it without them once they are worth it (SHRINK_MIN_BYTES), and the
    objects kept read back."""
    from airlock.primary.gc import SHRINK_MIN_BYTES
    s3 = deployment.gateway.client()
    primary = deployment.root / "primary"
    db = primary / "chunks" / "small.sqlite"
    s3.create_bucket(Bucket=BUCKET)
    size = 60 * KiB                                          # one chunk each: a row (<= 64 KiB)
    n = (SHRINK_MIN_BYTES * 3 // 2) // size
    keys = [f"small/{i:04d}" for i in range(n)]
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=content(k, size)), keys))
    kept = keys[:20]
    doomed = keys[20:]
    for i in range(0, len(doomed), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in doomed[i:i + 1000]]})
    deployment.gateway.stop()
    big = db.stat().st_size
    assert big > SHRINK_MIN_BYTES, big
    r = deployment.airlock("gc")
    assert f"{len(doomed)} small chunk(s)" in gc_line(r.stdout), r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("small.sqlite rewritten"))
    assert db.stat().st_size < big / 4, (line, db.stat().st_size, big)
    again = deployment.airlock("gc")       # nothing free left: not rewritten again
    assert "small.sqlite" not in again.stdout, again.stdout
    deployment.start_gateway()
    s3 = deployment.gateway.client()
    for k in kept:
        assert s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() == content(k, size), k
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="small/")["KeyCount"] == len(kept)
