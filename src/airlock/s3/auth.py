"""AWS Signature Version 4 verification for S3 requests.

Pure functions, no HTTP framework: callers hand in the method, the raw path and
raw query string exactly as received, the headers as a case-insensitive mapping
(aiohttp's ``CIMultiDictProxy`` or ``multidict.CIMultiDict``) and a function that
maps an access key to its secret.

Two ways of signing are accepted:

* header auth — ``Authorization: AWS4-HMAC-SHA256 Credential=AK/date/region/s3/aws4_request,
  SignedHeaders=..., Signature=...`` plus ``x-amz-date`` (or ``Date``) and
  ``x-amz-content-sha256``;
* presigned URLs — ``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``,
  ``X-Amz-Expires`` (at most 604800 s), ``X-Amz-SignedHeaders`` and
  ``X-Amz-Signature`` in the query string.

The canonical request is built the way S3 builds it: the path is *not*
normalised (no ``..`` folding, no double encoding).  S3 decodes the path and
re-encodes every byte except ``A-Z a-z 0-9 - _ . ~ /``; that is also what
botocore sends.  A client that encoded its path differently (e.g. left ``=`` or
``+`` bare, or sent ``%2F``) signed the path as it sent it, so when the
re-encoded form does not verify, the form exactly as received is tried too.
The query string gets the same treatment.

Anonymous requests are not supported: no credentials at all is AccessDenied.
The body is not read here.  ``payload_mode`` tells the caller how to check it
(a sha256 to compare at the end, aws-chunked signed chunks, or nothing).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Callable, Mapping
from urllib.parse import quote, unquote, unquote_to_bytes

from airlock.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    AuthorizationQueryParametersError,
    InvalidAccessKeyId,
    InvalidArgument,
    InvalidRequest,
    NotImplementedS3,
    RequestTimeTooSkewed,
    SignatureDoesNotMatch,
)

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
TERMINATOR = "aws4_request"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

#: Largest allowed difference between the request time and our clock (S3: 15 min).
MAX_CLOCK_SKEW = timedelta(minutes=15)
#: Longest lifetime of a presigned URL, in seconds (S3: one week).
MAX_PRESIGN_EXPIRES_S = 604800
#: Signing keys kept per (secret, date, region); a key lives for one day, so
#: this only needs to cover the active access keys times the regions they use.
SIGNING_KEY_CACHE_SIZE = 1024

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
_STREAMING_ECDSA = ("STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_PAYLOAD_MODES = {
    UNSIGNED_PAYLOAD: "unsigned",
    STREAMING_SIGNED: "streaming-signed",
    STREAMING_SIGNED_TRAILER: "streaming-signed-trailer",
    STREAMING_UNSIGNED_TRAILER: "streaming-unsigned-trailer",
}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DATE8 = re.compile(r"[0-9]{8}")

# S3's UriEncode leaves the unreserved set alone; quote() already keeps
# A-Z a-z 0-9 _ . - ~, so only '/' (paths) needs adding.
_PATH_SAFE = "/~"
_QUERY_SAFE = "-_.~"

_PRESIGN_PARAMS = (
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature",
    "X-Amz-Date", "X-Amz-SignedHeaders", "X-Amz-Expires",
)
_BAD_CONTENT_SHA256 = (
    "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER, "
    "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD, STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER "
    "or a valid sha256 value."
)


@dataclass(frozen=True, slots=True)
class AuthContext:
    """Who signed the request and what is needed to check the rest of it."""

    access_key: str
    region: str
    amz_date: str              # the request time as signed, yyyymmddThhmmssZ
    scope: str                 # date/region/s3/aws4_request (no access key)
    signing_key: bytes
    seed_signature: str        # the request signature; first "previous signature" of aws-chunked
    payload_hash: str          # x-amz-content-sha256 as sent, or UNSIGNED-PAYLOAD
    presigned: bool
    signed_headers: tuple[str, ...] = ()


def payload_mode(ctx: AuthContext) -> str:
    """How the body must be checked, from the signed x-amz-content-sha256 value.

    Returns ``"unsigned"``, ``"sha256"`` (compare ``ctx.payload_hash`` with the
    body's sha256 hex digest, XAmzContentSHA256Mismatch if different),
    ``"streaming-signed"``, ``"streaming-signed-trailer"`` or
    ``"streaming-unsigned-trailer"`` (decode with ``AwsChunkedDecoder``).
    """
    return _payload_mode(ctx.payload_hash)


def _payload_mode(value: str) -> str:
    mode = _PAYLOAD_MODES.get(value)
    if mode is not None:
        return mode
    if _HEX64.fullmatch(value):
        return "sha256"
    if value in _STREAMING_ECDSA:
        raise NotImplementedS3("SigV4a (ECDSA) streaming signatures are not supported.",
                               Header="x-amz-content-sha256")
    raise InvalidArgument(_BAD_CONTENT_SHA256, ArgumentName="x-amz-content-sha256", ArgumentValue=value)


@lru_cache(maxsize=SIGNING_KEY_CACHE_SIZE)
def signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
    """The SigV4 derived key: HMAC chain over date, region, service, terminator."""
    k = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
    k = hmac.new(k, region.encode(), hashlib.sha256).digest()
    k = hmac.new(k, service.encode(), hashlib.sha256).digest()
    return hmac.new(k, TERMINATOR.encode(), hashlib.sha256).digest()


def hmac_hex(key: bytes, msg: str) -> str:
    return hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()


def authenticate(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    lookup_secret: Callable[[str], str | None],
    now: datetime | None = None,
    *,
    virtual_host_bucket: str | None = None,
) -> AuthContext:
    """Verify a SigV4-signed S3 request and return who signed it.

    ``raw_path`` is the request target's path as received (percent-encoding
    intact); if it still carries ``?query`` (aiohttp's ``request.raw_path``
    does) the query part is split off and used when ``raw_query`` is empty.

    Presigned URLs in the legacy SigV2 form (``AWSAccessKeyId``, ``Signature``,
    ``Expires``) are accepted too, because botocore still generates them by
    default for us-east-1 (``generate_presigned_url``, ``aws s3 presign``).
    SigV2 signs the bucket in its resource even for virtual-hosted requests;
    pass ``virtual_host_bucket`` when the bucket came from the Host header.
    SigV2 *header* auth (``Authorization: AWS ...``) is refused.

    Raises AccessDenied (no credentials; expired presigned URL),
    InvalidAccessKeyId, RequestTimeTooSkewed, SignatureDoesNotMatch,
    AuthorizationHeaderMalformed / AuthorizationQueryParametersError (malformed
    auth), InvalidRequest (unsupported auth scheme, missing
    x-amz-content-sha256), InvalidArgument (both auth forms, bad
    x-amz-content-sha256 value).
    """
    if "?" in raw_path:
        raw_path, _, q = raw_path.partition("?")
        raw_query = raw_query or q
    now = _utc(now or datetime.now(timezone.utc))
    query = _parse_query(raw_query)
    names = {unquote(k) for k, _ in query}
    authorization = headers.get("authorization")

    if "X-Amz-Algorithm" in names or "X-Amz-Signature" in names or "X-Amz-Credential" in names:
        if authorization is not None:
            raise InvalidArgument(
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
                ArgumentName="Authorization", ArgumentValue=authorization)
        return _authenticate_presigned(method, raw_path, raw_query, query, headers, lookup_secret, now)
    if authorization is not None:
        return _authenticate_header(method, raw_path, raw_query, query, headers, authorization,
                                    lookup_secret, now)
    if "Signature" in names and "AWSAccessKeyId" in names:
        if "Expires" not in names:
            raise InvalidRequest(
                "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.")
        return _authenticate_presigned_v2(method, raw_path, raw_query, query, headers, lookup_secret,
                                          now, virtual_host_bucket)
    raise AccessDenied("Access Denied")  # anonymous access is not supported


# ---------------------------------------------------------------------------
# header auth
# ---------------------------------------------------------------------------
def _authenticate_header(method, raw_path, raw_query, query, headers, authorization,
                         lookup_secret, now) -> AuthContext:
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise InvalidRequest(
            "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        k, eq, v = part.strip().partition("=")
        if eq:
            fields[k] = v.strip()
    for required in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(required):
            raise AuthorizationHeaderMalformed(
                f"The authorization header is malformed; missing {required}.")
    access_key, cred_date, region = _parse_credential(fields["Credential"], AuthorizationHeaderMalformed,
                                                      "The authorization header is malformed; ")
    signed_headers = _parse_signed_headers(fields["SignedHeaders"], AuthorizationHeaderMalformed)

    amz_date, request_time = _header_request_time(headers)
    if cred_date != amz_date[:8]:
        raise AuthorizationHeaderMalformed(
            "The authorization header is malformed; Invalid credential date. "
            "Date is not the same as X-Amz-Date.", Region=region)

    content_sha256 = headers.get("x-amz-content-sha256")
    if content_sha256 is None:
        raise InvalidRequest("Missing required header for this request: x-amz-content-sha256")
    content_sha256 = content_sha256.strip()
    _payload_mode(content_sha256)

    secret = lookup_secret(access_key)
    if secret is None:
        raise InvalidAccessKeyId(AWSAccessKeyId=access_key)
    if abs(now - request_time) > MAX_CLOCK_SKEW:
        raise RequestTimeTooSkewed(
            RequestTime=amz_date, ServerTime=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            MaxAllowedSkewMilliseconds=str(int(MAX_CLOCK_SKEW.total_seconds() * 1000)))

    # S3 refuses x-amz-* headers that were not signed (they would be replayable
    # with any value).  Presigned URLs are not checked: they sign only host.
    present = {k.lower() for k in headers.keys()}
    unsigned = sorted(h for h in present if h.startswith("x-amz-") and h not in signed_headers)
    if unsigned:
        raise AccessDenied("There were headers present in the request which were not signed",
                           HeadersNotSigned=", ".join(unsigned))

    return _verify(method, raw_path, raw_query, query, headers, signed_headers, content_sha256,
                   access_key, secret, region, amz_date, fields["Signature"], presigned=False)


def _header_request_time(headers) -> tuple[str, datetime]:
    value = headers.get("x-amz-date")
    if value is not None:
        try:
            return value.strip(), _utc(datetime.strptime(value.strip(), AMZ_DATE_FORMAT))
        except ValueError:
            pass
    elif headers.get("date") is not None:
        try:
            t = _utc(parsedate_to_datetime(headers["date"]))
            return t.strftime(AMZ_DATE_FORMAT), t
        except (TypeError, ValueError):
            pass
    raise AccessDenied("AWS authentication requires a valid Date or x-amz-date header")


# ---------------------------------------------------------------------------
# presigned (query) auth
# ---------------------------------------------------------------------------
def _authenticate_presigned(method, raw_path, raw_query, query, headers, lookup_secret,
                            now) -> AuthContext:
    params: dict[str, str] = {}
    for k, v in query:
        params.setdefault(unquote(k), unquote(v))
    if any(not params.get(p) for p in _PRESIGN_PARAMS):
        raise AuthorizationQueryParametersError(
            "Query-string authentication version 4 requires the X-Amz-Algorithm, X-Amz-Credential, "
            "X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and X-Amz-Expires parameters.")
    if params["X-Amz-Algorithm"] != ALGORITHM:
        raise AuthorizationQueryParametersError('X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"')
    access_key, cred_date, region = _parse_credential(
        params["X-Amz-Credential"], AuthorizationQueryParametersError, "Error parsing the X-Amz-Credential parameter; ")
    signed_headers = _parse_signed_headers(params["X-Amz-SignedHeaders"], AuthorizationQueryParametersError)

    amz_date = params["X-Amz-Date"]
    try:
        request_time = _utc(datetime.strptime(amz_date, AMZ_DATE_FORMAT))
    except ValueError:
        raise AuthorizationQueryParametersError(
            "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"") from None
    if cred_date != amz_date[:8]:
        raise AuthorizationQueryParametersError(
            "Error parsing the X-Amz-Credential parameter; Invalid credential date. "
            "Date is not the same as X-Amz-Date.", Region=region)
    try:
        expires = int(params["X-Amz-Expires"])
    except ValueError:
        raise AuthorizationQueryParametersError(
            "X-Amz-Expires should be a number") from None
    if expires < 0:
        raise AuthorizationQueryParametersError("X-Amz-Expires must be non-negative")
    if expires > MAX_PRESIGN_EXPIRES_S:
        raise AuthorizationQueryParametersError(
            "X-Amz-Expires must be less than a week (in seconds) that is 604800")

    content_sha256 = params.get("X-Amz-Content-Sha256") or headers.get("x-amz-content-sha256")
    content_sha256 = content_sha256.strip() if content_sha256 else UNSIGNED_PAYLOAD
    _payload_mode(content_sha256)

    secret = lookup_secret(access_key)
    if secret is None:
        raise InvalidAccessKeyId(AWSAccessKeyId=access_key)
    server_time = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if request_time - now > MAX_CLOCK_SKEW:
        raise AccessDenied("Request is not valid yet", ServerTime=server_time,
                           RequestTime=amz_date)
    if now > request_time + timedelta(seconds=expires):
        raise AccessDenied("Request has expired", **{
            "X-Amz-Expires": str(expires),
            "Expires": (request_time + timedelta(seconds=expires)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "ServerTime": server_time})

    return _verify(method, raw_path, raw_query, query, headers, signed_headers, content_sha256,
                   access_key, secret, region, amz_date, params["X-Amz-Signature"], presigned=True)


# ---------------------------------------------------------------------------
# legacy SigV2 presigned URLs
# ---------------------------------------------------------------------------
#: Sub-resources that SigV2 includes in the string to sign (botocore HmacV1Auth.QSAOfInterest).
_V2_SUBRESOURCES = frozenset((
    "accelerate", "acl", "cors", "defaultObjectAcl", "location", "logging", "partNumber", "policy",
    "requestPayment", "torrent", "versioning", "versionId", "versions", "website", "uploads", "uploadId",
    "response-content-type", "response-content-language", "response-expires", "response-cache-control",
    "response-content-disposition", "response-content-encoding", "delete", "lifecycle", "tagging",
    "restore", "storageClass", "notification", "replication", "analytics", "metrics", "inventory",
    "select", "select-type", "object-lock",
))


def _authenticate_presigned_v2(method, raw_path, raw_query, query, headers, lookup_secret, now,
                               virtual_host_bucket) -> AuthContext:
    params: dict[str, str] = {}
    for k, v in query:
        params.setdefault(unquote(k), unquote(v))
    access_key, provided, expires_s = params["AWSAccessKeyId"], params["Signature"], params["Expires"]
    try:
        expires = datetime.fromtimestamp(int(expires_s), timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise AccessDenied("Query-string authentication requires the Signature, Expires and "
                           "AWSAccessKeyId parameters") from None
    secret = lookup_secret(access_key)
    if secret is None:
        raise InvalidAccessKeyId(AWSAccessKeyId=access_key)
    if now > expires:
        raise AccessDenied("Request has expired", Expires=expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                           ServerTime=now.strftime("%Y-%m-%dT%H:%M:%SZ"))

    # signed header values travel in the query string; x-amz-* may also be real headers
    def standard(name):
        v = params.get(name)
        if v is None:
            v = headers.get(name)
        return "" if v is None else v.strip()

    getall = getattr(headers, "getall", None)
    amz: dict[str, list[str]] = {}
    for lk in {k.lower() for k in headers.keys() if k.lower().startswith("x-amz-")}:
        values = getall(lk) if getall is not None else [headers[lk]]
        amz[lk] = [v.strip() for v in values]
    for k, v in params.items():
        if k.lower().startswith("x-amz-"):
            amz.setdefault(k.lower(), []).append(v.strip())
    resource = raw_path or "/"
    if virtual_host_bucket:
        resource = f"/{virtual_host_bucket}{resource}"
    # A bucket's own resource is "/bucket/" in SigV2 (botocore signs a
    # bucket-level presigned URL so even when its path is "/bucket"): both
    # spellings name the same bucket, so both are accepted.
    paths = [resource]
    if resource.count("/") == 1 and len(resource) > 1:
        paths.append(resource + "/")
    # as botocore builds it: raw names, "name" or "name=<decoded value>", stable sort by name
    subs = [part.split("=", 1) for part in raw_query.split("&") if part]
    subs = sorted((s for s in subs if s[0] in _V2_SUBRESOURCES), key=lambda s: s[0])
    query = ""
    if subs:
        query = "?" + "&".join(s[0] if len(s) == 1 else f"{s[0]}={unquote(s[1])}" for s in subs)
    lines = [method.upper(), standard("content-md5"), standard("content-type"), expires_s]
    lines += [f"{k}:{','.join(amz[k])}" for k in sorted(amz)]
    string_to_sign = ""
    for path in paths:
        string_to_sign = "\n".join(lines + [path + query])
        mac = _v2_hmac(secret).copy()
        mac.update(string_to_sign.encode("utf-8", "surrogateescape"))
        if hmac.compare_digest(base64.b64encode(mac.digest()), provided.encode("utf-8", "replace")):
            break
    else:
        raise SignatureDoesNotMatch(AWSAccessKeyId=access_key, StringToSign=string_to_sign,
                                    SignatureProvided=provided)
    return AuthContext(access_key=access_key, region="us-east-1", amz_date=now.strftime(AMZ_DATE_FORMAT),
                       scope="", signing_key=b"", seed_signature="", payload_hash=UNSIGNED_PAYLOAD,
                       presigned=True)


# ---------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _v2_hmac(secret: str) -> "hmac.HMAC":
    """HMAC-SHA1 keyed with a user's secret, before any message: each
    presigned V2 request copies it (copy() skips the two key-pad hashes)."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha1)


def _parse_credential(value: str, error: type, prefix: str) -> tuple[str, str, str]:
    parts = value.split("/")
    if len(parts) != 5 or not parts[0]:
        raise error(prefix + 'the Credential is mal-formed; expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".')
    access_key, date, region, service, terminator = parts
    if not _DATE8.fullmatch(date):
        raise error(prefix + f"incorrect date format '{date}'. This date in the credential must be in the format \"yyyyMMdd\".")
    if not region:
        raise error(prefix + "the region must not be empty.")
    if service != SERVICE:
        raise error(prefix + f"incorrect service '{service}'. This endpoint belongs to '{SERVICE}'.")
    if terminator != TERMINATOR:
        raise error(prefix + f"incorrect terminal '{terminator}'. This endpoint uses '{TERMINATOR}'.")
    return access_key, date, region


def _parse_signed_headers(value: str, error: type) -> tuple[str, ...]:
    names = tuple(value.split(";"))
    if not all(names) or any(n != n.lower().strip() for n in names):
        raise error(f"SignedHeaders is malformed: {value!r}")
    return names


def _verify(method, raw_path, raw_query, query, headers, signed_headers, payload_hash, access_key,
            secret, region, amz_date, provided, *, presigned) -> AuthContext:
    date = amz_date[:8]
    scope = f"{date}/{region}/{SERVICE}/{TERMINATOR}"
    key = signing_key(secret, date, region)
    canon_headers = _canonical_headers(headers, signed_headers)
    tail = "\n".join((canon_headers, ";".join(signed_headers), payload_hash))
    drop = "X-Amz-Signature" if presigned else None

    first = None
    for path, qs in _candidates(raw_path, raw_query, query, drop):
        canonical_request = f"{method.upper()}\n{path}\n{qs}\n{tail}"
        string_to_sign = "\n".join((ALGORITHM, amz_date, scope,
                                    hashlib.sha256(canonical_request.encode("utf-8", "surrogateescape")).hexdigest()))
        expected = hmac_hex(key, string_to_sign)
        if hmac.compare_digest(expected.encode(), provided.encode("utf-8", "replace")):
            return AuthContext(access_key=access_key, region=region, amz_date=amz_date, scope=scope,
                               signing_key=key, seed_signature=expected, payload_hash=payload_hash,
                               presigned=presigned, signed_headers=signed_headers)
        if first is None:
            first = (string_to_sign, canonical_request)
    raise SignatureDoesNotMatch(AWSAccessKeyId=access_key, StringToSign=first[0],
                                SignatureProvided=provided, CanonicalRequest=first[1])


def _candidates(raw_path, raw_query, query, drop):
    """(canonical URI, canonical query) pairs to try, S3's re-encoding first."""
    s3_form = (canonical_uri(raw_path), canonical_query(query, drop))
    yield s3_form
    as_sent = (raw_path or "/", _raw_sorted_query(query, drop))
    if as_sent != s3_form:
        yield as_sent


def canonical_uri(raw_path: str) -> str:
    """S3's canonical URI: the decoded path re-encoded byte by byte, unnormalised."""
    if not raw_path:
        return "/"
    return quote(unquote_to_bytes(raw_path), safe=_PATH_SAFE)


def _parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Key/value pairs exactly as sent (still percent-encoded); ``k`` alone is ``(k, "")``."""
    pairs = []
    for part in raw_query.split("&") if raw_query else ():
        if part:
            k, _, v = part.partition("=")
            pairs.append((k, v))
    return pairs


def canonical_query(query: list[tuple[str, str]], drop: str | None = None) -> str:
    encoded = sorted(
        (quote(unquote_to_bytes(k), safe=_QUERY_SAFE), quote(unquote_to_bytes(v), safe=_QUERY_SAFE))
        for k, v in query if drop is None or unquote(k) != drop)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _raw_sorted_query(query, drop) -> str:
    encoded = sorted((k, v) for k, v in query if drop is None or unquote(k) != drop)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _canonical_headers(headers, signed_headers) -> str:
    getall = getattr(headers, "getall", None)
    lines = []
    for name in signed_headers:
        if getall is not None:
            values = getall(name, ())
        else:
            v = headers.get(name)
            values = () if v is None else (v,)
        lines.append(name + ":" + ",".join(" ".join(v.split()) for v in values))
    return "\n".join(lines) + "\n"


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
