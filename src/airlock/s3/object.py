"""Object operations: PutObject, GetObject, HeadObject, DeleteObject, CopyObject."""
from __future__ import annotations

import base64
import datetime
import email.errors
import email.header
import email.utils
import logging
import re
from urllib.parse import unquote

from aiohttp import web

from airlock import errors as E
from airlock.primary.model import NULL_VERSION, STORED_HEADERS, Manifest, ObjectMeta
from airlock.s3 import checksums
from airlock.s3.body import BodyStream
from airlock.s3 import tagging
from airlock.s3.common import (checked_version_id, client_gone, owned_bucket, version_headers, version_id_param,
                               xml_response)
from airlock.s3.xml import doc, el, http_date, iso8601

log = logging.getLogger("airlock.s3")

REDIRECT = "x-amz-website-redirect-location"
MAX_USER_METADATA = 2048       # bytes of x-amz-meta-* names + values (S3's limit)
STORAGE_CLASSES = frozenset({
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
    "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR", "OUTPOSTS", "SNOW", "EXPRESS_ONEZONE"})
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type", "response-content-language": "Content-Language",
    "response-expires": "Expires", "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}
# RFC 9110 14.1: OWS around a range; a range unit's name is case-insensitive
_RANGE_RE = re.compile(r"^bytes=[ \t]*(\d*)-(\d*)[ \t]*$", re.IGNORECASE)
_HEADER_SAFE_RE = re.compile(r"[\t\x20-\x7e]*")   # what a header value can carry as is
_ENCODED_WORDS_RE = re.compile(      # a value of RFC 2047 encoded-words only (B: base64, Q: quoted-printable)
    r"^(?:=\?[^?\s]+\?(?:[bB]\?[A-Za-z0-9+/]*={0,2}|[qQ]\?[^?\s]*)\?=\s*)+$")


# ---------------------------------------------------------------------------- protections
OBJECT_LOCK_HEADERS = ("x-amz-object-lock-mode", "x-amz-object-lock-retain-until-date",
                       "x-amz-object-lock-legal-hold")
SSE_C_HEADERS = ("x-amz-server-side-encryption-customer-algorithm",
                 "x-amz-server-side-encryption-customer-key",
                 "x-amz-server-side-encryption-customer-key-md5")
SSE_C_COPY_SOURCE_HEADERS = tuple(h.replace("x-amz-", "x-amz-copy-source-", 1) for h in SSE_C_HEADERS)
SSE_KMS_VALUES = ("aws:kms", "aws:kms:dsse")


def refuse_unsupported_protection(headers) -> None:
    """A write that asks for a protection airlock does not give -- retention
    or a legal hold (Object Lock), encryption with the client's key (SSE-C)
    or with KMS -- is refused, never stored without it: its client would
    believe the object locked, or unreadable without its key.  SSE-S3
    (AES256) is accepted and not applied (docs/architecture.md)."""
    for h in OBJECT_LOCK_HEADERS:
        if h in headers:
            # S3's answer for a bucket without Object Lock, which every airlock bucket is
            raise E.InvalidRequest("Bucket is missing Object Lock Configuration", ArgumentName=h,
                                   ArgumentValue=headers[h])
    for h in SSE_C_HEADERS:
        if h in headers:
            raise E.NotImplementedS3("Server-side encryption with customer-provided keys (SSE-C) "
                                     "is not implemented.", Header=h)
    refuse_sse_c_read(headers, SSE_C_COPY_SOURCE_HEADERS)     # the copy source is read with that key
    sse = headers.get("x-amz-server-side-encryption")
    if sse is not None and sse != "AES256":
        if sse in SSE_KMS_VALUES:
            raise E.NotImplementedS3("Server-side encryption with KMS keys is not implemented.",
                                     Header="x-amz-server-side-encryption")
        raise E.InvalidArgument("The encryption method specified is not supported",
                                ArgumentName="x-amz-server-side-encryption", ArgumentValue=sse)
    for h in ("x-amz-server-side-encryption-aws-kms-key-id", "x-amz-server-side-encryption-context"):
        if h in headers:
            raise E.NotImplementedS3("Server-side encryption with KMS keys is not implemented.", Header=h)


def refuse_sse_c_read(headers, names: tuple[str, ...] = SSE_C_HEADERS) -> None:
    """A read (GET, HEAD, GetObjectAttributes; a copy's source, `names` =
    SSE_C_COPY_SOURCE_HEADERS) that sends an SSE-C key for an object stored
    without one -- every airlock object, since a write with SSE-C is
    refused -- is 400 InvalidRequest, as S3 answers it: serving it would
    tell the client its key protected the object."""
    for h in names:
        if h in headers:
            raise E.InvalidRequest("The encryption parameters are not applicable to this object.")


# ---------------------------------------------------------------------------- metadata
# S3 (user guide, "User-defined object metadata"): a user metadata value is
# "character decoded as per RFC 2047 before storing and encoded as per RFC
# 2047 to make them mail-safe before returning"; an ASCII value is returned
# as is.  Stored decoded, answered encoded, so a response header stays ASCII
# whatever the client sent (raw UTF-8 or encoded-words).
def decode_metadata_value(value: str) -> str:
    """The stored form of an x-amz-meta-* value: RFC 2047 encoded-words decoded."""
    if "=?" not in value or not _ENCODED_WORDS_RE.match(value.strip()):
        return value
    try:
        return "".join(part.decode(charset or "ascii") if isinstance(part, bytes) else part
                       for part, charset in email.header.decode_header(value.strip()))
    except (LookupError, UnicodeDecodeError, ValueError, email.errors.HeaderParseError):
        # unknown charset, bad base64 (decode_header raises HeaderParseError, not a ValueError): kept as sent
        return value


def encode_metadata_value(value: str) -> str:
    """The answered form of a stored x-amz-meta-* value: as is if printable
    ASCII, else one RFC 2047 B-word.  A value decoded from encoded-words may
    hold control characters (CR, LF, NUL) that no header can carry: sent as
    is, every GET and HEAD of the object would fail (500)."""
    if _HEADER_SAFE_RE.fullmatch(value):
        return value
    return "=?UTF-8?B?" + base64.b64encode(value.encode("utf-8", "surrogateescape")).decode("ascii") + "?="


def meta_from_headers(headers) -> ObjectMeta:
    stored = {h: headers[h] for h in STORED_HEADERS if h in headers}
    if "content-encoding" in stored:
        # aws-chunked describes the transfer, not the object: S3 does not store it
        enc = ",".join(e.strip() for e in stored["content-encoding"].split(",")
                       if e.strip() and e.strip().lower() != "aws-chunked")
        if enc:
            stored["content-encoding"] = enc
        else:
            del stored["content-encoding"]
    user: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        lname = name.lower()
        if lname.startswith("x-amz-meta-"):
            k = lname[len("x-amz-meta-"):]
            value = decode_metadata_value(value)
            user[k] = f"{user[k]},{value}" if k in user else value
            size += len(k) + len(value.encode("utf-8", "surrogateescape"))   # S3 counts UTF-8 bytes
    if size > MAX_USER_METADATA:
        raise E.MetadataTooLarge(Size=str(size), MaxSizeAllowed=str(MAX_USER_METADATA))
    sc = headers.get("x-amz-storage-class", "STANDARD")
    if sc not in STORAGE_CLASSES:
        raise E.InvalidStorageClass(StorageClassRequested=sc)
    return ObjectMeta(headers=stored, user=user, storage_class=sc,
                      tagging=tagging.from_header(headers.get("x-amz-tagging")))


def etag_header(etag: str) -> str:
    return f'"{etag}"'


def _etags(value: str) -> list[str]:
    return [v.strip().strip('"') for v in value.split(",")]


def _etag_matches(value: str, etag: str) -> bool:
    """Does an If-Match / If-None-Match list (quoted, comma separated, or *) name `etag`?"""
    tags = _etags(value)
    return etag in tags or "*" in tags


def _parse_http_date(value: str) -> float | None:
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return d.timestamp() if d is not None else None


def write_precondition(headers):
    """If-Match / If-None-Match on PUT and CompleteMultipartUpload (S3 conditional writes)."""
    if_match = headers.get("If-Match")
    if_none = headers.get("If-None-Match")
    if if_none is not None and if_none.strip() != "*":
        raise E.NotImplementedS3("If-None-Match on writes only supports '*'.", Header="If-None-Match")
    if if_match is None and if_none is None:
        return None
    return WritePrecondition(if_match, if_none)


class WritePrecondition:
    """The check of a conditional write, run by the engine against the
    current object just before the commit (under the key's write lock).  A
    plain object, so a gateway worker can hand it to the leader."""

    def __init__(self, if_match: str | None, if_none: str | None):
        self.if_match = if_match
        self.if_none = if_none

    def __call__(self, current: Manifest | None) -> None:
        if self.if_none is not None and current is not None:
            raise E.PreconditionFailed(Condition="If-None-Match")
        if self.if_match is not None:
            if current is None:
                raise E.NoSuchKey()
            if not _etag_matches(self.if_match, current.etag):
                raise E.PreconditionFailed(Condition="If-Match")


class DeletePrecondition:
    """A conditional delete: DeleteObject's If-Match, x-amz-if-match-size and
    x-amz-if-match-last-modified-time, or an object's ETag, Size and
    LastModifiedTime in DeleteObjects.  Checked by the engine against the
    object the request would delete (the current one, or the version named),
    under the key's write lock, like WritePrecondition; a plain object for
    the same reason.  A condition on an object that is not there is
    NoSuchKey (as moto answers If-Match)."""

    def __init__(self, etag: str | None, size: int | None, mtime: float | None):
        self.etag = etag
        self.size = size
        self.mtime = mtime

    def __call__(self, current: Manifest | None) -> None:
        if current is None:
            raise E.NoSuchKey()
        if self.etag is not None and not _etag_matches(self.etag, current.etag):
            raise E.PreconditionFailed(Condition="If-Match")
        if self.size is not None and current.size != self.size:
            raise E.PreconditionFailed(Condition="x-amz-if-match-size")
        if self.mtime is not None and int(current.mtime) != int(self.mtime):
            raise E.PreconditionFailed(Condition="x-amz-if-match-last-modified-time")


def delete_precondition(etag: str | None, size: str | None, mtime: str | None,
                        names=("If-Match", "x-amz-if-match-size", "x-amz-if-match-last-modified-time")):
    """A DeletePrecondition from the request's values (None: no condition).
    A size that is not a whole number, or a time that is neither an HTTP
    date nor ISO 8601, is InvalidArgument: silently deleting anyway would
    be the one wrong answer."""
    if etag is None and size is None and mtime is None:
        return None
    n = None
    if size is not None:
        if not size.strip().isdigit():
            raise E.InvalidArgument(f"{names[1]} must be a whole number of bytes", ArgumentName=names[1],
                                    ArgumentValue=size)
        n = int(size)
    t = None
    if mtime is not None:
        t = _parse_http_date(mtime)
        if t is None:
            try:
                t = datetime.datetime.fromisoformat(mtime.strip().replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise E.InvalidArgument(f"{names[2]} is not a date", ArgumentName=names[2],
                                        ArgumentValue=mtime) from None
    return DeletePrecondition(etag, n, t)


def check_read_conditions(headers, m: Manifest, prefix: str = "") -> None:
    """GET/HEAD (prefix "") and copy-source (prefix "x-amz-copy-source-") conditionals,
    with S3's precedence rules."""
    if_match = headers.get(prefix + "If-Match")
    if_none = headers.get(prefix + "If-None-Match")
    if_unmod = headers.get(prefix + "If-Unmodified-Since")
    if_mod = headers.get(prefix + "If-Modified-Since")
    mtime = int(m.mtime)
    cond_failed = E.PreconditionFailed
    if if_match is not None:
        if not _etag_matches(if_match, m.etag):
            raise cond_failed(Condition=prefix + "If-Match")
    elif if_unmod is not None:
        t = _parse_http_date(if_unmod)
        if t is not None and mtime > t:
            raise cond_failed(Condition=prefix + "If-Unmodified-Since")
    def not_modified(condition: str) -> E.S3Error:
        if prefix:
            return E.PreconditionFailed(Condition=condition)
        err = E.NotModified(Condition=condition)
        # a 304 names the representation the client already has (RFC 9110 15.4.5)
        err.headers = {"ETag": etag_header(m.etag), "Last-Modified": http_date(m.mtime)}
        return err
    if if_none is not None:
        if _etag_matches(if_none, m.etag):
            raise not_modified(prefix + "If-None-Match")
    elif if_mod is not None:
        t = _parse_http_date(if_mod)
        if t is not None and mtime <= t:
            raise not_modified(prefix + "If-Modified-Since")


def object_headers(m: Manifest, with_checksums: bool) -> dict[str, str]:
    h = {
        "ETag": etag_header(m.etag),
        "Last-Modified": http_date(m.mtime),
        "Content-Type": m.meta.content_type,
        "Accept-Ranges": "bytes",
    }
    for name, value in m.meta.headers.items():
        if name != "content-type":
            h[name.title()] = value
    for k, v in m.meta.user.items():
        h[f"x-amz-meta-{k}"] = encode_metadata_value(v)
    if m.meta.storage_class != "STANDARD":
        h["x-amz-storage-class"] = m.meta.storage_class
    if m.parts:
        h["x-amz-mp-parts-count"] = str(len(m.parts))
    if m.meta.tagging:
        h["x-amz-tagging-count"] = str(tagging.tag_count(m))
    if with_checksums and m.checksums:
        for alg, v in m.checksums.items():
            h[checksums.header_name(alg)] = v
        if m.checksum_type:
            h["x-amz-checksum-type"] = m.checksum_type
    return h


# ---------------------------------------------------------------------------- PUT
async def put_object(ctx) -> web.Response:
    owned_bucket(ctx)
    refuse_unsupported_protection(ctx.headers)
    meta = meta_from_headers(ctx.headers)
    cond = write_precondition(ctx.headers)
    body = BodyStream(ctx.request, ctx.auth)
    m = await ctx.engine.put_object(ctx.bucket, ctx.key, body, meta, want_sha256=body.want_sha256,
                                    checksum_algorithms=body.checksum_algorithms,
                                    verify=body.verify, precondition=cond)
    headers = {"ETag": etag_header(m.etag)}
    for alg, v in m.checksums.items():
        headers[checksums.header_name(alg)] = v
        headers["x-amz-checksum-type"] = "FULL_OBJECT"
    if m.version_id != NULL_VERSION:
        headers["x-amz-version-id"] = m.version_id
    return web.Response(status=200, headers=headers)


# ---------------------------------------------------------------------------- GET / HEAD
def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) for a single byte range; None to serve the whole object."""
    if header is None:
        return None
    mr = _RANGE_RE.match(header.strip())
    if mr is None:
        return None  # S3 ignores ranges it cannot parse (including multiple ranges)
    a, b = mr.groups()
    if a == "" and b == "":
        return None
    if a == "":
        n = int(b)
        if n == 0:
            raise E.InvalidRange(RangeRequested=header, ActualObjectSize=str(size))
        if size == 0:
            return None     # the last n bytes of nothing: the whole (empty) object, 200 (as moto)
        return max(size - n, 0), size
    start = int(a)
    end = size if b == "" else min(int(b) + 1, size)
    if b != "" and int(b) < start:
        return None
    if start >= size:
        raise E.InvalidRange(RangeRequested=header, ActualObjectSize=str(size))
    return start, end


def _part_range(m: Manifest, part_number: int) -> tuple[int, int]:
    parts = m.parts or [m.size]
    if part_number > len(parts):
        raise E.InvalidPartNumber(PartNumberRequested=str(part_number), ActualPartCount=str(len(parts)))
    start = sum(parts[:part_number - 1])
    return start, start + parts[part_number - 1]


def _aligned_part(m: Manifest, rng: tuple[int, int]) -> int | None:
    """The number of the part of a multipart object whose bytes are exactly `rng`, if one is."""
    start = 0
    for n, size in enumerate(m.parts or (), 1):
        if (start, start + size) == rng:
            return n
        start += size
    return None


def _part_checksum_headers(m: Manifest, part_number: int) -> dict[str, str]:
    """The checksum headers of one part (a single-part object is its own part 1)."""
    if not m.parts:
        sums = m.checksums
    else:
        listed = m.part_checksums or []
        sums = listed[part_number - 1] if part_number <= len(listed) else {}
    return {checksums.header_name(alg): v for alg, v in sums.items()}


def _resolve_read(ctx):
    owned_bucket(ctx)
    m = ctx.engine.head_object(ctx.bucket, ctx.key, version_id_param(ctx), method=ctx.method)
    refuse_sse_c_read(ctx.headers)
    check_read_conditions(ctx.headers, m)
    with_checksums = ctx.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
    headers = object_headers(m, with_checksums=with_checksums)
    headers.update(version_headers(ctx, m))
    # these responses are prepared here, before S3App.handle could add its ids
    headers["x-amz-request-id"] = headers["x-amz-id-2"] = ctx.request_id
    for q, h in RESPONSE_OVERRIDES.items():
        if q in ctx.query:
            headers[h] = ctx.query[q]
    status, rng = 200, None
    pn = ctx.query.get("partNumber")
    if pn is None:
        # S3 sends x-amz-mp-parts-count only when a partNumber was asked for (HeadObject docs)
        headers.pop("x-amz-mp-parts-count", None)
    if pn is not None:
        if not pn.isdigit() or not 1 <= int(pn) <= 10000:
            raise E.InvalidArgument("Part number must be an integer between 1 and 10000, inclusive",
                                    ArgumentName="partNumber", ArgumentValue=pn)
        if "Range" in ctx.headers:
            raise E.InvalidRequest("Cannot specify both Range header and partNumber query parameter")
        rng = _part_range(m, int(pn))
        status = 206
        headers.pop("x-amz-checksum-type", None)
        for alg in list(m.checksums):
            headers.pop(checksums.header_name(alg), None)
    else:
        rng = _byte_range(ctx.headers.get("Range"), m.size) if m.size or "Range" in ctx.headers else None
        if rng is not None:
            status = 206
            for alg in list(m.checksums):
                headers.pop(checksums.header_name(alg), None)
            headers.pop("x-amz-checksum-type", None)
    if rng is not None and with_checksums:
        # not the whole object's checksum, but a part's: S3 user guide ("Checking object
        # integrity"): "For completed uploads, you can get an individual part's checksum by
        # using the GetObject or HeadObject operations and specifying a part number or byte
        # range that aligns to a single part"
        n = int(pn) if pn is not None else _aligned_part(m, rng)
        if n is not None:
            headers.update(_part_checksum_headers(m, n))
    if rng is None:
        start, end = 0, m.size
    else:
        start, end = rng
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{m.size}" if end > start else f"bytes */{m.size}"
    headers["Content-Length"] = str(end - start)
    return m, status, headers, start, end


async def head_object(ctx) -> web.Response:
    _m, status, headers, _s, _e = _resolve_read(ctx)
    length = int(headers.pop("Content-Length"))
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = length
    await resp.prepare(ctx.request)
    await resp.write_eof()
    return resp


async def get_object(ctx) -> web.StreamResponse:
    m, status, headers, start, end = _resolve_read(ctx)
    length = int(headers.pop("Content-Length"))
    chunks = ctx.engine.read_object(m, start, end)
    # fetch the first chunk before answering, so a missing or corrupt first
    # chunk is still an S3 error rather than a cut-off 200
    first = None
    if length:
        first = await chunks.__anext__()
    if len(first or b"") == length:
        # the whole body is in hand (small objects, one chunk): one response,
        # headers and body in a single write
        await chunks.aclose()
        body = first if isinstance(first, (bytes, bytearray)) else bytes(first or b"")
        return web.Response(status=status, headers=headers, body=body)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = length
    try:
        await resp.prepare(ctx.request)
        if first is not None:
            await resp.write(first)
            async for piece in chunks:
                await resp.write(piece)
        await resp.write_eof()
    except ConnectionError as e:
        if not client_gone(ctx.request, e):
            raise
        # the reader went away (a download interrupted): the answer was
        # under way; nothing to report but a line
        log.info("GET %s: the client went away (%s)", ctx.request.rel_url, e)
    finally:
        await chunks.aclose()
    return resp


# ---------------------------------------------------------------------------- DELETE
async def delete_object(ctx) -> web.Response:
    owned_bucket(ctx)
    h = ctx.headers
    cond = delete_precondition(h.get("If-Match"), h.get("x-amz-if-match-size"),
                               h.get("x-amz-if-match-last-modified-time"))
    vid, marker = await ctx.engine.delete_object(ctx.bucket, ctx.key, version_id_param(ctx), precondition=cond)
    headers = {}
    if vid is not None:
        headers["x-amz-version-id"] = vid
    if marker:
        headers["x-amz-delete-marker"] = "true"
    return web.Response(status=204, headers=headers)


# ---------------------------------------------------------------------------- COPY
def parse_copy_source(ctx) -> tuple[str, str, str | None]:
    """(bucket, key, version id or None) of x-amz-copy-source."""
    raw = ctx.headers["x-amz-copy-source"]
    src, _, qs = raw.partition("?")
    if qs and not qs.startswith("versionId="):
        raise E.InvalidArgument("Invalid copy source", ArgumentName="x-amz-copy-source")
    version_id = checked_version_id(unquote(qs[len("versionId="):]), "x-amz-copy-source") if qs else None
    try:
        src = unquote(src, errors="strict")
    except UnicodeDecodeError:
        raise E.InvalidArgument("Invalid copy source encoding", ArgumentName="x-amz-copy-source") from None
    src = src.lstrip("/")
    bucket, _, key = src.partition("/")
    if not bucket or not key:
        raise E.InvalidArgument("Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
                                ArgumentName="x-amz-copy-source", ArgumentValue=raw)
    return bucket, key, version_id


def source_manifest(ctx) -> Manifest:
    sbucket, skey, svid = parse_copy_source(ctx)
    b = ctx.engine.bucket(sbucket)
    if b is None:
        raise E.NoSuchBucket(BucketName=sbucket)
    if b.owner != ctx.user.user_id:
        raise E.AccessDenied()
    try:
        src = ctx.engine.head_object(sbucket, skey, svid)
    except E.MethodNotAllowed:        # the version named is a delete marker
        raise E.InvalidRequest("The source of a copy request may not specifically refer to a delete "
                               "marker by version id.") from None
    check_read_conditions(ctx.headers, src, prefix="x-amz-copy-source-")
    return src


def copy_checksum_algorithm(headers) -> str | None:
    """CopyObject's x-amz-checksum-algorithm: the checksum the copy gets
    instead of the source's (S3: "Unrecognized or unsupported values will
    respond with the HTTP status code 400 Bad Request")."""
    alg = headers.get("x-amz-checksum-algorithm")
    if alg is None:
        return None
    if alg.strip().upper() not in checksums.ALGORITHMS:
        raise E.InvalidRequest("Value for x-amz-checksum-algorithm header is invalid.")
    return alg.strip().upper()


async def copy_object(ctx) -> web.Response:
    owned_bucket(ctx)
    refuse_unsupported_protection(ctx.headers)
    src = source_manifest(ctx)
    directive = ctx.headers.get("x-amz-metadata-directive", "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise E.InvalidArgument("Unknown metadata directive.", ArgumentName="x-amz-metadata-directive",
                                ArgumentValue=directive)
    tagging_directive = ctx.headers.get("x-amz-tagging-directive", "COPY").upper()
    if tagging_directive not in ("COPY", "REPLACE"):
        raise E.InvalidArgument("Unknown tagging directive.", ArgumentName="x-amz-tagging-directive",
                                ArgumentValue=tagging_directive)
    if directive == "REPLACE":
        meta = meta_from_headers(ctx.headers)
    else:
        meta = ObjectMeta(headers=dict(src.meta.headers), user=dict(src.meta.user),
                          storage_class=ctx.headers.get("x-amz-storage-class", src.meta.storage_class))
        if meta.storage_class not in STORAGE_CLASSES:
            raise E.InvalidStorageClass(StorageClassRequested=meta.storage_class)
        # S3: "unique to each object and not copied" with the directive; the request's, if any
        meta.headers.pop(REDIRECT, None)
        if REDIRECT in ctx.headers:
            meta.headers[REDIRECT] = ctx.headers[REDIRECT]
    # tags follow their own directive: the source's unless REPLACE (then x-amz-tagging, or none)
    meta.tagging = (tagging.from_header(ctx.headers.get("x-amz-tagging")) if tagging_directive == "REPLACE"
                    else src.meta.tagging)
    if (src.bucket, src.key) == (ctx.bucket, ctx.key) and directive == "COPY" \
            and "?versionId=" not in ctx.headers["x-amz-copy-source"] \
            and not any(h in ctx.headers for h in ("x-amz-storage-class", REDIRECT,
                                                   "x-amz-server-side-encryption")):
        raise E.InvalidRequest(
            "This copy request is illegal because it is trying to copy an object to itself without "
            "changing the object's metadata, storage class, website redirect location or encryption "
            "attributes.")
    m = await ctx.engine.copy_object(src, ctx.bucket, ctx.key, meta,
                                     precondition=write_precondition(ctx.headers),
                                     checksum_algorithm=copy_checksum_algorithm(ctx.headers))
    body = el("LastModified", iso8601(m.mtime)) + el("ETag", etag_header(m.etag))
    if m.checksums and m.checksum_type:
        body += el("ChecksumType", m.checksum_type)       # CopyObjectResult.ChecksumType
    for alg, v in m.checksums.items():
        body += el(f"Checksum{alg}", v)
    headers = version_headers(ctx, src, "x-amz-copy-source-version-id")
    if m.version_id != NULL_VERSION:
        headers["x-amz-version-id"] = m.version_id
    return xml_response(doc("CopyObjectResult", body), headers=headers)
