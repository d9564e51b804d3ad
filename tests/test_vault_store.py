"""VaultStore: append path, read chain, overlays, versions, recovery
(docs/format/vault.md).  Real files, real fsync."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import blake3
import pytest

from airlock.errors import IntegrityError, VaultRejected
from airlock.log import payload as P
from airlock.vault.store import RECORD_ABORT, WRITEBACK_BYTES, VaultStore

SRC = str(Path(__file__).resolve().parent.parent / "src")


# ---------------------------------------------------------------------- helpers (also used by test_compaction)
class Feed:
    """Builds primary-like records with consecutive seqs and puts their chunks."""

    def __init__(self, store: VaultStore, start: int = 1):
        self.store = store
        self.seq = start

    def _rec(self, rtype: int, body: dict) -> tuple[int, int, bytes]:
        r = (self.seq, rtype, P.encode_payload(body))
        self.seq += 1
        return r

    def bucket(self, name: str) -> tuple[int, int, bytes]:
        return self._rec(P.BUCKET_CREATE, {"bucket": name, "owner": "alice", "created": 1795600000.0 + self.seq})

    def bucket_delete(self, name: str):
        return self._rec(P.BUCKET_DELETE, {"bucket": name})

    def put(self, bucket: str, key: str, *parts: bytes, send_chunks: bool = True):
        chunks = []
        for part in parts:
            d = blake3.blake3(part).hexdigest()
            if send_chunks:
                self.store.put_chunk(d, part)
            chunks.append([d, len(part)])
        m = {"bucket": bucket, "key": key, "size": sum(len(p) for p in parts), "etag": f"e{self.seq}",
             "mtime": 1795600000.0 + self.seq, "meta": {"headers": {}, "user": {}}, "chunks": chunks}
        return self._rec(P.OBJECT_PUT, m)

    def delete(self, bucket: str, key: str):
        return self._rec(P.OBJECT_DELETE, {"bucket": bucket, "key": key, "mtime": 1795600000.0 + self.seq})

    def abort(self, *seqs: int):
        return self._rec(RECORD_ABORT, {"seqs": list(seqs)})

    def upload(self, bucket: str, key: str, upload_id: str, *parts: bytes):
        recs = [self._rec(P.UPLOAD_CREATE, {"upload_id": upload_id, "bucket": bucket, "key": key,
                                            "owner": "alice", "initiated": 1.0, "meta": {},
                                            "checksum_algorithm": None, "checksum_type": None})]
        chunks = []
        for n, part in enumerate(parts, 1):
            d = blake3.blake3(part).hexdigest()
            self.store.put_chunk(d, part)
            chunks.append([d, len(part)])
            recs.append(self._rec(P.UPLOAD_PART, {"upload_id": upload_id, "part_number": n, "etag": "p",
                                                  "size": len(part), "mtime": 1.0, "chunks": [[d, len(part)]],
                                                  "checksums": {}}))
        m = {"bucket": bucket, "key": key, "size": sum(map(len, parts)), "etag": "mp-2", "mtime": 2.0,
             "meta": {}, "chunks": chunks}
        recs.append(self._rec(P.UPLOAD_COMPLETE, {"upload_id": upload_id, "manifest": m}))
        return recs

    def send(self, *records) -> int:
        return asyncio.run(self.store.append(list(records)))


def body(seed: int, n: int = 3000) -> bytes:
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


def snapshot(store: VaultStore) -> dict:
    """Every answer the vault gives, with chunk bytes, for comparison."""
    out = {"last_seq": store.last_seq, "buckets": store.buckets(), "objects": {}, "versions": {}, "chunks": {}}
    keys = set()
    for b in out["buckets"]:
        objs, truncated = store.list_objects(b["bucket"], limit=100000)
        assert not truncated
        out["objects"][b["bucket"]] = objs
        keys.update((b["bucket"], m["key"]) for m in objs)
    for seq, rtype, payload in store.records(1, 10**6):
        if rtype in (P.OBJECT_PUT, P.OBJECT_DELETE):
            d = P.decode_payload(rtype, payload)
            keys.add((d["bucket"], d["key"]))
    for b, k in sorted(keys):
        vs = store.versions(b, k)
        out["versions"][f"{b}/{k}"] = vs
        out["objects"].setdefault(f"current:{b}/{k}", store.manifest(b, k))
        for v in vs:
            assert store.manifest(b, k, v["seq"]) == v["manifest"]
            for d, _n in (v["manifest"] or {}).get("chunks", ()):
                out["chunks"][d] = blake3.blake3(store.read_chunk(d)).hexdigest()
    return out


def reopen(store: VaultStore, **kw) -> VaultStore:
    store.close_sync()
    return VaultStore(store.data_dir, **kw).open()


def run_script(code: str, data_dir, *args, expect: int | None = 0, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(data_dir), *map(str, args)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert p.returncode == expect, p.stderr
    return p


@pytest.fixture
def store(tmp_path):
    s = VaultStore(tmp_path / "vault").open()
    yield s
    s.close_sync()


# ---------------------------------------------------------------------- reading back
def test_appended_records_read_back_chunks_manifests_versions_listing_and_buckets(store):
    f = Feed(store)
    assert f.send(f.bucket("photos"), f.bucket("docs")) == 2
    f.send(f.put("photos", "b.jpg", body(1), body(2)), f.put("photos", "a.jpg", body(3)),
           f.put("docs", "x", b""), f.put("photos", "c/d", body(4)))
    assert store.last_seq == 6
    assert [b["bucket"] for b in store.buckets()] == ["docs", "photos"]
    m = store.manifest("photos", "b.jpg")
    assert m["size"] == 6000
    assert b"".join(store.read_chunk(d) for d, _n in m["chunks"]) == body(1) + body(2)
    objs, truncated = store.list_objects("photos")
    assert [o["key"] for o in objs] == ["a.jpg", "b.jpg", "c/d"] and not truncated
    objs, truncated = store.list_objects("photos", limit=2)
    assert [o["key"] for o in objs] == ["a.jpg", "b.jpg"] and truncated
    assert [o["key"] for o in store.list_objects("photos", after="a.jpg")[0]] == ["b.jpg", "c/d"]
    assert [o["key"] for o in store.list_objects("photos", prefix="c/")[0]] == ["c/d"]
    assert [v["seq"] for v in store.versions("photos", "b.jpg")] == [3]
    assert store.records(2, 3) == [(s, r, p) for s, r, p in store.records(1, 100)[1:4]]
    st = store.status()
    assert st["last_seq"] == 6 and st["overlays"][-1]["records"] == 6 and st["overlays"][-1]["chunks"] == 5
    with pytest.raises(KeyError):
        store.read_chunk(blake3.blake3(b"never stored").hexdigest())


def test_buckets_carry_their_versioning_and_tags_as_of_each_point_through_a_merge(store):
    f = Feed(store)
    f.send(f.bucket("b"), f._rec(P.BUCKET_VERSIONING, {"bucket": "b", "status": "Enabled"}),
           f._rec(P.BUCKET_TAGGING, {"bucket": "b", "tagging": "env=prod"}), f.bucket("c"))
    store.compact(keep=0)                    # these records now answer from the base catalog
    assert store.status()["overlays"] == [] or not store.status()["overlays"][0]["records"]
    store.snapshot_create(name="one")
    changes = [f._rec(P.BUCKET_VERSIONING, {"bucket": "b", "status": "Suspended"}),
               f._rec(P.BUCKET_TAGGING, {"bucket": "b", "tagging": None}),
               f._rec(P.BUCKET_TAGGING, {"bucket": "c", "tagging": "x=1"})]
    f.send(*changes, f.abort(changes[-1][0]))       # c's tag change never took effect
    store.snapshot_create(name="two")
    f.send(f.bucket_delete("b"), f.bucket("b"))       # a new bucket of that name starts unconfigured

    def config(buckets):
        return {b["bucket"]: (b["versioning"], b["tagging"]) for b in buckets}
    assert config(store.snapshot_buckets("one")) == {"b": ("Enabled", "env=prod"), "c": ("", None)}
    assert config(store.snapshot_buckets("two")) == {"b": ("Suspended", None), "c": ("", None)}
    assert config(store.buckets()) == {"b": ("", None), "c": ("", None)}
    store.compact(keep=0)
    assert config(store.snapshot_buckets("two")) == {"b": ("Suspended", None), "c": ("", None)}
    assert config(reopen(store).buckets()) == {"b": ("", None), "c": ("", None)}


def test_overwrite_keeps_both_versions_and_delete_leaves_a_marker(store):
    f = Feed(store)
    f.send(f.bucket("b"))
    s1 = f.send(f.put("b", "k", body(1)))
    s2 = f.send(f.put("b", "k", body(2)))
    assert store.manifest("b", "k")["chunks"][0][0] == blake3.blake3(body(2)).hexdigest()
    assert store.manifest("b", "k", s1)["etag"] == f"e{s1}"
    s3 = f.send(f.delete("b", "k"))
    assert store.manifest("b", "k") is None
    assert store.list_objects("b") == ([], False)
    vs = store.versions("b", "k")
    assert [(v["seq"], v["kind"]) for v in vs] == [(s1, "put"), (s2, "put"), (s3, "delete")]
    assert vs[2]["manifest"] is None
    assert store.read_chunk(vs[0]["manifest"]["chunks"][0][0]) == body(1)   # old data still readable


def test_abort_record_voids_earlier_records_in_every_answer(store):
    f = Feed(store)
    f.send(f.bucket("b"), f.bucket("gone"))
    s1 = f.send(f.put("b", "k", body(1)))
    p2, p3 = f.put("b", "k", body(2)), f.put("b", "only-aborted", body(3))
    f.send(p2, p3)
    s2 = p2[0]
    f.send(f.abort(s2, p3[0], 2))           # voids the overwrite, the new key and bucket "gone"
    assert store.manifest("b", "k")["etag"] == f"e{s1}"
    assert store.manifest("b", "k", s2) is None
    assert [v["seq"] for v in store.versions("b", "k")] == [s1]
    assert store.versions("b", "only-aborted") == []
    assert [o["key"] for o in store.list_objects("b")[0]] == ["k"]
    assert [b["bucket"] for b in store.buckets()] == ["b"]
    before = snapshot(store)
    store.compact()                           # voids survive the merge into the base
    assert snapshot(store) == before
    f.send(f.abort(s1))                       # voiding a record already in the base
    assert store.manifest("b", "k") is None and store.versions("b", "k") == []
    after = snapshot(store)
    store.compact()
    assert snapshot(store) == after
    assert snapshot(reopen(store)) == after


def test_upload_records_are_history_and_complete_puts_the_object(store):
    f = Feed(store)
    f.send(f.bucket("b"))
    recs = f.upload("b", "big", "u1", body(5), body(6))
    f.send(*recs)
    m = store.manifest("b", "big")
    assert m["etag"] == "mp-2"
    assert [v["seq"] for v in store.versions("b", "big")] == [recs[-1][0]]
    assert [r[1] for r in store.records(2, 10)] == [P.UPLOAD_CREATE, P.UPLOAD_PART, P.UPLOAD_PART,
                                                     P.UPLOAD_COMPLETE]
    assert b"".join(store.read_chunk(d) for d, _ in m["chunks"]) == body(5) + body(6)


# ---------------------------------------------------------------------- refusals
def test_rewrite_of_a_held_seq_is_refused_and_nothing_changes(store):
    f = Feed(store)
    first = [f.bucket("b"), f.put("b", "k", body(1))]
    f.send(*first)
    before = snapshot(store)
    forged = (2, P.OBJECT_PUT, first[1][2].replace(b'"e2"', b'"ff"'))
    with pytest.raises(VaultRejected) as ei:
        asyncio.run(store.append([forged]))
    assert ei.value.code == "rewrite_refused"
    store.compact()
    with pytest.raises(VaultRejected) as ei:             # also once the record lives in the base
        asyncio.run(store.append([forged]))
    assert ei.value.code == "rewrite_refused"
    assert snapshot(store) == before
    assert store.records(2, 1) == [first[1]]


def test_identical_retransmission_is_accepted_and_skipped(store):
    f = Feed(store)
    recs = [f.bucket("b"), f.put("b", "k", body(1))]
    f.send(*recs)
    nxt = f.put("b", "k2", body(2))
    assert asyncio.run(store.append(recs + [nxt])) == 3
    assert asyncio.run(store.append(recs)) == 3
    assert [r[0] for r in store.records(1, 10)] == [1, 2, 3]


def test_an_early_writeback_failing_during_an_appends_sync_refuses_that_append(store, monkeypatch):
    """An APPEND's overlay sync and an early writeback running at the same
    time sync one open file, and Linux reports a writeback error to one of
    them only: the APPEND waits for the writeback in flight before it trusts
    its own sync, and refuses when that writeback failed.  Recovery in place
    then takes appends again."""
    import concurrent.futures
    import threading
    feed = Feed(store)
    assert feed.send(feed.bucket("b")) == 1
    synced = threading.Event()

    def failing_writeback():          # still running when the APPEND's own sync returns
        synced.wait(5)
        time.sleep(0.2)
        with store._lock:
            store._stop(OSError(5, "Input/output error"), "vault overlay writeback")

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        store._writeback_job = pool.submit(failing_writeback)
        own_sync = store._sync_newest
        monkeypatch.setattr(store, "_sync_newest", lambda: (own_sync(), synced.set()))
        rec = feed.put("b", "k", body(1))
        with pytest.raises(VaultRejected) as info:
            feed.send(rec)
        assert info.value.code == "internal" and "recovering" in str(info.value)
        assert store.last_seq == 1 and store.manifest("b", "k") is None
    finally:
        pool.shutdown(wait=True)
    monkeypatch.undo()
    assert asyncio.run(store.reopen()) is True
    store.put_chunk(blake3.blake3(body(1)).hexdigest(), body(1))
    assert feed.send(rec) == 2
    assert store.manifest("b", "k")["size"] == len(body(1))


def test_sequence_gap_is_refused(store):
    f = Feed(store)
    f.send(f.bucket("b"))
    f.seq += 1
    with pytest.raises(VaultRejected) as ei:
        f.send(f.put("b", "k", body(1)))
    assert ei.value.code == "sequence_gap" and ei.value.last_seq == 1
    assert store.last_seq == 1 and store.records(1, 10) == store.records(1, 1)


def test_missing_chunks_are_refused_with_their_digests(store):
    f = Feed(store)
    f.send(f.bucket("b"))
    store.put_chunk(blake3.blake3(body(1)).hexdigest(), body(1))
    rec = f.put("b", "k", body(1), body(2), body(3), send_chunks=False)
    want = [blake3.blake3(body(i)).hexdigest() for i in (2, 3)]
    assert store.missing_chunks([rec]) == want
    with pytest.raises(VaultRejected) as ei:
        asyncio.run(store.append([rec]))
    assert ei.value.code == "missing_chunks" and ei.value.digests == want
    assert store.last_seq == 1 and store.manifest("b", "k") is None
    for i in (2, 3):
        store.put_chunk(blake3.blake3(body(i)).hexdigest(), body(i))
    assert asyncio.run(store.append([rec])) == 2


def test_unparseable_record_is_refused_before_it_is_logged(store):
    with pytest.raises(VaultRejected) as ei:
        asyncio.run(store.append([(1, 77, b"{}")]))
    assert ei.value.code == "bad_record" and store.last_seq == 0 and store.records(1, 5) == []


# ---------------------------------------------------------------------- overlays
def test_overlays_seal_by_size(tmp_path):
    s = VaultStore(tmp_path / "v", overlay_max_bytes=8000).open()
    f = Feed(s)
    f.send(f.bucket("b"))
    for i in range(10):
        f.send(f.put("b", f"k{i}", body(i)))
    ovs = s.status()["overlays"]
    assert len(ovs) >= 4
    assert all(o["sealed"] for o in ovs[:-1]) and not ovs[-1]["sealed"]
    assert [o["name"] for o in ovs] == sorted(o["name"] for o in ovs)
    assert all(o["bytes"] < 8000 + 3200 for o in ovs)
    assert len(s.list_objects("b")[0]) == 10
    s.close_sync()


def test_overlays_seal_by_age(tmp_path):
    s = VaultStore(tmp_path / "v", overlay_max_age_s=0.2).open()
    f = Feed(s)
    f.send(f.bucket("b"))
    time.sleep(0.3)
    f.send(f.put("b", "k", body(1)))   # put_chunk finds the overlay too old: sealed first
    ovs = s.status()["overlays"]
    assert len(ovs) >= 2 and ovs[0]["sealed"] and ovs[0]["records"] == 1
    n = len(ovs)
    time.sleep(0.3)
    assert len(s.status()["overlays"]) == n       # an empty overlay is never sealed by age
    s.close_sync()


def test_reads_consult_the_newest_overlay_first(store):
    f = Feed(store)
    f.send(f.bucket("b"))
    for i in range(4):
        f.send(f.put("b", "k", body(10 + i)), f.put("b", f"only{i}", body(20 + i)))
        store.seal()
    assert len(store.status()["overlays"]) == 5
    m = store.manifest("b", "k")
    assert store.read_chunk(m["chunks"][0][0]) == body(13)
    assert len(store.versions("b", "k")) == 4
    store.compact_oldest()
    store.compact_oldest()
    assert store.read_chunk(store.manifest("b", "k")["chunks"][0][0]) == body(13)
    assert [o["key"] for o in store.list_objects("b")[0]] == ["k", "only0", "only1", "only2", "only3"]
    assert [v["seq"] for v in store.versions("b", "k")] == [2, 4, 6, 8]


def test_chunk_in_an_old_overlay_and_the_base_resolves_and_merges_once(tmp_path, monkeypatch):
    from airlock.vault import compaction
    s = VaultStore(tmp_path / "v").open()
    f = Feed(s)
    f.send(f.bucket("b"), f.put("b", "k", body(1)))
    s.seal()

    def crash(step):
        if step == "committed":
            raise RuntimeError("crash after the catalog commit")
    monkeypatch.setattr(compaction, "crash_point", crash)
    with pytest.raises(RuntimeError):
        s.compact_oldest()
    monkeypatch.undo()
    before = snapshot(s)
    s.close_sync()
    os.unlink(s.catalog_path)                   # lose the catalog: the merged overlay looks unmerged
    s = VaultStore(s.data_dir).open()
    assert s.recovery["catalog_rebuilt"]
    d = blake3.blake3(body(1)).hexdigest()
    assert s.status()["overlays"][0]["chunks"] == 1 and s.status()["base"]["chunks"] == 1
    assert s.read_chunk(d) == body(1)
    assert snapshot(s) == before
    end = s.status()["base"]["bytes"]
    [res] = s.compact()
    assert res["new_chunks"] == 0 and s.status()["base"]["bytes"] == end
    assert snapshot(s) == before
    s.close_sync()


def test_corrupt_overlay_chunk_raises_integrity_error(store):
    f = Feed(store)
    f.send(f.bucket("b"), f.put("b", "k", body(1)))
    ov = store._overlays[-1]
    d = blake3.blake3(body(1)).hexdigest()
    off, _n = ov.chunks[d]
    with open(ov.path, "r+b") as fh:
        fh.seek(off + 10)
        fh.write(b"\xff\xfe")
    with pytest.raises(IntegrityError):
        store.read_chunk(d)


# ---------------------------------------------------------------------- recovery
def test_torn_overlay_tail_is_cut_and_replayed_from_the_log(store):
    f = Feed(store)
    f.send(f.bucket("b"), f.put("b", "k", body(1)), f.put("b", "k2", body(2)))
    before = snapshot(store)
    path = store._overlays[-1].path
    store.close_sync()
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 7)         # tear the last RECORD entry
    s = VaultStore(store.data_dir).open()
    assert s.recovery["torn_overlays"] and s.recovery["replayed"] == 1
    assert snapshot(s) == before
    s.close_sync()


def test_records_missing_from_overlays_are_replayed_from_the_log(store):
    f = Feed(store)
    f.send(f.bucket("b"), f.put("b", "k", body(1)))
    store.close_sync()
    # a crash after the log fsync but before the overlay write: drop the RECORD entries
    from airlock.vault.overlay import Overlay
    ov, _end, _st = Overlay.scan(store._overlays[-1].path, store._overlays[-1].created_ns)
    chunk_end = max(off + n for off, n in ov.chunks.values())
    with open(ov.path, "r+b") as fh:
        fh.truncate(chunk_end)
    s = VaultStore(store.data_dir).open()
    assert s.recovery["replayed"] == 2
    assert s.manifest("b", "k")["size"] == 3000 and s.read_chunk(s.manifest("b", "k")["chunks"][0][0]) == body(1)
    s.close_sync()


def test_unsealed_overlay_that_is_not_the_newest_gets_sealed_on_open(store):
    from airlock.vault.overlay import Overlay
    f = Feed(store)
    f.send(f.bucket("b"), f.put("b", "k", body(1)))
    store.close_sync()
    Overlay.create(store.overlay_dir, store._overlays[-1].created_ns + 10).close()
    s = VaultStore(store.data_dir).open()
    assert s.recovery["sealed_on_open"] == [store._overlays[-1].name]
    assert s.manifest("b", "k")["size"] == 3000
    s.close_sync()


KILL_APPENDER = """
import asyncio, sys, threading, time
sys.path.insert(0, {tests!r})
from test_vault_store import Feed, body
from airlock.vault.store import VaultStore
s = VaultStore(sys.argv[1], overlay_max_bytes=20000).open()
f = Feed(s, start=s.last_seq + 1)

def compactor():
    while True:
        s.compact(keep=2)
        time.sleep(0.005)

threading.Thread(target=compactor, daemon=True).start()

async def main():
    if s.last_seq == 0:
        await s.append([f.bucket("b")])
    i = s.last_seq
    while True:
        i += 1
        seq = await s.append([f.put("b", f"k{{i % 17}}", body(i, 2000 + i % 500)), f.put("b", "same", body(7))])
        print(seq, flush=True)
asyncio.run(main())
"""


def test_kill_9_while_appending_loses_nothing_acknowledged(tmp_path):
    d = tmp_path / "v"
    code = KILL_APPENDER.format(tests=str(Path(__file__).parent))
    acked = 0
    merged = 0
    for n_acks in (40, 150, 90, 260):
        p = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=SRC))
        import threading
        watchdog = threading.Timer(60, p.kill)          # a hung appender fails the test, never hangs it
        watchdog.start()
        try:
            for _ in range(n_acks):
                line = p.stdout.readline()
                assert line, "appender died"
                acked = int(line)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
            watchdog.cancel()
        s = VaultStore(d).open()
        from airlock.log.reader import last_sequence
        assert s.last_seq >= acked and s.last_seq == last_sequence(s.log_dir)
        recs = s.records(1, 10**6)
        assert [r[0] for r in recs] == list(range(1, s.last_seq + 1))
        for seq, rtype, payload in recs:
            if rtype == P.OBJECT_PUT:
                m = P.decode_payload(rtype, payload)
                assert s.manifest("b", m["key"], seq) == m
                for dg, n in m["chunks"]:
                    assert len(s.read_chunk(dg)) == n
        st = s.status()
        held = sum(o["records"] for o in st["overlays"])
        assert st["merged_through_seq"] + held == s.last_seq
        merged = st["merged_through_seq"]
        s.close_sync()
    assert merged > 0                          # compaction ran (and was killed) alongside the appends


def test_overlay_of_an_unknown_version_is_refused_not_guessed(store):
    import struct
    from airlock.errors import FormatError
    from airlock.vault.overlay import OVERLAY_HEADER, OVERLAY_MAGIC
    f = Feed(store)
    f.send(f.bucket("b"))
    store.seal()
    path = store._overlays[0].path
    ns = store._overlays[0].created_ns
    store.close_sync()
    prefix = OVERLAY_HEADER.pack(OVERLAY_MAGIC, 2, 0, 0, ns)
    with open(path, "r+b") as fh:
        fh.write(prefix + blake3.blake3(prefix).digest(8))
    with pytest.raises(FormatError, match="version 2"):
        VaultStore(store.data_dir).open()
    assert struct.unpack_from("<H", open(path, "rb").read(), 8)[0] == 2     # left untouched


# ---------------------------------------------------------------------- early writeback
def test_chunk_data_is_written_back_while_it_arrives_and_the_append_still_syncs(tmp_path):
    s = VaultStore(tmp_path / "vault").open()
    try:
        f = Feed(s)
        f.send(f.bucket("b"))
        parts = [body(i, 1 << 20) for i in range(10)]        # more than WRITEBACK_BYTES
        rec = f.put("b", "k", *parts)
        assert s._writeback_job is not None
        s._writeback_job.result(30)                            # an early fdatasync ran, and succeeded
        assert f.send(rec) == 2
        assert b"".join(s.read_chunk(d) for d, _n in s.manifest("b", "k")["chunks"]) == b"".join(parts)
    finally:
        s.close_sync()


def _failed_writeback(s: VaultStore, monkeypatch, data: bytes):
    """Feed a bucket, then a chunk whose early writeback's fdatasync fails
    (EIO); returns (feed, the record that references the chunk)."""
    import errno
    f = Feed(s)
    f.send(f.bucket("b"))
    real = os.fdatasync

    def failing(fd):
        raise OSError(errno.EIO, "injected write-back error")
    monkeypatch.setattr(os, "fdatasync", failing)
    rec = f.put("b", "k", data)                         # WRITEBACK_BYTES of chunk data start a writeback
    s._writeback_job.result(30)
    monkeypatch.setattr(os, "fdatasync", real)
    return f, rec


def test_a_failed_early_writeback_refuses_every_later_append(tmp_path, monkeypatch):
    # an fsync error may be reported to one fdatasync call only: the one that
    # saw it must stop the store, or a later APPEND could be acknowledged
    # over chunk data that never reached the disk
    s = VaultStore(tmp_path / "vault").open()
    try:
        f, rec = _failed_writeback(s, monkeypatch, body(0, WRITEBACK_BYTES))
        with pytest.raises(VaultRejected) as ei:
            f.send(rec)
        assert ei.value.code == "internal"
        assert s.last_seq == 1
        with pytest.raises(VaultRejected):
            s.put_chunk(blake3.blake3(b"more").hexdigest(), b"more")
    finally:
        s.close_sync()


def test_recovery_after_a_failed_writeback_cuts_the_unsynced_chunks_and_asks_for_them_again(tmp_path, monkeypatch):
    # after a failed fdatasync the chunk bytes may sit in the page cache
    # only: recovery in place must not count them as held, even though they
    # read back intact from the cache (docs/format/vault.md, "Recovery in place")
    s = VaultStore(tmp_path / "vault").open()
    data = body(0, WRITEBACK_BYTES)
    try:
        f, rec = _failed_writeback(s, monkeypatch, data)
        assert s.failed is not None
        assert asyncio.run(s.reopen()) is True
        assert s.failed is None and s.last_seq == 1
        digest = blake3.blake3(data).hexdigest()
        assert not s.has_chunk(digest)                      # cut with the unsynced tail
        with pytest.raises(VaultRejected) as ei:
            f.send(rec)
        assert ei.value.code == "missing_chunks" and ei.value.digests == [digest]
        s.put_chunk(digest, data)                           # what the primary does on missing_chunks
        assert f.send(rec) == 2
        assert s.read_chunk(digest) == data
    finally:
        s.close_sync()
    again = VaultStore(tmp_path / "vault").open()
    try:
        assert again.last_seq == 2 and again.read_chunk(digest) == data
        assert again.recovery["torn_overlays"] == []
    finally:
        again.close_sync()


def test_closing_the_store_waits_for_an_append_in_flight_whose_caller_was_cancelled(tmp_path, caplog):
    """A stopping vault cancels its link sessions; an APPEND already being
    made durable goes on (it is shielded), and aclose() lets it finish
    before it closes the log and the overlays: the records are durable and
    there when the store opens again."""
    store = VaultStore(tmp_path / "v").open()
    feed = Feed(store)
    recs = [feed.bucket("b")] + [feed.put("b", f"k{i}", body(i, 200_000)) for i in range(20)]

    async def main():
        caller = asyncio.ensure_future(store.append(recs))
        for _ in range(10_000):                 # the append has started ...
            if store._append_lock is not None and store._append_lock.locked():
                break
            await asyncio.sleep(0)
        caller.cancel()                         # ... its session is cancelled by the stop
        await store.aclose()                    # ... and the store closes
        with pytest.raises(asyncio.CancelledError):
            await caller
    asyncio.run(main())
    import gc
    gc.collect()                                # an unretrieved task error is logged when it is collected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
    again = VaultStore(tmp_path / "v").open()
    assert again.last_seq == len(recs)
    assert {m["key"] for m in again.list_objects("b", limit=100)[0]} == {f"k{i}" for i in range(20)}
    again.close_sync()
