"""Domain values of the primary: buckets, object manifests, uploads, listings.

These are what the engine returns and what the commit records carry (as JSON,
see docs/format/records.md).  They know nothing about HTTP.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

# Standard headers stored with an object and returned on GET/HEAD, by their
# lower-case HTTP names.
STORED_HEADERS = (
    "content-type",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "expires",
    "x-amz-website-redirect-location",
)
DEFAULT_CONTENT_TYPE = "binary/octet-stream"  # what S3 answers when none was given
NULL_VERSION = "null"   # the version id of writes in unversioned and suspended buckets
# Every other version id: 24 random bytes in URL-safe base64 without padding
# (engine._new_version_id).  Ids made before 4c6b215 may begin with "-".
VERSION_ID_CHARS = 32
_VERSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{%d}" % VERSION_ID_CHARS)


def is_version_id(text: str) -> bool:
    """Could `text` be a version id airlock made?  S3 refuses an id that
    could not (400 InvalidArgument) rather than looking it up (404
    NoSuchVersion)."""
    return text == NULL_VERSION or _VERSION_ID_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of an object: its BLAKE3 digest (hex) and length in bytes."""

    digest: str
    size: int


@dataclass
class ObjectMeta:
    """What the client said about an object (headers), independent of its bytes."""

    headers: dict[str, str] = field(default_factory=dict)   # subset of STORED_HEADERS
    user: dict[str, str] = field(default_factory=dict)      # x-amz-meta-* without prefix, lower-case keys
    storage_class: str = "STANDARD"
    tagging: str | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type") or DEFAULT_CONTENT_TYPE

    def to_json(self) -> dict[str, Any]:
        return {"headers": self.headers, "user": self.user, "storage_class": self.storage_class,
                "tagging": self.tagging}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ObjectMeta":
        return cls(headers=dict(d.get("headers") or {}), user=dict(d.get("user") or {}),
                   storage_class=d.get("storage_class") or "STANDARD", tagging=d.get("tagging"))


@dataclass
class Manifest:
    """A committed object: everything needed to serve it.

    `etag` is the S3 ETag without quotes (hex MD5, or "<hex>-N" for multipart).
    `checksums` maps an algorithm name (CRC32, CRC32C, CRC64NVME, SHA1, SHA256)
    to its base64 value as S3 returns it; `checksum_type` is FULL_OBJECT or
    COMPOSITE.  `parts` lists part sizes for multipart objects (PartNumber GETs).
    `mtime` is seconds since the epoch (float, UTC).
    """

    bucket: str
    key: str
    size: int
    etag: str
    mtime: float
    meta: ObjectMeta
    chunks: list[ChunkRef]
    checksums: dict[str, str] = field(default_factory=dict)
    checksum_type: str | None = None
    parts: list[int] | None = None
    part_checksums: list[dict[str, str]] | None = None
    seq: int = 0  # sequence number of the record that committed it
    version_id: str = NULL_VERSION  # S3 version id; "null" in unversioned and suspended buckets

    def to_json(self) -> dict[str, Any]:
        d = {
            "bucket": self.bucket, "key": self.key, "size": self.size, "etag": self.etag,
            "mtime": self.mtime, "meta": self.meta.to_json(),
            "chunks": [[c.digest, c.size] for c in self.chunks],
        }
        if self.checksums:
            d["checksums"] = self.checksums
            d["checksum_type"] = self.checksum_type
        if self.parts is not None:
            d["parts"] = self.parts
        if self.part_checksums is not None:
            d["part_checksums"] = self.part_checksums
        if self.version_id != NULL_VERSION:
            d["version_id"] = self.version_id
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], seq: int = 0) -> "Manifest":
        return cls(
            bucket=d["bucket"], key=d["key"], size=int(d["size"]), etag=d["etag"],
            mtime=float(d["mtime"]), meta=ObjectMeta.from_json(d.get("meta") or {}),
            chunks=[ChunkRef(c[0], int(c[1])) for c in d["chunks"]],
            checksums=dict(d.get("checksums") or {}), checksum_type=d.get("checksum_type"),
            parts=d.get("parts"), part_checksums=d.get("part_checksums"), seq=seq,
            version_id=d.get("version_id") or NULL_VERSION,
        )

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)


@dataclass
class Bucket:
    name: str
    owner: str          # user_id of the creator
    created: float      # seconds since the epoch


@dataclass
class Upload:
    """An in-progress multipart upload."""

    upload_id: str
    bucket: str
    key: str
    owner: str
    initiated: float
    meta: ObjectMeta
    checksum_algorithm: str | None = None
    checksum_type: str | None = None


@dataclass
class Part:
    upload_id: str
    part_number: int
    etag: str           # hex MD5 of the part, no quotes
    size: int
    mtime: float
    chunks: list[ChunkRef]
    checksums: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"upload_id": self.upload_id, "part_number": self.part_number, "etag": self.etag,
                "size": self.size, "mtime": self.mtime,
                "chunks": [[c.digest, c.size] for c in self.chunks], "checksums": self.checksums}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Part":
        return cls(upload_id=d["upload_id"], part_number=int(d["part_number"]), etag=d["etag"],
                   size=int(d["size"]), mtime=float(d["mtime"]),
                   chunks=[ChunkRef(c[0], int(c[1])) for c in d["chunks"]],
                   checksums=dict(d.get("checksums") or {}))


@dataclass
class ListResult:
    """One page of a listing, already cut at max_keys.

    `next_marker` is the last key or common prefix returned when truncated (the
    S3 layer turns it into NextMarker or a continuation token).
    """

    contents: list[Manifest]
    common_prefixes: list[str]
    is_truncated: bool
    next_marker: str | None


@dataclass
class ObjectVersion:
    """One entry of a key's history on the primary: an object version or a
    delete marker (then `manifest` is None)."""

    bucket: str
    key: str
    version_id: str
    seq: int
    mtime: float
    manifest: Manifest | None

    @property
    def is_delete_marker(self) -> bool:
        return self.manifest is None


@dataclass
class VersionListResult:
    """One page of ListObjectVersions, cut at max_keys; `entries` are (version,
    is_latest) in key order, newest first per key."""

    entries: list[tuple[ObjectVersion, bool]]
    common_prefixes: list[str]
    is_truncated: bool
    next_key_marker: str | None
    next_version_id_marker: str | None


@dataclass
class BodyDigests:
    """What the ingest computed over an uploaded body."""

    size: int
    md5: bytes
    sha256: bytes | None
    checksums: dict[str, bytes]      # algorithm -> raw digest bytes
    chunks: list[ChunkRef]
    # with ingest_body(defer_durable=True): the future of the chunks' durability
    # on the primary, still running (the commit's `after`); None: durable already
    durable: "asyncio.Future | None" = None
