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
import chunkdamage  # noqa: E402
from conftest import Deployment, wait_until  # noqa: E402

# what an unsynced chunk can look like after a power loss: a small chunk's
# row is missing, empty or half there (SQLite with synchronous=OFF), a large
# chunk's file likewise
CUTS = {"deleted": chunkdamage.delete, "empty": chunkdamage.empty, "half": chunkdamage.truncate}


def digest(body: bytes) -> str:
    """The chunk id of a body that is a single chunk (< the 256 KiB minimum)."""
    return blake3.blake3(body).hexdigest()


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
    # rows (small chunks) and files (from 64 KiB up)
    bodies = {**{f"k{i}": os.urandom(1000 + i) for i in range(3)},
              **{f"big{i}": os.urandom(100_000 + i) for i in range(2)}}
    for k, v in bodies.items():
        s3.put_object(Bucket="crash", Key=k, Body=v)
    dep.gateway.kill()                                   # no clean shutdown
    for v in bodies.values():
        CUTS[cut](dep.gateway.data, digest(v))
    dep.start_gateway()
    wait_until(lambda: dep.gateway.health().get("vault_connected"), "the gateway to reach the vault")
    for k, v in bodies.items():
        assert s3.get_object(Bucket="crash", Key=k)["Body"].read() == v
    stats = dep.gateway.health()["stats"]
    assert stats["chunks_repaired"] == len(bodies), stats
    for v in bodies.values():                            # repaired in place
        assert chunkdamage.stored(dep.gateway.data, digest(v)) == v


# a body hashed on the event loop (its chunk shipped whatever the store
# holds) and one that goes through the executor (new chunks only: a chunk
# found in the store is trusted until the vault says it lacks it); both rows
SMALL_BODY = b"bytes the vault has never seen\n" * 100          # 3100 bytes
ROW_BODY = b"bytes the vault has never seen either\n" * 1000   # 38 KB, one chunk


@pytest.mark.parametrize("body", [SMALL_BODY, ROW_BODY], ids=["on-loop", "executor"])
def test_a_damaged_chunk_the_vault_never_got_is_not_reused_by_dedup(dep, body):
    """An upload refused while the vault was down left its chunk behind; a
    power loss then cut that unsynced copy.  Re-uploading the same bytes must
    not commit a record whose only copy of the data is the damaged one."""
    s3 = dep.gateway.client()
    s3.create_bucket(Bucket="dedup")
    dep.vault.stop()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="dedup", Key="x", Body=body)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    gw_data, d = dep.gateway.data, digest(body)
    assert chunkdamage.exists(gw_data, d), "the refused upload's chunk stays in the local store"
    CUTS["half"](gw_data, d)
    dep.vault.start()
    wait_until(lambda: dep.gateway.health().get("vault_connected"), "the gateway to reconnect", timeout=30)

    if body is ROW_BODY:
        # the vault lacks the chunk, the local copy does not verify, the
        # copy is dropped and the client hears 503 (nothing committed)
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket="dedup", Key="x", Body=body)
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert not chunkdamage.exists(gw_data, d)
        wait_until(lambda: dep.gateway.health().get("vault_connected"), "the gateway to reconnect", timeout=30)
    # the (re)try ships the chunk anew: the vault holds the good bytes
    s3.put_object(Bucket="dedup", Key="x", Body=body)
    assert s3.get_object(Bucket="dedup", Key="x")["Body"].read() == body
    # a damaged local copy left in place is repaired from the vault as it is read
    assert chunkdamage.stored(gw_data, d) == body
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
