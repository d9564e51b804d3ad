"""The one place where exceptions become S3 responses.

S3Error subclasses carry their own code and status.  Storage-level errors map
as follows: replication failures -> 503 ServiceUnavailable (the change is
visible nowhere), integrity errors -> 500 InternalError (logged and counted;
repair from the vault comes with the link), a full primary disk (ENOSPC,
EDQUOT; the chunk store and the index report their databases' full disk as ENOSPC, airlock/sqlerr.py) -> 503 ServiceUnavailable
(nothing was committed; the client may retry once there is space), anything
else -> 500.
"""
from __future__ import annotations

import errno
import logging

from aiohttp import web

from airlock import errors as E
from airlock.s3.xml import error_doc

log = logging.getLogger("airlock.s3")


def to_s3_error(exc: BaseException) -> E.S3Error:
    if isinstance(exc, E.S3Error):
        return exc
    if isinstance(exc, E.ReplicationError):
        return E.ServiceUnavailable(f"The change could not be replicated to the vault: {exc}")
    if isinstance(exc, E.IntegrityError):
        log.error("integrity error: %s", exc)
        return E.InternalError("Stored data failed its integrity check.")
    if _disk_full(exc):
        log.error("primary storage full: %r", exc)
        return E.PrimaryStorageFull()
    log.exception("internal error", exc_info=exc)
    return E.InternalError()


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def error_response(exc: BaseException, request_id: str, method: str) -> web.Response:
    err = to_s3_error(exc)
    headers = {"x-amz-request-id": request_id, "x-amz-id-2": request_id}
    # e.g. x-amz-delete-marker / x-amz-version-id on a 404 or 405 for a delete marker
    headers.update(getattr(err, "headers", None) or {})
    if err.status == 304 or method == "HEAD":
        # HEAD responses carry no body; S3 still sends the status
        return web.Response(status=err.status, headers=headers)
    body = error_doc(err.code, err.message, request_id, err.extra)
    headers["Content-Type"] = "application/xml"
    return web.Response(status=err.status, body=body, headers=headers)
