"""Command line: argument parsing only; every command calls into the modules.

Errors are one line on stderr and a non-zero exit (2 for usage/config, 1 for
runtime failures).

A local deployment (`airlock up --data DIR`) keeps the primary domain in
DIR/primary and the vault in DIR/vault, each with its own keys; the other
commands find everything from `--data DIR` (DIR/deployment.json records the
ports).  On two hosts, give the commands explicit configs instead.
"""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time

from airlock import __version__
from airlock.aio import STOP_DEADLINE_S
from airlock.config import DEFAULT_PORT, GatewayConfig, _parse_listen, check_workers, load_gateway_config
from airlock.errors import AirlockError, ConfigError, VaultUnavailable
from airlock.interpreter import child_env, module_command

DEPLOYMENT_FILE = "deployment.json"
CHILD_START_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------- helpers
def _print_gateway_ready(cfg: GatewayConfig) -> None:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    mode = f"vault at {cfg.vault[0]}:{cfg.vault[1]}" if cfg.vault else "LOCAL-ONLY (no vault)"
    from airlock.config import gateway_processes
    n = gateway_processes(cfg)
    procs = "1 process" if n == 1 else f"{n} processes"
    print(f"airlock gateway ready on http://{host}:{cfg.port} (replication: {mode}; {procs})", flush=True)


def _print_endpoint(cfg: GatewayConfig, data: str, vault_port: int | None) -> None:
    u = cfg.users[0]
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    lines = [
        "airlock is up",
        f"  endpoint:   http://{host}:{cfg.port}",
        f"  region:     {cfg.region}",
        f"  access key: {u.access_key}",
        f"  secret key: {u.secret_key}",
        f"  primary:    {os.path.abspath(os.path.join(data, 'primary'))}",
    ]
    if vault_port is not None:
        lines.append(f"  vault:      {os.path.abspath(os.path.join(data, 'vault'))} "
                     f"(link on 127.0.0.1:{vault_port}, mutual TLS)")
    lines.append(f"try: AWS_ACCESS_KEY_ID={u.access_key} AWS_SECRET_ACCESS_KEY={u.secret_key} "
                 f"aws --endpoint-url http://{host}:{cfg.port} s3 ls")
    print("\n".join(lines), flush=True)


DEPLOYMENT_KEYS = ("gateway", "vault", "primary", "vault_data")


def _deployment(data: str) -> dict:
    path = os.path.join(data, DEPLOYMENT_FILE)
    try:
        with open(path) as f:
            dep = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{data} is not a local deployment ({DEPLOYMENT_FILE} missing; "
                          f"start one with `airlock up --data {data}`)") from None
    except (OSError, ValueError) as e:      # unreadable, not UTF-8, not JSON
        raise ConfigError(f"{path} cannot be read ({e}); `airlock up --data {data}` writes it anew") from None
    if not isinstance(dep, dict) or not all(isinstance(dep.get(k), str) for k in DEPLOYMENT_KEYS):
        raise ConfigError(f"{path} does not name the deployment's {', '.join(DEPLOYMENT_KEYS)}; "
                          f"`airlock up --data {data}` writes it anew")
    return dep


def _number(kind, ok, rule: str):
    """An argparse type: `kind` (int or float) for which ok(v) holds, else
    "<rule>, not <value>"."""
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a {'whole number' if kind is int else 'number'}: {value!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{rule}, not {value}")
        return v
    parse.__name__ = kind.__name__
    return parse


_port = _number(int, lambda v: 1 <= v <= 65535, "a port is 1..65535")
_positive_int = _number(int, lambda v: v > 0, "must be above 0")
_positive_float = _number(float, lambda v: v > 0, "must be above 0")
_non_negative_int = _number(int, lambda v: v >= 0, "must be 0 or more")


def _check_free(port: int, what: str) -> None:
    """Refuse to start a child on a port something already listens on (the
    readiness check, a connect, would take that listener for the child)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as the servers bind: connections of an earlier run in TIME_WAIT are
        # no obstacle, a listener is
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise ConfigError(f"the {what} port 127.0.0.1:{port} is not free ({e.strerror}); "
                              f"stop what uses it or choose another port") from None


def _wait_ready(proc: subprocess.Popen, what: str, port: int | None = None, path: str | None = None) -> None:
    """Wait until a child listens on `port` (or has created `path`)."""
    import socket
    deadline = time.monotonic() + CHILD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AirlockError(f"the {what} exited during start (status {proc.returncode})")
        if path is not None:
            if os.path.exists(path):
                return
        else:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise AirlockError(f"the {what} did not become ready in {CHILD_START_TIMEOUT_S:g}s")


# ---------------------------------------------------------------------- gateway / vault
def _gateway_config(args) -> GatewayConfig:
    cfg = load_gateway_config(args.config)
    if args.listen:
        cfg.host, cfg.port = _parse_listen(args.listen)
    if args.port is not None:
        cfg.port = args.port
    if args.data_dir:
        cfg.data = args.data_dir
    if args.no_fsync:
        cfg.fsync = False
    if getattr(args, "chunk_sync", None):
        cfg.chunk_sync = args.chunk_sync
    if args.vault:
        cfg.vault = _parse_listen(args.vault, "--vault")
    if args.link_keys:
        cfg.link_keys = args.link_keys
    if args.ack_timeout is not None:
        cfg.ack_timeout = args.ack_timeout
    if args.workers is not None:
        cfg.workers = check_workers(args.workers, "--workers")
    return cfg


def cmd_gateway(args) -> int:
    cfg = _gateway_config(args)
    from airlock import malloc
    from airlock.gateway import serve
    malloc.tune()
    asyncio.run(serve(cfg, on_ready=_print_gateway_ready))
    return 0


def _vault_config(args):
    from airlock.vault.daemon import load_vault_config
    cfg = load_vault_config(args.config)
    if getattr(args, "data_dir", None):
        cfg.data = args.data_dir
    if getattr(args, "listen", None):
        cfg.host, cfg.port = _parse_listen(args.listen)
    if getattr(args, "keys", None):
        cfg.keys = args.keys
    if getattr(args, "overlay_max_bytes", None) is not None:
        cfg.overlay_max_bytes = args.overlay_max_bytes
    if getattr(args, "overlay_max_age", None) is not None:
        cfg.overlay_max_age_s = args.overlay_max_age
    return cfg


def cmd_vault(args) -> int:
    cfg = _vault_config(args)
    from airlock import malloc
    from airlock.vault.daemon import serve_vault
    malloc.tune()

    def ready(cfg, vault) -> None:
        print(f"airlock vault ready: link on {cfg.host}:{vault.link.port} (mutual TLS), "
              f"data {os.path.abspath(cfg.data)}, last sequence {vault.store.last_seq}", flush=True)

    asyncio.run(serve_vault(cfg, on_ready=ready))
    return 0


def cmd_keys(args) -> int:
    from airlock import keys
    if args.local:
        pair = keys.ensure_local_pair(args.local)
        for name, path in pair._asdict().items():
            print(f"{name:14s} {path}")
        return 0
    if not args.dir or not args.role:
        raise ConfigError("give --dir DIR --role primary|vault, or --local DATA")
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise ConfigError(f"--dir {args.dir} is a file, not a directory")
    try:
        cert, key = keys.create_identity(args.dir, args.role, overwrite=False)
    except FileExistsError:
        raise ConfigError(f"a {args.role} identity already exists in {args.dir}; "
                          f"keys are never overwritten (remove them by hand to replace them)") from None
    print(f"created {args.role} identity\n  certificate: {cert}\n  private key: {key}\n"
          f"  fingerprint: {keys.fingerprint(cert)}\n"
          f"copy the certificate (never the key) to the other domain's keys directory as {args.role}.crt")
    return 0


# ---------------------------------------------------------------------- up
def cmd_up(args) -> int:
    from airlock import keys
    data = args.data
    os.makedirs(data, exist_ok=True)
    cfg = load_gateway_config(args.config)
    cfg.port = args.port
    vault_port = args.vault_port or args.port + 1
    if vault_port == args.port:
        raise ConfigError(f"the S3 port and the vault's link port must differ (both {args.port})")
    if vault_port > 65535:
        raise ConfigError(f"the vault's link port would be {vault_port}: give --vault-port")
    keys.ensure_local_pair(data)

    def record_deployment() -> None:
        # written once this deployment's vault runs here: a refused start
        # must not point status/verify/restore at ports nothing serves
        with open(os.path.join(data, DEPLOYMENT_FILE + ".tmp"), "w") as f:
            json.dump({"gateway": f"127.0.0.1:{args.port}", "vault": f"127.0.0.1:{vault_port}",
                       "primary": "primary", "vault_data": "vault"}, f)
        os.replace(os.path.join(data, DEPLOYMENT_FILE + ".tmp"), os.path.join(data, DEPLOYMENT_FILE))
    py = module_command("airlock")      # up's own airlock, whatever the current directory holds
    vault_cmd = py + ["vault", "--data", os.path.join(data, "vault"), "--listen", f"127.0.0.1:{vault_port}",
                      "--keys", os.path.join(data, "vault", "keys")]
    gw_cmd = py + ["gateway", "--data", os.path.join(data, "primary"), "--listen", f"127.0.0.1:{args.port}",
                   "--vault", f"127.0.0.1:{vault_port}", "--link-keys", os.path.join(data, "primary", "keys")]
    if args.config:
        # one file may hold both domains' tables (docs/operations.md): each
        # process reads its own; up's own ports and directories win
        gw_cmd += ["--config", args.config]
        vault_cmd += ["--config", args.config]
    children: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def stop_all(*_):
        nonlocal stopping
        stopping = True

    # Ctrl-C in a terminal signals the whole foreground process group: the
    # children run in groups of their own (process_group=0), so it reaches
    # this process alone, which stops them in order below: the gateway
    # first, finishing its uploads in flight while the vault still takes
    # their records, then the vault.  Closing the terminal (SIGHUP) too.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop_all)
    try:
        # a vault killed earlier leaves its admin socket behind; readiness is
        # the new one appearing (DataLock first: never touch a live vault's socket)
        from airlock.vault.daemon import ADMIN_SOCKET, DataLock
        DataLock(os.path.join(data, "vault")).release()
        try:
            os.unlink(os.path.join(data, "vault", ADMIN_SOCKET))
        except FileNotFoundError:
            pass
        _check_free(vault_port, "vault's link")
        if not args.vault_only:
            _check_free(args.port, "S3")
        vault = subprocess.Popen(vault_cmd, process_group=0, env=child_env(),
                                 preexec_fn=functools.partial(_die_with_parent, os.getpid()))
        children.append(("vault", vault))
        # the admin socket appears once the link listens (probing the link
        # port itself would show up in the vault's log as a refused handshake)
        _wait_ready(vault, "vault", path=os.path.join(data, "vault", ADMIN_SOCKET))
        record_deployment()
        if args.vault_only:
            # for the operator commands that need the vault and a stopped gateway (restore, gc)
            print(f"airlock vault is up alone (link on 127.0.0.1:{vault_port}, data "
                  f"{os.path.abspath(os.path.join(data, 'vault'))}); the gateway is not running.\n"
                  f"try: airlock gc --data {data}    (Ctrl-C stops the vault)", flush=True)
        else:
            gw = subprocess.Popen(gw_cmd, process_group=0, env=child_env(),
                                  preexec_fn=functools.partial(_die_with_parent, os.getpid()))
            children.append(("gateway", gw))
            _wait_ready(gw, "gateway", port=args.port)
            _print_endpoint(cfg, data, vault_port)
        while not stopping:
            for name, p in children:
                if p.poll() is not None:
                    print(f"airlock: the {name} exited (status {p.returncode}); stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.2)
    finally:
        # the gateway first (it stops taking writes), then the vault
        for name, p in reversed(children):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    # a process that is stopping drains its requests first; its
                    # own watchdog ends it by STOP_DEADLINE_S whatever happens
                    p.wait(STOP_DEADLINE_S + 5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    failed = [n for n, p in children if p.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0


def _die_with_parent(parent: int) -> None:
    """In a child of `airlock up`, before exec: SIGTERM when `up` dies, even
    by SIGKILL (Linux PR_SET_PDEATHSIG), so that its processes, which run
    in process groups of their own, are not left running without it.  The
    orderly stop (gateway first) is `up`'s own; this is the last resort."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return                                  # not Linux: nothing to arrange
    if os.getppid() != parent:                  # `up` died before the prctl
        os._exit(1)


# ---------------------------------------------------------------------- operator commands
def _vault_data(args) -> str:
    if args.vault_data:
        return args.vault_data
    if args.data:
        return os.path.join(args.data, "vault")
    if getattr(args, "config", None):
        return _vault_config(args).data
    raise ConfigError("give --data DIR (a local deployment), --vault-data DIR or --config vault.toml")


def _progress_bar(done: int, total: int, width: int = 30) -> str:
    frac = 0.0 if total <= 0 else min(done / total, 1.0)
    fill = int(frac * width)
    return f"[{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}%  {done / 2**20:,.1f}/{total / 2**20:,.1f} MiB"


def cmd_compact(args) -> int:
    from airlock.vault.daemon import ADMIN_SOCKET, DataLock, VaultConfig, admin_request, open_store
    vdata = _vault_data(args)
    if not os.path.isdir(os.path.join(vdata, "log")):
        raise ConfigError(f"{vdata} is not a vault data directory (no log/ in it)")
    tty = sys.stderr.isatty()

    shown = [-1]

    def show(done: int, total: int) -> None:
        line = "compacting " + _progress_bar(done, total)
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
            return
        step = 100 if total <= 0 else int(done * 10 / total) * 10   # a line per 10% when not a terminal
        if step != shown[0]:
            shown[0] = step
            print(line, file=sys.stderr, flush=True)

    sock = os.path.join(vdata, ADMIN_SOCKET)
    try:
        answer = admin_request(sock, {"op": "compact", "keep": args.keep},
                               on_message=lambda m: show(m["progress"]["done"], m["progress"]["total"]))
        if not answer.get("ok"):
            raise AirlockError(f"compaction failed: {answer.get('error')}")
        merged = answer["result"]
    except (FileNotFoundError, ConnectionRefusedError):
        # the vault is not running: compact its files directly (holding its
        # lock), with the vault's own settings (retention) when its config is given
        cfg = _vault_config(args) if args.config else VaultConfig()
        cfg.data = vdata
        lock = DataLock(vdata)
        try:
            store = open_store(cfg)
            try:
                merged = store.compact(keep=args.keep, progress=show)
            finally:
                store.close_sync()
        finally:
            lock.release()
    if tty:
        print(file=sys.stderr)
    if not merged:
        print("nothing to compact")
    for m in merged:
        print(f"merged overlay {m.get('overlay', m.get('name', '?'))}: "
              f"{m.get('chunks_added', m.get('chunks', 0))} new chunk(s), "
              f"{m.get('bytes_added', m.get('bytes', 0))} bytes into the base volume, "
              f"{m.get('records', 0)} record(s)")
    return 0


def _vault_op(args, request: dict, local):
    """Run an admin request on the running vault, or, when it is not running,
    `local(store)` on its files directly while holding its DataLock."""
    from airlock.vault.daemon import ADMIN_SOCKET, DataLock, VaultConfig, admin_request, open_store
    vdata = _vault_data(args)
    if not os.path.isdir(os.path.join(vdata, "log")):
        raise ConfigError(f"{vdata} is not a vault data directory (no log/ in it)")
    try:
        answer = admin_request(os.path.join(vdata, ADMIN_SOCKET), request)
    except (FileNotFoundError, ConnectionRefusedError):
        cfg = _vault_config(args) if getattr(args, "config", None) else VaultConfig()
        cfg.data = vdata
        lock = DataLock(vdata)
        try:
            store = open_store(cfg)
            try:
                return local(store)
            except KeyError as e:
                raise AirlockError(f"not found: {e.args[0] if e.args else e}") from None
            except ValueError as e:
                raise AirlockError(str(e)) from None
            finally:
                store.close_sync()
        finally:
            lock.release()
    if not answer.get("ok"):
        raise AirlockError(f"{request['op']} failed: {answer.get('error')}")
    return answer["result"]


def _snapshot_line(s: dict) -> str:
    pts = ",".join(str(p) for p in s["points"])
    return (f"{s['id']:>4}  {s['name']:<24} {s['mode']:<4} seq={s['seq']:<8} points={pts:<10} "
            f"versions={s['versions']} table_bytes={s['table_bytes']} chunks={s['chunks']} "
            f"data_bytes={s['data_bytes']}{'  (periodic)' if s['periodic'] else ''}")


def cmd_snapshot(args) -> int:
    """Vault-side snapshots (docs/format/vault.md, "Snapshots")."""
    act = args.action
    if act == "create":
        r = _vault_op(args, {"op": "snapshot-create", "name": args.name, "mode": args.mode},
                      lambda st: st.snapshot_create(name=args.name, mode=args.mode))
    elif act == "list":
        r = _vault_op(args, {"op": "snapshot-list"}, lambda st: st.snapshots())
    elif act == "delete":
        r = _vault_op(args, {"op": "snapshot-delete", "snapshot": args.snapshot},
                      lambda st: st.snapshot_delete(args.snapshot))
    else:
        r = _vault_op(args, {"op": "snapshot-merge", "a": args.a, "b": args.b, "name": args.name},
                      lambda st: st.snapshot_merge(args.a, args.b, name=args.name))
    if args.json:
        print(json.dumps(r, indent=2))
    elif act == "create":
        print("created " + _snapshot_line(r))
    elif act == "list":
        if not r:
            print("no snapshots")
        for s in r:
            print(_snapshot_line(s))
    elif act == "delete":
        d = r["deleted"]
        print(f"deleted snapshot {d['id']} ({d['name']}): {r['freed_versions']} versions freed, "
              f"{r['moved_versions']} moved to snapshots that still need them")
    else:
        print(f"merged snapshots {r['merged'][0]} and {r['merged'][1]} into " + _snapshot_line(r["snapshot"]))
        print("freed: " + ", ".join(f"{k}={v}" for k, v in r["freed"].items()))
    return 0


def _primary_side(args) -> GatewayConfig:
    """The primary domain's config for operator tools (verify, restore):
    from a local deployment (--data) or a gateway config (--config)."""
    if args.data:
        dep = _deployment(args.data)
        cfg = GatewayConfig()
        cfg.data = os.path.join(args.data, dep["primary"])
        cfg.vault = _parse_listen(dep["vault"])
        cfg.link_keys = os.path.join(args.data, "primary", "keys")
    elif getattr(args, "config", None):
        cfg = load_gateway_config(args.config)
        if cfg.vault is None:
            raise ConfigError(f"the gateway config {args.config} has no [link] vault")
    else:
        raise ConfigError("give --data DIR (a local deployment) or --config FILE (the gateway's config)")
    return cfg


def _link_for(args):
    """(LinkClient, primary data dir) for verify/restore."""
    from airlock.gateway import make_link_client
    cfg = _primary_side(args)
    return make_link_client(cfg), cfg.data


def cmd_verify(args) -> int:
    from airlock.primary.verify import compare
    link, pdata = _link_for(args)
    diffs, summary = asyncio.run(compare(pdata, link))
    for d in diffs:
        print(d)
    print(f"{'DIFFERENT' if diffs else 'equal'}: {summary['buckets']} bucket(s), {summary['objects']} "
          f"object(s) on the primary; primary log at {summary['primary_last_seq']}, "
          f"vault log at {summary['vault_last_seq']}")
    return 1 if diffs else 0


def _progress_printer(label: str):
    """(show(done, total), finish()) for a byte progress bar on stderr: redrawn
    on a terminal, a line per 10% otherwise."""
    tty = sys.stderr.isatty()
    shown = [-1]

    def show(done: int, total: int) -> None:
        line = f"{label} " + _progress_bar(done, total)
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
            return
        step = 100 if total <= 0 else int(done * 10 / total) * 10
        if step != shown[0]:
            shown[0] = step
            print(line, file=sys.stderr, flush=True)

    def finish() -> None:
        if tty and shown[0] != -2:
            print(file=sys.stderr)
            shown[0] = -2

    return show, finish


def cmd_restore(args) -> int:
    if args.snapshot is not None:
        return _restore_snapshot(args)
    if args.to_bucket is not None:
        raise ConfigError("--to-bucket goes with --snapshot")
    from airlock.primary.restore import restore
    link, pdata = _link_for(args)
    show, finish = _progress_printer("restoring")
    try:
        s = asyncio.run(restore(pdata, link, bucket=args.bucket, prefix=args.prefix or "",
                                verify_log=args.verify_log, progress=show))
    finally:
        finish()
    scope = "everything" if args.bucket is None else f"bucket {args.bucket}"
    if args.prefix:
        scope += f", keys starting with {args.prefix!r}"
    if s.log_moved_aside:
        print(f"the primary log was unreadable and was moved aside to {s.log_moved_aside}")
    if s.log_tail_cut:
        print(f"cut {s.log_tail_cut} bytes of a torn or damaged tail off the primary log")
    print(f"log: {s.records_fetched} record(s) fetched from the vault; primary log now ends at {s.log_last_seq}")
    print(f"scope: {scope}: {s.objects} object(s), {s.parts} open upload part(s)")
    print(f"chunks: {s.chunks_checked} checked ({s.bytes_checked:,} bytes), "
          f"{s.chunks_copied} copied from the vault ({s.bytes_copied:,} bytes)")
    for d in s.failed:
        print(f"NOT RESTORED: chunk {d.digest} ({d.problem}): {d.error}")
    print(s.line())
    return 1 if s.failed else 0


def _restore_snapshot(args) -> int:
    from airlock.primary.pitr import restore_snapshot
    from airlock.errors import InvalidBucketName
    from airlock.s3.common import check_bucket_name
    if args.prefix:
        raise ConfigError("--prefix does not go with --snapshot (a snapshot restores whole buckets)")
    if args.verify_log:
        raise ConfigError("--verify-log does not go with --snapshot (it checks the log a plain restore fetches)")
    if args.to_bucket is not None:
        if args.to_bucket == args.bucket:
            raise ConfigError("--to-bucket must name another bucket (without it, --bucket B is restored in place)")
        try:
            check_bucket_name(args.to_bucket)
        except InvalidBucketName:
            raise ConfigError(f"--to-bucket {args.to_bucket!r} is not a valid S3 bucket name") from None
    cfg = _primary_side(args)
    tty = sys.stderr.isatty()

    def show(s) -> None:
        line = (f"restoring snapshot {s.snapshot}: {s.objects} object(s) seen, {s.written} written, "
                f"{s.unchanged} unchanged, {s.chunks_fetched} chunk(s) fetched")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    s = asyncio.run(restore_snapshot(cfg, args.snapshot, bucket=args.bucket, to_bucket=args.to_bucket,
                                     progress=show))
    if tty:
        print(file=sys.stderr)
    target = f"into bucket {args.to_bucket}" if args.to_bucket else "in place"
    print(f"restored {s.buckets} bucket(s) from snapshot {s.snapshot} {target}: {s.written} object(s) "
          f"written back, {s.unchanged} already equal, {s.deleted} created after the snapshot deleted; "
          f"{s.chunks_fetched} chunk(s) ({s.bytes_fetched:,} bytes) fetched from the vault")
    print(s.line())
    return 0


def cmd_scrub(args) -> int:
    from airlock.primary.scrub import scrub
    link, pdata = _link_for(args) if args.repair else (None, _primary_data(args))
    show, finish = _progress_printer("scrubbing")
    try:
        r = asyncio.run(scrub(pdata, link, repair=args.repair, progress=show))
    finally:
        finish()
    for d in r.damage:
        use = "" if d.referenced else " (not referenced by any live object)"
        if d.repaired:
            fate = f"repaired from the {d.source}"
        elif args.repair:
            fate = f"NOT repaired: {d.error}"
        else:
            fate = "not repaired (--no-repair)"
        print(f"chunk {d.digest}: {d.problem}{use}; {fate}")
    print(f"{'clean' if not r.remaining else 'DAMAGED'}: {r.chunks_checked} chunk(s) checked "
          f"({r.bytes_checked:,} bytes), {len(r.damage)} problem(s), {r.repaired} repaired, "
          f"{r.remaining} remaining")
    print(r.line())
    return 1 if r.remaining else 0


def cmd_gc(args) -> int:
    from airlock.primary.gc import gc
    if bool(args.data) == bool(args.config):
        raise ConfigError("give --data DIR (a local deployment) or --config FILE (the gateway's config)")
    fsync = True
    if args.config:
        cfg = load_gateway_config(args.config)
        fsync = cfg.fsync
        if cfg.vault is None and not args.no_vault_check:
            raise ConfigError("the gateway config has no [link] vault to ask first; "
                              "run gc with --no-vault-check")
    if args.no_vault_check:
        link, pdata = None, _primary_data(args)
    else:
        link, pdata = _link_for(args)
    try:
        r = asyncio.run(gc(pdata, link, dry_run=args.dry_run, fsync=fsync))
    except VaultUnavailable as e:
        raise VaultUnavailable(f"{e} (gc asks the vault first; --no-vault-check runs without it)") from None
    except OSError as e:
        # a full or read-only disk, a permission: one line; what was removed so far stays removed
        raise AirlockError(f"gc stopped: {e}") from None
    if r.vault_last_seq is not None:
        print(f"primary log at {r.primary_last_seq}, vault log at {r.vault_last_seq}")
    print(r.line())
    if r.small_db_shrunk is not None:
        before, after = r.small_db_shrunk
        print(f"small.sqlite rewritten without its free pages: {before:,} -> {after:,} bytes")
    if r.small_db_not_shrunk is not None:
        print(f"small.sqlite not rewritten ({r.small_db_not_shrunk}); its free pages are reused for new "
              f"small chunks; run gc again with more free space to shrink it")
    if r.other_files:
        print(f"left alone: {r.other_files} file(s) under chunks/ that are not chunk files")
    return 0


def _primary_data(args) -> str:
    if args.data:
        return os.path.join(args.data, _deployment(args.data)["primary"])
    return load_gateway_config(args.config).data


def cmd_status(args) -> int:
    import urllib.request
    out: dict = {}
    gateway = args.gateway or (_deployment(args.data)["gateway"] if args.data else None)
    if args.gateway:
        _parse_listen(args.gateway, "--gateway")       # a typo is an error, not "down"
    if gateway:
        try:
            with urllib.request.urlopen(f"http://{gateway}/_airlock/health", timeout=5) as r:
                out["gateway"] = json.load(r)
        except OSError as e:
            out["gateway"] = {"status": "down", "error": str(e)}
    vdata = args.vault_data or (os.path.join(args.data, "vault") if args.data else None)
    if vdata:
        from airlock.vault.daemon import ADMIN_SOCKET, admin_request
        try:
            ans = admin_request(os.path.join(vdata, ADMIN_SOCKET), {"op": "status"})
            out["vault"] = ans.get("result") if ans.get("ok") else {"status": "error", "error": ans.get("error")}
        except (FileNotFoundError, ConnectionRefusedError):
            out["vault"] = {"status": "down"}
    if not out:
        raise ConfigError("give --data DIR (a local deployment), --gateway HOST:PORT or --vault-data DIR")
    lines, code = status_report(out)
    print(json.dumps(out, indent=2, sort_keys=True) if args.json else "\n".join(lines))
    return code


def status_report(out: dict) -> tuple[list[str], int]:
    """The lines `airlock status` prints for what the gateway's health and
    the vault's admin socket answered, and its exit status: 1 when either
    is down, degraded or failed (with --json too), else 0."""
    lines = []
    g = out.get("gateway")
    if g is not None:
        lines.append(f"gateway: {g.get('status')}  replication={g.get('replication', '-')} "
                     f"vault_connected={g.get('vault_connected', '-')} last_seq={g.get('last_seq', '-')} "
                     f"primary_storage={g.get('primary_storage', '-')} processes={len(g.get('processes') or [1])}")
        links = [f"{p.get('role')} {p.get('pid')} {p['vault_link']}" for p in g.get("processes") or []
                 if p.get("vault_link")]
        if links:
            # a worker opens its own link on its first large chunk; until then they go through the leader
            lines.append(f"  vault links: {', '.join(links)}")
        served = [f"{p.get('role')} {p.get('pid')} {p['connections']} open / {p.get('busy_connections', '-')} busy"
                  f" / {p.get('requests', '-')} requests" for p in g.get("processes") or [] if "connections" in p]
        if served:
            # where the leader has placed client connections (primary/dispatch.py)
            lines.append(f"  connections: {', '.join(served)}")
        for note in g.get("workers_not_running") or []:
            lines.append(f"  NOT RUNNING: {note}")
        if g.get("degraded_reason"):
            lines.append(f"  DEGRADED: {g['degraded_reason']}; reads served from the vault, writes refused")
        st = g.get("stats") or {}
        if st.get("chunks_from_vault") or st.get("chunks_repaired"):
            lines.append(f"  chunks read from the vault: {st.get('chunks_from_vault', 0)}, "
                         f"repaired: {st.get('chunks_repaired', 0)}, "
                         f"repair failures: {st.get('repair_failures', 0)}")
    v = out.get("vault")
    if v is not None:
        if "last_seq" in v:
            ovs = v.get("overlays", [])
            base = v.get("base", {})
            state = "FAILED" if v.get("failed") else "up"
            lines.append(f"vault:   {state}  last_seq={v['last_seq']} overlays={len(ovs)} "
                         f"base_bytes={base.get('bytes', 0)} base_chunks={base.get('chunks', 0)}")
            if v.get("failed"):
                lines.append(f"  FAILED: {v['failed']}; writes refused until it recovers in place "
                             "(retried every 2 s, backing off to 30 s)")
            for o in ovs:
                lines.append(f"  overlay {o.get('name')}: {'sealed' if o.get('sealed') else 'open'}, "
                             f"{o.get('bytes', 0)} bytes, {o.get('chunks', 0)} chunks, "
                             f"{o.get('records', 0)} records")
        else:
            lines.append(f"vault:   {v.get('status')}" + (f" ({v['error']})" if v.get("error") else ""))
    bad_gateway = g is not None and g.get("status") not in (None, "ok")
    bad_vault = v is not None and ("last_seq" not in v or bool(v.get("failed")))
    return lines, 1 if bad_gateway or bad_vault else 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="airlock", description="S3 object store with a synchronously replicated vault")
    p.add_argument("--version", action="version", version=f"airlock {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run vault + gateway on this machine in the foreground")
    up.add_argument("--data", default="./airlock-data", help="data directory (default ./airlock-data)")
    up.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"S3 port (default {DEFAULT_PORT})")
    up.add_argument("--vault-port", type=_port, help="link port of the vault (default: S3 port + 1)")
    up.add_argument("--config", help="TOML config file: its gateway tables (users, region, ...) for the "
                                     "gateway, its [vault] tables (retention, snapshots, ...) for the vault")
    up.add_argument("--vault-only", action="store_true",
                    help="start only the vault (for restore and gc, which need the gateway stopped)")
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run the S3 gateway (primary domain)")
    gw.add_argument("--config", help="TOML config file")
    gw.add_argument("--data", dest="data_dir", help="primary data directory (overrides config)")
    gw.add_argument("--listen", help="host:port (overrides config)")
    gw.add_argument("--port", type=_port, help="port (overrides config)")
    gw.add_argument("--vault", help="host:port of the vault's link (overrides config)")
    gw.add_argument("--link-keys", help="directory with primary.crt, primary.key, vault.crt")
    gw.add_argument("--ack-timeout", type=_positive_float, help="seconds to wait for the vault's ack before 503")
    gw.add_argument("--no-fsync", action="store_true", help="skip fsync (benchmarks of throw-away data only)")
    gw.add_argument("--chunk-sync", choices=["vault", "local"], default=None,
                    help="'local' (default: fsync chunk files too) or, with a vault, 'vault' (chunk "
                         "files are not fsynced; the vault's durable copy is the guarantee)")
    gw.add_argument("--workers", default=None,
                    help="gateway processes serving the port: N or 'auto' (default: one per CPU, at "
                         "most 4); each one past the first is a worker that commits through the first")
    gw.set_defaults(func=cmd_gateway)

    va = sub.add_parser("vault", help="run the vault (secondary domain)")
    va.add_argument("--config", help="TOML config file")
    va.add_argument("--data", dest="data_dir", help="vault data directory (overrides config)")
    va.add_argument("--listen", help="host:port of the link (overrides config)")
    va.add_argument("--keys", help="directory with vault.crt, vault.key, primary.crt")
    va.add_argument("--overlay-max-bytes", type=_positive_int, help="seal the open overlay at this size")
    va.add_argument("--overlay-max-age", type=_positive_float, help="seal the open overlay at this age (seconds)")
    va.set_defaults(func=cmd_vault)

    ke = sub.add_parser("keys", help="create link identities (mutual TLS keys)")
    ke.add_argument("--dir", help="keys directory to create the identity in")
    ke.add_argument("--role", choices=("primary", "vault"))
    ke.add_argument("--local", metavar="DATA", help="create both identities for a local deployment")
    ke.set_defaults(func=cmd_keys)

    for name, func, helptext in (("compact", cmd_compact, "merge the oldest overlays into the base volume"),):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--data", help="local deployment directory")
        c.add_argument("--vault-data", help="the vault's data directory (two-host deployments)")
        c.add_argument("--keep", type=_non_negative_int, default=0, help="overlays to keep (default 0: merge all)")
        c.add_argument("--config", help="the vault's config (its data dir and retention), on the vault host")
        c.set_defaults(func=func)

    sn = sub.add_parser("snapshot", help="vault snapshots: create, list, delete, merge (on the vault host)")
    snsub = sn.add_subparsers(dest="action", required=True)
    for act, helptext in (("create", "a snapshot of the vault's current state"),
                          ("list", "every snapshot with its points and space accounting"),
                          ("delete", "delete a snapshot (what only it protected becomes prunable)"),
                          ("merge", "combine two adjacent snapshots into one; the two are deleted")):
        c = snsub.add_parser(act, help=helptext)
        c.add_argument("--data", help="local deployment directory")
        c.add_argument("--vault-data", help="the vault's data directory (two-host deployments)")
        c.add_argument("--config", help="the vault's config (its data dir and retention), on the vault host")
        c.add_argument("--json", action="store_true")
        if act == "create":
            c.add_argument("--mode", choices=("cow", "full"), default="cow",
                           help="cow (default: cheap, takes old versions before retention prunes them) "
                                "or full (complete block map allocated at creation)")
            c.add_argument("--name", help="a name (default snapshot-<id>)")
        elif act == "delete":
            c.add_argument("snapshot", help="id or name")
        elif act == "merge":
            c.add_argument("a", help="id or name")
            c.add_argument("b", help="id or name of the adjacent snapshot")
            c.add_argument("--name", help="name of the combined snapshot (default A+B)")
        c.set_defaults(func=cmd_snapshot)

    ve = sub.add_parser("verify", help="compare the primary's committed state with the vault's")
    ve.add_argument("--data", help="local deployment directory")
    ve.add_argument("--config", help="gateway config (two-host deployments)")
    ve.set_defaults(func=cmd_verify)

    re_ = sub.add_parser("restore", help="rebuild the primary's data from the vault (gateway stopped)")
    re_.add_argument("--data", help="local deployment directory")
    re_.add_argument("--config", help="gateway config (two-host deployments)")
    re_.add_argument("--bucket", help="restore only this bucket's chunks (the log is always restored whole)")
    re_.add_argument("--prefix", help="restore only the chunks of keys starting with this")
    re_.add_argument("--verify-log", action="store_true",
                     help="compare every local log record with the vault's, not only the last")
    re_.add_argument("--snapshot", help="bring the primary (or --bucket) back to this vault snapshot "
                                        "(id or name; see airlock snapshot list)")
    re_.add_argument("--to-bucket", help="with --snapshot and --bucket: restore into this (new) bucket instead")
    re_.set_defaults(func=cmd_restore)

    sc = sub.add_parser("scrub", help="verify every chunk of the primary; repair bad ones from the vault")
    sc.add_argument("--data", help="local deployment directory")
    sc.add_argument("--config", help="gateway config (two-host deployments)")
    sc.add_argument("--repair", action=argparse.BooleanOptionalAction, default=True,
                    help="fetch bad or missing chunks from the vault (default: yes)")
    sc.set_defaults(func=cmd_scrub)

    gc = sub.add_parser("gc", help="remove chunks nothing references from the primary (gateway stopped)")
    gc.add_argument("--data", help="local deployment directory")
    gc.add_argument("--config", help="gateway config (two-host deployments)")
    gc.add_argument("--dry-run", action="store_true", help="count what would be removed; remove nothing")
    gc.add_argument("--no-vault-check", action="store_true",
                    help="do not ask the vault first whether it holds records this primary has not "
                         "applied (chunks only those reference would be removed, then fetched back "
                         "from the vault when read)")
    gc.set_defaults(func=cmd_gc)

    st = sub.add_parser("status", help="health of the gateway and the vault")
    st.add_argument("--data", help="local deployment directory")
    st.add_argument("--vault-data", help="the vault's data directory (on the vault host)")
    st.add_argument("--gateway", help="host:port of the gateway's S3 endpoint (its /_airlock/health)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    # a process killed by SIGSEGV / SIGBUS / SIGABRT leaves its Python
    # traceback on stderr (the server's log) instead of vanishing silently
    faulthandler.enable()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"airlock: {e}", file=sys.stderr)
        return 2
    except AirlockError as e:
        print(f"airlock: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `airlock status | head -1`: the reader is gone, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, UnicodeDecodeError) as e:
        # a path that is a file, a directory that cannot be made, a config
        # that is not UTF-8: one line (the traceback with --verbose)
        logging.getLogger("airlock").debug("failed", exc_info=True)
        print(f"airlock: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
