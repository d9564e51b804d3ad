"""Incremental decoder for ``Content-Encoding: aws-chunked`` request bodies.

Grammar (all line ends CRLF; sizes are hex)::

    body      := chunk* last-chunk trailer* CRLF
    chunk     := hex-size [";chunk-signature=" sig] CRLF data CRLF
    last-chunk:= "0" [";chunk-signature=" sig] CRLF
    trailer   := name ":" value CRLF                  (trailer modes only)
               | "x-amz-trailer-signature:" sig CRLF  (signed-trailer mode, last)

Without trailers the final CRLF is the (empty) data terminator of the last
chunk: ``0;chunk-signature=...\\r\\n\\r\\n``.  botocore's unsigned-trailer body is
``<hex>\\r\\n<data>\\r\\n ... 0\\r\\nx-amz-checksum-crc32:<b64>\\r\\n\\r\\n``.
We are lenient about the very last CRLF (some clients leave it out) and about
bare LF line ends; nothing else is optional.

Signed chunks (STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]) chain from the
request's seed signature::

    AWS4-HMAC-SHA256-PAYLOAD \\n amz_date \\n scope \\n previous_sig \\n sha256("") \\n sha256(data)

and the trailer section, in signed-trailer mode::

    AWS4-HMAC-SHA256-TRAILER \\n amz_date \\n scope \\n previous_sig \\n sha256(trailers)

where ``trailers`` is each ``name:value\\n`` (canonical, LF).  The bytes as sent
(CRLF) are accepted too.

Memory stays bounded: chunk data is hashed as it arrives and handed straight
back to the caller; only a chunk-header / trailer line (at most
``MAX_LINE_BYTES``) is ever buffered.

CONTRACT: ``feed`` returns payload bytes *before* the signature of the chunk
that contains them has been checked (a 64 MiB chunk is only verifiable at its
end).  The caller may hash, chunk and stage those bytes, but must not make the
object visible until ``finish()`` has returned without raising; any exception
from ``feed`` or ``finish`` means the whole body is rejected.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from typing import Iterable, Mapping

from airlock.errors import (
    IncompleteBody,
    InvalidArgument,
    InvalidChunkSizeError,
    InvalidRequest,
    MalformedTrailerError,
    SignatureDoesNotMatch,
)
from airlock.s3.auth import AuthContext

#: Longest chunk-header or trailer line we buffer (bytes).  Real headers are
#: ~90 bytes ("<16 hex>;chunk-signature=<64 hex>"); 4 KiB leaves room for
#: extensions while keeping a hostile stream from growing our buffer.
MAX_LINE_BYTES = 4096
#: Upper bound on the whole trailer section (bytes): a few checksums and a signature.
MAX_TRAILER_BYTES = 16384
#: Hex digits in a chunk size (16 = 2**64-1; anything longer is garbage).
MAX_SIZE_HEX_DIGITS = 16

MODES = ("streaming-signed", "streaming-signed-trailer", "streaming-unsigned-trailer")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SIG = re.compile(rb"[0-9a-f]{64}")
_HEX = re.compile(rb"[0-9a-fA-F]{1,%d}" % MAX_SIZE_HEX_DIGITS)

_HEADER, _DATA, _DATA_CRLF, _FINAL_CRLF, _TRAILER, _DONE = range(6)


def decoded_content_length(headers: Mapping[str, str]) -> int | None:
    """``x-amz-decoded-content-length`` as an int, None if absent; InvalidArgument if malformed."""
    value = headers.get("x-amz-decoded-content-length")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise InvalidArgument("x-amz-decoded-content-length is not a valid length",
                              ArgumentName="x-amz-decoded-content-length", ArgumentValue=value)
    return int(value)


class AwsChunkedDecoder:
    """Streaming aws-chunked decoder: ``feed(bytes) -> [memoryview]``, then ``finish() -> trailers``.

    ``mode`` is one of ``MODES`` (``airlock.s3.auth.payload_mode``); ``ctx`` is
    required for the signed modes.  ``trailer_names`` are the lower-cased names
    announced in ``x-amz-trailer``; every one must arrive and no other may.
    ``decoded_content_length`` (from ``x-amz-decoded-content-length``), when
    given, must equal the decoded total.

    ``feed`` returns a list of memoryviews into the buffer it was given (no
    copies); consume them before mutating that buffer.
    """

    def __init__(self, mode: str, ctx: AuthContext | None, trailer_names: Iterable[str] = (),
                 *, decoded_content_length: int | None = None):
        if mode not in MODES:
            raise ValueError(f"not an aws-chunked payload mode: {mode!r}")
        self._signed = mode in ("streaming-signed", "streaming-signed-trailer")
        self._trailer_mode = mode.endswith("-trailer")
        self._signed_trailer = mode == "streaming-signed-trailer"
        if self._signed and ctx is None:
            raise ValueError("signed aws-chunked modes need the request's AuthContext")
        self._ctx = ctx
        self._expected_trailers = [n.strip().lower() for n in trailer_names]
        self._declared = decoded_content_length

        self._state = _HEADER
        self._line = bytearray()
        self._remaining = 0          # data bytes left in the current chunk
        self._crlf = 0               # bytes of a CRLF seen so far
        self._hasher = None
        self._chunk_sig = b""
        self._prev_sig = ctx.seed_signature if ctx is not None else ""
        self._total = 0
        self._trailers: dict[str, str] = {}
        self._trailer_canonical = bytearray()
        self._trailer_raw = bytearray()
        self._trailer_sig_ok = False

    @property
    def decoded_length(self) -> int:
        """Payload bytes decoded so far."""
        return self._total

    # ------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        mv = memoryview(buf)
        out: list[memoryview] = []
        pos, end = 0, len(buf)
        while pos < end:
            state = self._state
            if state == _DATA:
                n = min(self._remaining, end - pos)
                piece = mv[pos:pos + n]
                if self._hasher is not None:
                    self._hasher.update(piece)
                out.append(piece)
                pos += n
                self._total += n
                self._remaining -= n
                if self._remaining == 0:
                    self._end_of_chunk_data()
                    self._state, self._crlf = _DATA_CRLF, 0
            elif state == _HEADER or state == _TRAILER:
                # never look (or buffer) further than one maximal line ahead
                limit = min(end, pos + MAX_LINE_BYTES + 1 - len(self._line))
                nl = buf.find(b"\n", pos, limit)
                if nl < 0:
                    self._line += mv[pos:limit]
                    pos = limit
                    if len(self._line) > MAX_LINE_BYTES:
                        raise InvalidRequest("aws-chunked line too long")
                    continue
                self._line += mv[pos:nl + 1]
                pos = nl + 1
                if len(self._line) > MAX_LINE_BYTES:
                    raise InvalidRequest("aws-chunked line too long")
                line = bytes(self._line)
                self._line.clear()
                if state == _HEADER:
                    self._chunk_header(line)
                else:
                    self._trailer_line(line)
            elif state == _DATA_CRLF or state == _FINAL_CRLF:
                pos = self._eat_crlf(buf, pos, end)
                if self._crlf == 2:
                    self._state = _HEADER if state == _DATA_CRLF else _DONE
            else:  # _DONE: tolerate stray line ends, nothing else
                if buf[pos:].strip(b"\r\n"):
                    raise InvalidRequest("aws-chunked body continues after its final chunk")
                pos = end
        return out

    def finish(self) -> dict[str, str]:
        """End of stream: check completeness, lengths and trailers; return trailers (lower-case names)."""
        state = self._state
        if state == _TRAILER and self._line:
            # last trailer line without its line end
            line = bytes(self._line)
            self._line.clear()
            self._trailer_line(line + b"\r\n")
            state = self._state
        if state == _TRAILER:
            self._end_of_trailers()  # final empty line missing: lenient
        elif state == _FINAL_CRLF:
            if self._crlf == 1:
                raise IncompleteBody("aws-chunked body ended inside its final line end")
        elif state != _DONE:
            raise IncompleteBody("The request body terminated unexpectedly")
        self._state = _DONE
        if self._declared is not None and self._total != self._declared:
            raise IncompleteBody(
                f"aws-chunked payload is {self._total} bytes, x-amz-decoded-content-length says {self._declared}")
        return dict(self._trailers)

    # ------------------------------------------------------------------
    def _eat_crlf(self, buf, pos, end) -> int:
        while pos < end and self._crlf < 2:
            b = buf[pos]
            if self._crlf == 0 and b == 0x0A:      # bare LF
                self._crlf = 2
            elif b == (0x0D, 0x0A)[self._crlf]:
                self._crlf += 1
            else:
                raise InvalidRequest("aws-chunked chunk data is not followed by CRLF")
            pos += 1
        return pos

    def _chunk_header(self, line: bytes) -> None:
        line = line.rstrip(b"\r\n")
        size_part, _, ext = line.partition(b";")
        size_part = size_part.strip()
        if not _HEX.fullmatch(size_part):
            raise InvalidChunkSizeError(f"Invalid aws-chunked chunk size {size_part[:32]!r}")
        size = int(size_part, 16)
        if self._signed:
            name, _, sig = ext.partition(b"=")
            if name.strip() != b"chunk-signature" or not _SIG.fullmatch(sig.strip()):
                raise SignatureDoesNotMatch("aws-chunked chunk has no valid chunk-signature")
            self._chunk_sig = sig.strip()
            self._hasher = hashlib.sha256()
        if self._declared is not None and self._total + size > self._declared:
            raise InvalidRequest(
                "aws-chunked payload is longer than x-amz-decoded-content-length "
                f"({self._declared})")
        if size:
            self._state, self._remaining = _DATA, size
            return
        # last chunk
        if self._signed:
            self._verify_chunk(EMPTY_SHA256)
        if self._trailer_mode:
            self._state = _TRAILER
        else:
            self._state, self._crlf = _FINAL_CRLF, 0

    def _end_of_chunk_data(self) -> None:
        if self._hasher is not None:
            self._verify_chunk(self._hasher.hexdigest())

    def _verify_chunk(self, data_sha256: str) -> None:
        ctx = self._ctx
        sts = "\n".join(("AWS4-HMAC-SHA256-PAYLOAD", ctx.amz_date, ctx.scope, self._prev_sig,
                         EMPTY_SHA256, data_sha256))
        expected = hmac.new(ctx.signing_key, sts.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), self._chunk_sig):
            raise SignatureDoesNotMatch(StringToSign=sts, SignatureProvided=self._chunk_sig.decode())
        self._prev_sig = expected

    def _trailer_line(self, line: bytes) -> None:
        raw = line
        line = line.rstrip(b"\r\n")
        if not line:
            self._end_of_trailers()
            self._state = _DONE
            return
        if self._trailer_sig_ok:
            raise MalformedTrailerError("x-amz-trailer-signature must be the last trailer")
        if len(self._trailer_raw) + len(raw) > MAX_TRAILER_BYTES:
            raise MalformedTrailerError("aws-chunked trailer section too large")
        name_b, colon, value_b = line.partition(b":")
        if not colon:
            raise MalformedTrailerError()
        try:
            name, value = name_b.decode("ascii").strip().lower(), value_b.decode("ascii").strip()
        except UnicodeDecodeError:
            raise MalformedTrailerError() from None
        if name == "x-amz-trailer-signature":
            if not self._signed_trailer:
                raise MalformedTrailerError("x-amz-trailer-signature in an unsigned-trailer body")
            self._verify_trailer_signature(value)
            return
        if name not in self._expected_trailers or name in self._trailers:
            raise MalformedTrailerError(f"unexpected trailer {name!r}")
        self._trailers[name] = value
        self._trailer_canonical += f"{name}:{value}\n".encode()
        self._trailer_raw += raw

    def _verify_trailer_signature(self, provided: str) -> None:
        ctx = self._ctx
        first = None
        for body in (bytes(self._trailer_canonical), bytes(self._trailer_raw)):
            sts = "\n".join(("AWS4-HMAC-SHA256-TRAILER", ctx.amz_date, ctx.scope, self._prev_sig,
                             hashlib.sha256(body).hexdigest()))
            expected = hmac.new(ctx.signing_key, sts.encode(), hashlib.sha256).hexdigest()
            if hmac.compare_digest(expected.encode(), provided.encode("ascii", "replace")):
                self._trailer_sig_ok = True
                self._prev_sig = expected
                return
            first = first or sts
        raise SignatureDoesNotMatch(StringToSign=first, SignatureProvided=provided)

    def _end_of_trailers(self) -> None:
        missing = [n for n in self._expected_trailers if n not in self._trailers]
        if missing:
            raise MalformedTrailerError(f"missing trailer(s): {', '.join(missing)}")
        if self._signed_trailer and not self._trailer_sig_ok:
            raise MalformedTrailerError("missing x-amz-trailer-signature")
