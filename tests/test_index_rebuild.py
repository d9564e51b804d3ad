"""The metadata index is derived state: the log is the truth.

Whatever happens to `index.sqlite*` while the gateway is stopped (deleted,
overwritten with garbage, replaced by an older copy), the next start rebuilds
or catches it up from the log and clients see exactly what they saw before.
"""
from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

from test_durability import PART, content_for, multipart_put, snapshot

INDEX_NAME = "index.sqlite"


def index_files(data: Path) -> list[Path]:
    return sorted(data.glob(INDEX_NAME + "*"))


def populate(s3) -> None:
    """Buckets, small/multi-chunk/multipart objects, metadata, overwrites, deletes."""
    s3.create_bucket(Bucket="docs")
    s3.create_bucket(Bucket="media")
    s3.create_bucket(Bucket="scratch")
    for i in range(30):
        key = f"dir{i % 3}/file-{i:02d}"
        s3.put_object(Bucket="docs", Key=key, Body=content_for(key, 100 + i * 37),
                      Metadata={"n": str(i)}, ContentType="text/plain")
    s3.put_object(Bucket="media", Key="big", Body=content_for("big", 3 * 1024 * 1024 + 5))
    multipart_put(s3, "media", "mp", content_for("mp", PART + 4096), Metadata={"kind": "mp"})
    s3.put_object(Bucket="docs", Key="dir0/file-00", Body=b"overwritten")
    for i in range(0, 30, 7):
        s3.delete_object(Bucket="docs", Key=f"dir{i % 3}/file-{i:02d}")
    s3.delete_bucket(Bucket="scratch")


def test_deleted_index_is_rebuilt_from_the_log(gateway):
    s3 = gateway.client()
    populate(s3)
    before = snapshot(s3)
    assert gateway.stop() == 0
    files = index_files(gateway.data)
    assert files, "the gateway keeps no index file where expected"
    for f in files:
        f.unlink()
    gateway.start()
    s3 = gateway.client()
    assert snapshot(s3) == before
    s3.put_object(Bucket="docs", Key="after-rebuild", Body=b"ok")
    assert gateway.stop() == 0
    gateway.start()
    assert gateway.client().get_object(Bucket="docs", Key="after-rebuild")["Body"].read() == b"ok"


def test_garbage_index_is_rebuilt_from_the_log(gateway):
    s3 = gateway.client()
    populate(s3)
    before = snapshot(s3)
    assert gateway.stop() == 0
    main = gateway.data / INDEX_NAME
    size = max(main.stat().st_size, 8192)
    main.write_bytes(random.Random(1).randbytes(size))
    for f in index_files(gateway.data):
        if f != main:
            f.unlink()
    gateway.start()
    s3 = gateway.client()
    assert snapshot(s3) == before
    assert "rebuild" in gateway.log_text().lower()


def test_index_damaged_past_its_header_is_rebuilt_from_the_log(gateway):
    """The SQLite header and the meta table can be intact while the pages of
    the objects table are garbage; opening succeeds, queries would fail."""
    s3 = gateway.client()
    populate(s3)
    before = snapshot(s3)
    assert gateway.stop() == 0
    main = gateway.data / INDEX_NAME
    raw = bytearray(main.read_bytes())
    page = int.from_bytes(raw[16:18], "big") or 65536
    assert len(raw) >= 3 * page, "index too small to damage past its first pages"
    rng = random.Random(2)
    for p in range(2, len(raw) // page):
        raw[p * page:(p + 1) * page] = rng.randbytes(page)
    main.write_bytes(bytes(raw))
    gateway.start()
    assert snapshot(gateway.client()) == before


def test_index_behind_the_log_is_caught_up_by_replay(gateway, tmp_path):
    s3 = gateway.client()
    populate(s3)
    assert gateway.stop() == 0
    aside = tmp_path / "index-aside"
    aside.mkdir()
    for f in index_files(gateway.data):
        shutil.copy2(f, aside / f.name)

    gateway.start()
    s3 = gateway.client()
    # more of every kind of change after the copy
    s3.create_bucket(Bucket="later")
    s3.put_object(Bucket="later", Key="x", Body=b"x" * 5000, Metadata={"late": "yes"})
    s3.put_object(Bucket="docs", Key="dir1/file-01", Body=b"changed later")
    s3.delete_object(Bucket="docs", Key="dir2/file-02")
    multipart_put(s3, "media", "mp2", content_for("mp2", PART + 1))
    pending = s3.create_multipart_upload(Bucket="media", Key="open")
    s3.upload_part(Bucket="media", Key="open", UploadId=pending["UploadId"], PartNumber=1, Body=b"p" * 10)
    s3.delete_object(Bucket="media", Key="big")
    before = snapshot(s3)
    assert gateway.stop() == 0

    for f in index_files(gateway.data):
        f.unlink()
    for f in aside.iterdir():
        shutil.copy2(f, gateway.data / f.name)
    gateway.start()
    s3 = gateway.client()
    after = snapshot(s3)
    assert after == before
    assert after["docs"]["objects"]["dir1/file-01"]["sha256"] == hashlib.sha256(b"changed later").hexdigest()
    ups = s3.list_multipart_uploads(Bucket="media").get("Uploads", [])
    assert [u["UploadId"] for u in ups] == [pending["UploadId"]]
    # the replayed index keeps advancing: one more write, one more restart
    s3.put_object(Bucket="later", Key="y", Body=b"y")
    assert gateway.stop() == 0
    gateway.start()
    assert gateway.client().get_object(Bucket="later", Key="y")["Body"].read() == b"y"


def test_records_the_index_holds_already_are_not_applied_again(tmp_path):
    """An index handed a record at or below its `applied_seq` (degraded mode
    swaps in an index built from the vault's log while records of the
    primary log, which it holds already, are still being applied) keeps the
    newer state: the key's current version does not go back."""
    from airlock.log import payload as P
    from airlock.primary.index import Index
    from airlock.primary.model import Manifest, ObjectMeta

    def put(seq):
        return (seq, P.OBJECT_PUT, Manifest(bucket="b", key="k", size=1, etag=f"e{seq}", mtime=float(seq),
                                            meta=ObjectMeta(), chunks=[]).to_json())

    idx = Index(str(tmp_path / INDEX_NAME))
    idx.apply([(1, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0}), put(2), put(3)])
    idx.apply([put(2)])                       # late, and held already
    assert idx.object("b", "k").etag == "e3" and idx.applied_seq() == 3
    idx.apply([put(3), put(4)])               # the overlap is skipped, the rest applied
    assert idx.object("b", "k").etag == "e4" and idx.applied_seq() == 4
    idx.close()
    reopened = Index(str(tmp_path / INDEX_NAME))
    assert reopened.object("b", "k").etag == "e4" and reopened.applied_seq() == 4
    reopened.close()
