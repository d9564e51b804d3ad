"""S3 XML: building responses and parsing request bodies.

Responses are built as strings (fast, exact control over element order, which
some clients care about).  Requests are parsed with ElementTree; the S3
namespace is optional on input, as S3 accepts both.  Python's expat refuses
entity-expansion bombs (expat >= 2.4), and request bodies are size-capped by
the handlers before they get here.
"""
from __future__ import annotations

import datetime as _dt
import functools
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape as _escape

from airlock.errors import MalformedXML

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_XML_BODY = 2 * 1024 * 1024   # DeleteObjects with 1000 long keys fits well below this


def esc(value) -> str:
    s = str(value)
    # characters XML 1.0 cannot carry are written as numeric references, as S3 does
    s = _escape(s, {'"': "&quot;"})
    if any(ord(ch) < 0x20 and ch not in "\t\n" for ch in s) or "\r" in s:
        s = "".join(f"&#x{ord(ch):X};" if (ord(ch) < 0x20 and ch not in "\t\n") else ch for ch in s)
    return s


def el(name: str, value) -> str:
    return f"<{name}>{esc(value)}</{name}>"


def doc(root: str, body: str) -> bytes:
    return f'{XML_DECL}<{root} xmlns="{S3_NS}">{body}</{root}>'.encode("utf-8")


def iso8601(ts: float) -> str:
    """S3's timestamp format in XML: 2026-11-25T10:32:16.123Z.  S3 writes whole
    seconds (.000Z); the milliseconds are kept on purpose: `aws s3 sync`
    uploads a file again when its mtime is later than the listed
    LastModified, and a file written in the second it was uploaded in
    would be, against a truncated time (tests/test_awscli.py)."""
    d = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def http_date(ts: float) -> str:
    """RFC 7231 date for Last-Modified: Wed, 25 Nov 2026 10:32:16 GMT."""
    return _http_date(int(ts))


@functools.lru_cache(maxsize=4096)
def _http_date(second: int) -> str:
    # one object's Last-Modified is formatted once, not per GET / HEAD
    d = _dt.datetime.fromtimestamp(second, tz=_dt.timezone.utc)
    return d.strftime("%a, %d %b %Y %H:%M:%S GMT")


def error_doc(code: str, message: str, request_id: str, extra: dict[str, str]) -> bytes:
    body = el("Code", code) + el("Message", message)
    for k, v in extra.items():
        body += el(k, v)
    body += el("RequestId", request_id) + el("HostId", request_id)
    return f"{XML_DECL}<Error>{body}</Error>".encode("utf-8")


def parse(body: bytes, root: str) -> ET.Element:
    """Parse a request body whose root element must be `root`."""
    if not body or len(body) > MAX_XML_BODY:
        raise MalformedXML()
    try:
        tree = ET.fromstring(body)
    except ET.ParseError:
        raise MalformedXML() from None
    if local(tree.tag) != root:
        raise MalformedXML()
    return tree


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def children(node: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in node if local(c.tag) == name]


def child_text(node: ET.Element, name: str, default: str | None = None) -> str | None:
    for c in node:
        if local(c.tag) == name:
            return c.text or ""
    return default
