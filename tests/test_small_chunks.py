"""Small chunks are rows of chunks/small.sqlite (docs/format/chunkstore.md):
one per digest, durable when `put` returns, shared between processes,
verified on read, with concurrent puts sharing commits."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import blake3
import pytest

from airlock.chunk.small import FORMAT_NAME, WAL_SIZE_LIMIT, SmallChunks
from airlock.chunk.store import SMALL_CHUNK_MAX, ChunkStore
from airlock.errors import FormatError, IntegrityError

SRC = str(Path(__file__).resolve().parent.parent / "src")


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def count_commits(store: ChunkStore) -> list[int]:
    """The row count of each transaction the store commits from now on."""
    commits = []
    real = store.small._commit

    def counting(rows):
        commits.append(len(rows))
        return real(rows)
    store.small._commit = counting
    return commits


def test_a_small_chunk_is_a_row_and_a_larger_one_a_file(tmp_path):
    store = ChunkStore(str(tmp_path))
    small, large = os.urandom(SMALL_CHUNK_MAX), os.urandom(SMALL_CHUNK_MAX + 1)
    assert store.put(digest(small), small) == (None, True)
    d, written = store.put(digest(large), large)
    assert written and d == store.dir_of(digest(large))
    assert not os.path.exists(store.path(digest(small))) and os.path.exists(store.path(digest(large)))
    assert store.put(digest(small), small) == (None, False)          # dedup
    assert store.read(digest(small)) == small and store.read(digest(large)) == large
    assert store.has(digest(small)) and store.has(digest(large))
    assert set(store.iter_digests()) == {digest(small), digest(large)}


def test_concurrent_puts_share_commits_and_every_one_is_durable_on_return(tmp_path):
    store = ChunkStore(str(tmp_path))
    bodies = [os.urandom(4096) for _ in range(400)]
    commits = count_commits(store)
    results = {}

    def put(i):
        results[i] = store.put(digest(bodies[i]), bodies[i])
    threads = [threading.Thread(target=lambda k=k: [put(i) for i in range(k, 400, 16)]) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == (None, True) for i in range(400))
    assert sum(commits) == 400 and len(commits) < 400                  # rows shared transactions
    # another connection (another process would do the same) sees every row
    db = sqlite3.connect(str(tmp_path / "chunks" / "small.sqlite"))
    assert db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 400
    db.close()


def test_rows_put_from_an_event_loop_and_from_threads_share_commits_and_all_settle(tmp_path):
    """put_async callers take no thread each: their rows join the commit in
    progress or the next one, which the committer thread runs even when no
    thread caller is left to lead it; every caller learns its own flags."""
    store = ChunkStore(str(tmp_path))
    commits = count_commits(store)
    loop_bodies = [os.urandom(2048) for _ in range(300)]
    thread_bodies = [os.urandom(2048) for _ in range(64)]
    thread_results = {}

    def put(i):
        thread_results[i] = store.put(digest(thread_bodies[i]), thread_bodies[i])

    async def main():
        loop = asyncio.get_running_loop()
        threads = [threading.Thread(target=lambda k=k: [put(i) for i in range(k, 64, 8)]) for k in range(8)]
        for t in threads:
            t.start()
        futs = [store.put_small_async(loop, [(digest(b), b)]) for b in loop_bodies]
        # the same row twice in one call, and again later: written once
        again = store.put_small_async(loop, [(digest(loop_bodies[0]), loop_bodies[0])] * 2)
        results = await asyncio.gather(*futs)
        await asyncio.get_running_loop().run_in_executor(None, lambda: [t.join() for t in threads])
        return results, await again
    results, again = asyncio.run(main())
    assert results[0] in ([True], [False]) and all(r == [True] for r in results[1:])
    assert (results[0], again) in (([True], [False, False]), ([False], [True, False]))
    assert all(thread_results[i] == (None, True) for i in range(64))
    assert sum(commits) == 300 + 2 + 64 and len(commits) < 300
    db = sqlite3.connect(str(tmp_path / "chunks" / "small.sqlite"))
    assert db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 364
    db.close()
    store.close()


def test_close_waits_for_the_commit_in_progress_and_every_put_after_it_fails(tmp_path):
    """Threads and an event loop keep putting while the store closes: each
    put either returns (its row durable) or fails with OSError; none
    waits forever, and close() is idempotent."""
    store = ChunkStore(str(tmp_path))
    stored, failed = [], []
    lock = threading.Lock()

    def writer(k):
        for i in range(100_000):             # bounded; ends on the closed store long before
            data = f"{k}-{i}".encode() * 10
            try:
                d, written = store.put(digest(data), data)
            except OSError as e:
                assert "the store is closed" in str(e)
                with lock:
                    failed.append(data)
                return
            with lock:
                stored.append(data)

    async def on_loop():
        loop = asyncio.get_running_loop()
        for i in range(100_000):
            data = f"loop-{i}".encode() * 10
            try:
                await asyncio.wait_for(store.put_small_async(loop, [(digest(data), data)]), 10)
            except OSError as e:
                assert "the store is closed" in str(e)
                failed.append(data)
                return
            stored.append(data)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=lambda: asyncio.run(on_loop())))
    for t in threads:
        t.start()
    time.sleep(0.05)
    store.close()
    store.close()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert len(failed) == 5                      # every writer ended on the closed store
    with pytest.raises(OSError, match="the store is closed"):
        store.put(digest(b"late"), b"late")

    async def late():
        return await store.put_small_async(asyncio.get_running_loop(), [(digest(b"late"), b"late")])
    with pytest.raises(OSError, match="the store is closed"):
        asyncio.run(late())
    again = ChunkStore(str(tmp_path))            # every put that returned is there
    assert all(again.read(digest(d)) == d for d in stored)
    assert not again.has(digest(b"late"))
    again.close()


@pytest.mark.parametrize("caller", ["thread", "event loop"])
def test_a_failed_commit_fails_every_put_of_its_batch_and_stores_none(tmp_path, caller):
    store = ChunkStore(str(tmp_path))
    db = sqlite3.connect(str(tmp_path / "chunks" / "small.sqlite"), isolation_level=None)
    # the database refuses every insert (what a full disk does to a commit)
    db.execute("CREATE TRIGGER refuse BEFORE INSERT ON chunks BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    data = os.urandom(3000)

    async def on_loop():
        return await store.put_small_async(asyncio.get_running_loop(), [(digest(data), data)])

    def put():
        return store.put(digest(data), data) if caller == "thread" else asyncio.run(on_loop())
    with pytest.raises(OSError, match="small-chunk database: disk full"):    # as a chunk file's error
        put()
    assert not store.has(digest(data))
    db.execute("DROP TRIGGER refuse")
    db.close()
    assert put() == ((None, True) if caller == "thread" else [True])   # the same bytes store normally
    assert store.read(digest(data)) == data
    with pytest.raises(ValueError):
        store.put_small_async(None, [("00" * 32, bytes(SMALL_CHUNK_MAX + 1))])
    store.close()


def test_a_damaged_row_is_an_integrity_error_and_replace_repairs_it(tmp_path):
    store = ChunkStore(str(tmp_path))
    data = os.urandom(5000)
    d = digest(data)
    store.put(d, data)
    db = sqlite3.connect(str(tmp_path / "chunks" / "small.sqlite"), isolation_level=None)
    # the first byte flipped (writing b"x" there changed nothing when the
    # random data already began with it: 1 run in 256 failed)
    db.execute("UPDATE chunks SET data=? WHERE digest=?", (bytes([data[0] ^ 0xFF]) + data[1:], bytes.fromhex(d)))
    with pytest.raises(IntegrityError):
        store.read(d)
    assert store.put(d, data) == (None, False)          # dedup keeps the damaged row ...
    store.replace(d, data)                              # ... until it is replaced
    assert store.read(d) == data
    store.discard(d)
    assert not store.has(d)
    with pytest.raises(FileNotFoundError):
        store.read(d)
    db.close()


def test_a_chunk_file_of_a_small_chunk_still_reads_and_a_repair_replaces_it_by_a_row(tmp_path):
    """Stores written before the small-chunk database kept every chunk as a file."""
    from airlock.chunk.store import CHUNK_HEADER, CHUNK_MAGIC, CHUNK_VERSION
    store = ChunkStore(str(tmp_path))
    data = b"an old small chunk\n" * 10
    d = digest(data)
    os.makedirs(store.dir_of(d), exist_ok=True)
    with open(store.path(d), "wb") as f:
        f.write(CHUNK_HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, 0, len(data)) + data)
    assert store.has(d) and store.read(d) == data
    store.replace(d, data)
    assert not os.path.exists(store.path(d)) and store.read(d) == data


def test_a_database_of_another_format_is_refused_not_guessed(tmp_path):
    ChunkStore(str(tmp_path)).close()
    db = sqlite3.connect(str(tmp_path / "chunks" / "small.sqlite"), isolation_level=None)
    db.execute("UPDATE meta SET v='2' WHERE k='version'")
    db.close()
    with pytest.raises(FormatError, match=FORMAT_NAME):
        SmallChunks(str(tmp_path / "chunks"))


def test_two_processes_write_the_same_database_and_see_each_others_rows(tmp_path):
    code = textwrap.dedent("""
        import os, sys, blake3
        from airlock.chunk.store import ChunkStore
        store = ChunkStore(sys.argv[1], clean_tmp=False)
        seed = sys.argv[2].encode()
        for i in range(300):
            data = seed + b"-%d-" % i + b"y" * 2000
            store.put(blake3.blake3(data).hexdigest(), data)
    """)
    env = dict(os.environ, PYTHONPATH=SRC)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), s], env=env) for s in ("a", "b")]
    assert [p.wait(60) for p in procs] == [0, 0]
    store = ChunkStore(str(tmp_path))
    for s in (b"a", b"b"):
        for i in range(300):
            data = s + b"-%d-" % i + b"y" * 2000
            assert store.read(digest(data)) == data
    assert len(list(store.iter_digests())) == 600


def test_an_unreadable_database_is_moved_aside_and_its_chunks_read_as_missing(tmp_path):
    store = ChunkStore(str(tmp_path))
    data = os.urandom(4000)
    store.put(digest(data), data)
    store.close()
    db_path = tmp_path / "chunks" / "small.sqlite"
    for suffix in ("-wal", "-shm"):
        if Path(str(db_path) + suffix).exists():
            os.unlink(str(db_path) + suffix)
    db_path.write_bytes(b"not a database, a disk fault" * 200)
    store = ChunkStore(str(tmp_path))               # opens: the gateway keeps serving everything else
    aside = list((tmp_path / "chunks").glob("small.sqlite.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"not a database")     # kept
    with pytest.raises(FileNotFoundError):          # missing: a GET takes the vault's copy
        store.read(digest(data))
    store.replace(digest(data), data)               # ... and writes it back
    assert store.read(digest(data)) == data


def test_a_damaged_database_another_process_has_open_is_not_moved_aside(tmp_path):
    """The process that has it open would go on writing into the moved file:
    only an opener that finds it open nowhere else moves it aside."""
    first = ChunkStore(str(tmp_path))                       # holds it open (a running gateway)
    db_path = tmp_path / "chunks" / "small.sqlite"
    db_path.write_bytes(b"not a database, a disk fault" * 200)
    with pytest.raises(sqlite3.DatabaseError):
        ChunkStore(str(tmp_path), clean_tmp=False)          # a scrub while the gateway runs
    assert not list((tmp_path / "chunks").glob("small.sqlite.damaged-*"))
    first.close()
    ChunkStore(str(tmp_path))                               # the next start, alone: moves it aside
    assert len(list((tmp_path / "chunks").glob("small.sqlite.damaged-*"))) == 1


def test_the_write_ahead_log_is_cut_back_after_a_burst(tmp_path):
    """One large transaction grows the log past WAL_SIZE_LIMIT; once a
    checkpoint has emptied it, the next commit cuts the file back."""
    small = SmallChunks(str(tmp_path), fsync=False)
    try:
        rows = [(b"%032d" % i, os.urandom(60 * 1024)) for i in range(2 * WAL_SIZE_LIMIT // (60 * 1024) + 10)]
        small._submit_rows([("INSERT OR IGNORE", d, data) for d, data in rows])
        wal = tmp_path / "small.sqlite-wal"
        assert wal.stat().st_size > WAL_SIZE_LIMIT
        small._writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        small.put(b"%032d" % 10**9, b"after the burst")
        assert wal.stat().st_size <= WAL_SIZE_LIMIT
        assert small.get(rows[0][0]) == rows[0][1] and small.get(b"%032d" % 10**9) == b"after the burst"
    finally:
        small.close()
