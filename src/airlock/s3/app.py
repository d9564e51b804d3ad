"""The S3 HTTP application: addressing, authentication, routing, errors.

One catch-all aiohttp route hands every request to `S3App.handle`, which
  1. assigns a request id,
  2. resolves the bucket and key (path-style or virtual-hosted-style),
  3. verifies SigV4 (header or presigned),
  4. picks the handler by method, bucket/key presence and sub-resource,
  5. maps any exception to an S3 XML error in one place (s3/errors.py).
Handlers live one module per area (bucket, object, listing, multipart,
delete) and call the engine; they never touch files.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import web
from multidict import MultiDict

from airlock import errors as E
from airlock.config import GatewayConfig, User
from airlock.primary.engine import Engine
from airlock.s3 import auth
from airlock.s3.common import client_gone
from airlock.s3.errors import error_response

log = logging.getLogger("airlock.s3")

MAX_KEY_BYTES = 1024            # S3's key length limit, in UTF-8 bytes
CLIENT_MAX_SIZE = 1 << 20       # aiohttp's cap for bodies read whole (XML); object bodies are streamed

HEALTH_PATH = "/_airlock/health"   # unauthenticated; '_airlock' can never be a bucket name

# Sub-resources that exist in S3 but not (yet) in airlock (s3/configuration.py):
# reads answer S3's "not configured", writes 501 NotImplemented
UNSUPPORTED_SUBRESOURCES = frozenset({
    "acl", "policy", "policyStatus", "cors", "lifecycle", "website", "logging",
    "notification", "replication", "encryption", "object-lock", "legal-hold", "retention",
    "accelerate", "requestPayment", "ownershipControls", "publicAccessBlock", "analytics",
    "inventory", "metrics", "intelligent-tiering", "restore", "select", "torrent",
    "session", "renameObject", "metadataConfiguration",
})


@dataclass
class S3Request:
    """What a handler gets: the aiohttp request plus the resolved S3 facts."""

    request: web.Request
    request_id: str
    bucket: str | None
    key: str | None
    query: MultiDict
    user: User | None = None
    auth: auth.AuthContext | None = None
    engine: Engine | None = None
    config: GatewayConfig | None = None
    extra_headers: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def headers(self):
        return self.request.headers

    def owner_xml(self, user_id: str | None = None) -> str:
        """<Owner> of `user_id` (default: the caller) with the configured display name."""
        return f"<Owner>{self.owner_fields(user_id)}</Owner>"

    def owner_fields(self, user_id: str | None = None) -> str:
        """<ID> and <DisplayName> of `user_id` (default: the caller): an
        <Owner>'s content, or an ACL <Grantee>'s."""
        from airlock.s3.xml import el
        uid = user_id or self.user.user_id
        name = self.app_users_by_id.get(uid).display_name if uid in self.app_users_by_id else uid
        return f"{el('ID', uid)}{el('DisplayName', name)}"

    @property
    def app_users_by_id(self) -> dict[str, User]:
        return self.request.app["users_by_id"]


_RID_PREFIX = secrets.token_hex(4).upper()      # per process: ids stay unique across restarts
_rid_counter = itertools.count(1)


def _new_request_id() -> str:
    """16 hex digits like S3's: a random per-process prefix and a counter
    (a fresh random id per request cost a getrandom() call every time)."""
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFFFFFF:08X}"


class S3App:
    def __init__(self, engine: Engine, config: GatewayConfig):
        self.engine = engine
        self.config = config
        self.users = config.user_by_key()
        self.domains = sorted((d.lower().strip(".") for d in config.domains), key=len, reverse=True)
        self.in_flight = 0                                   # requests being handled
        self._drained: asyncio.Event | None = None           # set by `drain`: no keep-alive from then on

    async def drain(self, timeout: float) -> bool:
        """The first step of a stop, once no new connection comes: every
        response from now on closes its connection, and this waits (at most
        `timeout`) until no request is in flight.  Requests in flight go on
        receiving their bodies (aiohttp's own shutdown drops the data of a
        connection it is closing, so an upload caught by it waited out the
        whole grace period and failed anyway).  True if none is left."""
        if self._drained is None:
            self._drained = asyncio.Event()
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def lookup_secret(self, access_key: str) -> str | None:
        u = self.users.get(access_key)
        return u.secret_key if u else None

    async def health(self) -> web.Response:
        """Liveness and replication state, for operators and `airlock status`."""
        return web.json_response(await self.engine.health(), status=200)

    # ------------------------------------------------------------------ addressing
    def _address(self, request: web.Request) -> tuple[str | None, str | None, bool]:
        """(bucket, key, virtual_hosted) of a request."""
        raw_path = request.rel_url.raw_path
        host = (request.headers.get("Host") or "").lower()
        if host.startswith("["):
            hostname = host.split("]")[0] + "]"
        else:
            hostname = host.rsplit(":", 1)[0] if ":" in host else host
        vhost_bucket = None
        for d in self.domains:
            if hostname.endswith("." + d):
                vhost_bucket = hostname[: -len(d) - 1]
                break
        try:
            path = unquote(raw_path, errors="strict")
        except UnicodeDecodeError:
            raise E.InvalidArgument("Object key is not valid UTF-8.") from None
        if vhost_bucket is not None:
            key = path[1:] if path.startswith("/") else path
            return vhost_bucket, (key or None), True
        if not path.startswith("/"):
            raise E.InvalidArgument("Invalid path.")
        bucket, _, key = path[1:].partition("/")
        return (bucket or None), (key or None), False

    # ------------------------------------------------------------------ entry point
    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = _new_request_id()
        started = time.monotonic()
        self.in_flight += 1
        try:
            try:
                resp = await self._handle(request, rid)
            except web.HTTPException:
                raise
            except Exception as exc:  # every error becomes an S3 XML error here
                if client_gone(request, exc):
                    # the client went away mid-request (an upload or a
                    # download interrupted): nobody is left to read an answer,
                    # and it is not a server error (aiohttp would log one with
                    # a traceback if this were raised to it)
                    log.info("%s %s: the client went away (%s)", request.method, request.rel_url, exc)
                    exc = E.IncompleteBody() if request.method in ("PUT", "POST") else E.BadRequest(
                        "The client closed the connection.")
                resp = error_response(exc, rid, request.method)
                if not isinstance(exc, E.S3Error) or exc.status >= 500:
                    log.warning("%s %s -> %s (%s)", request.method, request.rel_url, resp.status, exc)
        finally:
            self.in_flight -= 1
            if self._drained is not None and self.in_flight == 0:
                self._drained.set()
        if not resp.prepared:
            resp.headers.setdefault("x-amz-request-id", rid)
            resp.headers.setdefault("x-amz-id-2", rid)
            if self._drained is not None:
                resp.force_close()       # stopping: this connection's last response
        log.debug("%s %s %s %.1fms", request.method, request.rel_url, resp.status,
                  (time.monotonic() - started) * 1000)
        return resp

    async def _handle(self, request: web.Request, rid: str) -> web.StreamResponse:
        if request.rel_url.raw_path == HEALTH_PATH and request.method in ("GET", "HEAD"):
            return await self.health()
        bucket, key, vhost = self._address(request)
        query = MultiDict(request.rel_url.query)
        ctx = S3Request(request=request, request_id=rid, bucket=bucket, key=key, query=query,
                        engine=self.engine, config=self.config)
        if key is not None and len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise E.KeyTooLongError(Size=str(len(key.encode("utf-8"))), MaxSizeAllowed=str(MAX_KEY_BYTES))
        if (request.method == "POST" and bucket is not None and key is None and not query
                and request.content_type == "multipart/form-data"):
            # a browser form upload (PostObject): signed by its policy field, not
            # by SigV4 headers, so authentication would answer AccessDenied
            raise E.NotImplementedS3("Browser-based uploads with POST (PostObject) are not implemented.")
        actx = auth.authenticate(request.method, request.rel_url.raw_path,
                                 request.rel_url.raw_query_string, request.headers, self.lookup_secret,
                                 virtual_host_bucket=bucket if vhost else None)
        ctx.auth = actx
        ctx.user = self.users[actx.access_key]
        handler = self._route(ctx)
        return await handler(ctx)

    # ------------------------------------------------------------------ routing
    def _route(self, ctx: S3Request):
        from airlock.s3 import attributes as A
        from airlock.s3 import bucket as B
        from airlock.s3 import configuration as C
        from airlock.s3 import delete as D
        from airlock.s3 import listing as L
        from airlock.s3 import multipart as M
        from airlock.s3 import object as O
        from airlock.s3 import tagging as T

        m, q = ctx.method, ctx.query
        if ctx.bucket is None:
            if m == "GET":
                return B.list_buckets
            raise E.MethodNotAllowed(Method=m, ResourceType="SERVICE")
        if ctx.key is None:
            sub = [k for k in q if k in UNSUPPORTED_SUBRESOURCES]
            if m == "GET":
                if "location" in q:
                    return B.get_bucket_location
                if "versioning" in q:
                    return B.get_bucket_versioning
                if "versions" in q:
                    return L.list_object_versions
                if "tagging" in q:
                    return T.get_bucket_tagging
                if "uploads" in q:
                    return M.list_uploads
                if sub:
                    return functools.partial(C.get_bucket_configuration, sub=sub[0])
                if q.get("list-type") == "2":
                    return L.list_objects_v2
                return L.list_objects_v1
            if m == "HEAD":
                return B.head_bucket
            if m == "PUT":
                if "versioning" in q:
                    return B.put_bucket_versioning
                if "tagging" in q:
                    return T.put_bucket_tagging
                if sub:
                    return functools.partial(C.refuse_configuration, sub=sub[0])
                return B.create_bucket
            if m == "DELETE":
                if "tagging" in q:
                    return T.delete_bucket_tagging
                if sub:
                    return functools.partial(C.delete_bucket_configuration, sub=sub[0])
                return B.delete_bucket
            if m == "POST" and "delete" in q:
                return D.delete_objects
            raise E.MethodNotAllowed(Method=m, ResourceType="BUCKET")
        # object level
        if "attributes" in q and m != "GET":
            raise E.MethodNotAllowed(Method=m, ResourceType="OBJECT")
        if "tagging" in q:
            if m == "GET":
                return T.get_object_tagging
            if m == "PUT":
                return T.put_object_tagging
            if m == "DELETE":
                return T.delete_object_tagging
            raise E.MethodNotAllowed(Method=m, ResourceType="OBJECT")
        sub = [k for k in q if k in UNSUPPORTED_SUBRESOURCES]
        if sub:
            if m == "GET":
                return functools.partial(C.get_object_configuration, sub=sub[0])
            return functools.partial(C.refuse_configuration, sub=sub[0])
        if m == "GET":
            if "uploadId" in q:
                return M.list_parts
            if "attributes" in q:
                return A.get_object_attributes
            return O.get_object
        if m == "HEAD":
            return O.head_object
        if m == "PUT":
            if "uploadId" in q or "partNumber" in q:
                if "x-amz-copy-source" in ctx.headers:
                    return M.upload_part_copy
                return M.upload_part
            if "x-amz-copy-source" in ctx.headers:
                return O.copy_object
            return O.put_object
        if m == "DELETE":
            if "uploadId" in q:
                return M.abort_upload
            return O.delete_object
        if m == "POST":
            if "uploads" in q:
                return M.create_upload
            if "uploadId" in q:
                return M.complete_upload
        raise E.MethodNotAllowed(Method=m, ResourceType="OBJECT")


def make_app(engine: Engine, config: GatewayConfig, activity=None) -> web.Application:
    """`activity`: a gateway process's `primary.dispatch.Activity`, which
    then sees every request (where connections go depends on it)."""
    s3 = S3App(engine, config)
    # auto_decompress off: a body sent with Content-Encoding: gzip is stored as sent, as S3 does
    app = web.Application(client_max_size=CLIENT_MAX_SIZE,
                          handler_args={"max_field_size": 65536, "auto_decompress": False})
    app["s3"] = s3
    app["users_by_id"] = {u.user_id: u for u in config.users}
    handle = s3.handle if activity is None else activity.wrap(s3.handle)
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle)   # [\s\S]: keys may hold newlines
    return app
