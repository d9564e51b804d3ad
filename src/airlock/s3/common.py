"""Helpers shared by the S3 handlers: access checks, names, small responses."""
from __future__ import annotations

import re
from urllib.parse import quote

from aiohttp import web

from airlock import errors as E
from airlock.primary.model import NULL_VERSION, Bucket, Manifest, is_version_id

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
XML_CONTENT_TYPE = "application/xml"


def check_bucket_name(name: str) -> None:
    """S3's bucket naming rules (general purpose buckets)."""
    if (not _BUCKET_RE.match(name) or ".." in name or ".-" in name or "-." in name
            or _IPV4_RE.match(name) or name.startswith(("xn--", "sthree-", "amzn-s3-demo-"))
            or name.endswith(("-s3alias", "--ol-s3", ".mrap", "--x-s3"))):
        raise E.InvalidBucketName(BucketName=name)


def owned_bucket(ctx) -> Bucket:
    """The request's bucket, if it exists and belongs to the caller."""
    b = ctx.engine.bucket(ctx.bucket)
    if b is None:
        raise E.NoSuchBucket(BucketName=ctx.bucket)
    if b.owner != ctx.user.user_id:
        raise E.AccessDenied()
    return b


def xml_response(body: bytes, status: int = 200, headers: dict | None = None) -> web.Response:
    h = {"Content-Type": XML_CONTENT_TYPE}
    if headers:
        h.update(headers)
    return web.Response(status=status, body=body, headers=h)


def int_param(query, name: str, default: int, lo: int = 0, hi: int | None = None) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise E.InvalidArgument(f"Provided {name} not an integer or within integer range",
                                ArgumentName=name, ArgumentValue=raw) from None
    if v < lo or v > 2147483647:   # S3 refuses values outside a 32-bit int, it does not clamp them
        raise E.InvalidArgument(f"Argument {name} must be an integer between {lo} and 2147483647",
                                ArgumentName=name, ArgumentValue=raw)
    if hi is not None:
        v = min(v, hi)
    return v


def version_id_param(ctx) -> str | None:
    """The request's ?versionId= (None if absent).  The empty string, and an
    id that no version could have (not "null", not the form airlock's ids
    take), are refused as S3 refuses them: 400 InvalidArgument, not 404
    NoSuchVersion."""
    if "versionId" not in ctx.query:
        return None
    return checked_version_id(ctx.query["versionId"], "versionId")


def checked_version_id(vid: str, argument: str) -> str:
    """`vid` if it is a well-formed version id; else S3's InvalidArgument
    naming `argument` (the query parameter or header that carried it)."""
    if vid == "":
        raise E.InvalidArgument("Version id cannot be the empty string", ArgumentName=argument,
                                ArgumentValue="")
    if not is_version_id(vid):
        raise E.InvalidArgument("Invalid version id specified", ArgumentName=argument, ArgumentValue=vid)
    return vid


def version_headers(ctx, m: Manifest, name: str = "x-amz-version-id") -> dict[str, str]:
    """x-amz-version-id of an object (or copy source) in a bucket that has
    versioning on or suspended; nothing for a never-versioned bucket."""
    if m.version_id != NULL_VERSION or ctx.engine.versioning(m.bucket):
        return {name: m.version_id}
    return {}


def url_encoder(query):
    """The listing's `encoding-type`: identity, or S3's URL encoding of keys,
    prefixes, delimiters and markers for "url"; anything else is refused."""
    enc = query.get("encoding-type")
    if enc is None:
        return lambda s: s
    if enc != "url":
        raise E.InvalidArgument("Invalid Encoding Method specified in Request",
                                ArgumentName="encoding-type", ArgumentValue=enc)
    return lambda s: quote(s, safe="/~-_.")


def client_gone(request: web.Request, exc: BaseException) -> bool:
    """`exc` is the client's connection going away (aiohttp raises
    ConnectionResetError reading a body, a plain ConnectionError writing
    one), not a failure of ours."""
    return isinstance(exc, ConnectionError) and (request.transport is None or request.transport.is_closing())
