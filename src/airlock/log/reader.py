"""Reading a log directory: segments in order, records in sequence order.

Format and recovery rules: docs/format/log.md.  Reading never modifies files;
a torn tail of the last segment (possibly an append in progress) ends the log
cleanly, anything else that breaks the format raises FormatError.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import NamedTuple

from airlock.log.record import (
    RECORD_MAGIC, SEGMENT_HEADER_SIZE, FormatError, Record, decode_records, decode_segment_header,
)

SEGMENT_NAME = re.compile(r"^seg-(\d{20})\.log$")


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record has `first_seq`."""
    return f"seg-{first_seq:020d}.log"


def list_segments(directory) -> list[tuple[int, str]]:
    """(first_seq from the name, path) of every segment file, in log order."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = SEGMENT_NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    out.sort()
    return out


class SegmentScan(NamedTuple):
    """Result of decoding one segment file."""
    path: str
    first_seq: int
    records: list[Record]
    end: int          # offset just past the last good record
    size: int         # file size
    status: str       # "ok" or "torn"


def scan_segment(path: str, first_seq: int, expected_seq: int | None, last: bool) -> SegmentScan:
    """Decode one segment, enforcing header validity and sequence continuity.

    `expected_seq` is the seq the first record must have (None: trust the name).
    A torn tail is allowed only if `last`; otherwise FormatError.
    """
    with open(path, "rb") as f:
        data = f.read()
    header_seq = decode_segment_header(data)
    if header_seq != first_seq:
        raise FormatError(f"{path}: header first_seq {header_seq} does not match the file name")
    if expected_seq is not None and first_seq != expected_seq:
        raise FormatError(f"{path}: segment starts at seq {first_seq}, expected {expected_seq} (gap or overlap)")
    records, end, status = decode_records(data, SEGMENT_HEADER_SIZE)
    seq = first_seq
    for rec in records:
        if rec.seq != seq:
            raise FormatError(f"{path}: record at offset {rec.offset} has seq {rec.seq}, expected {seq}")
        seq += 1
    if status != "ok" and not last:
        raise FormatError(f"{path}: damaged record at offset {end} in a segment that is not the last "
                          f"({len(data) - end} bytes unreadable)")
    return SegmentScan(path, first_seq, records, end, len(data), status)


def intact_records_after(path: str, end: int) -> list[Record]:
    """The first run of intact records found past the damaged spot `end` of
    a segment (records whose magic, length and checksum all hold), or [].
    A torn tail -- an append that a crash cut short -- leaves nothing
    intact after it; records after damage mean the damage is in the middle
    of the log (a disk fault), which is not cut (docs/format/log.md,
    "Recovery", step 4)."""
    with open(path, "rb") as f:
        data = f.read()
    at = end + 1
    while True:
        at = data.find(RECORD_MAGIC, at)
        if at < 0:
            return []
        records, _end, _status = decode_records(data, at)
        if records:
            return records
        at += 1


def read_log(directory, from_seq: int = 1) -> Iterator[Record]:
    """Yield every record with seq >= from_seq, in order, across all segments.

    Stops cleanly at a torn tail of the last segment.  Record offsets are
    relative to their segment file.
    """
    segments = list_segments(directory)
    expected = None
    for i, (first_seq, path) in enumerate(segments):
        last = i == len(segments) - 1
        if not last and segments[i + 1][0] <= from_seq:
            expected = segments[i + 1][0]   # whole segment is before from_seq; continuity checked by name
            continue
        if last and _torn_header(path):
            return                           # crash while creating it: holds no records (Recovery, step 3)
        scan = scan_segment(path, first_seq, expected, last)
        for rec in scan.records:
            if rec.seq >= from_seq:
                yield rec
        expected = first_seq + len(scan.records)


def _torn_header(path: str) -> bool:
    """True if the file is at most one header long and that header is invalid."""
    if os.path.getsize(path) > SEGMENT_HEADER_SIZE:
        return False
    with open(path, "rb") as f:
        try:
            decode_segment_header(f.read())
        except FormatError:
            return True
    return False


def last_sequence(directory) -> int:
    """Sequence number of the last intact record in the log, 0 if it has none."""
    segments = list_segments(directory)
    if not segments:
        return 0
    first_seq, path = segments[-1]
    if os.path.getsize(path) <= SEGMENT_HEADER_SIZE:
        return first_seq - 1
    scan = scan_segment(path, first_seq, None, True)
    return first_seq + len(scan.records) - 1
