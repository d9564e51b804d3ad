"""Tagging: PutObjectTagging / GetObjectTagging / DeleteObjectTagging,
x-amz-tagging on writes, TagCount on reads, and bucket tagging -- against
moto, and through the whole replicated path (index rebuild, a primary
rebuilt from the vault, compaction, a snapshot restore).  Format:
docs/format/records.md, "Tags" and type 12.
"""
from __future__ import annotations

import json
import os

import pytest

from airlock.errors import FormatError
from airlock.log import payload as P
from airlock.primary.index import Index
from airlock.vault.catalog import VERSION_TAGGING_KIND, classify
from conftest import Deployment, Gateway
from test_differential import differential, new_bucket
from test_restore_incremental import wipe_primary


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("tagging") / "primary").start()
    yield g
    g.stop()


def tagset(*pairs):
    return {"TagSet": [{"Key": k, "Value": v} for k, v in pairs]}


# ---------------------------------------------------------------------------- S3 semantics
def sc_tagging(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_object", Bucket=b, Key="k", Body=b"x", Tagging="a=1&b=2")
    rec("get_object", "TagCount", Bucket=b, Key="k")
    rec("head_object", "TagCount", Bucket=b, Key="k")
    rec("get_object_tagging", "TagSet", "VersionId", Bucket=b, Key="k")
    rec("get_object_tagging", Bucket=b, Key="missing")                      # NoSuchKey
    rec("put_object_tagging", Bucket=b, Key="missing", Tagging=tagset())    # NoSuchKey
    rec("get_object_tagging", Bucket=b + "-missing", Key="k")               # NoSuchBucket
    # refused tag sets leave the old one
    rec("put_object_tagging", Bucket=b, Key="k", Tagging=tagset(*((f"k{i}", "v") for i in range(11))))
    rec("put_object_tagging", Bucket=b, Key="k", Tagging=tagset(("a" * 129, "v")))
    rec("put_object_tagging", Bucket=b, Key="k", Tagging=tagset(("a", "v" * 257)))
    rec("put_object_tagging", Bucket=b, Key="k", Tagging=tagset(("aws:x", "v")))
    rec("get_object_tagging", "TagSet", Bucket=b, Key="k")
    # a tag set is replaced whole, kept in the order given, spaces and = + / : @ . allowed
    rec("put_object_tagging", Bucket=b, Key="k", Tagging=tagset(("z", "1"), ("a b", "x=y+z/:@."), ("m", "")))
    rec("get_object_tagging", "TagSet", Bucket=b, Key="k")
    rec("get_object", "TagCount", "ETag", _body=True, Bucket=b, Key="k")
    rec("delete_object_tagging", Bucket=b, Key="k")
    rec("get_object_tagging", "TagSet", Bucket=b, Key="k")
    rec("get_object", "TagCount", Bucket=b, Key="k")
    # x-amz-tagging on PUT: validated the same way; a key without '=' has an empty value
    rec("put_object", Bucket=b, Key="h", Body=b"x", Tagging="&".join(f"k{i}=v" for i in range(11)))
    rec("put_object", Bucket=b, Key="h", Body=b"x", Tagging="solo&x=%2F%20y")
    rec("get_object_tagging", "TagSet", Bucket=b, Key="h")
    # copies take the source's tags unless the tagging directive says REPLACE
    rec("put_object", Bucket=b, Key="src", Body=b"source", Tagging="s=1")
    rec("copy_object", Bucket=b, Key="c1", CopySource=f"{b}/src")
    rec("get_object_tagging", "TagSet", Bucket=b, Key="c1")
    rec("copy_object", Bucket=b, Key="c2", CopySource=f"{b}/src", TaggingDirective="REPLACE", Tagging="r=2")
    rec("get_object_tagging", "TagSet", Bucket=b, Key="c2")
    rec("copy_object", Bucket=b, Key="c3", CopySource=f"{b}/src", TaggingDirective="REPLACE")
    rec("get_object_tagging", "TagSet", Bucket=b, Key="c3")
    rec("copy_object", Bucket=b, Key="c4", CopySource=f"{b}/src", MetadataDirective="REPLACE",
        Metadata={"m": "1"})
    rec("get_object_tagging", "TagSet", Bucket=b, Key="c4")
    # multipart: the tags given at CreateMultipartUpload
    up = rec("create_multipart_upload", Bucket=b, Key="mp", Tagging="m=1")
    part = rec("upload_part", Bucket=b, Key="mp", UploadId=up["UploadId"], PartNumber=1, Body=b"z")
    rec("complete_multipart_upload", Bucket=b, Key="mp", UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    rec("get_object_tagging", "TagSet", Bucket=b, Key="mp")
    rec("get_object_tagging", "TagSet", Bucket=b, Key="mp", VersionId="null")


def test_object_tagging_matches_moto(gw):
    differential(gw, sc_tagging, new_bucket())


def sc_versioned_tagging(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    v1 = rec("put_object", Bucket=b, Key="k", Body=b"1", Tagging="gen=1")["VersionId"]
    v2 = rec("put_object", Bucket=b, Key="k", Body=b"2")["VersionId"]
    rec.note("v2 is not v1", v1 != v2)
    rec("put_object_tagging", Bucket=b, Key="k", VersionId=v1, Tagging=tagset(("old", "yes")))
    rec("get_object_tagging", "TagSet", Bucket=b, Key="k", VersionId=v1)
    rec("get_object_tagging", "TagSet", Bucket=b, Key="k")
    rec("get_object", "TagCount", _body=True, Bucket=b, Key="k", VersionId=v1)
    rec("get_object_tagging", Bucket=b, Key="k", VersionId="A" * 32)             # NoSuchVersion
    rec("put_object_tagging", Bucket=b, Key="k", VersionId="A" * 32, Tagging=tagset())
    # an id no version could have is refused before any lookup
    malformed = "moto looks a malformed version id up (404 NoSuchVersion); S3 refuses it: 400 " \
                "InvalidArgument 'Invalid version id specified'"
    rec("get_object_tagging", Bucket=b, Key="k", VersionId="nonexistent")
    rec.moto_diverges(("get_object_tagging", 400, "InvalidArgument"), malformed)
    rec("put_object_tagging", Bucket=b, Key="k", VersionId="nonexistent", Tagging=tagset())
    rec.moto_diverges(("put_object_tagging", 400, "InvalidArgument"), malformed)
    # a tag change is not a version: still two versions, the same ids, v2 latest
    r = rec.client.list_object_versions(Bucket=b)
    rec.note("versions", [(v["VersionId"] == v2, v["IsLatest"], v["ETag"]) for v in r["Versions"]])
    dm = rec("delete_object", Bucket=b, Key="k")["VersionId"]
    rec("get_object_tagging", Bucket=b, Key="k")                                 # NoSuchKey
    rec("put_object_tagging", Bucket=b, Key="k", VersionId=dm, Tagging=tagset())  # 405: a delete marker
    rec("delete_object_tagging", Bucket=b, Key="k", VersionId=v1)
    rec("get_object_tagging", "TagSet", Bucket=b, Key="k", VersionId=v1)


def test_versioned_object_tagging_matches_moto(gw):
    differential(gw, sc_versioned_tagging, new_bucket())


def test_tagging_answers_carry_the_version_id_in_versioned_buckets_only(gw):
    s3 = gw.client()
    s3.create_bucket(Bucket="tag-plain")
    s3.put_object(Bucket="tag-plain", Key="k", Body=b"x")
    r = s3.put_object_tagging(Bucket="tag-plain", Key="k", Tagging=tagset(("a", "1")))
    assert "VersionId" not in r
    s3.create_bucket(Bucket="tag-versioned")
    s3.put_bucket_versioning(Bucket="tag-versioned", VersioningConfiguration={"Status": "Enabled"})
    vid = s3.put_object(Bucket="tag-versioned", Key="k", Body=b"x")["VersionId"]
    assert s3.put_object_tagging(Bucket="tag-versioned", Key="k", Tagging=tagset(("a", "1")))["VersionId"] == vid
    assert s3.get_object_tagging(Bucket="tag-versioned", Key="k")["VersionId"] == vid
    assert s3.delete_object_tagging(Bucket="tag-versioned", Key="k")["VersionId"] == vid
    # the tag change moved nothing else: same ETag, same Last-Modified
    h1 = s3.head_object(Bucket="tag-versioned", Key="k")
    s3.put_object_tagging(Bucket="tag-versioned", Key="k", Tagging=tagset(("b", "2")))
    h2 = s3.head_object(Bucket="tag-versioned", Key="k")
    assert (h1["ETag"], h1["LastModified"], h1["VersionId"]) == (h2["ETag"], h2["LastModified"], h2["VersionId"])
    assert h2["TagCount"] == 1 and "TagCount" not in h1
    # a delete marker named by version id: 405, naming the request's method
    from botocore.exceptions import ClientError
    dm = s3.delete_object(Bucket="tag-versioned", Key="k")["VersionId"]
    for call, method in ((s3.delete_object_tagging, "DELETE"), (s3.get_object_tagging, "GET")):
        with pytest.raises(ClientError) as e:
            call(Bucket="tag-versioned", Key="k", VersionId=dm)
        assert (e.value.response["Error"]["Code"], e.value.response["Error"].get("Method")) == \
            ("MethodNotAllowed", method)


def test_a_tag_set_with_a_key_twice_is_refused(gw):
    """S3 answers InvalidTag "Cannot provide multiple Tags with the same key";
    moto keeps the last of them, so this is not a differential case."""
    from botocore.exceptions import ClientError
    s3 = gw.client()
    s3.create_bucket(Bucket="tag-dup")
    s3.put_object(Bucket="tag-dup", Key="k", Body=b"x", Tagging="a=1")
    for call in (lambda: s3.put_object_tagging(Bucket="tag-dup", Key="k", Tagging=tagset(("a", "1"), ("a", "2"))),
                 lambda: s3.put_object(Bucket="tag-dup", Key="k", Body=b"y", Tagging="a=1&a=2")):
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["Error"]["Code"] == "InvalidTag"
    assert s3.get_object(Bucket="tag-dup", Key="k")["Body"].read() == b"x"
    assert _tags(s3, "tag-dup", "k") == [("a", "1")]


@pytest.mark.parametrize("body, code", [
    (b"<Tagging><TagSet><Tag><Key>a</Key></Tag></TagSet></Tagging>", "MalformedXML"),
    (b"<Tagging></Tagging>", "MalformedXML"),
    (b"<Tagging><TagSet>", "MalformedXML"),
    (b"<Nope/>", "MalformedXML"),
    (b"<Tagging><TagSet><Tag><Key>a\x07</Key><Value>v</Value></Tag></TagSet></Tagging>", "MalformedXML"),
    (b"<Tagging><TagSet><Tag><Key>a</Key><Value>semi;colon</Value></Tag></TagSet></Tagging>", "InvalidTag"),
])
def test_bad_tagging_bodies_are_refused_and_keep_the_old_tags(gw, body, code):
    import urllib.request

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from conftest import ACCESS_KEY, REGION, SECRET_KEY
    s3 = gw.client()
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    s3.put_object(Bucket=b, Key="k", Body=b"x", Tagging="keep=1")
    url = f"{gw.endpoint}/{b}/k?tagging"
    req = AWSRequest(method="PUT", url=url, data=body)
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(req)
    prepared = urllib.request.Request(url, data=body, method="PUT", headers=dict(req.headers))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(prepared, timeout=10)
    assert e.value.code == 400
    assert f"<Code>{code}</Code>" in e.value.read().decode()
    assert _tags(s3, b, "k") == [("keep", "1")]


def sc_bucket_tagging(rec, b):
    rec("create_bucket", Bucket=b)
    rec("get_bucket_tagging", Bucket=b)                                    # NoSuchTagSet
    rec("put_bucket_tagging", Bucket=b, Tagging=tagset(("team", "ops"), ("cost centre", "4/2")))
    rec("get_bucket_tagging", "TagSet", Bucket=b)
    rec("put_bucket_tagging", Bucket=b, Tagging=tagset(("a", "1"), ("a", "2")))     # InvalidTag
    rec("put_bucket_tagging", Bucket=b, Tagging=tagset(("aws:x", "1")))             # InvalidTag
    rec("put_bucket_tagging", Bucket=b, Tagging=tagset(*((f"k{i}", "v") for i in range(50))))
    rec("get_bucket_tagging", "length(TagSet)", Bucket=b)
    rec("put_bucket_tagging", Bucket=b, Tagging=tagset())                  # an empty set: none
    rec("get_bucket_tagging", Bucket=b)
    rec("put_bucket_tagging", Bucket=b, Tagging=tagset(("x", "y")))
    rec("delete_bucket_tagging", Bucket=b)
    rec("get_bucket_tagging", Bucket=b)
    rec("delete_bucket_tagging", Bucket=b)                                 # nothing to delete: still 204
    rec("get_bucket_tagging", Bucket=b + "-missing")                       # NoSuchBucket
    rec("put_bucket_tagging", Bucket=b + "-missing", Tagging=tagset(("x", "y")))
    # a deleted and re-created bucket starts without tags
    rec("put_bucket_tagging", Bucket=b, Tagging=tagset(("x", "y")))
    rec("delete_bucket", Bucket=b)
    rec("create_bucket", Bucket=b)
    rec("get_bucket_tagging", Bucket=b)
    rec.moto_diverges(("get_bucket_tagging", 404, "NoSuchTagSet"),
                      "moto keeps a deleted bucket's tags for a new bucket of the same name; a new "
                      "S3 bucket has no tag set")


def test_bucket_tagging_matches_moto(gw):
    differential(gw, sc_bucket_tagging, new_bucket())


def test_more_than_50_bucket_tags_are_refused(gw):
    """S3 allows 50 user tags on a bucket; moto takes 51, so this is checked
    on its own."""
    from botocore.exceptions import ClientError
    s3 = gw.client()
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    s3.put_bucket_tagging(Bucket=b, Tagging=tagset(("keep", "1")))
    with pytest.raises(ClientError) as e:
        s3.put_bucket_tagging(Bucket=b, Tagging=tagset(*((f"k{i}", "v") for i in range(51))))
    assert e.value.response["Error"]["Code"] == "InvalidTag"
    assert s3.get_bucket_tagging(Bucket=b)["TagSet"] == [{"Key": "keep", "Value": "1"}]


# ---------------------------------------------------------------------------- records
def _manifest(bucket, key, vid, tagging):
    return {"bucket": bucket, "key": key, "size": 1, "etag": "e", "mtime": 1.0, "version_id": vid,
            "meta": {"headers": {}, "user": {}, "storage_class": "STANDARD", "tagging": tagging},
            "chunks": [["ab" * 32, 1]]}


def test_the_vault_reads_a_retag_of_the_latest_version_as_a_put_and_of_an_older_one_as_neutral():
    m = _manifest("b", "k", "v1", "a=1")
    body = {"bucket": "b", "key": "k", "version_id": "v1", "was_latest": True, "manifest": m}
    e = classify(7, P.OBJECT_TAGGING, P.encode_payload(body))
    assert (e.kind, e.bucket, e.key, e.manifest, e.chunks) == ("put", "b", "k", m, ("ab" * 32,))
    body["was_latest"] = False
    e = classify(8, P.OBJECT_TAGGING, P.encode_payload(body))
    assert (e.kind, e.bucket, e.key, e.manifest, e.chunks) == (VERSION_TAGGING_KIND, "b", "k", None, ())
    for was_latest in (True, False):
        for wrong in (_manifest("b", "other", "v1", None), _manifest("b", "k", "v2", None), "text"):
            body.update(was_latest=was_latest, manifest=wrong)
            with pytest.raises(FormatError, match="not the manifest of the version it names"):
                classify(9, P.OBJECT_TAGGING, P.encode_payload(body))


def test_a_retag_sets_only_tags_and_changes_nothing_once_its_version_is_gone(tmp_path):
    idx = Index(str(tmp_path / "index.sqlite"))
    idx.apply([(1, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0})])
    idx.apply([(2, P.OBJECT_PUT, _manifest("b", "k", "v1", None)),
               (3, P.OBJECT_PUT, _manifest("b", "k", "v2", None))])
    retag_v1 = {"bucket": "b", "key": "k", "version_id": "v1", "was_latest": False,
                "manifest": _manifest("b", "k", "v1", "x=1")}
    idx.apply([(4, P.OBJECT_TAGGING, retag_v1)])
    assert idx.version("b", "k", "v1").manifest.meta.tagging == "x=1"
    assert idx.object("b", "k").meta.tagging is None and idx.object("b", "k").seq == 3
    idx.apply([(5, P.OBJECT_DELETE, {"bucket": "b", "key": "k", "mtime": 2.0, "version_id": "v1",
                                     "was_latest": False, "restores": None}),
               (6, P.OBJECT_TAGGING, retag_v1)])
    assert idx.version("b", "k", "v1") is None
    # only the tags are taken: a record whose manifest says other content changes none of it
    forged = dict(_manifest("b", "k", "v2", "y=2"), size=99, etag="forged", chunks=[["cd" * 32, 99]])
    idx.apply([(7, P.OBJECT_TAGGING, {"bucket": "b", "key": "k", "version_id": "v2", "was_latest": True,
                                      "manifest": forged})])
    cur = idx.object("b", "k")
    assert (cur.meta.tagging, cur.seq, cur.version_id, cur.size, cur.etag) == ("y=2", 3, "v2", 1, "e")
    assert [c.digest for c in cur.chunks] == ["ab" * 32]


# ---------------------------------------------------------------------------- replicated
def _tags(s3, bucket, key, **kw):
    return [(t["Key"], t["Value"]) for t in s3.get_object_tagging(Bucket=bucket, Key=key, **kw)["TagSet"]]


def test_tags_survive_index_rebuild_primary_loss_compaction_and_come_back_from_a_snapshot(tmp_path):
    dep = Deployment(tmp_path / "deploy").start()
    try:
        s3 = dep.gateway.client()
        s3.create_bucket(Bucket="tagged")
        s3.put_bucket_versioning(Bucket="tagged", VersioningConfiguration={"Status": "Enabled"})
        v1 = s3.put_object(Bucket="tagged", Key="doc", Body=b"first", Tagging="stage=draft")["VersionId"]
        v2 = s3.put_object(Bucket="tagged", Key="doc", Body=os.urandom(300_000), Tagging="stage=final")["VersionId"]
        s3.put_object_tagging(Bucket="tagged", Key="doc", VersionId=v1, Tagging=tagset(("stage", "superseded")))
        s3.put_object(Bucket="tagged", Key="plain", Body=b"no tags yet")
        s3.put_object_tagging(Bucket="tagged", Key="plain", Tagging=tagset(("owner", "ops"), ("tier", "cold")))
        s3.put_bucket_tagging(Bucket="tagged", Tagging=tagset(("project", "airlock")))
        snap = json.loads(dep.airlock("snapshot", "create", "--name", "tags-then", "--json").stdout)
        assert snap["name"] == "tags-then"
        # after the snapshot: the current objects' tags change again
        s3.put_object_tagging(Bucket="tagged", Key="doc", Tagging=tagset(("stage", "tampered")))
        s3.delete_object_tagging(Bucket="tagged", Key="plain")

        def state():
            s3 = dep.gateway.client()
            return (_tags(s3, "tagged", "doc"), _tags(s3, "tagged", "doc", VersionId=v1),
                    _tags(s3, "tagged", "doc", VersionId=v2), _tags(s3, "tagged", "plain"),
                    s3.get_bucket_tagging(Bucket="tagged")["TagSet"])
        now = ([("stage", "tampered")], [("stage", "superseded")], [("stage", "tampered")], [],
               [{"Key": "project", "Value": "airlock"}])
        assert state() == now
        dep.airlock("verify")

        # the index rebuilt from the log
        dep.gateway.stop()
        primary = dep.root / "primary"
        for suffix in ("", "-wal", "-shm"):
            if (primary / f"index.sqlite{suffix}").exists():
                (primary / f"index.sqlite{suffix}").unlink()
        dep.start_gateway()
        assert state() == now

        # the primary lost: rebuilt from the vault's log
        dep.gateway.stop()
        wipe_primary(primary)
        dep.airlock("restore")
        dep.start_gateway()
        assert state() == now

        # the vault merges its overlays into the base: the current state (tags included) is unchanged
        dep.airlock("compact", "--keep", "0")
        dep.airlock("verify")

        # the snapshot brings back the tags the current objects had then (as new versions)
        dep.gateway.stop()
        dep.airlock("restore", "--snapshot", "tags-then", "--bucket", "tagged")
        dep.start_gateway()
        s3 = dep.gateway.client()
        assert _tags(s3, "tagged", "doc") == [("stage", "final")]
        assert _tags(s3, "tagged", "plain") == [("owner", "ops"), ("tier", "cold")]
        assert s3.get_object(Bucket="tagged", Key="plain")["Body"].read() == b"no tags yet"
        dep.airlock("verify")
    finally:
        dep.stop()


def test_verify_reports_tags_that_differ_between_the_domains(deployment):
    """`airlock verify` compares metadata too: a re-tag the primary's log
    holds and the vault lacks (written here behind the gateway's back, as a
    primary ahead of its vault) is a difference, not "equal"."""
    from airlock.log.writer import LogWriter
    s3 = deployment.gateway.client()
    s3.create_bucket(Bucket="meta")
    s3.put_object(Bucket="meta", Key="k", Body=b"x", Tagging="a=1")
    deployment.airlock("verify")
    deployment.gateway.stop()
    cur = Index(str(deployment.root / "primary" / "index.sqlite")).object("meta", "k").to_json()
    cur["meta"]["tagging"] = "a=2"
    w = LogWriter(deployment.root / "primary" / "log").open()
    w.append_sync(P.OBJECT_TAGGING, P.encode_payload({"bucket": "meta", "key": "k", "version_id": "null",
                                                      "was_latest": True, "manifest": cur}))
    w.close()
    r = deployment.airlock("verify", check=False)
    assert r.returncode != 0
    assert "object meta/k: metadata differs (tagging: primary 'a=2', vault 'a=1')" in r.stdout + r.stderr, r.stdout
