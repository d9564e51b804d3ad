"""Ingest of a body: large chunk files are written on the chunk store's
writer threads while the next buffer is hashed, and the upload ends only
when every one of them is durable (primary/ingest.py).  Real files, real
fsync, the real thread pools."""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import blake3
import pytest

from airlock.chunk.store import SMALL_CHUNK_MAX, ChunkStore
from airlock.primary.ingest import ASYNC_WRITE_BYTES, ON_LOOP_BYTES, Ingest, ingest_body

MiB = 1024 * 1024


async def _body(data: bytes, piece: int = 64 * 1024):
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


def _ingest(store: ChunkStore, data: bytes, shipped: list):
    async def ship(chunks):
        shipped.extend(chunks)

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = Ingest(store)
            return ing, await ingest_body(ing, _body(data), pool, ship=ship)
    return asyncio.run(run())


def test_every_chunk_file_of_a_large_body_is_in_place_and_verified_when_ingest_returns(tmp_path):
    store = ChunkStore(str(tmp_path))
    data = os.urandom(9 * MiB)
    shipped: list = []
    ing, digests = _ingest(store, data, shipped)
    assert digests.size == len(data)
    assert len(digests.chunks) >= 3
    assert any(c.size >= ASYNC_WRITE_BYTES for c in digests.chunks)
    # written on the writer threads, all finished
    assert ing.writing and all(f.done() and f.exception() is None for f in ing.writing.values())
    # every chunk is a complete file, read back against its digest
    assert b"".join(store.read(c.digest) for c in digests.chunks) == data
    # and every new chunk was handed to the vault shipper, in body order
    assert [d for d, _ in shipped] == [c.digest for c in digests.chunks]


@pytest.mark.parametrize("held_md5_call", [1, 3], ids=["first-buffer", "last-piece"])
def test_the_last_chunks_of_a_large_body_are_written_shipped_and_synced_while_its_md5_catches_up(
        tmp_path, held_md5_call):
    # a body of several buffers (within the window): the chunker's end, the
    # last chunk's file, its shipping and its sync must not wait behind the
    # MD5 of any buffer
    import threading
    store = ChunkStore(str(tmp_path))
    data = os.urandom(2 * MiB + 512 * 1024)
    all_shipped = threading.Event()
    seen: dict = {"md5_calls": 0, "md5_waited_ok": None}
    shipped: list = []
    box: dict = {}

    class SlowMd5(Ingest):
        def feed_md5(self, buf):
            seen["md5_calls"] += 1
            if seen["md5_calls"] == held_md5_call:
                seen["md5_waited_ok"] = all_shipped.wait(10)
                seen["durable_by_then"] = box["ing"].durable
            super().feed_md5(buf)

    async def ship(chunks):
        shipped.extend(chunks)
        if sum(len(c) for _d, c in shipped) == len(data):
            # the durability wait follows the last shipping: give it time
            async def set_when_durable():
                for _ in range(2000):
                    if box["ing"].durable:
                        break
                    await asyncio.sleep(0.005)
                all_shipped.set()
            asyncio.ensure_future(set_when_durable())

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = box["ing"] = SlowMd5(store)
            return ing, await ingest_body(ing, _body(data), pool, ship=ship)
    ing, digests = asyncio.run(run())
    assert seen["md5_calls"] == 3 and seen["md5_waited_ok"] is True
    assert seen["durable_by_then"] and ing.durable
    import hashlib
    assert digests.md5 == hashlib.md5(data).digest()
    assert b"".join(store.read(c.digest) for c in digests.chunks) == data
    assert [d for d, _ in shipped] == [c.digest for c in digests.chunks]


def test_a_body_seen_before_writes_and_ships_nothing_new(tmp_path):
    store = ChunkStore(str(tmp_path))
    data = os.urandom(3 * MiB)
    _ingest(store, data, [])
    shipped: list = []
    ing, digests = _ingest(store, data, shipped)
    assert shipped == [] and ing.writing == {}
    assert b"".join(store.read(c.digest) for c in digests.chunks) == data


def test_a_chunk_file_that_cannot_be_written_fails_the_upload(tmp_path):
    store = ChunkStore(str(tmp_path))
    # every fan-out directory name is taken by a plain file: no chunk file can be created
    for i in range(256):
        with open(os.path.join(store.root, f"{i:02x}"), "w"):
            pass
    with pytest.raises(OSError):
        _ingest(store, os.urandom(3 * MiB), [])


def test_a_chunk_repeated_within_one_body_is_written_and_shipped_once(tmp_path):
    store = ChunkStore(str(tmp_path))
    data = bytes(12 * MiB)          # no content-defined cut: identical chunks of the maximum size
    shipped: list = []
    _ing, digests = _ingest(store, data, shipped)
    assert len(digests.chunks) >= 3 and len({c.digest for c in digests.chunks}) == 1
    assert [d for d, _ in shipped] == [digests.chunks[0].digest]
    assert b"".join(store.read(c.digest) for c in digests.chunks) == data


def test_the_last_chunks_are_shipped_while_their_files_sync_and_ingest_returns_once_they_are_durable(tmp_path):
    # the vault receives an upload's tail while this disk syncs it; the commit
    # (after ingest_body returns) still finds every chunk file durable
    store = ChunkStore(str(tmp_path))
    data = os.urandom(3 * MiB // 2)
    seen: list = []

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = Ingest(store)

            async def ship(chunks):
                seen.append((ing.durable, [d for d, _ in chunks]))
            digests = await ingest_body(ing, _body(data), pool, ship=ship)
            return ing, digests
    ing, digests = asyncio.run(run())
    assert seen and seen[-1][0] is False            # shipped before the wait for its write
    assert [d for _durable, ds in seen for d in ds] == [c.digest for c in digests.chunks]
    assert ing.durable
    assert all(f.done() and f.exception() is None for f in ing.writing.values())
    assert b"".join(store.read(c.digest) for c in digests.chunks) == data


def test_a_small_body_is_durable_within_its_single_hop(tmp_path):
    store = ChunkStore(str(tmp_path))
    ing = Ingest(store)
    new = ing.feed_and_finish(os.urandom(4096))
    assert ing.durable and len(new) == 1
    assert store.read(new[0][0]) == new[0][1]


def test_a_body_of_a_few_kib_is_hashed_on_the_loop_and_durable_without_an_executor_hop(tmp_path):
    store = ChunkStore(str(tmp_path))
    shipped = []

    async def ship(chunks):
        shipped.extend(chunks)

    async def body(data):
        yield data

    class NoThreads(concurrent.futures.Executor):
        def submit(self, *a, **kw):
            raise AssertionError("a small body took an executor hop")

    async def main(data):
        ing = Ingest(store)
        digests = await ingest_body(ing, body(data), NoThreads(), ship=ship)
        return ing, digests
    data = os.urandom(ON_LOOP_BYTES)
    ing, digests = asyncio.run(main(data))
    assert ing.durable and digests.md5 == hashlib.md5(data).digest() and digests.size == len(data)
    assert [c.digest for c in digests.chunks] == [blake3.blake3(data).hexdigest()]
    assert store.read(digests.chunks[0].digest) == data          # the row is in, durable
    assert [(d, bytes(b)) for d, b in shipped] == [(digests.chunks[0].digest, data)]
    shipped.clear()
    # seen before, shipped all the same: whether the store had it is known only
    # after the commit, and a copy it has may be one the vault never got
    _ing, again = asyncio.run(main(data))
    assert again.chunks == digests.chunks and [d for d, _b in shipped] == [digests.chunks[0].digest]
    _ing, empty = asyncio.run(main(b""))
    assert empty.size == 0 and empty.chunks == [] and empty.md5 == hashlib.md5(b"").digest()
    store.close()


def test_with_defer_durable_a_small_body_returns_before_its_row_commit_with_its_future(tmp_path):
    store = ChunkStore(str(tmp_path))

    async def body(data):
        yield data

    async def main(data):
        digests = await ingest_body(Ingest(store), body(data), None, defer_durable=True)
        pending = not digests.durable.done()
        written = await digests.durable
        return digests, pending, written
    data = os.urandom(3000)
    digests, pending, written = asyncio.run(main(data))
    assert pending and written == [True]
    assert store.read(digests.chunks[0].digest) == data
    _d, _p, again = asyncio.run(main(data))
    assert again == [False]                                        # the row was there already
    store.close()


@pytest.mark.parametrize("defer", [False, True])
def test_a_large_body_whose_last_bytes_come_after_every_buffer_settled_ends_as_a_large_body(tmp_path, defer):
    # the tail of a body is a few bytes, and every earlier buffer has been
    # hashed and settled before they come: it once went down the small-body
    # path (the chunker's pending MiBs as "rows": ValueError, a 500)
    store = ChunkStore(str(tmp_path))
    data = os.urandom(16 * MiB + 100)            # 8 MiB buffers: each cuts chunks (at most 4 MiB)
    shipped = []

    async def ship(chunks):
        await asyncio.sleep(0.3)                  # a socket write that waits: buffer 2 ends meanwhile
        shipped.extend(d for d, _b in chunks)

    async def slow_tail():
        yield data[:8 * MiB]
        await asyncio.sleep(0.5)                  # buffer 1 is hashed meanwhile
        yield data[8 * MiB:16 * MiB]              # settles buffer 1, then (done by then) buffer 2
        yield data[16 * MiB:]                     # 100 bytes after every buffer settled

    async def main():
        with ThreadPoolExecutor(4) as pool:
            return await ingest_body(Ingest(store), slow_tail(), pool, ship=ship, defer_durable=defer)
    digests = asyncio.run(main())
    assert digests.durable is None and digests.md5 == hashlib.md5(data).digest()
    assert b"".join(store.read(c.digest) for c in digests.chunks) == data
    assert sorted(shipped) == sorted({c.digest for c in digests.chunks})
    store.close()


@pytest.mark.parametrize("size", [
    600 * 1024,      # one buffer: shipped once, at the end, with a large write in flight
    9 * MiB,         # ships after every 1 MiB buffer: the first one with a chunk fails mid-body
])
def test_a_failed_ship_still_leaves_the_written_chunk_files_durable(tmp_path, size):
    # the upload fails, but its chunk files stay in the store where a later
    # upload may find them (dedup): they must not be left half-synced
    store = ChunkStore(str(tmp_path))
    data = os.urandom(size)
    box: dict = {}

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = box["ing"] = Ingest(store)

            async def ship(chunks):
                raise ConnectionError("link lost")
            await ingest_body(ing, _body(data), pool, ship=ship)
    with pytest.raises(ConnectionError):
        asyncio.run(run())
    ing = box["ing"]
    assert ing.writing and ing.durable
    assert all(f.done() and f.exception() is None for f in ing.writing.values())
    for d in ing.writing:
        assert store.has(d)


@pytest.mark.parametrize("size", [100 * 1024, 600 * 1024])     # chunk files (a small chunk is a row)
def test_a_body_found_in_the_store_still_syncs_its_chunk_directories_before_the_commit(tmp_path, monkeypatch, size):
    # another upload may have renamed the chunk file into place but not yet
    # fsynced its directory; without a vault nothing could repair a lost entry
    import airlock.chunk.store as store_mod
    store = ChunkStore(str(tmp_path))
    data = os.urandom(size)
    _ingest(store, data, [])
    synced: list = []
    real = store_mod.fsync_dir

    def spy(d):
        synced.append(os.path.abspath(d))
        real(d)
    monkeypatch.setattr(store_mod, "fsync_dir", spy)
    shipped: list = []
    ing, digests = _ingest(store, data, shipped)
    assert shipped == [] and ing.durable
    # the chunks that are files; a last chunk of SMALL_CHUNK_MAX or less (a random 600 KiB
    # body cut late enough ends in one) is a row, with no directory to sync
    files = [c for c in digests.chunks if c.size > SMALL_CHUNK_MAX]
    assert files and files[0] == digests.chunks[0]
    assert {os.path.abspath(store.dir_of(c.digest)) for c in files} <= set(synced)


@pytest.mark.parametrize("size", [100 * 1024, ASYNC_WRITE_BYTES + 1])    # chunk files; rows below
def test_a_chunk_write_that_fails_leaves_no_tmp_file_and_no_chunk(tmp_path, monkeypatch, size):
    # a full disk (ENOSPC at the sync) must not also keep the failed upload's bytes in tmp/
    store = ChunkStore(str(tmp_path))
    data = os.urandom(size)
    digest = blake3.blake3(data).hexdigest()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(OSError, match="No space"):
        store.put(digest, data)
    monkeypatch.undo()
    assert os.listdir(store.tmp) == []
    assert not store.has(digest)
    store.put(digest, data)                        # space again: the same bytes store normally
    assert store.read(digest) == data


@pytest.mark.parametrize("size", [MiB - 1, MiB, MiB + 1, 2 * MiB + 12345, 3 * MiB + MiB // 2])
@pytest.mark.parametrize("piece", [4096, 64 * 1024, 700_001])
def test_every_digest_sees_every_byte_in_order_however_the_body_arrives(tmp_path, size, piece):
    # buffers coalesced to BATCH_BYTES, each large one fed as two passes on
    # two threads (MD5 | the rest), the last piece with the end of the body:
    # the digests are still those of the whole body, every byte is in a
    # chunk, and the chunks are shipped in order
    import hashlib
    data = os.urandom(size)
    store = ChunkStore(str(tmp_path / f"s{size}-{piece}"))
    shipped = []

    async def ship(chunks):
        shipped.extend(chunks)

    async def body():
        for i in range(0, len(data), piece):
            yield data[i:i + piece]

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = Ingest(store, want_sha256=True, checksum_algorithms=("CRC32",))
            return await ingest_body(ing, body(), pool, ship=ship)

    d = asyncio.run(run())
    assert d.size == size
    assert d.md5 == hashlib.md5(data).digest()
    assert d.sha256 == hashlib.sha256(data).digest()
    import zlib
    assert d.checksums["CRC32"] == zlib.crc32(data).to_bytes(4, "big")
    assert b"".join(store.read(c.digest) for c in d.chunks) == data
    assert [h for h, _ in shipped] == [c.digest for c in d.chunks]
    assert b"".join(bytes(b) for _h, b in shipped) == data
    store.close()


def test_a_serial_queue_runs_buffers_in_order_and_drops_the_ones_after_a_failure():
    # each hash state sees the body in order; after a failed buffer nothing
    # later runs (its state is no longer that of the body's prefix)
    from concurrent.futures import ThreadPoolExecutor as Pool

    from airlock.primary.ingest import _Serial, _Stopped
    seen: list = []

    def fn(buf):
        if buf == 3:
            raise OSError("disk gone")
        seen.append(buf)
        return buf * 10

    async def run():
        with Pool(4) as pool:
            q = _Serial(asyncio.get_running_loop(), pool, fn)
            futs = [q.submit(i) for i in range(6)]
            results = await asyncio.gather(*futs, return_exceptions=True)
            await q.stop()
            return results
    results = asyncio.run(run())
    assert results[:3] == [0, 10, 20]
    assert isinstance(results[3], OSError)
    assert all(isinstance(r, _Stopped) for r in results[4:])
    assert seen == [0, 1, 2]


def test_a_serial_queue_whose_executor_is_shut_down_fails_its_buffers_instead_of_hanging():
    from concurrent.futures import ThreadPoolExecutor as Pool

    from airlock.primary.ingest import _Serial

    async def run():
        pool = Pool(2)
        pool.shutdown()
        q = _Serial(asyncio.get_running_loop(), pool, lambda b: b)
        got = await asyncio.wait_for(asyncio.gather(q.submit(1), q.submit(2), return_exceptions=True), 5)
        await asyncio.wait_for(q.stop(), 5)
        return got
    got = asyncio.run(run())
    assert all(isinstance(r, Exception) for r in got)


def test_a_serial_queue_longer_than_a_slice_runs_every_buffer_once_in_order():
    # a job runs at most SLICE buffers, then queues the next job behind other work
    from concurrent.futures import ThreadPoolExecutor as Pool

    from airlock.primary.ingest import _Serial
    order = []

    def fn(b):
        order.append(b)
        return b

    async def run():
        with Pool(3) as pool:
            q = _Serial(asyncio.get_running_loop(), pool, fn)
            return await asyncio.gather(*[q.submit(i) for i in range(4 * _Serial.SLICE + 1)])
    got = asyncio.run(run())
    assert got == list(range(4 * _Serial.SLICE + 1)) == order


def test_an_upload_whose_body_fails_midway_waits_for_its_running_feeds_and_leaves_durable_files(tmp_path):
    store = ChunkStore(str(tmp_path))
    data = os.urandom(8 * MiB)
    box: dict = {}

    async def body():
        for i in range(0, 6 * MiB, 64 * 1024):
            yield data[i:i + 64 * 1024]
        raise ConnectionResetError("client went away")

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = box["ing"] = Ingest(store)
            await ingest_body(ing, body(), pool, ship=None)
    with pytest.raises(ConnectionResetError):
        asyncio.run(run())
    ing = box["ing"]
    # queued buffers may have been dropped before any chunk was cut; every
    # chunk write that was started is finished and synced
    assert ing.durable or not ing.writing
    assert all(f.done() and f.exception() is None for f in ing.writing.values())


async def _cancel_while_a_thread_is_held(ing, data, pool, entered, release) -> None:
    """Start ingesting `data`, cancel the upload once a feed thread sits in
    `entered`, check that ingest_body is still waiting for that thread, then
    let the thread go and see the cancellation arrive."""
    task = asyncio.ensure_future(ingest_body(ing, _body(data), pool, ship=None))
    while not entered.is_set():
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()              # still waiting for the feed on its thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("size, last_step", [(3 * MiB + 700 * 1024, "finish_rest"),
                                             (700 * 1024, "feed_and_finish")],
                         ids=["several-buffers", "one-hop"])
def test_an_upload_cancelled_during_its_last_feed_returns_only_after_that_feed(tmp_path, size, last_step):
    # the client goes away while a thread runs the upload's last feed (the
    # chunker's end): the cleanup (syncing the chunk files already written)
    # must not run beside it on another thread, since Ingest is not thread-safe
    import threading
    store = ChunkStore(str(tmp_path))
    data = os.urandom(size)
    entered, release = threading.Event(), threading.Event()
    state: dict = {}

    def slow(step):
        def run(self, last):
            entered.set()
            release.wait(10)
            try:
                return step(self, last)
            finally:
                state["finished"] = True
        return run

    SlowEnd = type("SlowEnd", (Ingest,), {last_step: slow(getattr(Ingest, last_step))})

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = state["ing"] = SlowEnd(store)
            await _cancel_while_a_thread_is_held(ing, data, pool, entered, release)
            assert state.get("finished")
    asyncio.run(run())
    ing = state["ing"]
    assert ing.writing, "the body's chunk is large enough to be written on a writer thread"
    assert all(f.done() and f.exception() is None for f in ing.writing.values())
    assert ing.durable or not ing.writing


class _HeldTailMd5(Ingest):
    """Holds the MD5 of the body's third piece (its last, for a 2.5 MiB
    body) until `go` is set; `active` says whether a thread is inside it."""

    def __init__(self, store):
        import threading
        super().__init__(store)
        self.entered, self.go = threading.Event(), threading.Event()
        self.calls, self.active = 0, False

    def feed_md5(self, data):
        self.calls += 1
        if self.calls == 3:
            self.active = True
            self.entered.set()
            self.go.wait(10)
            self.active = False
        super().feed_md5(data)


def test_an_upload_cancelled_twice_while_its_last_md5_runs_returns_only_after_it(tmp_path):
    # the chunk files are durable by then (the upload did not wait for the
    # MD5 to sync them), yet the MD5 thread still uses the upload's state
    store = ChunkStore(str(tmp_path))
    data = os.urandom(2 * MiB + 512 * 1024)

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = _HeldTailMd5(store)
            task = asyncio.ensure_future(ingest_body(ing, _body(data), pool, ship=None))
            for _ in range(2000):               # synced while the MD5 is held
                if ing.entered.is_set() and ing.durable:
                    break
                await asyncio.sleep(0.005)
            assert ing.durable
            for _ in range(2):
                task.cancel()
                await asyncio.sleep(0.05)
            assert not task.done() and ing.active
            ing.go.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not ing.active
    asyncio.run(run())


def test_an_upload_whose_queued_durability_wait_the_executor_drops_still_waits_for_its_md5_thread(tmp_path):
    # shutdown(cancel_futures=True) while the upload is cancelled: its
    # queued jobs end cancelled, and it must still not return while a
    # thread (the MD5 of the last piece) uses its state
    import threading
    store = ChunkStore(str(tmp_path))
    data = os.urandom(2 * MiB + 512 * 1024)
    blocker = threading.Event()

    async def run():
        pool = ThreadPoolExecutor(2)
        ing = _HeldTailMd5(store)

        async def ship(chunks):
            if ing.entered.is_set():            # the last chunks: keep the pool's other thread busy
                pool.submit(blocker.wait, 10)
                await asyncio.sleep(0.05)
        task = asyncio.ensure_future(ingest_body(ing, _body(data), pool, ship=ship))
        while not ing.entered.is_set():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)                # the durability wait is queued behind the blocker
        task.cancel()
        await asyncio.sleep(0.05)
        pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.sleep(0.1)
        assert not task.done() and ing.active
        ing.go.set()
        blocker.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert not ing.active
        pool.shutdown(wait=True)
    asyncio.run(run())


def test_an_upload_cancelled_mid_body_returns_only_after_the_buffer_being_hashed(tmp_path):
    import threading
    store = ChunkStore(str(tmp_path))
    data = os.urandom(6 * MiB)
    entered, release = threading.Event(), threading.Event()
    state: dict = {"fed": 0}

    class SlowRest(Ingest):
        def feed_rest(self, buf):
            if state["fed"] == 1:
                entered.set()
                release.wait(10)
            try:
                return super().feed_rest(buf)
            finally:
                state["fed"] += 1

    async def run():
        with ThreadPoolExecutor(4) as pool:
            ing = state["ing"] = SlowRest(store)
            await _cancel_while_a_thread_is_held(ing, data, pool, entered, release)
            return state["fed"]
    fed = asyncio.run(run())
    assert fed == 2                 # the buffer being hashed finished; the queued ones were dropped
    ing = state["ing"]
    assert all(f.done() and f.exception() is None for f in ing.writing.values())
