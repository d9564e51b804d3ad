"""Command line: argument parsing only; every command calls into the modules.

Errors are one line on stderr and a non-zero exit (2 for usage/config, 1 for
runtime failures).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from airlock import __version__
from airlock.config import DEFAULT_PORT, GatewayConfig, load_gateway_config
from airlock.errors import AirlockError, ConfigError


def _print_ready(cfg: GatewayConfig) -> None:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    u = cfg.users[0]
    print(f"airlock gateway ready\n"
          f"  endpoint:   http://{host}:{cfg.port}\n"
          f"  region:     {cfg.region}\n"
          f"  access key: {u.access_key}\n"
          f"  secret key: {u.secret_key}\n"
          f"  data:       {os.path.abspath(cfg.data)}\n"
          f"try: AWS_ACCESS_KEY_ID={u.access_key} AWS_SECRET_ACCESS_KEY={u.secret_key} "
          f"aws --endpoint-url http://{host}:{cfg.port} s3 ls", flush=True)


def _gateway_config(args) -> GatewayConfig:
    cfg = load_gateway_config(args.config)
    if getattr(args, "listen", None):
        from airlock.config import _parse_listen
        cfg.host, cfg.port = _parse_listen(args.listen)
    if getattr(args, "port", None) is not None:
        cfg.port = args.port
    if getattr(args, "data_dir", None):
        cfg.data = args.data_dir
    if getattr(args, "no_fsync", False):
        cfg.fsync = False
    return cfg


def cmd_gateway(args) -> int:
    cfg = _gateway_config(args)
    from airlock.gateway import serve
    asyncio.run(serve(cfg, on_ready=_print_ready))
    return 0


def cmd_up(args) -> int:
    cfg = load_gateway_config(args.config)
    cfg.port = args.port
    cfg.data = os.path.join(args.data, "primary")
    from airlock.gateway import serve
    asyncio.run(serve(cfg, on_ready=_print_ready))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="airlock", description="S3 object store with a synchronously replicated vault")
    p.add_argument("--version", action="version", version=f"airlock {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole local deployment in the foreground")
    up.add_argument("--data", default="./airlock-data", help="data directory (default ./airlock-data)")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"S3 port (default {DEFAULT_PORT})")
    up.add_argument("--config", help="TOML config file")
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run the S3 gateway (primary domain)")
    gw.add_argument("--config", help="TOML config file")
    gw.add_argument("--data", dest="data_dir", help="primary data directory (overrides config)")
    gw.add_argument("--listen", help="host:port (overrides config)")
    gw.add_argument("--port", type=int, help="port (overrides config)")
    gw.add_argument("--no-fsync", action="store_true", help="skip fsync (benchmarks of throw-away data only)")
    gw.set_defaults(func=cmd_gateway)
    return p


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
