"""End-to-end S3 API behaviour through real boto3 against a real gateway process.

One gateway per module (starting one per test would dominate the runtime);
every test makes its own bucket.  Client configurations are parametrized:
boto3's defaults (flexible checksums sent as aws-chunked trailers over HTTP)
and `when_required` (plain bodies, no checksum unless asked).  Hand-built
requests (aws-chunked signed and unsigned-with-trailer streams, chunked
transfer encoding, Expect: 100-continue) use botocore's SigV4 signer for the
headers and http.client / a raw socket for the wire.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
import zlib
from datetime import datetime, timedelta, timezone
from itertools import count
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from conftest import ACCESS_KEY, REGION, SECRET_KEY, Gateway, recv_head

MIB = 1024 * 1024
PART = 5 * MIB
_names = count()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("boto3") / "primary").start()
    yield g
    g.stop()


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 80)
        return True
    except OSError:
        return False


CLIENT_CONFIGS = {
    "default-checksums": {},
    "when-required": {"request_checksum_calculation": "when_required",
                      "response_checksum_validation": "when_required"},
}


@pytest.fixture(scope="module", params=list(CLIENT_CONFIGS))
def cli(request, gw):
    return gw.client(**CLIENT_CONFIGS[request.param])


@pytest.fixture(scope="module")
def s3c(gw):
    """Plain default-config client for tests not about client configuration."""
    return gw.client()


def _new_bucket(client) -> str:
    name = f"b3-{next(_names)}-{os.getpid()}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def bkt(cli):
    return _new_bucket(cli)


@pytest.fixture
def b(s3c):
    return _new_bucket(s3c)


def _code(exc: ClientError) -> str:
    return exc.response["Error"]["Code"]


def _status(exc: ClientError) -> int:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _crc32_b64(data: bytes) -> str:
    return _b64(zlib.crc32(data).to_bytes(4, "big"))


# ---------------------------------------------------------------------------- basic object ops
def test_put_get_head_delete_roundtrip(cli, bkt):
    data = os.urandom(300_000)
    put = cli.put_object(Bucket=bkt, Key="a/b.bin", Body=data)
    assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = cli.get_object(Bucket=bkt, Key="a/b.bin")
    assert got["Body"].read() == data
    assert got["ETag"] == put["ETag"]
    assert got["ContentLength"] == len(data)
    head = cli.head_object(Bucket=bkt, Key="a/b.bin")
    assert head["ContentLength"] == len(data) and head["ETag"] == put["ETag"]
    cli.delete_object(Bucket=bkt, Key="a/b.bin")
    with pytest.raises(ClientError) as ei:
        cli.get_object(Bucket=bkt, Key="a/b.bin")
    assert _code(ei.value) == "NoSuchKey" and _status(ei.value) == 404
    with pytest.raises(ClientError) as ei:
        cli.head_object(Bucket=bkt, Key="a/b.bin")
    assert _status(ei.value) == 404


def test_empty_object_roundtrips(cli, bkt):
    cli.put_object(Bucket=bkt, Key="empty", Body=b"")
    got = cli.get_object(Bucket=bkt, Key="empty")
    assert got["Body"].read() == b"" and got["ETag"] == f'"{hashlib.md5(b"").hexdigest()}"'


def test_delete_missing_key_is_204(cli, bkt):
    r = cli.delete_object(Bucket=bkt, Key="never-existed")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 204


def test_user_metadata_and_standard_headers_roundtrip(cli, bkt):
    expires = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    cli.put_object(Bucket=bkt, Key="m", Body=b"hello", Metadata={"color": "blue", "owner-id": "42"},
                   ContentType="text/plain; charset=utf-8", CacheControl="max-age=60",
                   ContentDisposition='attachment; filename="x.txt"', ContentEncoding="identity",
                   ContentLanguage="de-DE", Expires=expires)
    for r in (cli.head_object(Bucket=bkt, Key="m"), cli.get_object(Bucket=bkt, Key="m")):
        assert r["Metadata"] == {"color": "blue", "owner-id": "42"}
        assert r["ContentType"] == "text/plain; charset=utf-8"
        assert r["CacheControl"] == "max-age=60"
        assert r["ContentDisposition"] == 'attachment; filename="x.txt"'
        assert r["ContentEncoding"] == "identity"
        assert r["ContentLanguage"] == "de-DE"
        assert r["ResponseMetadata"]["HTTPHeaders"]["expires"] == "Wed, 02 Jan 2030 03:04:05 GMT"


def test_non_ascii_user_metadata_is_answered_rfc2047_encoded(gw, s3c, b):
    """S3 decodes a non-ASCII x-amz-meta-* value before storing it (raw UTF-8
    on the wire, or RFC 2047 encoded-words) and answers it as one RFC 2047
    word, so the response header stays ASCII; an ASCII value comes back as
    sent (S3 user guide, "User-defined object metadata").  botocore refuses
    non-ASCII metadata itself, so the PUTs are hand-signed; moto cannot say."""
    word = "=?UTF-8?B?" + base64.b64encode("Grüße ✓".encode()).decode() + "?="
    sent_forms = {"utf8": "Grüße ✓".encode(), "b-word": word.encode(),
                  "q-word": b"=?utf-8?q?Gr=C3=BC=C3=9Fe_=E2=9C=93?="}
    for name, raw in sent_forms.items():
        url = f"{gw.endpoint}/{b}/{name}"
        req = _signed("PUT", url, b"x", {"x-amz-meta-greeting": raw.decode(), "x-amz-meta-plain": "ascii =?x?"})
        headers = {k: v for k, v in req.headers.items()}
        headers["x-amz-meta-greeting"] = raw               # the bytes themselves, not http.client's latin-1
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        conn.request("PUT", urlsplit(url).path, body=b"x", headers=headers)
        r = conn.getresponse()
        assert r.status == 200, r.read()
        conn.close()
        for got in (s3c.head_object(Bucket=b, Key=name), s3c.get_object(Bucket=b, Key=name)):
            assert got["Metadata"] == {"greeting": word, "plain": "ascii =?x?"}, name
    s3c.copy_object(Bucket=b, Key="copied", CopySource={"Bucket": b, "Key": "utf8"})
    assert s3c.head_object(Bucket=b, Key="copied")["Metadata"]["greeting"] == word


def test_gzip_content_encoding_body_is_stored_verbatim(cli, bkt):
    import gzip
    raw = gzip.compress(b"hello " * 1000)
    cli.put_object(Bucket=bkt, Key="gz", Body=raw, ContentEncoding="gzip", ContentType="text/plain")
    r = cli.get_object(Bucket=bkt, Key="gz")
    assert r["ContentEncoding"] == "gzip"
    assert r["ResponseMetadata"]["HTTPHeaders"]["content-length"] == str(len(raw))


def test_get_response_overrides_replace_headers(s3c, b):
    s3c.put_object(Bucket=b, Key="o", Body=b"x", ContentType="text/plain")
    r = s3c.get_object(Bucket=b, Key="o", ResponseContentType="application/json",
                       ResponseContentDisposition="inline", ResponseCacheControl="no-cache")
    assert r["ContentType"] == "application/json"
    assert r["ContentDisposition"] == "inline" and r["CacheControl"] == "no-cache"


# ---------------------------------------------------------------------------- ranges
def test_ranges_return_206_with_content_range(cli, bkt):
    data = bytes(range(256)) * 40   # 10240 bytes
    cli.put_object(Bucket=bkt, Key="r", Body=data)
    r = cli.get_object(Bucket=bkt, Key="r", Range="bytes=100-199")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert r["ContentRange"] == f"bytes 100-199/{len(data)}"
    assert r["Body"].read() == data[100:200]
    r = cli.get_object(Bucket=bkt, Key="r", Range="bytes=-300")
    assert r["Body"].read() == data[-300:] and r["ContentRange"] == f"bytes {len(data) - 300}-{len(data) - 1}/{len(data)}"
    r = cli.get_object(Bucket=bkt, Key="r", Range="bytes=10000-")
    assert r["Body"].read() == data[10000:]
    r = cli.get_object(Bucket=bkt, Key="r", Range="bytes=10000-99999")   # end past size is clamped
    assert r["Body"].read() == data[10000:] and r["ContentLength"] == len(data) - 10000
    r = cli.get_object(Bucket=bkt, Key="r", Range="bytes=-999999")       # suffix longer than object
    assert r["Body"].read() == data


def test_unsatisfiable_range_is_416_invalid_range_with_size(s3c, b):
    s3c.put_object(Bucket=b, Key="r", Body=b"0123456789")
    with pytest.raises(ClientError) as ei:
        s3c.get_object(Bucket=b, Key="r", Range="bytes=10-20")
    assert _status(ei.value) == 416 and _code(ei.value) == "InvalidRange"
    assert ei.value.response["Error"]["ActualObjectSize"] == "10"


def test_head_with_range_reports_partial_length(s3c, b):
    s3c.put_object(Bucket=b, Key="r", Body=b"0123456789")
    h = s3c.head_object(Bucket=b, Key="r", Range="bytes=2-5")
    assert h["ResponseMetadata"]["HTTPStatusCode"] == 206 and h["ContentLength"] == 4


# ---------------------------------------------------------------------------- conditionals
def test_conditional_get_and_head(cli, bkt):
    etag = cli.put_object(Bucket=bkt, Key="c", Body=b"cond")["ETag"]
    assert cli.get_object(Bucket=bkt, Key="c", IfMatch=etag)["Body"].read() == b"cond"
    for call in (cli.get_object, cli.head_object):
        with pytest.raises(ClientError) as ei:
            call(Bucket=bkt, Key="c", IfMatch='"0000"')
        assert _status(ei.value) == 412
        with pytest.raises(ClientError) as ei:
            call(Bucket=bkt, Key="c", IfNoneMatch=etag)
        assert _status(ei.value) == 304
    past = datetime.now(timezone.utc) - timedelta(days=1)
    future = datetime.now(timezone.utc) + timedelta(days=1)
    assert cli.get_object(Bucket=bkt, Key="c", IfModifiedSince=past)["Body"].read() == b"cond"
    with pytest.raises(ClientError) as ei:
        cli.get_object(Bucket=bkt, Key="c", IfModifiedSince=future)
    assert _status(ei.value) == 304
    assert cli.head_object(Bucket=bkt, Key="c", IfUnmodifiedSince=future)["ETag"] == etag
    with pytest.raises(ClientError) as ei:
        cli.get_object(Bucket=bkt, Key="c", IfUnmodifiedSince=past)
    assert _status(ei.value) == 412 and _code(ei.value) == "PreconditionFailed"


def test_if_match_wins_over_if_unmodified_since(s3c, b):
    etag = s3c.put_object(Bucket=b, Key="c", Body=b"x")["ETag"]
    past = datetime.now(timezone.utc) - timedelta(days=1)
    assert s3c.get_object(Bucket=b, Key="c", IfMatch=etag, IfUnmodifiedSince=past)["Body"].read() == b"x"


def test_put_if_none_match_star_refuses_overwrite(cli, bkt):
    cli.put_object(Bucket=bkt, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as ei:
        cli.put_object(Bucket=bkt, Key="once", Body=b"second", IfNoneMatch="*")
    assert _status(ei.value) == 412 and _code(ei.value) == "PreconditionFailed"
    assert cli.get_object(Bucket=bkt, Key="once")["Body"].read() == b"first"


def test_put_if_match_replaces_only_the_expected_version(s3c, b):
    etag = s3c.put_object(Bucket=b, Key="k", Body=b"v1")["ETag"]
    s3c.put_object(Bucket=b, Key="k", Body=b"v2", IfMatch=etag)
    with pytest.raises(ClientError) as ei:
        s3c.put_object(Bucket=b, Key="k", Body=b"v3", IfMatch=etag)
    assert _status(ei.value) == 412
    assert s3c.get_object(Bucket=b, Key="k")["Body"].read() == b"v2"


# ---------------------------------------------------------------------------- copy
def test_copy_object_copy_directive_keeps_metadata(cli, bkt):
    cli.put_object(Bucket=bkt, Key="src", Body=b"payload", Metadata={"a": "1"}, ContentType="text/x-src")
    r = cli.copy_object(Bucket=bkt, Key="dst", CopySource={"Bucket": bkt, "Key": "src"})
    assert r["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(b"payload").hexdigest()}"'
    h = cli.head_object(Bucket=bkt, Key="dst")
    assert h["Metadata"] == {"a": "1"} and h["ContentType"] == "text/x-src"
    assert cli.get_object(Bucket=bkt, Key="dst")["Body"].read() == b"payload"


def test_copy_object_replace_directive_replaces_metadata(cli, bkt):
    cli.put_object(Bucket=bkt, Key="src", Body=b"payload", Metadata={"a": "1"}, ContentType="text/x-src")
    cli.copy_object(Bucket=bkt, Key="dst", CopySource={"Bucket": bkt, "Key": "src"},
                    MetadataDirective="REPLACE", Metadata={"b": "2"}, ContentType="text/x-dst")
    h = cli.head_object(Bucket=bkt, Key="dst")
    assert h["Metadata"] == {"b": "2"} and h["ContentType"] == "text/x-dst"


def test_copy_with_a_checksum_algorithm_gives_the_copy_that_checksum(s3c, b):
    """CopyObject's x-amz-checksum-algorithm: "You can optionally specify a
    different checksum algorithm"; the copy then has that checksum of its
    bytes (FULL_OBJECT), not the source's; an unknown algorithm is 400.
    moto names the algorithm but gets the CRC32C value wrong, so the values
    are botocore's own."""
    data = b"source data" * 100
    s3c.put_object(Bucket=b, Key="src", Body=data, ChecksumAlgorithm="SHA256")
    r = s3c.copy_object(Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "src"}, ChecksumAlgorithm="CRC32C")
    from awscrt import checksums as crt
    want = base64.b64encode(crt.crc32c(data).to_bytes(4, "big")).decode()
    assert r["CopyObjectResult"].get("ChecksumCRC32C") == want and "ChecksumSHA256" not in r["CopyObjectResult"]
    assert r["CopyObjectResult"].get("ChecksumType") == "FULL_OBJECT"
    h = s3c.head_object(Bucket=b, Key="dst", ChecksumMode="ENABLED")
    assert (h.get("ChecksumCRC32C"), h.get("ChecksumSHA256"), h.get("ChecksumType")) == (want, None, "FULL_OBJECT")
    assert s3c.get_object(Bucket=b, Key="dst", ChecksumMode="ENABLED")["Body"].read() == data  # botocore checks it
    # a multipart source with a COMPOSITE checksum: the copy's is the whole object's CRC32
    parts = [os.urandom(PART), b"tail"]
    up = s3c.create_multipart_upload(Bucket=b, Key="mp", ChecksumAlgorithm="SHA1")["UploadId"]
    done = [{"PartNumber": n, **{k: v for k, v in s3c.upload_part(
        Bucket=b, Key="mp", UploadId=up, PartNumber=n, Body=p, ChecksumAlgorithm="SHA1").items()
        if k in ("ETag", "ChecksumSHA1")}} for n, p in enumerate(parts, 1)]
    s3c.complete_multipart_upload(Bucket=b, Key="mp", UploadId=up, MultipartUpload={"Parts": done})
    s3c.copy_object(Bucket=b, Key="mp-copy", CopySource={"Bucket": b, "Key": "mp"}, ChecksumAlgorithm="CRC32")
    h = s3c.head_object(Bucket=b, Key="mp-copy", ChecksumMode="ENABLED")
    whole = base64.b64encode(zlib.crc32(b"".join(parts)).to_bytes(4, "big")).decode()
    assert (h.get("ChecksumCRC32"), h.get("ChecksumSHA1"), h.get("ChecksumType")) == (whole, None, "FULL_OBJECT")
    with pytest.raises(ClientError) as ei:
        s3c.copy_object(Bucket=b, Key="bad", CopySource={"Bucket": b, "Key": "src"}, ChecksumAlgorithm="MD4")
    assert _status(ei.value) == 400


def test_copy_to_self_without_change_is_invalid_request(s3c, b):
    s3c.put_object(Bucket=b, Key="self", Body=b"x", Metadata={"a": "1"})
    with pytest.raises(ClientError) as ei:
        s3c.copy_object(Bucket=b, Key="self", CopySource={"Bucket": b, "Key": "self"})
    assert _code(ei.value) == "InvalidRequest" and _status(ei.value) == 400
    s3c.copy_object(Bucket=b, Key="self", CopySource={"Bucket": b, "Key": "self"},
                    MetadataDirective="REPLACE", Metadata={"a": "2"})
    assert s3c.head_object(Bucket=b, Key="self")["Metadata"] == {"a": "2"}


def test_copy_source_if_match(s3c, b):
    etag = s3c.put_object(Bucket=b, Key="src", Body=b"x")["ETag"]
    s3c.copy_object(Bucket=b, Key="ok", CopySource={"Bucket": b, "Key": "src"}, CopySourceIfMatch=etag)
    with pytest.raises(ClientError) as ei:
        s3c.copy_object(Bucket=b, Key="no", CopySource={"Bucket": b, "Key": "src"},
                        CopySourceIfMatch='"ffff"')
    assert _status(ei.value) == 412 and _code(ei.value) == "PreconditionFailed"
    with pytest.raises(ClientError) as ei:
        s3c.copy_object(Bucket=b, Key="no", CopySource={"Bucket": b, "Key": "src"},
                        CopySourceIfNoneMatch=etag)
    assert _status(ei.value) == 412


def test_copy_key_with_special_characters(s3c, b):
    key = "dir with space/ünï+cøde%20&=?.txt"
    s3c.put_object(Bucket=b, Key=key, Body=b"special")
    s3c.copy_object(Bucket=b, Key=key + ".copy", CopySource={"Bucket": b, "Key": key})
    assert s3c.get_object(Bucket=b, Key=key + ".copy")["Body"].read() == b"special"


def test_copy_missing_source_is_no_such_key(s3c, b):
    with pytest.raises(ClientError) as ei:
        s3c.copy_object(Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "missing"})
    assert _code(ei.value) == "NoSuchKey"


# ---------------------------------------------------------------------------- multipart
def _mpu(client, bucket, key, parts: list[bytes], **create_kw):
    up = client.create_multipart_upload(Bucket=bucket, Key=key, **create_kw)["UploadId"]
    etags = []
    for i, p in enumerate(parts, 1):
        etags.append(client.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=i, Body=p)["ETag"])
    return up, etags


def test_multipart_etag_is_md5_of_part_md5s(cli, bkt):
    parts = [os.urandom(PART), os.urandom(PART), os.urandom(1234)]
    up, etags = _mpu(cli, bkt, "mp", parts)
    assert etags == [f'"{hashlib.md5(p).hexdigest()}"' for p in parts]
    r = cli.complete_multipart_upload(Bucket=bkt, Key="mp", UploadId=up, MultipartUpload={
        "Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]})
    want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
    assert r["ETag"] == f'"{want}"'
    got = cli.get_object(Bucket=bkt, Key="mp")
    assert got["ETag"] == f'"{want}"'
    assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(b"".join(parts)).digest()
    p2 = cli.get_object(Bucket=bkt, Key="mp", PartNumber=2)
    assert p2["ResponseMetadata"]["HTTPStatusCode"] == 206 and p2["PartsCount"] == 3
    assert p2["Body"].read() == parts[1]
    assert cli.head_object(Bucket=bkt, Key="mp", PartNumber=3)["ContentLength"] == 1234
    with pytest.raises(ClientError) as ei:
        cli.list_parts(Bucket=bkt, Key="mp", UploadId=up)
    assert _code(ei.value) == "NoSuchUpload"


def test_a_part_number_or_a_range_of_one_part_answers_that_parts_checksum(s3c, b):
    """S3 user guide ("Checking object integrity"): "For completed uploads,
    you can get an individual part's checksum by using the GetObject or
    HeadObject operations and specifying a part number or byte range that
    aligns to a single part".  Any other range has no checksum; a single-part
    object is its own part 1.  moto ignores partNumber, so S3's answer is
    asserted."""
    parts = [os.urandom(PART), b"the tail part"]
    up = s3c.create_multipart_upload(Bucket=b, Key="mp", ChecksumAlgorithm="CRC32", ChecksumType="COMPOSITE")
    done = []
    for n, p in enumerate(parts, 1):
        r = s3c.upload_part(Bucket=b, Key="mp", UploadId=up["UploadId"], PartNumber=n, Body=p,
                            ChecksumAlgorithm="CRC32")
        done.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    s3c.complete_multipart_upload(Bucket=b, Key="mp", UploadId=up["UploadId"], MultipartUpload={"Parts": done})
    crc = [base64.b64encode(zlib.crc32(p).to_bytes(4, "big")).decode() for p in parts]
    assert [d["ChecksumCRC32"] for d in done] == crc
    h = s3c.head_object(Bucket=b, Key="mp", PartNumber=1, ChecksumMode="ENABLED")
    assert (h["ContentLength"], h.get("ChecksumCRC32"), h.get("PartsCount")) == (PART, crc[0], 2)
    assert "ChecksumCRC32" not in s3c.head_object(Bucket=b, Key="mp", PartNumber=1)   # not asked for
    r = s3c.get_object(Bucket=b, Key="mp", PartNumber=2, ChecksumMode="ENABLED")
    assert r.get("ChecksumCRC32") == crc[1] and r["Body"].read() == parts[1]       # botocore checks it too
    r = s3c.get_object(Bucket=b, Key="mp", Range=f"bytes={PART}-", ChecksumMode="ENABLED")
    assert r.get("ChecksumCRC32") == crc[1] and r["Body"].read() == parts[1]
    r = s3c.get_object(Bucket=b, Key="mp", Range=f"bytes={PART}-{PART + 2}", ChecksumMode="ENABLED")
    assert "ChecksumCRC32" not in r and r["Body"].read() == parts[1][:3]
    s3c.put_object(Bucket=b, Key="one", Body=b"single", ChecksumAlgorithm="SHA256")
    whole = base64.b64encode(hashlib.sha256(b"single").digest()).decode()
    assert s3c.head_object(Bucket=b, Key="one", PartNumber=1, ChecksumMode="ENABLED").get("ChecksumSHA256") == whole


def test_multipart_small_non_last_part_is_entity_too_small(s3c, b):
    up, etags = _mpu(s3c, b, "small", [b"a" * 100, b"b" * 100])
    with pytest.raises(ClientError) as ei:
        s3c.complete_multipart_upload(Bucket=b, Key="small", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]})
    assert _code(ei.value) == "EntityTooSmall" and _status(ei.value) == 400
    with pytest.raises(ClientError):
        s3c.head_object(Bucket=b, Key="small")


def test_multipart_unknown_part_and_bad_order(s3c, b):
    up, etags = _mpu(s3c, b, "bad", [b"a" * 10, b"b" * 10])
    with pytest.raises(ClientError) as ei:
        s3c.complete_multipart_upload(Bucket=b, Key="bad", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]})
    assert _code(ei.value) == "InvalidPart"
    with pytest.raises(ClientError) as ei:
        s3c.complete_multipart_upload(Bucket=b, Key="bad", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 2, "ETag": etags[1]}, {"PartNumber": 1, "ETag": etags[0]}]})
    assert _code(ei.value) == "InvalidPartOrder"
    with pytest.raises(ClientError) as ei:
        s3c.complete_multipart_upload(Bucket=b, Key="bad", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 3, "ETag": etags[0]}]})
    assert _code(ei.value) == "InvalidPart"


def _complete(client, bucket, key, up, etags):
    return client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up, MultipartUpload={
        "Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]})


def test_a_retried_complete_multipart_upload_gets_the_first_answer_and_makes_no_new_version(s3c, b):
    s3c.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    parts = [os.urandom(PART), b"tail"]
    up, etags = _mpu(s3c, b, "retried", parts)
    first = _complete(s3c, b, "retried", up, etags)
    again = _complete(s3c, b, "retried", up, etags)       # as an SDK does when the first answer was lost
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert (again["ETag"], again["VersionId"], again["Key"]) == (first["ETag"], first["VersionId"], "retried")
    versions = s3c.list_object_versions(Bucket=b, Prefix="retried")["Versions"]
    assert [v["VersionId"] for v in versions] == [first["VersionId"]]
    assert s3c.get_object(Bucket=b, Key="retried")["Body"].read() == b"".join(parts)
    # other parts than the completion's: the upload is gone
    with pytest.raises(ClientError) as ei:
        _complete(s3c, b, "retried", up, etags[:1])
    assert _code(ei.value) == "NoSuchUpload"
    # the same upload id under another key: gone
    with pytest.raises(ClientError) as ei:
        _complete(s3c, b, "elsewhere", up, etags)
    assert _code(ei.value) == "NoSuchUpload"


def test_a_retried_complete_is_checked_as_the_first_one_was(s3c, b):
    """A retry names the same parts; a checksum it claims (whole object,
    type, a part's) must be the completed object's, as for the first."""
    parts = [os.urandom(PART), b"tail"]
    up = s3c.create_multipart_upload(Bucket=b, Key="claims", ChecksumAlgorithm="CRC32")["UploadId"]
    done = []
    for i, p in enumerate(parts, 1):
        r = s3c.upload_part(Bucket=b, Key="claims", UploadId=up, PartNumber=i, Body=p, ChecksumAlgorithm="CRC32")
        done.append({"PartNumber": i, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    first = s3c.complete_multipart_upload(Bucket=b, Key="claims", UploadId=up, MultipartUpload={"Parts": done})

    def retry(parts=done, **kw):
        return s3c.complete_multipart_upload(Bucket=b, Key="claims", UploadId=up,
                                             MultipartUpload={"Parts": parts}, **kw)
    assert retry(ChecksumCRC32=first["ChecksumCRC32"])["ETag"] == first["ETag"]
    bad_part = [dict(done[0], ChecksumCRC32="AAAAAA=="), done[1]]
    for kw, parts, code in [({"ChecksumCRC32": "AAAAAA=="}, done, "BadDigest"),
                            ({"ChecksumType": "FULL_OBJECT"}, done, "InvalidRequest"),
                            ({}, bad_part, "InvalidPart"),
                            ({}, [done[1], done[0]], "InvalidPartOrder")]:
        with pytest.raises(ClientError) as ei:
            retry(parts, **kw)
        assert _code(ei.value) == code, kw
    assert len(s3c.list_object_versions(Bucket=b, Prefix="claims")["Versions"]) == 1


def test_a_retried_complete_after_the_key_was_overwritten_is_no_such_upload(s3c, b):
    up, etags = _mpu(s3c, b, "later", [b"only part"])
    _complete(s3c, b, "later", up, etags)
    s3c.put_object(Bucket=b, Key="later", Body=b"a newer object")
    with pytest.raises(ClientError) as ei:
        _complete(s3c, b, "later", up, etags)
    assert _code(ei.value) == "NoSuchUpload" and _status(ei.value) == 404
    assert s3c.get_object(Bucket=b, Key="later")["Body"].read() == b"a newer object"


def test_concurrent_completes_of_one_upload_make_one_version_and_agree(gw, b):
    from concurrent.futures import ThreadPoolExecutor
    s3c = gw.client()
    s3c.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    up, etags = _mpu(s3c, b, "raced", [os.urandom(PART), b"end"])
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _i: _complete(gw.client(), b, "raced", up, etags), range(4)))
    assert {(a["ETag"], a["VersionId"]) for a in answers} == {(answers[0]["ETag"], answers[0]["VersionId"])}
    assert len(s3c.list_object_versions(Bucket=b, Prefix="raced")["Versions"]) == 1


def test_an_abort_racing_completes_of_one_upload_never_both_succeed(gw, b):
    from concurrent.futures import ThreadPoolExecutor
    s3c = gw.client()

    def attempt(call):
        try:
            call(gw.client())
            return "ok"
        except ClientError as e:
            return _code(e)
    for round_ in range(5):
        key = f"race{round_}"
        up, etags = _mpu(s3c, b, key, [b"only part"])
        calls = [lambda c: _complete(c, b, key, up, etags)] * 3 + \
                [lambda c: c.abort_multipart_upload(Bucket=b, Key=key, UploadId=up)]
        with ThreadPoolExecutor(4) as pool:
            *completes, abort = pool.map(attempt, calls)
        exists = bool(s3c.list_objects_v2(Bucket=b, Prefix=key).get("KeyCount"))
        if abort == "ok":
            assert not exists and set(completes) == {"NoSuchUpload"}, (completes, abort)
        else:
            assert abort == "NoSuchUpload" and exists and set(completes) == {"ok"}, (completes, abort)


def test_list_parts_uploads_and_abort(cli, bkt):
    up, etags = _mpu(cli, bkt, "dir/lp", [b"x" * 100, b"y" * 200, b"z" * 300])
    parts = cli.list_parts(Bucket=bkt, Key="dir/lp", UploadId=up)
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in parts["Parts"]] == \
        [(1, etags[0], 100), (2, etags[1], 200), (3, etags[2], 300)]
    page = cli.list_parts(Bucket=bkt, Key="dir/lp", UploadId=up, MaxParts=2)
    assert page["IsTruncated"] and [p["PartNumber"] for p in page["Parts"]] == [1, 2]
    rest = cli.list_parts(Bucket=bkt, Key="dir/lp", UploadId=up,
                          PartNumberMarker=page["NextPartNumberMarker"])
    assert [p["PartNumber"] for p in rest["Parts"]] == [3] and not rest["IsTruncated"]
    up2 = cli.create_multipart_upload(Bucket=bkt, Key="other")["UploadId"]
    ups = cli.list_multipart_uploads(Bucket=bkt)["Uploads"]
    assert sorted((u["Key"], u["UploadId"]) for u in ups) == sorted([("dir/lp", up), ("other", up2)])
    delim = cli.list_multipart_uploads(Bucket=bkt, Delimiter="/")
    assert [p["Prefix"] for p in delim.get("CommonPrefixes", [])] == ["dir/"]
    assert [u["Key"] for u in delim["Uploads"]] == ["other"]
    cli.abort_multipart_upload(Bucket=bkt, Key="dir/lp", UploadId=up)
    for call in (lambda: cli.list_parts(Bucket=bkt, Key="dir/lp", UploadId=up),
                 lambda: cli.upload_part(Bucket=bkt, Key="dir/lp", UploadId=up, PartNumber=4, Body=b"q"),
                 lambda: cli.complete_multipart_upload(Bucket=bkt, Key="dir/lp", UploadId=up,
                                                       MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etags[0]}]})):
        with pytest.raises(ClientError) as ei:
            call()
        assert _code(ei.value) == "NoSuchUpload" and _status(ei.value) == 404
    assert [u["Key"] for u in cli.list_multipart_uploads(Bucket=bkt).get("Uploads", [])] == ["other"]


def test_upload_part_copy_with_range(s3c, b):
    src = os.urandom(PART + 4096)
    s3c.put_object(Bucket=b, Key="src", Body=src)
    up = s3c.create_multipart_upload(Bucket=b, Key="dst")["UploadId"]
    r1 = s3c.upload_part_copy(Bucket=b, Key="dst", UploadId=up, PartNumber=1,
                              CopySource={"Bucket": b, "Key": "src"}, CopySourceRange=f"bytes=0-{PART - 1}")
    r2 = s3c.upload_part_copy(Bucket=b, Key="dst", UploadId=up, PartNumber=2,
                              CopySource={"Bucket": b, "Key": "src"}, CopySourceRange=f"bytes={PART}-{PART + 99}")
    assert r1["CopyPartResult"]["ETag"] == f'"{hashlib.md5(src[:PART]).hexdigest()}"'
    assert r2["CopyPartResult"]["ETag"] == f'"{hashlib.md5(src[PART:PART + 100]).hexdigest()}"'
    s3c.complete_multipart_upload(Bucket=b, Key="dst", UploadId=up, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": r1["CopyPartResult"]["ETag"]},
        {"PartNumber": 2, "ETag": r2["CopyPartResult"]["ETag"]}]})
    assert s3c.get_object(Bucket=b, Key="dst")["Body"].read() == src[:PART + 100]


def test_multipart_with_sha256_checksum_is_composite(s3c, b):
    parts = [os.urandom(PART), b"tail"]
    up = s3c.create_multipart_upload(Bucket=b, Key="ck", ChecksumAlgorithm="SHA256")["UploadId"]
    done = []
    for i, p in enumerate(parts, 1):
        r = s3c.upload_part(Bucket=b, Key="ck", UploadId=up, PartNumber=i, Body=p, ChecksumAlgorithm="SHA256")
        assert r["ChecksumSHA256"] == _b64(hashlib.sha256(p).digest())
        done.append({"PartNumber": i, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]})
    s3c.complete_multipart_upload(Bucket=b, Key="ck", UploadId=up, MultipartUpload={"Parts": done})
    h = s3c.head_object(Bucket=b, Key="ck", ChecksumMode="ENABLED")
    want = _b64(hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()) + "-2"
    assert h["ChecksumSHA256"] == want


def test_a_part_sent_with_another_checksum_or_none_still_gets_the_uploads_checksum(s3c, b):
    """The upload's algorithm is computed for every part, whatever the part
    came with: the completed object never silently loses its checksum."""
    parts = [os.urandom(PART), os.urandom(PART), b"no checksum, the last part"]
    up = s3c.create_multipart_upload(Bucket=b, Key="mixed", ChecksumAlgorithm="SHA256")["UploadId"]
    listed = s3c.list_multipart_uploads(Bucket=b)["Uploads"]
    assert [(u["Key"], u["ChecksumAlgorithm"]) for u in listed] == [("mixed", "SHA256")]
    done = []
    for i, (p, alg) in enumerate(zip(parts, ["SHA256", "CRC32", None]), 1):
        kw = {"ChecksumAlgorithm": alg} if alg else {}
        r = s3c.upload_part(Bucket=b, Key="mixed", UploadId=up, PartNumber=i, Body=p, **kw)
        assert r["ChecksumSHA256"] == _b64(hashlib.sha256(p).digest())
        done.append({"PartNumber": i, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]})
    s3c.complete_multipart_upload(Bucket=b, Key="mixed", UploadId=up, MultipartUpload={"Parts": done})
    h = s3c.head_object(Bucket=b, Key="mixed", ChecksumMode="ENABLED")
    assert h["ChecksumSHA256"] == _b64(hashlib.sha256(b"".join(hashlib.sha256(p).digest()
                                                                for p in parts)).digest()) + "-3"


def _parts_with(client, bucket, key, up, bodies, alg):
    """Upload `bodies` as parts 1.. with checksum `alg`: the Complete's part list, each checksum in it."""
    done = []
    for i, p in enumerate(bodies, 1):
        r = client.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=i, Body=p, ChecksumAlgorithm=alg)
        done.append({"PartNumber": i, "ETag": r["ETag"], f"Checksum{alg}": r[f"Checksum{alg}"]})
    return done


@pytest.mark.parametrize("alg", ["SHA256", "SHA1", "CRC32", "CRC32C"])
def test_completing_a_composite_checksum_upload_without_a_parts_checksum_is_invalid_request(s3c, b, alg):
    """S3: the object checksum of a COMPOSITE upload is made of its parts'
    checksums, and the Complete must list every one of them; one left out is
    400 InvalidRequest naming the part, and the upload stays to be completed
    right (a retry of a completed one is refused the same way)."""
    bodies = [os.urandom(PART), b"tail"]
    up = s3c.create_multipart_upload(Bucket=b, Key="comp", ChecksumAlgorithm=alg)["UploadId"]
    done = _parts_with(s3c, b, "comp", up, bodies, alg)
    bare = [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in done]
    for parts, missing in ((bare, 1), ([done[0], bare[1]], 2)):
        with pytest.raises(ClientError) as ei:
            s3c.complete_multipart_upload(Bucket=b, Key="comp", UploadId=up, MultipartUpload={"Parts": parts})
        assert _code(ei.value) == "InvalidRequest" and _status(ei.value) == 400
        msg = ei.value.response["Error"]["Message"]
        assert f"created using a {alg.lower()} checksum" in msg and f"missing for part {missing} " in msg, msg
    assert len(s3c.list_parts(Bucket=b, Key="comp", UploadId=up)["Parts"]) == 2      # still there
    first = s3c.complete_multipart_upload(Bucket=b, Key="comp", UploadId=up, MultipartUpload={"Parts": done})
    assert first[f"Checksum{alg}"].endswith("-2") and first["ChecksumType"] == "COMPOSITE"
    with pytest.raises(ClientError) as ei:            # a retry is checked as the first one
        s3c.complete_multipart_upload(Bucket=b, Key="comp", UploadId=up, MultipartUpload={"Parts": bare})
    assert _code(ei.value) == "InvalidRequest"
    again = s3c.complete_multipart_upload(Bucket=b, Key="comp", UploadId=up, MultipartUpload={"Parts": done})
    assert again["ETag"] == first["ETag"]
    assert s3c.get_object(Bucket=b, Key="comp")["Body"].read() == b"".join(bodies)


@pytest.mark.parametrize("alg", ["CRC32", "CRC32C", "CRC64NVME"])
def test_a_full_object_checksum_upload_completes_without_the_parts_checksums(s3c, b, alg):
    """S3: with a FULL_OBJECT checksum the part checksums in the Complete are
    optional; the object's checksum is that of its whole body all the same."""
    bodies = [os.urandom(PART), b"tail"]
    up = s3c.create_multipart_upload(Bucket=b, Key="full", ChecksumAlgorithm=alg,
                                     ChecksumType="FULL_OBJECT")["UploadId"]
    done = _parts_with(s3c, b, "full", up, bodies, alg)
    bare = [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in done]
    r = s3c.complete_multipart_upload(Bucket=b, Key="full", UploadId=up, MultipartUpload={"Parts": bare})
    assert r["ChecksumType"] == "FULL_OBJECT"
    assert r[f"Checksum{alg}"] == _expected_checksum(alg, b"".join(bodies))
    again = s3c.complete_multipart_upload(Bucket=b, Key="full", UploadId=up, MultipartUpload={"Parts": bare})
    assert again["ETag"] == r["ETag"]


def test_a_self_copy_that_only_sets_a_website_redirect_is_allowed(s3c, b):
    s3c.put_object(Bucket=b, Key="page", Body=b"<html/>", WebsiteRedirectLocation="/old")
    s3c.copy_object(Bucket=b, Key="page", CopySource={"Bucket": b, "Key": "page"}, WebsiteRedirectLocation="/new")
    assert s3c.head_object(Bucket=b, Key="page")["WebsiteRedirectLocation"] == "/new"
    # S3: not copied with the metadata directive; a copy elsewhere without the header has none
    s3c.copy_object(Bucket=b, Key="other", CopySource={"Bucket": b, "Key": "page"})
    assert "WebsiteRedirectLocation" not in s3c.head_object(Bucket=b, Key="other")
    assert s3c.get_object(Bucket=b, Key="other")["Body"].read() == b"<html/>"
    s3c.copy_object(Bucket=b, Key="page", CopySource={"Bucket": b, "Key": "page"}, ServerSideEncryption="AES256")
    with pytest.raises(ClientError) as ei:
        s3c.copy_object(Bucket=b, Key="page", CopySource={"Bucket": b, "Key": "page"})
    assert _code(ei.value) == "InvalidRequest"


# ---------------------------------------------------------------------------- flexible checksums
def _expected_checksum(alg: str, data: bytes) -> str:
    from awscrt import checksums as crt
    if alg == "CRC32":
        return _crc32_b64(data)
    if alg == "CRC32C":
        return _b64(crt.crc32c(data).to_bytes(4, "big"))
    if alg == "CRC64NVME":
        return _b64(crt.crc64nvme(data).to_bytes(8, "big"))
    return _b64(hashlib.new(alg.lower(), data).digest())


@pytest.mark.parametrize("alg", ["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"])
def test_flexible_checksum_stored_and_returned(cli, bkt, alg):
    data = os.urandom(70_000)
    want = _expected_checksum(alg, data)
    put = cli.put_object(Bucket=bkt, Key="ck", Body=data, ChecksumAlgorithm=alg)
    assert put[f"Checksum{alg}"] == want
    for r in (cli.head_object(Bucket=bkt, Key="ck", ChecksumMode="ENABLED"),
              cli.get_object(Bucket=bkt, Key="ck", ChecksumMode="ENABLED")):
        assert r[f"Checksum{alg}"] == want
    # multipart part checksum
    up = cli.create_multipart_upload(Bucket=bkt, Key="mp", ChecksumAlgorithm=alg)["UploadId"]
    p = cli.upload_part(Bucket=bkt, Key="mp", UploadId=up, PartNumber=1, Body=data, ChecksumAlgorithm=alg)
    assert p[f"Checksum{alg}"] == want
    lp = cli.list_parts(Bucket=bkt, Key="mp", UploadId=up)
    assert lp["Parts"][0][f"Checksum{alg}"] == want
    cli.abort_multipart_upload(Bucket=bkt, Key="mp", UploadId=up)


def test_default_client_crc32_is_stored(gw):
    # boto3's default (when_supported) sends a CRC32 with every put_object: in a
    # header for seekable bodies over HTTP, in an aws-chunked trailer otherwise
    client = gw.client()
    bucket = _new_bucket(client)
    data = os.urandom(100_000)
    client.put_object(Bucket=bucket, Key="t", Body=data)
    h = client.head_object(Bucket=bucket, Key="t", ChecksumMode="ENABLED")
    assert h["ChecksumCRC32"] == _crc32_b64(data)


def test_checksum_not_returned_without_checksum_mode(s3c, b):
    s3c.put_object(Bucket=b, Key="k", Body=b"x", ChecksumAlgorithm="SHA256")
    h = s3c.head_object(Bucket=b, Key="k")
    assert "ChecksumSHA256" not in h


def test_wrong_explicit_checksum_is_bad_digest(cli, bkt):
    with pytest.raises(ClientError) as ei:
        cli.put_object(Bucket=bkt, Key="bad", Body=b"some data", ChecksumCRC32="AAAAAA==")
    assert _code(ei.value) == "BadDigest" and _status(ei.value) == 400
    with pytest.raises(ClientError) as ei:
        cli.head_object(Bucket=bkt, Key="bad")
    assert _status(ei.value) == 404


def test_wrong_explicit_sha256_checksum_is_bad_digest(s3c, b):
    with pytest.raises(ClientError) as ei:
        s3c.put_object(Bucket=b, Key="bad", Body=b"some data", ChecksumSHA256=_b64(b"\0" * 32))
    assert _code(ei.value) == "BadDigest"


def test_wrong_content_md5_is_bad_digest(cli, bkt):
    with pytest.raises(ClientError) as ei:
        cli.put_object(Bucket=bkt, Key="bad", Body=b"some data", ContentMD5=_b64(hashlib.md5(b"other").digest()))
    assert _code(ei.value) == "BadDigest"
    with pytest.raises(ClientError) as ei:
        cli.head_object(Bucket=bkt, Key="bad")
    assert _status(ei.value) == 404
    cli.put_object(Bucket=bkt, Key="good", Body=b"some data", ContentMD5=_b64(hashlib.md5(b"some data").digest()))


# ---------------------------------------------------------------------------- presigned URLs
def _urlopen(req):
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _err(body: bytes) -> dict:
    root = ET.fromstring(body)
    assert root.tag == "Error"
    return {c.tag: c.text for c in root}


def _raw(gw, method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """One request over http.client, exactly as given (no Content-Type added)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


PRESIGN_VERSIONS = ["s3v4", "botocore-default"]


def _presigner(gw, version: str):
    return gw.client(signature_version="s3v4") if version == "s3v4" else gw.client()


@pytest.mark.parametrize("version", PRESIGN_VERSIONS)
def test_presigned_get_and_put(gw, s3c, b, version):
    pre = _presigner(gw, version)
    key = "pre sign+d/ü"
    url = pre.generate_presigned_url("put_object", Params={"Bucket": b, "Key": key}, ExpiresIn=300)
    status, _h, body = _raw(gw, "PUT", url, b"via presign")
    assert status == 200, body
    url = pre.generate_presigned_url("get_object", Params={"Bucket": b, "Key": key}, ExpiresIn=300)
    status, headers, body = _urlopen(url)
    assert status == 200 and body == b"via presign"
    assert "x-amz-request-id" in {k.lower() for k in headers}
    assert s3c.get_object(Bucket=b, Key=key)["Body"].read() == b"via presign"


@pytest.mark.parametrize("version", PRESIGN_VERSIONS)
def test_expired_presigned_url_is_access_denied(gw, s3c, b, version, monkeypatch):
    s3c.put_object(Bucket=b, Key="k", Body=b"x")
    # signed for 1 s, 2.1 s ago: the server gets the URL it got when the
    # test signed it now and slept 2.1 s.  botocore's signers take the
    # time here: SigV4's X-Amz-Date (botocore's own signer, or awscrt's when
    # installed), SigV2's Expires (now + ExpiresIn).
    import datetime
    import importlib

    import botocore.auth
    from botocore.compat import get_current_datetime

    def earlier(*a, **kw):
        return get_current_datetime(*a, **kw) - datetime.timedelta(seconds=2.1)
    for name in ("botocore.auth", "botocore.crt.auth"):
        try:
            mod = importlib.import_module(name)
        except ImportError:              # botocore.crt.auth needs awscrt
            continue
        monkeypatch.setattr(mod, "get_current_datetime", earlier)
    monkeypatch.setattr(botocore.auth.HmacV1QueryAuth, "_get_date",
                        lambda self: str(int(time.time() - 2.1 + int(self._expires))))
    url = _presigner(gw, version).generate_presigned_url("get_object", Params={"Bucket": b, "Key": "k"}, ExpiresIn=1)
    monkeypatch.undo()
    status, headers, body = _urlopen(url)
    assert status == 403
    err = _err(body)
    assert err["Code"] == "AccessDenied" and err["RequestId"] and err["Message"]
    assert {k.lower(): v for k, v in headers.items()}["x-amz-request-id"] == err["RequestId"]


@pytest.mark.parametrize("version", PRESIGN_VERSIONS)
def test_tampered_presigned_url_is_signature_does_not_match(gw, s3c, b, version):
    s3c.put_object(Bucket=b, Key="k", Body=b"x")
    s3c.put_object(Bucket=b, Key="j", Body=b"y")
    url = _presigner(gw, version).generate_presigned_url("get_object", Params={"Bucket": b, "Key": "k"}, ExpiresIn=300)
    tampered = url.replace(f"/{b}/k?", f"/{b}/j?")
    status, _h, body = _urlopen(tampered)
    assert status == 403 and _err(body)["Code"] == "SignatureDoesNotMatch"
    u = urlsplit(url)
    params = u.query.split("&")
    for i, p in enumerate(params):
        name, _, value = p.partition("=")
        if name in ("X-Amz-Signature", "Signature"):
            params[i] = f"{name}={'A' if value[0] != 'A' else 'B'}{value[1:]}"
    sig_tampered = u._replace(query="&".join(params)).geturl()
    assert sig_tampered != url
    status, _h, body = _urlopen(sig_tampered)
    assert status == 403 and _err(body)["Code"] == "SignatureDoesNotMatch"


# ---------------------------------------------------------------------------- listing
SPECIAL_KEYS = ["a b/c d.txt", "plus+sign", "uni/ü€😀", "pct%20raw", "pct%2Fslash", "amp&eq=q?", "tilde~",
                "x/y/z", "x/y2", "x/z"]


def test_list_v2_special_keys_roundtrip(cli, bkt):
    for k in SPECIAL_KEYS:
        cli.put_object(Bucket=bkt, Key=k, Body=k.encode())
    r = cli.list_objects_v2(Bucket=bkt)
    assert [o["Key"] for o in r["Contents"]] == sorted(SPECIAL_KEYS)
    assert r["KeyCount"] == len(SPECIAL_KEYS)
    for k in SPECIAL_KEYS:
        assert cli.get_object(Bucket=bkt, Key=k)["Body"].read() == k.encode()
    r = cli.list_objects(Bucket=bkt)
    assert [o["Key"] for o in r["Contents"]] == sorted(SPECIAL_KEYS)


def test_list_prefix_delimiter(cli, bkt):
    for k in SPECIAL_KEYS:
        cli.put_object(Bucket=bkt, Key=k, Body=b"")
    r = cli.list_objects_v2(Bucket=bkt, Delimiter="/")
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a b/", "uni/", "x/"]
    assert [o["Key"] for o in r["Contents"]] == sorted(k for k in SPECIAL_KEYS if "/" not in k)
    r = cli.list_objects_v2(Bucket=bkt, Prefix="x/", Delimiter="/")
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["x/y/"]
    assert [o["Key"] for o in r["Contents"]] == ["x/y2", "x/z"]
    r = cli.list_objects(Bucket=bkt, Prefix="uni/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["uni/ü€😀"]
    r = cli.list_objects_v2(Bucket=bkt, Prefix="nothing-here")
    assert r["KeyCount"] == 0 and "Contents" not in r


def test_list_v2_pagination_with_token_and_start_after(cli, bkt):
    keys = sorted(f"k{i:03d}" for i in range(25)) + ["d/1", "d/2"]
    for k in keys:
        cli.put_object(Bucket=bkt, Key=k, Body=b"")
    seen, token, pages = [], None, 0
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = cli.list_objects_v2(Bucket=bkt, MaxKeys=7, Delimiter="/", **kw)
        pages += 1
        seen += [p["Prefix"] for p in r.get("CommonPrefixes", [])] + [o["Key"] for o in r.get("Contents", [])]
        assert r["KeyCount"] <= 7
        if not r["IsTruncated"]:
            break
        token = r["NextContinuationToken"]
    assert sorted(seen) == sorted(["d/"] + [k for k in keys if "/" not in k]) and len(seen) == 26
    assert pages == 4
    r = cli.list_objects_v2(Bucket=bkt, StartAfter="k020")
    assert [o["Key"] for o in r["Contents"]] == [f"k{i:03d}" for i in range(21, 25)]
    assert r["StartAfter"] == "k020"
    paginated = [o["Key"] for page in cli.get_paginator("list_objects_v2").paginate(
        Bucket=bkt, PaginationConfig={"PageSize": 4}) for o in page.get("Contents", [])]
    assert paginated == sorted(keys)


def test_list_v1_pagination_with_marker(cli, bkt):
    keys = [f"m{i:02d}" for i in range(12)]
    for k in keys:
        cli.put_object(Bucket=bkt, Key=k, Body=b"")
    r = cli.list_objects(Bucket=bkt, MaxKeys=5)
    assert r["IsTruncated"] and [o["Key"] for o in r["Contents"]] == keys[:5]
    r = cli.list_objects(Bucket=bkt, MaxKeys=5, Marker="m04")
    assert [o["Key"] for o in r["Contents"]] == keys[5:10]
    paginated = [o["Key"] for page in cli.get_paginator("list_objects").paginate(
        Bucket=bkt, PaginationConfig={"PageSize": 5}) for o in page.get("Contents", [])]
    assert paginated == keys


def test_list_v1_next_marker_with_delimiter(s3c, b):
    for k in ["a/1", "b/1", "c", "d/1", "e"]:
        s3c.put_object(Bucket=b, Key=k, Body=b"")
    r = s3c.list_objects(Bucket=b, Delimiter="/", MaxKeys=2)
    assert r["IsTruncated"] and r["NextMarker"] == "b/"
    r = s3c.list_objects(Bucket=b, Delimiter="/", MaxKeys=2, Marker=r["NextMarker"])
    assert [o["Key"] for o in r.get("Contents", [])] == ["c"]
    assert [p["Prefix"] for p in r.get("CommonPrefixes", [])] == ["d/"]


def test_list_bad_continuation_token_is_invalid_argument(s3c, b):
    with pytest.raises(ClientError) as ei:
        s3c.list_objects_v2(Bucket=b, ContinuationToken="garbage!!")
    assert _code(ei.value) == "InvalidArgument"


# ---------------------------------------------------------------------------- buckets
def test_list_buckets_contains_created(s3c, b):
    names = [x["Name"] for x in s3c.list_buckets()["Buckets"]]
    assert b in names


def test_head_missing_bucket_is_404(s3c):
    with pytest.raises(ClientError) as ei:
        s3c.head_bucket(Bucket="no-such-bucket-here")
    assert _status(ei.value) == 404
    with pytest.raises(ClientError) as ei:
        s3c.list_objects_v2(Bucket="no-such-bucket-here")
    assert _code(ei.value) == "NoSuchBucket"


def test_delete_non_empty_bucket_is_bucket_not_empty(s3c, b):
    s3c.put_object(Bucket=b, Key="k", Body=b"x")
    with pytest.raises(ClientError) as ei:
        s3c.delete_bucket(Bucket=b)
    assert _code(ei.value) == "BucketNotEmpty" and _status(ei.value) == 409
    s3c.delete_object(Bucket=b, Key="k")
    s3c.delete_bucket(Bucket=b)
    with pytest.raises(ClientError) as ei:
        s3c.head_bucket(Bucket=b)
    assert _status(ei.value) == 404


def test_create_existing_bucket_is_already_owned_by_you(s3c, b):
    with pytest.raises(ClientError) as ei:
        s3c.create_bucket(Bucket=b)
    assert _code(ei.value) == "BucketAlreadyOwnedByYou"


def test_invalid_bucket_name_is_rejected(s3c):
    with pytest.raises(ClientError) as ei:
        s3c.create_bucket(Bucket="ab")
    assert _code(ei.value) == "InvalidBucketName"


def test_get_bucket_location(s3c, b):
    r = s3c.get_bucket_location(Bucket=b)
    assert r["LocationConstraint"] in (None, "")


TERRAFORM_BUCKET_READS = (
    # what Terraform's aws_s3_bucket reads on every refresh, with the answer
    # it gets for a bucket that has none of it (None: a 200 it reads as "off")
    ("get_bucket_acl", None), ("get_bucket_cors", "NoSuchCORSConfiguration"),
    ("get_bucket_website", "NoSuchWebsiteConfiguration"), ("get_bucket_versioning", None),
    ("get_bucket_accelerate_configuration", None), ("get_bucket_request_payment", None),
    ("get_bucket_logging", None), ("get_bucket_lifecycle_configuration", "NoSuchLifecycleConfiguration"),
    ("get_bucket_replication", "ReplicationConfigurationNotFoundError"),
    ("get_bucket_encryption", "ServerSideEncryptionConfigurationNotFoundError"),
    ("get_object_lock_configuration", "ObjectLockConfigurationNotFoundError"),
    ("get_bucket_policy", "NoSuchBucketPolicy"), ("get_bucket_tagging", "NoSuchTagSet"),
)


def test_a_terraform_style_read_of_every_bucket_setting_gets_s3s_not_configured_answers(s3c, b):
    for op, code in TERRAFORM_BUCKET_READS:
        if code is None:
            assert getattr(s3c, op)(Bucket=b)["ResponseMetadata"]["HTTPStatusCode"] == 200, op
            continue
        with pytest.raises(ClientError) as ei:
            getattr(s3c, op)(Bucket=b)
        assert (_status(ei.value), _code(ei.value)) == (404, code), op
    assert s3c.get_bucket_request_payment(Bucket=b)["Payer"] == "BucketOwner"


def test_acls_name_the_owner_listings_name_with_full_control(s3c, b):
    s3c.put_object(Bucket=b, Key="k", Body=b"x")
    owner = s3c.list_buckets()["Owner"]
    assert s3c.list_objects_v2(Bucket=b, FetchOwner=True)["Contents"][0]["Owner"] == owner
    for acl in (s3c.get_bucket_acl(Bucket=b), s3c.get_object_acl(Bucket=b, Key="k")):
        assert acl["Owner"] == owner
        assert acl["Grants"] == [{"Grantee": {**owner, "Type": "CanonicalUser"}, "Permission": "FULL_CONTROL"}]


def test_configurations_kept_by_id_list_as_none_and_one_named_is_no_such_configuration(s3c, b):
    for kind in ("analytics", "inventory", "metrics", "intelligent_tiering"):
        listed = getattr(s3c, f"list_bucket_{kind}_configurations")(Bucket=b)
        assert listed["IsTruncated"] is False, kind
        assert not any(v for k, v in listed.items() if k.endswith("ConfigurationList")), kind
        with pytest.raises(ClientError) as ei:
            getattr(s3c, f"get_bucket_{kind}_configuration")(Bucket=b, Id="daily")
        assert (_status(ei.value), _code(ei.value)) == (404, "NoSuchConfiguration"), kind


def test_a_copy_naming_an_sse_c_key_for_its_source_is_invalid_request_and_makes_no_copy(s3c, b):
    s3c.put_object(Bucket=b, Key="src", Body=b"plain")
    with pytest.raises(ClientError) as ei:      # (boto3 adds the key's MD5 header itself)
        s3c.copy_object(Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "src"},
                        CopySourceSSECustomerAlgorithm="AES256", CopySourceSSECustomerKey="k" * 32)
    assert (_status(ei.value), _code(ei.value)) == (400, "InvalidRequest")
    assert "not applicable" in str(ei.value)
    assert "Contents" not in s3c.list_objects_v2(Bucket=b, Prefix="dst")


def test_delete_objects_batch(cli, bkt):
    for k in ["d1", "d2", "d3"]:
        cli.put_object(Bucket=bkt, Key=k, Body=b"x")
    r = cli.delete_objects(Bucket=bkt, Delete={"Objects": [{"Key": "d1"}, {"Key": "d2"}, {"Key": "nope"}]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["d1", "d2", "nope"]
    assert [o["Key"] for o in cli.list_objects_v2(Bucket=bkt)["Contents"]] == ["d3"]


def test_conditional_delete_removes_only_the_object_it_names(s3c, b):
    """If-Match, x-amz-if-match-size and x-amz-if-match-last-modified-time:
    a failed condition is 412 and the object stays; one that holds deletes."""
    etag = s3c.put_object(Bucket=b, Key="k", Body=b"important")["ETag"]
    mtime = s3c.head_object(Bucket=b, Key="k")["LastModified"]
    for cond in ({"IfMatch": '"0000"'}, {"IfMatchSize": 999},
                 {"IfMatchLastModifiedTime": mtime - timedelta(days=1)},
                 {"IfMatch": etag, "IfMatchSize": 8}):
        with pytest.raises(ClientError) as ei:
            s3c.delete_object(Bucket=b, Key="k", **cond)
        assert _status(ei.value) == 412 and _code(ei.value) == "PreconditionFailed", cond
        assert s3c.get_object(Bucket=b, Key="k")["Body"].read() == b"important", cond
    s3c.delete_object(Bucket=b, Key="k", IfMatch=etag, IfMatchSize=9, IfMatchLastModifiedTime=mtime)
    with pytest.raises(ClientError) as ei:
        s3c.head_object(Bucket=b, Key="k")
    assert _status(ei.value) == 404
    with pytest.raises(ClientError) as ei:                  # a condition on nothing: NoSuchKey
        s3c.delete_object(Bucket=b, Key="k", IfMatch=etag)
    assert _code(ei.value) == "NoSuchKey"


def test_conditional_delete_of_a_version_checks_that_version(s3c, b):
    s3c.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    old = s3c.put_object(Bucket=b, Key="k", Body=b"old")
    new = s3c.put_object(Bucket=b, Key="k", Body=b"new")
    with pytest.raises(ClientError) as ei:
        s3c.delete_object(Bucket=b, Key="k", VersionId=old["VersionId"], IfMatch=new["ETag"])
    assert _status(ei.value) == 412
    s3c.delete_object(Bucket=b, Key="k", VersionId=old["VersionId"], IfMatch=old["ETag"])
    versions = s3c.list_object_versions(Bucket=b, Prefix="k").get("Versions", [])
    assert [v["VersionId"] for v in versions] == [new["VersionId"]]
    with pytest.raises(ClientError) as ei:                  # a delete marker only where the condition holds
        s3c.delete_object(Bucket=b, Key="k", IfMatch=old["ETag"])
    assert _status(ei.value) == 412
    assert s3c.get_object(Bucket=b, Key="k")["Body"].read() == b"new"


def test_a_malformed_delete_condition_is_invalid_argument_and_deletes_nothing(gw, s3c, b):
    s3c.put_object(Bucket=b, Key="k", Body=b"x")
    for name, value in (("x-amz-if-match-size", "many"), ("x-amz-if-match-last-modified-time", "yesterday")):
        req = _signed("DELETE", f"{gw.endpoint}/{b}/k", b"", {name: value})
        status, _h, body = _send(gw, req, b"")
        assert status == 400 and _err(body)["Code"] == "InvalidArgument", (name, body)
    assert s3c.get_object(Bucket=b, Key="k")["Body"].read() == b"x"


def test_delete_objects_honours_each_objects_conditions(s3c, b):
    tags = {k: s3c.put_object(Bucket=b, Key=k, Body=k.encode() * 3)["ETag"] for k in ("a", "b", "c", "d")}
    r = s3c.delete_objects(Bucket=b, Delete={"Objects": [
        {"Key": "a", "ETag": tags["a"]},                 # holds
        {"Key": "b", "ETag": tags["a"]},                 # another object's ETag
        {"Key": "c", "Size": 1},                         # wrong size
        {"Key": "d", "Size": 3, "ETag": tags["d"]},      # holds
    ]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["a", "d"]
    assert sorted((e["Key"], e["Code"]) for e in r["Errors"]) == [("b", "PreconditionFailed"),
                                                                  ("c", "PreconditionFailed")]
    assert sorted(o["Key"] for o in s3c.list_objects_v2(Bucket=b)["Contents"]) == ["b", "c"]


def test_completing_with_a_wrong_whole_object_checksum_is_bad_digest_and_keeps_the_upload(s3c, b):
    p1, p2 = os.urandom(5 * 1024 * 1024), b"end"
    uid = s3c.create_multipart_upload(Bucket=b, Key="k", ChecksumAlgorithm="CRC32",
                                      ChecksumType="FULL_OBJECT")["UploadId"]
    parts = []
    for n, data in ((1, p1), (2, p2)):
        r = s3c.upload_part(Bucket=b, Key="k", UploadId=uid, PartNumber=n, Body=data, ChecksumAlgorithm="CRC32")
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    wrong = base64.b64encode((zlib.crc32(p1 + p2) ^ 1).to_bytes(4, "big")).decode()
    with pytest.raises(ClientError) as ei:
        s3c.complete_multipart_upload(Bucket=b, Key="k", UploadId=uid, MultipartUpload={"Parts": parts},
                                      ChecksumCRC32=wrong, ChecksumType="FULL_OBJECT")
    assert _code(ei.value) == "BadDigest" and _status(ei.value) == 400
    with pytest.raises(ClientError) as ei:               # the type the upload was not created with
        s3c.complete_multipart_upload(Bucket=b, Key="k", UploadId=uid, MultipartUpload={"Parts": parts},
                                      ChecksumType="COMPOSITE")
    assert _code(ei.value) == "InvalidRequest"
    bad_part = [parts[0], {**parts[1], "ChecksumCRC32": "AAAAAA=="}]
    with pytest.raises(ClientError) as ei:               # a part's listed checksum is not the part's
        s3c.complete_multipart_upload(Bucket=b, Key="k", UploadId=uid, MultipartUpload={"Parts": bad_part})
    assert _code(ei.value) == "InvalidPart"
    right = base64.b64encode(zlib.crc32(p1 + p2).to_bytes(4, "big")).decode()
    r = s3c.complete_multipart_upload(Bucket=b, Key="k", UploadId=uid, MultipartUpload={"Parts": parts},
                                      ChecksumCRC32=right, ChecksumType="FULL_OBJECT")
    assert r["ChecksumCRC32"] == right and r["ChecksumType"] == "FULL_OBJECT"
    assert s3c.get_object(Bucket=b, Key="k")["Body"].read() == p1 + p2


def test_a_multipart_checksum_type_the_algorithm_cannot_have_is_invalid_request(s3c, b):
    for alg, ctype in (("SHA256", "FULL_OBJECT"), ("CRC64NVME", "COMPOSITE")):
        with pytest.raises(ClientError) as ei:
            s3c.create_multipart_upload(Bucket=b, Key="k", ChecksumAlgorithm=alg, ChecksumType=ctype)
        assert _code(ei.value) == "InvalidRequest", (alg, ctype)


def test_not_modified_names_the_representation_the_client_has(gw, s3c, b):
    etag = s3c.put_object(Bucket=b, Key="k", Body=b"cached")["ETag"]
    url = s3c.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "k"}, ExpiresIn=60)
    status, headers, body = _urlopen(urllib.request.Request(url, headers={"If-None-Match": etag}))
    assert status == 304 and body == b""
    h = {k.lower(): v for k, v in headers.items()}
    assert h["etag"] == etag and h["last-modified"], h


def test_list_buckets_takes_a_prefix_and_pages(s3c):
    names = [f"lbp-{i:02d}-{time.time_ns() % 10**6}" for i in range(5)]
    for n in names:
        s3c.create_bucket(Bucket=n)
    r = s3c.list_buckets(Prefix="lbp-0")
    assert sorted(x["Name"] for x in r["Buckets"]) == sorted(names) and r["Prefix"] == "lbp-0"
    seen, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = s3c.list_buckets(Prefix="lbp-", MaxBuckets=2, **kw)
        assert len(r["Buckets"]) <= 2
        seen += [x["Name"] for x in r["Buckets"]]
        token = r.get("ContinuationToken")
        if not token:
            break
    assert seen == sorted(names)
    assert s3c.list_buckets(Prefix="lbp-", BucketRegion="eu-west-3")["Buckets"] == []
    url = s3c.generate_presigned_url("list_buckets", Params={}, ExpiresIn=60) + "&max-buckets=0"
    status, _h, body = _urlopen(url)
    assert status == 400 and _err(body)["Code"] == "InvalidArgument"


def test_upload_part_copy_takes_only_a_range_inside_the_source(s3c, b):
    s3c.put_object(Bucket=b, Key="src", Body=b"0123456789")
    uid = s3c.create_multipart_upload(Bucket=b, Key="dst")["UploadId"]
    for rng in ("bytes=5-100", "bytes=0-", "bytes=-5", "bytes=6-2", "bytes=10-10", "5-6"):
        with pytest.raises(ClientError) as ei:
            s3c.upload_part_copy(Bucket=b, Key="dst", UploadId=uid, PartNumber=1,
                                 CopySource={"Bucket": b, "Key": "src"}, CopySourceRange=rng)
        assert _code(ei.value) == "InvalidArgument", rng
    e = s3c.upload_part_copy(Bucket=b, Key="dst", UploadId=uid, PartNumber=1, CopySource={"Bucket": b, "Key": "src"},
                             CopySourceRange="bytes=2-5")["CopyPartResult"]["ETag"]
    s3c.complete_multipart_upload(Bucket=b, Key="dst", UploadId=uid,
                                  MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e}]})
    assert s3c.get_object(Bucket=b, Key="dst")["Body"].read() == b"2345"


def test_every_response_has_request_id(s3c, b):
    responses = [s3c.put_object(Bucket=b, Key="k", Body=b"x"), s3c.head_object(Bucket=b, Key="k"),
                 s3c.list_objects_v2(Bucket=b), s3c.list_buckets(), s3c.delete_object(Bucket=b, Key="k")]
    for r in responses:
        assert r["ResponseMetadata"]["RequestId"]
    for call in (lambda: s3c.get_object(Bucket=b, Key="missing"),
                 lambda: s3c.head_object(Bucket=b, Key="missing")):
        with pytest.raises(ClientError) as ei:
            call()
        assert ei.value.response["ResponseMetadata"]["RequestId"]


def test_error_body_is_xml_with_code_message_request_id(gw, s3c, b):
    url = s3c.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "missing"}, ExpiresIn=60)
    status, headers, body = _urlopen(url)
    assert status == 404
    err = _err(body)
    assert err["Code"] == "NoSuchKey" and err["Message"] and err["RequestId"]
    assert err["Key"] == "missing"
    with pytest.raises(ClientError) as ei:
        s3c.get_object(Bucket=b, Key="missing")
    e = ei.value.response["Error"]
    assert e["Code"] == "NoSuchKey" and e["Message"]


def test_unauthenticated_request_is_access_denied(gw):
    status, _h, body = _urlopen(gw.endpoint + "/")
    assert status == 403 and _err(body)["Code"] == "AccessDenied"


def test_virtual_hosted_style_client(gw, monkeypatch):
    if not _resolves("airlock-vhost-check.localhost"):
        # Machines without nss-myhostname / systemd-resolved do not resolve
        # *.localhost (RFC 6761 says it is loopback): do it for this client
        # process, as /etc/hosts would, so the test runs everywhere.
        real = socket.getaddrinfo

        def getaddrinfo(host, *args, **kwargs):
            if isinstance(host, str) and host.endswith(".localhost"):
                host = "127.0.0.1"
            return real(host, *args, **kwargs)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    client = gw.client(s3={"addressing_style": "virtual"})
    client._endpoint.host = f"http://localhost:{gw.port}"
    bucket = f"vhost-{next(_names)}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="a/b c", Body=b"vhost")
    assert client.get_object(Bucket=bucket, Key="a/b c")["Body"].read() == b"vhost"
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["a/b c"]


def test_virtual_hosted_style_addressing_via_host_header(gw, s3c, b):
    """Even without DNS for *.localhost, the gateway routes by Host header."""
    s3c.put_object(Bucket=b, Key="v/k", Body=b"vh")
    host = f"{b}.localhost:{gw.port}"
    req = _signed("GET", f"http://{host}/v/k", b"")
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", "/v/k", headers={"Host": host, **dict(req.headers)})
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"vh"
    conn.close()


# ---------------------------------------------------------------------------- hand-built wire requests
def _signed(method: str, url: str, body, headers: dict | None = None, content_sha256: str | None = None) -> AWSRequest:
    """Header-signed SigV4 request; x-amz-content-sha256 as given (default: body's sha256)."""
    h = dict(headers or {})
    if content_sha256 is None:
        content_sha256 = hashlib.sha256(body if isinstance(body, bytes) else b"").hexdigest()
    h["X-Amz-Content-SHA256"] = content_sha256
    req = AWSRequest(method=method, url=url, data=body if isinstance(body, bytes) else b"", headers=h)
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(req)
    return req


def _send(gw, req: AWSRequest, body, *, chunked: bool = False):
    u = urlsplit(req.url)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    headers = {k: v for k, v in req.headers.items()}
    conn.request(req.method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=headers,
                 encode_chunked=chunked)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def _signing_key(date: str) -> bytes:
    k = hmac.new(("AWS4" + SECRET_KEY).encode(), date.encode(), hashlib.sha256).digest()
    for part in (REGION, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k


def _streaming_signed_body(req: AWSRequest, chunks: list[bytes], corrupt_index: int | None = None) -> bytes:
    auth = req.headers["Authorization"]
    seed = auth.rsplit("Signature=", 1)[1]
    amz_date = req.headers["X-Amz-Date"]
    date = amz_date[:8]
    scope = f"{date}/{REGION}/s3/aws4_request"
    key = _signing_key(date)
    empty = hashlib.sha256(b"").hexdigest()
    prev, out = seed, []
    for i, c in enumerate(chunks + [b""]):
        sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, prev, empty, hashlib.sha256(c).hexdigest()])
        sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        prev = sig
        if i == corrupt_index:
            sig = "0" * 64
        out.append(f"{len(c):x};chunk-signature={sig}\r\n".encode() + c + b"\r\n")
    return b"".join(out)


def _streaming_headers(chunks: list[bytes], encoded_len: int | None = None) -> dict:
    return {"Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(sum(len(c) for c in chunks))}


def _stream_signed_put(gw, bucket, key, chunks, corrupt_index=None):
    headers = _streaming_headers(chunks)
    # the encoded length is needed before signing; signatures have fixed width
    dummy = _streaming_signed_body(_fake_req(), chunks)
    headers["Content-Length"] = str(len(dummy))
    req = _signed("PUT", f"{gw.endpoint}/{bucket}/{key}", None, headers,
                  content_sha256="STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    body = _streaming_signed_body(req, chunks, corrupt_index)
    assert len(body) == len(dummy)
    return _send(gw, req, body)


def _fake_req():
    r = AWSRequest(method="PUT", url="http://x/", headers={
        "Authorization": "AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host, Signature=" + "0" * 64,
        "X-Amz-Date": "20240101T000000Z"})
    return r


def test_streaming_signed_payload_put(gw, b, s3c):
    chunks = [os.urandom(64 * 1024), os.urandom(64 * 1024), os.urandom(1000)]
    status, headers, body = _stream_signed_put(gw, b, "streamed", chunks)
    assert status == 200, body
    data = b"".join(chunks)
    assert headers["etag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = s3c.get_object(Bucket=b, Key="streamed")
    assert got["Body"].read() == data and got["ContentLength"] == len(data)
    assert "ContentEncoding" not in got or got["ContentEncoding"] != "aws-chunked"


def test_streaming_signed_payload_bad_chunk_signature_is_refused(gw, b, s3c):
    chunks = [os.urandom(64 * 1024), os.urandom(64 * 1024), os.urandom(1000)]
    status, _h, body = _stream_signed_put(gw, b, "bad-stream", chunks, corrupt_index=1)
    assert status == 403 and _err(body)["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as ei:
        s3c.head_object(Bucket=b, Key="bad-stream")
    assert _status(ei.value) == 404


def _unsigned_trailer_body(data: bytes, trailer_value: str, chunk: int = 16384) -> bytes:
    out = []
    for i in range(0, len(data), chunk):
        c = data[i:i + chunk]
        out.append(f"{len(c):x}\r\n".encode() + c + b"\r\n")
    out.append(f"0\r\nx-amz-checksum-crc32:{trailer_value}\r\n\r\n".encode())
    return b"".join(out)


def _unsigned_trailer_put(gw, bucket, key, data, trailer_value):
    body = _unsigned_trailer_body(data, trailer_value)
    headers = {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(data)),
               "x-amz-trailer": "x-amz-checksum-crc32", "Content-Length": str(len(body))}
    req = _signed("PUT", f"{gw.endpoint}/{bucket}/{key}", None, headers,
                  content_sha256="STREAMING-UNSIGNED-PAYLOAD-TRAILER")
    return _send(gw, req, body)


def test_streaming_unsigned_payload_with_crc32_trailer(gw, b, s3c):
    data = os.urandom(50_000)
    status, headers, body = _unsigned_trailer_put(gw, b, "trailer", data, _crc32_b64(data))
    assert status == 200, body
    assert headers["x-amz-checksum-crc32"] == _crc32_b64(data)
    got = s3c.get_object(Bucket=b, Key="trailer", ChecksumMode="ENABLED")
    assert got["Body"].read() == data and got["ChecksumCRC32"] == _crc32_b64(data)


def test_streaming_unsigned_payload_wrong_trailer_is_bad_digest(gw, b, s3c):
    data = os.urandom(50_000)
    status, _h, body = _unsigned_trailer_put(gw, b, "bad-trailer", data, "AAAAAA==")
    assert status == 400 and _err(body)["Code"] == "BadDigest"
    with pytest.raises(ClientError) as ei:
        s3c.head_object(Bucket=b, Key="bad-trailer")
    assert _status(ei.value) == 404


def test_transfer_encoding_chunked_unsigned_payload(gw, b, s3c):
    data = os.urandom(200_000)
    req = _signed("PUT", f"{gw.endpoint}/{b}/te-chunked", None, {}, content_sha256="UNSIGNED-PAYLOAD")
    pieces = (data[i:i + 30_000] for i in range(0, len(data), 30_000))
    status, headers, body = _send(gw, req, pieces, chunked=True)
    assert status == 200, body
    assert headers["etag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert s3c.get_object(Bucket=b, Key="te-chunked")["Body"].read() == data


def test_expect_100_continue(gw, b, s3c):
    data = os.urandom(100_000)
    req = _signed("PUT", f"{gw.endpoint}/{b}/expect", data, {"Content-Length": str(len(data))})
    lines = [f"PUT /{b}/expect HTTP/1.1", f"Host: 127.0.0.1:{gw.port}", "Expect: 100-continue"]
    lines += [f"{k}: {v}" for k, v in req.headers.items() if k.lower() != "host"]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(data)
        resp = recv_head(sock)
    assert resp.startswith(b"HTTP/1.1 200"), resp
    assert s3c.get_object(Bucket=b, Key="expect")["Body"].read() == data


def test_boto3_upload_file_uses_multipart_for_large_files(s3c, b, tmp_path):
    from boto3.s3.transfer import TransferConfig
    data = os.urandom(12 * MIB)
    p = tmp_path / "big"
    p.write_bytes(data)
    s3c.upload_file(str(p), b, "big", Config=TransferConfig(multipart_threshold=5 * MIB,
                                                             multipart_chunksize=5 * MIB))
    h = s3c.head_object(Bucket=b, Key="big")
    assert h["ETag"].endswith('-3"') and h["ContentLength"] == len(data)
    out = tmp_path / "out"
    s3c.download_file(b, "big", str(out))
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
