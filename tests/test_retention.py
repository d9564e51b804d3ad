"""Vault-side retention: pruning of old history happens only in the vault,
only during compaction, only in the base, never to a current version; the
link has no way to ask for it (docs/format/vault.md, "Retention")."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from airlock.errors import ConfigError
from airlock.link import protocol
from airlock.vault import compaction
from airlock.vault.catalog import DAY_NS, Retention
from airlock.vault.daemon import VaultConfig, load_vault_config, open_store
from airlock.vault.store import VaultStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vault_store import Feed, body, reopen  # noqa: E402

T0 = 1_800_000_000 * 10**9


class Clock:
    def __init__(self, ns: int = T0):
        self.ns = ns

    def __call__(self) -> int:
        return self.ns

    def days(self, d: float) -> None:
        self.ns = T0 + int(d * DAY_NS)


def vault(tmp_path, **retention) -> tuple[VaultStore, Feed, Clock]:
    s = VaultStore(tmp_path / "v", retention=Retention(**retention)).open()
    clock = s.clock_ns = Clock()
    f = Feed(s)
    f.send(f.bucket("b"))
    return s, f, clock


def put(f: Feed, key: str, seed: int) -> int:
    seq = f.seq
    f.send(f.put("b", key, body(seed)))
    return seq


def seqs(s: VaultStore, key: str) -> list[int]:
    return [v["seq"] for v in s.versions("b", key)]


def test_default_keeps_every_version_forever(tmp_path):
    s, f, clock = vault(tmp_path)
    written = [put(f, "k", i) for i in range(5)]
    f.send(f.delete("b", "k"))
    written.append(f.seq - 1)
    s.compact()
    clock.days(10_000)
    s.compact()
    assert seqs(s, "k") == written
    assert s.status()["retention"] == {"keep_versions": 0, "keep_days": 0, "pruned_versions": 0,
                                       "last_prune": None, "unreferenced_bytes": 0}
    s.close_sync()


def test_keep_versions_1_keeps_current_and_one_previous_after_compaction(tmp_path):
    s, f, clock = vault(tmp_path, keep_versions=1)
    written = [put(f, "k", i) for i in range(4)]
    other = put(f, "solo", 99)
    assert seqs(s, "k") == written                  # in the overlay: nothing pruned yet
    [res] = s.compact()
    assert res["pruned"] == 2
    assert seqs(s, "k") == written[-2:] and seqs(s, "solo") == [other]
    assert s.manifest("b", "k", written[0]) is None and s.manifest("b", "k")["chunks"]
    st = s.status()["retention"]
    assert st["pruned_versions"] == 2 and st["last_prune"] == T0 / 1e9
    assert st["unreferenced_bytes"] == 2 * 3000     # chunks of the two pruned versions, not reclaimed
    assert s.status()["base"]["bytes"] == 32 + 5 * (56 + 3000)
    # the prune is in the catalog: survives a reopen, and is counted cumulatively
    s = reopen(s, retention=Retention(keep_versions=1))
    assert seqs(s, "k") == written[-2:]
    put(f.__class__(s, f.seq), "k", 50)
    s.compact()
    assert len(seqs(s, "k")) == 2 and s.status()["retention"]["pruned_versions"] == 3
    s.close_sync()


def test_delete_markers_count_as_versions(tmp_path):
    s, f, _clock = vault(tmp_path, keep_versions=1)
    a = put(f, "k", 1)
    f.send(f.delete("b", "k"))
    c = put(f, "k", 3)
    s.compact()
    assert [v["kind"] for v in s.versions("b", "k")] == ["delete", "put"] and a not in seqs(s, "k")
    assert seqs(s, "k")[-1] == c
    s.close_sync()


def test_tag_changes_do_not_count_as_versions(tmp_path):
    """A re-tag (object-tagging record) is the same content with other tags:
    keep_versions counts content versions, so any number of tag changes
    never pushes an older version out of the history."""
    from airlock.log import payload as P
    s, f, _clock = vault(tmp_path, keep_versions=1)
    v0 = put(f, "k", 1)
    v1 = put(f, "k", 2)
    m1 = s.manifest("b", "k")
    retags = []
    for tags in ("a=1", "a=2", None):
        retags.append(f.seq)
        m = dict(m1, meta=dict(m1["meta"], tagging=tags))
        f.send(f._rec(P.OBJECT_TAGGING, {"bucket": "b", "key": "k", "version_id": "null",
                                          "was_latest": True, "manifest": m}))
    s.compact()
    assert seqs(s, "k") == [v0, v1, *retags] and s.manifest("b", "k")["meta"]["tagging"] is None
    v2 = put(f, "k", 3)               # new content: now v0 is two content versions back
    s.compact()
    assert seqs(s, "k") == [v1, *retags, v2]
    assert s.manifest("b", "k", v0) is None and s.manifest("b", "k", v1)["etag"] == m1["etag"]
    s.close_sync()


def test_keep_days_prunes_only_versions_superseded_longer_ago(tmp_path):
    s, f, clock = vault(tmp_path, keep_days=3)
    v1, v2 = put(f, "k", 1), put(f, "k", 2)
    s.compact()                                     # v2 merged (supersedes v1) at day 0
    clock.days(2)
    v3 = put(f, "k", 3)
    s.compact()                                     # v3 merged at day 2
    assert seqs(s, "k") == [v1, v2, v3]
    clock.days(2.9)
    s.compact()                                     # nothing to merge: history still ages out
    assert seqs(s, "k") == [v1, v2, v3]
    clock.days(3.5)
    assert s.compact() == []
    assert seqs(s, "k") == [v2, v3]                 # v1 superseded 3.5 days ago; v2 only 1.5
    clock.days(5.5)
    s.compact()
    assert seqs(s, "k") == [v3]
    clock.days(1000)
    s.compact()
    assert seqs(s, "k") == [v3]                     # the current version is never pruned
    assert s.status()["retention"]["pruned_versions"] == 2
    s.close_sync()


def test_keep_versions_and_keep_days_both_must_allow_a_prune(tmp_path):
    s, f, clock = vault(tmp_path, keep_versions=1, keep_days=3)
    written = [put(f, "k", i) for i in range(4)]
    s.compact()
    assert seqs(s, "k") == written                  # beyond the count but superseded < 3 days ago
    clock.days(4)
    s.compact()
    assert seqs(s, "k") == written[-2:]
    s.close_sync()


def test_current_versions_and_current_delete_markers_are_never_pruned(tmp_path):
    s, f, clock = vault(tmp_path, keep_days=0.001)
    put(f, "gone", 1)
    f.send(f.delete("b", "gone"))
    marker = f.seq - 1
    solo = put(f, "solo", 2)
    put(f, "back", 3)
    f.send(f.delete("b", "back"))
    back = put(f, "back", 4)
    s.compact()
    clock.days(365)
    s.compact()
    assert seqs(s, "gone") == [marker] and s.versions("b", "gone")[0]["kind"] == "delete"
    assert s.manifest("b", "gone") is None
    assert seqs(s, "solo") == [solo] and seqs(s, "back") == [back]   # the old delete marker went too
    assert [m["key"] for m in s.list_objects("b")[0]] == ["back", "solo"]
    s.close_sync()


def test_unmerged_overlay_history_is_never_pruned(tmp_path):
    s, f, clock = vault(tmp_path, keep_days=1)
    v1, v2 = put(f, "k", 1), put(f, "k", 2)
    s.seal()
    v3, v4 = put(f, "k", 3), put(f, "k", 4)
    s.seal()
    v5 = put(f, "k", 5)                             # open overlay
    s.compact_oldest()                              # base: v1, v2 (merged at day 0)
    clock.days(30)
    compaction.prune_base(s)
    # v1 was superseded in the base; v2 is the base's newest and stays, even though
    # overlays (not yet merged) hold newer versions; overlay versions are untouched
    assert seqs(s, "k") == [v2, v3, v4, v5]
    s.compact_oldest()                              # v3, v4 merged at day 30
    assert seqs(s, "k") == [v2, v3, v4, v5]         # v2, v3 superseded by a merge "now"
    clock.days(32)
    s.compact(keep=0)                               # merges v5 at day 32, prunes v2 and v3
    assert seqs(s, "k") == [v4, v5]
    s.close_sync()


def test_an_unmerged_abort_that_voids_the_base_current_version_keeps_the_previous_one(tmp_path):
    s, f, clock = vault(tmp_path, keep_days=1)
    v1, v2 = put(f, "k", 1), put(f, "k", 2)
    s.compact()
    f.send(f.abort(v2))                             # in the overlay: v2 never took effect
    clock.days(30)
    compaction.prune_base(s)
    assert seqs(s, "k") == [v1] and s.manifest("b", "k")["chunks"]
    s.close_sync()


def test_crash_inside_the_merge_transaction_leaves_the_unpruned_catalog(tmp_path, monkeypatch):
    s, f, _clock = vault(tmp_path, keep_versions=1)
    written = [put(f, "k", i) for i in range(4)]

    def crash(step):
        if step == "in-transaction":
            raise RuntimeError("crash")

    monkeypatch.setattr(compaction, "crash_point", crash)
    with pytest.raises(RuntimeError):
        s.compact()
    monkeypatch.undo()
    s = reopen(s, retention=Retention(keep_versions=1))
    assert seqs(s, "k") == written and s.status()["merged_through_seq"] == 0
    assert s.status()["retention"]["pruned_versions"] == 0
    s.compact()
    assert seqs(s, "k") == written[-2:]
    s.close_sync()


def test_catalog_rebuild_from_the_log_applies_the_policy_again(tmp_path):
    s, f, _clock = vault(tmp_path, keep_versions=1)
    written = [put(f, "k", i) for i in range(4)]
    s.compact()
    s.rebuild_catalog_from_log()
    assert seqs(s, "k") == written[-2:]
    assert s.status()["retention"]["pruned_versions"] == 2
    # the log still holds pruned records: rebuilt under a looser policy, they come back
    s = reopen(s)
    s.rebuild_catalog_from_log()
    assert seqs(s, "k") == written
    s.close_sync()


def test_the_link_has_no_request_that_prunes_deletes_or_rewrites():
    allowed = {protocol.HELLO, protocol.PUT_CHUNK, protocol.APPEND, protocol.GET_CHUNK,
               protocol.GET_MANIFEST, protocol.LIST, protocol.STATUS, protocol.GET_RECORDS}
    assert set(protocol.REQUEST_KINDS) <= allowed
    names = {protocol.KIND_NAMES[k].lower() for k in protocol.REQUEST_KINDS}
    assert not any(w in n for n in names for w in ("prune", "delete", "retention", "compact", "truncate"))


def write_config(tmp_path, text: str) -> str:
    p = tmp_path / "vault.toml"
    p.write_text(f'[vault]\ndata = "{tmp_path / "v"}"\n' + text)
    return str(p)


def test_retention_config_loads_and_reaches_the_store(tmp_path):
    assert load_vault_config(write_config(tmp_path, "")).retention == Retention()
    assert VaultConfig().retention == Retention(0, 0)
    cfg = load_vault_config(write_config(tmp_path, "[vault.retention]\nkeep_versions = 3\nkeep_days = 30.5\n"))
    assert cfg.retention == Retention(keep_versions=3, keep_days=30.5)
    cfg.fsync = False
    s = open_store(cfg)
    assert s.retention == cfg.retention and s.status()["retention"]["keep_days"] == 30.5
    s.close_sync()


@pytest.mark.parametrize("text", [
    "keep_versions = -1", "keep_days = -2", 'keep_versions = "3"', "keep_versions = 1.5",
    "keep_days = true", "keep_days = inf", "keep_days = nan", "keep_forever = 1",
])
def test_bad_retention_values_are_config_errors(tmp_path, text):
    with pytest.raises(ConfigError, match="retention"):
        load_vault_config(write_config(tmp_path, f"[vault.retention]\n{text}\n"))


def test_retention_that_is_not_a_table_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="retention"):
        load_vault_config(write_config(tmp_path, "retention = 5\n"))
