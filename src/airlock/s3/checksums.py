"""S3 flexible checksums and Content-MD5.

S3 reports every checksum as base64 of the big-endian digest bytes: CRC32 and
CRC32C are 4 bytes, CRC64NVME 8, SHA1 20, SHA256 32.  CRC32C and CRC64NVME come
from awscrt, the same C code botocore uses, so both sides agree bit for bit.

Not here: the newer XXHASH64/XXHASH3/XXHASH128/MD5 flexible checksums (a
request asking for them gets NotImplemented rather than silently skipping the
check).  Multipart: ``composite_checksum`` is S3's COMPOSITE type (checksum of
the concatenated part checksums, ``-N`` suffix); ``full_object_checksum`` is the
FULL_OBJECT type, which S3 allows for the CRC algorithms only and which awscrt
can compute from the part CRCs and lengths without re-reading data.

The checksum math itself (algorithms, running checksums, multipart
combinations) is the primary's, in primary/checksums.py; this module reads
requests: which checksum a client asks for, header and trailer values,
Content-MD5.
"""
from __future__ import annotations

import base64
import binascii
from typing import Mapping, NamedTuple

from airlock.errors import BadDigest, InvalidDigest, InvalidRequest, NotImplementedS3
from airlock.primary.checksums import (  # noqa: F401  (the S3 handlers use them through this module)
    ALGORITHMS, CRC_ALGORITHMS, DIGEST_SIZES, Checksum, check_object_claim, composite_checksum,
    full_object_checksum, multipart_checksum_type, multipart_object_checksum, new_checksum,
    stored_upload_checksum_type,
)

#: x-amz-checksum-* headers that are not a checksum value.
_NOT_VALUES = {"x-amz-checksum-type", "x-amz-checksum-algorithm", "x-amz-checksum-mode"}


def header_name(alg: str) -> str:
    """``"CRC32"`` -> ``"x-amz-checksum-crc32"``."""
    return "x-amz-checksum-" + alg.lower()


def decode_value(alg: str, value: str, source: str | None = None) -> bytes:
    """Digest bytes from a base64 checksum value; InvalidRequest if malformed."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or len(raw) != DIGEST_SIZES[alg]:
        raise InvalidRequest(f"Value for {source or header_name(alg)} header is invalid.")
    return raw


class ChecksumRequest(NamedTuple):
    algorithm: str | None        # one of ALGORITHMS, or None if the client asked for none
    expected_b64: str | None     # the header value; None when it comes in a trailer (or none asked)
    from_trailer: bool


def _is_checksum_value(name: str) -> bool:
    """x-amz-checksum-<alg> (a value), not x-amz-checksum-type / -algorithm / -mode."""
    lname = name.lower()
    return lname.startswith("x-amz-checksum-") and lname not in _NOT_VALUES


def requested_checksum(headers: Mapping[str, str]) -> ChecksumRequest:
    """Which flexible checksum the client wants verified, and its value if sent as a header.

    Looks at ``x-amz-checksum-<alg>``, ``x-amz-sdk-checksum-algorithm`` and
    ``x-amz-trailer``.  Raises InvalidRequest for malformed values, more than
    one checksum, or an SDK algorithm without the checksum itself.
    """
    found: list[tuple[str, str]] = []
    for name in headers.keys():
        if not _is_checksum_value(name):
            continue
        lname = name.lower()
        alg = lname[len("x-amz-checksum-"):].upper()
        if alg not in ALGORITHMS:
            raise NotImplementedS3(f"Checksum algorithm {alg} is not supported.", Header=lname)
        if all(a != alg for a, _ in found):
            found.append((alg, headers[name]))

    trailer_algs = []
    for name in trailer_names(headers):
        if name.startswith("x-amz-checksum-"):
            alg = name[len("x-amz-checksum-"):].upper()
            if alg not in ALGORITHMS:
                raise NotImplementedS3(f"Checksum algorithm {alg} is not supported.", Header="x-amz-trailer")
            trailer_algs.append(alg)

    if len(found) + len(trailer_algs) > 1:
        raise InvalidRequest("Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.")

    sdk = headers.get("x-amz-sdk-checksum-algorithm")
    if sdk is not None:
        sdk = sdk.strip().upper()
        if sdk not in ALGORITHMS:
            raise InvalidRequest("Value for x-amz-sdk-checksum-algorithm header is invalid.")

    if found:
        alg, value = found[0]
        if sdk is not None and sdk != alg:
            raise InvalidRequest("Value for x-amz-sdk-checksum-algorithm header is invalid.")
        decode_value(alg, value)
        return ChecksumRequest(alg, value.strip(), False)
    if trailer_algs:
        alg = trailer_algs[0]
        if sdk is not None and sdk != alg:
            raise InvalidRequest("Value for x-amz-sdk-checksum-algorithm header is invalid.")
        return ChecksumRequest(alg, None, True)
    if sdk is not None:
        raise InvalidRequest(
            "x-amz-sdk-checksum-algorithm specified, but no corresponding x-amz-checksum-* "
            "or x-amz-trailer headers were found.")
    return ChecksumRequest(None, None, False)


def without_checksum_values(headers: Mapping[str, str]) -> dict[str, str]:
    """`headers` without x-amz-checksum-<alg> values (and without the SDK's
    algorithm header, which only announces them)."""
    return {k: v for k, v in headers.items()
            if not (_is_checksum_value(k) or k.lower() == "x-amz-sdk-checksum-algorithm")}


def object_checksum_claim(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """(algorithm, value) of the whole object's checksum a
    CompleteMultipartUpload names in an x-amz-checksum-<alg> header: a
    FULL_OBJECT value, or a COMPOSITE one with or without its "-<parts>"
    suffix.  None if there is none; InvalidRequest for more than one or a
    value that is not base64 of the algorithm's size."""
    found = [(k.lower()[len("x-amz-checksum-"):].upper(), v.strip()) for k, v in headers.items()
             if _is_checksum_value(k)]
    if not found:
        return None
    if len(found) > 1:
        raise InvalidRequest("Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.")
    alg, value = found[0]
    if alg not in ALGORITHMS:
        raise NotImplementedS3(f"Checksum algorithm {alg} is not supported.", Header=f"x-amz-checksum-{alg.lower()}")
    b64, dash, count = value.partition("-")
    if dash and not count.isdigit():
        raise InvalidRequest(f"Value for x-amz-checksum-{alg.lower()} header is invalid.")
    decode_value(alg, b64)
    return alg, value


def trailer_names(headers: Mapping[str, str]) -> list[str]:
    """Lower-cased names announced in ``x-amz-trailer`` (comma separated)."""
    getall = getattr(headers, "getall", None)
    values = getall("x-amz-trailer", ()) if getall else [v for v in [headers.get("x-amz-trailer")] if v]
    return [n.strip().lower() for v in values for n in v.split(",") if n.strip()]


def verify_checksum(alg: str, expected_b64: str, actual: Checksum | bytes, source: str | None = None) -> None:
    """BadDigest unless ``actual`` (a Checksum or its digest) equals ``expected_b64``.

    InvalidRequest if ``expected_b64`` is not a well-formed value for ``alg``
    (``source`` names the header/trailer in that message).
    """
    want = decode_value(alg, expected_b64, source)
    got = actual.digest() if isinstance(actual, Checksum) else actual
    if want != got:
        raise BadDigest(f"The {alg} you specified did not match the calculated checksum.")


# ---------------------------------------------------------------------------
# Content-MD5
# ---------------------------------------------------------------------------
def parse_content_md5(value: str) -> bytes:
    """The 16 digest bytes of a Content-MD5 header; InvalidDigest if malformed."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise InvalidDigest("The Content-MD5 you specified was invalid.", **{"Content-MD5": value})
    return raw


def check_content_md5(expected: bytes, actual: bytes) -> None:
    """BadDigest unless the body's MD5 ``actual`` equals the parsed Content-MD5 ``expected``."""
    if expected != actual:
        raise BadDigest("The Content-MD5 you specified did not match what we received.",
                        ExpectedDigest=base64.b64encode(expected).decode(),
                        CalculatedDigest=base64.b64encode(actual).decode())
