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
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from typing import Mapping, NamedTuple

from awscrt import checksums as _crt

from airlock.errors import BadDigest, InvalidDigest, InvalidRequest, NotImplementedS3

ALGORITHMS = ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")
CRC_ALGORITHMS = ("CRC32", "CRC32C", "CRC64NVME")
DIGEST_SIZES = {"CRC32": 4, "CRC32C": 4, "CRC64NVME": 8, "SHA1": 20, "SHA256": 32}
#: x-amz-checksum-* headers that are not a checksum value.
_NOT_VALUES = {"x-amz-checksum-type", "x-amz-checksum-algorithm", "x-amz-checksum-mode"}


class Checksum:
    """Running checksum: ``update(data)``, then ``digest()`` / ``b64()``."""

    __slots__ = ("algorithm", "_update", "_digest")

    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        if algorithm in CRC_ALGORITHMS:
            fn, size = _CRC[algorithm]
            state = [0]

            def update(data, _fn=fn, _state=state):
                _state[0] = _fn(data, _state[0])

            self._update = update
            self._digest = lambda: state[0].to_bytes(size, "big")
        else:
            h = hashlib.new(algorithm.lower())
            self._update = h.update
            self._digest = h.digest

    def update(self, data) -> None:
        self._update(data)

    def digest(self) -> bytes:
        return self._digest()

    def b64(self) -> str:
        return base64.b64encode(self._digest()).decode("ascii")


def _crc32(data, prev: int) -> int:
    return zlib.crc32(data, prev)


_CRC = {
    "CRC32": (_crc32, 4),
    "CRC32C": (_crt.crc32c, 4),
    "CRC64NVME": (_crt.crc64nvme, 8),
}


def new_checksum(name: str) -> Checksum:
    alg = name.upper()
    if alg not in ALGORITHMS:
        raise InvalidRequest(f"Checksum algorithm {name} is not supported.")
    return Checksum(alg)


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


# ---------------------------------------------------------------------------
# multipart
# ---------------------------------------------------------------------------
def composite_checksum(alg: str, part_digests: list[bytes]) -> str:
    """S3 COMPOSITE checksum: b64(alg(concat(part digests))) + "-<part count>"."""
    c = new_checksum(alg)
    for d in part_digests:
        c.update(d)
    return f"{c.b64()}-{len(part_digests)}"


_COMBINE = {
    "CRC32": (_crt.combine_crc32, 4),
    "CRC32C": (_crt.combine_crc32c, 4),
    "CRC64NVME": (_crt.combine_crc64nvme, 8),
}


def multipart_checksum_type(alg: str | None, ctype: str | None) -> str | None:
    """The checksum type of a multipart upload with algorithm `alg`: `ctype`
    as asked, else FULL_OBJECT for CRC64NVME (the one type S3 allows it)
    and COMPOSITE for the others; None without an algorithm.
    InvalidRequest for a combination S3 refuses."""
    if alg is None:
        return None
    if ctype is None:
        return "FULL_OBJECT" if alg == "CRC64NVME" else "COMPOSITE"
    if ctype == "FULL_OBJECT" and alg not in CRC_ALGORITHMS:
        raise InvalidRequest(f"The FULL_OBJECT checksum type cannot be used with the {alg.lower()} checksum algorithm.")
    if ctype == "COMPOSITE" and alg == "CRC64NVME":
        raise InvalidRequest("The COMPOSITE checksum type cannot be used with the crc64nvme checksum algorithm.")
    return ctype


def stored_upload_checksum_type(alg: str | None, stored: str | None) -> str | None:
    """The checksum type an upload has: `stored` as create_upload validated
    it, the default for uploads that stored none, and COMPOSITE for a
    FULL_OBJECT + SHA* pair created before the type was checked."""
    if alg is None:
        return None
    ctype = (stored or "").upper() or multipart_checksum_type(alg, None)
    return "COMPOSITE" if ctype == "FULL_OBJECT" and alg not in CRC_ALGORITHMS else ctype


def multipart_object_checksum(alg: str, ctype: str, parts: list[tuple[str, int]]) -> str:
    """The object checksum of a completed upload from its parts' (base64
    checksum, length): FULL_OBJECT (the CRC of the whole object) or
    COMPOSITE (checksum of the part checksums, "-<parts>")."""
    digests = [(base64.b64decode(v), n) for v, n in parts]
    if ctype == "FULL_OBJECT":
        return full_object_checksum(alg, digests)
    return composite_checksum(alg, [d for d, _n in digests])


def check_object_claim(claim: tuple[str, str], alg: str | None, ctype: str | None,
                       computed: str | None, parts: int) -> None:
    """The whole object's checksum a CompleteMultipartUpload named
    (`object_checksum_claim`) against the one computed from the parts:
    BadDigest if they differ, InvalidRequest if the upload has no such
    checksum to compare with."""
    calg, value = claim
    if alg is None or calg != alg:
        raise InvalidRequest(f"The upload was created using the {(alg or 'null').lower()} checksum algorithm. "
                             f"The complete request referenced the {calg.lower()} checksum algorithm.")
    if computed is None:
        raise InvalidRequest(f"The upload was created using a {alg.lower()} checksum. The complete request "
                             f"cannot be checked: a part was uploaded without its {alg.lower()} checksum.")
    b64, _dash, count = value.partition("-")
    if ctype == "FULL_OBJECT":
        ok = not count and b64 == computed
    else:
        ok = b64 == computed.partition("-")[0] and (not count or int(count) == parts)
    if not ok:
        raise BadDigest(f"The {alg} you specified did not match the calculated checksum.")


def full_object_checksum(alg: str, parts: list[tuple[bytes, int]]) -> str:
    """S3 FULL_OBJECT checksum (CRC algorithms only) from (part digest, part length) pairs.

    Equal to the CRC of the whole object, computed without reading it again.
    """
    alg = alg.upper()
    if alg not in _COMBINE:
        raise InvalidRequest(f"The FULL_OBJECT checksum type cannot be used with the {alg.lower()} checksum algorithm.")
    combine, size = _COMBINE[alg]
    crc = 0
    for digest, length in parts:
        crc = combine(crc, int.from_bytes(digest, "big"), length)
    return base64.b64encode(crc.to_bytes(size, "big")).decode("ascii")
