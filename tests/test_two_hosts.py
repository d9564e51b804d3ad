"""The two domains on two hosts, for real: network namespaces, Unix users, mutual TLS.

Three hosts are network namespaces made by this test (tests/netns.py):

    clientns 10.231.1.1 --veth-- 10.231.1.2 gwns 10.231.0.1 --veth (the link)-- 10.231.0.2 vaultns

The vault runs as `airlock-vault-test`, the gateway as `airlock-gw-test`;
each has its own data directory (mode 0700) and creates its own link
identity; only certificates are copied across.  The client (boto3, aws-cli)
has no route to the vault.  Every process is stopped by PID and the
namespaces are deleted at the end, whatever happens.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import Hosts, Proc, RuntimeView, as_user_can, ensure_user, netns_unavailable  # noqa: E402

VAULT_USER = "airlock-vault-test"
GW_USER = "airlock-gw-test"
GW_LINK, VAULT_LINK = "10.231.0.1", "10.231.0.2"      # the controlled link (gwns <-> vaultns)
CLIENT_ADDR, GW_S3 = "10.231.1.1", "10.231.1.2"       # the client network (clientns <-> gwns)
LINK_PORT, S3_PORT = 9001, 9000
ACCESS_KEY = "AKIATWOHOSTSTEST0001"
SECRET_KEY = "two-hosts-secret-key-for-airlock-000000000"
ACK_TIMEOUT_S = 3.0
START_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 120.0
RECONNECT_DEADLINE_S = 30.0

_skip = netns_unavailable()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")


def _mkdir(path: Path, owner: str | None, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        shutil.chown(path, owner, owner)
    os.chmod(path, mode)
    return path


def _copy_cert(src: Path, dst: Path, owner: str) -> None:
    """The operator's out-of-band step: a certificate, never a key, to the other host."""
    assert src.suffix == ".crt"
    shutil.copyfile(src, dst)
    shutil.chown(dst, owner, owner)
    os.chmod(dst, 0o644)


class TwoHosts:
    def __init__(self, root: Path):
        self.root = root
        self.hosts = Hosts()
        self.procs: list[Proc] = []
        self.vault_home = _mkdir(root / "vault-host", VAULT_USER, 0o700)
        self.gw_home = _mkdir(root / "gw-host", GW_USER, 0o700)
        self.vault_data = _mkdir(self.vault_home / "data", VAULT_USER, 0o700)
        self.gw_data = _mkdir(self.gw_home / "data", GW_USER, 0o700)
        self.vault_keys = self.vault_home / "keys"
        self.gw_keys = self.gw_home / "keys"
        self.logs = _mkdir(root / "logs", None, 0o700)
        self.view = RuntimeView(root)

    # -------------------------------------------------------------- network
    def build_network(self) -> None:
        for host in ("vault", "gw", "client"):
            self.hosts.add_host(host)
        self.hosts.link("gw", f"{GW_LINK}/30", "vault", f"{VAULT_LINK}/30")
        self.hosts.link("client", f"{CLIENT_ADDR}/30", "gw", f"{GW_S3}/30")

    # -------------------------------------------------------------- commands
    def as_user(self, host: str, user: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        home = str(self.vault_home if user == VAULT_USER else self.gw_home)
        cmd = self.hosts.exec_prefix(host) + self.view.command(user, [sys.executable, "-m", "airlock", *args])
        return subprocess.run(cmd, env=self.view.env(home), cwd=home, capture_output=True, text=True,
                              timeout=timeout)

    def as_root(self, host: str, code: str, timeout: float = CLIENT_TIMEOUT_S) -> dict:
        """Run Python code as root on a host; its last stdout line is JSON."""
        env = dict(os.environ, PYTHONPATH=self.view.src, ENDPOINT=f"http://{GW_S3}:{S3_PORT}",
                   AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_PAGER="",
                   NO_PROXY="*", no_proxy="*")
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(k, None)
        r = subprocess.run(self.hosts.exec_prefix(host) + [sys.executable, "-c", textwrap.dedent(code)],
                           env=env, cwd=str(self.root), capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"python on {host} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"
        return json.loads(r.stdout.strip().splitlines()[-1])

    def as_s3_client(self, code: str) -> dict:
        """Python code with a boto3 client `s3` for the gateway, as root on the client host."""
        return self.as_root("client", CLIENT_PRELUDE + textwrap.dedent(code))

    def aws(self, *args: str, timeout: float = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess:
        """The real aws-cli, as root on the client host."""
        env = dict(os.environ, PYTHONPATH=self.view.src, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                   AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_PAGER="", NO_PROXY="*")
        cmd = self.hosts.exec_prefix("client") + [sys.executable, "-m", "awscli", "--endpoint-url",
                                                  f"http://{GW_S3}:{S3_PORT}", *args]
        r = subprocess.run(cmd, env=env, cwd=str(self.root), capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"aws {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"
        return r

    # -------------------------------------------------------------- set-up
    def make_keys(self) -> None:
        r = self.as_user("vault", VAULT_USER, "keys", "--dir", str(self.vault_keys), "--role", "vault")
        assert r.returncode == 0, r.stderr
        r = self.as_user("gw", GW_USER, "keys", "--dir", str(self.gw_keys), "--role", "primary")
        assert r.returncode == 0, r.stderr
        assert (self.vault_keys / "vault.key").stat().st_uid == ensure_user(VAULT_USER).pw_uid
        assert (self.gw_keys / "primary.key").stat().st_uid == ensure_user(GW_USER).pw_uid
        _copy_cert(self.vault_keys / "vault.crt", self.gw_keys / "vault.crt", GW_USER)
        _copy_cert(self.gw_keys / "primary.crt", self.vault_keys / "primary.crt", VAULT_USER)

    def write_configs(self) -> None:
        self.vault_config = self.vault_home / "vault.toml"
        self.vault_config.write_text(textwrap.dedent(f"""\
            [vault]
            listen = "{VAULT_LINK}:{LINK_PORT}"
            data = "{self.vault_data}"
            keys = "{self.vault_keys}"
            """))
        self.gw_config = self.gw_home / "gateway.toml"
        self.gw_config.write_text(textwrap.dedent(f"""\
            [gateway]
            listen = "{GW_S3}:{S3_PORT}"
            data = "{self.gw_data}"

            [link]
            vault = "{VAULT_LINK}:{LINK_PORT}"
            keys = "{self.gw_keys}"
            ack_timeout = {ACK_TIMEOUT_S}

            [[users]]
            access_key = "{ACCESS_KEY}"
            secret_key = "{SECRET_KEY}"
            user_id = "two-hosts"
            """))
        for path, owner in ((self.vault_config, VAULT_USER), (self.gw_config, GW_USER)):
            shutil.chown(path, owner, owner)
            os.chmod(path, 0o600)

    def _daemon(self, name: str, host: str, user: str, args: list[str]) -> Proc:
        home = str(self.vault_home if user == VAULT_USER else self.gw_home)
        argv = self.hosts.exec_prefix(host) + self.view.command(user, [sys.executable, "-m", "airlock", *args])
        p = Proc(name, argv, self.view.env(home), home, self.logs / f"{name}.log")
        self.procs.append(p)
        return p

    def start_vault(self) -> Proc:
        self.vault = self._daemon("vault", "vault", VAULT_USER, ["vault", "--config", str(self.vault_config)])
        mark = len(self.vault.log_text())
        self.vault.start().wait_for_log("airlock vault ready", START_TIMEOUT_S, start_at=mark)
        return self.vault

    def start_gateway(self) -> Proc:
        self.gateway = self._daemon("gateway", "gw", GW_USER, ["gateway", "--config", str(self.gw_config)])
        mark = len(self.gateway.log_text())
        self.gateway.start().wait_for_log("airlock gateway ready", START_TIMEOUT_S, start_at=mark)
        return self.gateway

    def close(self) -> list[str]:
        for p in reversed(self.procs):
            p.stop()
        return self.hosts.destroy()


@pytest.fixture
def two_hosts():
    for user in (VAULT_USER, GW_USER):
        ensure_user(user)
    root = Path(tempfile.mkdtemp(prefix="airlock-two-hosts-"))
    os.chmod(root, 0o755)            # traversable: each domain's own directory below is 0700
    t = TwoHosts(root)
    try:
        t.build_network()
        yield t
    finally:
        leftovers = t.close()
        shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"processes left in the namespaces were killed: {leftovers}"


# the client's S3 operations (boto3, as root on the client host)
CLIENT_PRELUDE = """
import hashlib, json, os, boto3
from botocore.config import Config
from botocore.exceptions import ClientError
s3 = boto3.client("s3", endpoint_url=os.environ["ENDPOINT"], region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                connect_timeout=5, read_timeout=30))
def blob(seed, size):
    out, block = bytearray(), hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])
def md5(b): return hashlib.md5(b).hexdigest()
"""


def test_two_domains_on_two_hosts(two_hosts: TwoHosts):
    t = two_hosts
    t0 = time.monotonic()

    # both users can run this interpreter and this airlock
    r = t.as_user("gw", GW_USER, "--version")
    assert r.returncode == 0, f"the gateway user cannot run airlock:\n{r.stderr}"

    t.make_keys()
    t.write_configs()

    # each domain's files: its own user, mode 0700, out of the other's reach
    for path, owner, other in ((t.vault_data, VAULT_USER, GW_USER), (t.gw_data, GW_USER, VAULT_USER)):
        st = path.stat()
        assert st.st_uid == ensure_user(owner).pw_uid and (st.st_mode & 0o777) == 0o700
        assert not as_user_can(other, "-r", path) and not as_user_can(other, "-x", path)
        assert as_user_can(owner, "-r", path) and as_user_can(owner, "-w", path)
    assert not as_user_can(GW_USER, "-r", t.vault_keys / "vault.key")
    assert not as_user_can(VAULT_USER, "-r", t.gw_keys / "primary.key")
    assert sorted(p.name for p in t.vault_keys.iterdir()) == ["primary.crt", "vault.crt", "vault.key"]
    assert sorted(p.name for p in t.gw_keys.iterdir()) == ["primary.crt", "primary.key", "vault.crt"]

    t.start_vault()
    t.start_gateway()

    # the data the vault wrote stays unreadable for the gateway's user
    assert (t.vault_data.stat().st_mode & 0o777) == 0o700
    assert any(t.vault_data.iterdir())
    assert not as_user_can(GW_USER, "-r", t.vault_data)
    # ... and the processes run as their own users
    for proc, user in ((t.vault, VAULT_USER), (t.gateway, GW_USER)):
        uid = int(Path(f"/proc/{proc.pid}/status").read_text().split("\nUid:")[1].split()[0])
        assert uid == ensure_user(user).pw_uid, (proc.name, uid)

    # the client host has no route to the vault, the gateway host has one
    got = t.as_root("client", f"""
        import json, socket
        try:
            socket.create_connection(("{VAULT_LINK}", {LINK_PORT}), timeout=3).close()
            print(json.dumps({{"connected": True}}))
        except OSError as e:
            print(json.dumps({{"connected": False, "error": repr(e)}}))
        """)
    assert got["connected"] is False, got

    # S3 from the client host: boto3
    got = t.as_s3_client("""
        s3.create_bucket(Bucket="two-hosts")
        small, big = blob("small", 1234), blob("big", 9 * 1024 * 1024 + 17)   # big: several chunks
        s3.put_object(Bucket="two-hosts", Key="small.txt", Body=small)
        s3.put_object(Bucket="two-hosts", Key="dir/big.bin", Body=big)
        out = {"small": md5(s3.get_object(Bucket="two-hosts", Key="small.txt")["Body"].read()) == md5(small),
               "big": md5(s3.get_object(Bucket="two-hosts", Key="dir/big.bin")["Body"].read()) == md5(big),
               "keys": sorted(o["Key"] for o in s3.list_objects_v2(Bucket="two-hosts")["Contents"])}
        print(json.dumps(out))
        """)
    assert got == {"small": True, "big": True, "keys": ["dir/big.bin", "small.txt"]}, got

    # S3 from the client host: aws-cli, with a multipart upload (over its 8 MiB threshold)
    upload = t.root / "upload.bin"
    upload.write_bytes(os.urandom(17 * 1024 * 1024 + 5))
    t.aws("s3", "cp", str(upload), "s3://two-hosts/cli/multipart.bin")
    download = t.root / "download.bin"
    t.aws("s3", "cp", "s3://two-hosts/cli/multipart.bin", str(download))
    assert download.read_bytes() == upload.read_bytes()
    listing = t.aws("s3", "ls", "--recursive", "s3://two-hosts/").stdout
    assert "cli/multipart.bin" in listing and "dir/big.bin" in listing and "small.txt" in listing

    # the two domains agree: verify, as the gateway's user on the gateway host
    r = t.as_user("gw", GW_USER, "verify", "--config", str(t.gw_config), timeout=120)
    assert r.returncode == 0, f"verify failed:\n{r.stdout}\n{r.stderr}"
    assert "equal: 1 bucket(s), 3 object(s)" in r.stdout, r.stdout

    # the vault stops: writes are refused with 503, reads go on
    assert t.vault.stop() == 0
    got = t.as_s3_client("""
        out = {}
        try:
            s3.put_object(Bucket="two-hosts", Key="while-down.txt", Body=b"lost")
            out["put"] = 200
        except ClientError as e:
            out["put"] = e.response["ResponseMetadata"]["HTTPStatusCode"]
            out["code"] = e.response["Error"]["Code"]
        out["get"] = md5(s3.get_object(Bucket="two-hosts", Key="small.txt")["Body"].read()) == md5(blob("small", 1234))
        try:
            s3.head_object(Bucket="two-hosts", Key="while-down.txt")
            out["visible"] = True
        except ClientError as e:
            out["visible"] = e.response["ResponseMetadata"]["HTTPStatusCode"] != 404
        print(json.dumps(out))
        """)
    assert got == {"put": 503, "code": "ServiceUnavailable", "get": True, "visible": False}, got

    # the vault is back: writes work again (once the gateway has reconnected)
    t.start_vault()
    got = t.as_s3_client(f"""
        import time
        deadline, tries, status = time.monotonic() + {RECONNECT_DEADLINE_S}, 0, None
        while time.monotonic() < deadline:
            tries += 1
            try:
                s3.put_object(Bucket="two-hosts", Key="after.txt", Body=b"back")
                status = 200
                break
            except ClientError as e:
                status = e.response["ResponseMetadata"]["HTTPStatusCode"]
                time.sleep(0.5)
        body = s3.get_object(Bucket="two-hosts", Key="after.txt")["Body"].read() if status == 200 else None
        print(json.dumps({{"status": status, "tries": tries, "body": body and body.decode()}}))
        """)
    assert got["status"] == 200 and got["body"] == "back", got
    r = t.as_user("gw", GW_USER, "verify", "--config", str(t.gw_config), timeout=120)
    assert r.returncode == 0 and "4 object(s)" in r.stdout, f"{r.stdout}\n{r.stderr}"

    # failover reads and repair across the hosts: damage the primary's chunks,
    # the client still reads exact bytes, scrub (as the gateway's user) is clean
    chunk_files = sorted(p for p in (t.gw_data / "chunks").glob("??/*") if p.is_file())
    assert len(chunk_files) >= 3
    chunk_files[0].unlink()
    raw = bytearray(chunk_files[1].read_bytes())
    raw[-1] ^= 0xFF
    chunk_files[1].write_bytes(bytes(raw))
    got = t.as_s3_client("""
        out = {k: md5(s3.get_object(Bucket="two-hosts", Key=k)["Body"].read())
               for k in ("small.txt", "dir/big.bin", "cli/multipart.bin")}
        out["small-ok"] = out["small.txt"] == md5(blob("small", 1234))
        print(json.dumps(out))
        """)
    assert got.pop("small-ok"), got
    r = t.as_user("gw", GW_USER, "scrub", "--config", str(t.gw_config), timeout=120)
    assert r.returncode == 0 and "remaining=0" in r.stdout, f"{r.stdout}\n{r.stderr}"

    # the primary's data is lost: restore it from the vault, over the link only
    t.gateway.stop()
    for sub in ("log", "chunks", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        p = t.gw_data / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    r = t.as_user("gw", GW_USER, "restore", "--config", str(t.gw_config), timeout=180)
    assert r.returncode == 0 and "failed=0" in r.stdout, f"{r.stdout}\n{r.stderr}"
    t.start_gateway()
    again = t.as_s3_client("""
        out = {k: md5(s3.get_object(Bucket="two-hosts", Key=k)["Body"].read())
               for k in ("small.txt", "dir/big.bin", "cli/multipart.bin")}
        print(json.dumps(out))
        """)
    assert again == got, (again, got)
    r = t.as_user("gw", GW_USER, "verify", "--config", str(t.gw_config), timeout=120)
    assert r.returncode == 0 and "4 object(s)" in r.stdout, f"{r.stdout}\n{r.stderr}"

    # a foreign identity on the gateway host is refused by the vault
    foreign = _mkdir(t.root / "foreign", None, 0o700)
    r = subprocess.run([sys.executable, "-m", "airlock", "keys", "--dir", str(foreign / "keys"), "--role", "primary"],
                       env=dict(os.environ, PYTHONPATH=t.view.src), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    _copy_cert(t.vault_keys / "vault.crt", foreign / "keys" / "vault.crt", "root")
    mark = len(t.vault.log_text())
    got = t.as_root("gw", f"""
        import json, socket, ssl
        from airlock.link.tls import VAULT_SERVER_NAME, client_context
        k = "{foreign / 'keys'}"
        ctx = client_context(k + "/primary.crt", k + "/primary.key", k + "/vault.crt")
        out = {{}}
        for attempt in ("foreign-key", "no-client-cert", "plain-tcp"):
            try:
                with socket.create_connection(("{VAULT_LINK}", {LINK_PORT}), timeout=5) as raw:
                    if attempt == "plain-tcp":
                        raw.sendall(b"HELLO not tls\\r\\n\\r\\n")
                        out[attempt] = "answered" if raw.recv(100) else "closed"
                        continue
                    c = ctx
                    if attempt == "no-client-cert":
                        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                        c.load_verify_locations(k + "/vault.crt")
                    with c.wrap_socket(raw, server_hostname=VAULT_SERVER_NAME) as s:
                        # TLS 1.3: the server's verdict on our certificate arrives after the client's handshake
                        s.sendall(b"x")
                        out[attempt] = "answered" if s.recv(100) else "closed"
            except (ssl.SSLError, OSError) as e:
                out[attempt] = "refused: " + type(e).__name__
        print(json.dumps(out))
        """)
    assert got["foreign-key"].startswith("refused") or got["foreign-key"] == "closed", got
    assert got["no-client-cert"].startswith("refused") or got["no-client-cert"] == "closed", got
    assert got["plain-tcp"] != "answered", got
    deadline = time.monotonic() + 10
    while t.vault.log_text()[mark:].count("refused connection") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = [ln for ln in t.vault.log_text()[mark:].splitlines() if "refused connection" in ln]
    assert len(refused) == 3 and all(f"from ('{GW_LINK}'" in ln for ln in refused), refused
    assert "CERTIFICATE_VERIFY_FAILED" in refused[0], refused      # the foreign key is not the pinned one
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in refused[1], refused
    assert "primary connected" not in t.vault.log_text()[mark:]
    # ... while the real primary still writes
    got = t.as_s3_client("""
        s3.put_object(Bucket="two-hosts", Key="last.txt", Body=b"still")
        print(json.dumps({"ok": s3.get_object(Bucket="two-hosts", Key="last.txt")["Body"].read() == b"still"}))
        """)
    assert got == {"ok": True}

    assert t.gateway.stop() == 0
    assert t.vault.stop() == 0
    assert time.monotonic() - t0 < 300
