"""The primary's index meets a full disk: ENOSPC, nothing half-applied.

SQLite rolls a transaction back by itself when a write finds the disk full
(SQLITE_FULL).  The index used to issue its own ROLLBACK after that, which
failed ("cannot rollback - no transaction is active") and took the place of
the real error: a gateway degraded by a full disk (min_free_mib = 0) then
could not be restarted while the disk stayed full -- replaying the log into
the index ended in that traceback -- and the degraded-mode reason named the
rollback, not the disk.  Now the index raises ENOSPC naming its file (503
for a client, one line from the CLI), applies nothing of the refused batch,
and takes it once there is room.

- Without a mount: SQLite's `max_page_count` makes a real index file refuse
  to grow exactly as a full disk does.
- With a real full disk: a gateway whose data directory is a small tmpfs,
  mounted in a private mount namespace that a holder process keeps (nothing
  stays mounted on this machine once it is gone), restarted on it while it
  is full, then once there is room.  Skipped only where mounting is
  impossible.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import Deployment, cannot_mount, wait_until

from airlock.log import payload as P
from airlock.log.writer import LogWriter
from airlock.primary.engine import replay_log
from airlock.primary.index import Index

RECORDS = 40                      # object-puts in the batch that does not fit
TMPFS_BYTES = 16 << 20            # the gateway's whole data directory
OBJECTS = 150                     # PUTs before the restart (bounded), each with ~1.5 KiB of metadata
LEAVE_FREE = 160 << 10            # bytes left when the disk is filled: the start's own files fit, the index does not
START_TIMEOUT_S = 30.0


def bucket_create(seq: int) -> tuple:
    return seq, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0}


def object_put(seq: int) -> tuple:
    return seq, P.OBJECT_PUT, {"bucket": "b", "key": f"k{seq:04d}", "size": 0, "etag": "e", "mtime": 1.0,
                               "chunks": [], "meta": {"pad": "x" * 2000}}


def no_room_to_grow(index: Index) -> None:
    """The index file may not take another page: its next write that needs
    one fails as on a full disk (SQLITE_FULL)."""
    pages = index.db.execute("PRAGMA page_count").fetchone()[0]
    index.db.execute(f"PRAGMA max_page_count={pages}")


def room_again(index: Index) -> None:
    index.db.execute("PRAGMA max_page_count=1073741823")


def test_a_batch_that_meets_a_full_disk_raises_enospc_and_applies_nothing(tmp_path):
    path = str(tmp_path / "index.sqlite")
    index = Index(path)
    index.apply([bucket_create(1)])
    no_room_to_grow(index)
    batch = [object_put(s) for s in range(2, 2 + RECORDS)]

    with pytest.raises(OSError) as e:
        index.apply(batch)
    assert e.value.errno == errno.ENOSPC and e.value.filename == path, e.value
    assert isinstance(e.value.__cause__, sqlite3.OperationalError)       # SQLite's own error, kept
    assert not index.db.in_transaction
    assert index.applied_seq() == 1 and index.object("b", "k0002") is None and index.bucket("b")

    room_again(index)
    index.apply(batch)
    assert index.applied_seq() == 1 + RECORDS
    assert [m.key for m in index.all_objects()] == [f"k{s:04d}" for s in range(2, 2 + RECORDS)]
    index.close()


def test_replay_into_an_index_on_a_full_disk_stops_with_enospc_and_resumes_once_there_is_room(tmp_path):
    log_dir = tmp_path / "log"
    records = [bucket_create(1)] + [object_put(s) for s in range(2, 2 + RECORDS)]
    with LogWriter(log_dir) as w:
        for seq, rtype, body in records:
            assert w.append_sync(rtype, P.encode_payload(body)) == seq
    index = Index(str(tmp_path / "index.sqlite"))
    no_room_to_grow(index)

    with pytest.raises(OSError) as e:
        replay_log(index, str(log_dir))
    assert e.value.errno == errno.ENOSPC
    assert index.applied_seq() == 0

    room_again(index)
    assert replay_log(index, str(log_dir)) == len(records)
    assert index.applied_seq() == len(records) and len(list(index.all_objects())) == RECORDS
    index.close()


def test_sqlite_errors_are_told_apart_damage_storage_and_neither(tmp_path):
    from airlock import sqlerr
    db = sqlite3.connect(str(tmp_path / "x.sqlite"))
    db.execute("CREATE TABLE t (k PRIMARY KEY)")
    db.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as constraint:
        db.execute("INSERT INTO t VALUES (1)")
    db.close()
    assert sqlerr.storage_error(constraint.value, "x") is None and not sqlerr.is_damage(constraint.value)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError) as damaged:
        sqlite3.connect(str(garbage)).execute("SELECT * FROM sqlite_master")
    assert sqlerr.is_damage(damaged.value) and sqlerr.storage_error(damaged.value, str(garbage)) is None
    with pytest.raises(sqlite3.OperationalError) as cantopen:
        sqlite3.connect(str(tmp_path / "no" / "such" / "dir.sqlite"))
    err = sqlerr.storage_error(cantopen.value, str(tmp_path / "no" / "such" / "dir.sqlite"))
    assert err.errno == errno.EIO and err.filename.endswith("dir.sqlite")
    assert sqlerr.storage_error(sqlite3.DatabaseError("ours, no code"), "x") is None


def test_an_index_file_left_with_a_schema_and_no_applied_seq_is_rebuilt_not_a_crash(tmp_path):
    """What an older build left when the disk filled between the two rows of
    a new index's meta table (two autocommits; now one transaction)."""
    path = str(tmp_path / "index.sqlite")
    Index(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DELETE FROM meta WHERE k='applied_seq'")
    db.close()

    index, rebuilt = Index.open_or_rebuild(path)
    assert rebuilt and index.applied_seq() == 0
    index.close()


# ---------------------------------------------------------------------- a real full disk
class SmallDisk:
    """A tmpfs at `mnt`, mounted in a private mount namespace that a holder
    process keeps alive; commands run in it through nsenter, and this
    process reaches its files through /proc/<holder>/root."""

    def __init__(self, mnt):
        self.mnt = mnt
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs -o size={TMPFS_BYTES} tmpfs "$0" && echo mounted && exec sleep 600', str(mnt)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "mounted":
            err = self.holder.stderr.read().strip()
            self.holder.wait()
            pytest.skip(f"cannot mount a tmpfs here: {err}")

    @property
    def prefix(self) -> list[str]:
        # --wd: entering a mount namespace moves to its root; a relative
        # PYTHONPATH (PYTHONPATH=src) must keep meaning this tree
        return ["nsenter", "-t", str(self.holder.pid), "-m", f"--wd={os.getcwd()}", "--"]

    def inside(self, *parts) -> str:
        return os.path.join(f"/proc/{self.holder.pid}/root", str(self.mnt).lstrip("/"), *parts)

    def fill(self, leave: int) -> None:
        st = os.statvfs(self.inside())
        with open(self.inside("filler"), "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))

    def close(self) -> None:
        self.holder.send_signal(signal.SIGKILL)        # the namespace and its mount go with it
        self.holder.wait()


def needs_mount() -> str | None:
    return cannot_mount("a tmpfs", ("unshare", "nsenter", "mount"))


@pytest.mark.skipif(needs_mount() is not None, reason=needs_mount() or "")
def test_a_gateway_restarted_on_a_full_disk_refuses_in_one_line_and_starts_once_there_is_room(tmp_path):
    root = tmp_path / "deploy"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[gateway]\nmin_free_mib = 0\n")
    dep = Deployment(root, ack_timeout=5.0, gateway_config=cfg)
    mnt = tmp_path / "gwfs"
    mnt.mkdir()
    disk = SmallDisk(mnt)
    gw = dep.gateway
    gw.data = mnt / "primary"            # on the tmpfs; its link keys stay at deploy/primary/keys
    gw.log_path = tmp_path / "gateway.log"
    gw.prefix = disk.prefix
    try:
        dep.vault.start()
        dep.start_gateway()
        s3 = gw.client()
        s3.create_bucket(Bucket="full")
        bodies = {}
        for i in range(OBJECTS):
            key = f"obj-{i:04d}"
            bodies[key] = os.urandom((i * 7919) % 40000)
            s3.put_object(Bucket="full", Key=key, Body=bodies[key], Metadata={"pad": "m" * 1500})
        last = gw.health()["last_seq"]
        assert gw.stop() == 0

        # the index lags the log (here: deleted, which docs/operations.md allows
        # at any time) and the disk has no room for what replay writes into it
        for name in os.listdir(disk.inside("primary")):
            if name.startswith("index.sqlite"):
                os.unlink(disk.inside("primary", name))
        disk.fill(leave=LEAVE_FREE)
        r = subprocess.run([*disk.prefix, sys.executable, "-m", "airlock", "gateway", "--data", str(gw.data),
                            "--listen", f"127.0.0.1:{gw.port}", "--config", str(cfg), *dep._gateway_args()],
                           capture_output=True, text=True, timeout=START_TIMEOUT_S,
                           env=dict(os.environ, AIRLOCK_ACCESS_KEY="unused", AIRLOCK_SECRET_KEY="unused"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert "No space left on device" in lines[0] and "index.sqlite" in lines[0], r.stderr

        # room again: the same data directory starts and serves every acknowledged object
        os.unlink(disk.inside("filler"))
        dep.start_gateway()
        s3 = gw.client()
        assert gw.health()["last_seq"] == last == dep.vault.status()["last_seq"]
        listed = {o["Key"] for o in s3.list_objects_v2(Bucket="full").get("Contents", [])}
        assert listed == set(bodies)
        for key, body in bodies.items():
            assert s3.get_object(Bucket="full", Key=key)["Body"].read() == body
        more = os.urandom(1000)
        s3.put_object(Bucket="full", Key="after", Body=more)
        assert s3.get_object(Bucket="full", Key="after")["Body"].read() == more
        wait_until(lambda: dep.vault.status()["last_seq"] == gw.health()["last_seq"],
                   "vault and primary logs to end at the same record")
        # airlock verify, where the primary's data directory is visible: in the namespace
        (root / "deployment.json").write_text(json.dumps({
            "gateway": f"127.0.0.1:{gw.port}", "vault": f"127.0.0.1:{dep.vault.port}",
            "primary": str(gw.data), "vault_data": "vault"}))
        v = subprocess.run([*disk.prefix, sys.executable, "-m", "airlock", "verify", "--data", str(root)],
                           capture_output=True, text=True, timeout=120)
        assert v.returncode == 0 and v.stdout.startswith("equal"), (v.stdout, v.stderr)
    finally:
        dep.stop()
        disk.close()


_OPEN_ON_THE_DISK = """
import errno, json, os, sys
from airlock.chunk.small import SmallChunks
from airlock.primary.index import Index
d, step = sys.argv[1], sys.argv[2]
out = {}
if step == "make":
    from airlock.log import payload as P
    index = Index(os.path.join(d, "index.sqlite"))
    index.apply([(1, P.BUCKET_CREATE, {"bucket": "b", "owner": "o", "created": 1.0})]
                + [(s, P.OBJECT_PUT, {"bucket": "b", "key": f"k{s}", "size": 0, "etag": "e", "mtime": 1.0,
                                      "chunks": [], "meta": {}}) for s in range(2, 12)])
    index.close()
    os.mkdir(os.path.join(d, "chunks"))
    SmallChunks(os.path.join(d, "chunks")).close()
else:
    for name, opener in (("index", lambda: Index.open_or_rebuild(os.path.join(d, "index.sqlite"))),
                         ("small", lambda: SmallChunks(os.path.join(d, "chunks")))):
        try:
            got = opener()
            out[name] = ["opened", got[1], got[0].applied_seq()] if name == "index" else ["opened"]
        except OSError as e:
            out[name] = ["OSError", e.errno, e.filename]
    out["files"] = sorted(os.listdir(d))
print(json.dumps(out))
"""


@pytest.mark.skipif(needs_mount() is not None, reason=needs_mount() or "")
def test_a_good_index_and_chunk_store_opened_on_a_full_disk_are_kept_and_the_error_is_enospc(tmp_path):
    """After a clean stop a WAL database has no -shm file; opening it on a
    full disk cannot create one (SQLite: "disk I/O error" or "unable to open
    database file"), which is a full disk, not a damaged file: the index
    must not be deleted (it was: open_or_rebuild took every DatabaseError
    for damage), and neither store may end in a traceback."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    disk = SmallDisk(mnt)

    def run(step: str) -> dict:
        r = subprocess.run([*disk.prefix, sys.executable, "-c", _OPEN_ON_THE_DISK, str(mnt), step],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    try:
        run("make")
        assert not os.path.exists(disk.inside("index.sqlite-shm"))
        disk.fill(leave=0)
        full = run("open")
        assert full["index"] == ["OSError", errno.ENOSPC, str(mnt / "index.sqlite")], full
        assert full["small"][:2] == ["OSError", errno.ENOSPC], full
        assert "index.sqlite" in full["files"], full
        os.unlink(disk.inside("filler"))
        again = run("open")
        assert again["index"] == ["opened", False, 11] and again["small"] == ["opened"], again
    finally:
        disk.close()
