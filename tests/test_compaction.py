"""Compaction (oldest sealed overlay -> base volume) and catalog rebuild:
correct before, during and after; crash-safe at every step
(docs/format/vault.md, "Garbage collection" and "Recovery")."""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest

from airlock.vault.store import VaultStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vault_store import Feed, body, reopen, run_script, snapshot  # noqa: E402

KEYS = 12


def populate(store: VaultStore, rounds: int = 6) -> Feed:
    """Writes and overwrites spread over several overlays, with deletes and shared chunks."""
    f = Feed(store)
    f.send(f.bucket("b"), f.bucket("c"))
    n = 0
    for r in range(rounds):
        batch = []
        for k in range(KEYS):
            n += 1
            batch.append(f.put("b", f"key{k:02d}", body(1000 * r + k), body(k)))  # body(k): shared across rounds
        batch.append(f.put("c", f"r{r}", body(5)))
        if r % 2:
            batch.append(f.delete("b", f"key{r:02d}"))
        f.send(*batch)
        store.seal()
    return f


def expected_current(store: VaultStore, key: str) -> bytes | None:
    m = store.manifest("b", key)
    return None if m is None else b"".join(store.read_chunk(d) for d, _ in m["chunks"])


def test_compaction_merges_every_overlay_and_answers_stay_identical(tmp_path):
    s = VaultStore(tmp_path / "v").open()
    populate(s)
    before = snapshot(s)
    assert len(s.status()["overlays"]) == 7
    progress = []
    results = s.compact(keep=0, progress=lambda done, total: progress.append((done, total)))
    assert len(results) == 6 and all(r["overlay"] for r in results)
    assert progress and all(d <= t for d, t in progress)
    st = s.status()
    assert len(st["overlays"]) == 1 and not st["overlays"][0]["sealed"] and st["overlays"][0]["records"] == 0
    assert sorted(os.listdir(s.overlay_dir)) == [st["overlays"][0]["name"]]        # merged overlays deleted
    assert st["merged_through_seq"] == s.last_seq
    assert snapshot(s) == before
    assert snapshot(reopen(s)) == before


def test_base_volume_grows_only_by_new_chunks(tmp_path):
    s = VaultStore(tmp_path / "v").open()
    f = Feed(s)
    f.send(f.bucket("b"), f.put("b", "k", body(1), body(2)))
    s.compact()
    end = s.status()["base"]["bytes"]
    chunks = s.status()["base"]["chunks"]
    assert end == 32 + 2 * (56 + 3000) and chunks == 2
    f.send(f.put("b", "k", body(2), body(1)), f.put("b", "k2", body(1)))   # same chunks, new versions
    s.compact()
    assert s.status()["base"]["bytes"] == end and s.status()["base"]["chunks"] == 2
    assert s.status()["base"]["versions"] == 3
    f.send(f.put("b", "k3", body(3)))
    [res] = s.compact()
    assert res["new_chunks"] == 1 and s.status()["base"]["bytes"] == end + 56 + 3000
    s.close_sync()


def test_reads_return_the_newest_data_while_compaction_runs(tmp_path):
    s = VaultStore(tmp_path / "v").open()
    populate(s, rounds=8)
    want = {f"key{k:02d}": expected_current(s, f"key{k:02d}") for k in range(KEYS)}
    listing = s.list_objects("b")
    before = snapshot(s)
    errors: list[BaseException] = []
    done = threading.Event()

    during = [0]

    def slow_progress(done_bytes, total_bytes):
        time.sleep(0.003)                     # widen the window so reads interleave with every step

    def run():
        try:
            s.compact(keep=0, progress=slow_progress)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()
    t = threading.Thread(target=run)
    t.start()
    loops = 0
    while not done.is_set() or loops < 3:
        for k, data in want.items():
            assert expected_current(s, k) == data
        assert s.list_objects("b") == listing
        loops += 1
        during[0] += not done.is_set()
    t.join()
    assert during[0] >= 5                      # the reads really overlapped the merges
    assert not errors
    assert len(s.status()["overlays"]) == 1
    assert snapshot(s) == before
    s.close_sync()


def test_appends_continue_while_compaction_runs(tmp_path):
    s = VaultStore(tmp_path / "v").open()
    f = populate(s)
    t = threading.Thread(target=s.compact, kwargs={"keep": 0})
    t.start()
    for i in range(30):
        f.send(f.put("b", "during", body(9000 + i)))
    t.join()
    assert expected_current(s, "during") == body(9029)
    assert len(s.versions("b", "during")) == 30
    before = snapshot(s)
    s.compact()
    assert snapshot(s) == before and snapshot(reopen(s)) == before


CRASH_SCRIPT = """
import os, sys
from airlock.vault import compaction
from airlock.vault.store import VaultStore
step = sys.argv[2]
def crash(at):
    if at == step:
        os._exit(77)
compaction.crash_point = crash
s = VaultStore(sys.argv[1]).open()
s.compact(keep=0)
os._exit(0)
"""
STEPS = ["picked", "extent-partial", "extents-written", "volume-synced", "in-transaction", "committed",
         "unlinked"]


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash") / "v"
    s = VaultStore(d).open()
    f = populate(s, rounds=4)
    s.compact_oldest()                         # the base has content before the crash, too
    f.send(f.put("b", "tail", body(77)))       # leave records in the unsealed newest overlay
    before = snapshot(s)
    s.close_sync()
    return d, before


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_compaction_step_then_reopen_and_rerun(tmp_path, populated, step):
    src, before = populated
    d = tmp_path / "v"
    shutil.copytree(src, d)
    run_script(CRASH_SCRIPT, d, step, expect=77)
    s = VaultStore(d).open()
    if step in ("extent-partial", "extents-written", "volume-synced", "in-transaction"):
        assert s.recovery["volume_truncated_bytes"] > 0
    if step == "committed":
        assert s.recovery["merged_overlays_deleted"]
    assert snapshot(s) == before
    s.compact(keep=0)
    assert snapshot(s) == before
    st = s.status()
    assert len(st["overlays"]) == 1 and st["merged_through_seq"] == s.last_seq
    assert len(os.listdir(s.overlay_dir)) == 1
    s = reopen(s)
    assert snapshot(s) == before
    s.close_sync()


def test_catalog_rebuilt_from_the_log_gives_identical_answers(tmp_path):
    s = VaultStore(tmp_path / "v").open()
    f = populate(s)
    s.compact(keep=2)
    f.send(f.abort(5), f.put("b", "late", body(4242)))
    before = snapshot(s)
    status = s.status()
    s.close_sync()
    for suffix in ("", "-journal"):
        if os.path.exists(s.catalog_path + suffix):
            os.unlink(s.catalog_path + suffix)
    s = VaultStore(s.data_dir).open()
    assert s.recovery["catalog_rebuilt"]
    assert snapshot(s) == before
    st = s.status()
    assert st["base"] == status["base"] and st["merged_through_seq"] == status["merged_through_seq"]
    s.rebuild_catalog_from_log()                # also on demand, on an open store
    assert snapshot(s) == before
    s.compact()
    assert snapshot(s) == before
    s.close_sync()


def test_unreadable_catalog_is_rebuilt(tmp_path):
    s = VaultStore(tmp_path / "v").open()
    populate(s, rounds=2)
    s.compact()
    before = snapshot(s)
    s.close_sync()
    with open(s.catalog_path, "r+b") as fh:
        fh.write(b"this is not sqlite" * 10)
    s = VaultStore(s.data_dir).open()
    assert s.recovery["catalog_rebuilt"] and snapshot(s) == before
    d = blake3.blake3(body(1)).hexdigest()
    assert s.read_chunk(d) == body(1)
    s.close_sync()


def test_crash_during_catalog_rebuild_never_truncates_the_base_volume(tmp_path, monkeypatch):
    from airlock.vault import catalog as catalog_mod
    s = VaultStore(tmp_path / "v").open()
    populate(s, rounds=3)
    s.compact()
    before = snapshot(s)
    volume_bytes = os.path.getsize(s.volume_path)
    s.close_sync()
    os.unlink(s.catalog_path)
    real = catalog_mod.Catalog.commit_merge

    def dies(self, *a, **kw):
        raise OSError("crash while rebuilding the catalog")
    monkeypatch.setattr(catalog_mod.Catalog, "commit_merge", dies)
    with pytest.raises(OSError):
        VaultStore(s.data_dir).open()
    monkeypatch.setattr(catalog_mod.Catalog, "commit_merge", real)
    assert not os.path.exists(s.catalog_path)
    s = VaultStore(s.data_dir).open()
    assert os.path.getsize(s.volume_path) == volume_bytes
    assert snapshot(s) == before
    s.close_sync()


def test_rebuild_skips_a_damaged_extent_and_keeps_the_extents_after_it(tmp_path):
    s = VaultStore(tmp_path / "v").open()
    f = Feed(s)
    f.send(f.bucket("b"), f.put("b", "k1", body(1)), f.put("b", "k2", body(2)), f.put("b", "k3", body(3)))
    s.compact()
    size = os.path.getsize(s.volume_path)
    second = 32 + 56 + 3000                     # the extent of body(2)
    s.close_sync()
    with open(s.volume_path, "r+b") as fh:      # bit rot inside the second extent's data
        fh.seek(second + 48 + 100)
        fh.write(b"\x00\x01\x02")
    os.unlink(s.catalog_path)
    s = VaultStore(s.data_dir).open()
    assert s.recovery["volume_damaged"] == [(second, second + 56 + 3000)]
    assert os.path.getsize(s.volume_path) == size          # nothing after the damage was cut
    assert s.read_chunk(blake3.blake3(body(1)).hexdigest()) == body(1)
    assert s.read_chunk(blake3.blake3(body(3)).hexdigest()) == body(3)
    with pytest.raises(KeyError):
        s.read_chunk(blake3.blake3(body(2)).hexdigest())
    assert s.manifest("b", "k2")["size"] == 3000            # the history is intact; only the chunk is lost
    s.close_sync()
