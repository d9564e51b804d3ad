"""Configuration: a TOML file (docs/operations.md) plus embedded defaults.

    [gateway]
    listen = "127.0.0.1:9000"     # host:port of the S3 endpoint
    data = "/var/lib/airlock/primary"
    region = "us-east-1"
    domains = ["localhost"]       # virtual-hosted-style: <bucket>.<domain>
    fsync = true                  # false only for throw-away benchmarks
    chunk_sync = "local"          # "local": fsync chunk files too (default); with a vault,
                                  # "vault": rely on the vault's durable copy, no chunk fsync here
    workers = "auto"              # processes serving S3 on the port: 1 leader + (workers-1)
                                  # workers that commit through it; "auto": one per CPU, at most 4
    min_free_mib = 64             # writes answer 503 while the data directory has less free
                                  # (the primary log and index always find room for a change
                                  # the vault acknowledged)

    [link]                        # the controlled link to the vault; without it the
    vault = "127.0.0.1:9001"      # gateway runs local-only (tests and benchmarks only)
    keys = "/etc/airlock/keys"    # primary.crt, primary.key (own), vault.crt (the vault's, pinned)
    ack_timeout = 10.0            # seconds to wait for the vault's durable ack, then 503

    [[users]]
    access_key = "..."
    secret_key = "..."
    user_id = "..."
    display_name = "..."

Without a config file (or without [[users]]), a single user is taken from
AIRLOCK_ACCESS_KEY / AIRLOCK_SECRET_KEY, or the embedded development keys.
"""
from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, field

from airlock.errors import ConfigError

DEFAULT_ACCESS_KEY = "AIRLOCKDEVACCESSKEY0"
DEFAULT_SECRET_KEY = "airlock-dev-secret-key-change-me-0000000"
DEFAULT_REGION = "us-east-1"
DEFAULT_PORT = 9000
CHUNK_SYNC_MODES = ("vault", "local")
MAX_WORKERS = 64
AUTO_MAX_WORKERS = 4


@dataclass(frozen=True)
class User:
    access_key: str
    secret_key: str
    user_id: str
    display_name: str


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data: str = "./airlock-data/primary"
    region: str = DEFAULT_REGION
    domains: list[str] = field(default_factory=lambda: ["localhost"])
    fsync: bool = True
    chunk_sync: str = "local"              # "local" | "vault"; see docs/format/records.md invariant 4
    users: list[User] = field(default_factory=list)
    vault: tuple[str, int] | None = None   # link target; None = local-only commit point
    link_keys: str | None = None
    ack_timeout: float = 10.0
    workers: int | str = "auto"            # gateway processes: N, or "auto" (see gateway_processes)
    min_free_mib: int = 64                 # below this much free space in `data`, writes answer 503

    def user_by_key(self) -> dict[str, User]:
        return {u.access_key: u for u in self.users}


def default_user() -> User:
    ak = os.environ.get("AIRLOCK_ACCESS_KEY") or DEFAULT_ACCESS_KEY
    sk = os.environ.get("AIRLOCK_SECRET_KEY") or DEFAULT_SECRET_KEY
    uid = hashlib.sha256(ak.encode()).hexdigest()
    return User(ak, sk, uid, "airlock")


def _parse_listen(value: str, what: str = "listen") -> tuple[str, int]:
    """host:port (`what` names the setting in the error)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be host:port (port 1..65535), got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_workers(value, what: str) -> int | str:
    """A gateway process count: "auto" or a whole number 1..MAX_WORKERS, else ConfigError."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"{what} must be \"auto\" or a whole number from 1 to {MAX_WORKERS}, got {value!r}")
    return value


def gateway_processes(cfg: "GatewayConfig") -> int:
    """How many processes serve the gateway's port.  "auto": one per CPU this
    process may run on, at most AUTO_MAX_WORKERS (past that the leader's
    commit path, not HTTP, limits writes, and each process costs memory)."""
    if cfg.workers != "auto":
        return int(cfg.workers)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, AUTO_MAX_WORKERS))


def read_toml(path: str | None) -> dict:
    """The parsed config file ({} without one); ConfigError if unreadable."""
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


#: The tables a config file may hold (one file may serve both commands:
#: the gateway reads [gateway], [link], [[users]]; the vault [vault]).
TABLES = ("gateway", "link", "users", "vault")


def table(raw: dict, name: str, known: tuple[str, ...] | None = None) -> dict:
    """The [name] table of a parsed config ({} if absent).  With `known`, a
    setting not in it is an error: a misspelt one would otherwise leave its
    default in force without a word.  Unknown top-level tables are refused
    the same way."""
    unknown_tables = sorted(k for k in raw if k not in TABLES)
    if unknown_tables:
        raise ConfigError(f"unknown config table(s): {', '.join(f'[{t}]' for t in unknown_tables)} "
                          f"(known: {', '.join(f'[{t}]' for t in TABLES)})")
    t = raw.get(name, {})
    if not isinstance(t, dict):
        raise ConfigError(f"[{name}] must be a table")
    if known is not None:
        unknown = sorted(set(t) - set(known))
        if unknown:
            raise ConfigError(f"[{name}] unknown settings: {', '.join(unknown)} (known: {', '.join(known)})")
    return t


def typed(t: dict, name: str, key: str, kind: type, default):
    """t[key] if it is a `kind` (default if absent); ConfigError otherwise
    (`fsync = "no"` must not read as true)."""
    if key not in t:
        return default
    v = t[key]
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        words = {bool: "true or false", str: "a string", list: "a list"}.get(kind, kind.__name__)
        raise ConfigError(f"[{name}] {key} must be {words}, got {v!r}")
    return v


GATEWAY_KEYS = ("listen", "data", "region", "domains", "fsync", "chunk_sync", "workers", "min_free_mib")
LINK_KEYS = ("vault", "keys", "ack_timeout")


def load_gateway_config(path: str | None) -> GatewayConfig:
    cfg = GatewayConfig()
    raw = read_toml(path)
    g = table(raw, "gateway", GATEWAY_KEYS)
    if "listen" in g:
        cfg.host, cfg.port = _parse_listen(str(g["listen"]))
    cfg.data = str(g.get("data", cfg.data))
    cfg.region = typed(g, "gateway", "region", str, cfg.region)
    cfg.domains = typed(g, "gateway", "domains", list, cfg.domains)
    if not all(isinstance(d, str) for d in cfg.domains):
        raise ConfigError("[gateway] domains must be a list of host names (strings)")
    cfg.fsync = typed(g, "gateway", "fsync", bool, cfg.fsync)
    if "chunk_sync" in g:
        cfg.chunk_sync = str(g["chunk_sync"])
        if cfg.chunk_sync not in CHUNK_SYNC_MODES:
            raise ConfigError(f"[gateway] chunk_sync must be one of {', '.join(CHUNK_SYNC_MODES)}, "
                              f"got {cfg.chunk_sync!r}")
    if "workers" in g:
        cfg.workers = check_workers(g["workers"], "[gateway] workers")
    if "min_free_mib" in g:
        v = g["min_free_mib"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"[gateway] min_free_mib must be a whole number of MiB (0 or more), got {v!r}")
        cfg.min_free_mib = v
    link = table(raw, "link", LINK_KEYS)
    if "vault" in link:
        cfg.vault = _parse_listen(str(link["vault"]), "[link] vault")
    if "keys" in link:
        cfg.link_keys = str(link["keys"])
    if "ack_timeout" in link:
        try:
            cfg.ack_timeout = float(link["ack_timeout"])
        except (TypeError, ValueError):
            raise ConfigError("[link] ack_timeout must be a number of seconds") from None
        if cfg.ack_timeout <= 0:
            raise ConfigError("[link] ack_timeout must be positive")
    seen: set[str] = set()
    for i, u in enumerate(raw.get("users", [])):
        try:
            user = User(str(u["access_key"]), str(u["secret_key"]), str(u["user_id"]),
                        str(u.get("display_name", u["user_id"])))
        except (KeyError, TypeError):
            raise ConfigError(f"[[users]] entry {i + 1} needs access_key, secret_key and user_id") from None
        if user.access_key in seen:
            raise ConfigError(f"duplicate access_key in [[users]]: {user.access_key}")
        seen.add(user.access_key)
        cfg.users.append(user)
    if not cfg.users:
        cfg.users.append(default_user())
    return cfg
