"""The scenario the vault exists for: write, snapshot, a "ransomware" pass that
overwrites every object with garbage (and deletes some) through the S3 API,
compact everything with retention pruning the vault's history, then restore
from the snapshot: every original byte is back.  Also --to-bucket, and
`snapshot list` accounting equals what the vault's files hold.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3

import pytest

from conftest import Deployment
from test_snapshots import independent_accounting

MiB = 1 << 20


def snapshot_cli(dep: Deployment, *args: str) -> dict | list:
    r = dep.airlock("snapshot", *args, "--json")
    return json.loads(r.stdout)


def bodies_of(s3, bucket: str) -> dict[str, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


@pytest.fixture
def dep(tmp_path):
    # keep one non-current version per key in the vault's base: after the
    # attack's two overwrites, pruning drops the originals unless the snapshot
    # took them first
    cfg = tmp_path / "vault.toml"
    cfg.write_text("[vault.retention]\nkeep_versions = 1\n")
    d = Deployment(tmp_path / "deploy", vault_args=["--config", str(cfg)])
    d.start()
    yield d
    d.stop()


def test_ransomware_pass_is_undone_from_a_snapshot(dep):
    s3 = dep.gateway.client()
    s3.create_bucket(Bucket="records")
    s3.create_bucket(Bucket="other")
    originals = {f"patients/{i:03d}.json": os.urandom(1000 + i * 997) for i in range(20)}
    originals["scans/big.bin"] = os.urandom(5 * MiB + 77)
    for k, v in originals.items():
        s3.put_object(Bucket="records", Key=k, Body=v, ContentType="application/octet-stream")
    s3.put_object(Bucket="other", Key="note.txt", Body=b"untouched bucket\n")

    snap = snapshot_cli(dep, "create", "--mode", "cow", "--name", "before-attack")
    assert snap["name"] == "before-attack"

    # the attack: every object overwritten with garbage (twice), some deleted, a ransom note
    for _ in range(2):
        for k in originals:
            s3.put_object(Bucket="records", Key=k, Body=b"ENCRYPTED" + os.urandom(64))
    for k in list(originals)[:5]:
        s3.delete_object(Bucket="records", Key=k)
    s3.put_object(Bucket="records", Key="README-RANSOM.txt", Body=b"pay up")
    assert all(b.startswith(b"ENCRYPTED") or b == b"pay up" for b in bodies_of(s3, "records").values())

    # compact everything; retention prunes the originals from the base
    dep.airlock("compact", "--keep", "0")
    status = dep.vault.status()
    assert status["overlays"] == [] or all(not o.get("records") for o in status["overlays"])

    # restore the bucket from the snapshot (gateway stopped: restore writes through the engine)
    dep.gateway.stop()
    r = dep.airlock("restore", "--snapshot", "before-attack", "--bucket", "records")
    assert r.stdout.strip().splitlines()[-1].startswith("restore-snapshot:"), r.stdout
    dep.start_gateway()
    s3 = dep.gateway.client()
    restored = bodies_of(s3, "records")
    assert set(restored) == set(originals), "ransom note deleted, deleted objects back"
    for k, v in originals.items():
        assert hashlib.sha256(restored[k]).digest() == hashlib.sha256(v).digest(), k
    assert s3.head_object(Bucket="records", Key="scans/big.bin")["ContentType"] == "application/octet-stream"
    assert bodies_of(s3, "other") == {"note.txt": b"untouched bucket\n"}

    # a rerun finds everything equal and writes nothing
    dep.gateway.stop()
    again = dep.airlock("restore", "--snapshot", "before-attack", "--bucket", "records")
    assert " written=0 " in again.stdout and " deleted=0 " in again.stdout, again.stdout
    # ... and the snapshot can also be restored into a new bucket
    r = dep.airlock("restore", "--snapshot", "before-attack", "--bucket", "records", "--to-bucket", "records-copy")
    # ... but never over a bucket that holds objects, nor under a name S3 refuses, nor onto itself
    for target, why in (("other", "holds objects"), ("records-copy", "holds objects"),
                        ("Bad_Name", "not a valid S3 bucket name"), ("a/b", "not a valid S3 bucket name"),
                        ("records", "must name another bucket")):
        r = dep.airlock("restore", "--snapshot", "before-attack", "--bucket", "records", "--to-bucket", target,
                        check=False)
        assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, (target, r.stderr)
    dep.start_gateway()
    s3 = dep.gateway.client()
    assert bodies_of(s3, "records-copy") == originals
    assert bodies_of(s3, "other") == {"note.txt": b"untouched bucket\n"}
    dep.airlock("verify")

    # accounting in `snapshot list` equals what base.sqlite holds
    listed = {s["id"]: {k: s[k] for k in ("versions", "table_bytes", "chunks", "data_bytes")}
              for s in snapshot_cli(dep, "list")}
    catalog = str(dep.vault.data / "base" / "base.sqlite")
    sqlite3.connect(catalog).close()
    assert listed == independent_accounting(catalog)
    # the cow snapshot took the originals before pruning dropped them from the base
    assert listed[snap["id"]]["versions"] >= len(originals)


def test_restore_from_a_snapshot_sets_bucket_versioning_and_tags_back(dep):
    s3 = dep.gateway.client()
    s3.create_bucket(Bucket="kept")
    s3.put_bucket_versioning(Bucket="kept", VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_tagging(Bucket="kept", Tagging={"TagSet": [{"Key": "env", "Value": "prod"},
                                                              {"Key": "owner", "Value": "ward 7"}]})
    s3.put_object(Bucket="kept", Key="a.txt", Body=b"first")
    s3.create_bucket(Bucket="plain")
    s3.put_object(Bucket="plain", Key="b.txt", Body=b"plain")
    dep.airlock("compact", "--keep", "0")          # these settings now come from the vault's base
    snapshot_cli(dep, "create", "--mode", "cow", "--name", "configured")

    # the attack changes the configuration (records in overlays) and the data
    s3.put_bucket_versioning(Bucket="kept", VersioningConfiguration={"Status": "Suspended"})
    s3.delete_bucket_tagging(Bucket="kept")
    s3.put_bucket_versioning(Bucket="plain", VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_tagging(Bucket="plain", Tagging={"TagSet": [{"Key": "pwned", "Value": "yes"}]})
    s3.put_object(Bucket="kept", Key="a.txt", Body=b"ENCRYPTED")

    dep.gateway.stop()
    r = dep.airlock("restore", "--snapshot", "configured")
    last = r.stdout.strip().splitlines()[-1]
    # kept: versioning and tags; plain: versioning suspended (S3 has no way back to
    # "never versioned") and its tags removed
    assert " written=1 " in last and last.endswith(" config=4"), r.stdout
    again = dep.airlock("restore", "--snapshot", "configured")
    assert again.stdout.strip().splitlines()[-1].endswith(" written=0 deleted=0 chunks_fetched=0 "
                                                          "bytes_fetched=0 config=0"), again.stdout
    dep.airlock("restore", "--snapshot", "configured", "--bucket", "kept", "--to-bucket", "kept-copy")
    dep.start_gateway()
    s3 = dep.gateway.client()
    prod = [{"Key": "env", "Value": "prod"}, {"Key": "owner", "Value": "ward 7"}]
    for b in ("kept", "kept-copy"):
        assert s3.get_bucket_versioning(Bucket=b)["Status"] == "Enabled", b
        assert sorted(s3.get_bucket_tagging(Bucket=b)["TagSet"], key=lambda t: t["Key"]) == prod, b
        assert s3.get_object(Bucket=b, Key="a.txt")["Body"].read() == b"first", b
    # the restored object is a new version in the re-enabled bucket; the attack's is kept under it
    assert len(s3.list_object_versions(Bucket="kept", Prefix="a.txt")["Versions"]) == 3
    assert s3.get_bucket_versioning(Bucket="plain")["Status"] == "Suspended"
    with pytest.raises(s3.exceptions.ClientError) as e:
        s3.get_bucket_tagging(Bucket="plain")
    assert e.value.response["Error"]["Code"] == "NoSuchTagSet"
    assert s3.get_object(Bucket="plain", Key="b.txt")["Body"].read() == b"plain"
    dep.airlock("verify")
