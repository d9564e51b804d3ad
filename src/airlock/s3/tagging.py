"""Tagging: GetObjectTagging, PutObjectTagging, DeleteObjectTagging, the tag
sets carried by `x-amz-tagging` on PutObject, CreateMultipartUpload and
CopyObject, and Get/Put/DeleteBucketTagging.

A tag set is stored as URL query text: an object version's in its manifest
(`meta.tagging`, docs/format/records.md "Tags"), changed by an
object-tagging record; a bucket's by a bucket-tagging record.  Both are
replicated like any other write.
"""
from __future__ import annotations

import unicodedata
from urllib.parse import parse_qsl, quote

from aiohttp import web

from airlock import errors as E
from airlock.primary.model import Manifest
from airlock.s3.body import read_small_body
from airlock.s3.common import owned_bucket, version_headers, version_id_param, xml_response
from airlock.s3.xml import MAX_XML_BODY, children, child_text, doc, el, parse

MAX_TAGS = 10             # per object version (S3)
MAX_BUCKET_TAGS = 50
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 256
_ALLOWED_PUNCTUATION = frozenset("_.:/=+-@ ")

Tags = list[tuple[str, str]]


def _allowed(text: str) -> bool:
    """S3's tag character set: letters, digits, spaces (any Unicode
    separator) and _ . : / = + - @."""
    return all(ch.isalnum() or ch in _ALLOWED_PUNCTUATION or unicodedata.category(ch).startswith("Z")
               for ch in text)


def validate(tags: Tags, bucket: bool = False) -> Tags:
    """S3's rules for an object's (or, `bucket`, a bucket's) tag set."""
    if not bucket and len(tags) > MAX_TAGS:
        raise E.BadRequest(f"Object tags cannot be greater than {MAX_TAGS}")
    if bucket and len(tags) > MAX_BUCKET_TAGS:
        raise E.InvalidTag(f"Bucket tag count cannot be greater than {MAX_BUCKET_TAGS}")
    seen: set[str] = set()
    for k, v in tags:
        if not 1 <= len(k) <= MAX_KEY_CHARS or not _allowed(k):
            raise E.InvalidTag("The TagKey you have provided is invalid", TagKey=k)
        if len(v) > MAX_VALUE_CHARS or not _allowed(v):
            raise E.InvalidTag("The TagValue you have provided is invalid", TagKey=k, TagValue=v)
        if k.lower().startswith("aws:"):
            raise E.InvalidTag("System tags cannot be added/updated by requester" if bucket
                               else "Your TagKey cannot be prefixed with aws:", TagKey=k)
        if k in seen:
            raise E.InvalidTag("Cannot provide multiple Tags with the same key", TagKey=k)
        seen.add(k)
    return tags


def encode(tags: Tags) -> str | None:
    """The canonical stored form; None for no tags."""
    if not tags:
        return None
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in tags)


def decode(tagging: str | None) -> Tags:
    """A stored tag set (canonical, or an x-amz-tagging header kept as sent)."""
    if not tagging:
        return []
    return parse_qsl(tagging, keep_blank_values=True)


def from_header(value: str | None) -> str | None:
    """x-amz-tagging (URL query text) -> the canonical stored form, validated."""
    if value is None:
        return None
    try:
        tags = parse_qsl(value, keep_blank_values=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise E.InvalidArgument("The header 'x-amz-tagging' shall be encoded as UTF-8 then URLEncoded "
                                "URL query parameters without tag name duplicates.",
                                ArgumentName="x-amz-tagging", ArgumentValue=value) from None
    return encode(validate(tags))


def tag_count(m: Manifest) -> int:
    return len(decode(m.meta.tagging))


def _tag_set_xml(tags: Tags) -> str:
    return "<TagSet>" + "".join(f"<Tag>{el('Key', k)}{el('Value', v)}</Tag>" for k, v in tags) + "</TagSet>"


# ---------------------------------------------------------------------------- handlers
async def get_object_tagging(ctx) -> web.Response:
    owned_bucket(ctx)
    m = ctx.engine.head_object(ctx.bucket, ctx.key, version_id_param(ctx), method="GET")
    return xml_response(doc("Tagging", _tag_set_xml(decode(m.meta.tagging))), headers=version_headers(ctx, m))


async def _tags_from_body(ctx) -> Tags:
    """The <Tagging><TagSet><Tag>... body of a Put*Tagging request."""
    body = await read_small_body(ctx.request, ctx.auth, MAX_XML_BODY)
    root = parse(body, "Tagging")
    tag_set = children(root, "TagSet")
    if len(tag_set) != 1:
        raise E.MalformedXML()
    tags: Tags = []
    for tag in children(tag_set[0], "Tag"):
        k, v = child_text(tag, "Key"), child_text(tag, "Value")
        if k is None or v is None:
            raise E.MalformedXML()
        tags.append((k, v))
    return tags


async def put_object_tagging(ctx) -> web.Response:
    owned_bucket(ctx)
    vid = version_id_param(ctx)
    tags = validate(await _tags_from_body(ctx))
    m = await ctx.engine.set_object_tagging(ctx.bucket, ctx.key, vid, encode(tags))
    return web.Response(status=200, headers=version_headers(ctx, m))


async def delete_object_tagging(ctx) -> web.Response:
    owned_bucket(ctx)
    m = await ctx.engine.set_object_tagging(ctx.bucket, ctx.key, version_id_param(ctx), None, method="DELETE")
    return web.Response(status=204, headers=version_headers(ctx, m))


async def get_bucket_tagging(ctx) -> web.Response:
    owned_bucket(ctx)
    tags = decode(ctx.engine.bucket_tagging(ctx.bucket))
    if not tags:
        raise E.NoSuchTagSet(BucketName=ctx.bucket)
    return xml_response(doc("Tagging", _tag_set_xml(tags)))


async def put_bucket_tagging(ctx) -> web.Response:
    owned_bucket(ctx)
    tags = validate(await _tags_from_body(ctx), bucket=True)
    await ctx.engine.set_bucket_tagging(ctx.bucket, encode(tags))
    return web.Response(status=204)


async def delete_bucket_tagging(ctx) -> web.Response:
    owned_bucket(ctx)
    await ctx.engine.set_bucket_tagging(ctx.bucket, None)
    return web.Response(status=204)
