"""GetObjectAttributes (GET /bucket/key?attributes): an object's ETag,
checksum, parts, storage class and size without its body.

The attributes asked for are the comma-separated `x-amz-object-attributes`
header; `ObjectParts` (multipart objects only) pages by
`x-amz-part-number-marker` / `x-amz-max-parts` like ListParts; its Part
elements only for an object with an additional checksum, as S3.
"""
from __future__ import annotations

from airlock import errors as E
from airlock.primary.model import Manifest
from airlock.s3.common import int_param, owned_bucket, version_headers, version_id_param, xml_response
from airlock.s3.object import refuse_sse_c_read
from airlock.s3.xml import doc, el, http_date

ATTRIBUTES = ("ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize")
MAX_PARTS = 1000


def _asked(ctx) -> set[str]:
    raw = ctx.headers.get("x-amz-object-attributes")
    if raw is None or not raw.strip():
        raise E.InvalidRequest("The x-amz-object-attributes header specifying the attributes to be "
                               "retrieved is either missing or empty")
    asked = {a.strip() for a in raw.split(",")}
    for a in asked:
        if a not in ATTRIBUTES:
            raise E.InvalidArgument("Invalid attribute name specified.", ArgumentName="x-amz-object-attributes",
                                    ArgumentValue=a)
    return asked


def _parts_xml(ctx, m: Manifest) -> str:
    marker = int_param(ctx.headers, "x-amz-part-number-marker", 0, 0)
    max_parts = int_param(ctx.headers, "x-amz-max-parts", MAX_PARTS, 0, MAX_PARTS)
    sizes = m.parts or []
    sums = m.part_checksums or []
    numbered = [(n, size, sums[n - 1] if n - 1 < len(sums) else {})
                for n, size in enumerate(sizes, 1) if n > marker]
    page, truncated = numbered[:max_parts], len(numbered) > max_parts
    body = (el("PartsCount", len(sizes)) + el("PartNumberMarker", marker)     # TotalPartsCount in boto3
            + (el("NextPartNumberMarker", page[-1][0]) if page else "")
            + el("MaxParts", max_parts) + el("IsTruncated", "true" if truncated else "false"))
    if not m.checksums:
        # S3 (GetObjectAttributes, Parts): without an additional checksum on the
        # object, "the response doesn't return the Part element"
        page = []
    for n, size, checks in page:
        body += ("<Part>" + el("PartNumber", n) + el("Size", size)
                 + "".join(el(f"Checksum{alg}", v) for alg, v in checks.items()) + "</Part>")
    return f"<ObjectParts>{body}</ObjectParts>"


async def get_object_attributes(ctx):
    owned_bucket(ctx)
    asked = _asked(ctx)
    m = ctx.engine.head_object(ctx.bucket, ctx.key, version_id_param(ctx), method="GET")
    refuse_sse_c_read(ctx.headers)
    body = ""
    if "ETag" in asked:
        body += el("ETag", m.etag)          # unquoted here, unlike the ETag header
    if "Checksum" in asked and m.checksums:
        # a composite checksum without the "-<parts>" GetObject's header carries
        # (the part count is ObjectParts' business here)
        body += ("<Checksum>" + "".join(el(f"Checksum{alg}", v.split("-")[0]) for alg, v in m.checksums.items())
                 + (el("ChecksumType", m.checksum_type) if m.checksum_type else "") + "</Checksum>")
    if "ObjectParts" in asked and m.parts:
        body += _parts_xml(ctx, m)
    if "StorageClass" in asked:
        body += el("StorageClass", m.meta.storage_class)
    if "ObjectSize" in asked:
        body += el("ObjectSize", m.size)
    headers = {"Last-Modified": http_date(m.mtime), **version_headers(ctx, m)}
    return xml_response(doc("GetObjectAttributesResponse", body), headers=headers)
