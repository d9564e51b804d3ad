"""The primary's whole data directory disappears while the gateway runs:
reads keep working from the vault (degraded mode, claim 9), writes are
refused, and `airlock restore` brings the primary back (claim 14)."""
from __future__ import annotations

import json
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
    status = dep.airlock("status", "--json", check=False)       # scripts see it too
    assert json.loads(status.stdout)["gateway"]["status"] != "ok" and status.returncode == 1

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


def test_losing_the_primary_while_the_vault_is_down_serves_from_the_vault_once_it_is_back(dep):
    """Degraded mode needs the vault's log to rebuild the index; if the vault
    cannot be reached at that moment the gateway keeps trying (writes are
    refused meanwhile) and serves from the vault as soon as it is back."""
    from conftest import wait_until
    gw = dep.gateway
    s3 = gw.client()
    s3.create_bucket(Bucket="patient")
    body = os.urandom(300_000)
    s3.put_object(Bucket="patient", Key="k", Body=body)
    dep.vault.stop()
    shutil.rmtree(gw.data)

    def health():
        try:
            return gw.health()
        except OSError:          # a worker going away as the gateway degrades
            return {}
    wait_until(lambda: health().get("primary_storage") == "failed", "degraded", timeout=15)
    time.sleep(3)                # several failed tries to reach the vault
    h = health()
    assert h.get("vault_state_loaded") is False, h
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="patient", Key="new", Body=b"x")
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
    dep.vault.start()
    wait_until(lambda: health().get("vault_state_loaded") is True, "vault state loaded", timeout=30)
    assert gw.client().get_object(Bucket="patient", Key="k")["Body"].read() == body
    assert [o["Key"] for o in gw.client().list_objects_v2(Bucket="patient")["Contents"]] == ["k"]
