"""Bucket operations: ListBuckets, CreateBucket, HeadBucket, DeleteBucket,
GetBucketLocation, GetBucketVersioning, PutBucketVersioning."""
from __future__ import annotations

from aiohttp import web

from airlock import errors as E
from airlock.s3.body import read_small_body
from airlock.s3.common import check_bucket_name, owned_bucket, xml_response
from airlock.s3.listing import decode_token, encode_token
from airlock.s3.xml import MAX_XML_BODY, child_text, doc, el, esc, iso8601, parse


MAX_BUCKETS_PAGE = 10000     # ListBuckets' max-buckets range is 1..10000


async def list_buckets(ctx) -> web.Response:
    """ListBuckets, in name order; `prefix`, `bucket-region`, and pages of
    `max-buckets` with an opaque `continuation-token` (the last name given,
    encoded as ListObjectsV2's tokens are)."""
    q = ctx.query
    prefix = q.get("prefix", "")
    region = q.get("bucket-region")
    limit = None
    if "max-buckets" in q:
        raw = q["max-buckets"]
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_BUCKETS_PAGE:
            raise E.InvalidArgument(f"max-buckets must be between 1 and {MAX_BUCKETS_PAGE}",
                                    ArgumentName="max-buckets", ArgumentValue=raw)
        limit = int(raw)
    after = decode_token(q["continuation-token"]) if "continuation-token" in q else None
    buckets = sorted(ctx.engine.list_buckets(owner=ctx.user.user_id), key=lambda b: b.name)
    if region is not None and region != ctx.config.region:
        buckets = []
    buckets = [b for b in buckets if b.name.startswith(prefix) and (after is None or b.name > after)]
    more = limit is not None and len(buckets) > limit
    if limit is not None:
        buckets = buckets[:limit]
    items = "".join(f"<Bucket>{el('Name', b.name)}{el('CreationDate', iso8601(b.created))}"
                    f"{el('BucketRegion', ctx.config.region)}</Bucket>" for b in buckets)
    tail = ""
    if more:
        tail += el("ContinuationToken", encode_token(buckets[-1].name))
    if "prefix" in q:
        tail += el("Prefix", prefix)
    return xml_response(doc("ListAllMyBucketsResult", f"{ctx.owner_xml()}<Buckets>{items}</Buckets>{tail}"))


async def create_bucket(ctx) -> web.Response:
    check_bucket_name(ctx.bucket)
    if ctx.headers.get("x-amz-bucket-object-lock-enabled", "").strip().lower() == "true":
        # a bucket its owner believes protects versions from deletion must not be made without it
        raise E.NotImplementedS3("Object Lock is not implemented.", Header="x-amz-bucket-object-lock-enabled")
    body = await read_small_body(ctx.request, ctx.auth, MAX_XML_BODY)
    if body.strip():
        cfg = parse(body, "CreateBucketConfiguration")
        loc = child_text(cfg, "LocationConstraint")
        if loc == "us-east-1":
            # S3: us-east-1 is named by no constraint at all, never by its name
            raise E.InvalidLocationConstraint(LocationConstraint=loc)
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
    status = ctx.engine.versioning(ctx.bucket)
    # a bucket that was never versioned answers an empty configuration, as S3 does
    return xml_response(doc("VersioningConfiguration", el("Status", status) if status else ""))


async def put_bucket_versioning(ctx) -> web.Response:
    """Status Enabled or Suspended.  MFA delete is not supported: a request
    that asks for it (MfaDelete Enabled, or the x-amz-mfa header) is 501."""
    owned_bucket(ctx)
    body = await read_small_body(ctx.request, ctx.auth, MAX_XML_BODY)
    cfg = parse(body, "VersioningConfiguration")
    mfa = child_text(cfg, "MfaDelete")
    if (mfa is not None and mfa.strip() == "Enabled") or "x-amz-mfa" in ctx.headers:
        raise E.NotImplementedS3("MFA delete is not implemented.", Header="x-amz-mfa")
    if mfa is not None and mfa.strip() not in ("", "Disabled"):
        raise E.MalformedXML()
    status = child_text(cfg, "Status")
    if status is None:
        return web.Response(status=200)    # S3 leaves the state as it is
    if status.strip() not in ("Enabled", "Suspended"):
        raise E.MalformedXML()
    await ctx.engine.set_versioning(ctx.bucket, status.strip())
    return web.Response(status=200)
