"""The benchmark: airlock against its peers, one command.

    python benchmarks/run.py            # full: 3 rounds x 5 s per cell
    python benchmarks/run.py --quick    # 2 rounds x 2 s per cell

Starts airlock as deployed -- `python -m airlock vault` plus `python -m airlock
gateway --vault ...` (synchronous replication over the mutual-TLS link, fsync
on both sides; temp data dirs) -- and every available peer (moto server;
SeaweedFS if `weed` is installed) on loopback, optionally also a gateway
without a vault (`--airlock-local-only`, for comparison),
then runs a PUT/GET matrix -- object sizes 4 KiB, 1 MiB, 64 MiB at
concurrencies 1, 4, 16 (64 MiB: 1, 4) -- interleaved between targets
(cell by cell: airlock, peer, peer, airlock, ... for several rounds), so that
machine noise hits every target alike.  Every cell is bounded by time and by
an op count.  Writes benchmarks/results/<timestamp>.md (median ops/s and MiB/s,
min-max over rounds, ratio airlock/peer, and the issue's targets marked met /
not met) and <timestamp>.json (every sample).

With `wrk` installed (apt-get install wrk) both PUTs and GETs are driven by
wrk on presigned URLs: GETs of one pre-uploaded object, PUTs to 1024 keys per
cell with a body unique per request (loadgen.wrk_put); a C client leaves the
two cores to the servers.  PUTs of 1 MiB and more are sent from plain
sockets instead (loadgen.raw_put: one body buffer per connection, stamped in
place per request): wrk's Lua must build each request as a fresh string and
copies it again, ~70 ms of client CPU per 64 MiB PUT spent while the server
waits (docs/performance.md, 2026-11-26 evening).  --wrk-large-puts keeps wrk
for those too, as in earlier results.  --no-wrk (or no wrk) uses the
multiprocess boto3 loadgen for every PUT instead (also unique bodies, see
loadgen.py).

--warmup S first drives every target, unmeasured, for S seconds (half 4 KiB
PUT c=16, half 1 MiB PUT c=4): a fresh airlock data directory is about half
as fast for its first ~10-15 s (docs/performance.md), which otherwise lands
in round 0.  Default 0, so earlier results stay comparable; the report says
which was used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import peers  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
SIZES = [4 * KiB, 1 * MiB, 64 * MiB]
CONCURRENCY = {4 * KiB: [1, 4, 16], 1 * MiB: [1, 4, 16], 64 * MiB: [1, 4]}
MAX_OPS = {4 * KiB: 20000, 1 * MiB: 4000, 64 * MiB: 60}    # per cell, on top of the time bound
RESULTS = Path(__file__).resolve().parent / "results"


def human(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def put_cell(t, size: int, conc: int, duration: float, use_wrk: bool, gen, prefix: str,
             wrk_large: bool = False) -> dict:
    """One PUT cell on target t: wrk (raw_put for large bodies unless
    `wrk_large`) on presigned URLs, or the boto3 loadgen."""
    if use_wrk:
        return loadgen.put_cell(loadgen.put_presigner(t.client(), "bench", f"{prefix}/"),
                                size, conc, duration, keys=64 if size >= 64 * MiB else 1024,
                                wrk_large=wrk_large)
    return gen.run(endpoint=t.endpoint, access_key=peers.ACCESS_KEY, secret_key=peers.SECRET_KEY,
                   bucket="bench", op="PUT", size=size, concurrency=conc, duration=duration,
                   max_ops=MAX_OPS[size], prefix=prefix, keys_per_thread=2 if size >= 64 * MiB else 8)


def warm_up(targets, seconds: float, use_wrk: bool, gen, log=print, wrk_large: bool = False) -> None:
    """Unmeasured PUT load on every target (see the module doc, --warmup)."""
    for t in targets:
        for size, conc in ((4 * KiB, 16), (MiB, 4)):
            r = put_cell(t, size, conc, seconds / 2, use_wrk, gen, "warmup", wrk_large)
            log(f"warm-up  {t.name:9s} PUT {human(size):>7s} c={conc:<2d} {r['ops_per_s']:9.1f} ops/s (not counted)")


def run_matrix(targets, rounds: int, duration: float, use_wrk: bool, ops=("PUT", "GET"),
               sizes=SIZES, log=print, warmup: float = 0.0, wrk_large: bool = False) -> list[dict]:
    gen = loadgen.LoadGen()
    samples: list[dict] = []
    try:
        getkeys = {}
        for t in targets:
            c = t.client()
            c.create_bucket(Bucket="bench")
            for size in sizes:
                key = f"get/{size}"
                c.put_object(Bucket="bench", Key=key, Body=os.urandom(size))
                getkeys[(t.name, size)] = key
        if warmup > 0:
            warm_up(targets, warmup, use_wrk, gen, log, wrk_large)
        for rnd in range(rounds):
            order = targets if rnd % 2 == 0 else list(reversed(targets))
            for size in sizes:
                for conc in CONCURRENCY[size]:
                    for op in ops:
                        for t in order:
                            if op == "GET" and use_wrk:
                                url = t.client().generate_presigned_url(
                                    "get_object", Params={"Bucket": "bench", "Key": getkeys[(t.name, size)]},
                                    ExpiresIn=3600)
                                r = loadgen.wrk_get(url, size, conc, duration)
                            elif op == "PUT":
                                r = put_cell(t, size, conc, duration, use_wrk, gen, f"r{rnd}", wrk_large)
                            else:
                                r = gen.run(endpoint=t.endpoint, access_key=peers.ACCESS_KEY,
                                            secret_key=peers.SECRET_KEY, bucket="bench", op=op,
                                            size=size, concurrency=conc, duration=duration,
                                            max_ops=MAX_OPS[size], prefix=f"r{rnd}",
                                            get_key=getkeys[(t.name, size)],
                                            keys_per_thread=2 if size >= 64 * MiB else 8)
                            r.update(target=t.name, round=rnd)
                            samples.append(r)
                            log(f"round {rnd} {t.name:9s} {op} {human(size):>7s} c={conc:<2d} "
                                f"{r['ops_per_s']:9.1f} ops/s {r['mib_per_s']:8.1f} MiB/s "
                                f"errors={r['errors']} {r['error_samples'][:1]}")
    finally:
        gen.close()
    return samples


def summarize(samples: list[dict], target_names: list[str]) -> list[dict]:
    rows = []
    keys = sorted({(s["op"], s["size"], s["concurrency"]) for s in samples},
                  key=lambda k: (k[0] != "PUT", k[1], k[2]))
    for op, size, conc in keys:
        row = {"op": op, "size": size, "concurrency": conc}
        for name in target_names:
            ss = [s for s in samples if s["target"] == name and (s["op"], s["size"], s["concurrency"]) == (op, size, conc)]
            if not ss:
                continue
            ops = [s["ops_per_s"] for s in ss]
            mib = [s["mib_per_s"] for s in ss]
            row[name] = {"ops_med": statistics.median(ops), "ops_min": min(ops), "ops_max": max(ops),
                         "mib_med": statistics.median(mib), "errors": sum(s["errors"] for s in ss),
                         "client": ss[0]["client"], "n": len(ss)}
        rows.append(row)
    return rows


# The targets: (label, op, size, concurrency or None for every
# concurrency measured, peer, minimum ratio airlock/peer of median ops/s).
TARGETS = [
    ("64 MiB PUT >= 1.5x SeaweedFS", "PUT", 64 * MiB, None, "seaweedfs", 1.5),
    ("1 MiB PUT >= 1.5x SeaweedFS", "PUT", 1 * MiB, None, "seaweedfs", 1.5),
    ("64 MiB GET >= 1.0x SeaweedFS", "GET", 64 * MiB, None, "seaweedfs", 1.0),
    ("4 KiB PUT ops/s at 16 connections >= 1.0x SeaweedFS", "PUT", 4 * KiB, 16, "seaweedfs", 1.0),
    ("4 KiB GET >= 1.0x SeaweedFS", "GET", 4 * KiB, None, "seaweedfs", 1.0),
    ("every figure >= 5x moto", None, None, None, "moto", 5.0),
]


def check_targets(rows: list[dict]) -> list[dict]:
    """Each target with the ratios it covers and met / not met (every cell it
    covers must reach the bound)."""
    out = []
    for label, op, size, conc, peer, bound in TARGETS:
        cells = []
        for r in rows:
            if (op and r["op"] != op) or (size and r["size"] != size) or (conc and r["concurrency"] != conc):
                continue
            a, b = r.get("airlock"), r.get(peer)
            if a and b and b["ops_med"]:
                cells.append((f"{r['op']} {human(r['size'])} c={r['concurrency']}", a["ops_med"] / b["ops_med"]))
        met = bool(cells) and all(x >= bound for _, x in cells)
        out.append({"target": label, "peer": peer, "bound": bound, "met": met if cells else None,
                     "cells": cells})
    return out


def markdown(rows: list[dict], target_names: list[str], meta: dict) -> str:
    peers_ = [n for n in target_names if n != "airlock"]
    out = [f"# airlock benchmark {meta['timestamp']}", "",
           f"- machine: {meta['machine']}", f"- mode: {meta['mode']} ({meta['rounds']} rounds x {meta['duration']} s "
           f"per cell, interleaved cell by cell; unmeasured warm-up {meta.get('warmup', 0):g} s per target)", f"- client: GETs {meta['get_client']}; PUTs {meta.get('put_client', meta['get_client'])} (unique body per PUT)", f"- airlock: {meta.get('airlock_build', '?')}",
           f"- command: `{meta.get('command', '?')}`", ""]
    for n, notes in meta["notes"].items():
        out.append(f"- {n}: {notes}")
    out.append("")
    head = ["op", "size", "conc"]
    for n in target_names:
        head += [f"{n} ops/s (min-max)", f"{n} MiB/s"]
    head += [f"airlock/{p}" for p in peers_]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in rows:
        cells = [r["op"], human(r["size"]), str(r["concurrency"])]
        for n in target_names:
            v = r.get(n)
            if v is None:
                cells += ["-", "-"]
                continue
            err = f" ({v['errors']} err)" if v["errors"] else ""
            cells += [f"{v['ops_med']:.1f} ({v['ops_min']:.1f}-{v['ops_max']:.1f}){err}", f"{v['mib_med']:.1f}"]
        for p in peers_:
            a, b = r.get("airlock"), r.get(p)
            cells.append(f"{a['ops_med'] / b['ops_med']:.2f}x" if a and b and b["ops_med"] else "-")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Ratios are airlock (replicated) median ops/s over the peer's median ops/s.", "",
            "## Issue targets", ""]
    for t in check_targets(rows):
        verdict = {True: "**met**", False: "**not met**", None: "not measured (peer missing)"}[t["met"]]
        detail = ", ".join(f"{c} {x:.2f}x" for c, x in t["cells"])
        if t["peer"] == "moto" and t["cells"]:
            below = [f"{c} {x:.2f}x" for c, x in t["cells"] if x < t["bound"]]
            detail = (f"{len(t['cells']) - len(below)} of {len(t['cells'])} cells >= {t['bound']:g}x"
                      + (f"; below: {', '.join(below)}" if below else ""))
        out.append(f"- {t['target']}: {verdict} ({detail})")
    out.append("")
    return "\n".join(out)


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}"


def keep_logs_of_failed(targets, samples, work: Path, out: Path, ts: str) -> list[Path]:
    """Copy the server log of every target that answered an error (or of
    all of them if the matrix itself failed) to `out` before the work
    directory goes: an error a later run does not reproduce is only
    explained by the log of the run that saw it."""
    failed = {t.name for t in targets} if samples is None else \
        {s["target"] for s in samples if s.get("errors")}
    kept = []
    for t in targets:
        log = t.workdir / f"{t.name}.log"
        if t.name in failed and log.exists():
            out.mkdir(parents=True, exist_ok=True)
            dest = out / f"{ts}-{t.name}.log"
            shutil.copyfile(log, dest)
            kept.append(dest)
    return kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds x 2 s per cell")
    ap.add_argument("--rounds", type=int, help="override the number of rounds")
    ap.add_argument("--duration", type=float, help="override seconds per cell")
    ap.add_argument("--peers", default="moto,seaweedfs", help="comma-separated peers to include if available")
    ap.add_argument("--no-wrk", action="store_true", help="use the boto3 loadgen even if wrk exists")
    ap.add_argument("--wrk-large-puts", action="store_true",
                    help="drive PUTs of 1 MiB and more with wrk too (the client of results before "
                         "2026-11-26 evening) instead of loadgen.raw_put")
    ap.add_argument("--airlock-chunk-vault", action="store_true",
                    help="also run airlock with --chunk-sync vault (chunk files not fsynced) as an extra target")
    ap.add_argument("--airlock-local-only", action="store_true",
                    help="also run a gateway without a vault (local commit point) as an extra target")
    ap.add_argument("--airlock-workers", type=int, default=None,
                    help="gateway processes of the airlock target (default: the gateway's default)")
    ap.add_argument("--airlock-also-workers", type=int, default=None, metavar="N",
                    help="also run airlock with a gateway of N processes as an extra target (airlock-wN)")
    ap.add_argument("--sizes", default="4K,1M,64M", help="object sizes to run, of 4K,1M,64M")
    ap.add_argument("--warmup", type=float, default=0.0, metavar="S",
                    help="unmeasured PUT load on every target for S seconds before round 0 (default 0)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    duration = args.duration or (2.0 if args.quick else 5.0)
    use_wrk = loadgen.wrk_available() and not args.no_wrk
    if not use_wrk and not args.no_wrk:
        print("note: wrk not found (apt-get install wrk); the boto3 loadgen drives every cell", file=sys.stderr)

    build = peers.airlock_build()
    print(f"airlock: {build}", flush=True)
    work = peers.make_workdir()
    targets = [peers.Airlock(work / "airlock", workers=args.airlock_workers)]
    if args.airlock_also_workers:
        n = args.airlock_also_workers
        targets.append(peers.Airlock(work / f"airlock-w{n}", workers=n, name=f"airlock-w{n}"))
    if args.airlock_chunk_vault:
        targets.append(peers.AirlockChunkSyncVault(work / "airlock-chunk-vault"))
    if args.airlock_local_only:
        targets.append(peers.AirlockLocalOnly(work / "airlock-local-only"))
    for name in filter(None, args.peers.split(",")):
        cls = peers.PEERS[name]
        if cls.available():
            targets.append(cls(work / name))
        else:
            print(f"note: peer {name} unavailable; install with: {cls.install_hint()}", file=sys.stderr)
    if len([t for t in targets if t.name in peers.PEERS]) == 0:
        print("warning: no peer available; airlock runs alone", file=sys.stderr)
    started = []
    samples = None                       # stays None if the matrix fails
    t0 = time.time()
    try:
        for t in targets:
            t.start()
            started.append(t)
            extra = f", vault pid {t.vault_pid}" if isinstance(t, peers.Airlock) else ""
            print(f"started {t.name} at {t.endpoint} (pid {t.pid}{extra})", flush=True)
        health = targets[0].health()
        if health.get("replication") != "vault" or not health.get("vault_connected"):
            raise RuntimeError(f"airlock gateway is not replicating to its vault: {health}")
        sizes = [{"4K": 4 * KiB, "1M": MiB, "64M": 64 * MiB}[x] for x in args.sizes.split(",")]
        samples = run_matrix(targets, rounds, duration, use_wrk, sizes=sizes, wrk_large=args.wrk_large_puts, log=lambda s: print(s, flush=True),
                             warmup=args.warmup)
    finally:
        for t in started:
            t.stop()
        ts = time.strftime("%Y%m%d-%H%M%S")
        kept = keep_logs_of_failed(targets, samples, work, args.out, ts)
        shutil.rmtree(work, ignore_errors=True)
        for path in kept:
            print(f"kept {path} (errors in its cells)", flush=True)
    names = [t.name for t in targets]
    meta = {"timestamp": ts, "machine": machine(), "mode": "quick" if args.quick else "full",
            "rounds": rounds, "duration": duration, "warmup": args.warmup, "get_client": "wrk (presigned URLs)" if use_wrk else "boto3 multiprocess",
            "put_client": loadgen.put_client_name(args.wrk_large_puts) if use_wrk else "boto3 multiprocess",
            "notes": {t.name: t.notes for t in targets}, "wall_s": round(time.time() - t0, 1),
            "airlock_build": build, "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{ts}.json").write_text(json.dumps({"meta": meta, "samples": samples}, indent=1))
    rows = summarize(samples, names)
    meta["targets"] = check_targets(rows)
    md = markdown(rows, names, meta)
    (args.out / f"{ts}.md").write_text(md)
    (args.out / f"{ts}.json").write_text(json.dumps({"meta": meta, "summary": rows, "samples": samples}, indent=1))
    print(md)
    print(f"wrote {args.out / (ts + '.md')} and .json ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
