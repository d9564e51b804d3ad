"""Large chunk files, vault overlay entries and base volume extents are
written around the page cache (fsutil.write_around_cache): the bytes on disk
must be exactly those of the plain write path, at every offset and size, and
a file system that refuses O_DIRECT must only change the path, never the
bytes."""
from __future__ import annotations

import errno
import os
import random

import blake3
import pytest

import airlock.chunk.store as store_mod
from airlock import fsutil
from airlock.chunk.store import ChunkStore
from airlock.fsutil import DIRECT_BLOCK, DIRECT_MIN_BYTES, STAGING_BYTES, open_direct, write_around_cache
from airlock.vault.base import VOLUME_HEADER_SIZE, BaseVolume
from airlock.vault.overlay import OVERLAY_HEADER_SIZE, Overlay

pytestmark = pytest.mark.skipif(not fsutil.DIRECT_IO, reason="no O_DIRECT here (or AIRLOCK_DIRECT_IO=0)")

SIZES = [0, 1, 100, DIRECT_BLOCK - 1, DIRECT_BLOCK, DIRECT_MIN_BYTES - 1, DIRECT_MIN_BYTES,
         DIRECT_MIN_BYTES + 5, STAGING_BYTES - 3, STAGING_BYTES, STAGING_BYTES + DIRECT_BLOCK + 17,
         3 * STAGING_BYTES + 1]


def _runs(seed: int):
    rnd = random.Random(seed)
    out = []
    for size in SIZES + [rnd.randrange(0, 2 * STAGING_BYTES) for _ in range(6)]:
        data = rnd.randbytes(size)
        cut = sorted(rnd.randrange(0, size + 1) for _ in range(2))   # 1-3 parts, some empty
        out.append([data[:cut[0]], data[cut[0]:cut[1]], data[cut[1]:]])
    rnd.shuffle(out)
    return out


def _write_file(path, runs, direct: bool, start: int = 0) -> list[bool]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    dfd = open_direct(path) if direct else None
    if direct:
        assert dfd is not None
    oks = []
    try:
        off = start
        for parts in runs:
            oks.append(write_around_cache(fd, dfd, off, parts))
            off += sum(len(p) for p in parts)
        os.fdatasync(fd)
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)
    return oks


@pytest.mark.parametrize("start", [0, 1, DIRECT_BLOCK - 20, DIRECT_BLOCK, 12345])
def test_runs_written_around_the_cache_are_byte_identical_to_the_plain_path(tmp_path, start):
    runs = _runs(start)
    expected = b"".join(b"".join(parts) for parts in runs)
    a, b = tmp_path / "direct", tmp_path / "plain"
    for p in (a, b):
        p.write_bytes(b"h" * start)
    assert all(_write_file(a, runs, True, start))
    _write_file(b, runs, False, start)
    assert a.read_bytes() == b.read_bytes() == b"h" * start + expected


def test_a_direct_descriptor_refusing_a_write_leaves_the_run_complete_through_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "f"
    data = random.Random(7).randbytes(3 * STAGING_BYTES + 999)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    dfd = open_direct(str(path))
    real = os.pwrite

    def refusing(f, buf, off):
        if f == dfd:
            raise OSError(errno.EINVAL, "Invalid argument (as a file system without O_DIRECT)")
        return real(f, buf, off)

    monkeypatch.setattr(os, "pwrite", refusing)
    try:
        assert write_around_cache(fd, dfd, 5, [data]) is False
    finally:
        os.close(fd)
        os.close(dfd)
    assert path.read_bytes() == b"\0" * 5 + data


def test_open_direct_answers_none_when_direct_io_is_switched_off(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"")
    monkeypatch.setattr(fsutil, "DIRECT_IO", False)
    assert open_direct(str(tmp_path / "f")) is None


@pytest.mark.parametrize("size", [DIRECT_MIN_BYTES - 1, DIRECT_MIN_BYTES, 1 << 20, (1 << 20) + 4083, 4 << 20])
def test_chunk_files_are_byte_identical_with_and_without_direct_io(tmp_path, monkeypatch, size):
    data = random.Random(size).randbytes(size)
    digest = blake3.blake3(data).hexdigest()
    direct = ChunkStore(str(tmp_path / "direct"))
    direct.put(digest, data)
    assert direct._direct
    monkeypatch.setattr(fsutil, "DIRECT_IO", False)
    plain = ChunkStore(str(tmp_path / "plain"))
    plain.put(digest, data)
    with open(direct.path(digest), "rb") as f1, open(plain.path(digest), "rb") as f2:
        assert f1.read() == f2.read()
    assert direct.read(digest) == data
    assert os.listdir(direct.tmp) == []


def test_a_chunk_store_whose_file_system_refuses_o_direct_writes_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "open_direct", lambda path, flags=os.O_WRONLY: None)
    st = ChunkStore(str(tmp_path))
    data = random.Random(1).randbytes(1 << 20)
    d = blake3.blake3(data).hexdigest()
    st.put(d, data)
    assert st._direct is False
    assert st.read(d) == data


def _fill_overlay(directory, entries):
    ov = Overlay.create(str(directory), 1234)
    seq = 0
    for kind, data in entries:
        if kind == "chunk":
            ov.append_chunk(blake3.blake3(data).hexdigest(), data)
        else:
            seq += 1
            ov.append_record(seq, 1, data)
    ov.sync()
    ov.close()
    return ov


def test_overlay_files_are_byte_identical_with_and_without_direct_io_and_scan_back(tmp_path, monkeypatch):
    rnd = random.Random(3)
    entries = []
    for size in [5, 300, DIRECT_MIN_BYTES + 1, 1 << 20, 77, (1 << 20) + 123, 4 << 20, 9, 256 * 1024 + 1]:
        entries.append(("chunk", rnd.randbytes(size)))
        entries.append(("record", rnd.randbytes(rnd.randrange(20, 400))))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _fill_overlay(tmp_path / "a", entries)
    monkeypatch.setattr(fsutil, "DIRECT_IO", False)
    b = _fill_overlay(tmp_path / "b", entries)
    with open(a.path, "rb") as f1, open(b.path, "rb") as f2:
        assert f1.read() == f2.read()
    ov, end, status = Overlay.scan(a.path, 1234)
    assert status == "ok" and end == os.path.getsize(a.path) > OVERLAY_HEADER_SIZE
    for kind, data in entries:
        if kind == "chunk":
            assert ov.read_chunk_at(*ov.chunks[blake3.blake3(data).hexdigest()]) == data
    assert [r.payload for r in ov.records] == [d for k, d in entries if k == "record"]


def test_an_overlay_reopened_after_a_torn_tail_appends_at_the_cut_around_the_cache(tmp_path):
    rnd = random.Random(4)
    first = rnd.randbytes(1 << 20)
    ov = _fill_overlay(tmp_path, [("chunk", first), ("record", b"r" * 50)])
    with open(ov.path, "ab") as f:
        f.write(b"AVOE torn garbage" * 100)
    ov, end, status = Overlay.scan(ov.path, 1234)
    assert status == "torn"
    ov.truncate(end)
    ov.open_for_append()
    second = rnd.randbytes((1 << 20) + 5)
    ov.append_chunk(blake3.blake3(second).hexdigest(), second)
    ov.sync()
    ov.close()
    again, end2, status2 = Overlay.scan(ov.path, 1234)
    assert status2 == "ok" and end2 == os.path.getsize(ov.path)
    assert again.read_chunk_at(*again.chunks[blake3.blake3(first).hexdigest()]) == first
    assert again.read_chunk_at(*again.chunks[blake3.blake3(second).hexdigest()]) == second


def _fill_volume(path, extents):
    vol = BaseVolume(str(path)).open()
    end = VOLUME_HEADER_SIZE
    for data in extents:
        end += vol.write_extent(end, blake3.blake3(data).hexdigest(), data)
    vol.sync()
    return vol, end


def test_base_volume_extents_are_byte_identical_with_and_without_direct_io_and_scan_back(tmp_path, monkeypatch):
    rnd = random.Random(5)
    extents = [rnd.randbytes(n) for n in (10, (1 << 20) + 3, 300 * 1024, 7, 4 << 20, DIRECT_MIN_BYTES)]
    a, end = _fill_volume(tmp_path / "a.dat", extents)
    monkeypatch.setattr(fsutil, "DIRECT_IO", False)
    b, _ = _fill_volume(tmp_path / "b.dat", extents)
    head = VOLUME_HEADER_SIZE        # the headers differ only in their creation time
    assert (tmp_path / "a.dat").read_bytes()[head:] == (tmp_path / "b.dat").read_bytes()[head:]
    assert a.size() == end
    found = list(a.scan())
    assert [d for d, *_ in found] == [blake3.blake3(x).hexdigest() for x in extents] and not a.damaged
    for (_d, off, n, _e), data in zip(found, extents):
        assert a.read_data(off, n) == data
    a.close()
    b.close()
