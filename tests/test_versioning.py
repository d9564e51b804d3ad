"""S3 versioning on the gateway, differential against moto (the oracle), plus
durability (restart, index rebuild) and the vault side (every version of an
overwritten object in an unversioned bucket stays readable over the link).

Version ids are random on both sides, so the recorder replaces every version
id it sees with a label in first-seen order ("v0", "v1", ...; "null" stays):
the same scenario then gives the same labels on moto and on airlock.

Where moto and S3 disagree, S3's documented behaviour wins; each case is a
named `moto_diverges` with its reason (as in test_differential.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os

import jmespath
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from conftest import Deployment, Gateway
from test_differential import Recorder, moto_client, new_bucket

VID_KEYS = ("VersionId", "DeleteMarkerVersionId", "NextVersionIdMarker", "VersionIdMarker",
            "CopySourceVersionId")


class VRecorder(Recorder):
    """A Recorder that labels version ids and records the delete-marker
    headers of error responses."""

    def __init__(self, client, side):
        super().__init__(client, side)
        self.labels: dict[str, str] = {"null": "null"}

    def _register(self, obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in VID_KEYS and isinstance(v, str) and v not in self.labels:
                    self.labels[v] = f"v{len(self.labels) - 1}"
                self._register(v)
        elif isinstance(obj, list):
            for v in obj:
                self._register(v)

    def label(self, obj):
        if isinstance(obj, str):
            return self.labels.get(obj, obj)
        if isinstance(obj, dict):
            return {k: self.label(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.label(v) for v in obj)
        return obj

    def __call__(self, op, *fields, _body=False, **params):
        try:
            r = getattr(self.client, op)(**params)
        except ClientError as e:
            h = e.response["ResponseMetadata"]["HTTPHeaders"]
            vid = h.get("x-amz-version-id")
            if vid is not None:
                self._register({"VersionId": vid})
            self.log.append((op, e.response["ResponseMetadata"]["HTTPStatusCode"],
                             e.response["Error"].get("Code"), h.get("x-amz-delete-marker"),
                             self.label(vid)))
            return None
        self._register(r)
        obs = {"status": r["ResponseMetadata"]["HTTPStatusCode"]}
        for f in fields:
            obs[f] = self.label(jmespath.search(f, r))
        if _body:
            obs["Body"] = r["Body"].read()
        self.log.append((op, obs))
        return r

    def note(self, label, value):
        self.log.append((label, self.label(value)))


def run_moto(scenario, *args):
    with mock_aws():
        rec = VRecorder(moto_client(), "moto")
        scenario(rec, *args)
    return rec.log


def differential(gw: Gateway, scenario, *args):
    expected = run_moto(scenario, *args)
    rec = VRecorder(gw.client(), "airlock")
    scenario(rec, *args)
    actual = rec.log
    assert len(actual) == len(expected), (actual, expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a == e, f"step {i}: airlock {a!r} != moto {e!r}"
    return actual


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("versioning") / "primary").start()
    yield g
    g.stop()


def versions_page(rec, b, **params):
    """ListObjectVersions, normalised: every entry as (kind, key, version, latest, etag/size)."""
    r = rec.client.list_object_versions(Bucket=b, **params)
    rec._register(r)
    # boto3 parses Versions and DeleteMarkers into two lists (each in S3's
    # order: key, then newest first); both are compared in order
    return r, {"versions": [(v["Key"], v["VersionId"], v["IsLatest"], v["ETag"], v["Size"], "Owner" in v)
                            for v in r.get("Versions", [])],
               "markers": [(d["Key"], d["VersionId"], d["IsLatest"], "Owner" in d)
                           for d in r.get("DeleteMarkers", [])],
               "prefixes": [p["Prefix"] for p in r.get("CommonPrefixes", [])],
               "truncated": r["IsTruncated"], "next_key": r.get("NextKeyMarker"),
               "next_vid": r.get("NextVersionIdMarker")}


def all_versions(rec, b, **params) -> list:
    """Follow ListObjectVersions to the end; record every page."""
    pages = []
    kw = dict(params)
    while True:
        r, page = versions_page(rec, b, **kw)
        pages.append(page)
        if not r["IsTruncated"]:
            break
        kw["KeyMarker"] = r["NextKeyMarker"]
        if r.get("NextVersionIdMarker"):
            kw["VersionIdMarker"] = r["NextVersionIdMarker"]
        else:
            kw.pop("VersionIdMarker", None)
        assert len(pages) < 200
    rec.note("pages", pages)
    return pages


# ---------------------------------------------------------------------------- scenarios
def sc_versioning_config(rec, b):
    rec("create_bucket", Bucket=b)
    rec("get_bucket_versioning", "Status", Bucket=b)          # never enabled: empty
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    rec("get_bucket_versioning", "Status", Bucket=b)
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Suspended"})
    rec("get_bucket_versioning", "Status", Bucket=b)
    rec("get_bucket_versioning", "Status", Bucket=b + "-missing")
    rec("put_bucket_versioning", Bucket=b + "-missing", VersioningConfiguration={"Status": "Enabled"})


def test_versioning_configuration_matches_moto(gw):
    differential(gw, sc_versioning_config, new_bucket())


def sc_overwrite_and_delete(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    v1 = rec("put_object", "VersionId", Bucket=b, Key="k", Body=b"one")["VersionId"]
    v2 = rec("put_object", "VersionId", Bucket=b, Key="k", Body=b"two")["VersionId"]
    rec("get_object", "VersionId", "ETag", _body=True, Bucket=b, Key="k")
    rec("get_object", "VersionId", _body=True, Bucket=b, Key="k", VersionId=v1)
    rec("head_object", "VersionId", "ContentLength", Bucket=b, Key="k", VersionId=v1)
    rec("get_object", Bucket=b, Key="k", VersionId="A" * 32)          # NoSuchVersion
    all_versions(rec, b)
    # a delete without a version id adds a delete marker
    dm = rec("delete_object", "DeleteMarker", "VersionId", Bucket=b, Key="k")["VersionId"]
    rec("get_object", Bucket=b, Key="k")
    rec.moto_diverges(("get_object", 404, "NoSuchKey", "true", rec.label(dm)),
                      "moto leaves out x-amz-delete-marker/x-amz-version-id on a GET 404; S3 sends them "
                      "(GetObject docs: 'If the current version of the object is a delete marker, Amazon "
                      "S3 behaves as if the object was deleted and includes x-amz-delete-marker: true')")
    rec("head_object", Bucket=b, Key="k")
    rec("get_object", Bucket=b, Key="k", VersionId=dm)
    rec.moto_diverges(("get_object", 405, "MethodNotAllowed", "true", rec.label(dm)),
                      "moto answers 404 NoSuchVersion; S3 answers 405 MethodNotAllowed for a GET of a "
                      "delete marker by version id (GetObject docs)")
    rec("head_object", Bucket=b, Key="k", VersionId=dm)              # 405, no body
    rec("get_object", "VersionId", _body=True, Bucket=b, Key="k", VersionId=v2)
    rec("list_objects_v2", "KeyCount", Bucket=b)
    all_versions(rec, b)
    # removing the delete marker by version id brings the object back
    rec("delete_object", "DeleteMarker", "VersionId", Bucket=b, Key="k", VersionId=dm)
    rec.moto_diverges(("delete_object", {"status": 204, "DeleteMarker": True, "VersionId": rec.label(dm)}),
                      "moto leaves out x-amz-delete-marker when a delete marker is removed by version id; "
                      "S3 sends it (DeleteObject docs: 'x-amz-delete-marker: Indicates whether the "
                      "specified object version that was permanently deleted was (true) or was not "
                      "(false) a delete marker')")
    rec("get_object", "VersionId", _body=True, Bucket=b, Key="k")
    # removing the latest version makes the previous one current
    rec("delete_object", "VersionId", Bucket=b, Key="k", VersionId=v2)
    rec("get_object", "VersionId", _body=True, Bucket=b, Key="k")
    rec("delete_object", "VersionId", Bucket=b, Key="k", VersionId="A" * 32)   # 204 all the same
    all_versions(rec, b)
    rec("delete_bucket", Bucket=b)                                   # BucketNotEmpty
    rec("delete_object", Bucket=b, Key="k", VersionId=v1)
    all_versions(rec, b)
    rec("delete_object", "DeleteMarker", Bucket=b, Key="gone")       # a marker on a key never written
    rec.moto_diverges(("delete_object", {"status": 204, "DeleteMarker": True}),
                      "moto adds no delete marker for a key that has no version; S3 adds one whenever "
                      "a versioning-enabled bucket gets a DELETE without a version id (DeleteObject "
                      "docs, 'Deleting objects from versioning-enabled buckets')")
    rec("delete_bucket", Bucket=b)                                   # the marker still counts
    rec.moto_diverges(("delete_bucket", 409, "BucketNotEmpty", None, None),
                      "follows from the marker moto did not add: S3 refuses to delete a bucket that "
                      "still holds a delete marker (DeleteBucket docs: all versions and delete markers "
                      "must be deleted first)")


def test_overwrite_delete_and_delete_marker_removal_match_moto(gw):
    differential(gw, sc_overwrite_and_delete, new_bucket())


def _etag(body: bytes) -> str:
    return '"' + hashlib.md5(body).hexdigest() + '"'


MOTO_SUSPENDED = ("moto's suspended buckets keep only the newest version of a key: a PUT or a "
                  "DELETE there drops every older version; S3 replaces only the null version and "
                  "keeps the others (S3 User Guide, 'Working with objects in a versioning-suspended "
                  "bucket')")


def sc_suspended(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_object", Bucket=b, Key="k", Body=b"before")             # the null version
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    v1 = rec("put_object", "VersionId", Bucket=b, Key="k", Body=b"enabled")["VersionId"]
    rec("get_object", "ETag", _body=True, Bucket=b, Key="k", VersionId="null")
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Suspended"})
    rec("put_object", "VersionId", Bucket=b, Key="k", Body=b"suspended")   # replaces the null version
    rec("get_object", _body=True, Bucket=b, Key="k")
    rec("get_object", _body=True, Bucket=b, Key="k", VersionId="null")
    rec("get_object", _body=True, Bucket=b, Key="k", VersionId=v1)         # older versions kept
    rec.moto_diverges(("get_object", {"status": 200, "Body": b"enabled"}), MOTO_SUSPENDED)
    all_versions(rec, b)
    page = {"versions": [("k", "null", True, _etag(b"suspended"), 9, True),
                         ("k", "v0", False, _etag(b"enabled"), 7, True)],
            "markers": [], "prefixes": [], "truncated": False, "next_key": None, "next_vid": None}
    rec.moto_diverges(("pages", [page]), MOTO_SUSPENDED)
    rec("delete_object", "DeleteMarker", "VersionId", Bucket=b, Key="k")  # a null delete marker
    rec.moto_diverges(("delete_object", {"status": 204, "DeleteMarker": True, "VersionId": "null"}),
                      "moto sends no headers; S3 answers x-amz-delete-marker: true and "
                      "x-amz-version-id: null for a delete in a suspended bucket (DeleteObject docs, "
                      "'Deleting objects from versioning-suspended buckets')")
    rec("get_object", Bucket=b, Key="k")
    rec.moto_diverges(("get_object", 404, "NoSuchKey", "true", "null"),
                      "moto leaves out the delete-marker headers on a GET 404 (GetObject docs)")
    all_versions(rec, b)
    page = {"versions": [("k", "v0", False, _etag(b"enabled"), 7, True)],
            "markers": [("k", "null", True, True)], "prefixes": [], "truncated": False,
            "next_key": None, "next_vid": None}
    rec.moto_diverges(("pages", [page]), MOTO_SUSPENDED + "; moto lists no delete marker here either")
    rec("delete_object", "DeleteMarker", "VersionId", Bucket=b, Key="k", VersionId="null")
    rec.moto_diverges(("delete_object", {"status": 204, "DeleteMarker": True, "VersionId": "null"}),
                      "moto sends no headers when the null delete marker is removed; S3 sends "
                      "x-amz-version-id and x-amz-delete-marker: true (DeleteObject docs)")
    rec("get_object", _body=True, Bucket=b, Key="k")                  # v1 is current again
    rec.moto_diverges(("get_object", {"status": 200, "Body": b"enabled"}), MOTO_SUSPENDED)


def test_suspended_bucket_matches_moto(gw):
    differential(gw, sc_suspended, new_bucket())


def sc_copy_from_version(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    v1 = rec("put_object", Bucket=b, Key="src", Body=b"first body")["VersionId"]
    rec("put_object", Bucket=b, Key="src", Body=b"second body")
    rec("copy_object", "VersionId", "CopySourceVersionId", "CopyObjectResult.ETag",
        Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "src", "VersionId": v1})
    rec("get_object", "VersionId", _body=True, Bucket=b, Key="dst")
    # restoring an old version by copying it onto its own key is allowed
    rec("copy_object", "CopyObjectResult.ETag", Bucket=b, Key="src",
        CopySource={"Bucket": b, "Key": "src", "VersionId": v1})
    rec("get_object", _body=True, Bucket=b, Key="src")
    rec("copy_object", Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "src", "VersionId": "A" * 32})
    # UploadPartCopy from a version
    up = rec.client.create_multipart_upload(Bucket=b, Key="mp")["UploadId"]
    p = rec("upload_part_copy", "CopyPartResult.ETag", Bucket=b, Key="mp", UploadId=up, PartNumber=1,
            CopySource={"Bucket": b, "Key": "src", "VersionId": v1})
    rec("complete_multipart_upload", "ETag", "VersionId", Bucket=b, Key="mp", UploadId=up,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p["CopyPartResult"]["ETag"]}]})
    rec("get_object", "VersionId", _body=True, Bucket=b, Key="mp")
    all_versions(rec, b)


def test_copy_from_a_version_matches_moto(gw):
    differential(gw, sc_copy_from_version, new_bucket())


def flatten_pages(rec, max_keys: int) -> None:
    """Named normalisation for delimiter listings: moto puts a common prefix on
    a page that is already full (MaxKeys 1 gives a version *and* a prefix),
    where S3 counts common prefixes against MaxKeys ('The response might
    contain fewer keys but will never contain more', ListObjectVersions docs).
    Both sides' pages are compared as one flattened sequence of entries and
    prefixes in (key, newest first) order (labels follow write order); airlock's
    pages are checked to respect max-keys."""
    label, pages = rec.log[-1]
    if rec.side == "airlock":
        for p in pages:
            assert len(p["versions"]) + len(p["markers"]) + len(p["prefixes"]) <= max_keys, p
    flat = []
    for p in pages:
        flat += [("V",) + v for v in p["versions"]] + [("D",) + d for d in p["markers"]]
        flat += [("P", x) for x in p["prefixes"]]
    flat.sort(key=lambda e: (e[1], -int(e[2][1:])) if e[0] != "P" else (e[1], 0))
    rec.log[-1] = (label + "-flattened", flat)


def sc_listing_pagination(rec, b, max_keys, delimiter):
    rec("create_bucket", Bucket=b)
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    # version ids are labelled in write order, the same on both sides
    for key, n in (("a", 3), ("b/1", 2), ("b/2", 1), ("c", 4), ("d/x/y", 2), ("e", 1)):
        for i in range(n):
            rec._register(rec.client.put_object(Bucket=b, Key=key, Body=f"{key}-{i}".encode()))
    rec._register(rec.client.delete_object(Bucket=b, Key="c"))
    rec._register(rec.client.delete_object(Bucket=b, Key="e"))
    rec._register(rec.client.put_object(Bucket=b, Key="e", Body=b"again"))
    kw = {"MaxKeys": max_keys}
    if delimiter:
        kw["Delimiter"] = "/"
    latest_a = rec.client.list_object_versions(Bucket=b, Prefix="a", MaxKeys=1)["Versions"][0]["VersionId"]
    for extra in ({}, {"Prefix": "b/"}, {"KeyMarker": "a", "VersionIdMarker": latest_a}):
        all_versions(rec, b, **extra, **kw)
        if delimiter and max_keys < 1000:
            flatten_pages(rec, max_keys)
    # (a key marker without a version-id marker: moto keeps versions with
    # key >= marker, S3 starts after the marker's key; see
    # test_key_marker_alone_skips_that_key)


@pytest.mark.parametrize("max_keys", [1, 2, 3, 1000])
@pytest.mark.parametrize("delimiter", [False, True])
def test_list_object_versions_pagination_matches_moto(gw, max_keys, delimiter):
    differential(gw, sc_listing_pagination, new_bucket(), max_keys, delimiter)


def sc_delete_objects(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    v1 = rec("put_object", Bucket=b, Key="one", Body=b"1")["VersionId"]
    rec("put_object", Bucket=b, Key="one", Body=b"11")
    rec("put_object", Bucket=b, Key="two", Body=b"2")
    r = rec.client.delete_objects(Bucket=b, Delete={"Objects": [
        {"Key": "one", "VersionId": v1}, {"Key": "two"}, {"Key": "three", "VersionId": "A" * 32}]})
    rec._register(r)
    rec.note("deleted", sorted((d["Key"], rec.label(d.get("VersionId")), d.get("DeleteMarker"),
                                rec.label(d.get("DeleteMarkerVersionId")))
                               for d in r.get("Deleted", [])))
    rec.note("errors", r.get("Errors", []))
    all_versions(rec, b)
    dm = [d for d in rec.client.list_object_versions(Bucket=b)["DeleteMarkers"] if d["Key"] == "two"][0]
    r = rec.client.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "two", "VersionId": dm["VersionId"]}]})
    rec.note("deleted-marker", sorted((d["Key"], rec.label(d.get("VersionId")), d.get("DeleteMarker"),
                                       rec.label(d.get("DeleteMarkerVersionId")))
                                      for d in r.get("Deleted", [])))
    rec.moto_diverges(("deleted-marker", [("two", rec.label(dm["VersionId"]), True,
                                           rec.label(dm["VersionId"]))]),
                      "moto leaves DeleteMarker/DeleteMarkerVersionId out when a delete marker is removed "
                      "by version id; S3 sends both (DeleteObjects docs, DeletedObject: 'If you delete a "
                      "specific object version, the value returned by this header is the version ID of "
                      "the object version deleted')")
    rec("get_object", _body=True, Bucket=b, Key="two")
    all_versions(rec, b)


def test_delete_objects_with_versions_matches_moto(gw):
    differential(gw, sc_delete_objects, new_bucket())


def sc_unversioned(rec, b):
    """A bucket that was never versioned behaves as before: no version ids."""
    rec("create_bucket", Bucket=b)
    rec("put_object", "VersionId", Bucket=b, Key="k", Body=b"1")
    rec("put_object", "VersionId", Bucket=b, Key="k", Body=b"2")
    rec("get_object", "VersionId", _body=True, Bucket=b, Key="k")
    all_versions(rec, b)
    rec("delete_object", "VersionId", "DeleteMarker", Bucket=b, Key="k")
    all_versions(rec, b)
    rec("delete_bucket", Bucket=b)


def test_unversioned_bucket_matches_moto(gw):
    differential(gw, sc_unversioned, new_bucket())


# ---------------------------------------------------------------------------- airlock-only
def test_key_marker_alone_skips_that_key(gw):
    """ListObjectVersions with key-marker and no version-id-marker starts after
    every version of that key (S3 API reference, ListObjectVersions: 'key-marker
    ... Specifies the key to start with'; S3 User Guide, listing versions:
    'objects whose keys are greater than key-marker').  moto instead returns
    versions with key >= marker, so this is checked against S3's documentation."""
    s3 = gw.client()
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    for k in ("a", "a", "b", "b", "c"):
        s3.put_object(Bucket=b, Key=k, Body=k.encode())
    r = s3.list_object_versions(Bucket=b, KeyMarker="a")
    assert [v["Key"] for v in r["Versions"]] == ["b", "b", "c"]
    assert r["KeyMarker"] == "a" and not r["IsTruncated"]
    r = s3.list_object_versions(Bucket=b, KeyMarker="a", MaxKeys=2, EncodingType="url")
    assert [v["Key"] for v in r["Versions"]] == ["b", "b"]
    assert r["IsTruncated"] and r["NextKeyMarker"] == "b" and r["NextVersionIdMarker"] == r["Versions"][1]["VersionId"]
    with pytest.raises(ClientError) as ei:
        s3.list_object_versions(Bucket=b, VersionIdMarker="x")
    assert ei.value.response["Error"]["Code"] == "InvalidArgument"


def test_a_copy_whose_source_version_is_a_delete_marker_is_invalid_request(gw):
    """S3 answers 400 InvalidRequest ("The source of a copy request may not
    specifically refer to a delete marker by version id"); moto answers 404,
    so this is checked on its own.  Nothing is written."""
    s3 = gw.client()
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=b, Key="k", Body=b"v1")
    dm = s3.delete_object(Bucket=b, Key="k")["VersionId"]
    up = s3.create_multipart_upload(Bucket=b, Key="mp")["UploadId"]
    for call in (lambda: s3.copy_object(Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "k", "VersionId": dm}),
                 lambda: s3.upload_part_copy(Bucket=b, Key="mp", UploadId=up, PartNumber=1,
                                             CopySource={"Bucket": b, "Key": "k", "VersionId": dm})):
        with pytest.raises(ClientError) as ei:
            call()
        assert (ei.value.response["ResponseMetadata"]["HTTPStatusCode"],
                ei.value.response["Error"]["Code"]) == (400, "InvalidRequest")
    assert "Versions" not in s3.list_object_versions(Bucket=b, Prefix="copy")
    assert s3.list_parts(Bucket=b, Key="mp", UploadId=up).get("Parts", []) == []


def sc_malformed_version_ids(rec, b):
    """A version id no version could have is refused before any lookup: S3
    answers 400 InvalidArgument "Invalid version id specified" for GET,
    HEAD, DELETE, tagging and a copy source alike.  moto looks such an id
    up (404 NoSuchVersion; HEAD 400 for a reason of its own; DELETE 204)."""
    why = "moto looks a malformed version id up; S3 refuses it: 400 InvalidArgument 'Invalid version id specified'"
    rec("create_bucket", Bucket=b)
    rec("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    rec("put_object", Bucket=b, Key="k", Body=b"one")
    refused = ("get_object", 400, "InvalidArgument", None, None)
    for bad in ("abc", "A" * 31, "A" * 33, "A" * 31 + "="):
        rec("get_object", Bucket=b, Key="k", VersionId=bad)
        rec.moto_diverges(refused, why)
        rec("head_object", Bucket=b, Key="k", VersionId=bad)     # HEAD: the status only
        rec.moto_diverges(("head_object", 400, "400", None, None), why)
        rec("get_object_tagging", Bucket=b, Key="k", VersionId=bad)
        rec.moto_diverges(("get_object_tagging",) + refused[1:], why)
        rec("put_object_tagging", Bucket=b, Key="k", VersionId=bad, Tagging={"TagSet": []})
        rec.moto_diverges(("put_object_tagging",) + refused[1:], why)
        rec.per_s3(("delete_object_tagging",) + refused[1:], "moto raises AttributeError on this call",
                   "delete_object_tagging", Bucket=b, Key="k", VersionId=bad)
        rec("copy_object", Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "k", "VersionId": bad})
        rec.moto_diverges(("copy_object",) + refused[1:], why)
        rec("delete_object", Bucket=b, Key="k", VersionId=bad)
        rec.moto_diverges(("delete_object",) + refused[1:], why)
    # well-formed ids that name nothing are looked up: NoSuchVersion, as before
    rec("get_object", Bucket=b, Key="k", VersionId="A" * 32)
    rec("get_object", Bucket=b, Key="k", VersionId="-" + "A" * 31)   # ids made before 4c6b215 may begin with "-"
    # nothing was written or deleted
    all_versions(rec, b)


def test_a_malformed_version_id_is_invalid_argument_not_no_such_version(gw):
    differential(gw, sc_malformed_version_ids, new_bucket())
    s3 = gw.client()
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    s3.put_object(Bucket=b, Key="k", Body=b"x")
    with pytest.raises(ClientError) as ei:
        s3.get_object(Bucket=b, Key="k", VersionId="abc")
    err = ei.value.response["Error"]
    assert (err["Message"], err["ArgumentName"], err["ArgumentValue"]) == \
        ("Invalid version id specified", "versionId", "abc")
    # "null" is every bucket's id for an unversioned write
    assert s3.get_object(Bucket=b, Key="k", VersionId="null")["Body"].read() == b"x"
    with pytest.raises(ClientError) as ei:          # a listing's marker is checked the same way
        s3.list_object_versions(Bucket=b, KeyMarker="k", VersionIdMarker="abc")
    err = ei.value.response["Error"]
    assert (err["Code"], err["Message"], err["ArgumentName"]) == \
        ("InvalidArgument", "Invalid version id specified", "version-id-marker")
    assert s3.list_object_versions(Bucket=b, KeyMarker="k", VersionIdMarker="null")["IsTruncated"] is False


def test_versions_survive_restart_and_index_rebuild(tmp_path):
    g = Gateway(tmp_path / "primary").start()
    try:
        s3 = g.client()
        s3.create_bucket(Bucket="vbkt")
        s3.put_object(Bucket="vbkt", Key="plain", Body=b"unversioned")
        s3.put_bucket_versioning(Bucket="vbkt", VersioningConfiguration={"Status": "Enabled"})
        ids = [s3.put_object(Bucket="vbkt", Key="k", Body=f"body {i}".encode())["VersionId"] for i in range(4)]
        dm = s3.delete_object(Bucket="vbkt", Key="k")["VersionId"]
        s3.delete_object(Bucket="vbkt", Key="k", VersionId=ids[1])          # a removed version stays removed
        s3.put_bucket_versioning(Bucket="vbkt", VersioningConfiguration={"Status": "Suspended"})
        s3.put_object(Bucket="vbkt", Key="plain", Body=b"suspended")        # replaces the null version

        def state():
            r = s3.list_object_versions(Bucket="vbkt")
            vs = sorted((v["Key"], v["VersionId"], v["IsLatest"], v["ETag"]) for v in r.get("Versions", []))
            ds = sorted((d["Key"], d["VersionId"], d["IsLatest"]) for d in r.get("DeleteMarkers", []))
            bodies = {v[1]: s3.get_object(Bucket="vbkt", Key=v[0], VersionId=v[1])["Body"].read() for v in vs}
            return vs, ds, bodies, s3.get_bucket_versioning(Bucket="vbkt").get("Status")

        before = state()
        assert len(before[0]) == 4 and before[1] == [("k", dm, True)]
        assert before[2][ids[3]] == b"body 3" and ids[1] not in before[2]
        assert before[3] == "Suspended"
        g.restart()
        assert state() == before
        g.stop()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(tmp_path / "primary" / f"index.sqlite{suffix}")
            except FileNotFoundError:
                pass
        g.start()
        assert state() == before
        s3.delete_object(Bucket="vbkt", Key="k", VersionId=dm)
        assert s3.get_object(Bucket="vbkt", Key="k")["Body"].read() == b"body 3"
    finally:
        g.stop()


def test_old_schema_index_is_rebuilt(tmp_path):
    """An index of schema 1 (before versioning) is rebuilt from the log."""
    import sqlite3
    g = Gateway(tmp_path / "primary").start()
    try:
        s3 = g.client()
        s3.create_bucket(Bucket="obkt")
        s3.put_object(Bucket="obkt", Key="k", Body=b"x")
        g.stop()
        db = sqlite3.connect(tmp_path / "primary" / "index.sqlite")
        db.execute("UPDATE meta SET v='1' WHERE k='schema'")
        db.commit()
        db.close()
        g.start()
        assert s3.get_object(Bucket="obkt", Key="k")["Body"].read() == b"x"
        assert "rebuilding it from the log" in g.log_text()
    finally:
        g.stop()


def _link(dep: Deployment):
    from airlock.config import GatewayConfig
    from airlock.gateway import make_link_client
    cfg = GatewayConfig()
    cfg.vault = ("127.0.0.1", dep.vault.port)
    cfg.link_keys = str(dep.root / "primary" / "keys")
    return make_link_client(cfg)


async def _vault_versions(dep: Deployment, bucket: str, key: str) -> list[tuple[int, dict, bytes]]:
    """Every object-put of bucket/key the vault holds, read over the link:
    (seq, manifest by GET_MANIFEST with seq, bytes by GET_CHUNK)."""
    link = _link(dep)
    await link.connect()
    try:
        out = []
        seq = 1
        while True:
            batch = await link.get_records(seq, 1000)
            if not batch:
                break
            for s, rtype, payload in batch:
                body = json.loads(payload)
                if rtype == 3 and (body["bucket"], body["key"]) == (bucket, key):
                    m = await link.get_manifest(bucket, key, seq=s)
                    data = b"".join([await link.get_chunk(d) for d, _n in m["chunks"]])
                    out.append((s, m, data))
            seq = batch[-1][0] + 1
        return out
    finally:
        await link.close()


def test_vault_keeps_every_version_of_an_unversioned_bucket(tmp_path):
    dep = Deployment(tmp_path / "deploy").start()
    try:
        s3 = dep.gateway.client()
        s3.create_bucket(Bucket="plain")
        s3.put_object(Bucket="plain", Key="doc", Body=b"the old version " * 1000)
        s3.put_object(Bucket="plain", Key="doc", Body=b"the new version " * 1000)
        assert s3.get_object(Bucket="plain", Key="doc")["Body"].read() == b"the new version " * 1000
        assert "Versions" not in s3.list_object_versions(Bucket="plain", Prefix="x")
        versions = asyncio.run(_vault_versions(dep, "plain", "doc"))
        assert [v[2] for v in versions] == [b"the old version " * 1000, b"the new version " * 1000]
        assert all("version_id" not in v[1] for v in versions)      # "null": unversioned

        # the vault accepts every versioning record and stays equal to the primary
        s3.put_bucket_versioning(Bucket="plain", VersioningConfiguration={"Status": "Enabled"})
        v1 = s3.put_object(Bucket="plain", Key="doc", Body=b"v1")["VersionId"]
        v2 = s3.put_object(Bucket="plain", Key="doc", Body=b"v2")["VersionId"]
        dm = s3.delete_object(Bucket="plain", Key="doc")["VersionId"]
        s3.delete_object(Bucket="plain", Key="doc", VersionId=dm)        # v2 current again
        s3.delete_object(Bucket="plain", Key="doc", VersionId=v1)        # not the latest
        s3.delete_object(Bucket="plain", Key="doc", VersionId=v2)        # the null version is current
        assert s3.get_object(Bucket="plain", Key="doc")["Body"].read() == b"the new version " * 1000
        s3.put_bucket_versioning(Bucket="plain", VersioningConfiguration={"Status": "Suspended"})
        s3.delete_object(Bucket="plain", Key="doc")                      # null delete marker
        r = dep.airlock("verify")
        assert "equal" in r.stdout, r.stdout
        versions = asyncio.run(_vault_versions(dep, "plain", "doc"))
        assert [v[2] for v in versions] == [b"the old version " * 1000, b"the new version " * 1000,
                                            b"v1", b"v2"]
        assert [v[1].get("version_id") for v in versions[2:]] == [v1, v2]
    finally:
        dep.stop()
