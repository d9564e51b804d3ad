"""Multipart uploads: create, upload part (and part copy), complete, abort,
list parts, list uploads."""
from __future__ import annotations

import re

from aiohttp import web

from airlock import errors as E
from airlock.s3 import checksums
from airlock.s3.body import BodyStream, read_small_body
from airlock.s3.common import int_param, owned_bucket, url_encoder, version_headers, xml_response
from airlock.primary.model import NULL_VERSION
from airlock.s3.object import (etag_header, meta_from_headers, refuse_unsupported_protection, source_manifest,
                               write_precondition)
from airlock.s3.xml import MAX_XML_BODY, child_text, children, doc, el, iso8601, parse

MAX_PART_NUMBER = 10000
MAX_LIST = 1000


def _upload(ctx):
    owned_bucket(ctx)
    return ctx.engine.upload(ctx.bucket, ctx.key, ctx.query.get("uploadId", ""))


def _part_number(ctx) -> int:
    raw = ctx.query.get("partNumber", "")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PART_NUMBER:
        raise E.InvalidArgument("Part number must be an integer between 1 and 10000, inclusive",
                                ArgumentName="partNumber", ArgumentValue=raw)
    return int(raw)


async def create_upload(ctx) -> web.Response:
    owned_bucket(ctx)
    refuse_unsupported_protection(ctx.headers)
    meta = meta_from_headers(ctx.headers)
    alg = ctx.headers.get("x-amz-checksum-algorithm")
    if alg is not None:
        alg = alg.upper()
        if alg not in checksums.ALGORITHMS:
            raise E.InvalidRequest("Checksum algorithm provided is unsupported.")
    ctype = ctx.headers.get("x-amz-checksum-type")
    if ctype is not None:
        ctype = ctype.upper()
        if ctype not in ("COMPOSITE", "FULL_OBJECT"):
            raise E.InvalidRequest("Value for x-amz-checksum-type header is invalid.")
        if alg is None:
            raise E.InvalidRequest("The x-amz-checksum-type header can only be used "
                                   "with the x-amz-checksum-algorithm header.")
    ctype = checksums.multipart_checksum_type(alg, ctype)    # the default, or InvalidRequest
    up = await ctx.engine.create_upload(ctx.bucket, ctx.key, ctx.user.user_id, meta,
                                        checksum_algorithm=alg, checksum_type=ctype)
    headers = {}
    if alg:
        headers["x-amz-checksum-algorithm"] = alg
        headers["x-amz-checksum-type"] = ctype
    body = el("Bucket", ctx.bucket) + el("Key", ctx.key) + el("UploadId", up.upload_id)
    return xml_response(doc("InitiateMultipartUploadResult", body), headers=headers)


async def upload_part(ctx) -> web.Response:
    number = _part_number(ctx)
    up = _upload(ctx)
    refuse_unsupported_protection(ctx.headers)
    body = BodyStream(ctx.request, ctx.auth)
    algs = body.checksum_algorithms
    if up.checksum_algorithm and up.checksum_algorithm not in algs:
        # computed here when the client sent none (or another one): every part
        # then has the upload's checksum, and so does the completed object
        algs = (*algs, up.checksum_algorithm)
    part = await ctx.engine.upload_part(up, number, body, want_sha256=body.want_sha256,
                                        checksum_algorithms=algs, verify=body.verify)
    headers = {"ETag": etag_header(part.etag)}
    for alg, v in part.checksums.items():
        headers[checksums.header_name(alg)] = v
    return web.Response(status=200, headers=headers)


_COPY_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def _copy_range(value: str, size: int) -> tuple[int, int] | None:
    """x-amz-copy-source-range: exactly bytes=first-last, both inside the
    source (S3 takes no open or suffix range here and clamps nothing).
    Returns [start, end) or None."""
    m = _COPY_RANGE.fullmatch(value.strip())
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    if first > last or last >= size:
        return None
    return first, last + 1


async def upload_part_copy(ctx) -> web.Response:
    number = _part_number(ctx)
    up = _upload(ctx)
    refuse_unsupported_protection(ctx.headers)
    src = source_manifest(ctx)
    rng_header = ctx.headers.get("x-amz-copy-source-range")
    if rng_header is not None:
        rng = _copy_range(rng_header, src.size)
        if rng is None:
            raise E.InvalidArgument("The x-amz-copy-source-range value must be of the form "
                                    "bytes=first-last where first and last are the zero-based offsets "
                                    "of the first and last bytes to copy",
                                    ArgumentName="x-amz-copy-source-range", ArgumentValue=rng_header)
        start, end = rng
    else:
        start, end = 0, src.size
    algs = (up.checksum_algorithm,) if up.checksum_algorithm else ()
    part = await ctx.engine.upload_part(up, number, ctx.engine.read_object(src, start, end),
                                        checksum_algorithms=algs)
    body = el("ETag", etag_header(part.etag)) + el("LastModified", iso8601(part.mtime))
    for alg, v in part.checksums.items():
        body += el(f"Checksum{alg}", v)
    return xml_response(doc("CopyPartResult", body),
                        headers=version_headers(ctx, src, "x-amz-copy-source-version-id"))


async def complete_upload(ctx) -> web.Response:
    upload_id = ctx.query.get("uploadId", "")
    try:
        _upload(ctx)
        gone = None
    except E.NoSuchUpload as e:
        # perhaps completed already and this is a retry: the engine decides,
        # from the parts listed (an unreadable list: the upload's absence is the answer)
        gone = e
    cond = write_precondition(ctx.headers)
    # an x-amz-checksum-<alg> header here is the whole object's checksum, to
    # be checked against the parts', not the checksum of this XML body
    claim = checksums.object_checksum_claim(ctx.headers)
    claimed_type = ctx.headers.get("x-amz-checksum-type")
    try:
        requested = await _requested_parts(ctx)
    except E.S3Error:
        if gone is not None:
            raise gone from None
        raise
    m = await ctx.engine.complete_upload(ctx.bucket, ctx.key, upload_id, requested, precondition=cond,
                                         claim=claim, claimed_type=claimed_type.upper() if claimed_type else None)
    host = ctx.headers.get("Host", "")
    body = (el("Location", f"http://{host}/{ctx.bucket}/{ctx.key}") + el("Bucket", ctx.bucket)
            + el("Key", ctx.key) + el("ETag", etag_header(m.etag)))
    headers = {}
    for alg, v in m.checksums.items():
        body += el(f"Checksum{alg}", v)
        headers[checksums.header_name(alg)] = v
    if m.checksum_type:
        body += el("ChecksumType", m.checksum_type)
    if m.version_id != NULL_VERSION:
        headers["x-amz-version-id"] = m.version_id
    return xml_response(doc("CompleteMultipartUploadResult", body), headers=headers)


async def _requested_parts(ctx) -> list[tuple[int, str, dict[str, str]]]:
    """The CompleteMultipartUpload body: [(part number, ETag without quotes, {alg: checksum})]."""
    raw = await read_small_body(ctx.request, ctx.auth, MAX_XML_BODY, checksum_headers=False)
    root = parse(raw, "CompleteMultipartUpload")
    requested = []
    for p in children(root, "Part"):
        num = child_text(p, "PartNumber")
        etag = child_text(p, "ETag")
        if num is None or etag is None or not num.strip().isdigit():
            raise E.MalformedXML()
        cks = {alg: v for alg in checksums.ALGORITHMS
               if (v := child_text(p, f"Checksum{alg}")) is not None}
        requested.append((int(num), etag.strip().strip('"'), cks))
    return requested


async def abort_upload(ctx) -> web.Response:
    up = _upload(ctx)
    await ctx.engine.abort_upload(up)
    return web.Response(status=204)


async def list_parts(ctx) -> web.Response:
    up = _upload(ctx)
    q = ctx.query
    asked = int_param(q, "max-parts", MAX_LIST, 0)    # echoed as asked; at most MAX_LIST are listed
    max_parts = min(asked, MAX_LIST)
    marker = int_param(q, "part-number-marker", 0, 0)
    parts = [p for p in ctx.engine.list_parts(up) if p.part_number > marker]
    truncated = 0 < max_parts < len(parts)     # max-parts=0 lists nothing and is not truncated (as ListObjects)
    parts = parts[:max_parts]
    owner = ctx.owner_xml(up.owner)
    body = (el("Bucket", ctx.bucket) + el("Key", ctx.key) + el("UploadId", up.upload_id)
            + owner.replace("<Owner>", "<Initiator>").replace("</Owner>", "</Initiator>") + owner
            + el("StorageClass", up.meta.storage_class) + el("PartNumberMarker", marker))
    if parts:
        body += el("NextPartNumberMarker", parts[-1].part_number)
    body += el("MaxParts", asked) + el("IsTruncated", "true" if truncated else "false")
    if up.checksum_algorithm:
        body += el("ChecksumAlgorithm", up.checksum_algorithm)
    for p in parts:
        body += (f"<Part>{el('PartNumber', p.part_number)}{el('LastModified', iso8601(p.mtime))}"
                 f"{el('ETag', etag_header(p.etag))}{el('Size', p.size)}")
        body += "".join(el(f"Checksum{a}", v) for a, v in p.checksums.items())
        body += "</Part>"
    return xml_response(doc("ListPartsResult", body))


async def list_uploads(ctx) -> web.Response:
    owned_bucket(ctx)
    q = ctx.query
    enc = url_encoder(q)
    prefix = q.get("prefix", "")
    delimiter = q.get("delimiter", "")
    key_marker = q.get("key-marker", "")
    id_marker = q.get("upload-id-marker", "")
    max_uploads = int_param(q, "max-uploads", MAX_LIST, 0, MAX_LIST)
    uploads = ctx.engine.list_uploads(ctx.bucket)
    items: list = []
    prefixes: list[str] = []
    last: tuple[str, str] | None = None     # (key or common prefix, upload id or "") of the last entry
    truncated = False
    seen_marker = not id_marker
    for up in uploads:
        if not up.key.startswith(prefix):
            continue
        if key_marker:
            if up.key < key_marker:
                continue
            if up.key == key_marker:
                if not id_marker:
                    continue
                if not seen_marker:
                    if up.upload_id == id_marker:
                        seen_marker = True
                    continue
        i = up.key.find(delimiter, len(prefix)) if delimiter else -1
        cp = up.key[:i + len(delimiter)] if i >= 0 else None     # the common prefix it rolls up into
        if cp is not None and (cp in prefixes or (key_marker and cp <= key_marker)):
            continue
        if len(items) + len(prefixes) >= max_uploads:
            truncated = max_uploads > 0      # max-uploads=0 lists nothing and is not truncated
            break
        if cp is not None:
            prefixes.append(cp)
            last = (cp, "")      # the next page starts after every key under it
        else:
            items.append(up)
            last = (up.key, up.upload_id)
    body = (el("Bucket", ctx.bucket) + el("KeyMarker", enc(key_marker)) + el("UploadIdMarker", id_marker))
    if truncated and last is not None:
        body += el("NextKeyMarker", enc(last[0])) + el("NextUploadIdMarker", last[1])
    body += el("MaxUploads", max_uploads)
    if delimiter:
        body += el("Delimiter", enc(delimiter))
    if prefix:
        body += el("Prefix", enc(prefix))
    if "encoding-type" in q:
        body += el("EncodingType", "url")
    body += el("IsTruncated", "true" if truncated else "false")
    for up in items:
        owner = ctx.owner_xml(up.owner)
        body += (f"<Upload>{el('Key', enc(up.key))}{el('UploadId', up.upload_id)}"
                 f"{owner.replace('<Owner>', '<Initiator>').replace('</Owner>', '</Initiator>')}{owner}"
                 f"{el('StorageClass', up.meta.storage_class)}{el('Initiated', iso8601(up.initiated))}")
        if up.checksum_algorithm:
            body += el("ChecksumAlgorithm", up.checksum_algorithm)
            if up.checksum_type:
                body += el("ChecksumType", up.checksum_type)
        body += "</Upload>"
    body += "".join(f"<CommonPrefixes>{el('Prefix', enc(p))}</CommonPrefixes>" for p in prefixes)
    return xml_response(doc("ListMultipartUploadsResult", body))
