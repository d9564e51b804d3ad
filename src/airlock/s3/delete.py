"""DeleteObjects: up to 1000 keys in one request; each key succeeds or fails alone."""
from __future__ import annotations

import asyncio

from aiohttp import web

from airlock import errors as E
from airlock.s3.body import read_small_body
from airlock.s3.common import owned_bucket, xml_response
from airlock.s3.errors import to_s3_error
from airlock.s3.object import delete_precondition
from airlock.s3.xml import MAX_XML_BODY, child_text, children, doc, el, parse

MAX_DELETE_KEYS = 1000   # S3's limit per DeleteObjects request


async def delete_objects(ctx) -> web.Response:
    owned_bucket(ctx)
    body = await read_small_body(ctx.request, ctx.auth, MAX_XML_BODY)
    root = parse(body, "Delete")
    quiet = (child_text(root, "Quiet") or "false").strip().lower() == "true"
    objects = children(root, "Object")
    if not objects or len(objects) > MAX_DELETE_KEYS:
        raise E.MalformedXML()
    keys: list[tuple[str, str | None, tuple]] = []
    for o in objects:
        key = child_text(o, "Key")
        if key is None:
            raise E.MalformedXML()
        # an object's ETag / Size / LastModifiedTime make its delete conditional
        conditions = (child_text(o, "ETag"), child_text(o, "Size"), child_text(o, "LastModifiedTime"))
        keys.append((key, child_text(o, "VersionId"), conditions))

    async def one(key: str, version: str | None, conditions: tuple):
        try:
            if version == "":
                raise E.InvalidArgument("Version id cannot be the empty string")
            cond = delete_precondition(*conditions, names=("ETag", "Size", "LastModifiedTime"))
            vid, marker = await ctx.engine.delete_object(ctx.bucket, key, version, precondition=cond)
            return key, version, (vid, marker), None
        except Exception as exc:  # per-key errors go into the result document
            return key, version, None, to_s3_error(exc)

    # concurrent deletes share fsyncs through the log's group commit
    results = await asyncio.gather(*(one(k, v, c) for k, v, c in keys))
    out = []
    for key, version, done, err in results:
        if err is None:
            if not quiet:
                vid, marker = done
                if version is not None:
                    # a version (or delete marker) removed for good
                    v = el("VersionId", version)
                    if marker:
                        v += el("DeleteMarker", "true") + el("DeleteMarkerVersionId", version)
                elif marker:
                    # a delete marker was added
                    v = el("DeleteMarker", "true") + el("DeleteMarkerVersionId", vid)
                else:
                    v = ""
                out.append(f"<Deleted>{el('Key', key)}{v}</Deleted>")
        else:
            v = el("VersionId", version) if version else ""
            out.append(f"<Error>{el('Key', key)}{v}{el('Code', err.code)}{el('Message', err.message)}</Error>")
    return xml_response(doc("DeleteResult", "".join(out)))
