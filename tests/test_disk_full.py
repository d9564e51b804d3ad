"""A disk fills up, then has space again: no operator needed.

A real full file system: the vault (or the gateway) runs on its own small
ext4 image, mounted in a private mount namespace that only that process
sees (so nothing on this machine is left mounted when it exits), with a
filler file that leaves a few MiB free.  PUTs fill the rest until a write
fails with ENOSPC; once the filler is removed, writes resume by themselves.

- The vault's disk: the vault recovers in place (VaultStore.reopen).  Every
  acknowledged object survives, no object whose PUT failed ever becomes
  visible, and a restart of the vault on the same image finds the same state.
- The primary's disk: a PUT whose chunk does not fit, and any change while
  less than `min_free_mib` is free, answers 503 ServiceUnavailable (nothing
  stored, nothing sent to the vault), reads go on, the gateway never
  degrades, and the next PUT after space is freed succeeds.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from botocore.exceptions import ClientError
from conftest import Deployment, Vault, cannot_mount, wait_until

IMAGE_BYTES = 64 * 2**20
FREE_AFTER_FILLER = 6 * 2**20     # what the vault may still write before the disk is full
BODY = 512 * 1024
MAX_PUTS = 60                     # bounded: the disk is full long before this
ADMIN_TIMEOUT_S = 20.0
MIN_FREE_MIB = 2                  # the gateway's reserve for its log and index on the small image


def _unavailable() -> str | None:
    why = cannot_mount("a file system image", ("unshare", "mount", "mkfs.ext4"))
    if why is not None:
        return why
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices here"
    return None


_skip = _unavailable()
needs_small_disk = pytest.mark.skipif(_skip is not None, reason=_skip or "")


def small_disk_prefix(image, mnt, filler: bool) -> list[str]:
    """A command prefix: mount `image` at `mnt` in a new private mount
    namespace (leaving FREE_AFTER_FILLER bytes free with a filler file, if
    `filler`), then exec the rest of the command line in it."""
    fill = ""
    if filler:
        fill = (f'avail=$(df --output=avail -B1 "$M" | tail -1); '
                f'head -c $((avail - {FREE_AFTER_FILLER})) /dev/zero > "$M/filler" && sync && ')
    script = f'M={mnt}; mount -o loop {image} "$M" && {fill}exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "on-small-disk"]


def make_image(path) -> None:
    with open(path, "wb") as f:
        f.truncate(IMAGE_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(path)], check=True, capture_output=True)


def fill_until_refused(s3, bucket: str) -> tuple[dict, str, dict]:
    """PUT BODY-sized objects until one is refused: (acknowledged bodies by
    key, the refused key, its S3 error).  Every PUT is acknowledged or
    refused, nothing in between."""
    acked = {}
    for i in range(MAX_PUTS):
        body = os.urandom(BODY)
        try:
            s3.put_object(Bucket=bucket, Key=f"k{i}", Body=body)
            acked[f"k{i}"] = body
        except ClientError as e:
            return acked, f"k{i}", e.response["Error"]
    raise AssertionError(f"{MAX_PUTS} PUTs of {BODY} bytes fit into {FREE_AFTER_FILLER} bytes")


def put_works_for(s3, bucket, key, body):
    def attempt() -> bool:
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=body)
            return True
        except ClientError:
            return False
    return attempt


class VaultOnSmallDisk(Vault):
    """A vault whose data directory is a small ext4 image, mounted in the
    vault's own mount namespace.  Its files are reached from outside through
    /proc/<pid>/root."""

    def __init__(self, root, image):
        super().__init__(root)
        self.image = image
        self.mnt = self.root / "vaultfs"
        self.mnt.mkdir(exist_ok=True)

    def inside(self, *parts) -> str:
        return os.path.join(f"/proc/{self.proc.pid}/root", str(self.mnt).lstrip("/"), *parts)

    def start(self, filler: bool = False) -> "VaultOnSmallDisk":
        cmd = [*small_disk_prefix(self.image, self.mnt, filler),
               sys.executable, "-m", "airlock", "vault", "--data", str(self.mnt / "vault"),
               "--listen", f"127.0.0.1:{self.port}", "--keys", str(self.keys)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while not os.path.exists(self.inside("vault", "admin.sock")):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vault exited early with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vault did not start:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def admin(self, request: dict) -> dict:
        from airlock.vault.daemon import admin_request
        # the socket's path through /proc/<pid>/root is too long for AF_UNIX;
        # a descriptor of its directory gives a short one
        fd = os.open(self.inside("vault"), os.O_PATH | os.O_DIRECTORY)
        try:
            ans = admin_request(f"/proc/self/fd/{fd}/admin.sock", request)
        finally:
            os.close(fd)
        assert ans.get("ok"), ans
        return ans["result"]


@needs_small_disk
def test_a_vault_whose_disk_filled_up_takes_writes_again_once_it_has_space(tmp_path):
    root = tmp_path / "deploy"
    dep = Deployment(root, ack_timeout=5.0)
    image = tmp_path / "vault.img"
    make_image(image)
    dep.vault = vault = VaultOnSmallDisk(root, image)
    dep.link_port = vault.port
    vault.start(filler=True)
    try:
        dep.start_gateway()
        s3 = dep.gateway.client()
        s3.create_bucket(Bucket="full")

        # 1. fill the vault's disk
        acked, refused, error = fill_until_refused(s3, "full")
        failed = {refused: error["Code"]}
        assert len(acked) >= 3
        assert error["Code"] == "ServiceUnavailable", error
        status = vault.status()
        assert "No space left" in status.get("failed", ""), status

        # 2. while it stays full: writes fail, reads of what was acknowledged work
        with pytest.raises(ClientError):
            s3.put_object(Bucket="full", Key="while-full", Body=b"x" * 1000)
        for k, body in acked.items():
            assert s3.get_object(Bucket="full", Key=k)["Body"].read() == body
        # (not asserted: the vault's status still saying "failed" here.  Its
        # recovery reopens the store every few seconds whether or not the disk
        # has space -- reopening writes nothing -- so on a loaded machine the
        # reads above can outlast the failed state; the next append fails again.)

        # 3. space again: the vault recovers by itself, writes resume
        os.unlink(vault.inside("filler"))
        after = os.urandom(BODY)
        wait_until(put_works_for(s3, "full", "after", after), "a PUT to succeed once the vault's disk has space",
                   timeout=30, interval=0.5)
        assert "failed" not in vault.status()
        assert "recovered in place" in vault.log_text()

        # 4. what was acknowledged is there; what failed is visible nowhere
        for k, body in acked.items():
            assert s3.get_object(Bucket="full", Key=k)["Body"].read() == body
        assert s3.get_object(Bucket="full", Key="after")["Body"].read() == after
        for k in [*failed, "while-full"]:
            with pytest.raises(ClientError) as e:
                s3.head_object(Bucket="full", Key=k)
            assert e.value.response["Error"]["Code"] in ("404", "NoSuchKey")
        listed = {o["Key"] for o in s3.list_objects_v2(Bucket="full").get("Contents", [])}
        assert listed == {*acked, "after"}
        wait_until(lambda: vault.status()["last_seq"] == dep.gateway.health()["last_seq"],
                   "vault and primary logs to end at the same record")

        # 5. the vault's disk holds the same state after a restart (a new mount of the image)
        last = vault.status()["last_seq"]
        vault.stop()
        vault.start()
        assert vault.status()["last_seq"] == last
        assert vault.status()["overlays"]
        again = os.urandom(BODY)
        wait_until(put_works_for(s3, "full", "again", again), "a PUT after the vault's restart", timeout=30, interval=0.5)
        assert s3.get_object(Bucket="full", Key="again")["Body"].read() == again
    finally:
        dep.stop()



@needs_small_disk
@pytest.mark.parametrize("min_free_mib", [0, MIN_FREE_MIB])     # 0: the chunk write meets ENOSPC itself
def test_a_primary_whose_disk_filled_up_answers_503_and_takes_writes_again_once_it_has_space(tmp_path,
                                                                                              min_free_mib):
    root = tmp_path / "deploy"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"[gateway]\nmin_free_mib = {min_free_mib}\n")      # the image is only 64 MiB
    dep = Deployment(root, ack_timeout=5.0, gateway_config=cfg)
    image = tmp_path / "primary.img"
    make_image(image)
    mnt = root / "gwfs"
    mnt.mkdir()
    gw = dep.gateway
    gw.data = mnt / "primary"           # on the small disk; its link keys stay at deploy/primary/keys
    gw.prefix = small_disk_prefix(image, mnt, filler=True)
    dep.vault.start()
    try:
        dep.start_gateway()
        inside = f"/proc/{gw.proc.pid}/root{mnt}"
        s3 = gw.client()
        s3.create_bucket(Bucket="full")
        acked, _refused, error = fill_until_refused(s3, "full")
        # the gateway's log goes with a failure: it once answered InternalError
        # here in a full run and the cause was never seen (2026-11-27)
        assert error["Code"] == "ServiceUnavailable" and "storage is full" in error["Message"], \
            (error, gw.log_text()[-6000:])
        assert len(acked) >= 3
        assert "primary storage full" in gw.log_text()
        if min_free_mib == 0:
            assert "No space left" in gw.log_text()          # ENOSPC from the chunk write, as 503
        for k, body in acked.items():                        # reads go on
            assert s3.get_object(Bucket="full", Key=k)["Body"].read() == body
        assert gw.health()["status"] == "ok"                 # a refused chunk is not a failed log
        if min_free_mib:
            # below min_free_mib no change is committed at all, so the primary log
            # and index never meet a full disk after the vault acknowledged one
            vault_last = dep.vault.status()["last_seq"]
            with pytest.raises(ClientError) as e:
                s3.delete_object(Bucket="full", Key="k0")
            assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
            assert dep.vault.status()["last_seq"] == vault_last and gw.health()["status"] == "ok"
            assert s3.get_object(Bucket="full", Key="k0")["Body"].read() == acked["k0"]

        os.unlink(f"{inside}/filler")
        after = os.urandom(BODY)
        wait_until(put_works_for(s3, "full", "after", after), "a PUT once the primary's disk has space",
                   timeout=30, interval=0.5)
        assert s3.get_object(Bucket="full", Key="after")["Body"].read() == after
        listed = {o["Key"] for o in s3.list_objects_v2(Bucket="full").get("Contents", [])}
        assert listed == {*acked, "after"}
        # (`airlock verify` reads the primary's data directory, which only the gateway can see)
        assert dep.vault.status()["last_seq"] == gw.health()["last_seq"]
    finally:
        dep.stop()


@pytest.mark.parametrize("value", ['"lots"', "-1", "1.5", "true"])
def test_a_bad_min_free_in_the_config_file_is_refused_with_one_line(tmp_path, value):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f"[gateway]\nmin_free_mib = {value}\n")
    r = subprocess.run([sys.executable, "-m", "airlock", "gateway", "--data", str(tmp_path / "p"),
                        "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "[gateway] min_free_mib" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
