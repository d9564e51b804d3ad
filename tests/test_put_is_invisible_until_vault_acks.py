"""A PUT becomes visible only after the vault's durable ack (SPEC "Write path" 4).

The fault proxy holds the vault->gateway direction: chunks and the APPEND
reach the vault, which makes the record durable (its last_seq grows), but the
ACK waits in the proxy.  Until it is released the object must be invisible on
the gateway (HEAD, GET, ListObjectsV2); afterwards the PUT answers 200 and
both domains hold the same state.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Deployment, proxied_deployment, wait_until  # noqa: E402

ACK_TIMEOUT_S = 10.0   # generous: the test inspects the gateway while the ack is held
WAIT_S = 8.0           # bound of every poll below (< ACK_TIMEOUT_S)


@pytest.fixture
def proxied(tmp_path):
    with proxied_deployment(tmp_path / "deploy", ACK_TIMEOUT_S) as dp:
        yield dp


def assert_invisible(s3, bucket: str, key: str) -> None:
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key=key)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key=key)
    assert e.value.response["Error"]["Code"] == "NoSuchKey"
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert key not in listed


class PutThread(threading.Thread):
    def __init__(self, s3, bucket: str, key: str, body: bytes):
        super().__init__(daemon=True)
        self.s3, self.bucket, self.key, self.body = s3, bucket, key, body
        self.response = None
        self.error = None

    def run(self) -> None:
        try:
            self.response = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self.body)
        except Exception as e:  # reported by the test
            self.error = e

    @property
    def status(self):
        return self.response["ResponseMetadata"]["HTTPStatusCode"] if self.response else None


def assert_domains_agree(d: Deployment) -> None:
    h = d.gateway.health()
    assert h["status"] == "ok", h
    assert d.vault.status()["last_seq"] == h["last_seq"]
    r = d.airlock("verify", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("size", [1000, 3 * 1024 * 1024], ids=["small", "3MiB-multichunk"])
def test_put_is_invisible_until_vault_acks(proxied, size):
    d, proxy = proxied
    s3 = d.gateway.client()
    s3.create_bucket(Bucket="held")
    s3.put_object(Bucket="held", Key="other", Body=b"already there")
    before = d.vault.status()["last_seq"]
    up_before = proxy.stats()["up"]
    body = os.urandom(size)

    proxy.command("hold down")
    put = PutThread(s3, "held", "obj", body)
    put.start()
    try:
        # the vault made the record durable; only its ACK is held in the proxy
        wait_until(lambda: d.vault.status()["last_seq"] > before, "the vault to append the record", timeout=WAIT_S, interval=0.02)
        assert d.vault.status()["last_seq"] == before + 1
        assert put.is_alive(), "the PUT was answered before the vault's ack"
        assert proxy.stats()["up"] - up_before >= size   # every chunk went over the link
        assert_invisible(s3, "held", "obj")
        # the primary log takes the record while the APPEND is on its way (both
        # domains sync at once); durable there, it still waits for the ACK
        wait_until(lambda: d.gateway.health()["last_seq"] == before + 1, "the primary log to take the record",
                   timeout=WAIT_S, interval=0.02)
        assert_invisible(s3, "held", "obj")
        assert s3.get_object(Bucket="held", Key="other")["Body"].read() == b"already there"
        assert put.is_alive()
    finally:
        proxy.command("release")
    put.join(WAIT_S)
    assert not put.is_alive()
    assert put.error is None, put.error
    assert put.status == 200

    assert s3.get_object(Bucket="held", Key="obj")["Body"].read() == body
    assert "obj" in [o["Key"] for o in s3.list_objects_v2(Bucket="held")["Contents"]]
    assert d.vault.status()["last_seq"] == before + 1
    assert_domains_agree(d)


def test_concurrent_puts_are_invisible_until_vault_acks(proxied):
    d, proxy = proxied
    s3 = d.gateway.client()
    s3.create_bucket(Bucket="many")
    before = d.vault.status()["last_seq"]
    stats_before = d.gateway.health()["replication_stats"]
    writers = 6

    proxy.command("hold down")
    puts = [PutThread(d.gateway.client(), "many", f"k{i}", f"body {i}".encode() * 100) for i in range(writers)]
    try:
        for p in puts:
            p.start()
        # the first batch reaches the vault; the others queue behind its held ack (window 1)
        wait_until(lambda: d.vault.status()["last_seq"] > before, "the vault to append the first batch", timeout=WAIT_S, interval=0.02)
        time.sleep(1.0)   # let every writer finish its upload and queue its record
        assert all(p.is_alive() for p in puts), "a PUT was answered before the vault's ack"
        listed = s3.list_objects_v2(Bucket="many").get("Contents", [])
        assert listed == []
        for p in puts:
            assert_invisible(s3, "many", p.key)
    finally:
        proxy.command("release")
    for p in puts:
        p.join(WAIT_S)
    assert [p.error for p in puts] == [None] * writers
    assert [p.status for p in puts] == [200] * writers

    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="many")["Contents"])
    assert keys == sorted(p.key for p in puts)
    for p in puts:
        assert s3.get_object(Bucket="many", Key=p.key)["Body"].read() == p.body
    assert d.vault.status()["last_seq"] == before + writers
    # group commit: the writers that queued behind the held ack shared a batch
    stats = d.gateway.health()["replication_stats"]
    records = stats["records"] - stats_before["records"]
    batches = stats["batches"] - stats_before["batches"]
    assert records == writers
    assert batches < records, stats
    assert_domains_agree(d)
