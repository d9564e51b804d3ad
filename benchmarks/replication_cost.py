"""The cost of synchronous replication: replicated airlock vs a local-only gateway.

    python benchmarks/replication_cost.py              # 3 rounds
    python benchmarks/replication_cost.py --rounds 5 --quick

Two targets on loopback, both with fsync on:
  replicated  `airlock vault` + `airlock gateway --vault ...` (mutual TLS link;
              a PUT is answered after the vault's durable ack, then the
              primary's own log fsync)
  local       `airlock gateway` without --vault (commit point = primary log)

Cells: PUT 4 KiB at concurrency 1 and 16, PUT 64 MiB at concurrency 1 and 2,
driven by wrk on presigned URLs when wrk is installed (64 MiB bodies by
loadgen.raw_put, see run.py; --wrk-large-puts for wrk there too), else by
the multiprocess boto3 load generator (loadgen.py; unique bodies either
way, so no dedup).  Interleaved: every round runs each cell on both targets back to back,
alternating which goes first, so machine noise hits both alike.  Each round
runs on fresh deployments and deletes them afterwards: nothing is ever
deleted by the cells (the vault keeps every version, the primary has no
chunk GC yet), and one round writes ~30 GB at today's speeds, so three
rounds on one deployment filled this machine's disk (ENOSPC, 2026-11-26).
The deletion happens between rounds, untimed.  Reports per
cell the median over rounds (min-max) of ops/s and p50 latency, and the ratio
replicated/local of time per PUT (= local ops/s / replicated ops/s).  Writes
benchmarks/results/replication-cost-<timestamp>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import peers  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
# (size, concurrency, seconds, max ops) per cell
CELLS = [(4 * KiB, 1, 5.0, 20000), (4 * KiB, 16, 5.0, 40000),
         (64 * MiB, 1, 20.0, 6), (64 * MiB, 2, 20.0, 8)]
QUICK_CELLS = [(4 * KiB, 1, 2.0, 5000), (4 * KiB, 16, 2.0, 10000),
               (64 * MiB, 1, 10.0, 3), (64 * MiB, 2, 10.0, 4)]
RESULTS = Path(__file__).resolve().parent / "results"
def human(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def summarize(samples: list[dict], cells) -> list[dict]:
    rows = []
    for size, conc, _d, _m in cells:
        row = {"size": size, "concurrency": conc}
        for t in ("replicated", "local"):
            ss = [s for s in samples if s["target"] == t and s["size"] == size and s["concurrency"] == conc]
            ops = [s["ops_per_s"] for s in ss]
            p50 = [s["p50_ms"] for s in ss if s["p50_ms"] is not None]
            row[t] = {"ops_per_s": statistics.median(ops), "ops_min": min(ops), "ops_max": max(ops),
                      "mib_per_s": statistics.median(s["mib_per_s"] for s in ss),
                      "p50_ms": statistics.median(p50) if p50 else None,
                      "p50_min": min(p50) if p50 else None, "p50_max": max(p50) if p50 else None,
                      "errors": sum(s["errors"] for s in ss)}
        # time per PUT, replicated / local, per round (both measured back to back) and overall
        per_round = []
        for rnd in sorted({s["round"] for s in samples}):
            a = [s for s in samples if s["round"] == rnd and s["target"] == "replicated"
                 and s["size"] == size and s["concurrency"] == conc]
            b = [s for s in samples if s["round"] == rnd and s["target"] == "local"
                 and s["size"] == size and s["concurrency"] == conc]
            if a and b and a[0]["ops_per_s"]:
                per_round.append(b[0]["ops_per_s"] / a[0]["ops_per_s"])
        row["time_ratio"] = row["local"]["ops_per_s"] / row["replicated"]["ops_per_s"]
        row["time_ratio_rounds"] = per_round
        if row["replicated"]["p50_ms"] and row["local"]["p50_ms"]:
            row["p50_ratio"] = row["replicated"]["p50_ms"] / row["local"]["p50_ms"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# Cost of synchronous replication ({meta['date']})", "",
           f"Machine: {meta['machine']}. {meta['rounds']} rounds, interleaved. fsync on both sides.",
           f"Client: {meta.get('client', '?')}.", "",
           "| PUT | conc | replicated ops/s (min-max) | local ops/s (min-max) | replicated p50 ms | "
           "local p50 ms | time ratio repl/local (per round) |",
           "|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        a, b = r["replicated"], r["local"]
        rr = ", ".join(f"{x:.2f}" for x in r["time_ratio_rounds"])
        out.append(f"| {human(r['size'])} | {r['concurrency']} | {a['ops_per_s']:.1f} "
                   f"({a['ops_min']:.1f}-{a['ops_max']:.1f}) | {b['ops_per_s']:.1f} "
                   f"({b['ops_min']:.1f}-{b['ops_max']:.1f}) | {a['p50_ms']:.1f} | {b['p50_ms']:.1f} | "
                   f"**{r['time_ratio']:.2f}x** ({rr}) |")
    errs = sum(r[t]["errors"] for r in rows for t in ("replicated", "local"))
    out += ["", f"Errors: {errs}."]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="shorter cells")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument("--no-wrk", action="store_true", help="boto3 loadgen even if wrk is installed")
    ap.add_argument("--wrk-large-puts", action="store_true",
                    help="PUTs of 1 MiB and more with wrk too, instead of loadgen.raw_put (see run.py)")
    args = ap.parse_args()
    cells = QUICK_CELLS if args.quick else CELLS
    tmp = Path(tempfile.mkdtemp(prefix="airlock-replcost-"))
    targets = {}
    gen = None
    samples: list[dict] = []
    try:
        use_wrk = loadgen.wrk_available() and not args.no_wrk
        gen = None if use_wrk else loadgen.LoadGen()
        for rnd in range(args.rounds):
            for t in targets.values():
                t.stop()
            targets.clear()
            if not args.keep:
                shutil.rmtree(tmp / f"r{rnd - 1}", ignore_errors=True)
            for name, cls in (("replicated", peers.Airlock), ("local", peers.AirlockLocalOnly)):
                targets[name] = cls(tmp / f"r{rnd}" / name).start()
                targets[name].client().create_bucket(Bucket="bench")
            print(f"round {rnd}: replicated gateway pid {targets['replicated'].pid}, vault pid "
                  f"{targets['replicated'].vault_pid}; local gateway pid {targets['local'].pid}", flush=True)
            for ci, (size, conc, duration, max_ops) in enumerate(cells):
                order = ["replicated", "local"] if (rnd + ci) % 2 == 0 else ["local", "replicated"]
                for name in order:
                    t = targets[name]
                    if use_wrk:
                        r = loadgen.put_cell(loadgen.put_presigner(t.client(), "bench"), size, conc, duration,
                                             keys=64 if size >= 64 * MiB else 1024,
                                             wrk_large=args.wrk_large_puts)
                    else:
                        r = gen.run(endpoint=t.endpoint, access_key=peers.ACCESS_KEY, secret_key=peers.SECRET_KEY,
                                    bucket="bench", op="PUT", size=size, concurrency=conc, duration=duration,
                                    max_ops=max_ops, prefix=f"r{rnd}", keys_per_thread=2)
                    r.update(target=name, round=rnd)
                    samples.append(r)
                    print(f"round {rnd} {name:10s} PUT {human(size):>6s} c{conc:<2d} "
                          f"{r['ops_per_s']:8.1f} ops/s {r['mib_per_s']:7.1f} MiB/s "
                          f"p50 {r['p50_ms'] or 0:8.1f} ms  errors {r['errors']}", flush=True)
    finally:
        if gen is not None:
            gen.close()
        for t in targets.values():
            t.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = summarize(samples, cells)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
                       f"{platform.release()}, Python {platform.python_version()}",
            "cells": cells,
            "client": (loadgen.put_client_name(args.wrk_large_puts) if loadgen.wrk_available() and not args.no_wrk
                       else "boto3 multiprocess")}
    md = markdown(rows, meta)
    print("\n" + md)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"replication-cost-{stamp}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "samples": samples}, indent=1))
    (RESULTS / f"replication-cost-{stamp}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
