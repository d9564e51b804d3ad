"""Bucket and object configuration airlock does not keep: policies, ACLs,
CORS, lifecycle, website, logging, notifications, replication, default
encryption, Object Lock, transfer acceleration, requester pays, ownership
controls, public access block (the sub-resources in
`app.UNSUPPORTED_SUBRESOURCES`).

Tools that read a bucket's whole configuration -- Terraform's
aws_s3_bucket reads a dozen of these on every refresh -- stop at a 501.  So
a read answers what S3 answers for a bucket on which that feature is not
configured, which is the truth for every airlock bucket: the feature's own
404, or its empty or default document.  An ACL read answers the one grant
airlock enforces: the owner's FULL_CONTROL (the owner of ListBuckets and
ListObjects).  Analytics, inventory, metrics and Intelligent-Tiering configurations,
kept by id in S3, list as none, and one asked for by id is 404
NoSuchConfiguration.  Deleting a configuration that is not there succeeds (204),
as in S3.  Setting one is 501 NotImplemented: airlock would not apply it,
so it does not store it.

Default encryption answers 404 ServerSideEncryptionConfigurationNotFoundError,
not the SSE-S3 (AES256) configuration S3 has reported for every bucket
since 2023: airlock does not encrypt at rest, and a tool that reads AES256
would record a protection that is not there.  The 404 is S3's answer for a
bucket without default encryption (and moto's), which Terraform and the
SDKs read as "none configured".

Every one of these first needs the bucket to exist and be the caller's
(NoSuchBucket, AccessDenied), as every bucket request does.
"""
from __future__ import annotations

from aiohttp import web

from airlock import errors as E
from airlock.s3.common import owned_bucket, version_id_param, xml_response
from airlock.s3.xml import doc, el

# GET ?<sub-resource>: the error S3 answers when it is not configured
NOT_CONFIGURED: dict[str, type[E.S3Error]] = {
    "policy": E.NoSuchBucketPolicy,
    "policyStatus": E.NoSuchBucketPolicy,           # no policy, so no status of one
    "cors": E.NoSuchCORSConfiguration,
    "lifecycle": E.NoSuchLifecycleConfiguration,
    "website": E.NoSuchWebsiteConfiguration,
    "replication": E.ReplicationConfigurationNotFoundError,
    "encryption": E.ServerSideEncryptionConfigurationNotFoundError,   # see the module's docstring
    "object-lock": E.ObjectLockConfigurationNotFoundError,
    "publicAccessBlock": E.NoSuchPublicAccessBlockConfiguration,
    "ownershipControls": E.OwnershipControlsNotFoundError,
}
# GET ?<sub-resource>: the document S3 answers when it is not configured (root, content)
UNCONFIGURED_DOCUMENTS: dict[str, tuple[str, str]] = {
    "logging": ("BucketLoggingStatus", ""),                 # logging off
    "notification": ("NotificationConfiguration", ""),      # no notifications
    "accelerate": ("AccelerateConfiguration", ""),          # never set: no Status (S3 API docs)
    "requestPayment": ("RequestPaymentConfiguration", el("Payer", "BucketOwner")),   # not requester pays
}
# GET ?<sub-resource>: configurations kept by id; without ?id= the (empty) list, root element
# as in the S3 API reference; with an id, NoSuchConfiguration
LISTED_BY_ID: dict[str, str] = {
    "analytics": "ListBucketAnalyticsConfigurationResult",
    "inventory": "ListInventoryConfigurationsResult",
    "metrics": "ListMetricsConfigurationsResult",
    "intelligent-tiering": "ListBucketIntelligentTieringConfigurationsOutput",
}
# DELETE ?<sub-resource> exists in S3 for these; on nothing configured it is a 204
DELETABLE = frozenset({"policy", "cors", "lifecycle", "website", "replication", "encryption",
                       "publicAccessBlock", "ownershipControls"})
# object sub-resources whose reads S3 answers for a bucket without Object Lock
OBJECT_LOCK_STATE = frozenset({"legal-hold", "retention"})

_XSI = "http://www.w3.org/2001/XMLSchema-instance"


def _owner_full_control(ctx, owner: str) -> bytes:
    """The AccessControlPolicy of everything in an airlock bucket: its owner
    holds FULL_CONTROL, and no one else holds anything."""
    grant = (f'<Grant><Grantee xmlns:xsi="{_XSI}" xsi:type="CanonicalUser">{ctx.owner_fields(owner)}'
             f"</Grantee>{el('Permission', 'FULL_CONTROL')}</Grant>")
    return doc("AccessControlPolicy", f"{ctx.owner_xml(owner)}<AccessControlList>{grant}</AccessControlList>")


# ---------------------------------------------------------------------------- bucket
async def get_bucket_configuration(ctx, sub: str) -> web.Response:
    b = owned_bucket(ctx)
    if sub == "acl":
        return xml_response(_owner_full_control(ctx, b.owner))
    if sub in NOT_CONFIGURED:
        raise NOT_CONFIGURED[sub](BucketName=ctx.bucket)
    if sub in UNCONFIGURED_DOCUMENTS:
        root, content = UNCONFIGURED_DOCUMENTS[sub]
        return xml_response(doc(root, content))
    if sub in LISTED_BY_ID:
        if "id" in ctx.query:
            raise E.NoSuchConfiguration()
        return xml_response(doc(LISTED_BY_ID[sub], el("IsTruncated", "false")))
    raise E.NotImplementedS3(f"The {sub} sub-resource is not implemented.")


async def delete_bucket_configuration(ctx, sub: str) -> web.Response:
    owned_bucket(ctx)
    if sub not in DELETABLE:
        raise E.NotImplementedS3(f"The {sub} sub-resource is not implemented.")
    return web.Response(status=204)      # nothing was configured; nothing is


async def refuse_configuration(ctx, sub: str) -> web.Response:
    """Setting (or any other use of) a sub-resource airlock does not keep."""
    owned_bucket(ctx)
    raise E.NotImplementedS3(f"The {sub} sub-resource is not implemented.")


# ---------------------------------------------------------------------------- object
async def get_object_configuration(ctx, sub: str) -> web.Response:
    """GetObjectAcl; GetObjectLegalHold and GetObjectRetention (400
    InvalidRequest, S3's answer for a bucket without Object Lock, which
    every airlock bucket is: refuse_unsupported_protection answers writes
    the same).  The object (or version) must exist first."""
    b = owned_bucket(ctx)
    if sub != "acl" and sub not in OBJECT_LOCK_STATE:
        raise E.NotImplementedS3(f"The {sub} sub-resource is not implemented.")
    ctx.engine.head_object(ctx.bucket, ctx.key, version_id_param(ctx), method="GET")
    if sub in OBJECT_LOCK_STATE:
        raise E.InvalidRequest("Bucket is missing Object Lock Configuration")
    return xml_response(_owner_full_control(ctx, b.owner))
