"""Bad input on the command line: one line on stderr, a non-zero exit, no
traceback -- and nothing written that would point later commands astray."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def airlock(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "airlock", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and all(w in lines[-1] for w in words), r.stderr


@pytest.mark.parametrize("command", ["status", "verify", "scrub", "gc", "restore"])
def test_data_that_is_a_file_is_one_line(tmp_path, command):
    (tmp_path / "afile").write_text("not a directory")
    one_line_error(airlock(command, "--data", str(tmp_path / "afile")), "not a local deployment")


@pytest.mark.parametrize("content, words", [
    ("{}", ("does not name",)),
    ("garbage", ("cannot be read",)),
    ('{"gateway": 5}', ("does not name",)),
])
def test_a_damaged_deployment_file_is_one_line(tmp_path, content, words):
    (tmp_path / "deployment.json").write_text(content)
    for command in ("status", "verify"):
        one_line_error(airlock(command, "--data", str(tmp_path)), *words)


def test_up_refuses_bad_ports_and_writes_nothing(tmp_path):
    one_line_error(airlock("up", "--data", str(tmp_path / "a"), "--port", "99999"), "1..65535")
    one_line_error(airlock("up", "--data", str(tmp_path / "b"), "--port", "9400", "--vault-port", "9400"),
                   "must differ")
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the S3 port, or the vault's (S3 port + 1), already has a listener
        one_line_error(airlock("up", "--data", str(tmp_path / "c"), "--port", str(port)), "not free")
        one_line_error(airlock("up", "--data", str(tmp_path / "d"), "--port", str(port - 1)), "not free")
    for d in "abcd":
        assert not (tmp_path / d / "deployment.json").exists(), d


def test_up_on_a_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line_error(airlock("up", "--data", str(tmp_path / "afile")), "afile")


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_bytes(b"[gateway]\nregion = \"\xff\xfe\"\n")
    r = airlock("up", "--data", str(tmp_path / "d"), "--config", str(cfg))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "d" / "deployment.json").exists()


@pytest.mark.parametrize("option, words", [("--prefix", ("--prefix does not go with --snapshot",)),
                                            ("--verify-log", ("--verify-log does not go with --snapshot",))])
def test_restore_options_a_snapshot_restore_does_not_take_are_refused(tmp_path, option, words):
    extra = [option, "x"] if option == "--prefix" else [option]
    one_line_error(airlock("restore", "--data", str(tmp_path / "d"), "--snapshot", "s", *extra), *words)


def test_up_hands_its_config_to_the_vault_too(tmp_path):
    """One file holds both domains' tables (docs/operations.md); `airlock up
    --config` used to give it to the gateway only, so [vault] settings were
    silently not applied.  A misspelt [vault] setting now stops `up`."""
    from conftest import free_port
    cfg = tmp_path / "airlock.toml"
    cfg.write_text("[vault]\nbogus = 1\n")
    r = airlock("up", "--data", str(tmp_path / "d"), "--port", str(free_port()), "--config", str(cfg))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "[vault] unknown settings: bogus" in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (("gateway", "--ack-timeout", "-1"), ("--ack-timeout", "above 0")),
    (("vault", "--overlay-max-bytes", "-5"), ("--overlay-max-bytes", "above 0")),
    (("vault", "--overlay-max-age", "0"), ("--overlay-max-age", "above 0")),
    (("compact", "--keep", "-1"), ("--keep", "0 or more")),
])
def test_numbers_out_of_range_are_refused_before_anything_starts(tmp_path, args, words):
    one_line_error(airlock(*args, "--data", str(tmp_path / "d")), *words)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("command, text, words", [
    ("gateway", '[gateway]\nchunk_synk = "vault"\n', ("[gateway] unknown settings: chunk_synk",)),
    ("gateway", '[gatewy]\nfsync = false\n', ("unknown config table", "[gatewy]")),
    ("gateway", '[link]\nack_timout = 3\n', ("[link] unknown settings: ack_timout",)),
    ("gateway", '[gateway]\nfsync = "no"\n', ("[gateway] fsync must be true or false",)),
    ("gateway", '[gateway]\nregion = 5\n', ("[gateway] region must be a string",)),
    ("gateway", '[gateway]\ndomains = "localhost"\n', ("[gateway] domains must be a list",)),
    ("vault", '[vault]\nbogus = 1\n', ("[vault] unknown settings: bogus",)),
    ("vault", '[vault]\nfsync = "yes"\n', ("[vault] fsync must be true or false",)),
])
def test_a_misspelt_or_mistyped_setting_is_an_error_not_a_default(tmp_path, command, text, words):
    cfg = tmp_path / f"{command}.toml"
    cfg.write_text(text)
    r = airlock(command, "--config", str(cfg), "--data", str(tmp_path / "d"))
    one_line_error(r, *words)
    assert r.returncode == 2


@pytest.mark.parametrize("args, words", [
    (("verify",), ("give --data DIR",)),
    (("scrub",), ("give --data DIR",)),
    (("restore",), ("give --data DIR",)),
    (("status", "--gateway", "garbage"), ("--gateway must be host:port",)),
    (("gateway", "--vault", "garbage"), ("--vault must be host:port",)),
])
def test_missing_or_malformed_addresses_say_which_argument(tmp_path, args, words):
    one_line_error(airlock(*args, cwd=tmp_path), *words)


def test_keys_into_a_file_says_so(tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line_error(airlock("keys", "--dir", str(tmp_path / "afile"), "--role", "primary"), "is a file")
