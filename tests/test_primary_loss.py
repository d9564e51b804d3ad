"""The primary's whole data directory disappears while the gateway runs:
reads keep working from the vault (degraded mode, claim 9), writes are
refused, and `airlock restore` brings the primary back (claim 14)."""
from __future__ import annotations

import os
import shutil
import time

import pytest
from botocore.exceptions import ClientError

from conftest import Deployment

MiB = 1 << 20


def wait_degraded(gw, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = gw.health()
        if h.get("primary_storage") == "failed":
            return h
        time.sleep(0.1)
    raise AssertionError(f"gateway did not notice the lost storage: {gw.health()}")


@pytest.fixture
def dep(tmp_path):
    d = Deployment(tmp_path / "deploy").start()
    yield d
    d.stop()


def test_reads_survive_losing_the_primary_and_restore_brings_it_back(dep, tmp_path):
    gw = dep.gateway
    s3 = gw.client()
    s3.create_bucket(Bucket="lifeline")
    bodies = {f"dir/obj{i}": os.urandom(i * 700_000 + 1) for i in range(6)}
    bodies["top.txt"] = b"top level\n"
    for k, v in bodies.items():
        s3.put_object(Bucket="lifeline", Key=k, Body=v, Metadata={"n": str(len(v))})
    s3.put_object(Bucket="lifeline", Key="gone", Body=b"deleted later")
    s3.delete_object(Bucket="lifeline", Key="gone")

    keys_dir = tmp_path / "keys-backup"
    shutil.copytree(gw.data / "keys", keys_dir)
    shutil.rmtree(gw.data)

    h = wait_degraded(gw)
    assert h["status"] == "degraded" and h["serving_reads_from"] == "vault"
    # reads: bodies, metadata, listings with delimiter, ranges -- all from the vault
    for k, v in bodies.items():
        got = s3.get_object(Bucket="lifeline", Key=k)
        assert got["Body"].read() == v
        assert got["Metadata"] == {"n": str(len(v))}
    assert s3.get_object(Bucket="lifeline", Key="dir/obj3", Range="bytes=10-99")["Body"].read() == \
        bodies["dir/obj3"][10:100]
    listing = s3.list_objects_v2(Bucket="lifeline", Delimiter="/")
    assert [c["Key"] for c in listing.get("Contents", [])] == ["top.txt"]
    assert [p["Prefix"] for p in listing["CommonPrefixes"]] == ["dir/"]
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket="lifeline")["Contents"]) == sorted(bodies)
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket="lifeline", Key="gone")
    assert e.value.response["Error"]["Code"] == "404"
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["lifeline"]
    # writes are refused, and nothing half-written appears
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="lifeline", Key="new", Body=b"x")
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
    status = dep.airlock("status", check=False)
    assert "DEGRADED" in status.stdout and status.returncode == 1

    # bring the primary back: stop, restore (keys first), start, verify
    gw.stop()
    shutil.copytree(keys_dir, gw.data / "keys")
    r = dep.airlock("restore")
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("restore:") and "failed=0" in last, r.stdout
    dep.start_gateway()
    assert gw.health()["primary_storage"] == "ok"
    for k, v in bodies.items():
        assert s3.get_object(Bucket="lifeline", Key=k)["Body"].read() == v
    assert gw.health()["stats"]["chunks_from_vault"] == 0, "restore should have brought every chunk back"
    s3.put_object(Bucket="lifeline", Key="after", Body=b"writes work again")
    dep.airlock("verify")
