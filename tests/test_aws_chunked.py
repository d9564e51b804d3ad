"""aws-chunked bodies: signed chunks, signed and unsigned trailers, what boto3 really sends."""
from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

import datetime as dt
import io

from airlock.errors import (
    IncompleteBody,
    InvalidChunkSizeError,
    InvalidRequest,
    MalformedTrailerError,
    SignatureDoesNotMatch,
)
from airlock.s3 import checksums
from airlock.s3.auth import authenticate, payload_mode
from airlock.s3.aws_chunked import MAX_LINE_BYTES, AwsChunkedDecoder, decoded_content_length

AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
EMPTY = hashlib.sha256(b"").hexdigest()


class _StreamingSigner(S3SigV4Auth):
    def __init__(self, *a, payload_value, **kw):
        super().__init__(*a, **kw)
        self._payload_value = payload_value

    def payload(self, request):
        return self._payload_value


def signed_ctx(mode_value, headers=None):
    """Sign a PUT with botocore for an aws-chunked body; return (ctx, seed signature, signing key)."""
    req = AWSRequest(method="PUT", url="http://s3.test/bucket/key", headers={
        "Content-Encoding": "aws-chunked", **(headers or {})})
    _StreamingSigner(Credentials(AK, SK), "s3", "us-east-1", payload_value=mode_value).add_auth(req)
    p = req.prepare()
    hdrs = CIMultiDict(p.headers)
    hdrs["Host"] = "s3.test"
    amz = hdrs["x-amz-date"]
    now = dt.datetime.strptime(amz, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    ctx = authenticate("PUT", "/bucket/key", "", hdrs, {AK: SK}.get, now=now)
    seed = hdrs["Authorization"].rsplit("Signature=", 1)[1]
    # the key derived independently of airlock, straight from the SigV4 spec
    k = ("AWS4" + SK).encode()
    for part in (amz[:8], "us-east-1", "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return ctx, seed, k, amz


def encode_signed(payload, sizes, seed, key, amz, trailers=None, final_crlf=True):
    """AWS's STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER] encoding, written from the docs."""
    scope = f"{amz[:8]}/us-east-1/s3/aws4_request"
    out, prev, pos = [], seed, 0
    pieces = []
    for n in sizes:
        if payload[pos:pos + n]:
            pieces.append(payload[pos:pos + n])
        pos += n
    if pos < len(payload):
        pieces.append(payload[pos:])
    pieces.append(b"")
    for data in pieces:
        sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz, scope, prev, EMPTY, hashlib.sha256(data).hexdigest()])
        sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        prev = sig
        out.append(b"%x;chunk-signature=%s\r\n" % (len(data), sig.encode()))
        if data:
            out.append(data + b"\r\n")
    if trailers is None:
        out.append(b"\r\n" if final_crlf else b"")
    else:
        canon = b"".join(b"%s:%s\n" % (k.encode(), v.encode()) for k, v in trailers.items())
        sts = "\n".join(["AWS4-HMAC-SHA256-TRAILER", amz, scope, prev, hashlib.sha256(canon).hexdigest()])
        tsig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        for k, v in trailers.items():
            out.append(b"%s:%s\r\n" % (k.encode(), v.encode()))
        out.append(b"x-amz-trailer-signature:%s\r\n" % tsig.encode())
        out.append(b"\r\n" if final_crlf else b"")
    return b"".join(out)


def encode_unsigned(payload, chunk_size, checksum_name="x-amz-checksum-crc32"):
    """botocore's own STREAMING-UNSIGNED-PAYLOAD-TRAILER body."""
    return AwsChunkedWrapper(io.BytesIO(payload), checksum_cls=Crc32Checksum,
                             checksum_name=checksum_name, chunk_size=chunk_size).read()


def decode(decoder, body, splits=(None,)):
    out, pos = bytearray(), 0
    for n in splits:
        part = body[pos:] if n is None else body[pos:pos + n]
        pos += len(part)
        for piece in decoder.feed(part):
            out += piece
    if pos < len(body):
        for piece in decoder.feed(body[pos:]):
            out += piece
    return bytes(out), decoder.finish()


# ---------------------------------------------------------------------------
# signed chunks
# ---------------------------------------------------------------------------
def test_signed_chunks_decode_and_verify():
    ctx, seed, key, amz = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    assert payload_mode(ctx) == "streaming-signed" and ctx.seed_signature == seed
    payload = bytes(range(256)) * 300
    body = encode_signed(payload, [8192, 8192, 30000], seed, key, amz)
    d = AwsChunkedDecoder("streaming-signed", ctx, decoded_content_length=len(payload))
    data, trailers = decode(d, body)
    assert data == payload and trailers == {} and d.decoded_length == len(payload)


def test_tampered_chunk_data_is_signature_does_not_match():
    ctx, seed, key, amz = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    body = bytearray(encode_signed(b"a" * 20000, [10000], seed, key, amz))
    body[body.index(b"a") + 5000] = ord("b")
    with pytest.raises(SignatureDoesNotMatch):
        decode(AwsChunkedDecoder("streaming-signed", ctx), bytes(body))


def test_reordered_chunks_break_the_signature_chain():
    ctx, seed, key, amz = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    body = encode_signed(b"x" * 100 + b"y" * 100, [100], seed, key, amz)
    first_end = body.index(b"\r\n", body.index(b"\r\n") + 2) + 2
    second_end = body.index(b"\r\n", body.index(b"\r\n", first_end) + 2) + 2
    swapped = body[first_end:second_end] + body[:first_end] + body[second_end:]
    with pytest.raises(SignatureDoesNotMatch):
        decode(AwsChunkedDecoder("streaming-signed", ctx), swapped)


def test_chunk_without_signature_in_signed_mode_is_refused():
    ctx, *_ = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    with pytest.raises(SignatureDoesNotMatch):
        decode(AwsChunkedDecoder("streaming-signed", ctx), b"5\r\nhello\r\n0\r\n\r\n")


def test_signed_chunks_from_another_request_are_refused():
    ctx, *_ = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    _, seed2, key, amz = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", {"x-amz-meta-a": "other"})
    body = encode_signed(b"hello", [], seed2, key, amz)
    with pytest.raises(SignatureDoesNotMatch):
        decode(AwsChunkedDecoder("streaming-signed", ctx), body)


def test_signed_body_missing_final_crlf_is_accepted():
    ctx, seed, key, amz = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    body = encode_signed(b"hello", [], seed, key, amz, final_crlf=False)
    assert decode(AwsChunkedDecoder("streaming-signed", ctx), body)[0] == b"hello"


def test_signed_trailer_decodes_and_verifies():
    trailer = {"x-amz-checksum-crc32c": checksums_b64("CRC32C", b"payload" * 999)}
    ctx, seed, key, amz = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
                                     {"x-amz-trailer": "x-amz-checksum-crc32c"})
    assert payload_mode(ctx) == "streaming-signed-trailer"
    body = encode_signed(b"payload" * 999, [4000], seed, key, amz, trailers=trailer)
    d = AwsChunkedDecoder("streaming-signed-trailer", ctx, ["x-amz-checksum-crc32c"])
    data, trailers = decode(d, body, splits=[1] * 200)
    assert data == b"payload" * 999 and trailers == trailer


def test_tampered_signed_trailer_is_signature_does_not_match():
    trailer = {"x-amz-checksum-crc32": "AAAAAA=="}
    ctx, seed, key, amz = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER")
    body = encode_signed(b"abc", [], seed, key, amz, trailers=trailer).replace(b"AAAAAA==", b"AAAAAB==")
    with pytest.raises(SignatureDoesNotMatch):
        decode(AwsChunkedDecoder("streaming-signed-trailer", ctx, ["x-amz-checksum-crc32"]), body)


def test_signed_trailer_without_trailer_signature_is_malformed():
    ctx, seed, key, amz = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER")
    body = encode_signed(b"abc", [], seed, key, amz, trailers={"x-amz-checksum-crc32": "AAAAAA=="})
    body = body[:body.index(b"x-amz-trailer-signature")] + b"\r\n"
    with pytest.raises(MalformedTrailerError):
        decode(AwsChunkedDecoder("streaming-signed-trailer", ctx, ["x-amz-checksum-crc32"]), body)


# ---------------------------------------------------------------------------
# unsigned trailer (botocore's AwsChunkedWrapper)
# ---------------------------------------------------------------------------
def checksums_b64(alg, data):
    c = checksums.new_checksum(alg)
    c.update(data)
    return c.b64()


def test_botocore_unsigned_trailer_body_decodes_with_its_crc32():
    payload = b"0123456789" * 5000
    body = encode_unsigned(payload, 7000)
    assert body.endswith(b"\r\n\r\n") and b"x-amz-checksum-crc32:" in body
    d = AwsChunkedDecoder("streaming-unsigned-trailer", None, ["x-amz-checksum-crc32"],
                          decoded_content_length=len(payload))
    data, trailers = decode(d, body)
    assert data == payload
    checksums.verify_checksum("CRC32", trailers["x-amz-checksum-crc32"], _digest("CRC32", payload))


def _digest(alg, data):
    c = checksums.new_checksum(alg)
    c.update(data)
    return c.digest()


def test_empty_body_with_unsigned_trailer_decodes():
    body = encode_unsigned(b"", 1024)
    data, trailers = decode(AwsChunkedDecoder("streaming-unsigned-trailer", None, ["x-amz-checksum-crc32"]), body)
    assert data == b"" and trailers["x-amz-checksum-crc32"] == checksums_b64("CRC32", b"")


def test_unsigned_trailer_missing_final_crlf_is_accepted():
    body = encode_unsigned(b"abc", 1024)[:-2]
    _, trailers = decode(AwsChunkedDecoder("streaming-unsigned-trailer", None, ["x-amz-checksum-crc32"]), body)
    assert "x-amz-checksum-crc32" in trailers


def test_undeclared_trailer_is_malformed_trailer():
    body = encode_unsigned(b"abc", 1024, checksum_name="x-amz-checksum-sha256")
    with pytest.raises(MalformedTrailerError):
        decode(AwsChunkedDecoder("streaming-unsigned-trailer", None, ["x-amz-checksum-crc32"]), body)


def test_declared_trailer_that_never_arrives_is_malformed_trailer():
    with pytest.raises(MalformedTrailerError):
        decode(AwsChunkedDecoder("streaming-unsigned-trailer", None, ["x-amz-checksum-crc32"]),
               b"3\r\nabc\r\n0\r\n\r\n")


def test_boto3_put_object_over_https_sends_unsigned_trailer_that_decodes():
    seen = []
    client = boto3.client("s3", endpoint_url="https://s3.test", region_name="us-east-1",
                          aws_access_key_id=AK, aws_secret_access_key=SK,
                          config=Config(s3={"addressing_style": "path"}))

    class _Empty:
        def stream(self, **kw):
            return iter([b""])

    def capture(request, **kw):
        body = request.body.read() if hasattr(request.body, "read") else request.body
        seen.append((request, body))
        return AWSResponse(request.url, 200, {"ETag": '"x"'}, _Empty())

    client.meta.events.register("before-send.s3.*", capture)
    payload = b"boto3 payload " * 10000
    client.put_object(Bucket="bucket", Key="dir/a b", Body=io.BytesIO(payload), ChecksumAlgorithm="CRC32C")
    request, body = seen[-1]
    parts = urlsplit(request.url)
    headers = CIMultiDict((k, v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items())
    headers["Host"] = parts.netloc
    now = dt.datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)

    ctx = authenticate("PUT", parts.path, parts.query, headers, {AK: SK}.get, now=now)
    mode = payload_mode(ctx)
    assert mode == "streaming-unsigned-trailer"
    want = checksums.requested_checksum(headers)
    assert want == ("CRC32C", None, True)
    d = AwsChunkedDecoder(mode, ctx, checksums.trailer_names(headers),
                          decoded_content_length=decoded_content_length(headers))
    data, trailers = decode(d, body, splits=[100, 5000, 3, 70000])
    assert data == payload
    checksums.verify_checksum("CRC32C", trailers["x-amz-checksum-crc32c"], _digest("CRC32C", data))


# ---------------------------------------------------------------------------
# malformed streams
# ---------------------------------------------------------------------------
def test_stream_ending_mid_chunk_is_incomplete_body():
    body = encode_unsigned(b"x" * 5000, 1000)
    d = AwsChunkedDecoder("streaming-unsigned-trailer", None, ["x-amz-checksum-crc32"])
    d.feed(body[:2500])
    with pytest.raises(IncompleteBody):
        d.finish()


def test_stream_without_final_zero_chunk_is_incomplete_body():
    d = AwsChunkedDecoder("streaming-unsigned-trailer", None, [])
    d.feed(b"3\r\nabc\r\n")
    with pytest.raises(IncompleteBody):
        d.finish()


def test_decoded_length_shorter_than_declared_is_incomplete_body():
    body = encode_unsigned(b"abc", 1024)
    with pytest.raises(IncompleteBody):
        decode(AwsChunkedDecoder("streaming-unsigned-trailer", None, ["x-amz-checksum-crc32"],
                                 decoded_content_length=4), body)


def test_decoded_length_longer_than_declared_is_refused_early():
    d = AwsChunkedDecoder("streaming-unsigned-trailer", None, [], decoded_content_length=2)
    with pytest.raises(InvalidRequest):
        d.feed(b"3\r\n")


@pytest.mark.parametrize("header", [b"zz\r\n", b"\r\n", b"-1\r\n", b"1" * 17 + b"\r\n"])
def test_bad_chunk_size_is_invalid_chunk_size(header):
    with pytest.raises(InvalidChunkSizeError):
        AwsChunkedDecoder("streaming-unsigned-trailer", None, []).feed(header)


def test_overlong_chunk_header_line_is_refused_without_buffering_it():
    d = AwsChunkedDecoder("streaming-unsigned-trailer", None, [])
    with pytest.raises(InvalidRequest):
        for _ in range(10):
            d.feed(b"1" + b";x" * (MAX_LINE_BYTES // 4))


def test_chunk_data_not_followed_by_crlf_is_refused():
    with pytest.raises(InvalidRequest):
        AwsChunkedDecoder("streaming-unsigned-trailer", None, []).feed(b"3\r\nabcX\r\n")


def test_data_after_final_chunk_is_refused():
    body = encode_unsigned(b"abc", 1024) + b"garbage"
    with pytest.raises(InvalidRequest):
        decode(AwsChunkedDecoder("streaming-unsigned-trailer", None, ["x-amz-checksum-crc32"]), body)


def test_feed_returns_views_not_copies_of_chunk_data():
    body = b"5\r\nhello\r\n0\r\n\r\n"
    views = AwsChunkedDecoder("streaming-unsigned-trailer", None, []).feed(body)
    assert [bytes(v) for v in views] == [b"hello"] and all(isinstance(v, memoryview) for v in views)
    assert views[0].obj is body


def test_decoded_content_length_header_is_parsed():
    assert decoded_content_length(CIMultiDict({"x-amz-decoded-content-length": "42"})) == 42
    assert decoded_content_length(CIMultiDict()) is None


# ---------------------------------------------------------------------------
# property: any payload, any chunking, any split of the wire bytes
# ---------------------------------------------------------------------------
_SIGNED = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
_SIGNED_TRAILER = signed_ctx("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER")


def _splits(draw, total):
    cuts = draw(st.lists(st.integers(0, total), max_size=12))
    cuts = sorted(set(cuts))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=5000), sizes=st.lists(st.integers(1, 1500), max_size=8),
       mode=st.sampled_from(["streaming-signed", "streaming-signed-trailer", "streaming-unsigned-trailer"]),
       data=st.data())
def test_any_chunking_and_any_split_decodes_to_the_payload(payload, sizes, mode, data):
    if mode == "streaming-unsigned-trailer":
        body = encode_unsigned(payload, data.draw(st.integers(1, 2000)))
        d = AwsChunkedDecoder(mode, None, ["x-amz-checksum-crc32"], decoded_content_length=len(payload))
    else:
        ctx, seed, key, amz = _SIGNED if mode == "streaming-signed" else _SIGNED_TRAILER
        trailers = {"x-amz-checksum-sha256": checksums_b64("SHA256", payload)} if mode.endswith("trailer") else None
        body = encode_signed(payload, sizes, seed, key, amz, trailers=trailers)
        d = AwsChunkedDecoder(mode, ctx, list(trailers or ()), decoded_content_length=len(payload))
    out, trailers = decode(d, body, splits=_splits(data.draw, len(body)))
    assert out == payload
    assert d.decoded_length == len(payload)
