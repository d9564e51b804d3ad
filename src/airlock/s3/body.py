"""Request bodies: decode the transfer (aws-chunked or plain), and check at the
end everything the client promised about them.

`BodyStream` is an async iterator of payload buffers for the engine's ingest.
`BodyStream.verifier()` is the callback the engine runs after the body ended
and before the commit: Content-Length vs bytes received, the signed
x-amz-content-sha256, Content-MD5, the flexible checksum (header or trailer)
and the aws-chunked signatures and trailers.  Any failure refuses the upload
and nothing becomes visible.
"""
from __future__ import annotations

import hashlib

from aiohttp import web

from airlock import errors as E
from airlock.primary.model import BodyDigests
from airlock.s3 import auth, checksums
from airlock.s3.aws_chunked import AwsChunkedDecoder, decoded_content_length

READ_BYTES = 1 << 20         # bytes asked of the socket per read
MAX_OBJECT_SIZE = 5 * 1024 ** 4   # S3's object size limit (5 TiB)


class BodyStream:
    def __init__(self, request: web.Request, actx: auth.AuthContext, checksum_headers: bool = True):
        """`checksum_headers` False: x-amz-checksum-<alg> headers are not
        about this body (CompleteMultipartUpload's name the whole object's
        checksum); a checksum in a trailer still is."""
        self.request = request
        self.headers = request.headers
        self.mode = auth.payload_mode(actx)
        self.received = 0
        self.trailers: dict[str, str] = {}
        self.checksum = checksums.requested_checksum(
            self.headers if checksum_headers else checksums.without_checksum_values(self.headers))
        md5 = self.headers.get("Content-MD5")
        self.content_md5 = checksums.parse_content_md5(md5) if md5 is not None else None
        self.expected_sha256 = actx.payload_hash if self.mode == "sha256" else None
        cl = self.headers.get("Content-Length")
        self.content_length = int(cl) if cl is not None and cl.isdigit() else None
        self.decoder = None
        if self.mode.startswith("streaming"):
            self.decoder = AwsChunkedDecoder(self.mode, actx, checksums.trailer_names(self.headers),
                                             decoded_content_length=decoded_content_length(self.headers))
        elif "aws-chunked" in (self.headers.get("Content-Encoding") or "") and \
                self.headers.get("x-amz-decoded-content-length") is not None:
            raise E.InvalidArgument("aws-chunked encoding requires a STREAMING-* x-amz-content-sha256.")
        size = decoded_content_length(self.headers) if self.decoder else self.content_length
        if size is not None and size > MAX_OBJECT_SIZE:
            raise E.EntityTooLarge(ProposedSize=str(size), MaxSizeAllowed=str(MAX_OBJECT_SIZE))
        if self.content_length is None and self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            if self.request.method == "PUT" and self.request.can_read_body:
                raise E.MissingContentLength()

    @property
    def want_sha256(self) -> bool:
        return self.expected_sha256 is not None

    @property
    def checksum_algorithms(self) -> tuple[str, ...]:
        return (self.checksum.algorithm,) if self.checksum.algorithm else ()

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        content = self.request.content
        decoder = self.decoder
        while True:
            data = await content.readany()
            if not data:
                break
            self.received += len(data)
            if decoder is None:
                yield data
            else:
                for piece in decoder.feed(data):
                    yield piece
        if self.content_length is not None and self.received != self.content_length:
            raise E.IncompleteBody()
        if decoder is not None:
            self.trailers = decoder.finish()

    def verify(self, d: BodyDigests) -> None:
        """Raise the S3 error for the first promise the body broke."""
        if self.expected_sha256 is not None and d.sha256.hex() != self.expected_sha256:
            raise E.XAmzContentSHA256Mismatch(ClientComputedContentSHA256=self.expected_sha256,
                                              S3ComputedContentSHA256=d.sha256.hex())
        if self.content_md5 is not None:
            checksums.check_content_md5(self.content_md5, d.md5)
        alg = self.checksum.algorithm
        if alg:
            expected = self.checksum.expected_b64
            if self.checksum.from_trailer:
                expected = self.trailers.get(checksums.header_name(alg))
                if expected is None:
                    raise E.MalformedTrailerError()
            checksums.verify_checksum(alg, expected, d.checksums[alg], checksums.header_name(alg))


async def read_small_body(request: web.Request, actx: auth.AuthContext, limit: int,
                          checksum_headers: bool = True) -> bytes:
    """Read a whole (XML) request body, decoding and verifying it like any
    other (`checksum_headers`: see BodyStream)."""
    stream = BodyStream(request, actx, checksum_headers)
    parts: list[bytes] = []
    total = 0
    async for piece in stream:
        total += len(piece)
        if total > limit:
            raise E.MalformedXML()
        parts.append(bytes(piece))
    body = b"".join(parts)
    digests = BodyDigests(size=len(body), md5=hashlib.md5(body).digest(),
                  sha256=hashlib.sha256(body).digest() if stream.want_sha256 else None,
                  checksums={}, chunks=[])
    if stream.checksum.algorithm:
        c = checksums.new_checksum(stream.checksum.algorithm)
        c.update(body)
        digests.checksums[stream.checksum.algorithm] = c.digest()
    stream.verify(digests)
    return body
