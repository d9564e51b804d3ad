"""`airlock vault`: the vault process.

It owns its data directory (an exclusive lock file), serves the controlled
link to its one primary, and an admin socket that exists only on the vault's
own host (a Unix socket in its data directory, mode 0600) for the vault-side
operations: status, seal, compact, snapshot-create/-list/-delete/-merge
(and the periodic snapshot schedule, `[vault.snapshots]`).  Nothing of the admin surface is reachable
over the link.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from airlock.aio import stop_on_signals
from airlock.errors import ConfigError, PolicyError
from airlock.vault.catalog import Retention

log = logging.getLogger("airlock.vault")

DEFAULT_VAULT_PORT = 9001
SEAL_CHECK_INTERVAL_S = 5.0      # how often the age limit of the open overlay is checked
RECOVER_INTERVAL_S = 2.0         # how often a store that failed a write tries to recover in place ...
RECOVER_MAX_INTERVAL_S = 30.0    # ... backing off to this while the attempts keep failing
ADMIN_SOCKET = "admin.sock"
LOCK_FILE = "LOCK"


@dataclass(frozen=True)
class SnapshotSchedule:
    """[vault.snapshots]: a periodic snapshot every `every` seconds (0 = off),
    keeping the newest `keep` periodic ones (0 = all), of `mode` cow or full."""
    every: float = 0.0
    keep: int = 0
    mode: str = "cow"


@dataclass
class VaultConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_VAULT_PORT
    data: str = "./airlock-data/vault"
    keys: str | None = None          # vault.crt, vault.key (own), primary.crt (the primary's, pinned)
    overlay_max_bytes: int = 256 * 1024 * 1024
    overlay_max_age_s: float = 600.0
    fsync: bool = True
    insecure_no_tls: bool = False    # tests of the protocol parser only; never in a deployment
    retention: Retention = field(default_factory=Retention)   # [vault.retention]; default: keep forever
    snapshots: SnapshotSchedule = field(default_factory=SnapshotSchedule)   # [vault.snapshots]; default: off

    @property
    def admin_socket(self) -> str:
        return os.path.join(self.data, ADMIN_SOCKET)


def load_vault_config(path: str | None) -> VaultConfig:
    from airlock.config import _parse_listen, read_toml, table, typed
    cfg = VaultConfig()
    if not path:
        return cfg
    v = table(read_toml(path), "vault", ("listen", "data", "keys", "overlay_max_bytes", "overlay_max_age",
                                         "fsync", "retention", "snapshots"))
    if "listen" in v:
        cfg.host, cfg.port = _parse_listen(str(v["listen"]))
    cfg.data = str(v.get("data", cfg.data))
    cfg.keys = v.get("keys", cfg.keys)
    try:
        cfg.overlay_max_bytes = int(v.get("overlay_max_bytes", cfg.overlay_max_bytes))
        cfg.overlay_max_age_s = float(v.get("overlay_max_age", cfg.overlay_max_age_s))
    except (TypeError, ValueError):
        raise ConfigError("[vault] overlay_max_bytes / overlay_max_age must be numbers") from None
    if cfg.overlay_max_bytes <= 0 or cfg.overlay_max_age_s <= 0:
        raise ConfigError("[vault] overlay_max_bytes / overlay_max_age must be above 0")
    cfg.fsync = typed(v, "vault", "fsync", bool, cfg.fsync)
    cfg.retention = _parse_retention(v.get("retention", {}))
    cfg.snapshots = _parse_snapshots(v.get("snapshots", {}))
    return cfg


def _parse_snapshots(t) -> SnapshotSchedule:
    """[vault.snapshots]: every (seconds >= 0), keep (whole number >= 0), mode ("cow" | "full")."""
    if not isinstance(t, dict):
        raise ConfigError("[vault.snapshots] must be a table")
    unknown = sorted(set(t) - {"every", "keep", "mode"})
    if unknown:
        raise ConfigError(f"[vault.snapshots] unknown settings: {', '.join(unknown)} (known: every, keep, mode)")
    every, keep, mode = t.get("every", 0), t.get("keep", 0), t.get("mode", "cow")
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 <= every < float("inf"):
        raise ConfigError(f"[vault.snapshots] every must be a number of seconds >= 0, not {every!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ConfigError(f"[vault.snapshots] keep must be a whole number >= 0, not {keep!r}")
    if mode not in ("cow", "full"):
        raise ConfigError(f"[vault.snapshots] mode must be \"cow\" or \"full\", not {mode!r}")
    return SnapshotSchedule(float(every), keep, mode)


def _parse_retention(r) -> Retention:
    """[vault.retention]: keep_versions (whole number >= 0), keep_days (number >= 0); 0 = no limit."""
    if not isinstance(r, dict):
        raise ConfigError("[vault.retention] must be a table")
    unknown = sorted(set(r) - {"keep_versions", "keep_days"})
    if unknown:
        raise ConfigError(f"[vault.retention] unknown settings: {', '.join(unknown)} "
                          f"(known: keep_versions, keep_days)")
    try:
        return Retention(keep_versions=r.get("keep_versions", 0), keep_days=r.get("keep_days", 0))
    except ValueError as e:
        raise ConfigError(f"[vault.retention] {e}") from None


class DataLock:
    """Exclusive ownership of a vault data directory (flock, released on exit or crash)."""

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise PolicyError(f"the vault data directory {data_dir} is in use by another process") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def open_store(cfg: VaultConfig):
    from airlock.vault.store import VaultStore
    return VaultStore(cfg.data, overlay_max_bytes=cfg.overlay_max_bytes,
                      overlay_max_age_s=cfg.overlay_max_age_s, fsync=cfg.fsync,
                      retention=cfg.retention).open()


def vault_id(cfg: VaultConfig) -> str:
    import hashlib
    if cfg.keys:
        with open(os.path.join(cfg.keys, "vault.crt"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    return "insecure-test-vault"


class Vault:
    def __init__(self, cfg: VaultConfig):
        self.cfg = cfg
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="airlock-vault")
        self.lock = DataLock(cfg.data)
        self.store = open_store(cfg)
        self.link = None
        self._admin = None
        self._compacting = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        from airlock.link.server import LinkServer
        ctx = None
        if not self.cfg.insecure_no_tls:
            if not self.cfg.keys:
                raise ConfigError("the vault needs [vault] keys (vault.crt, vault.key, primary.crt)")
            from airlock.link.tls import server_context
            paths = [os.path.join(self.cfg.keys, n) for n in ("vault.crt", "vault.key", "primary.crt")]
            for p in paths:
                if not os.path.exists(p):
                    raise ConfigError(f"vault key file missing: {p} (create keys with `airlock keys`)")
            ctx = server_context(*paths)
        self.link = LinkServer(self.store, ctx, vault_id(self.cfg), executor=self.executor)
        await self.link.start(self.cfg.host, self.cfg.port)
        sock = self.cfg.admin_socket
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._admin = await asyncio.start_unix_server(self._admin_session, path=sock)
        finally:
            os.umask(old)
        self._tasks.append(asyncio.get_running_loop().create_task(self._seal_by_age()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._recover_in_place()))
        if self.cfg.snapshots.every > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._periodic_snapshots()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._admin is not None:
            self._admin.close()
            await self._admin.wait_closed()
        if self.link is not None:
            await self.link.stop()
        await self.store.aclose()
        self.executor.shutdown(wait=True)
        try:
            os.unlink(self.cfg.admin_socket)
        except FileNotFoundError:
            pass
        self.lock.release()

    async def _seal_by_age(self) -> None:
        while True:
            await asyncio.sleep(SEAL_CHECK_INTERVAL_S)
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self.store.maybe_seal)
            except Exception:
                log.exception("sealing the open overlay by age failed")

    async def _recover_in_place(self) -> None:
        """A store that failed a write (a full disk, an I/O error) refuses
        appends and HELLOs; try to recover it in place every few seconds, so
        that a disk with space again needs no operator (VaultStore.reopen)."""
        wait = RECOVER_INTERVAL_S
        while True:
            await asyncio.sleep(wait)
            if self.store.failed is None:
                wait = RECOVER_INTERVAL_S
                continue
            try:
                ok = await self.store.reopen()
            except Exception:
                log.exception("recovering the vault store in place failed")
                ok = False
            # each attempt rescans the overlays and the log: back off while it keeps failing
            wait = RECOVER_INTERVAL_S if ok else min(wait * 2, RECOVER_MAX_INTERVAL_S)

    async def _periodic_snapshots(self) -> None:
        sched = self.cfg.snapshots
        while True:
            await asyncio.sleep(sched.every)
            try:
                async with self._compacting:      # a full snapshot compacts; never two at once
                    res = await asyncio.get_running_loop().run_in_executor(
                        self.executor, lambda: self.store.periodic_snapshot(sched.mode, sched.keep))
                log.info("periodic snapshot %s at seq %d; deleted %s", res["created"]["name"],
                         res["created"]["seq"], res["deleted"] or "none")
            except Exception:
                log.exception("periodic snapshot failed")

    async def _snapshot_op(self, op: str, req: dict):
        st = self.store
        loop = asyncio.get_running_loop()
        if op == "snapshot-list":
            return await loop.run_in_executor(self.executor, st.snapshots)
        if op == "snapshot-create":
            fn = lambda: st.snapshot_create(name=req.get("name"), mode=req.get("mode", "cow"))  # noqa: E731
        elif op == "snapshot-delete":
            fn = lambda: st.snapshot_delete(req["snapshot"])  # noqa: E731
        else:
            fn = lambda: st.snapshot_merge(req["a"], req["b"], name=req.get("name"))  # noqa: E731
        async with self._compacting:
            return await loop.run_in_executor(self.executor, fn)

    # ------------------------------------------------------------------ admin socket
    async def _admin_session(self, reader, writer) -> None:
        async def send(obj) -> None:
            writer.write((json.dumps(obj) + "\n").encode())
            await writer.drain()

        try:
            line = await reader.readline()
            try:
                req = json.loads(line)
                op = req["op"]
            except (ValueError, KeyError, TypeError):
                await send({"ok": False, "error": "bad request"})
                return
            if op == "status":
                status = dict(self.store.status())
                status["link"] = dict(self.link.stats) if self.link else {}
                await send({"ok": True, "result": status})
            elif op == "seal":
                await asyncio.get_running_loop().run_in_executor(self.executor, self.store.seal)
                await send({"ok": True, "result": self.store.status()})
            elif op == "compact":
                keep = int(req.get("keep", 0))
                result = await self._compact(keep, send)
                await send({"ok": True, "result": result})
            elif op in ("snapshot-create", "snapshot-list", "snapshot-delete", "snapshot-merge"):
                try:
                    result = await self._snapshot_op(op, req)
                except KeyError as e:
                    await send({"ok": False, "error": f"not found: {e.args[0] if e.args else e}"})
                    return
                except (PolicyError, ValueError) as e:
                    await send({"ok": False, "error": str(e)})
                    return
                await send({"ok": True, "result": result})
            else:
                await send({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:
            log.exception("admin request failed")
            try:
                await send({"ok": False, "error": str(e)})
            except Exception:
                pass
        finally:
            writer.close()

    async def _compact(self, keep: int, send) -> list:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, {"progress": {"done": done, "total": total}})

        async with self._compacting:
            fut = loop.run_in_executor(self.executor, lambda: self.store.compact(keep=keep, progress=progress))
            while not fut.done():
                try:
                    msg = await asyncio.wait_for(queue.get(), 0.2)
                    await send(msg)
                except asyncio.TimeoutError:
                    pass
            return fut.result()


async def serve_vault(cfg: VaultConfig, on_ready=None) -> None:
    vault = Vault(cfg)
    await vault.start()
    stop = asyncio.Event()
    stop_on_signals(stop, "vault")
    if on_ready is not None:
        on_ready(cfg, vault)
    try:
        await stop.wait()
    finally:
        log.info("stopping vault")
        await vault.stop()


# ---------------------------------------------------------------------- admin client
def admin_request(socket_path: str, request: dict, on_message=None) -> dict:
    """Send one admin request to a running vault; returns the final answer."""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise
    with s, s.makefile("rwb") as f:
        f.write((json.dumps(request) + "\n").encode())
        f.flush()
        for line in f:
            msg = json.loads(line)
            if "progress" in msg:
                if on_message is not None:
                    on_message(msg)
                continue
            return msg
    return {"ok": False, "error": "the vault closed the admin connection"}
