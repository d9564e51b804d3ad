"""chunk_sync: with a vault, the primary's chunk files need not be fsynced.

Every chunk a record references is on the vault's stable storage before the
record is acknowledged, so with `chunk_sync = "vault"` the gateway writes
chunk files without fsync; a power loss can then cut the newest ones
short.  These tests cut them by hand (what an unsynced file can look like
after a crash: missing, empty, half written) and check that nothing
acknowledged is lost and that a damaged copy is never reused by dedup.
`chunk_sync = "local"` (the default) keeps the per-chunk fsync
(docs/format/chunkstore.md).

Real processes: vault + gateway over the mutual-TLS link, boto3 clients.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
from botocore.exceptions import ClientError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Deployment, wait_until  # noqa: E402

CUTS = {
    "deleted": lambda p: p.unlink(),
    "empty": lambda p: p.write_bytes(b""),
    "half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
}


def chunk_path(gw, body: bytes) -> Path:
    """Where a body that is a single chunk (< the 256 KiB minimum) is stored."""
    d = blake3.blake3(body).hexdigest()
    return gw.data / "chunks" / d[:2] / d


@pytest.fixture
def dep(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nchunk_sync = "vault"\n')
    d = Deployment(tmp_path / "deploy", ack_timeout=3.0, gateway_config=cfg).start()
    yield d
    d.stop()


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_acknowledged_objects_survive_chunk_files_cut_by_a_crash(dep, cut):
    s3 = dep.gateway.client()
    s3.create_bucket(Bucket="crash")
    bodies = {f"k{i}": os.urandom(1000 + i) for i in range(5)}
    for k, v in bodies.items():
        s3.put_object(Bucket="crash", Key=k, Body=v)
    dep.gateway.kill()                                   # no clean shutdown
    for v in bodies.values():
        CUTS[cut](chunk_path(dep.gateway, v))
    dep.start_gateway()
    wait_until(lambda: dep.gateway.health().get("vault_connected"), "the gateway to reach the vault")
    for k, v in bodies.items():
        assert s3.get_object(Bucket="crash", Key=k)["Body"].read() == v
    stats = dep.gateway.health()["stats"]
    assert stats["chunks_repaired"] == len(bodies), stats
    for v in bodies.values():                            # repaired in place
        assert chunk_path(dep.gateway, v).read_bytes()[16:] == v


def test_a_damaged_chunk_the_vault_never_got_is_not_reused_by_dedup(dep):
    """An upload refused while the vault was down left its chunk behind; a
    power loss then cut that unsynced file.  Re-uploading the same bytes must
    not commit a record whose only copy of the data is the damaged file."""
    s3 = dep.gateway.client()
    s3.create_bucket(Bucket="dedup")
    body = b"bytes the vault has never seen\n" * 100
    dep.vault.stop()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="dedup", Key="x", Body=body)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    local = chunk_path(dep.gateway, body)
    assert local.exists(), "the refused upload's chunk stays in the local store"
    CUTS["half"](local)
    dep.vault.start()
    wait_until(lambda: dep.gateway.health().get("vault_connected"), "the gateway to reconnect", timeout=30)

    # first try: the vault lacks the chunk, the local copy does not verify,
    # the copy is dropped and the client hears 503 (nothing committed)
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="dedup", Key="x", Body=body)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert not local.exists()
    wait_until(lambda: dep.gateway.health().get("vault_connected"), "the gateway to reconnect", timeout=30)
    # the retry writes and ships the chunk anew
    s3.put_object(Bucket="dedup", Key="x", Body=body)
    assert s3.get_object(Bucket="dedup", Key="x")["Body"].read() == body
    r = dep.airlock("verify")
    assert "equal" in r.stdout.lower(), r.stdout


def test_chunk_sync_local_keeps_working_end_to_end(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nchunk_sync = "local"\n')   # the default, spelled out
    d = Deployment(tmp_path / "deploy", gateway_config=cfg).start()
    try:
        s3 = d.gateway.client()
        s3.create_bucket(Bucket="bee")
        body = os.urandom(3 << 20)
        s3.put_object(Bucket="bee", Key="k", Body=body)
        assert s3.get_object(Bucket="bee", Key="k")["Body"].read() == body
    finally:
        d.stop()


def test_an_unknown_chunk_sync_mode_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nchunk_sync = "sometimes"\n')
    r = subprocess.run([sys.executable, "-m", "airlock", "gateway", "--config", str(cfg),
                        "--data", str(tmp_path / "p")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "chunk_sync must be one of vault, local" in err[0], r.stderr
