"""Log record framing (both codecs), segment headers, LogWriter group commit, recovery, reader."""
from __future__ import annotations

import asyncio
import importlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airlock.log import _record_py, record
from airlock.log.reader import last_sequence, list_segments, read_log, segment_name
from airlock.log.writer import LogWriteError, LogWriter

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    _record = importlib.import_module("airlock.log._record")
except ImportError:  # test_accelerated.py fails loudly about this
    _record = None

IMPLS = [pytest.param(_record_py, id="python"),
         pytest.param(_record, id="cython",
                      marks=pytest.mark.skipif(_record is None, reason="compiled codec not built"))]

with open(os.path.join(HERE, "known_answers", "record.json")) as _f:
    KNOWN = json.load(_f)


# ---------------------------------------------------------------- record codec
@pytest.mark.parametrize("impl", IMPLS)
def test_constants(impl):
    assert impl.HEADER_SIZE == 28
    assert impl.RECORD_MAGIC == b"ALRC"
    assert impl.RECORD_VERSION == 1
    assert impl.MAX_PAYLOAD == 64 * 1024 * 1024


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", KNOWN["records"], ids=lambda c: f"seq{c['seq']}")
def test_known_record_encodings(impl, case):
    payload = bytes.fromhex(case["payload"])
    enc = impl.encode_record(case["seq"], case["rtype"], payload, case["flags"])
    assert enc.hex() == case["encoded"]
    recs, end, status = impl.decode_records(enc)
    assert (end, status) == (len(enc), "ok")
    assert tuple(recs[0]) == (case["seq"], case["rtype"], case["flags"], payload, 0, len(enc))


def test_known_segment_header():
    assert record.encode_segment_header(1).hex() == KNOWN["segment_header_first_seq_1"]
    assert record.decode_segment_header(record.encode_segment_header(77)) == 77


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args", [(0, 1, b""), (2 ** 64, 1, b""), (1, 256, b""), (1, -1, b""),
                                  (1, 1, b"", 0x10000), (1, 1, b"", -1)])
def test_encode_refuses_out_of_range_fields(impl, args):
    with pytest.raises(ValueError):
        impl.encode_record(*args)


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_refuses_payload_over_max(impl):
    with pytest.raises(ValueError):
        impl.encode_record(1, 1, bytes(impl.MAX_PAYLOAD + 1))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_buffer_decodes_ok(impl):
    assert impl.decode_records(b"") == ([], 0, "ok")
    assert impl.decode_records(b"xyz", 3) == ([], 3, "ok")


@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_version_with_good_checksum_raises_format_error(impl):
    import blake3
    enc = bytearray(impl.encode_record(5, 1, b"future"))
    enc[4] = 2
    enc[20:28] = blake3.blake3(bytes(enc[:20]) + bytes(enc[28:])).digest(8)
    with pytest.raises(record.FormatError):
        impl.decode_records(bytes(enc))
    assert issubclass(record.FormatError, ValueError)


@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_version_with_bad_checksum_is_torn(impl):
    enc = bytearray(impl.encode_record(5, 1, b"future"))
    enc[4] = 2
    assert impl.decode_records(bytes(enc)) == ([], 0, "torn")


@pytest.mark.parametrize("impl", IMPLS)
def test_oversized_length_is_torn(impl):
    enc = bytearray(impl.encode_record(5, 1, b"x"))
    enc[8:12] = (impl.MAX_PAYLOAD + 1).to_bytes(4, "little")
    assert impl.decode_records(bytes(enc) + bytes(100)) == ([], 0, "torn")


records_st = st.lists(st.tuples(st.integers(1, 2 ** 64 - 1), st.integers(0, 255),
                                st.integers(0, 0xFFFF), st.binary(max_size=300)), max_size=8)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=100, deadline=None)
@given(recs=records_st, prefix=st.binary(max_size=40))
def test_decode_of_encode_roundtrips(impl, recs, prefix):
    buf = prefix + b"".join(impl.encode_record(s, t, p, f) for s, t, f, p in recs)
    out, end, status = impl.decode_records(buf, len(prefix))
    assert (end, status) == (len(buf), "ok")
    assert [(r.seq, r.rtype, r.flags, r.payload) for r in out] == [(s, t, f, p) for s, t, f, p in recs]
    offsets = [r.offset for r in out]
    assert offsets == sorted(offsets) and all(r.length == 28 + len(r.payload) for r in out)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=150, deadline=None)
@given(recs=records_st.filter(bool), cut=st.integers(0, 10 ** 6), garbage=st.binary(max_size=60),
       flip=st.integers(0, 10 ** 6))
def test_truncated_or_garbage_tails_are_torn_and_never_raise(impl, recs, cut, garbage, flip):
    encs = [impl.encode_record(s, t, p, f) for s, t, f, p in recs]
    whole = b"".join(encs)
    # truncation anywhere
    n = cut % (len(whole) + 1)
    out, end, status = impl.decode_records(whole[:n])
    good = 0
    acc = 0
    for e in encs:
        if acc + len(e) > n:
            break
        acc += len(e)
        good += 1
    assert (len(out), end) == (good, acc)
    assert status == ("ok" if n == acc else "torn")
    # a flipped bit makes that record (and everything after) a torn tail
    buf = bytearray(whole)
    pos = flip % len(buf)
    buf[pos] ^= 0x01
    out, end, status = impl.decode_records(bytes(buf))
    assert status == "torn" and end <= pos
    # garbage after good records
    out, end, status = impl.decode_records(whole + garbage)
    assert len(out) == len(recs) and end == len(whole)
    assert status == ("ok" if not garbage else "torn")


@pytest.mark.skipif(_record is None, reason="compiled codec not built")
@settings(max_examples=200, deadline=None)
@given(recs=records_st, tail=st.binary(max_size=80))
def test_twins_agree_on_encode_and_decode(recs, tail):
    a = b"".join(_record.encode_record(s, t, p, f) for s, t, f, p in recs)
    b = b"".join(_record_py.encode_record(s, t, p, f) for s, t, f, p in recs)
    assert a == b
    ra, ea, sa = _record.decode_records(a + tail)
    rb, eb, sb = _record_py.decode_records(a + tail)
    assert [tuple(r) for r in ra] == [tuple(r) for r in rb] and (ea, sa) == (eb, sb)


def test_segment_header_refuses_bad_magic_checksum_and_version():
    h = bytearray(record.encode_segment_header(3))
    with pytest.raises(record.FormatError):
        record.decode_segment_header(bytes(h[:20]))
    bad = bytearray(h)
    bad[0] ^= 1
    with pytest.raises(record.FormatError):
        record.decode_segment_header(bytes(bad))
    bad = bytearray(h)
    bad[17] ^= 1
    with pytest.raises(record.FormatError, match="checksum"):
        record.decode_segment_header(bytes(bad))
    import blake3
    bad = bytearray(h)
    bad[8] = 9
    bad[24:32] = blake3.blake3(bytes(bad[:24])).digest(8)
    with pytest.raises(record.FormatError, match="version 9"):
        record.decode_segment_header(bytes(bad))


# ---------------------------------------------------------------- LogWriter
def run(coro):
    return asyncio.run(coro)


def test_concurrent_appends_get_increasing_seqs_with_fewer_fsyncs(tmp_path):
    seen = []

    async def main():
        w = LogWriter(tmp_path, on_durable=lambda recs: seen.extend(recs)).open()
        syncs_before = w.fsync_count
        seqs = await asyncio.gather(*(w.append(7, b"p%d" % i) for i in range(200)))
        syncs = w.fsync_count - syncs_before
        await w.aclose()
        return seqs, syncs, w

    seqs, syncs, w = run(main())
    assert seqs == list(range(1, 201))
    assert syncs < 200
    assert w.batch_count < 200
    assert [s for s, _, _ in seen] == list(range(1, 201))
    assert [p for _, _, p in seen] == [b"p%d" % i for i in range(200)]
    assert [(r.seq, r.payload) for r in read_log(tmp_path)] == [(i + 1, b"p%d" % i) for i in range(200)]


def test_appends_arriving_during_a_sync_form_the_next_batch(tmp_path):
    batches = []

    async def main():
        w = LogWriter(tmp_path, on_durable=lambda recs: batches.append([s for s, _, _ in recs])).open()
        results = []

        async def appender(i):
            await asyncio.sleep(0.001 * (i % 10))
            results.append(await w.append(1, b"x"))

        await asyncio.gather(*(appender(i) for i in range(100)))
        await w.aclose()
        return results

    results = run(main())
    assert sorted(results) == list(range(1, 101))
    flat = [s for b in batches for s in b]
    assert flat == list(range(1, 101))
    assert len(batches) < 100


def test_on_durable_runs_before_appenders_resume(tmp_path):
    applied = []

    async def main():
        w = LogWriter(tmp_path, on_durable=lambda recs: applied.extend(s for s, _, _ in recs)).open()

        async def one(i):
            seq = await w.append(1, b"%d" % i)
            assert seq in applied
            return seq

        out = await asyncio.gather(*(one(i) for i in range(20)))
        await w.aclose()
        return out

    assert run(main()) == list(range(1, 21))


def test_records_enqueued_after_a_future_are_written_once_it_is_done_and_the_ones_behind_them_wait(tmp_path):
    async def main():
        w = LogWriter(tmp_path).open()
        first = w.enqueue([(1, b"before")])
        await asyncio.gather(*first)
        gate = asyncio.get_running_loop().create_future()
        held = w.enqueue([(1, b"held-a"), (1, b"held-b")], after=gate)
        behind = w.enqueue([(1, b"behind")])
        await asyncio.sleep(0.2)
        on_disk = [r.payload for r in read_log(tmp_path)]
        waiting = [f.done() for f in held + behind]
        gate.set_result(None)
        seqs = await asyncio.gather(*held, *behind)
        await w.aclose()
        return on_disk, waiting, seqs

    on_disk, waiting, seqs = run(main())
    assert on_disk == [b"before"] and waiting == [False, False, False]
    assert seqs == [2, 3, 4]
    assert [r.payload for r in read_log(tmp_path)] == [b"before", b"held-a", b"held-b", b"behind"]


def test_records_whose_future_failed_are_not_written_and_the_writer_stops(tmp_path):
    async def main():
        w = LogWriter(tmp_path).open()
        gate = asyncio.get_running_loop().create_future()
        held = w.enqueue([(1, b"never")], after=gate)
        gate.set_exception(OSError("the chunks could not be stored"))
        with pytest.raises(LogWriteError):
            await held[0]
        with pytest.raises(LogWriteError):
            await w.append(1, b"after")
        w.close()

    run(main())
    assert list(read_log(tmp_path)) == []


def test_reopen_after_torn_tail_truncates_and_continues(tmp_path):
    with LogWriter(tmp_path) as w:
        for i in range(5):
            w.append_sync(1, b"record %d" % i)
    (_, path), = list_segments(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:       # cut the last record in the middle
        f.truncate(size - 5)
    assert last_sequence(tmp_path) == 4
    assert [r.seq for r in read_log(tmp_path)] == [1, 2, 3, 4]

    async def main():
        w = LogWriter(tmp_path).open()
        assert w.last_seq == 4 and w.truncated_bytes == len(record.encode_record(5, 1, b"record 4")) - 5
        seq = await w.append(1, b"after")
        await w.aclose()
        return seq

    assert run(main()) == 5
    assert [(r.seq, r.payload) for r in read_log(tmp_path)][-2:] == [(4, b"record 3"), (5, b"after")]


def test_garbage_tail_is_cut_on_reopen(tmp_path):
    with LogWriter(tmp_path) as w:
        w.append_sync(1, b"a")
    (_, path), = list_segments(tmp_path)
    with open(path, "ab") as f:
        f.write(b"\x00" * 17)
    with LogWriter(tmp_path) as w:
        assert w.last_seq == 1 and w.truncated_bytes == 17
        assert w.append_sync(1, b"b") == 2
    assert [r.payload for r in read_log(tmp_path)] == [b"a", b"b"]


def test_damage_with_intact_records_after_it_is_not_cut(tmp_path):
    """A flipped byte in the middle of the last segment, with intact records
    after it, is a disk fault, not a torn tail: opening refuses (naming the
    segment and offset) and nothing is cut."""
    with LogWriter(tmp_path) as w:
        for i in range(20):
            w.append_sync(1, b"record %d" % i)
    (_, path), = list_segments(tmp_path)
    recs = list(read_log(tmp_path))
    before = open(path, "rb").read()
    at = recs[5].offset + 30                    # inside record 6's payload
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([before[at] ^ 0xFF]))
    with pytest.raises(record.FormatError, match=r"damaged record at offset \d+, with intact records after it"):
        LogWriter(tmp_path).open()
    assert os.path.getsize(path) == len(before)    # nothing cut
    # a reader still stops cleanly where the damage is
    assert [r.seq for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]


def test_torn_record_in_a_non_last_segment_is_corruption(tmp_path):
    with LogWriter(tmp_path, segment_bytes=200) as w:
        for i in range(10):
            w.append_sync(1, b"x" * 50)
    segs = list_segments(tmp_path)
    assert len(segs) > 2
    with open(segs[0][1], "r+b") as f:
        f.truncate(os.path.getsize(segs[0][1]) - 3)
    with pytest.raises(record.FormatError):
        LogWriter(tmp_path).open()
    with pytest.raises(record.FormatError):
        list(read_log(tmp_path))


def test_rotation_creates_segments_named_by_first_seq_and_reads_across_them(tmp_path):
    async def main():
        w = LogWriter(tmp_path, segment_bytes=300).open()
        seqs = await asyncio.gather(*(w.append(2, bytes([i]) * 60) for i in range(20)))
        await w.aclose()
        return seqs

    assert run(main()) == list(range(1, 21))
    segs = list_segments(tmp_path)
    assert len(segs) > 3
    assert all(os.path.basename(p) == segment_name(s) for s, p in segs)
    assert all(os.path.getsize(p) <= 300 for _, p in segs)
    assert [r.seq for r in read_log(tmp_path)] == list(range(1, 21))
    assert [r.seq for r in read_log(tmp_path, from_seq=13)] == list(range(13, 21))
    assert last_sequence(tmp_path) == 20
    with LogWriter(tmp_path, segment_bytes=300) as w:
        assert w.last_seq == 20
        assert w.append_sync(1, b"y") == 21
    assert [r.seq for r in read_log(tmp_path)] == list(range(1, 22))


def test_record_bigger_than_segment_gets_its_own_segment(tmp_path):
    with LogWriter(tmp_path, segment_bytes=100) as w:
        w.append_sync(1, b"a")
        w.append_sync(1, b"b" * 500)
        w.append_sync(1, b"c")
    assert [s for s, _ in list_segments(tmp_path)] == [1, 2, 3]
    assert [len(r.payload) for r in read_log(tmp_path)] == [1, 500, 1]


def test_torn_segment_header_of_last_segment_is_rewritten(tmp_path):
    with LogWriter(tmp_path) as w:
        w.append_sync(1, b"a")
    with open(os.path.join(tmp_path, segment_name(2)), "wb") as f:
        f.write(b"ALOG")          # crash while creating the next segment
    assert [r.payload for r in read_log(tmp_path)] == [b"a"]
    assert last_sequence(tmp_path) == 1
    with LogWriter(tmp_path) as w:
        assert w.last_seq == 1
        assert w.append_sync(1, b"b") == 2
    assert [r.payload for r in read_log(tmp_path)] == [b"a", b"b"]


def test_empty_log(tmp_path):
    assert last_sequence(tmp_path / "missing") == 0
    assert list(read_log(tmp_path)) == []
    with LogWriter(tmp_path) as w:
        assert w.last_seq == 0
    assert last_sequence(tmp_path) == 0
    assert list(read_log(tmp_path)) == []


def test_failed_sync_fails_the_batch_and_refuses_further_appends(tmp_path, monkeypatch):
    async def main():
        w = LogWriter(tmp_path).open()
        await w.append(1, b"good")

        def broken(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", broken)
        results = await asyncio.gather(*(w.append(1, b"x") for _ in range(10)), return_exceptions=True)
        monkeypatch.undo()
        with pytest.raises(LogWriteError):
            await w.append(1, b"refused")
        with pytest.raises(LogWriteError):
            w.append_sync(1, b"refused")
        await w.aclose()
        return results

    results = run(main())
    assert all(isinstance(r, LogWriteError) and isinstance(r, OSError) for r in results)
    assert last_sequence(tmp_path) >= 1


def test_append_many_runs_its_barrier_on_the_io_thread_before_the_records_are_written(tmp_path):
    import threading
    seen = {}

    async def main():
        w = LogWriter(tmp_path).open()
        await w.append(1, b"first")

        def before():
            seen["thread"] = threading.current_thread().name
            seen["held"] = [r.seq for r in read_log(tmp_path)]

        seqs = await w.append_many([(2, b"a"), (3, b"b"), (4, b"c")], before=before)
        await w.aclose()
        return seqs

    assert run(main()) == [2, 3, 4]
    assert seen["thread"].startswith("airlock-log-writer")
    assert seen["held"] == [1]          # none of the three was in the file when the barrier ran
    assert [(r.seq, r.rtype, r.payload) for r in read_log(tmp_path)] == [
        (1, 1, b"first"), (2, 2, b"a"), (3, 3, b"b"), (4, 4, b"c")]


def test_append_many_with_a_failing_barrier_writes_nothing_and_fails_the_writer(tmp_path):
    async def main():
        w = LogWriter(tmp_path).open()
        await w.append(1, b"good")

        def before():
            raise OSError(5, "overlay sync failed")

        # an append queued into the same batch fails with it
        same = asyncio.ensure_future(w.append(1, b"same batch"))
        many = asyncio.ensure_future(w.append_many([(1, b"x"), (1, b"y")], before=before))
        results = await asyncio.gather(same, many, return_exceptions=True)
        with pytest.raises(LogWriteError):
            await w.append(1, b"refused")
        await w.aclose()
        return results

    results = run(main())
    assert all(isinstance(r, LogWriteError) for r in results), results
    err = results[1]
    assert isinstance(err.__cause__, OSError) and "overlay sync failed" in str(err.__cause__)
    assert [r.payload for r in read_log(tmp_path)] == [b"good"]


def test_append_many_refuses_a_bad_record_without_taking_any_seq(tmp_path):
    async def main():
        w = LogWriter(tmp_path).open()
        with pytest.raises(ValueError):
            await w.append_many([(1, b"ok"), (1, bytes(record.MAX_PAYLOAD + 1))])
        assert await w.append_many([]) == []
        seqs = await w.append_many([(1, b"a"), (1, b"b")])
        await w.aclose()
        return seqs

    assert run(main()) == [1, 2]


def test_payload_over_max_is_refused_without_using_a_seq(tmp_path):
    async def main():
        w = LogWriter(tmp_path).open()
        with pytest.raises(ValueError):
            await w.append(1, bytes(record.MAX_PAYLOAD + 1))
        seq = await w.append(1, b"ok")
        await w.aclose()
        return seq

    assert run(main()) == 1


def test_seq_gap_between_segments_is_corruption(tmp_path):
    with LogWriter(tmp_path, segment_bytes=100) as w:
        for _ in range(4):
            w.append_sync(1, b"z" * 60)
    segs = list_segments(tmp_path)
    os.remove(segs[1][1])
    with pytest.raises(record.FormatError):
        LogWriter(tmp_path).open()
    with pytest.raises(record.FormatError):
        list(read_log(tmp_path))


def test_the_chunks_a_record_references_are_the_same_for_gc_and_the_vault():
    """`payload.chunks_referenced` (what `airlock gc` keeps for a log tail) and
    the vault's `classify` (what its APPEND wants present) agree on every
    record type; a malformed manifest is a FormatError for the vault."""
    from airlock.errors import FormatError
    from airlock.log import payload as P
    from airlock.vault.catalog import classify

    def manifest(key, *digests):
        return {"bucket": "b", "key": key, "size": 1, "etag": "e", "mtime": 1.0,
                "chunks": [[d, 1] for d in digests]}

    cases = [
        (P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0}, ()),
        (P.OBJECT_PUT, manifest("k", "aa", "bb"), ("aa", "bb")),
        (P.OBJECT_DELETE, {"bucket": "b", "key": "k", "mtime": 1.0, "marker": "v1"}, ()),
        (P.OBJECT_DELETE, {"bucket": "b", "key": "k", "mtime": 1.0, "version_id": "v2",
                           "was_latest": True, "restores": manifest("k", "cc")}, ("cc",)),
        (P.OBJECT_DELETE, {"bucket": "b", "key": "k", "mtime": 1.0, "version_id": "v2",
                           "was_latest": True, "restores": None}, ()),
        (P.OBJECT_DELETE, {"bucket": "b", "key": "k", "mtime": 1.0, "version_id": "v1",
                           "was_latest": False}, ()),
        (P.UPLOAD_PART, {"upload_id": "u", "number": 1, "chunks": [["dd", 5], ["ee", 5]]}, ("dd", "ee")),
        (P.UPLOAD_COMPLETE, {"upload_id": "u", "manifest": manifest("k", "dd", "ee")}, ("dd", "ee")),
        (P.ABORT, {"seqs": [1]}, ()),
    ]
    for seq, (rtype, body, want) in enumerate(cases, start=2):
        assert P.chunks_referenced(rtype, body) == want, (rtype, body)
        assert classify(seq, rtype, P.encode_payload(body)).chunks == want, (rtype, body)
    with pytest.raises(FormatError):
        classify(20, P.UPLOAD_COMPLETE, P.encode_payload({"upload_id": "u", "manifest": ["not", "an", "object"]}))
