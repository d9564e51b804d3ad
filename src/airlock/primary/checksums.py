"""Checksum math of objects and multipart uploads: S3's flexible checksum
algorithms and how a completed upload's checksum follows from its parts'.

S3 reports every checksum as base64 of the big-endian digest bytes: CRC32 and
CRC32C are 4 bytes, CRC64NVME 8, SHA1 20, SHA256 32.  CRC32C and CRC64NVME come
from awscrt, the same C code botocore uses, so both sides agree bit for bit.
Multipart: ``composite_checksum`` is S3's COMPOSITE type (checksum of the
concatenated part checksums, ``-N`` suffix); ``full_object_checksum`` is the
FULL_OBJECT type, which S3 allows for the CRC algorithms only and which awscrt
can compute from the part CRCs and lengths without re-reading data.

Pure functions over digests (Ingest feeds `Checksum`s, Engine completes
uploads with the rest); which checksum a request asks for, and how it is
named in headers and trailers, is the S3 layer's (s3/checksums.py).
"""
from __future__ import annotations

import base64
import hashlib
import zlib

from awscrt import checksums as _crt

from airlock.errors import BadDigest, InvalidRequest

ALGORITHMS = ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")
CRC_ALGORITHMS = ("CRC32", "CRC32C", "CRC64NVME")
DIGEST_SIZES = {"CRC32": 4, "CRC32C": 4, "CRC64NVME": 8, "SHA1": 20, "SHA256": 32}


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
