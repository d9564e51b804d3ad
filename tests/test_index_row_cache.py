"""The index keeps rows of small current objects in memory for GETs; every
committed change must be seen by the very next read (no stale object after
an overwrite, a delete, a version removal, a bucket's deletion)."""
from __future__ import annotations

import os

import pytest
from botocore.exceptions import ClientError


@pytest.fixture(scope="module")
def _gateway(tmp_path_factory):
    from conftest import Gateway
    g = Gateway(tmp_path_factory.mktemp("rowcache") / "primary").start()
    yield g
    g.stop()


@pytest.fixture
def s3(_gateway):
    """One gateway for the tests below, each in a bucket of its own."""
    return _gateway.client()


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


@pytest.mark.parametrize("told_by", ["generation page", "sqlite data_version"])
def test_a_read_only_view_drops_its_cached_rows_when_another_connection_commits(tmp_path, told_by):
    """A gateway worker reads the leader's index through its own read-only
    connection; its row and bucket caches must not outlive a commit made by
    the leader's connection (told by the index generation page the leader
    shares with its workers, or without one by SQLite's data_version)."""
    from airlock.log import payload as P
    from airlock.primary.generation import Generation
    from airlock.primary.index import Index
    from airlock.primary.model import Manifest, ObjectMeta

    path = str(tmp_path / "index.sqlite")
    writer = Index(path)
    if told_by == "generation page":
        writer.generation = page = Generation.create()
        reader = Index(path, readonly=True, generation=Generation.attach(os.dup(page.fd)))
    else:
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
    for idx in (reader, writer):
        if idx.generation is not None:
            idx.generation.close()


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


def test_a_workers_view_keeps_its_bucket_rows_while_only_objects_change(tmp_path):
    """With the generation page, an object-put drops a worker's cached
    manifests but not its bucket rows (they change only through bucket
    records), so a PUT-heavy load costs a worker no bucket query."""
    from airlock.log import payload as P
    from airlock.primary.generation import Generation
    from airlock.primary.index import Index
    from airlock.primary.model import Manifest, ObjectMeta

    path = str(tmp_path / "index.sqlite")
    writer = Index(path)
    writer.generation = page = Generation.create()
    reader = Index(path, readonly=True, generation=Generation.attach(os.dup(page.fd)))
    writer.apply([(1, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0})])
    assert reader.bucket("b").owner == "o"
    m = Manifest(bucket="b", key="k", size=1, etag="e", mtime=2.0, meta=ObjectMeta(), chunks=[])
    writer.apply([(2, P.OBJECT_PUT, m.to_json())])
    assert reader.object("b", "k").etag == "e"
    assert "b" in reader._bucket_rows                      # still cached after the object-put
    assert page.read() == (2, 1)
    writer.apply([(3, P.BUCKET_DELETE, {"bucket": "b"})])
    assert reader.bucket("b") is None and reader.object("b", "k") is None
    reader.close()
    writer.close()
    reader.generation.close()
    page.close()


def test_an_object_put_stored_from_its_payload_reads_back_as_if_encoded_again(tmp_path):
    """The leader hands the index each record's payload bytes along with the
    decoded dict, and an object-put's manifest is stored as that text; it
    must read back exactly as one stored from the dict (non-ASCII keys and
    metadata included)."""
    from airlock.log import payload as P
    from airlock.primary.index import Index
    from airlock.primary.model import ChunkRef, Manifest, ObjectMeta

    a, b = Index(str(tmp_path / "a.sqlite")), Index(str(tmp_path / "b.sqlite"))
    m = Manifest(bucket="b", key="clé/ü 1", size=3, etag="abc", mtime=2.5,
                 meta=ObjectMeta(headers={"content-type": "text/plain"}, user={"note": "grüße"}),
                 chunks=[ChunkRef("00" * 32, 3)], version_id="v1")
    payload = P.encode_payload(m.to_json())
    for idx in (a, b):
        idx.apply([(1, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0})])
    a.apply([(2, P.OBJECT_PUT, P.decode_payload(P.OBJECT_PUT, payload), payload)])
    b.apply([(2, P.OBJECT_PUT, m.to_json())])
    for idx in (a, b):
        assert idx.object("b", "clé/ü 1") == m.replace(seq=2)
        assert idx.version("b", "clé/ü 1", "v1").manifest == m.replace(seq=2)
        idx.close()


def test_a_payload_that_is_not_plain_utf8_json_is_stored_encoded_again(tmp_path):
    """json.loads takes a byte-order mark; the stored text must not carry one."""
    from airlock.log import payload as P
    from airlock.primary.index import Index
    from airlock.primary.model import Manifest, ObjectMeta

    idx = Index(str(tmp_path / "index.sqlite"))
    idx.apply([(1, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0})])
    m = Manifest(bucket="b", key="k", size=1, etag="e", mtime=2.0, meta=ObjectMeta(), chunks=[])
    payload = b"\xef\xbb\xbf" + P.encode_payload(m.to_json())
    idx.apply([(2, P.OBJECT_PUT, P.decode_payload(P.OBJECT_PUT, payload), payload)])
    idx._object_rows.clear()
    assert idx.object("b", "k") == m.replace(seq=2)
    idx.close()
