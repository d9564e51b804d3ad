"""Bucket operations: ListBuckets, CreateBucket, HeadBucket, DeleteBucket,
GetBucketLocation, GetBucketVersioning."""
from __future__ import annotations

from aiohttp import web

from airlock import errors as E
from airlock.s3.body import read_small_body
from airlock.s3.common import check_bucket_name, owned_bucket, xml_response
from airlock.s3.xml import MAX_XML_BODY, child_text, doc, el, esc, iso8601, parse


async def list_buckets(ctx) -> web.Response:
    buckets = ctx.engine.list_buckets(owner=ctx.user.user_id)
    items = "".join(f"<Bucket>{el('Name', b.name)}{el('CreationDate', iso8601(b.created))}</Bucket>"
                    for b in buckets)
    return xml_response(doc("ListAllMyBucketsResult", f"{ctx.owner_xml()}<Buckets>{items}</Buckets>"))


async def create_bucket(ctx) -> web.Response:
    check_bucket_name(ctx.bucket)
    body = await read_small_body(ctx.request, ctx.auth, MAX_XML_BODY)
    if body.strip():
        cfg = parse(body, "CreateBucketConfiguration")
        loc = child_text(cfg, "LocationConstraint")
        if loc is not None and loc not in ("", ctx.config.region):
            raise E.IllegalLocationConstraintException(
                f"The {loc} location constraint is incompatible for the region specific endpoint "
                f"this request was sent to.")
    await ctx.engine.create_bucket(ctx.bucket, ctx.user.user_id)
    return web.Response(status=200, headers={"Location": f"/{ctx.bucket}"})


async def head_bucket(ctx) -> web.Response:
    owned_bucket(ctx)
    return web.Response(status=200, headers={"x-amz-bucket-region": ctx.config.region})


async def delete_bucket(ctx) -> web.Response:
    owned_bucket(ctx)
    await ctx.engine.delete_bucket(ctx.bucket)
    return web.Response(status=204)


async def get_bucket_location(ctx) -> web.Response:
    owned_bucket(ctx)
    region = ctx.config.region
    inner = "" if region == "us-east-1" else region
    return xml_response(doc("LocationConstraint", esc(inner)))


async def get_bucket_versioning(ctx) -> web.Response:
    owned_bucket(ctx)
    # Versioning on the S3 surface arrives with the vault's versions (issue 5):
    # until then buckets are never versioned, which S3 reports as an empty config.
    return xml_response(doc("VersioningConfiguration", ""))
