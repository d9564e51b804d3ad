"""A chunk file whose bytes are all in the page cache is read and verified on
the event loop (ChunkStore.read_cached, no thread hop); one that is not, or
anything unusual about it, is left to `read` on a thread, which reports
damage as it always has."""
from __future__ import annotations

import errno
import os
import time

import pytest

from airlock.chunk.store import CHUNK_HEADER_SIZE, ChunkStore, digest_of
from airlock.errors import IntegrityError

SIZE = 300_000       # a chunk file, not a row


def _drop_from_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def stored(tmp_path):
    st = ChunkStore(str(tmp_path))
    data = os.urandom(SIZE)
    d = digest_of(data)
    st.put(d, data)
    yield st, d, data
    st.close()


def test_a_chunk_file_in_the_page_cache_reads_the_same_bytes_as_read(stored):
    st, d, data = stored
    assert st.read(d) == data                    # now it is in the cache
    got = st.read_cached(d, SIZE)
    assert got is not None and bytes(got) == data


def test_a_chunk_file_not_in_the_page_cache_is_left_to_read(stored):
    st, d, data = stored

    def uncached_read() -> bool:
        # a DONTNEED can leave pages the kernel still holds in a per-CPU
        # batch (seen once in a loaded suite run): evict again, a bounded
        # number of times, until the pages are gone
        for _ in range(20):
            _drop_from_cache(st.path(d))
            if st.read_cached(d, SIZE) is None:
                return True
            time.sleep(0.05)
        return False
    assert uncached_read()                       # would have waited for the disk
    assert st.read(d) == data                    # the thread's read brings it in ...
    assert bytes(st.read_cached(d, SIZE)) == data     # ... and the next one is served from the cache


def test_damaged_short_long_or_missing_chunk_files_are_left_to_read_which_reports_them(stored):
    st, d, data = stored
    path = st.path(d)
    assert st.read_cached(d, SIZE + 1) is None   # not the size the manifest says
    with open(path, "r+b") as f:                 # one flipped byte
        f.seek(CHUNK_HEADER_SIZE + 1000)
        f.write(bytes([data[1000] ^ 0xFF]))
    assert st.read_cached(d, SIZE) is None
    with pytest.raises(IntegrityError):
        st.read(d)
    with open(path, "r+b") as f:                 # repaired, then trailing bytes
        f.seek(CHUNK_HEADER_SIZE + 1000)
        f.write(data[1000:1001])
    assert bytes(st.read_cached(d, SIZE)) == data
    with open(path, "ab") as f:
        f.write(b"trailing")
    assert st.read_cached(d, SIZE) is None
    with pytest.raises(IntegrityError):
        st.read(d)
    os.unlink(path)
    assert st.read_cached(d, SIZE) is None
    with pytest.raises(FileNotFoundError):
        st.read(d)


def test_a_file_system_without_nowait_reads_always_go_to_read(stored, monkeypatch):
    st, d, data = stored
    assert st.read(d) == data

    def refused(*a, **k):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", refused)
    assert st.read_cached(d, SIZE) is None
    monkeypatch.undo()
    assert st.read_cached(d, SIZE) is None       # remembered: not asked again
    assert st.read(d) == data
