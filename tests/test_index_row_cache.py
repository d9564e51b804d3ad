"""The index keeps rows of small current objects in memory for GETs; every
committed change must be seen by the very next read (no stale object after
an overwrite, a delete, a version removal, a bucket's deletion)."""
from __future__ import annotations

import pytest
from botocore.exceptions import ClientError


def body(s3, bucket, key, **kw):
    return s3.get_object(Bucket=bucket, Key=key, **kw)["Body"].read()


def test_a_read_right_after_an_overwrite_sees_the_new_object(s3, bucket):
    for i in range(20):
        s3.put_object(Bucket=bucket, Key="k", Body=f"v{i}".encode())
        assert body(s3, bucket, "k") == f"v{i}".encode()
        assert s3.head_object(Bucket=bucket, Key="k")["ContentLength"] == len(f"v{i}")


def test_a_read_right_after_a_delete_is_404(s3, bucket):
    s3.put_object(Bucket=bucket, Key="gone", Body=b"x")
    assert body(s3, bucket, "gone") == b"x"
    s3.delete_object(Bucket=bucket, Key="gone")
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="gone")
    assert e.value.response["Error"]["Code"] == "NoSuchKey"


def test_removing_the_current_version_makes_the_previous_one_current_at_once(s3, bucket):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="v", Body=b"old")
    new = s3.put_object(Bucket=bucket, Key="v", Body=b"new")["VersionId"]
    assert body(s3, bucket, "v") == b"new"
    s3.delete_object(Bucket=bucket, Key="v", VersionId=new)
    assert body(s3, bucket, "v") == b"old"
    s3.delete_object(Bucket=bucket, Key="v")                       # a delete marker
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="v")
    assert e.value.response["Error"]["Code"] == "NoSuchKey"


def test_a_recreated_bucket_does_not_serve_the_old_buckets_objects(s3):
    s3.create_bucket(Bucket="again")
    s3.put_object(Bucket="again", Key="k", Body=b"first life")
    assert body(s3, "again", "k") == b"first life"
    s3.delete_object(Bucket="again", Key="k")
    s3.delete_bucket(Bucket="again")
    s3.create_bucket(Bucket="again")
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="again", Key="k")
    assert e.value.response["Error"]["Code"] == "NoSuchKey"


def test_a_read_only_view_drops_its_cached_rows_when_another_connection_commits(tmp_path):
    """A gateway worker reads the leader's index through its own read-only
    connection; its row and bucket caches must not outlive a commit made by
    the leader's connection (SQLite data_version)."""
    from airlock.log import payload as P
    from airlock.primary.index import Index
    from airlock.primary.model import Manifest, ObjectMeta

    path = str(tmp_path / "index.sqlite")
    writer = Index(path)
    reader = Index(path, readonly=True)

    def put(seq, text):
        m = Manifest(bucket="b", key="k", size=len(text), etag=f"e{seq}", mtime=float(seq),
                     meta=ObjectMeta(), chunks=[])
        writer.apply([(seq, P.OBJECT_PUT, m.to_json())])

    writer.apply([(1, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0})])
    assert reader.bucket("b") is not None and reader.versioning("b") == ""
    put(2, "one")
    assert reader.object("b", "k").etag == "e2"        # cached now
    put(3, "two")
    assert reader.object("b", "k").etag == "e3"
    writer.apply([(4, P.BUCKET_VERSIONING, {"bucket": "b", "status": "Enabled"})])
    assert reader.versioning("b") == "Enabled"
    writer.apply([(5, P.OBJECT_DELETE, {"bucket": "b", "key": "k", "mtime": 5.0})])
    assert reader.object("b", "k") is None
    with pytest.raises(Exception):
        reader.db.execute("INSERT INTO meta VALUES ('x', 'y')")   # it is read-only
    reader.close()
    writer.close()


def test_a_cached_small_object_reads_back_exactly_as_committed(tmp_path):
    """The cache keeps decoded manifests: a hit must equal what a fresh
    decode of the stored row gives (metadata, checksums, parts, version)."""
    from airlock.log import payload as P
    from airlock.primary.index import Index
    from airlock.primary.model import ChunkRef, Manifest, ObjectMeta

    idx = Index(str(tmp_path / "index.sqlite"))
    idx.apply([(1, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0})])
    m = Manifest(bucket="b", key="k", size=7, etag="abc-2", mtime=2.5,
                 meta=ObjectMeta(headers={"content-type": "text/plain"}, user={"a": "1"}, tagging="t=v"),
                 chunks=[ChunkRef("00" * 32, 3), ChunkRef("11" * 32, 4)],
                 checksums={"CRC32": "AAAAAA=="}, checksum_type="COMPOSITE", parts=[3, 4],
                 part_checksums=[{"CRC32": "AQ=="}, {"CRC32": "Ag=="}], version_id="v1")
    idx.apply([(2, P.OBJECT_PUT, m.to_json())])
    first, second = idx.object("b", "k"), idx.object("b", "k")     # a miss, then a hit
    assert second is first                                           # served from the cache
    assert first == m.replace(seq=2)
    idx.close()
    fresh = Index(str(tmp_path / "index.sqlite"))                    # nothing cached
    assert fresh.object("b", "k") == m.replace(seq=2)
    fresh.close()
