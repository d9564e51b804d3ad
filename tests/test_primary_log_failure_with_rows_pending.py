"""The primary log fails while a batch the vault acknowledged still waits
for its small bodies' rows.

A small body's record goes to the vault at once and into the primary log
only once its row of the small-chunk store is durable (replication.py,
`_start_local` / `_void_unless_stored`).  Here the log fails in between: an
earlier batch's append meets a full disk while the later batch is
acknowledged and its row is still being committed.  The failed log fails
that batch's appends at once; its client must still hear only once its
row's fate is known, and what it hears must hold for good: a 200 is
readable at once (the gateway degrades and serves the vault's records) and
after a restart on repaired storage; an error is visible nowhere, ever.
Once the gateway serves the vault's records, an acknowledged record cannot
be voided any more (its ABORT could not reach the vault, and readers see
it already): its client hears success even if its row then fails -- the
vault holds the record and its chunk.

Every step is real and held deterministically:
- the primary log directory is a small ext4 image, mounted in a private
  mount namespace (a holder process keeps it; nothing stays mounted on this
  machine), filled to the last block and frozen (fsfreeze): the next
  append blocks, and fails with ENOSPC once the file system is thawed;
- the row commit waits on the small-chunk store's lock file (flock, as
  another process of the gateway would take it);
- a row that fails: RLIMIT_FSIZE of the leader (prlimit(2)) lowered below
  the store's write-ahead log offsets, so its commit gets a short write
  (SQLITE_FULL, ENOSPC).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import subprocess
import sys
import threading
import time

import pytest
from botocore.exceptions import ClientError

from conftest import Deployment, cannot_mount, wait_until

IMAGE_BYTES = 16 << 20
BIG = 2 << 20          # a body of chunk files
# A's record (~7 KB: headers and metadata) needs a block the full log disk
# does not have, whatever the free bytes at the end of the segment's last one
BIG_HEADERS = {"Metadata": {"pad": "m" * 1900}, "ContentDisposition": "attachment; filename=" + "d" * 2500,
               "CacheControl": "c" * 2500}
SMALL = 3000           # a row of the small-chunk store
ROW_FAILS_ABOVE = 64   # bytes: the leader's RLIMIT_FSIZE when a row is to fail


def _unavailable() -> str | None:
    why = cannot_mount("an ext4 image", ("unshare", "nsenter", "mount", "mkfs.ext4", "fsfreeze"))
    if why is None and not os.path.exists("/dev/loop-control"):
        why = "no loop devices here"
    return why


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")


class LogDisk:
    """An ext4 image mounted at `mnt` in a private mount namespace that a
    holder process keeps; commands run in it through nsenter, and this
    process reaches its files through /proc/<holder>/root."""

    def __init__(self, image, mnt):
        with open(image, "wb") as f:
            f.truncate(IMAGE_BYTES)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
        self.mnt = mnt
        self.frozen = False
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -o loop "$0" "$1" && rmdir "$1/lost+found" && echo mounted && exec sleep 900',
             str(image), str(mnt)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "mounted":
            err = self.holder.stderr.read().strip()
            self.holder.wait()
            pytest.skip(f"cannot mount an ext4 image here: {err}")

    @property
    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", f"--wd={os.getcwd()}", "--"]

    def inside(self, *parts) -> str:
        return os.path.join(f"/proc/{self.holder.pid}/root", str(self.mnt).lstrip("/"), *parts)

    def fill(self) -> None:
        """Write a filler until the file system has no block left."""
        with open(self.inside("filler"), "wb") as f:
            for size in (1 << 20, 4096):
                try:
                    while True:
                        f.write(b"\0" * size)
                        f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
            try:
                os.fsync(f.fileno())
            except OSError as e:
                assert e.errno == errno.ENOSPC, e

    def empty(self) -> None:
        os.unlink(self.inside("filler"))

    def freeze(self) -> None:
        subprocess.run([*self.prefix, "fsfreeze", "-f", str(self.mnt)], check=True)
        self.frozen = True

    def thaw(self) -> None:
        subprocess.run([*self.prefix, "fsfreeze", "-u", str(self.mnt)], check=True)
        self.frozen = False

    def close(self) -> None:
        if self.frozen:
            self.thaw()
        self.holder.kill()             # the namespace and its mount go with it
        self.holder.wait()


@pytest.fixture
def dep(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[gateway]\nworkers = 1\n")       # the leader stores every row
    d = Deployment(tmp_path / "deploy", ack_timeout=10.0, gateway_config=cfg)
    log_dir = d.gateway.data / "log"
    log_dir.mkdir(parents=True)
    disk = LogDisk(tmp_path / "log.img", log_dir)
    d.gateway.prefix = disk.prefix
    d.disk = disk
    try:
        d.start()
        yield d
    finally:
        d.stop()
        disk.close()


def _answer(s3, key: str, body: bytes, into: dict, **kw) -> threading.Thread:
    def put():
        try:
            into[key] = s3.put_object(Bucket="race", Key=key, Body=body, **kw)["ResponseMetadata"]["HTTPStatusCode"]
        except ClientError as e:
            into[key] = e.response["Error"]["Code"]
    t = threading.Thread(target=put)
    t.start()
    return t


def _visible(s3, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket="race", Key=key)["Body"].read()
    except ClientError as e:
        assert e.response["Error"]["Code"] == "NoSuchKey", e.response
        return None


def _health(gw) -> dict:
    try:
        return gw.health()
    except OSError:
        return {}


def _log_fails_with_a_row_pending(d, row_fails: bool) -> tuple[dict, dict]:
    """Batch A (a large body) is acknowledged while the log disk is frozen
    and full; batch B (a small body) is acknowledged while its row waits on
    the lock; the disk thaws: A's append fails the log, and B's append with
    it while its row is pending.  Then the row is stored (or refused).
    Returns the PUTs' answers and bodies."""
    gw = d.gateway
    s3 = gw.client()
    s3.create_bucket(Bucket="race")
    s3.put_object(Bucket="race", Key="before", Body=b"written while all was well")
    bodies = {"A": os.urandom(BIG), "B": os.urandom(SMALL)}
    answers: dict = {}
    vault_before = d.vault.status()["last_seq"]

    d.disk.fill()
    d.disk.freeze()
    a = _answer(s3, "A", bodies["A"], answers, **BIG_HEADERS)
    wait_until(lambda: d.vault.status()["last_seq"] == vault_before + 1,
               "A acknowledged by the vault, its primary log append blocked", timeout=20)
    with open(gw.data / "chunks" / "small.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # B's row commit waits for this
        try:
            b = _answer(s3, "B", bodies["B"], answers)
            wait_until(lambda: d.vault.status()["last_seq"] == vault_before + 2,
                       "B acknowledged by the vault while its row waits", timeout=20)
            d.disk.thaw()                            # A's append: ENOSPC; the log fails
            a.join(20)
            assert answers.get("A") == 200, answers          # the vault holds it
            h = _health(gw)
            assert h.get("status") == "degraded" and h.get("primary_storage") == "failed", h
            assert "log" in h["degraded_reason"] and "No space left" in h["degraded_reason"], h
            time.sleep(0.5)
            assert b.is_alive(), f"B answered before its row's fate was known: {answers}"
            if row_fails:
                resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (ROW_FAILS_ABOVE, ROW_FAILS_ABOVE))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    b.join(20)
    assert not b.is_alive() and "B" in answers
    assert d.vault.status()["last_seq"] == vault_before + 2    # nothing more reached the vault
    return answers, bodies


def _holds_for_good(d, answers: dict, bodies: dict) -> None:
    """What each PUT heard holds now (served from the vault) and after a
    restart on repaired storage; and the two domains agree."""
    gw = d.gateway
    s3 = gw.client()

    def check():
        assert _visible(s3, "before") == b"written while all was well"
        for key, answer in answers.items():
            if answer == 200:
                assert _visible(s3, key) == bodies[key], key
            else:
                assert _visible(s3, key) is None, (key, answer)
    check()
    with pytest.raises(ClientError) as e:                   # the log failed: writes are refused
        s3.put_object(Bucket="race", Key="refused", Body=b"x")
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"

    gw.stop()
    d.disk.empty()                                           # storage repaired
    d.start_gateway()
    wait_until(lambda: _health(gw).get("status") == "ok", "gateway healthy", timeout=20)
    h = gw.health()
    assert h["last_seq"] == d.vault.status()["last_seq"] and h["pending_aborts"] == 0, h
    check()
    s3.put_object(Bucket="race", Key="after", Body=b"writes work again")
    assert _visible(s3, "after") == b"writes work again"
    (d.root / "deployment.json").write_text(json.dumps({      # verify where the log disk is mounted
        "gateway": f"127.0.0.1:{gw.port}", "vault": f"127.0.0.1:{d.vault.port}",
        "primary": "primary", "vault_data": "vault"}))
    v = subprocess.run([*d.disk.prefix, sys.executable, "-m", "airlock", "verify", "--data", str(d.root)],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and v.stdout.startswith("equal"), (v.stdout, v.stderr)


def test_a_small_put_whose_row_is_pending_when_the_log_fails_is_answered_once_the_row_is_stored(dep):
    answers, bodies = _log_fails_with_a_row_pending(dep, row_fails=False)
    assert answers == {"A": 200, "B": 200}, answers
    _holds_for_good(dep, answers, bodies)


def test_a_row_that_fails_after_the_log_failed_does_not_undo_what_the_vault_serves(dep):
    """The vault holds B with its chunk and the degraded gateway serves it
    already: B's row failing then cannot make B void, so its client hears
    success and B stays, here and after the restart."""
    answers, bodies = _log_fails_with_a_row_pending(dep, row_fails=True)
    _holds_for_good(dep, answers, bodies)
    assert answers == {"A": 200, "B": 200}, answers
