"""The container topology of docker/ keeps the two domains apart.

CI has no Docker engine, so this reads docker/compose.yaml, the two configs
and the Dockerfile and checks what the engine would be told: the vault is on
no network a client can reach, publishes nothing, shares no volume with the
gateway, and neither service can see the other's private key.  The keys init
script from compose.yaml is run for real (with sh, in temporary directories).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml (test extra) parses docker/compose.yaml")

from airlock.config import load_gateway_config  # noqa: E402
from airlock.vault.daemon import load_vault_config  # noqa: E402

DOCKER = Path(__file__).resolve().parent.parent / "docker"
GATEWAY_KEYS = "/etc/airlock/keys"
VAULT_KEYS = "/etc/airlock/vault-keys"


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(DOCKER / "compose.yaml") as f:
        return yaml.safe_load(f)


def _service(compose, name) -> dict:
    return compose["services"][name]


def _networks(svc) -> set[str]:
    nets = svc.get("networks", [])
    return set(nets if isinstance(nets, list) else nets.keys())


def _mounts(svc) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of every volume/bind of a service."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            src, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            src, target, ro = v.get("source", ""), v["target"], bool(v.get("read_only"))
        out.append((src, target, ro))
    return out


def _named_volumes(compose, svc) -> set[str]:
    declared = set(compose.get("volumes", {}))
    return {src for src, _, _ in _mounts(svc) if src in declared}


def _mount_of(svc, target) -> tuple[str, str, bool]:
    for m in _mounts(svc):
        if m[1] == target:
            return m
    raise AssertionError(f"nothing mounted at {target}: {_mounts(svc)}")


def _config_path(svc, flag="--config") -> Path:
    """The host file mounted where the service's --config points."""
    cmd = svc["command"]
    target = cmd[cmd.index(flag) + 1]
    src, _, ro = _mount_of(svc, target)
    assert ro, f"{target} must be mounted read-only"
    return (DOCKER / src).resolve()


def test_vault_is_only_on_the_internal_link_network(compose):
    vault, gateway = _service(compose, "vault"), _service(compose, "gateway")
    assert _networks(vault) == {"link"}
    assert "network_mode" not in vault
    assert compose["networks"]["link"].get("internal") is True
    assert _networks(gateway) == {"client", "link"}
    assert not compose["networks"]["client"] or not compose["networks"]["client"].get("internal")


def test_no_client_network_reaches_the_vault(compose):
    # every network a client can reach (any non-internal one) must not have the vault on it
    for name, net in compose["networks"].items():
        if not (net or {}).get("internal"):
            assert "vault" not in {s for s, svc in compose["services"].items() if name in _networks(svc)}


def test_vault_publishes_no_ports_and_gateway_publishes_s3(compose):
    vault, gateway = _service(compose, "vault"), _service(compose, "gateway")
    assert not vault.get("ports")
    assert "network_mode" not in vault          # e.g. "host" would bypass the networks
    published = [str(p) for p in gateway.get("ports", [])]
    assert any(p.endswith(":9000") for p in published), published
    assert load_gateway_config(str(_config_path(gateway))).port == 9000


def test_gateway_and_vault_share_no_volume(compose):
    gw, va = _service(compose, "gateway"), _service(compose, "vault")
    assert not _named_volumes(compose, gw) & _named_volumes(compose, va)
    assert not {s for s, _, _ in _mounts(gw)} & {s for s, _, _ in _mounts(va)}
    assert "primary-data" in _named_volumes(compose, gw)
    assert "vault-data" in _named_volumes(compose, va)
    assert "cert-exchange" not in _named_volumes(compose, gw) | _named_volumes(compose, va)


def test_each_service_has_its_own_data_and_keys(compose):
    gw_cfg = load_gateway_config(str(_config_path(_service(compose, "gateway"))))
    va_cfg = load_vault_config(str(_config_path(_service(compose, "vault"))))
    assert _mount_of(_service(compose, "gateway"), gw_cfg.data)[0] == "primary-data"
    assert _mount_of(_service(compose, "vault"), va_cfg.data)[0] == "vault-data"
    gw_keys = _mount_of(_service(compose, "gateway"), gw_cfg.link_keys)
    va_keys = _mount_of(_service(compose, "vault"), va_cfg.keys)
    assert gw_keys[0] == "primary-keys" and gw_keys[2], gw_keys
    assert va_keys[0] == "vault-keys" and va_keys[2], va_keys


def test_neither_service_gets_the_others_private_key(compose):
    """Only the init service of a domain ever mounts that domain's keys volume."""
    owners = {"primary-keys": {"gateway", "keys-primary"}, "vault-keys": {"vault", "keys-vault"}}
    for name, svc in compose["services"].items():
        for vol in _named_volumes(compose, svc):
            if vol in owners:
                assert name in owners[vol], f"{name} mounts {vol}"
        for secret in svc.get("secrets", []):
            sname = secret if isinstance(secret, str) else secret["source"]
            assert not (name == "gateway" and "vault" in sname), sname
            assert not (name == "vault" and "primary" in sname), sname


def test_services_run_as_different_non_root_users(compose):
    users = {name: _service(compose, name).get("user") for name in ("gateway", "vault",
                                                                     "keys-primary", "keys-vault")}
    assert users == {"gateway": "airlock-gw", "vault": "airlock-vault",
                     "keys-primary": "airlock-gw", "keys-vault": "airlock-vault"}


def test_init_steps_have_no_network_and_are_not_started_by_up(compose):
    for name in ("keys", "keys-primary", "keys-vault"):
        svc = _service(compose, name)
        assert svc.get("profiles") == ["init"], name
        assert svc.get("network_mode") == "none", name


def test_gateway_links_to_the_vault_service_on_the_link_port(compose):
    gw_cfg = load_gateway_config(str(_config_path(_service(compose, "gateway"))))
    va_cfg = load_vault_config(str(_config_path(_service(compose, "vault"))))
    assert gw_cfg.vault == ("vault", va_cfg.port)
    assert "vault" in compose["services"]
    assert gw_cfg.link_keys and va_cfg.keys
    assert gw_cfg.data != va_cfg.data


def test_docker_configs_parse_as_the_cli_loads_them():
    gw = load_gateway_config(str(DOCKER / "gateway.toml"))
    va = load_vault_config(str(DOCKER / "vault.toml"))
    assert (gw.host, gw.port) == ("0.0.0.0", 9000)
    assert gw.vault == ("vault", 9001) and gw.link_keys == GATEWAY_KEYS
    assert (va.host, va.port) == ("0.0.0.0", 9001) and va.keys == VAULT_KEYS
    from airlock.cli import _gateway_config, _vault_config, build_parser
    parser = build_parser()
    assert _gateway_config(parser.parse_args(["gateway", "--config", str(DOCKER / "gateway.toml")])).vault == gw.vault
    assert _vault_config(parser.parse_args(["vault", "--config", str(DOCKER / "vault.toml")])).keys == va.keys


def test_dockerfile_builds_the_compiled_core_and_runs_as_non_root():
    text = (DOCKER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build"
    assert any(re.match(r"COPY\s+ext\s", ln) for ln in lines)
    assert any(re.match(r"COPY\s+src\s", ln) for ln in lines)
    assert re.search(r"pip wheel\b", text)
    assert "_chunker" in text and "_record" in text, "the build must refuse a wheel without the compiled modules"
    assert "ACCELERATED" in text, "the image must refuse to build if the compiled core does not load"
    final = lines[lines.index(froms[-1]):]
    assert any(ln.startswith("COPY --from=") for ln in final), "the runtime stage installs the built wheel"
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert not any(ln.upper().startswith("COPY") and ".key" in ln for ln in lines), "no key baked into the image"


def _keys_script(compose, exchange: Path) -> str:
    script = compose["x-keys-script"]
    # compose turns $$ into $; the exchange volume is a temporary directory here
    return script.replace("$$", "$").replace("/exchange", str(exchange))


def test_keys_init_step_creates_each_identity_and_copies_only_certificates(compose, tmp_path):
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    airlock = bindir / "airlock"
    airlock.write_text(f"#!/bin/sh\nexec {sys.executable} -m airlock \"$@\"\n")
    airlock.chmod(0o755)
    python = bindir / "python"
    python.symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    script = _keys_script(compose, exchange)
    dirs = {"vault": tmp_path / "vault-keys", "primary": tmp_path / "primary-keys"}
    results: dict[str, subprocess.CompletedProcess] = {}

    def run(role, peer):
        results[role] = subprocess.run(["sh", "-c", script], env=dict(env, ROLE=role, PEER=peer, KEYS=str(dirs[role])),
                                       capture_output=True, text=True, timeout=60)

    for _ in range(2):   # a second run keeps the identities
        threads = [threading.Thread(target=run, args=rp) for rp in (("vault", "primary"), ("primary", "vault"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        for role, r in results.items():
            assert r.returncode == 0, f"{role}: {r.stdout}\n{r.stderr}"
        if _ == 0:
            first = {role: (d / f"{role}.key").read_bytes() for role, d in dirs.items()}
    assert sorted(p.name for p in dirs["vault"].iterdir()) == ["primary.crt", "vault.crt", "vault.key"]
    assert sorted(p.name for p in dirs["primary"].iterdir()) == ["primary.crt", "primary.key", "vault.crt"]
    assert sorted(p.name for p in exchange.iterdir()) == ["primary.crt", "vault.crt"]
    for role, d in dirs.items():
        assert (d / f"{role}.key").read_bytes() == first[role]
    assert (dirs["vault"] / "primary.crt").read_bytes() == (dirs["primary"] / "primary.crt").read_bytes()
    assert (dirs["primary"] / "vault.crt").read_bytes() == (dirs["vault"] / "vault.crt").read_bytes()
    from airlock.keys import fingerprint
    assert fingerprint(dirs["vault"] / "vault.crt") in results["primary"].stdout
