"""The controlled link's frame codec and payload codecs (protocol version 2).

Byte layout, kinds, error codes and a worked example: docs/format/link.md.
Pure Python on purpose: frames are few and large (a chunk, a batch of
records), so the per-frame cost here is noise next to TLS and fsync.

Rules every function here keeps:
- a header is validated completely (magic, version, flags, reserved, length
  bound, kind) *before* a single payload byte is read, so a hostile or torn
  length can never make the receiver allocate or wait for more than
  MAX_FRAME_PAYLOAD bytes;
- every decoder checks lengths exactly and raises FrameError on any
  inconsistency -- never IndexError, struct.error, UnicodeDecodeError;
- large payloads are never concatenated with their header: the checksum is
  computed incrementally and header and payload are written as separate
  buffers.
"""
from __future__ import annotations

import asyncio
import json
import struct
from typing import Iterable, NamedTuple, Sequence

from awscrt.checksums import crc64nvme

from airlock.errors import AirlockError, FormatError

__all__ = [
    "MAGIC", "VERSION", "HEADER_SIZE", "MAX_FRAME_PAYLOAD", "CHECKSUM_SIZE", "DIGEST_SIZE",
    "RECORD_ENTRY_HEADER_SIZE", "MAX_REQUEST_ID",
    "HELLO", "HELLO_OK", "PUT_CHUNK", "OK", "APPEND", "ACK", "GET_CHUNK", "CHUNK",
    "GET_MANIFEST", "MANIFEST", "LIST", "LIST_PAGE", "STATUS", "STATUS_OK",
    "GET_RECORDS", "RECORDS", "ERROR",
    "REQUEST_KINDS", "RESPONSE_KINDS", "KIND_NAMES", "RESPONSE_TO", "ERROR_CODES",
    "Frame", "FrameHeader", "LinkRecord", "FrameError", "ConnectionClosed",
    "encode_header", "encode_frame", "parse_header", "verify",
    "read_frame", "write_frame",
    "encode_records", "decode_records", "encode_json", "decode_json",
    "encode_chunk", "decode_chunk", "encode_digest", "decode_digest",
    "encode_u64", "decode_u64", "encode_get_records", "decode_get_records",
    "error_payload", "decode_error",
]

MAGIC = b"ALNK"
VERSION = 2                            # 2: frame checksum CRC-64/NVME (1 was BLAKE3, 5x the CPU per byte)
HEADER_SIZE = 32                       # bytes; see the frame table in docs/format/link.md
MAX_FRAME_PAYLOAD = 16 * 1024 * 1024   # bytes; largest chunk (4 MiB) plus a batch of records
CHECKSUM_SIZE = 8                      # bytes: CRC-64/NVME(header[0:24] || payload), little-endian
DIGEST_SIZE = 32                       # bytes; a chunk id is a full BLAKE3 digest
MAX_REQUEST_ID = (1 << 64) - 1
MAX_SEQ = (1 << 64) - 1

# kinds: requests (primary -> vault) are odd, responses even, ERROR answers anything
HELLO = 1
HELLO_OK = 2
PUT_CHUNK = 3
OK = 4
APPEND = 5
ACK = 6
GET_CHUNK = 7
CHUNK = 8
GET_MANIFEST = 9
MANIFEST = 10
LIST = 11
LIST_PAGE = 12
STATUS = 13
STATUS_OK = 14
GET_RECORDS = 15
RECORDS = 16
ERROR = 255

KIND_NAMES: dict[int, str] = {
    HELLO: "HELLO", HELLO_OK: "HELLO_OK", PUT_CHUNK: "PUT_CHUNK", OK: "OK",
    APPEND: "APPEND", ACK: "ACK", GET_CHUNK: "GET_CHUNK", CHUNK: "CHUNK",
    GET_MANIFEST: "GET_MANIFEST", MANIFEST: "MANIFEST", LIST: "LIST", LIST_PAGE: "LIST_PAGE",
    STATUS: "STATUS", STATUS_OK: "STATUS_OK", GET_RECORDS: "GET_RECORDS", RECORDS: "RECORDS",
    ERROR: "ERROR",
}
REQUEST_KINDS = frozenset(k for k in KIND_NAMES if k != ERROR and k % 2 == 1)
RESPONSE_KINDS = frozenset(k for k in KIND_NAMES if k == ERROR or k % 2 == 0)
# the successful answer to each request; ERROR may answer any of them
RESPONSE_TO: dict[int, int] = {k: k + 1 for k in REQUEST_KINDS}

ERROR_CODES = frozenset({
    "bad_frame", "unknown_kind", "not_found", "rewrite_refused", "sequence_gap",
    "missing_chunks", "digest_mismatch", "internal",
})

# header bytes 0..24, covered by the checksum:
# magic 4s, version B, kind B, flags H, request_id Q, length I, reserved I
_PREFIX = struct.Struct("<4sBBHQII")
_CHECKSUM_AT = _PREFIX.size            # 24
assert _CHECKSUM_AT + CHECKSUM_SIZE == HEADER_SIZE

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_GET_RECORDS = struct.Struct("<QI")
_RECORD_ENTRY = struct.Struct("<QBHI")  # seq, rtype, flags, length
RECORD_ENTRY_HEADER_SIZE = _RECORD_ENTRY.size  # 15 bytes before each record payload


class FrameError(FormatError):
    """A frame or payload that breaks docs/format/link.md.

    `code` is the link error code to send back in the ERROR frame
    ("bad_frame" or "unknown_kind"); `reason` names the exact check that failed
    (magic, version, flags, reserved, length, checksum, kind, payload) for logs
    and tests; `request_id` is set when the header was readable enough to know it.
    """

    def __init__(self, message: str, code: str = "bad_frame", reason: str = "payload",
                 request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.request_id = request_id


class ConnectionClosed(AirlockError):
    """The peer closed (or reset) the connection; `partial` bytes of an unfinished frame were seen."""

    def __init__(self, message: str = "link connection closed", partial: int = 0):
        super().__init__(message)
        self.partial = partial


class FrameHeader(NamedTuple):
    kind: int
    flags: int
    request_id: int
    length: int


class Frame(NamedTuple):
    kind: int
    request_id: int
    payload: bytes | memoryview
    flags: int = 0


class LinkRecord(NamedTuple):
    """One record as carried by APPEND and RECORDS; flags are 0 today but kept as sent."""
    seq: int
    rtype: int
    payload: bytes | memoryview
    flags: int = 0


# --------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------
COALESCE_BYTES = 64 * 1024      # frames up to this size are written in one piece (write_frame)
SMALL_PART_BYTES = 4096         # leading payload parts up to this size are joined to a large frame's header


def _buffers(payload) -> list[memoryview]:
    """Normalize a bytes-like payload, or a sequence of bytes-like parts, to flat byte views."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        parts = (payload,)
    else:
        parts = tuple(payload)
    out = []
    for p in parts:
        mv = memoryview(p)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if mv.nbytes:
            out.append(mv)
    return out


def _header(kind: int, request_id: int, parts: Sequence[memoryview]) -> bytes:
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown frame kind {kind}")
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request_id out of range: {request_id}")
    length = sum(p.nbytes for p in parts)
    if length > MAX_FRAME_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds MAX_FRAME_PAYLOAD ({MAX_FRAME_PAYLOAD})")
    prefix = _PREFIX.pack(MAGIC, VERSION, kind, 0, request_id, length, 0)
    return prefix + _U64.pack(_checksum(prefix, parts))


def _checksum(prefix, parts) -> int:
    crc = crc64nvme(prefix)
    for p in parts:
        crc = crc64nvme(p, crc)
    return crc


def encode_header(kind: int, request_id: int, payload=b"") -> bytes:
    """The 32-byte header for `payload` (bytes-like, or a sequence of bytes-like parts).

    The checksum is computed incrementally over header[0:24] and the payload
    parts; nothing is concatenated.  Caller mistakes raise ValueError.
    """
    return _header(kind, request_id, _buffers(payload))


def encode_frame(kind: int, request_id: int, payload=b"") -> bytes:
    """Header + payload as one bytes object (convenient for small frames and tests)."""
    parts = _buffers(payload)
    return b"".join([_header(kind, request_id, parts), *parts])


def parse_header(buf, allowed_kinds: Iterable[int] | None = None) -> FrameHeader:
    """Validate a 32-byte header and return (kind, flags, request_id, length).

    Checks, in order: size, magic, version, flags, reserved, length bound, kind
    (known, and in `allowed_kinds` if given).  The checksum needs the payload:
    see verify().
    """
    try:
        mv = memoryview(buf).cast("B")
    except TypeError as e:
        raise FrameError(f"frame header is not a byte buffer: {e}", reason="size") from None
    if mv.nbytes != HEADER_SIZE:
        raise FrameError(f"frame header is {mv.nbytes} bytes, expected {HEADER_SIZE}", reason="size")
    magic, version, kind, flags, request_id, length, reserved = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {magic!r} (expected {MAGIC!r})", reason="magic")
    if version != VERSION:
        raise FrameError(f"unsupported link protocol version {version} (this build speaks {VERSION})",
                         reason="version")
    if flags:
        raise FrameError(f"frame flags {flags:#06x} set; none are defined", reason="flags",
                         request_id=request_id)
    if reserved:
        raise FrameError(f"frame reserved field is {reserved:#x}, must be 0", reason="reserved",
                         request_id=request_id)
    if length > MAX_FRAME_PAYLOAD:
        raise FrameError(f"frame payload length {length} exceeds MAX_FRAME_PAYLOAD ({MAX_FRAME_PAYLOAD})",
                         reason="length", request_id=request_id)
    if kind not in KIND_NAMES:
        raise FrameError(f"unknown frame kind {kind}", code="unknown_kind", reason="kind",
                         request_id=request_id)
    if allowed_kinds is not None and kind not in allowed_kinds:
        raise FrameError(f"frame kind {KIND_NAMES[kind]} ({kind}) is not accepted here",
                         code="unknown_kind", reason="kind", request_id=request_id)
    return FrameHeader(kind, flags, request_id, length)


def verify(header, payload=b"") -> None:
    """Check the header's checksum against CRC-64/NVME(header[0:24] || payload); FrameError if it differs."""
    hv = memoryview(header).cast("B")
    if hv.nbytes != HEADER_SIZE:
        raise FrameError(f"frame header is {hv.nbytes} bytes, expected {HEADER_SIZE}", reason="size")
    if _U64.pack(_checksum(hv[:_CHECKSUM_AT], _buffers(payload))) != hv[_CHECKSUM_AT:]:
        request_id = _U64.unpack_from(hv, 8)[0]
        raise FrameError("frame checksum mismatch", reason="checksum", request_id=request_id)


async def read_frame(reader: asyncio.StreamReader, allowed_kinds: Iterable[int] | None = None) -> Frame:
    """Read one frame.

    The header is validated before the payload is read, so an oversized length
    is refused without reading or buffering the payload.  Raises FrameError
    for anything malformed, ConnectionClosed if the stream ends (cleanly or
    mid-frame) or the connection is reset.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        raise ConnectionClosed(
            "link connection closed" if not e.partial else
            f"link connection closed inside a frame header ({len(e.partial)} of {HEADER_SIZE} bytes)",
            partial=len(e.partial)) from None
    except ConnectionError as e:
        raise ConnectionClosed(f"link connection lost: {e}") from e
    h = parse_header(header, allowed_kinds)
    payload = b""
    if h.length:
        try:
            payload = await reader.readexactly(h.length)
        except asyncio.IncompleteReadError as e:
            raise ConnectionClosed(
                f"link connection closed inside a {KIND_NAMES[h.kind]} payload "
                f"({len(e.partial)} of {h.length} bytes)", partial=HEADER_SIZE + len(e.partial)) from None
        except ConnectionError as e:
            raise ConnectionClosed(f"link connection lost: {e}", partial=HEADER_SIZE) from e
    verify(header, payload)
    return Frame(h.kind, h.request_id, payload, h.flags)


async def write_frame(writer: asyncio.StreamWriter, kind: int, request_id: int, payload=b"") -> None:
    """Write one frame and wait for the transport to drain.

    `payload` is bytes-like or a sequence of bytes-like parts (e.g. [digest,
    chunk]); parts are handed to the transport as they are, not concatenated.
    All writes happen before the first await, so concurrent callers on one
    writer never interleave frames.
    """
    parts = _buffers(payload)
    header = _header(kind, request_id, parts)
    if sum(p.nbytes for p in parts) <= COALESCE_BYTES:
        # one write: one TLS record and one send() instead of one per part
        # (a 4 KiB PUT_CHUNK was three of each); the copy is small
        writer.write(b"".join((header, *parts)))
    else:
        # large parts (chunk data) are handed over as they are, without a
        # copy; small leading parts (a chunk's digest) ride with the header
        i = 0
        while i < len(parts) and parts[i].nbytes <= SMALL_PART_BYTES:
            i += 1
        writer.write(b"".join((header, *parts[:i])))
        for p in parts[i:]:
            writer.write(p)
    await writer.drain()


# --------------------------------------------------------------------------
# payloads
# --------------------------------------------------------------------------
def _view(buf, what: str) -> memoryview:
    try:
        mv = memoryview(buf)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    except TypeError as e:
        raise FrameError(f"{what} payload is not a byte buffer: {e}") from None


def encode_records(records: Iterable) -> bytes:
    """APPEND / RECORDS payload: count:u32, then seq:u64 rtype:u8 flags:u16 length:u32 payload per record.

    Each record is (seq, rtype, payload) or (seq, rtype, payload, flags), e.g. a LinkRecord.
    """
    out = [b""]
    count = 0
    for r in records:
        if len(r) == 3:
            seq, rtype, payload = r
            flags = 0
        else:
            seq, rtype, payload, flags = r
        if not 1 <= seq <= MAX_SEQ:
            raise ValueError(f"sequence number out of range: {seq}")
        if not 0 <= rtype <= 0xFF:
            raise ValueError(f"record type out of range: {rtype}")
        if not 0 <= flags <= 0xFFFF:
            raise ValueError(f"record flags out of range: {flags}")
        payload = bytes(payload)
        if len(payload) > MAX_FRAME_PAYLOAD:
            raise ValueError(f"record payload of {len(payload)} bytes exceeds MAX_FRAME_PAYLOAD")
        out.append(_RECORD_ENTRY.pack(seq, rtype, flags, len(payload)))
        out.append(payload)
        count += 1
    if count > 0xFFFFFFFF:
        raise ValueError(f"too many records for one frame: {count}")
    out[0] = _U32.pack(count)
    return b"".join(out)


def decode_records(buf) -> list[LinkRecord]:
    """Inverse of encode_records; the buffer must hold exactly `count` records and nothing more."""
    mv = _view(buf, "records")
    n = mv.nbytes
    if n < 4:
        raise FrameError(f"records payload of {n} bytes is shorter than its count field")
    count = _U32.unpack_from(mv, 0)[0]
    if count * RECORD_ENTRY_HEADER_SIZE > n - 4:
        raise FrameError(f"records payload claims {count} records but has only {n} bytes")
    out = []
    o = 4
    for i in range(count):
        if n - o < RECORD_ENTRY_HEADER_SIZE:
            raise FrameError(f"record {i} of {count}: header truncated at offset {o}")
        seq, rtype, flags, length = _RECORD_ENTRY.unpack_from(mv, o)
        o += RECORD_ENTRY_HEADER_SIZE
        if seq == 0:
            raise FrameError(f"record {i} of {count}: sequence number 0 (sequence numbers start at 1)")
        if length > n - o:
            raise FrameError(f"record {i} of {count}: payload length {length} runs past the end "
                             f"({n - o} bytes left)")
        out.append(LinkRecord(seq, rtype, bytes(mv[o:o + length]), flags))
        o += length
    if o != n:
        raise FrameError(f"records payload has {n - o} trailing bytes after {count} records")
    return out


def encode_json(obj: dict) -> bytes:
    """A UTF-8 JSON object (HELLO, GET_MANIFEST, LIST, STATUS_OK, ERROR, ... payloads)."""
    if not isinstance(obj, dict):
        raise ValueError(f"link JSON payloads are objects, not {type(obj).__name__}")
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def decode_json(buf) -> dict:
    """Parse a UTF-8 JSON object; FrameError("bad_frame") for anything else."""
    mv = _view(buf, "JSON")
    try:
        obj = json.loads(str(mv, "utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FrameError(f"payload is not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"payload is JSON {type(obj).__name__}, expected an object")
    return obj


def encode_digest(digest) -> bytes:
    """GET_CHUNK payload: the 32-byte chunk digest."""
    d = bytes(digest)
    if len(d) != DIGEST_SIZE:
        raise ValueError(f"chunk digest is {len(d)} bytes, expected {DIGEST_SIZE}")
    return d


def decode_digest(buf) -> bytes:
    mv = _view(buf, "digest")
    if mv.nbytes != DIGEST_SIZE:
        raise FrameError(f"digest payload is {mv.nbytes} bytes, expected {DIGEST_SIZE}")
    return bytes(mv)


def encode_chunk(digest, data) -> bytes:
    """PUT_CHUNK payload: digest || data, as one bytes object.

    To avoid the copy for big chunks, send `[digest, data]` to write_frame instead.
    """
    return encode_digest(digest) + bytes(data)


def decode_chunk(buf) -> tuple[bytes, memoryview]:
    """(digest, data) of a PUT_CHUNK payload; data is a view into buf, not a copy."""
    mv = _view(buf, "chunk")
    if mv.nbytes < DIGEST_SIZE:
        raise FrameError(f"chunk payload is {mv.nbytes} bytes, shorter than its {DIGEST_SIZE}-byte digest")
    return bytes(mv[:DIGEST_SIZE]), mv[DIGEST_SIZE:]


def encode_u64(value: int) -> bytes:
    """ACK payload: last_durable_seq."""
    if not 0 <= value <= MAX_SEQ:
        raise ValueError(f"u64 out of range: {value}")
    return _U64.pack(value)


def decode_u64(buf) -> int:
    mv = _view(buf, "u64")
    if mv.nbytes != _U64.size:
        raise FrameError(f"u64 payload is {mv.nbytes} bytes, expected {_U64.size}")
    return _U64.unpack_from(mv, 0)[0]


def encode_get_records(from_seq: int, max_records: int) -> bytes:
    """GET_RECORDS payload: from_seq:u64 max:u32."""
    if not 0 <= from_seq <= MAX_SEQ:
        raise ValueError(f"from_seq out of range: {from_seq}")
    if not 0 <= max_records <= 0xFFFFFFFF:
        raise ValueError(f"max out of range: {max_records}")
    return _GET_RECORDS.pack(from_seq, max_records)


def decode_get_records(buf) -> tuple[int, int]:
    mv = _view(buf, "GET_RECORDS")
    if mv.nbytes != _GET_RECORDS.size:
        raise FrameError(f"GET_RECORDS payload is {mv.nbytes} bytes, expected {_GET_RECORDS.size}")
    return _GET_RECORDS.unpack_from(mv, 0)


def error_payload(code: str, message: str, **extra) -> bytes:
    """ERROR payload: JSON {"code", "message", ...extra} (e.g. last_seq=, digests=)."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown link error code {code!r}")
    return encode_json({"code": code, "message": str(message), **extra})


def decode_error(buf) -> dict:
    """Parse an ERROR payload; `code` and `message` must be strings (an unknown code is kept as sent)."""
    obj = decode_json(buf)
    if not isinstance(obj.get("code"), str) or not isinstance(obj.get("message"), str):
        raise FrameError("ERROR payload lacks a string code and message")
    return obj
