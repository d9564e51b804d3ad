"""ListObjects (v1) and ListObjectsV2: prefix, delimiter, max-keys, markers,
continuation tokens, start-after, encoding-type=url."""
from __future__ import annotations

import base64
import binascii

from aiohttp import web

from airlock import errors as E
from airlock.primary.model import Manifest
from airlock.s3.common import checked_version_id, int_param, owned_bucket, url_encoder, xml_response
from airlock.s3.xml import doc, el, iso8601

MAX_KEYS = 1000     # S3 never returns more per page
TOKEN_PREFIX = "1:"  # version of our continuation-token encoding


def _contents(items: list[Manifest], enc, owner_xml: str | None) -> str:
    out = []
    for m in items:
        s = (f"<Contents>{el('Key', enc(m.key))}{el('LastModified', iso8601(m.mtime))}"
             f"{el('ETag', chr(34) + m.etag + chr(34))}{el('Size', m.size)}")
        if owner_xml:
            s += owner_xml
        s += el("StorageClass", m.meta.storage_class)
        if m.checksums:
            s += "".join(el("ChecksumAlgorithm", a) for a in m.checksums)
            if m.checksum_type:
                s += el("ChecksumType", m.checksum_type)
        out.append(s + "</Contents>")
    return "".join(out)


def _prefixes(prefixes: list[str], enc) -> str:
    return "".join(f"<CommonPrefixes>{el('Prefix', enc(p))}</CommonPrefixes>" for p in prefixes)


async def list_objects_v1(ctx) -> web.Response:
    b = owned_bucket(ctx)
    q = ctx.query
    enc = url_encoder(q)
    prefix = q.get("prefix", "")
    delimiter = q.get("delimiter", "")
    marker = q.get("marker", "")
    asked = int_param(q, "max-keys", MAX_KEYS, 0)     # echoed as asked; at most MAX_KEYS are listed
    max_keys = min(asked, MAX_KEYS)
    res = ctx.engine.list_objects(ctx.bucket, prefix=prefix, delimiter=delimiter,
                                  marker=marker or None, max_keys=max_keys)
    body = el("Name", ctx.bucket) + el("Prefix", enc(prefix)) + el("Marker", enc(marker))
    if res.is_truncated and delimiter:
        body += el("NextMarker", enc(res.next_marker))
    body += el("MaxKeys", asked)
    if delimiter:
        body += el("Delimiter", enc(delimiter))
    body += el("IsTruncated", "true" if res.is_truncated else "false")
    if "encoding-type" in q:
        body += el("EncodingType", "url")
    body += _contents(res.contents, enc, ctx.owner_xml(b.owner))
    body += _prefixes(res.common_prefixes, enc)
    return xml_response(doc("ListBucketResult", body))


def encode_token(marker: str) -> str:
    return base64.urlsafe_b64encode((TOKEN_PREFIX + marker).encode("utf-8")).decode()


def decode_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raw = ""
    if not raw.startswith(TOKEN_PREFIX):
        raise E.InvalidArgument("The continuation token provided is incorrect",
                                ArgumentName="continuation-token")
    return raw[len(TOKEN_PREFIX):]


async def list_objects_v2(ctx) -> web.Response:
    b = owned_bucket(ctx)
    q = ctx.query
    enc = url_encoder(q)
    prefix = q.get("prefix", "")
    delimiter = q.get("delimiter", "")
    start_after = q.get("start-after", "")
    token = q.get("continuation-token")
    asked = int_param(q, "max-keys", MAX_KEYS, 0)     # echoed as asked; at most MAX_KEYS are listed
    max_keys = min(asked, MAX_KEYS)
    fetch_owner = q.get("fetch-owner", "false").lower() == "true"
    if token is not None:
        if token == "":
            raise E.InvalidArgument("The continuation token provided is incorrect",
                                    ArgumentName="continuation-token")
        marker = decode_token(token)
    else:
        marker = start_after
    res = ctx.engine.list_objects(ctx.bucket, prefix=prefix, delimiter=delimiter,
                                  marker=marker or None, max_keys=max_keys)
    body = el("Name", ctx.bucket) + el("Prefix", enc(prefix))
    if start_after:
        body += el("StartAfter", enc(start_after))
    if token is not None:
        body += el("ContinuationToken", token)
    if res.is_truncated:
        body += el("NextContinuationToken", encode_token(res.next_marker))
    body += el("KeyCount", len(res.contents) + len(res.common_prefixes))
    body += el("MaxKeys", asked)
    if delimiter:
        body += el("Delimiter", enc(delimiter))
    body += el("IsTruncated", "true" if res.is_truncated else "false")
    if "encoding-type" in q:
        body += el("EncodingType", "url")
    body += _contents(res.contents, enc, ctx.owner_xml(b.owner) if fetch_owner else None)
    body += _prefixes(res.common_prefixes, enc)
    return xml_response(doc("ListBucketResult", body))


async def list_object_versions(ctx) -> web.Response:
    """ListObjectVersions (GET /bucket?versions): versions and delete markers in
    key order, newest first per key, paged by key-marker / version-id-marker."""
    b = owned_bucket(ctx)
    q = ctx.query
    enc = url_encoder(q)
    prefix = q.get("prefix", "")
    delimiter = q.get("delimiter", "")
    key_marker = q.get("key-marker", "")
    vid_marker = q.get("version-id-marker", "")
    asked = int_param(q, "max-keys", MAX_KEYS, 0)     # echoed as asked; at most MAX_KEYS are listed
    max_keys = min(asked, MAX_KEYS)
    if vid_marker and not key_marker:
        raise E.InvalidArgument("A version-id marker cannot be specified without a key marker.",
                                ArgumentName="version-id-marker", ArgumentValue=vid_marker)
    if vid_marker:
        checked_version_id(vid_marker, "version-id-marker")     # one no version could have: 400, as S3
    res = ctx.engine.list_versions(ctx.bucket, prefix=prefix, delimiter=delimiter, key_marker=key_marker,
                                   version_id_marker=vid_marker, max_keys=max_keys)
    owner = ctx.owner_xml(b.owner)
    body = (el("Name", ctx.bucket) + el("Prefix", enc(prefix)) + el("KeyMarker", enc(key_marker))
            + el("VersionIdMarker", vid_marker))
    if res.is_truncated:
        body += el("NextKeyMarker", enc(res.next_key_marker))
        if res.next_version_id_marker is not None:
            body += el("NextVersionIdMarker", res.next_version_id_marker)
    body += el("MaxKeys", asked)
    if delimiter:
        body += el("Delimiter", enc(delimiter))
    body += el("IsTruncated", "true" if res.is_truncated else "false")
    if "encoding-type" in q:
        body += el("EncodingType", "url")
    out = []
    for v, latest in res.entries:
        common = (el("Key", enc(v.key)) + el("VersionId", v.version_id)
                  + el("IsLatest", "true" if latest else "false") + el("LastModified", iso8601(v.mtime)))
        if v.is_delete_marker:
            out.append(f"<DeleteMarker>{common}{owner}</DeleteMarker>")
            continue
        m = v.manifest
        s = (f"<Version>{common}{el('ETag', chr(34) + m.etag + chr(34))}{el('Size', m.size)}"
             f"{el('StorageClass', m.meta.storage_class)}{owner}")
        if m.checksums:
            s += "".join(el("ChecksumAlgorithm", a) for a in m.checksums)
            if m.checksum_type:
                s += el("ChecksumType", m.checksum_type)
        out.append(s + "</Version>")
    body += "".join(out) + _prefixes(res.common_prefixes, enc)
    return xml_response(doc("ListVersionsResult", body))
