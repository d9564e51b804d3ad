"""Commit record types and their payloads (docs/format/records.md).

The log frames records (airlock.log.record); this module says what is inside.
A payload is UTF-8 JSON of one object.  Both the primary and the vault apply
these records in sequence-number order.
"""
from __future__ import annotations

import json
from typing import Any

from airlock.errors import FormatError

BUCKET_CREATE = 1     # {"bucket", "owner", "created"}
BUCKET_DELETE = 2     # {"bucket"}
OBJECT_PUT = 3        # Manifest.to_json()
OBJECT_DELETE = 4     # {"bucket", "key", "mtime"} [+ "marker" | "version_id", "was_latest", "restores"]
UPLOAD_CREATE = 5     # {"upload_id", "bucket", "key", "owner", "initiated", "meta", "checksum_algorithm", "checksum_type"}
UPLOAD_PART = 6       # Part.to_json()
UPLOAD_COMPLETE = 7   # {"upload_id", "manifest": Manifest.to_json()}
UPLOAD_ABORT = 8      # {"upload_id"}
ABORT = 9             # {"seqs": [int, ...]}: those earlier records never took effect
BUCKET_VERSIONING = 10  # {"bucket", "status": "Enabled" | "Suspended"}
OBJECT_TAGGING = 11   # {"bucket", "key", "version_id", "was_latest", "manifest"}: the version's new tag set
BUCKET_TAGGING = 12   # {"bucket", "tagging": str | None}

NAMES = {
    BUCKET_CREATE: "bucket-create", BUCKET_DELETE: "bucket-delete",
    OBJECT_PUT: "object-put", OBJECT_DELETE: "object-delete",
    UPLOAD_CREATE: "upload-create", UPLOAD_PART: "upload-part",
    UPLOAD_COMPLETE: "upload-complete", UPLOAD_ABORT: "upload-abort",
    ABORT: "abort", BUCKET_VERSIONING: "bucket-versioning", OBJECT_TAGGING: "object-tagging",
    BUCKET_TAGGING: "bucket-tagging",
}

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_payload(obj: dict[str, Any]) -> bytes:
    return _encoder.encode(obj).encode("utf-8")


def decode_payload(rtype: int, payload: bytes) -> dict[str, Any]:
    if rtype not in NAMES:
        raise FormatError(f"unknown record type {rtype}")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"record payload of type {NAMES[rtype]} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise FormatError(f"record payload of type {NAMES[rtype]} is not a JSON object")
    return obj


def chunks_referenced(rtype: int, body: dict[str, Any]) -> tuple[str, ...]:
    """The chunk ids (hex) a decoded record references, in manifest order:
    the vault's APPEND wants every one of them before it takes the record.
    An object-put's and an upload-complete's manifest, an upload-part's
    chunks, the version a removal of the latest version "restores", and the
    latest version an object-tagging record re-tags (to the vault, a put).
    KeyError / TypeError / ValueError / IndexError on a malformed body
    (the caller says which record it was)."""
    if rtype == OBJECT_PUT:
        manifest = body
    elif rtype == UPLOAD_COMPLETE:
        manifest = body["manifest"]
    elif rtype == UPLOAD_PART:
        return tuple(str(c[0]) for c in body.get("chunks") or ())
    elif rtype == OBJECT_DELETE and "version_id" in body and body["was_latest"]:
        manifest = body.get("restores")
        if manifest is None:
            return ()
    elif rtype == OBJECT_TAGGING and body["was_latest"]:
        manifest = body["manifest"]
    else:
        return ()
    if not isinstance(manifest, dict):
        raise TypeError(f"manifest is a {type(manifest).__name__}, not an object")
    return tuple(str(c[0]) for c in manifest.get("chunks") or ())
