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

NAMES = {
    BUCKET_CREATE: "bucket-create", BUCKET_DELETE: "bucket-delete",
    OBJECT_PUT: "object-put", OBJECT_DELETE: "object-delete",
    UPLOAD_CREATE: "upload-create", UPLOAD_PART: "upload-part",
    UPLOAD_COMPLETE: "upload-complete", UPLOAD_ABORT: "upload-abort",
    ABORT: "abort", BUCKET_VERSIONING: "bucket-versioning",
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
