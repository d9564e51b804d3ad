"""Appending to the log with group commit.

`LogWriter.append` returns only once its record is durable (written and
fdatasync'ed).  Concurrent appenders share a batch: one flusher task hands
everything queued to the writer's single I/O thread, which writes it and
syncs once; appends arriving meanwhile queue for the next batch.  Sequence
numbers are assigned in call order on the event loop and records reach the
file in that order.  When a batch is durable, `on_durable(records)` runs on
the event loop in seq order before any appender of the batch is resumed, so a
caller can apply records to its index in log order.

Format, rotation and recovery: docs/format/log.md.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from airlock.aio import retrieve_exception
from airlock.fsutil import fsync_dir
from airlock.log.reader import intact_records_after, list_segments, scan_segment, segment_name
from airlock.log.record import (
    MAX_PAYLOAD, SEGMENT_HEADER_SIZE, FormatError, decode_segment_header, encode_record,
    encode_segment_header,
)

SEGMENT_BYTES = 64 * 1024 * 1024   # bytes; rotate past this so recovery scans and future GC stay per-file cheap

DurableCallback = Callable[[list[tuple[int, int, bytes]]], None]


class LogWriteError(OSError):
    """Writing or syncing the log failed; the writer refuses further appends until reopened."""


class _Pending(NamedTuple):
    seq: int
    rtype: int
    payload: bytes
    data: bytes
    fut: asyncio.Future
    before: Callable[[], None] | None = None
    after: asyncio.Future | None = None       # written only once this is done (never raises)


class LogWriter:
    """Appends records to the segments in `directory`.  Use from one event loop.

    `last_seq` is the sequence number of the last durable record (0: empty log).
    `fsync_count` counts fsync/fdatasync calls (tests and metrics), `batch_count`
    the group-commit batches.
    """

    def __init__(self, directory, segment_bytes: int = SEGMENT_BYTES,
                 on_durable: DurableCallback | None = None):
        if segment_bytes <= SEGMENT_HEADER_SIZE:
            raise ValueError(f"segment_bytes must exceed the {SEGMENT_HEADER_SIZE}-byte segment header")
        self.directory = os.fspath(directory)
        self.segment_bytes = segment_bytes
        self.on_durable = on_durable
        self.last_seq = 0
        self.fsync_count = 0
        self.batch_count = 0
        self.truncated_bytes = 0          # torn-tail bytes cut by the last open()
        self._next_seq = 1
        self._fd: int | None = None
        self._seg_size = 0
        self._seg_has_records = False
        self._seg_path: str | None = None
        self._synced_size = 0             # bytes of the active segment known durable (last good sync)
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task | None = None
        self._failed: BaseException | None = None
        self._io: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ open / recovery
    def open(self) -> "LogWriter":
        """Recover the log (docs/format/log.md, "Recovery") and get ready to append."""
        if self._fd is not None:
            raise RuntimeError("LogWriter is already open")
        os.makedirs(self.directory, exist_ok=True)
        segments = list_segments(self.directory)
        if not segments:
            self._create_segment(1)
            self.last_seq = 0
        else:
            expected = None
            for first_seq, path in segments[:-1]:
                scan = scan_segment(path, first_seq, expected, last=False)
                expected = first_seq + len(scan.records)
            first_seq, path = segments[-1]
            self._repair_torn_header(path, first_seq)
            scan = scan_segment(path, first_seq, expected, last=True)
            if scan.status != "ok":
                after = intact_records_after(path, scan.end)
                if after:
                    raise FormatError(
                        f"{path}: damaged record at offset {scan.end}, with intact records after it "
                        f"(seq {after[0].seq} at offset {after[0].offset}): not a torn tail, so nothing "
                        f"is cut; the good copy is in the vault (airlock restore)")
            self.truncated_bytes = scan.size - scan.end
            if scan.status != "ok":
                with open(path, "r+b") as f:
                    f.truncate(scan.end)
                    f.flush()
                    os.fsync(f.fileno())
                    self.fsync_count += 1
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self._seg_size = scan.end
            self._seg_path, self._synced_size = path, scan.end
            self._seg_has_records = bool(scan.records)
            self.last_seq = first_seq + len(scan.records) - 1
        self._next_seq = self.last_seq + 1
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="airlock-log-writer")
        return self

    def _repair_torn_header(self, path: str, first_seq: int) -> None:
        # A header is fsynced before any record is written, so only a file of at
        # most one header can have a torn header; rewrite it from the file name.
        size = os.path.getsize(path)
        if size > SEGMENT_HEADER_SIZE:
            return
        if size == SEGMENT_HEADER_SIZE:
            with open(path, "rb") as f:
                try:
                    decode_segment_header(f.read())
                    return
                except FormatError:
                    pass
        with open(path, "wb") as f:
            f.write(encode_segment_header(first_seq))
            f.flush()
            os.fsync(f.fileno())
            self.fsync_count += 1

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped this writer (it refuses appends), or None."""
        return self._failed

    @property
    def durable_end(self) -> tuple[str | None, int]:
        """(active segment, its size at the last successful sync).  Bytes past
        it were written without a sync that succeeded: after a failure they
        may be in the page cache only, so a store that recovers in-process
        cuts them (VaultStore.reopen) rather than trusting what it reads."""
        return self._seg_path, self._synced_size

    @property
    def next_seq(self) -> int:
        """The sequence number the next append() call will take."""
        return self._next_seq

    # ------------------------------------------------------------------ appending
    async def append(self, rtype: int, payload) -> int:
        """Append one record; return its sequence number once it is durable."""
        (fut,) = self._enqueue([(rtype, payload)])
        # shield: a cancelled appender does not retract its record (its seq is taken).
        return await asyncio.shield(fut)

    async def append_many(self, records: list[tuple[int, bytes]],
                          before: Callable[[], None] | None = None) -> list[int]:
        """Append records (rtype, payload) with consecutive sequence numbers;
        return them once all are durable.  `before`, if given, runs on the
        I/O thread ahead of the write of the batch that holds them, so what
        it makes durable (the vault's overlay: the chunks these records
        reference) is durable before any of them -- in the same thread hop as
        the log's own write and sync.  If it raises, the batch fails as a
        failed write does (this writer refuses every later append), with
        its exception as the LogWriteError's cause."""
        futs = self._enqueue(records, before)
        if not futs:
            return []
        both = asyncio.gather(*futs)
        both.add_done_callback(retrieve_exception)     # a cancelled caller's batch may still fail
        # shield, as in append
        return list(await asyncio.shield(both))

    def enqueue(self, records: list[tuple[int, bytes]],
                after: asyncio.Future | None = None) -> list[asyncio.Future]:
        """Append records without waiting: they take their sequence numbers
        now, in order; the returned futures give each one's seq once it is
        durable, or the LogWriteError that stopped the writer (at once, if
        it had stopped already).  `after`, if given, is a future that must be
        done before these records are written (the durability of the chunks
        they reference, docs/architecture.md "Write path"); it must not
        raise, and the records after them in the log wait too."""
        if self._failed is not None:
            loop = asyncio.get_running_loop()
            futs = [loop.create_future() for _ in records]
            for f in futs:
                f.set_exception(self._failed)
            return futs
        return self._enqueue(records, after=after)

    def _enqueue(self, records, before: Callable[[], None] | None = None,
                 after: asyncio.Future | None = None) -> list[asyncio.Future]:
        """Number and queue records (all validated before any seq is taken);
        futures of their seqs, set when they are durable.  Queued together,
        they go into one batch."""
        self._check_usable()
        seq = self._next_seq
        encoded = []
        for rtype, payload in records:
            payload = bytes(payload)
            encoded.append((seq, rtype, payload, encode_record(seq, rtype, payload)))
            seq += 1
        self._next_seq = seq
        loop = asyncio.get_running_loop()
        futs = []
        for s, rtype, payload, data in encoded:
            fut = loop.create_future()
            first = not futs
            self._pending.append(_Pending(s, rtype, payload, data, fut, before if first else None,
                                          after if first else None))
            futs.append(fut)
        if futs and self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return futs

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                befores = [p.before for p in batch if p.before is not None]
                waits = [p.after for p in batch if p.after is not None]
                try:
                    if waits:
                        # what these records need durable first; records queued
                        # meanwhile go into the next batch (no one waits for ever)
                        if not all(w.done() for w in waits):
                            await asyncio.wait(waits)
                        if any(w.cancelled() or w.exception() is not None for w in waits):
                            # broken contract (or a cancelled wait at shutdown): their
                            # chunks may not be durable, so they are not written
                            raise RuntimeError("what these records needed first did not complete")
                    await loop.run_in_executor(self._io, self._write_batch, [(p.seq, p.data) for p in batch],
                                               befores)
                except BaseException as exc:  # noqa: BLE001 - includes cancellation of the flusher
                    self._fail(LogWriteError(f"log write failed at seq {batch[0].seq}: {exc!r}"), exc, batch)
                    return
                self.last_seq = batch[-1].seq
                self.batch_count += 1
                if self.on_durable is not None:
                    try:
                        self.on_durable([(p.seq, p.rtype, p.payload) for p in batch])
                    except BaseException as exc:  # noqa: BLE001
                        self._fail(LogWriteError(f"on_durable failed for durable seqs {batch[0].seq}.."
                                                 f"{batch[-1].seq}: {exc!r}"), exc, batch)
                        return
                for p in batch:
                    if not p.fut.done():
                        p.fut.set_result(p.seq)
        finally:
            self._flusher = None

    def _fail(self, err: LogWriteError, cause: BaseException, batch: list[_Pending]) -> None:
        err.__cause__ = cause
        self._failed = err
        for p in batch + self._pending:
            if not p.fut.done():
                p.fut.set_exception(err)
        self._pending = []

    def append_sync(self, rtype: int, payload) -> int:
        """Append one record and sync, blocking (for tools; not while async appends are in flight)."""
        self._check_usable()
        if self._pending or self._flusher is not None:
            raise RuntimeError("append_sync while asynchronous appends are in flight")
        seq = self._next_seq
        payload = bytes(payload)
        data = encode_record(seq, rtype, payload)
        self._next_seq = seq + 1
        try:
            self._write_batch([(seq, data)])
        except BaseException as exc:
            err = LogWriteError(f"log write failed at seq {seq}: {exc!r}")
            self._failed = err
            raise err from exc
        self.last_seq = seq
        self.batch_count += 1
        if self.on_durable is not None:
            self.on_durable([(seq, rtype, payload)])
        return seq

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise LogWriteError(f"log writer refuses appends after an earlier failure: {self._failed}")
        if self._fd is None:
            raise RuntimeError("LogWriter is not open")

    # ------------------------------------------------------------------ I/O thread
    def _write_batch(self, items: list[tuple[int, bytes]], befores=()) -> None:
        for before in befores:
            before()
        parts: list[bytes] = []
        for seq, data in items:
            if self._seg_has_records and self._seg_size + len(data) > self.segment_bytes:
                self._write_and_sync(parts)
                parts = []
                self._rotate(seq)
            parts.append(data)
            self._seg_size += len(data)
            self._seg_has_records = True
        self._write_and_sync(parts)

    def _write_and_sync(self, parts: list[bytes]) -> None:
        if not parts:
            return
        buf = memoryview(b"".join(parts))
        while buf:
            n = os.write(self._fd, buf)
            buf = buf[n:]
        os.fdatasync(self._fd)
        self.fsync_count += 1
        self._synced_size = self._seg_size

    def _rotate(self, first_seq: int) -> None:
        os.close(self._fd)
        self._fd = None
        self._create_segment(first_seq)

    def _create_segment(self, first_seq: int) -> None:
        path = os.path.join(self.directory, segment_name(first_seq))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            header = encode_segment_header(first_seq)
            os.write(fd, header)
            os.fsync(fd)
            self.fsync_count += 1
        except BaseException:
            os.close(fd)
            raise
        fsync_dir(self.directory)
        self.fsync_count += 1
        self._fd = fd
        self._seg_size = len(header)
        self._seg_has_records = False
        self._seg_path, self._synced_size = path, len(header)

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Close the active segment (sync).  Use aclose() if appends may be in flight."""
        if self._pending or self._flusher is not None:
            raise RuntimeError("LogWriter.close with appends in flight; use aclose()")
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def drain(self) -> None:
        """Wait until every append queued so far is durable or failed.  A
        cancelled wait leaves the writes going on."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def aclose(self) -> None:
        """Wait for in-flight appends to become durable (or fail), then close."""
        await self.drain()
        self.close()

    def __enter__(self) -> "LogWriter":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "LogWriter":
        return self.open()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    @property
    def max_payload(self) -> int:
        return MAX_PAYLOAD
