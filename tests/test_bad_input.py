"""Bad input: every malformed or dishonest request gets S3's error, and nothing
stored changes (an existing object stays intact, no partial object appears).

Raw requests are signed with botocore's own S3SigV4Auth so that the only thing
wrong with them is the thing under test.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import os
import http.client
import socket
import time
import xml.etree.ElementTree as ET
from urllib.parse import quote, unquote

import botocore.auth
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from conftest import ACCESS_KEY, REGION, SECRET_KEY, Gateway

ORIGINAL = b"the original, intact object body\n" * 10


# ---------------------------------------------------------------------------- helpers
class Raw:
    """Signed raw HTTP against one gateway."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def sign(self, method: str, path: str, body: bytes = b"", headers: dict | None = None, *,
             access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
             payload_hash: str | None = None) -> AWSRequest:
        req = AWSRequest(method=method, url=self.gw.endpoint + path, data=body, headers=dict(headers or {}))
        auth = S3SigV4Auth(Credentials(access_key, secret_key), "s3", REGION)
        if payload_hash is not None:
            auth.payload = lambda request: payload_hash
        auth.add_auth(req)
        return req

    def send(self, req: AWSRequest) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=30)
        try:
            path = req.url[len(self.gw.endpoint):]
            conn.request(req.method, path, body=req.body or None, headers=dict(req.headers.items()))
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def __call__(self, method: str, path: str, body: bytes = b"", headers: dict | None = None, **kw):
        return self.send(self.sign(method, path, body, headers, **kw))


def error_code(body: bytes) -> str | None:
    if not body:
        return None
    return ET.fromstring(body).findtext("Code")


def assert_error(resp, status: int, code: str) -> None:
    st, _h, body = resp
    assert (st, error_code(body)) == (status, code), body


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("bad") / "primary").start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def raw(gw):
    return Raw(gw)


@pytest.fixture(scope="module")
def s3c(gw):
    return gw.client()


_n = iter(range(10**6))


@pytest.fixture
def bkt(s3c):
    """A fresh bucket holding one known object, 'keep'."""
    name = f"bad-input-{next(_n)}"
    s3c.create_bucket(Bucket=name)
    s3c.put_object(Bucket=name, Key="keep", Body=ORIGINAL)
    return name


def assert_untouched(s3c, bucket: str, absent: tuple[str, ...] = ()) -> None:
    """'keep' is intact, nothing in `absent` is visible, no stray keys or uploads."""
    assert s3c.get_object(Bucket=bucket, Key="keep")["Body"].read() == ORIGINAL
    keys = [c["Key"] for c in s3c.list_objects_v2(Bucket=bucket).get("Contents", [])]
    for k in absent:
        assert k not in keys
        with pytest.raises(ClientError) as ei:
            s3c.head_object(Bucket=bucket, Key=k)
        assert ei.value.response["Error"]["Code"] == "404"


def b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# ---------------------------------------------------------------------------- malformed XML
BAD_XML = [b"<not xml", b"<Wrong><Part/></Wrong>", b"\x00\x01garbage", b"<?xml version='1.0'?>"]


@pytest.mark.parametrize("body", BAD_XML)
def test_malformed_complete_multipart_is_malformedxml(raw, s3c, bkt, body):
    up = s3c.create_multipart_upload(Bucket=bkt, Key="keep")
    s3c.upload_part(Bucket=bkt, Key="keep", UploadId=up["UploadId"], PartNumber=1, Body=b"new")
    assert_error(raw("POST", f"/{bkt}/keep?uploadId={up['UploadId']}", body), 400, "MalformedXML")
    assert_untouched(s3c, bkt)
    # the upload is still there, still completable
    assert [p["PartNumber"] for p in s3c.list_parts(Bucket=bkt, Key="keep", UploadId=up["UploadId"])["Parts"]] == [1]


def test_complete_multipart_with_non_numeric_part_is_malformedxml(raw, s3c, bkt):
    up = s3c.create_multipart_upload(Bucket=bkt, Key="keep")
    body = (b"<CompleteMultipartUpload><Part><PartNumber>one</PartNumber><ETag>x</ETag></Part>"
            b"</CompleteMultipartUpload>")
    assert_error(raw("POST", f"/{bkt}/keep?uploadId={up['UploadId']}", body), 400, "MalformedXML")
    assert_untouched(s3c, bkt)


@pytest.mark.parametrize("body", BAD_XML + [b"<Delete></Delete>", b"<Delete><Object></Object></Delete>"])
def test_malformed_delete_objects_is_malformedxml(raw, s3c, bkt, body):
    resp = raw("POST", f"/{bkt}?delete", body, {"Content-MD5": b64md5(body)})
    assert_error(resp, 400, "MalformedXML")
    assert_untouched(s3c, bkt)


def test_delete_objects_over_1000_keys_is_malformedxml(raw, s3c, bkt):
    body = ("<Delete>" + "<Object><Key>keep</Key></Object>" * 1001 + "</Delete>").encode()
    assert_error(raw("POST", f"/{bkt}?delete", body, {"Content-MD5": b64md5(body)}), 400, "MalformedXML")
    assert_untouched(s3c, bkt)


@pytest.mark.parametrize("body", [b"<not xml", b"<Other/>", b"<CreateBucketConfiguration><Loc"])
def test_malformed_create_bucket_configuration_is_malformedxml(raw, s3c, body):
    name = f"bad-cfg-{next(_n)}"
    assert_error(raw("PUT", f"/{name}", body), 400, "MalformedXML")
    with pytest.raises(ClientError) as ei:
        s3c.head_bucket(Bucket=name)
    assert ei.value.response["Error"]["Code"] == "404"


# ---------------------------------------------------------------------------- digests
def test_wrong_content_md5_is_baddigest(raw, s3c, bkt):
    wrong = b64md5(b"something else")
    for key in ("keep", "new"):
        assert_error(raw("PUT", f"/{bkt}/{key}", b"replacement", {"Content-MD5": wrong}), 400, "BadDigest")
    assert_untouched(s3c, bkt, absent=("new",))


@pytest.mark.parametrize("md5", ["not-base64!!", base64.b64encode(b"short").decode(), ""])
def test_malformed_content_md5_is_invaliddigest(raw, s3c, bkt, md5):
    for key in ("keep", "new"):
        assert_error(raw("PUT", f"/{bkt}/{key}", b"replacement", {"Content-MD5": md5}), 400, "InvalidDigest")
    assert_untouched(s3c, bkt, absent=("new",))


def test_content_sha256_mismatch_is_rejected(raw, s3c, bkt):
    lie = hashlib.sha256(b"not the body").hexdigest()
    for key in ("keep", "new"):
        assert_error(raw("PUT", f"/{bkt}/{key}", b"replacement", payload_hash=lie),
                     400, "XAmzContentSHA256Mismatch")
    assert_untouched(s3c, bkt, absent=("new",))


def test_content_md5_mismatch_on_upload_part_stores_no_part(raw, s3c, bkt):
    up = s3c.create_multipart_upload(Bucket=bkt, Key="mp")
    resp = raw("PUT", f"/{bkt}/mp?partNumber=1&uploadId={up['UploadId']}", b"part",
               {"Content-MD5": b64md5(b"other")})
    assert_error(resp, 400, "BadDigest")
    assert s3c.list_parts(Bucket=bkt, Key="mp", UploadId=up["UploadId"]).get("Parts", []) == []


# ---------------------------------------------------------------------------- authentication
def test_bad_signature_is_signaturedoesnotmatch(raw, s3c, bkt):
    assert_error(raw("PUT", f"/{bkt}/keep", b"x", secret_key="wrong-secret"), 403, "SignatureDoesNotMatch")
    assert_error(raw("GET", f"/{bkt}/keep", secret_key="wrong-secret"), 403, "SignatureDoesNotMatch")
    assert_untouched(s3c, bkt)


def test_tampered_request_is_signaturedoesnotmatch(raw, s3c, bkt):
    req = raw.sign("PUT", f"/{bkt}/keep", b"x")
    req.url = req.url.replace("/keep", "/kept")
    assert_error(raw.send(req), 403, "SignatureDoesNotMatch")
    assert_untouched(s3c, bkt, absent=("kept",))


def test_unknown_access_key_is_invalidaccesskeyid(raw, s3c, bkt):
    assert_error(raw("PUT", f"/{bkt}/keep", b"x", access_key="AKIANOSUCHKEY0000000"), 403, "InvalidAccessKeyId")
    assert_untouched(s3c, bkt)


@pytest.mark.parametrize("offset_s", [3600, -3600])
def test_skewed_request_time_is_requesttimetooskewed(raw, s3c, bkt, monkeypatch, offset_s):
    real = botocore.auth.get_current_datetime
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda *a, **k: real(*a, **k) + datetime.timedelta(seconds=offset_s))
    req = raw.sign("PUT", f"/{bkt}/keep", b"x")
    monkeypatch.undo()
    assert_error(raw.send(req), 403, "RequestTimeTooSkewed")
    assert_untouched(s3c, bkt)


def test_missing_credentials_is_accessdenied(gw, s3c, bkt):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", f"/{bkt}/keep")
    r = conn.getresponse()
    assert (r.status, error_code(r.read())) == (403, "AccessDenied")
    conn.close()


# ---------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", [
    "ab", "a" * 64, "UpperCase", "under_score", "192.168.1.1", "dots..dots", "xn--punycode",
    "-leading", "trailing-", ".leading", "trailing.", "dash-.dot", "sp ace",
])
def test_invalid_bucket_name_is_rejected(raw, s3c, name):
    assert_error(raw("PUT", "/" + quote(name)), 400, "InvalidBucketName")
    assert name not in [b["Name"] for b in s3c.list_buckets()["Buckets"]]


ODD_KEYS = [
    "a/../b", "../up", "./here", "a/./b", "a//b", "//double-leading", "/leading", "trailing/",
    "..", ".", "emoji 😀/🚀", "combining e\u0301 vs \u00e9", "rtl \u05e9\u05dc\u05d5\u05dd \u202eevil",
    "edge \uffff", "edge \ufffe \ufeff", "ctl \x01\x02\x1f\x7f", "tab\tnewline\ncr\r", "100% + 50%",
    "query?x=1&y=2#frag", "sémi;colon,comma=eq", "~tilde*star'quote\"dq<lt>gt",
]


def test_odd_keys_round_trip_and_list_exactly(s3c, bkt):
    for i, key in enumerate(ODD_KEYS):
        s3c.put_object(Bucket=bkt, Key=key, Body=f"body {i}".encode())
    for i, key in enumerate(ODD_KEYS):
        r = s3c.get_object(Bucket=bkt, Key=key)
        assert r["Body"].read() == f"body {i}".encode(), key
        s3c.head_object(Bucket=bkt, Key=key)
    expected = sorted(ODD_KEYS + ["keep"], key=lambda k: k.encode("utf-8"))
    v2 = [c["Key"] for c in s3c.list_objects_v2(Bucket=bkt)["Contents"]]
    # botocore decodes keys only when it set encoding-type itself; here the caller did
    v2url = [unquote(c["Key"]) for c in s3c.list_objects_v2(Bucket=bkt, EncodingType="url")["Contents"]]
    v1 = [c["Key"] for c in s3c.list_objects(Bucket=bkt)["Contents"]]
    assert v2 == expected
    assert v2url == expected
    assert v1 == expected
    # paging one key at a time visits every key exactly once, in order
    seen, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = s3c.list_objects_v2(Bucket=bkt, MaxKeys=1, **kw)
        seen += [c["Key"] for c in r.get("Contents", [])]
        token = r.get("NextContinuationToken")
        if not r["IsTruncated"]:
            break
    assert seen == expected
    # botocore writes keys raw into the DeleteObjects XML; XML 1.0 cannot carry control
    # characters or U+FFFE/U+FFFF (S3: MalformedXML) and folds \r into \n, so those
    # keys are deleted one by one
    xml_safe = [k for k in ODD_KEYS
                if not any((ord(c) < 0x20 and c not in "\t\n") or c in "\r\ufffe\uffff" for c in k)]
    r = s3c.delete_objects(Bucket=bkt, Delete={"Objects": [{"Key": k} for k in xml_safe]})
    assert sorted(d["Key"] for d in r["Deleted"]) == sorted(xml_safe)
    for k in set(ODD_KEYS) - set(xml_safe):
        s3c.delete_object(Bucket=bkt, Key=k)
    assert [c["Key"] for c in s3c.list_objects_v2(Bucket=bkt)["Contents"]] == ["keep"]


def test_key_over_1024_bytes_is_keytoolongerror(raw, s3c, bkt):
    ok = "k" * 1024
    s3c.put_object(Bucket=bkt, Key=ok, Body=b"max")
    assert s3c.get_object(Bucket=bkt, Key=ok)["Body"].read() == b"max"
    for long_key in ("k" * 1025, "é" * 513):
        assert_error(raw("PUT", f"/{bkt}/" + quote(long_key), b"x"), 400, "KeyTooLongError")
    assert_untouched(s3c, bkt)
    assert [c["Key"] for c in s3c.list_objects_v2(Bucket=bkt)["Contents"]] == ["keep", ok]


# ---------------------------------------------------------------------------- truncated bodies
def _truncated_put(raw, bucket: str, key: str, how: str) -> None:
    full = b"z" * 1000
    req = raw.sign("PUT", f"/{bucket}/{key}", full)
    head = f"PUT /{bucket}/{key} HTTP/1.1\r\nHost: 127.0.0.1:{raw.gw.port}\r\n"
    for k, v in req.headers.items():
        if k.lower() != "host":
            head += f"{k}: {v}\r\n"
    if "Content-Length" not in req.headers:
        head += "Content-Length: 1000\r\n"
    head += "\r\n"
    s = socket.create_connection(("127.0.0.1", raw.gw.port), timeout=10)
    try:
        s.sendall(head.encode() + full[:500])
        if how == "half-close":
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(65536)     # whatever the server says, if anything
            except OSError:
                pass
        else:
            time.sleep(0.2)
    finally:
        s.close()


@pytest.mark.parametrize("how", ["close", "half-close"])
def test_truncated_body_is_never_visible(raw, s3c, bkt, how):
    logged = len(raw.gw.log_text())
    _truncated_put(raw, bkt, "partial", how)
    _truncated_put(raw, bkt, "keep", how)
    time.sleep(0.3)
    assert_untouched(s3c, bkt, absent=("partial",))
    # a client going away is one line in the log, not a server error with a traceback
    log = raw.gw.log_text()[logged:]
    assert "the client went away" in log and "Traceback" not in log and "ERROR" not in log
    # the server is healthy: a normal write and read still work
    s3c.put_object(Bucket=bkt, Key="after", Body=b"fine")
    assert s3c.get_object(Bucket=bkt, Key="after")["Body"].read() == b"fine"


# ---------------------------------------------------------------------------- arguments
def test_setting_an_unsupported_subresource_is_notimplemented_and_stores_nothing(raw, s3c, bkt):
    """airlock would not apply a policy, CORS rules, an ACL or a legal hold,
    so it does not store one: 501.  Reading them answers S3's "not
    configured" (test_differential.py), which stays true afterwards."""
    assert_error(raw("PUT", f"/{bkt}?policy", b'{"Version": "2012-10-17"}'), 501, "NotImplemented")
    assert_error(raw("PUT", f"/{bkt}/keep?legal-hold", b"<LegalHold/>"), 501, "NotImplemented")
    assert_error(raw("PUT", f"/{bkt}?cors", b"<CORSConfiguration/>"), 501, "NotImplemented")
    assert_error(raw("PUT", f"/{bkt}?acl", b"", {"x-amz-acl": "public-read"}), 501, "NotImplemented")
    assert_error(raw("PUT", f"/{bkt}/keep?acl", b"", {"x-amz-acl": "public-read"}), 501, "NotImplemented")
    assert_error(raw("PUT", f"/{bkt}/keep?tagging", b"<Tagging/>"), 400, "MalformedXML")  # object tags exist
    assert_error(raw("GET", f"/{bkt}?policy"), 404, "NoSuchBucketPolicy")
    assert_error(raw("GET", f"/{bkt}?cors"), 404, "NoSuchCORSConfiguration")
    for acl in (s3c.get_bucket_acl(Bucket=bkt), s3c.get_object_acl(Bucket=bkt, Key="keep")):
        assert [g["Permission"] for g in acl["Grants"]] == ["FULL_CONTROL"]
    assert_untouched(s3c, bkt)


def test_an_unsupported_subresource_of_a_missing_bucket_is_no_such_bucket(raw):
    """The bucket is checked before the sub-resource, as for every bucket request."""
    for method, path, body in (("PUT", "/no-such-bucket-here?policy", b"{}"),
                               ("PUT", "/no-such-bucket-here?cors", b"<CORSConfiguration/>"),
                               ("GET", "/no-such-bucket-here?analytics", b""),
                               ("PUT", "/no-such-bucket-here/k?legal-hold", b"<LegalHold/>"),
                               ("POST", "/no-such-bucket-here/k?restore", b"<RestoreRequest/>")):
        assert_error(raw(method, path, body), 404, "NoSuchBucket")


def test_a_browser_form_upload_is_not_implemented_rather_than_access_denied(gw, s3c, bkt):
    import urllib.request
    import uuid
    post = s3c.generate_presigned_post(bkt, "form")
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in post["fields"].items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + b"form body\r\n")
    req = urllib.request.Request(post["url"], data=b"".join(parts) + f"--{boundary}--\r\n".encode(),
                                 method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=30)
    assert (ei.value.code, error_code(ei.value.read())) == (501, "NotImplemented")
    assert_untouched(s3c, bkt, absent=("form",))


def test_object_lock_asked_for_is_refused_never_stored_without_it(s3c, bkt):
    """A retention or legal hold the client believes in must not be dropped:
    airlock has no Object Lock, so such a write is refused and stores nothing."""
    with pytest.raises(ClientError) as ei:
        s3c.create_bucket(Bucket=f"{bkt}-locked", ObjectLockEnabledForBucket=True)
    assert ei.value.response["Error"]["Code"] == "NotImplemented"
    with pytest.raises(ClientError) as ei:
        s3c.head_bucket(Bucket=f"{bkt}-locked")
    assert ei.value.response["Error"]["Code"] == "404"
    lock = {"ObjectLockMode": "COMPLIANCE",
            "ObjectLockRetainUntilDate": datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)}
    calls = [lambda: s3c.put_object(Bucket=bkt, Key="locked", Body=b"x", **lock),
             lambda: s3c.put_object(Bucket=bkt, Key="locked", Body=b"x", ObjectLockLegalHoldStatus="ON"),
             lambda: s3c.create_multipart_upload(Bucket=bkt, Key="locked", **lock),
             lambda: s3c.copy_object(Bucket=bkt, Key="locked", CopySource={"Bucket": bkt, "Key": "keep"}, **lock)]
    for call in calls:
        with pytest.raises(ClientError) as ei:
            call()
        assert (ei.value.response["Error"]["Code"], ei.value.response["ResponseMetadata"]["HTTPStatusCode"]) \
            == ("InvalidRequest", 400)
    assert_untouched(s3c, bkt, absent=("locked",))
    assert s3c.list_multipart_uploads(Bucket=bkt).get("Uploads", []) == []


def test_encryption_airlock_cannot_apply_is_refused_and_sse_s3_is_accepted(s3c, bkt):
    key = base64.b64encode(os.urandom(32)).decode()
    sse_c = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}
    refused = [
        (lambda: s3c.put_object(Bucket=bkt, Key="secret", Body=b"x", **sse_c), "NotImplemented"),
        (lambda: s3c.create_multipart_upload(Bucket=bkt, Key="secret", **sse_c), "NotImplemented"),
        (lambda: s3c.copy_object(Bucket=bkt, Key="secret", CopySource={"Bucket": bkt, "Key": "keep"}, **sse_c),
         "NotImplemented"),
        (lambda: s3c.put_object(Bucket=bkt, Key="secret", Body=b"x", ServerSideEncryption="aws:kms"),
         "NotImplemented"),
        (lambda: s3c.put_object(Bucket=bkt, Key="secret", Body=b"x", ServerSideEncryption="rot13"),
         "InvalidArgument"),
    ]
    for call, code in refused:
        with pytest.raises(ClientError) as ei:
            call()
        assert ei.value.response["Error"]["Code"] == code
    assert_untouched(s3c, bkt, absent=("secret",))
    assert s3c.list_multipart_uploads(Bucket=bkt).get("Uploads", []) == []
    s3c.put_object(Bucket=bkt, Key="sse-s3", Body=b"plain", ServerSideEncryption="AES256")
    assert s3c.get_object(Bucket=bkt, Key="sse-s3")["Body"].read() == b"plain"


def test_a_read_with_an_sse_c_key_of_an_object_stored_without_one_is_invalid_request(s3c, bkt):
    """S3 answers 400 InvalidRequest "The encryption parameters are not
    applicable to this object." (HEAD: the status alone); airlock stores no
    object with SSE-C, so such a read is refused for every object.  moto
    serves it (200), hence no differential here."""
    sse_c = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": base64.b64encode(os.urandom(32)).decode()}
    with pytest.raises(ClientError) as ei:
        s3c.get_object(Bucket=bkt, Key="keep", **sse_c)
    assert (ei.value.response["ResponseMetadata"]["HTTPStatusCode"], ei.value.response["Error"]["Code"],
            ei.value.response["Error"]["Message"]) == \
        (400, "InvalidRequest", "The encryption parameters are not applicable to this object.")
    with pytest.raises(ClientError) as ei:
        s3c.head_object(Bucket=bkt, Key="keep", **sse_c)
    assert (ei.value.response["ResponseMetadata"]["HTTPStatusCode"], ei.value.response["Error"]["Code"]) == \
        (400, "400")
    with pytest.raises(ClientError) as ei:
        s3c.get_object_attributes(Bucket=bkt, Key="keep", ObjectAttributes=["ETag"], **sse_c)
    assert ei.value.response["Error"]["Code"] == "InvalidRequest"
    # a key that is not there is still NoSuchKey; the object is unharmed
    with pytest.raises(ClientError) as ei:
        s3c.get_object(Bucket=bkt, Key="missing", **sse_c)
    assert ei.value.response["Error"]["Code"] == "NoSuchKey"
    assert_untouched(s3c, bkt)


def test_location_constraint_us_east_1_is_invalid_as_in_s3(s3c, bkt):
    with pytest.raises(ClientError) as ei:
        s3c.create_bucket(Bucket=f"{bkt}-east", CreateBucketConfiguration={"LocationConstraint": "us-east-1"})
    assert ei.value.response["Error"]["Code"] == "InvalidLocationConstraint"
    with pytest.raises(ClientError) as ei:
        s3c.head_bucket(Bucket=f"{bkt}-east")
    assert ei.value.response["Error"]["Code"] == "404"


def test_metadata_over_2kib_is_metadatatoolarge(s3c, bkt):
    for key in ("keep", "new"):
        with pytest.raises(ClientError) as ei:
            s3c.put_object(Bucket=bkt, Key=key, Body=b"x", Metadata={"big": "v" * 2100})
        assert ei.value.response["Error"]["Code"] == "MetadataTooLarge"
    with pytest.raises(ClientError) as ei:
        s3c.create_multipart_upload(Bucket=bkt, Key="new", Metadata={"big": "v" * 2100})
    assert ei.value.response["Error"]["Code"] == "MetadataTooLarge"
    assert_untouched(s3c, bkt, absent=("new",))
    assert s3c.list_multipart_uploads(Bucket=bkt).get("Uploads", []) == []
    # just under the limit is fine
    s3c.put_object(Bucket=bkt, Key="new", Body=b"x", Metadata={"big": "v" * 2000})


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "99999999999999999999"])
def test_invalid_max_keys_is_invalidargument(raw, bkt, value):
    assert_error(raw("GET", f"/{bkt}?max-keys={value}"), 400, "InvalidArgument")
    assert_error(raw("GET", f"/{bkt}?list-type=2&max-keys={value}"), 400, "InvalidArgument")


@pytest.mark.parametrize("token", ["garbage", "%21%21", "", "AAAA"])
def test_invalid_continuation_token_is_invalidargument(raw, bkt, token):
    assert_error(raw("GET", f"/{bkt}?list-type=2&continuation-token={token}"), 400, "InvalidArgument")


@pytest.mark.parametrize("part", ["0", "10001", "-1", "x", ""])
def test_invalid_part_number_is_invalidargument(raw, s3c, bkt, part):
    up = s3c.create_multipart_upload(Bucket=bkt, Key="mp")
    resp = raw("PUT", f"/{bkt}/mp?partNumber={part}&uploadId={up['UploadId']}", b"data")
    assert_error(resp, 400, "InvalidArgument")
    assert s3c.list_parts(Bucket=bkt, Key="mp", UploadId=up["UploadId"]).get("Parts", []) == []
    assert_error(raw("GET", f"/{bkt}/keep?partNumber={part}"), 400, "InvalidArgument")


@pytest.mark.parametrize("rng", ["bytes=abc", "bytes=1-2,4-5", "chars=0-1", "bytes", "bytes=--1", "bytes=5-2"])
def test_invalid_range_syntax_is_ignored(s3c, bkt, rng):
    r = s3c.get_object(Bucket=bkt, Key="keep", Range=rng)
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert r["Body"].read() == ORIGINAL


def test_a_download_abandoned_mid_body_is_one_line_in_the_log_not_a_server_error(raw, s3c, bkt):
    data = os.urandom(40 * 1024 * 1024)          # more than the socket buffers take
    s3c.put_object(Bucket=bkt, Key="big", Body=data)
    logged = len(raw.gw.log_text())
    url = s3c.generate_presigned_url("get_object", Params={"Bucket": bkt, "Key": "big"}, ExpiresIn=300)
    path = url.split(str(raw.gw.port), 1)[1]
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", raw.gw.port), timeout=10)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{raw.gw.port}\r\n\r\n".encode())
        s.recv(65536)
        time.sleep(0.5)                             # the gateway's writes wait for this reader ...
        s.close()                                   # ... who goes away mid-body
    time.sleep(0.5)
    log = raw.gw.log_text()[logged:]
    assert "the client went away" in log and "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert s3c.get_object(Bucket=bkt, Key="big")["Body"].read() == data


def test_user_metadata_decoding_to_control_characters_stays_readable(s3, bucket):
    """An RFC 2047 value that decodes to CR/LF/NUL is stored decoded; it is
    answered encoded again (no header can carry it), never a 500."""
    import base64
    for i, raw in enumerate((b"a\r\nX-Injected: 1", b"a\x00b\x7fc")):
        word = "=?UTF-8?B?" + base64.b64encode(raw).decode() + "?="
        s3.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x", Metadata={"m": word})
        h = s3.head_object(Bucket=bucket, Key=f"k{i}")
        assert "x-injected" not in h["ResponseMetadata"]["HTTPHeaders"]
        assert base64.b64decode(h["Metadata"]["m"][len("=?UTF-8?B?"):-2]) == raw
        assert s3.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == b"x"


def test_user_metadata_malformed_encoded_word_is_kept_as_sent(s3, bucket):
    """A B-word whose base64 does not decode is stored as sent: not a 500 on the PUT."""
    for value in ("=?UTF-8?B?abcde?=", "=?UTF-8?B?a?="):
        s3.put_object(Bucket=bucket, Key="k", Body=b"x", Metadata={"m": value})
        assert s3.head_object(Bucket=bucket, Key="k")["Metadata"] == {"m": value}
