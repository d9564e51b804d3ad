"""Differential tests: every scenario runs against moto (the oracle for S3
semantics) and against a real airlock gateway; the normalised observations must
be equal.

A scenario is a function `(rec, bucket)`; `rec` wraps a boto3 client and
records, per call, the HTTP status, the S3 error code and selected response
fields.  Volatile fields (request ids, dates, owner ids, upload ids,
continuation tokens) are never recorded; tokens and markers are recorded as
present/absent and followed, so the pages they lead to are compared instead.

Where moto and S3 disagree, S3's documented behaviour (botocore's service
model, the S3 API reference) wins; each such case is a named normalisation
with its reason, never an xfail.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import time
from email.utils import formatdate
from urllib.parse import unquote

import boto3
import jmespath
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moto import mock_aws

from conftest import Gateway

_names = itertools.count()
MB = 1024 * 1024


# ---------------------------------------------------------------------------- harness
class Recorder:
    """Calls client operations and records normalised observations."""

    def __init__(self, client, side: str):
        self.client = client
        self.side = side
        self.log: list = []
        self.keys: list[str] = []     # the keys a listing scenario stored

    def __call__(self, op: str, *fields: str, _body: bool = False, **params):
        """Call `op`; record status, error code and the jmespath `fields` of the response."""
        try:
            r = getattr(self.client, op)(**params)
        except ClientError as e:
            self.log.append((op, e.response["ResponseMetadata"]["HTTPStatusCode"],
                             e.response["Error"].get("Code")))
            return None
        obs = {"status": r["ResponseMetadata"]["HTTPStatusCode"]}
        for f in fields:
            obs[f] = jmespath.search(f, r)
        if _body:
            obs["Body"] = r["Body"].read()
        self.log.append((op, obs))
        return r

    def note(self, label: str, value) -> None:
        self.log.append((label, value))

    def moto_diverges(self, s3_value, why: str) -> None:
        """moto is known to differ from documented S3 here (`why`): on the moto
        side, replace the last observation with S3's documented answer."""
        assert why
        if self.side == "moto":
            self.log[-1] = s3_value

    def per_s3(self, expected, why: str, op: str, *fields: str, **params):
        """Like __call__, but moto cannot answer this call at all (`why`): the
        oracle is S3's documented answer `expected`."""
        assert why
        if self.side == "moto":
            self.log.append(expected)
            return None
        return self(op, *fields, **params)


def moto_client():
    return boto3.client("s3", region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))


def run_moto(scenario, *args) -> list:
    with mock_aws():
        rec = Recorder(moto_client(), "moto")
        scenario(rec, *args)
    return rec.log


def run_airlock(gw: Gateway, scenario, *args) -> list:
    rec = Recorder(gw.client(), "airlock")
    scenario(rec, *args)
    return rec.log


def differential(gw: Gateway, scenario, *args) -> list:
    expected = run_moto(scenario, *args)
    actual = run_airlock(gw, scenario, *args)
    assert len(actual) == len(expected), (actual, expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a != e and isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], list) \
                and isinstance(e[1], list) and len(a[1]) == len(e[1]):
            for j, (pa, pe) in enumerate(zip(a[1], e[1])):    # listings: name the first bad page
                assert pa == pe, f"step {i} {a[0]} page {j}: airlock {pa!r} != moto {pe!r}"
        assert a == e, f"step {i}: airlock {a!r} != moto {e!r}"
    return actual


def new_bucket() -> str:
    return f"diff-{time.time_ns() % 10**9}-{next(_names)}"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("diff") / "primary").start()
    yield g
    g.stop()


# ---------------------------------------------------------------------------- buckets
def sc_buckets(rec, b):
    rec("create_bucket", Bucket=b)
    rec("create_bucket", Bucket=b)
    rec.moto_diverges(("create_bucket", 409, "BucketAlreadyOwnedByYou"),
                      "S3 answers 200 here only as a legacy quirk of us-east-1 (CreateBucket docs); "
                      "airlock gives the 409 BucketAlreadyOwnedByYou of every other region, as moto "
                      "does outside us-east-1")
    rec("head_bucket", Bucket=b)
    rec("head_bucket", Bucket=b + "-missing")           # 404 (HEAD: code '404')
    rec("delete_bucket", Bucket=b + "-missing")         # NoSuchBucket
    rec("list_objects_v2", "KeyCount", Bucket=b + "-missing")
    r = rec.client.list_buckets()
    rec.note("listed", b in [x["Name"] for x in r["Buckets"]])
    rec("put_object", Bucket=b, Key="k", Body=b"x")
    rec("delete_bucket", Bucket=b)                      # BucketNotEmpty
    rec("delete_object", Bucket=b, Key="k")
    rec("delete_bucket", Bucket=b)
    rec("head_bucket", Bucket=b)
    r = rec.client.list_buckets()
    rec.note("listed", b in [x["Name"] for x in r["Buckets"]])
    rec("put_object", Bucket=b, Key="k", Body=b"x")    # NoSuchBucket


def test_bucket_lifecycle_matches_moto(gw):
    differential(gw, sc_buckets, new_bucket())


def sc_unconfigured_bucket_features(rec, b):
    """What Terraform's aws_s3_bucket reads on every refresh, and the other
    bucket configuration reads: each answers S3's "not configured" (airlock
    keeps none of it, s3/configuration.py), and deleting what is not there
    is a 204.  Owner ids are never compared (see the module's docstring);
    test_boto3_api checks the ACL's owner against ListBuckets'.

    Three answers follow moto and S3 as it answers for a bucket with none
    configured, not the defaults S3 has given new buckets since 2023
    (AES256 default encryption, BucketOwnerEnforced ownership, all four
    public access blocks on): GetBucketEncryption is 404 because airlock
    does not encrypt at rest, and reporting AES256 would claim it does;
    the other two are settings airlock neither stores nor lets a PUT change."""
    rec("create_bucket", Bucket=b)
    rec("put_object", Bucket=b, Key="k", Body=b"x")
    rec("get_bucket_acl", "length(Grants)", "Grants[].Permission", "Grants[].Grantee.Type",
        "Owner.ID == Grants[0].Grantee.ID", Bucket=b)
    rec("get_object_acl", "length(Grants)", "Grants[].Permission", "Grants[].Grantee.Type",
        "Owner.ID == Grants[0].Grantee.ID", Bucket=b, Key="k")
    rec("get_object_acl", Bucket=b, Key="missing")                         # NoSuchKey
    rec("get_bucket_cors", Bucket=b)                                       # NoSuchCORSConfiguration
    rec("get_bucket_website", Bucket=b)                                    # NoSuchWebsiteConfiguration
    rec("get_bucket_versioning", "Status", Bucket=b)
    rec("get_bucket_accelerate_configuration", "Status", Bucket=b)        # 200, no Status
    rec("get_bucket_request_payment", "Payer", Bucket=b)
    rec.moto_diverges(("get_bucket_request_payment", {"status": 200, "Payer": "BucketOwner"}),
                      "moto answers an empty RequestPaymentConfiguration; S3 names the payer of a "
                      "bucket that is not requester pays: <Payer>BucketOwner</Payer> "
                      "(GetBucketRequestPaymentOutput.Payer)")
    rec("get_bucket_logging", "LoggingEnabled", Bucket=b)                  # 200, logging off
    rec("get_bucket_lifecycle_configuration", "Rules", Bucket=b)           # NoSuchLifecycleConfiguration
    rec("get_bucket_replication", Bucket=b)                                # ReplicationConfigurationNotFoundError
    rec("get_bucket_encryption", Bucket=b)     # ServerSideEncryptionConfigurationNotFoundError: see above
    rec("get_object_lock_configuration", Bucket=b)                         # ObjectLockConfigurationNotFoundError
    rec("get_bucket_policy", Bucket=b)                                     # NoSuchBucketPolicy
    rec("get_bucket_policy_status", Bucket=b)                              # NoSuchBucketPolicy
    rec("get_bucket_tagging", Bucket=b)                                    # NoSuchTagSet
    rec("get_public_access_block", Bucket=b)                               # NoSuchPublicAccessBlockConfiguration
    rec("get_bucket_ownership_controls", Bucket=b)                         # OwnershipControlsNotFoundError
    rec("get_bucket_notification_configuration", "TopicConfigurations", "QueueConfigurations",
        "LambdaFunctionConfigurations", "EventBridgeConfiguration", Bucket=b)
    for op in ("delete_bucket_policy", "delete_bucket_cors", "delete_bucket_website", "delete_bucket_lifecycle",
               "delete_bucket_replication", "delete_bucket_encryption", "delete_public_access_block",
               "delete_bucket_ownership_controls"):
        rec(op, Bucket=b)                                                  # 204
        rec(op, Bucket=b + "-missing")                                     # NoSuchBucket
    for op in ("get_bucket_acl", "get_bucket_cors", "get_bucket_logging", "get_bucket_request_payment",
               "get_bucket_encryption", "get_bucket_policy", "get_public_access_block"):
        rec(op, Bucket=b + "-missing")                                     # NoSuchBucket
    rec("get_object_acl", Bucket=b + "-missing", Key="k")
    # an object's Object Lock state, in a bucket without Object Lock (every airlock bucket)
    for op in ("get_object_legal_hold", "get_object_retention"):
        rec(op, Bucket=b, Key="k")
        rec.moto_diverges((op, 400, "InvalidRequest"),
                          "moto answers 404 NoSuchKey for an object that exists; S3 answers 400 "
                          "InvalidRequest 'Bucket is missing Object Lock Configuration'")


def test_unconfigured_bucket_features_read_as_in_s3(gw):
    differential(gw, sc_unconfigured_bucket_features, new_bucket())


# ---------------------------------------------------------------------------- objects
def sc_objects(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_object", "ETag", Bucket=b, Key="a.txt", Body=b"hello world")
    rec("get_object", "ETag", "ContentLength", "ContentType", _body=True, Bucket=b, Key="a.txt")
    rec("head_object", "ETag", "ContentLength", "AcceptRanges", Bucket=b, Key="a.txt")
    rec("get_object", Bucket=b, Key="missing")          # NoSuchKey
    rec("head_object", Bucket=b, Key="missing")         # 404, code '404'
    rec("delete_object", Bucket=b, Key="missing")       # 204
    rec("put_object", "ETag", Bucket=b, Key="empty", Body=b"")
    rec("get_object", "ETag", "ContentLength", _body=True, Bucket=b, Key="empty")
    rec("put_object", "ETag", Bucket=b, Key="a.txt", Body=b"overwritten")
    rec("get_object", "ETag", _body=True, Bucket=b, Key="a.txt")
    rec("delete_object", Bucket=b, Key="a.txt")
    rec("get_object", Bucket=b, Key="a.txt")
    rec("get_object", Bucket=b + "-missing", Key="a.txt")   # NoSuchBucket


def test_object_crud_matches_moto(gw):
    differential(gw, sc_objects, new_bucket())


def sc_delete_objects(rec, b):
    rec("create_bucket", Bucket=b)
    for k in ("one", "two", "dir/three"):
        rec("put_object", Bucket=b, Key=k, Body=k.encode())
    objs = [{"Key": k} for k in ("one", "missing", "dir/three", "also missing")]
    r = rec.client.delete_objects(Bucket=b, Delete={"Objects": objs})
    rec.note("deleted", sorted(d["Key"] for d in r.get("Deleted", [])))
    rec.note("errors", sorted((e["Key"], e["Code"]) for e in r.get("Errors", [])))
    r = rec.client.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "two"}, {"Key": "nope"}],
                                                    "Quiet": True})
    rec.note("quiet-deleted", r.get("Deleted", []))
    rec.moto_diverges(("quiet-deleted", []),
                      "moto ignores <Quiet>; S3 (DeleteObjects docs) reports only errors in quiet mode")
    rec.note("quiet-errors", r.get("Errors", []))
    rec("list_objects_v2", "KeyCount", "Contents[].Key", Bucket=b)


def test_delete_objects_matches_moto(gw):
    differential(gw, sc_delete_objects, new_bucket())


def sc_copy(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_object", Bucket=b, Key="src", Body=b"copy me", ContentType="text/plain",
        Metadata={"color": "blue"})
    rec("copy_object", "CopyObjectResult.ETag", Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "src"})
    rec("get_object", "ETag", "ContentType", "Metadata", _body=True, Bucket=b, Key="dst")
    rec("copy_object", "CopyObjectResult.ETag", Bucket=b, Key="dst2", CopySource=f"{b}/src",
        MetadataDirective="REPLACE", Metadata={"shape": "round"}, ContentType="application/x-new")
    rec("head_object", "ETag", "ContentType", "Metadata", Bucket=b, Key="dst2")
    rec("copy_object", Bucket=b, Key="dst3", CopySource={"Bucket": b, "Key": "missing"})
    rec("copy_object", Bucket=b, Key="src", CopySource={"Bucket": b, "Key": "src"})  # InvalidRequest
    rec("copy_object", "CopyObjectResult.ETag", Bucket=b, Key="dst4", CopySource={"Bucket": b, "Key": "src"},
        CopySourceIfMatch='"0000"')
    rec.moto_diverges(("copy_object", 412, "PreconditionFailed"),
                      "moto ignores x-amz-copy-source-if-match; S3 answers 412 when it fails")
    rec("head_object", Bucket=b, Key="dst4")
    rec.moto_diverges(("head_object", 404, "404"), "follows from moto ignoring the failed copy-source condition")


def test_copy_object_matches_moto(gw):
    differential(gw, sc_copy, new_bucket())


BODY = bytes(range(256)) * 4   # 1024 bytes


def sc_ranges(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_object", Bucket=b, Key="r", Body=BODY)
    for rng in ("bytes=0-9", "bytes=10-", "bytes=-5", "bytes=1000-2000", "bytes=1023-1023",
                "bytes=0-0", "bytes=1024-", "bytes=5000-6000", "bytes=-2000", "bytes=  1-2",
                "Bytes=2-3", "BYTES=-1",                  # a range unit is case-insensitive (RFC 9110 14.1)
                "bytes=0-9,20-29", "bytes=5-2", "bytes=-0", "bytes=abc"):    # several, inverted, empty, junk
        rec("get_object", "ContentLength", "ContentRange", _body=True, Bucket=b, Key="r", Range=rng)
        rec("head_object", "ContentLength", "ContentRange", Bucket=b, Key="r", Range=rng)
    rec("get_object", "ContentLength", "ContentRange", Bucket=b, Key="r", Range="items=0-1")
    rec.moto_diverges(("get_object", {"status": 200, "ContentLength": 1024, "ContentRange": None}),
                      "moto reads any unit as bytes; a Range of a unit the server does not know is "
                      "ignored (RFC 9110 14.2), the whole object answered")
    rec("put_object", Bucket=b, Key="empty", Body=b"")
    rec("get_object", "ContentLength", _body=True, Bucket=b, Key="empty", Range="bytes=0-")
    rec("get_object", "ContentLength", "ContentRange", _body=True, Bucket=b, Key="empty", Range="bytes=-1")


def test_ranges_match_moto(gw):
    differential(gw, sc_ranges, new_bucket())


def sc_conditionals(rec, b):
    rec("create_bucket", Bucket=b)
    r = rec("put_object", Bucket=b, Key="c", Body=b"conditional")
    etag = r["ETag"]
    past = formatdate(time.time() - 86400, usegmt=True)
    future = formatdate(time.time() + 86400, usegmt=True)
    for cond in ({"IfMatch": etag}, {"IfMatch": '"deadbeef"'}, {"IfNoneMatch": etag},
                 {"IfNoneMatch": '"deadbeef"'}, {"IfModifiedSince": past}, {"IfModifiedSince": future},
                 {"IfUnmodifiedSince": past}, {"IfUnmodifiedSince": future},
                 {"IfMatch": etag, "IfUnmodifiedSince": past},
                 {"IfNoneMatch": etag, "IfModifiedSince": past}):
        rec("get_object", "ETag", _body=True, Bucket=b, Key="c", **cond)
        if "IfMatch" in cond and "IfUnmodifiedSince" in cond:
            rec.moto_diverges(("get_object", {"status": 200, "ETag": etag, "Body": b"conditional"}),
                              "S3 (GetObject docs, RFC 7232 3.4): a true If-Match makes S3 ignore a "
                              "false If-Unmodified-Since; moto answers 412")
        rec("head_object", "ETag", Bucket=b, Key="c", **cond)
        if "IfMatch" in cond and "IfUnmodifiedSince" in cond:
            rec.moto_diverges(("head_object", {"status": 200, "ETag": etag}), "as for GET above")
    # moto compares each header with the ETag as one string and evaluates
    # If-Modified-Since even beside If-None-Match; RFC 7232 (S3's reference
    # for conditional requests): a list names each of its tags, "*" any
    # current object (3.1, 3.2), and If-None-Match makes If-Modified-Since
    # ignored (3.3)
    ok, not_modified = 200, 304
    for cond, want in (({"IfNoneMatch": f'"x", {etag}'}, not_modified), ({"IfMatch": f'"x", {etag}'}, ok),
                       ({"IfNoneMatch": "*"}, not_modified), ({"IfMatch": "*"}, ok),
                       ({"IfNoneMatch": '"x"', "IfModifiedSince": future}, ok)):
        for op in ("get_object", "head_object"):
            rec(op, "ETag", Bucket=b, Key="c", **cond)
            s3_answer = ((op, {"status": 200, "ETag": etag}) if want == ok
                         else (op, not_modified, "304"))
            rec.moto_diverges(s3_answer, "RFC 7232 3.1-3.3, above")


def test_conditional_requests_match_moto(gw):
    differential(gw, sc_conditionals, new_bucket())


def sc_conditional_deletes(rec, b):
    rec("create_bucket", Bucket=b)
    r = rec("put_object", "ETag", Bucket=b, Key="precious", Body=b"important")
    etag = r["ETag"]
    rec("delete_object", Bucket=b, Key="precious", IfMatch='"00000000000000000000000000000000"')  # 412
    rec("get_object", _body=True, Bucket=b, Key="precious")                # still there
    rec("delete_object", Bucket=b, Key="missing", IfMatch=etag)            # NoSuchKey
    rec("delete_object", Bucket=b, Key="precious", IfMatch=etag)           # 204
    rec("head_object", Bucket=b, Key="precious")                           # gone
    rec("put_object", Bucket=b, Key="again", Body=b"again")
    rec("delete_object", Bucket=b, Key="again", IfMatch="*")               # any ETag: 204
    rec.moto_diverges(("delete_object", {"status": 204}),
                      "moto compares '*' with the ETag as a string; If-Match: * matches any current "
                      "object (RFC 9110 13.1.1), as S3's conditional writes document it")
    rec("head_object", Bucket=b, Key="again")
    rec.moto_diverges(("head_object", 404, "404"), "follows from moto refusing If-Match: *")


def test_conditional_deletes_match_moto(gw):
    """A delete whose If-Match fails leaves the object where it is."""
    differential(gw, sc_conditional_deletes, new_bucket())


def sc_metadata(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_object", Bucket=b, Key="m", Body=b"meta",
        Metadata={"alpha": "1", "mixed-Case": "Value With Spaces", "empty": ""},
        ContentType="image/png", ContentEncoding="identity", ContentDisposition='attachment; filename="x.png"',
        ContentLanguage="en-GB", CacheControl="max-age=60")
    fields = ("Metadata", "ContentType", "ContentEncoding", "ContentDisposition",
              "ContentLanguage", "CacheControl", "ContentLength", "ETag")
    rec("head_object", *fields, Bucket=b, Key="m")
    rec("get_object", *fields, _body=True, Bucket=b, Key="m")
    rec("get_object", "ContentType", "ContentDisposition", "CacheControl", Bucket=b, Key="m",
        ResponseContentType="text/csv", ResponseContentDisposition="inline", ResponseCacheControl="no-cache")
    rec("put_object", Bucket=b, Key="plain", Body=b"p")
    rec("head_object", "ContentType", "Metadata", Bucket=b, Key="plain")
    rec("put_object", Bucket=b, Key="redirect", Body=b"r", WebsiteRedirectLocation="/other")
    rec("head_object", "WebsiteRedirectLocation", Bucket=b, Key="redirect")
    rec("get_object", "WebsiteRedirectLocation", Bucket=b, Key="redirect")


def test_metadata_and_headers_match_moto(gw):
    differential(gw, sc_metadata, new_bucket())


def sc_checksums(rec, b):
    rec("create_bucket", Bucket=b)
    data = b"checksummed payload" * 100
    for alg in ("CRC32", "CRC32C", "SHA1", "SHA256"):
        key = f"ck-{alg}"
        field = f"Checksum{alg}"
        rec("put_object", "ETag", field, Bucket=b, Key=key, Body=data, ChecksumAlgorithm=alg)
        rec("head_object", field, Bucket=b, Key=key, ChecksumMode="ENABLED")
        rec("get_object", field, _body=True, Bucket=b, Key=key, ChecksumMode="ENABLED")
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    rec("put_object", "ChecksumSHA256", Bucket=b, Key="explicit", Body=data, ChecksumSHA256=sha)
    rec.moto_diverges(("put_object", {"status": 200, "ChecksumSHA256": sha}),
                      "moto does not echo a client-supplied x-amz-checksum-sha256 in the PutObject "
                      "response; S3 does (PutObjectOutput.ChecksumSHA256)")
    rec("head_object", "ChecksumSHA256", Bucket=b, Key="explicit", ChecksumMode="ENABLED")
    rec.moto_diverges(("head_object", {"status": 200, "ChecksumSHA256": sha}),
                      "moto does not store a client-supplied checksum; S3 returns it with ChecksumMode")


def test_checksums_match_moto(gw):
    differential(gw, sc_checksums, new_bucket())


# ---------------------------------------------------------------------------- multipart
def sc_multipart(rec, b):
    rec("create_bucket", Bucket=b)
    p1 = b"a" * (5 * MB)
    p2 = b"b" * (5 * MB)
    p3 = b"tail"
    up = rec.client.create_multipart_upload(Bucket=b, Key="mp", ContentType="text/x-mp",
                                            Metadata={"m": "v"})
    uid = up["UploadId"]
    rec.note("create", (up["Bucket"], up["Key"]))
    etags = []
    for n, data in ((1, p1), (2, p2), (3, p3)):
        r = rec("upload_part", "ETag", Bucket=b, Key="mp", UploadId=uid, PartNumber=n, Body=data)
        etags.append(r["ETag"])
    rec("list_parts", "Parts[].[PartNumber, ETag, Size]", "IsTruncated", "NextPartNumberMarker",
        Bucket=b, Key="mp", UploadId=uid)
    rec("list_parts", "Parts[].[PartNumber, ETag, Size]", "IsTruncated", "NextPartNumberMarker",
        Bucket=b, Key="mp", UploadId=uid, MaxParts=2)
    rec("list_parts", "Parts[].[PartNumber, ETag, Size]", "IsTruncated",
        Bucket=b, Key="mp", UploadId=uid, PartNumberMarker=2)
    rec("list_parts", "MaxParts", "IsTruncated", Bucket=b, Key="mp", UploadId=uid, MaxParts=5000)
    rec("list_parts", "MaxParts", "IsTruncated", "Parts", Bucket=b, Key="mp", UploadId=uid, MaxParts=0)
    rec("list_multipart_uploads", "Uploads[].Key", "IsTruncated", Bucket=b)
    # error cases do not consume the upload
    rec.per_s3(("complete_multipart_upload", 400, "InvalidPartOrder"),
               "moto completes an upload whose parts are listed out of order; S3 refuses it",
               "complete_multipart_upload", Bucket=b, Key="mp", UploadId=uid,
               MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": etags[1]},
                                          {"PartNumber": 1, "ETag": etags[0]}]})
    rec("complete_multipart_upload", Bucket=b, Key="mp", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etags[0]}, {"PartNumber": 4, "ETag": etags[1]}]})
    rec("complete_multipart_upload", Bucket=b, Key="mp", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]})
    rec("complete_multipart_upload", Bucket=b, Key="mp", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 3, "ETag": etags[2]}, {"PartNumber": 4, "ETag": etags[2]}]})
    rec("head_object", Bucket=b, Key="mp")
    rec("complete_multipart_upload", "ETag", "Key", "Bucket", Bucket=b, Key="mp", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]})
    rec("head_object", "ETag", "ContentLength", "ContentType", "Metadata", "PartsCount",
        Bucket=b, Key="mp")
    r = rec.client.get_object(Bucket=b, Key="mp")
    rec.note("body-ok", r["Body"].read() == p1 + p2 + p3)
    rec("get_object", "ContentLength", "ContentRange", "PartsCount", Bucket=b, Key="mp", PartNumber=3)
    rec.moto_diverges(("get_object", {"status": 206, "ContentLength": 4, "PartsCount": 3,
                                      "ContentRange": f"bytes {10 * MB}-{10 * MB + 3}/{10 * MB + 4}"}),
                      "moto ignores partNumber on GetObject; S3 serves that part as a 206")
    rec("list_multipart_uploads", "Uploads[].Key", Bucket=b)
    rec("list_parts", Bucket=b, Key="mp", UploadId=uid)             # NoSuchUpload

    # EntityTooSmall: a small part that is not last
    up = rec.client.create_multipart_upload(Bucket=b, Key="small")
    uid2 = up["UploadId"]
    e1 = rec("upload_part", "ETag", Bucket=b, Key="small", UploadId=uid2, PartNumber=1, Body=b"x" * 100)["ETag"]
    e2 = rec("upload_part", "ETag", Bucket=b, Key="small", UploadId=uid2, PartNumber=2, Body=b"y" * 100)["ETag"]
    rec("complete_multipart_upload", Bucket=b, Key="small", UploadId=uid2,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    rec("head_object", Bucket=b, Key="small")
    # abort
    rec("abort_multipart_upload", Bucket=b, Key="small", UploadId=uid2)
    rec("list_multipart_uploads", "Uploads[].Key", Bucket=b)
    rec.per_s3(("upload_part", 404, "NoSuchUpload"), "moto raises KeyError for a part of an aborted upload",
               "upload_part", Bucket=b, Key="small", UploadId=uid2, PartNumber=3, Body=b"z")
    rec("abort_multipart_upload", Bucket=b, Key="small", UploadId="no-such-upload")

    # single-part upload: ETag is md5 of the part md5s, "-1"
    up = rec.client.create_multipart_upload(Bucket=b, Key="one")
    e = rec("upload_part", "ETag", Bucket=b, Key="one", UploadId=up["UploadId"], PartNumber=1, Body=b"only")["ETag"]
    rec("complete_multipart_upload", "ETag", Bucket=b, Key="one", UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e}]})
    rec("get_object", "ETag", "ContentLength", _body=True, Bucket=b, Key="one")


def test_multipart_matches_moto(gw):
    differential(gw, sc_multipart, new_bucket())


def sc_multipart_checksums(rec, b):
    """FULL_OBJECT and COMPOSITE multipart checksums, and the whole object's
    checksum an SDK names when it completes the upload."""
    import zlib
    rec("create_bucket", Bucket=b)
    p1, p2 = b"f" * (5 * MB), b"tail of the object"

    def crc32(data: bytes) -> str:
        return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()

    for key, ctype in (("full", "FULL_OBJECT"), ("composite", "COMPOSITE")):
        up = rec("create_multipart_upload", "ChecksumAlgorithm", "ChecksumType", Bucket=b, Key=key,
                 ChecksumAlgorithm="CRC32", ChecksumType=ctype)
        uid = up["UploadId"]
        parts = []
        for n, data in ((1, p1), (2, p2)):
            r = rec("upload_part", "ETag", "ChecksumCRC32", Bucket=b, Key=key, UploadId=uid, PartNumber=n,
                    Body=data, ChecksumAlgorithm="CRC32")
            parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
        claim = {}
        if ctype == "FULL_OBJECT":
            claim = {"ChecksumCRC32": crc32(p1 + p2), "ChecksumType": "FULL_OBJECT"}
            want = crc32(p1 + p2)
        else:
            want = crc32(b"".join(base64.b64decode(p["ChecksumCRC32"]) for p in parts)) + "-2"
        rec("complete_multipart_upload", "ETag", "ChecksumCRC32", "ChecksumType", Bucket=b, Key=key,
            UploadId=uid, MultipartUpload={"Parts": parts}, **claim)
        done = rec.log[-1]
        if isinstance(done[1], dict):
            rec.moto_diverges((done[0], {**done[1], "ChecksumCRC32": want, "ChecksumType": ctype}),
                              "moto leaves the checksum out of CompleteMultipartUpload's answer; S3 "
                              "returns it (CompleteMultipartUploadOutput.ChecksumCRC32, ChecksumType)")
        rec("head_object", "ContentLength", "ChecksumCRC32", "ChecksumType", Bucket=b, Key=key,
            ChecksumMode="ENABLED")
        head = rec.log[-1]
        if ctype == "COMPOSITE" and isinstance(head[1], dict):
            rec.moto_diverges((head[0], {**head[1], "ChecksumCRC32": want}),
                              "moto drops the -<parts> suffix S3 gives a COMPOSITE checksum on HeadObject")
    up = rec("create_multipart_upload", "ChecksumAlgorithm", "ChecksumType", Bucket=b, Key="nvme",
             ChecksumAlgorithm="CRC64NVME")                      # FULL_OBJECT is its only type
    rec.moto_diverges(("create_multipart_upload", {"status": 200, "ChecksumAlgorithm": "CRC64NVME",
                                                   "ChecksumType": "FULL_OBJECT"}),
                      "moto echoes x-amz-checksum-type only when the request named it; S3 answers the "
                      "type the upload has (FULL_OBJECT, the only one CRC64NVME allows)")
    r = rec("upload_part", "ChecksumCRC64NVME", Bucket=b, Key="nvme", UploadId=up["UploadId"], PartNumber=1,
            Body=p2, ChecksumAlgorithm="CRC64NVME")
    rec("complete_multipart_upload", "ChecksumCRC64NVME", "ChecksumType", Bucket=b, Key="nvme",
        UploadId=up["UploadId"], MultipartUpload={"Parts": [
            {"PartNumber": 1, "ETag": r["ETag"], "ChecksumCRC64NVME": r["ChecksumCRC64NVME"]}]})
    rec.moto_diverges(("complete_multipart_upload", {"status": 200, "ChecksumCRC64NVME": r["ChecksumCRC64NVME"],
                                                     "ChecksumType": "FULL_OBJECT"}),
                      "moto leaves the checksum out of CompleteMultipartUpload's answer (as above); one "
                      "part's CRC is the whole object's")
    rec("head_object", "ChecksumCRC64NVME", "ChecksumType", Bucket=b, Key="nvme", ChecksumMode="ENABLED")
    rec.moto_diverges(("head_object", {"status": 200, "ChecksumCRC64NVME": r["ChecksumCRC64NVME"],
                                       "ChecksumType": "FULL_OBJECT"}),
                      "moto reports a checksum type only if the upload's request named one")


def test_multipart_checksums_match_moto(gw):
    differential(gw, sc_multipart_checksums, new_bucket())


def sc_attributes(rec, b):
    rec("create_bucket", Bucket=b)
    rec("put_object", Bucket=b, Key="k", Body=b"hello", ChecksumAlgorithm="SHA256")
    every = ["ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"]
    rec("get_object_attributes", "ETag", "Checksum.ChecksumSHA256", "StorageClass", "ObjectSize", "ObjectParts",
        Bucket=b, Key="k", ObjectAttributes=every)
    rec("get_object_attributes", "ETag", "ObjectSize", Bucket=b, Key="k", ObjectAttributes=["ObjectSize"])
    rec("get_object_attributes", Bucket=b, Key="missing", ObjectAttributes=["ETag"])        # NoSuchKey
    rec("get_object_attributes", Bucket=b + "-missing", Key="k", ObjectAttributes=["ETag"])  # NoSuchBucket
    up = rec("create_multipart_upload", Bucket=b, Key="mp", ChecksumAlgorithm="CRC32")["UploadId"]
    parts = []
    for n, body in ((1, b"\x01" * (5 * MB)), (2, b"\x02" * 10)):
        r = rec("upload_part", Bucket=b, Key="mp", UploadId=up, PartNumber=n, Body=body, ChecksumAlgorithm="CRC32")
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    rec("complete_multipart_upload", Bucket=b, Key="mp", UploadId=up, MultipartUpload={"Parts": parts})
    rec("get_object_attributes", "ETag", "Checksum", "ObjectSize", Bucket=b, Key="mp",
        ObjectAttributes=["ETag", "Checksum", "ObjectSize"])


def test_get_object_attributes_matches_moto(gw):
    differential(gw, sc_attributes, new_bucket())


def test_get_object_attributes_pages_a_multipart_objects_parts(gw):
    """moto leaves ObjectParts out; S3's answer is asserted directly: part
    sizes and checksums, paged by MaxParts / PartNumberMarker; an attribute
    name S3 does not know is InvalidArgument (moto ignores it)."""
    s3 = gw.client()
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    up = s3.create_multipart_upload(Bucket=b, Key="mp", ChecksumAlgorithm="CRC32")["UploadId"]
    bodies = [bytes([n]) * (5 * MB) for n in (1, 2)] + [b"tail"]
    parts = []
    for n, body in enumerate(bodies, 1):
        r = s3.upload_part(Bucket=b, Key="mp", UploadId=up, PartNumber=n, Body=body, ChecksumAlgorithm="CRC32")
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    s3.complete_multipart_upload(Bucket=b, Key="mp", UploadId=up, MultipartUpload={"Parts": parts})
    seen, marker = [], 0
    for _ in range(5):
        r = s3.get_object_attributes(Bucket=b, Key="mp", ObjectAttributes=["ObjectParts"], MaxParts=2,
                                     PartNumberMarker=marker)["ObjectParts"]
        assert r["TotalPartsCount"] == 3 and r["PartNumberMarker"] == marker
        seen += [(p["PartNumber"], p["Size"], p["ChecksumCRC32"]) for p in r["Parts"]]
        if not r["IsTruncated"]:
            break
        marker = r["NextPartNumberMarker"]
    assert seen == [(p["PartNumber"], len(body), p["ChecksumCRC32"]) for p, body in zip(parts, bodies)]
    s3.put_object(Bucket=b, Key="single", Body=b"x")
    assert "ObjectParts" not in s3.get_object_attributes(Bucket=b, Key="single", ObjectAttributes=["ObjectParts"])
    with pytest.raises(ClientError) as e:
        s3.get_object_attributes(Bucket=b, Key="single", ObjectAttributes=["ETag", "Colour"])
    assert e.value.response["Error"]["Code"] == "InvalidArgument"


def test_get_object_attributes_lists_no_part_of_an_object_without_a_checksum(gw):
    """S3 (GetObjectAttributes, Parts): for an object without an additional
    checksum "the response doesn't return the Part element"; the part count
    is still there.  moto leaves ObjectParts out, so S3's answer is asserted."""
    s3 = gw.client()
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    up = s3.create_multipart_upload(Bucket=b, Key="mp")["UploadId"]
    etags = [s3.upload_part(Bucket=b, Key="mp", UploadId=up, PartNumber=n, Body=body)["ETag"]
             for n, body in ((1, b"\x01" * (5 * MB)), (2, b"tail"))]
    s3.complete_multipart_upload(Bucket=b, Key="mp", UploadId=up, MultipartUpload={"Parts": [
        {"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]})
    assert "ChecksumCRC32" not in s3.head_object(Bucket=b, Key="mp", ChecksumMode="ENABLED")
    r = s3.get_object_attributes(Bucket=b, Key="mp", ObjectAttributes=["ObjectParts"])["ObjectParts"]
    assert r["TotalPartsCount"] == 2
    assert "Parts" not in r


def sc_list_uploads(rec, b):
    rec("create_bucket", Bucket=b)
    for k in ("a/1", "a/2", "b", "c/d/e"):
        rec.client.create_multipart_upload(Bucket=b, Key=k)
    rec("list_multipart_uploads", "Uploads[].Key", "CommonPrefixes[].Prefix", "IsTruncated", Bucket=b)
    rec("list_multipart_uploads", "Uploads[].Key", "CommonPrefixes[].Prefix", Bucket=b, Delimiter="/")
    rec.moto_diverges(("list_multipart_uploads", {"status": 200, "Uploads[].Key": ["b"],
                                                  "CommonPrefixes[].Prefix": ["a/", "c/"]}),
                      "moto ignores Delimiter on ListMultipartUploads; S3 rolls keys up into CommonPrefixes")
    rec("list_multipart_uploads", "Uploads[].Key", Bucket=b, Prefix="a/")


def test_list_multipart_uploads_pages_past_common_prefixes_and_url_encodes(gw):
    """moto ignores Delimiter here, so S3's rules are asserted directly: a
    page that ends on a CommonPrefix says where the next one starts
    (NextKeyMarker = the prefix), so boto3's paginator sees every entry once;
    EncodingType=url encodes keys and prefixes."""
    s3 = gw.client()
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    keys = ["a/1", "a/2", "b/1", "c", "d/x", "e", "f g/h", "f+g"]
    for k in keys:
        s3.create_multipart_upload(Bucket=b, Key=k)
    for size in (1, 2, 3, 1000):
        seen_keys, seen_prefixes = [], []
        for page in s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=b, Delimiter="/", PaginationConfig={"PageSize": size}):
            seen_keys += [u["Key"] for u in page.get("Uploads", [])]
            seen_prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert seen_keys == ["c", "e", "f+g"], size
        assert seen_prefixes == ["a/", "b/", "d/", "f g/"], size
    r = s3.list_multipart_uploads(Bucket=b, Delimiter="/", MaxUploads=1)
    assert r["IsTruncated"] and r["NextKeyMarker"] == "a/" and r["CommonPrefixes"] == [{"Prefix": "a/"}]
    # MaxUploads=0 lists nothing and says so (moto takes 0 as "no limit"; ListObjects' MaxKeys=0 is alike)
    r = s3.list_multipart_uploads(Bucket=b, MaxUploads=0)
    assert not r["IsTruncated"] and "Uploads" not in r and "NextKeyMarker" not in r
    from urllib.parse import quote
    r = s3.list_multipart_uploads(Bucket=b, EncodingType="url")
    assert [u["Key"] for u in r["Uploads"]] == [quote(k) for k in keys] and r["EncodingType"] == "url"
    raw = gw.client()
    raw.meta.events.register("before-parse.s3.ListMultipartUploads",
                             lambda **kw: seen_raw.append(kw["response_dict"]["body"]))
    seen_raw: list[bytes] = []
    raw.list_multipart_uploads(Bucket=b, EncodingType="url", Delimiter="/")
    assert b"<Prefix>f%20g/</Prefix>" in seen_raw[0] and b"<Key>f%2Bg</Key>" in seen_raw[0]


def test_list_multipart_uploads_matches_moto(gw):
    differential(gw, sc_list_uploads, new_bucket())


# ---------------------------------------------------------------------------- listings
LIST_KEYS = [
    "a", "a/", "a/b", "a/b/c", "a/b/c/d", "a/bb", "a b", "a+b", "a%2Fb", "a%", "ab", "b",
    "b/", "b//c", "dir/é", "dir/ü/x", "dir/日本語", "photos/2024/jan/1.jpg", "photos/2024/feb/2.jpg",
    "photos/2025/x.jpg", "photos/index", "z+z/ y", "~tilde", "100%/done",
]


def common_prefixes(rec, r, params) -> list[str]:
    """CommonPrefixes, compared modulo '+' == ' ': moto url-decodes them with
    unquote_plus, turning 'z+z/' into 'z z/'.  So that this normalisation hides
    nothing on airlock's side, airlock's prefixes are checked exactly here: each
    is a real key's prefix, ending at the first delimiter after Prefix."""
    out = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
    if rec.side == "airlock":
        pre, delim = params.get("Prefix", ""), params["Delimiter"] if out else ""
        for p in out:
            assert p.startswith(pre) and p.endswith(delim), p
            assert p.find(delim, len(pre)) == len(p) - len(delim), p
            assert any(k.startswith(p) for k in rec.keys), (p, rec.keys)
    return [p.replace("+", " ") for p in out]


def model_list(objects: dict, prefix: str, delimiter: str, marker: str, max_keys: int):
    """S3's listing rule (ListObjects docs), used as the oracle where moto is
    broken: moto does not count CommonPrefixes against MaxKeys, returns every
    CommonPrefix on every page and then pages by keys alone.  Keys sort in
    UTF-8 byte order (== code point order); a CommonPrefix counts as one entry;
    entries <= marker are skipped (so a NextMarker that is a CommonPrefix is not
    repeated); NextMarker is the last entry returned."""
    entries: list[tuple[str, bool]] = []
    for k in sorted(objects):
        if not k.startswith(prefix) or (marker and k <= marker):
            continue
        i = k.find(delimiter, len(prefix)) if delimiter else -1
        if i >= 0:
            cp = k[:i + len(delimiter)]
            if (marker and cp <= marker) or (entries and entries[-1] == (cp, True)):
                continue
            entries.append((cp, True))
        else:
            entries.append((k, False))
    page, truncated = entries[:max_keys], len(entries) > max_keys
    contents = [(k, *objects[k]) for k, is_cp in page if not is_cp]
    prefixes = [k for k, is_cp in page if is_cp]
    return contents, prefixes, truncated, (page[-1][0] if truncated and page else None)


def moto_objects(rec, b) -> dict:
    r = rec.client.list_objects_v2(Bucket=b)
    assert not r["IsTruncated"]
    return {c["Key"]: (c["Size"], c["ETag"]) for c in r.get("Contents", [])}


def model_pages(rec, b, version: int, params: dict, first_marker: str | None) -> list[dict]:
    objects = moto_objects(rec, b)
    prefix, delim = params.get("Prefix", ""), params.get("Delimiter", "")
    max_keys = params.get("MaxKeys", 1000)
    pages, marker, first = [], first_marker or "", True
    while True:
        contents, prefixes, truncated, nxt = model_list(objects, prefix, delim, marker, max_keys)
        page = {"contents": contents, "prefixes": [p.replace("+", " ") for p in prefixes],
                "truncated": truncated}
        if version == 1:
            page.update({"next_marker": truncated and bool(delim),
                         "prefix": prefix or None, "delimiter": delim or None, "max_keys": max_keys})
        else:
            page.update({"key_count": len(contents) + len(prefixes), "next_token": truncated,
                         "start_after": (first_marker or None) if first else None,
                         "prefix": prefix or None, "delimiter": delim or None, "max_keys": max_keys})
        pages.append(page)
        if not truncated:
            return pages
        marker = nxt if delim else contents[-1][0]
        first = False


def walk_v1(rec, b, **params):
    if rec.side == "moto" and params.get("Delimiter"):
        return model_pages(rec, b, 1, params, params.get("Marker"))
    return _walk_v1(rec, b, **params)


def walk_v2(rec, b, **params):
    if rec.side == "moto" and params.get("Delimiter"):
        return model_pages(rec, b, 2, params, params.get("StartAfter"))
    return _walk_v2(rec, b, **params)


def _walk_v1(rec, b, **params):
    """Follow a v1 listing to the end; one observation per page."""
    pages = []
    marker = params.pop("Marker", None)
    for _ in range(len(LIST_KEYS) + 5):
        kw = dict(params, Bucket=b)
        if marker is not None:
            kw["Marker"] = marker
        r = rec.client.list_objects(**kw)
        contents = [(c["Key"], c["Size"], c["ETag"]) for c in r.get("Contents", [])]
        prefixes = common_prefixes(rec, r, params)
        if rec.side == "airlock":
            # S3 echoes the Marker it was sent; moto does not, so it is checked here only
            assert r.get("Marker", "") == (marker or ""), (r.get("Marker"), marker)
        pages.append({"contents": contents, "prefixes": prefixes, "truncated": r["IsTruncated"],
                      # S3 sends NextMarker only with a delimiter (ListObjects docs); moto
                      # always does, so moto's is disregarded without one
                      "next_marker": "NextMarker" in r and (rec.side == "airlock"
                                                            or bool(params.get("Delimiter"))),
                      # S3 always sends <Prefix/> in v1 (empty when unset); moto omits it.
                      # boto3 lists v1 with encoding-type=url but does not decode Prefix;
                      # S3 url-encodes it (ListObjects docs), moto does not.
                      "prefix": (unquote(r.get("Prefix", "")) if rec.side == "airlock"
                                 else r.get("Prefix")) or None, "delimiter": r.get("Delimiter"),
                      "max_keys": r.get("MaxKeys")})
        if not r["IsTruncated"]:
            break
        marker = r.get("NextMarker") or (contents[-1][0] if contents else None)
        if marker is None:
            break
    return pages


def _walk_v2(rec, b, **params):
    """Follow a v2 listing to the end; tokens are compared by presence only."""
    pages = []
    token = None
    for _ in range(len(LIST_KEYS) + 5):
        kw = dict(params, Bucket=b)
        if token is not None:
            kw["ContinuationToken"] = token
        r = rec.client.list_objects_v2(**kw)
        contents = [(c["Key"], c["Size"], c["ETag"]) for c in r.get("Contents", [])]
        prefixes = common_prefixes(rec, r, params)
        pages.append({"contents": contents, "prefixes": prefixes, "truncated": r["IsTruncated"],
                      "key_count": r["KeyCount"], "next_token": "NextContinuationToken" in r,
                      # moto echoes StartAfter on the first page only
                      "start_after": None if token else r.get("StartAfter"), "prefix": r.get("Prefix") or None,
                      "delimiter": r.get("Delimiter"), "max_keys": r.get("MaxKeys")})
        token = r.get("NextContinuationToken")
        if not r["IsTruncated"] or token is None:
            break
    return pages


LIST_CASES = [
    {}, {"Prefix": "a"}, {"Prefix": "a/"}, {"Delimiter": "/"}, {"Prefix": "a/", "Delimiter": "/"},
    {"Prefix": "photos/", "Delimiter": "/"}, {"Prefix": "photos/2024/", "Delimiter": "/"},
    {"Delimiter": "/", "MaxKeys": 2}, {"MaxKeys": 1}, {"MaxKeys": 3}, {"Prefix": "a", "MaxKeys": 2},
    {"Prefix": "a", "Delimiter": "/", "MaxKeys": 1}, {"Delimiter": "b"}, {"Delimiter": "+"},
    {"Delimiter": " "}, {"Delimiter": "%"}, {"Prefix": "dir/", "Delimiter": "/", "MaxKeys": 1},
    {"Prefix": "nothing"}, {"Prefix": "a b"}, {"Prefix": "a+"}, {"Prefix": "a%"},
    {"Delimiter": "//"}, {"Prefix": "b/", "Delimiter": "/"}, {"Delimiter": "é"},
]
V1_ONLY = [{"Marker": "a/b"}, {"Marker": "b", "Delimiter": "/"}, {"Marker": "photos/", "Delimiter": "/"},
           {"Marker": "zzz"}, {"Marker": "a", "Prefix": "a", "MaxKeys": 2}]
V2_ONLY = [{"StartAfter": "a/b"}, {"StartAfter": "b", "Delimiter": "/"},
           {"StartAfter": "photos/", "Delimiter": "/", "MaxKeys": 1}, {"StartAfter": "zzz"},
           {"StartAfter": "a", "Prefix": "a", "MaxKeys": 2}]


def sc_listings(rec, b):
    rec("create_bucket", Bucket=b)
    rec.keys = LIST_KEYS
    for i, k in enumerate(LIST_KEYS):
        rec.client.put_object(Bucket=b, Key=k, Body=b"x" * i)
    for params in LIST_CASES + V1_ONLY:
        rec.note(("v1", tuple(sorted(params.items()))), walk_v1(rec, b, **params))
    for params in LIST_CASES + V2_ONLY:
        rec.note(("v2", tuple(sorted(params.items()))), walk_v2(rec, b, **params))
    rec("list_objects_v2", "KeyCount", "IsTruncated", "Contents", Bucket=b, MaxKeys=0)
    # more than 1000 asked: at most 1000 listed, the asked number echoed
    for op in ("list_objects", "list_objects_v2", "list_object_versions"):
        rec(op, "MaxKeys", "IsTruncated", Bucket=b, MaxKeys=5000)


def test_listings_match_moto(gw):
    differential(gw, sc_listings, new_bucket())


def sc_list_url_encoding(rec, b):
    rec("create_bucket", Bucket=b)
    for k in ("a b", "a+b", "é/x", "100%"):
        rec.client.put_object(Bucket=b, Key=k, Body=b"")
    # boto3 url-decodes Key/Prefix when EncodingType=url, so the round trip must be exact
    rec("list_objects", "Contents[].Key", "EncodingType", Bucket=b, EncodingType="url")
    rec("list_objects_v2", "Contents[].Key", "CommonPrefixes[].Prefix", Bucket=b, EncodingType="url",
        Delimiter="/")


def test_list_encoding_type_url_matches_moto(gw):
    differential(gw, sc_list_url_encoding, new_bucket())


# ---------------------------------------------------------------------------- hypothesis
key_strategy = st.text(alphabet=["a", "b", "/", " ", "+", "é", "%"], min_size=1, max_size=6)
list_params = st.fixed_dictionaries({}, optional={
    "Prefix": st.text(alphabet=["a", "b", "/", "é", "+"], max_size=3),
    "Delimiter": st.sampled_from(["/", "a", "+", " ", "é", "%"]),
    "MaxKeys": st.integers(min_value=1, max_value=5),
})
# no '+' or '%' in markers: moto percent-decodes start-after/marker with
# unquote_plus ('+' -> ' ', '%aa' -> U+FFFD) where S3 takes them literally;
# LIST_CASES covers '+' and '%' in keys, prefixes and delimiters
start = st.text(alphabet=["a", "b", "/", " ", "é"], max_size=4)


def sc_random_listing(rec, b, keys, params, start_after):
    rec.client.create_bucket(Bucket=b)
    rec.keys = keys
    for k in keys:
        rec.client.put_object(Bucket=b, Key=k, Body=k.encode())
    rec.note("v1", walk_v1(rec, b, **params, **({"Marker": start_after} if start_after else {})))
    rec.note("v2", walk_v2(rec, b, **params, **({"StartAfter": start_after} if start_after else {})))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.sets(key_strategy, min_size=0, max_size=8), params=list_params, start_after=start)
def test_random_listings_match_moto(gw, keys, params, start_after):
    differential(gw, sc_random_listing, new_bucket(), sorted(keys), params, start_after)
