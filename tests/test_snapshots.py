"""Vault snapshots (claims 24-33; docs/format/vault.md, "Snapshots"): points in
the vault's log that stay readable although retention prunes history; full
snapshots allocate their map at creation, copy-on-write snapshots take a
version before retention deletes it; adjacent snapshots merge; periodic ones
are trimmed to `keep`; every change is one transaction."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from airlock.errors import ConfigError, PolicyError
from airlock.vault.catalog import Retention
from airlock.vault.daemon import load_vault_config
from airlock.vault.store import VaultStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_retention import Clock, put  # noqa: E402
from test_vault_store import Feed, body, reopen, run_script  # noqa: E402


def vault(tmp_path, **retention) -> tuple[VaultStore, Feed, Clock]:
    s = VaultStore(tmp_path / "v", retention=Retention(**retention), fsync=False).open()
    clock = s.clock_ns = Clock()
    f = Feed(s)
    f.send(f.bucket("b"))
    return s, f, clock


def etag(m: dict | None) -> str | None:
    return m["etag"] if m is not None else None


def state(s: VaultStore, snap, at=None) -> dict:
    """bucket/key -> etag as of a snapshot, via both read paths (they must agree)."""
    out = {}
    for b in s.snapshot_buckets(snap, at=at):
        objs, truncated = s.snapshot_list_objects(snap, b["bucket"], at=at)
        assert not truncated
        for m in objs:
            out[f"{b['bucket']}/{m['key']}"] = m["etag"]
            assert s.snapshot_manifest(snap, b["bucket"], m["key"], at=at) == m
    return out


def current(s: VaultStore) -> dict:
    out = {}
    for b in s.buckets():
        for m in s.list_objects(b["bucket"])[0]:
            out[f"{b['bucket']}/{m['key']}"] = m["etag"]
    return out


def independent_accounting(path: str) -> dict[int, dict]:
    """Accounting computed straight from base.sqlite, in Python."""
    db = sqlite3.connect(path)
    out = {}
    for (sid,) in db.execute("SELECT id FROM snapshots"):
        rows = db.execute("SELECT payload, manifest FROM snapshot_versions WHERE snapshot=?", (sid,)).fetchall()
        chunks = {}
        for _p, m in rows:
            for d, n in (json.loads(m)["chunks"] if m else ()):
                chunks[d] = n
        out[sid] = {"versions": len(rows),
                    "table_bytes": sum(len(p) + (len(m.encode()) if m else 0) for p, m in rows),
                    "chunks": db.execute("SELECT COUNT(*) FROM snapshot_chunks WHERE snapshot=?",
                                         (sid,)).fetchone()[0],
                    "data_bytes": sum(chunks.values())}
    db.close()
    return out


def accounting(s: VaultStore) -> dict[int, dict]:
    return {x["id"]: {k: x[k] for k in ("versions", "table_bytes", "chunks", "data_bytes")} for x in s.snapshots()}


# ---------------------------------------------------------------------- reads as of a point
def test_full_and_cow_snapshots_read_the_state_as_of_their_point(tmp_path):
    s, f, _ = vault(tmp_path)
    put(f, "k", 1), put(f, "j", 2)
    before = current(s)
    full = s.snapshot_create(mode="full", name="first")
    assert full["seq"] == f.seq - 1 and full["versions"] == 2 and full["chunks"] == 2
    put(f, "k", 3)
    f.send(f.delete("b", "j"))
    f.send(f.bucket("c"))
    f.send(f.put("c", "x", body(4)))
    middle = current(s)
    cow = s.snapshot_create()                           # cow is the default
    assert cow["mode"] == "cow" and cow["seq"] == f.seq - 1 and cow["versions"] == 0
    put(f, "k", 5), put(f, "new", 6)
    after = current(s)
    assert before != middle != after
    assert state(s, full["id"]) == before and state(s, "first") == before
    assert [b["bucket"] for b in s.snapshot_buckets(full["id"])] == ["b"]
    assert state(s, cow["id"]) == middle
    assert s.snapshot_manifest(cow["id"], "b", "j") is None and s.snapshot_manifest(full["id"], "b", "new") is None
    s.compact()
    assert state(s, full["id"]) == before and state(s, cow["id"]) == middle
    s = reopen(s, fsync=False)
    assert state(s, full["id"]) == before and state(s, cow["id"]) == middle and current(s) == after
    with pytest.raises(KeyError):
        s.snapshot_manifest(99, "b", "k")
    s.close_sync()


def test_snapshot_pages_and_prefixes_match_the_point(tmp_path):
    s, f, _ = vault(tmp_path)
    for i in range(7):
        put(f, f"p/{i}", i)
    snap = s.snapshot_create()
    for i in range(0, 7, 2):
        f.send(f.delete("b", f"p/{i}"))
    page, more = s.snapshot_list_objects(snap["id"], "b", prefix="p/", limit=3)
    assert [m["key"] for m in page] == ["p/0", "p/1", "p/2"] and more
    page, more = s.snapshot_list_objects(snap["id"], "b", prefix="p/", after="p/2", limit=10)
    assert [m["key"] for m in page] == ["p/3", "p/4", "p/5", "p/6"] and not more
    s.close_sync()


# ---------------------------------------------------------------------- retention vs snapshots
def test_cow_snapshot_takes_the_old_version_before_retention_prunes_it(tmp_path):
    s, f, _ = vault(tmp_path, keep_versions=1)
    old = put(f, "k", 1)
    snap = s.snapshot_create(mode="cow")
    assert s.snapshots()[0]["versions"] == 0            # cheap at creation
    for i in range(2, 6):
        put(f, "k", i)
    [res] = s.compact()
    assert res["pruned"] == 3                           # versions 1..3 of k left the live history
    assert old not in [v["seq"] for v in s.versions("b", "k")]
    assert etag(s.snapshot_manifest(snap["id"], "b", "k")) == f"e{old}"
    acc = s.snapshots()[0]
    assert acc["versions"] == 1 and acc["data_bytes"] == 3000      # it took exactly the one it needs
    assert s.manifest("b", "k", old)["etag"] == f"e{old}"          # by seq too: restore can fetch it
    assert s.read_chunk(s.manifest("b", "k", old)["chunks"][0][0]) == body(1)
    assert s.status()["retention"]["unreferenced_bytes"] == 2 * 3000   # the held version's chunk is in use
    s.close_sync()


def test_full_snapshot_holds_its_whole_map_and_survives_pruning(tmp_path):
    s, f, _ = vault(tmp_path, keep_versions=1)
    put(f, "k", 1), put(f, "j", 2)
    before = current(s)
    full = s.snapshot_create(mode="full")
    for i in range(3, 7):
        put(f, "k", i), put(f, "j", 100 + i)
    s.compact()
    assert state(s, full["id"]) == before
    assert accounting(s)[full["id"]]["versions"] == 2              # nothing copied: it had them
    s.close_sync()


def test_a_version_goes_to_the_most_recent_snapshot_that_needs_it(tmp_path):
    s, f, _ = vault(tmp_path, keep_versions=1)
    v1 = put(f, "k", 1)
    a = s.snapshot_create()
    b = s.snapshot_create()                             # same point as a: both need v1
    v2 = put(f, "k", 2)
    c = s.snapshot_create()                             # needs v2
    put(f, "k", 3), put(f, "k", 4)
    s.compact()
    acc = accounting(s)
    assert acc[a["id"]]["versions"] == 0 and acc[b["id"]]["versions"] == 1 and acc[c["id"]]["versions"] == 1
    assert etag(s.snapshot_manifest(a["id"], "b", "k")) == f"e{v1}"      # read through b's table
    assert etag(s.snapshot_manifest(c["id"], "b", "k")) == f"e{v2}"
    # deleting b moves v1 to a, which still needs it
    res = s.snapshot_delete(b["id"])
    assert res["moved_versions"] == 1 and res["freed_versions"] == 0
    assert etag(s.snapshot_manifest(a["id"], "b", "k")) == f"e{v1}" and accounting(s)[a["id"]]["versions"] == 1
    # deleting a frees it; c is untouched
    res = s.snapshot_delete(a["name"])
    assert res["freed_versions"] == 1 and list(accounting(s)) == [c["id"]]
    assert etag(s.snapshot_manifest(c["id"], "b", "k")) == f"e{v2}"
    s.close_sync()


def test_delete_makes_what_only_it_protected_prunable(tmp_path):
    s, f, _ = vault(tmp_path, keep_versions=1)
    put(f, "k", 1)
    full = s.snapshot_create(mode="full")
    put(f, "k", 2), put(f, "k", 3)
    s.compact()
    assert len(s.versions("b", "k")) == 2 and accounting(s)[full["id"]]["versions"] == 1
    res = s.snapshot_delete(full["id"])
    assert res["freed_versions"] == 1 and s.snapshots() == []
    db = sqlite3.connect(s.catalog_path)
    assert db.execute("SELECT COUNT(*) FROM snapshot_versions").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM snapshot_chunks").fetchone()[0] == 0
    db.close()
    with pytest.raises(KeyError):
        s.snapshot_delete(full["id"])
    s.close_sync()


# ---------------------------------------------------------------------- merge
def test_merge_of_adjacent_snapshots_keeps_both_points_and_frees_what_neither_needs(tmp_path):
    s, f, _ = vault(tmp_path, keep_versions=1)
    for i in range(5):
        put(f, f"same{i}", i)                           # unchanged between the two snapshots
    put(f, "k", 10)
    a = s.snapshot_create(mode="full", name="a")
    at_a = current(s)
    put(f, "k", 11)
    b = s.snapshot_create(mode="full", name="b")
    at_b = current(s)
    put(f, "k", 12), put(f, "k", 13)
    c = s.snapshot_create(name="c")
    s.compact()
    acc_before = accounting(s)
    res = s.snapshot_merge("a", "b")
    m = res["snapshot"]
    assert m["name"] == "a+b" and m["points"] == [a["seq"], b["seq"]] and m["mode"] == "full"
    # every version either could restore is still restorable, at both points
    assert state(s, m["id"], at=a["seq"]) == at_a and state(s, m["id"]) == at_b
    # the five unchanged keys were held twice: now once
    assert res["freed"]["versions"] == 5
    assert m["versions"] == acc_before[a["id"]]["versions"] + acc_before[b["id"]]["versions"] - 5
    assert {x["name"] for x in s.snapshots()} == {"a+b", "c"}
    assert accounting(s) == independent_accounting(s.catalog_path)
    with pytest.raises(KeyError):
        s.snapshot_manifest(m["id"], "b", "k", at=a["seq"] - 1)
    assert c["id"] in accounting(s)
    s.close_sync()


def test_merge_refuses_snapshots_that_are_not_adjacent(tmp_path):
    s, f, _ = vault(tmp_path)
    put(f, "k", 1)
    a = s.snapshot_create(name="a")
    put(f, "k", 2)
    s.snapshot_create(name="mid")
    put(f, "k", 3)
    c = s.snapshot_create(name="c")
    with pytest.raises(PolicyError, match="not adjacent: mid"):
        s.snapshot_merge(a["id"], c["id"])
    with pytest.raises(PolicyError, match="itself"):
        s.snapshot_merge("a", "a")
    assert len(s.snapshots()) == 3
    res = s.snapshot_merge("c", "mid")                  # order does not matter
    assert res["snapshot"]["points"] == [a["seq"] + 1, c["seq"]] and res["snapshot"]["name"] == "mid+c"
    s.close_sync()


def test_merge_drops_rows_no_point_resolves_to(tmp_path):
    # a cow snapshot that took v1 for point A; B's point needs v2.  After merging
    # A and B, a later snapshot-free prune frees nothing that a point needs.
    s, f, _ = vault(tmp_path, keep_versions=1)
    v1 = put(f, "k", 1)
    s.snapshot_create(name="A")
    v2 = put(f, "k", 2)
    s.snapshot_create(name="B")
    put(f, "k", 3), put(f, "k", 4)
    s.compact()
    res = s.snapshot_merge("A", "B")
    m = res["snapshot"]
    assert m["versions"] == 2 and res["freed"]["versions"] == 0
    assert etag(s.snapshot_manifest("A+B", "b", "k", at=m["points"][0])) == f"e{v1}"
    assert etag(s.snapshot_manifest("A+B", "b", "k")) == f"e{v2}"
    s.close_sync()


# ---------------------------------------------------------------------- accounting
def test_snapshot_list_accounting_matches_what_base_sqlite_holds(tmp_path):
    s, f, _ = vault(tmp_path, keep_versions=1)
    for r in range(4):
        for k in ("a", "b", "c"):
            put(f, k, 10 * r + ord(k))
        s.snapshot_create(mode="full" if r % 2 else "cow")
    f.send(f.delete("b", "a"))
    s.compact()
    acc = accounting(s)
    assert any(x["versions"] for x in acc.values())
    assert acc == independent_accounting(s.catalog_path)
    s.close_sync()


# ---------------------------------------------------------------------- crash safety
CRASH_SCRIPT = """
import os, sys
from airlock.vault import snapshots
from airlock.vault.store import VaultStore
op, step = sys.argv[2], sys.argv[3]
def crash(at):
    if at == step:
        os._exit(77)
snapshots.crash_point = crash
s = VaultStore(sys.argv[1]).open()
if op == "create":
    s.snapshot_create(mode="full", name="new")
elif op == "merge":
    s.snapshot_merge("a", "b")
else:
    s.snapshot_delete("a")
os._exit(0)
"""


def _catalog_dump(path: str) -> dict:
    db = sqlite3.connect(path)
    out = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall())
           for t in ("snapshots", "snapshot_versions", "snapshot_chunks", "versions")}
    db.close()
    return out


@pytest.mark.parametrize("op", ["create", "merge", "delete"])
def test_a_crash_inside_a_snapshot_transaction_leaves_the_state_before_and_a_rerun_the_state_after(tmp_path, op):
    s, f, _ = vault(tmp_path, keep_versions=1)
    for i in range(3):
        put(f, f"k{i}", i)
    s.snapshot_create(mode="full", name="a")
    put(f, "k0", 10), put(f, "k0", 11)
    s.snapshot_create(mode="full", name="b")
    s.compact()
    s.close_sync()
    before = _catalog_dump(s.catalog_path)
    run_script(CRASH_SCRIPT, s.data_dir, op, f"{op}-in-transaction", expect=77)
    s = VaultStore(s.data_dir).open()
    assert _catalog_dump(s.catalog_path) == before
    s.close_sync()
    run_script(CRASH_SCRIPT, s.data_dir, op, "none", expect=0)
    after = _catalog_dump(s.catalog_path)
    assert after != before
    s = VaultStore(s.data_dir).open()
    names = {x["name"] for x in s.snapshots()}
    assert names == {"create": {"a", "b", "new"}, "merge": {"a+b"}, "delete": {"b"}}[op]
    s.close_sync()


# ---------------------------------------------------------------------- periodic + config
def test_periodic_snapshots_keep_only_the_newest_keep_and_never_hand_made_ones(tmp_path):
    s, f, clock = vault(tmp_path)
    s.snapshot_create(name="mine")
    made = []
    for i in range(5):
        put(f, "k", i)
        clock.ns += 10**9
        made.append(s.periodic_snapshot(mode="cow", keep=2)["created"]["id"])
    snaps = s.snapshots()
    assert [x["id"] for x in snaps if x["periodic"]] == made[-2:]
    assert [x["name"] for x in snaps if not x["periodic"]] == ["mine"]
    s.close_sync()


def test_snapshot_schedule_is_vault_config(tmp_path):
    p = tmp_path / "vault.toml"
    p.write_text('[vault.snapshots]\nevery = 3600\nkeep = 24\nmode = "full"\n')
    cfg = load_vault_config(str(p))
    assert (cfg.snapshots.every, cfg.snapshots.keep, cfg.snapshots.mode) == (3600.0, 24, "full")
    assert load_vault_config(None).snapshots.every == 0
    for bad in ('every = -1', 'keep = 1.5', 'mode = "instant"', 'often = 3'):
        p.write_text(f"[vault.snapshots]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_vault_config(str(p))


def test_schema_1_catalog_is_migrated(tmp_path):
    s, f, _ = vault(tmp_path)
    put(f, "k", 1)
    s.compact()
    s.close_sync()
    db = sqlite3.connect(s.catalog_path)
    db.executescript("DROP TABLE snapshots; DROP TABLE snapshot_versions; DROP TABLE snapshot_chunks; "
                     "UPDATE meta SET v='1' WHERE k='schema';")
    db.close()
    s = VaultStore(s.data_dir).open()
    assert s.snapshots() == [] and s.snapshot_create()["seq"] == 2
    s.close_sync()


def test_catalog_rebuild_keeps_snapshots_and_what_they_need(tmp_path):
    s, f, _ = vault(tmp_path, keep_versions=1)
    old = put(f, "k", 1)
    snap = s.snapshot_create()
    put(f, "k", 2), put(f, "k", 3)
    s.compact()
    s.rebuild_catalog_from_log()
    assert etag(s.snapshot_manifest(snap["id"], "b", "k")) == f"e{old}"
    s.close_sync()


# ---------------------------------------------------------------------- over the link (read-only)
def test_link_reads_snapshots_but_cannot_change_them(tmp_path):
    from airlock.link import protocol as W
    from airlock.link.client import LinkClient
    from airlock.link.server import LinkServer
    s, f, _ = vault(tmp_path)
    put(f, "k", 1)
    snap = s.snapshot_create(name="n")
    put(f, "k", 2)

    async def go():
        server = LinkServer(s, None, "test-vault")
        await server.start("127.0.0.1", 0)
        c = LinkClient("127.0.0.1", server.port, None, "test-primary")
        await c.connect()
        try:
            frame = await c.request(W.GET_MANIFEST, W.encode_json({"bucket": "b", "key": "k", "snapshot": "n"}))
            m = W.decode_json(frame.payload)
            listed = await c.list(snapshots=True)
            objs = await c.list(bucket="b", snapshot=snap["id"])
            buckets = await c.list(snapshot=snap["id"])
            status = await c.status()
            try:
                await c.request(W.GET_MANIFEST, W.encode_json({"bucket": "b", "key": "k", "snapshot": 99}))
                missing = None
            except Exception as e:  # noqa: BLE001
                missing = e
            return m, listed, objs, buckets, status, missing
        finally:
            await c.close()
            await server.stop()

    m, listed, objs, buckets, status, missing = asyncio.run(go())
    assert m["etag"] == "e2"
    assert [x["name"] for x in listed["snapshots"]] == ["n"] and "data_bytes" in listed["snapshots"][0]
    assert [o["etag"] for o in objs["objects"]] == ["e2"]
    assert [b["bucket"] for b in buckets["buckets"]] == ["b"]
    assert status["snapshots"][0]["seq"] == snap["seq"]
    assert missing is not None and "not_found" in repr(missing) + str(getattr(missing, "code", ""))
    s.close_sync()


# ---------------------------------------------------------------------- deployment, through the CLI
def test_snapshot_cli_against_a_running_vault_with_a_periodic_schedule(tmp_path):
    from conftest import Deployment
    cfg = tmp_path / "vault.toml"
    cfg.write_text('[vault.snapshots]\nevery = 0.3\nkeep = 2\nmode = "cow"\n')
    dep = Deployment(tmp_path / "d", vault_args=["--config", str(cfg)]).start()
    try:
        s3 = dep.gateway.client()
        s3.create_bucket(Bucket="snap")
        s3.put_object(Bucket="snap", Key="k", Body=b"one")
        made = json.loads(dep.airlock("snapshot", "create", "--mode", "full", "--name", "before", "--json").stdout)
        assert made["mode"] == "full" and made["versions"] == 1
        s3.put_object(Bucket="snap", Key="k", Body=b"two")
        s3.put_object(Bucket="snap", Key="later", Body=b"x")
        dep.airlock("snapshot", "create", "--name", "after")
        deadline = time.monotonic() + 20
        while True:
            listed = json.loads(dep.airlock("snapshot", "list", "--json").stdout)
            if sum(x["periodic"] for x in listed) == 2 and len(dep.vault.admin({"op": "status"})["snapshots"]) >= 4:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.3)
        time.sleep(1.0)                                  # more periods pass: still only 2 periodic
        listed = json.loads(dep.airlock("snapshot", "list", "--json").stdout)
        assert sum(x["periodic"] for x in listed) == 2
        assert {"before", "after"} <= {x["name"] for x in listed}
        text = dep.airlock("snapshot", "list").stdout
        assert "before" in text and "full" in text and "data_bytes=" in text
        # reads as of the snapshot over the link (what restore --snapshot uses)
        from test_compaction_e2e import link_client

        async def read():
            link = link_client(dep)
            await link.connect()
            try:
                from airlock.link import protocol as W
                fr = await link.request(W.GET_MANIFEST, W.encode_json({"bucket": "snap", "key": "k",
                                                                       "snapshot": "before"}))
                m = W.decode_json(fr.payload)
                objs = await link.list(bucket="snap", snapshot="before")
                return m, objs, await link.get_chunk(m["chunks"][0][0])
            finally:
                await link.close()

        m, objs, data = asyncio.run(read())
        assert data == b"one" and [o["key"] for o in objs["objects"]] == ["k"]
        r = dep.airlock("snapshot", "delete", "nope", check=False)
        assert r.returncode == 1 and "not found" in r.stderr
    finally:
        dep.stop()
    # the vault stopped (no timer any more): the CLI works on its files directly, holding its lock
    listed = json.loads(dep.airlock("snapshot", "list", "--json").stdout)
    order = [x["name"] for x in listed]
    i = order.index("before")
    far = order[i + 2] if i + 2 < len(order) else order[i - 2]
    r = dep.airlock("snapshot", "merge", "before", far, check=False)
    assert r.returncode == 1 and "not adjacent" in r.stderr
    out = dep.airlock("snapshot", "merge", "before", order[i + 1]).stdout
    merged = f"before+{order[i + 1]}"
    assert "merged snapshots" in out and merged in out
    dep.airlock("snapshot", "delete", merged)
    names = {x["name"] for x in json.loads(dep.airlock("snapshot", "list", "--json").stdout)}
    assert merged not in names and "before" not in names and len(names) == len(order) - 2


def test_the_worked_example_of_the_format_doc(tmp_path):
    s, f, clock = vault(tmp_path, keep_days=1)
    put(f, "k", 2), put(f, "j", 3)
    one = s.snapshot_create(mode="full")
    assert (one["id"], one["seq"], one["versions"], one["chunks"], one["data_bytes"]) == (1, 3, 2, 2, 6000)
    put(f, "k", 4)
    two = s.snapshot_create()
    assert (two["id"], two["seq"], two["versions"]) == (2, 4, 0)
    put(f, "k", 5), put(f, "k", 6)
    s.compact()
    clock.days(2)
    s.compact()
    assert [v["seq"] for v in s.versions("b", "k")] == [6]
    acc = accounting(s)
    assert acc[1] == {**acc[1], "versions": 2, "data_bytes": 6000, "chunks": 2}
    assert acc[2] == {**acc[2], "versions": 1, "data_bytes": 3000, "chunks": 0}
    assert etag(s.snapshot_manifest(1, "b", "k")) == "e2" and etag(s.snapshot_manifest(2, "b", "k")) == "e4"
    assert etag(s.snapshot_manifest(2, "b", "j")) == "e3"
    res = s.snapshot_merge(1, 2)
    assert (res["snapshot"]["id"], res["snapshot"]["name"], res["snapshot"]["points"]) == (3, "snapshot-1+snapshot-2", [3, 4])
    assert res["snapshot"]["versions"] == 3 and res["snapshot"]["data_bytes"] == 9000 and res["freed"]["versions"] == 0
    assert s.snapshot_delete(3)["freed_versions"] == 3
    s.close_sync()
