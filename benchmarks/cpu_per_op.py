"""CPU per operation of each server process during one wrk cell.

    python benchmarks/cpu_per_op.py --target airlock --op PUT --size 4096 --conc 16

Starts one target (peers.py), runs one wrk cell (8 s; PUTs to presigned URLs
with unique bodies, GETs of one object), and reads utime+stime of every
server process from /proc/<pid>/stat before and after, plus wrk's own CPU
(RUSAGE_CHILDREN; PUTs of 1 MiB and more are sent by loadgen.raw_put's
threads in this process, which count their own CPU) and the machine's busy
share (/proc/stat), all over the cell's own window (raw_put reports its
start and end, after its set-up).  Tells whether
a cell is bound by one process's CPU (a Python process near 1.0 cores is
bound by its GIL) or by something else.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import peers  # noqa: E402


def _stat_times(path: str) -> tuple[float, float]:
    """(user, system) CPU seconds from a /proc .../stat file."""
    fields = open(path).read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, all its threads."""
    return _stat_times(f"/proc/{pid}/stat")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of one process, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = sum(_stat_times(f"/proc/{pid}/task/{tid}/stat"))
        except OSError:
            continue                       # the thread ended meanwhile
    return out


def machine_idle() -> tuple[int, int]:
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return v[3] + v[4], sum(v)


def measure(args, c, pids: dict, url: str | None) -> None:
    snaps = {}

    def snap(event: str) -> None:
        """Every counter at the start or the end of the cell itself (raw_put
        calls this around its measured window, after its set-up: presigned
        URLs, bodies, start delay; wrk cells are taken around the wrk run)."""
        snaps[event] = ({n: cpu_seconds(p) for n, p in pids.items()},
                        {n: thread_cpu(p) for n, p in pids.items()} if args.threads else {},
                        resource.getrusage(resource.RUSAGE_CHILDREN), machine_idle(), time.monotonic())

    if args.op == "PUT":
        r = loadgen.put_cell(loadgen.put_presigner(c, "bench"), args.size, args.conc, args.seconds,
                             wrk_large=args.wrk_large_puts, on_cell=snap)
    else:
        snap("start")
        r = loadgen.wrk_get(url, args.size, args.conc, args.seconds)
        snap("end")
    (before, threads0, ch0, i0, t0), (after, threads1, ch1, i1, t1) = snaps["start"], snaps["end"]
    el = t1 - t0
    print(f"{args.target} {args.op} {args.size} B c={args.conc}: {r['ops_per_s']:.0f} ops/s, "
          f"{r['mib_per_s']:.1f} MiB/s, errors {r['errors']}")
    for n in pids:
        user, system = after[n][0] - before[n][0], after[n][1] - before[n][1]
        used, ops = user + system, max(r["ops"], 1)
        print(f"  {n}: {used / el:.2f} cores, {used / ops * 1e3:.3f} ms CPU per op "
              f"(user {user / ops * 1e3:.3f}, system {system / ops * 1e3:.3f})")
        if args.threads:
            # the main thread runs the event loop; the others are executor,
            # hashing and log threads (a thread that ended during the cell is missed)
            t0, t1 = threads0[n], threads1[n]
            used_t = {tid: t1[tid] - t0.get(tid, 0.0) for tid in t1}
            main_t = used_t.pop(pids[n], 0.0)
            busy_t = sorted((u for u in used_t.values() if u > 0), reverse=True)
            print(f"    event-loop thread {main_t / el:.2f} cores; other threads "
                  + (", ".join(f"{u / el:.2f}" for u in busy_t[:6]) or "none")
                  + (f" (+{len(busy_t) - 6} more)" if len(busy_t) > 6 else ""))
    client = (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)    # wrk
    if "client_cpu_s" in r:         # raw_put's connections (threads of this process) during the cell
        client = r["client_cpu_s"]
    busy = (1 - (i1[0] - i0[0]) / max(i1[1] - i0[1], 1)) * (os.cpu_count() or 1)
    print(f"  client ({r['client']}): {client / el:.2f} cores; machine: {busy:.2f} of {os.cpu_count()} cores busy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="airlock", choices=["airlock", "airlock-chunk-vault", "airlock-local-only", "seaweedfs", "moto"])
    ap.add_argument("--op", default="PUT", choices=["PUT", "GET"])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--conc", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=None, help="airlock gateway processes (--workers)")
    ap.add_argument("--link-delay-ms", type=float, default=0.0,
                    help="airlock: run the link through benchmarks/delay_proxy.py adding this much each way")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the cell this many times on the same deployment (shows warm-up)")
    ap.add_argument("--keep-data", action="store_true",
                    help="leave the data directory (printed) instead of removing it: on ext4 without a "
                         "journal, files deleted in the last minutes make the next run's file creation "
                         "slow (docs/performance.md), so back-to-back A/B runs should delete at the end")
    ap.add_argument("--wrk-large-puts", action="store_true",
                    help="PUTs of 1 MiB and more with wrk too, instead of loadgen.raw_put (see run.py)")
    ap.add_argument("--threads", action="store_true",
                    help="also print each server process's CPU by thread (event loop, busiest others)")
    args = ap.parse_args(argv)
    if not loadgen.wrk_available():
        raise SystemExit("wrk is needed (apt-get install wrk)")
    cls = {"airlock": peers.Airlock, "airlock-chunk-vault": peers.AirlockChunkSyncVault,
           "airlock-local-only": peers.AirlockLocalOnly, "seaweedfs": peers.SeaweedFS,
           "moto": peers.Moto}[args.target]
    kw = {}
    if issubclass(cls, peers.Airlock):
        kw = {"workers": args.workers, "link_delay_ms": args.link_delay_ms}
    elif cls is peers.AirlockLocalOnly:
        if args.link_delay_ms:
            raise SystemExit("--link-delay-ms: a local-only gateway has no link")
        kw = {"workers": args.workers}
    elif args.workers is not None or args.link_delay_ms:
        raise SystemExit(f"--workers and --link-delay-ms are for airlock targets, not {args.target}")
    work = peers.make_workdir()
    t = cls(work / args.target, **kw).start()
    try:
        c = t.client()
        c.create_bucket(Bucket="bench")
        pids = {"server": t.pid}
        if isinstance(t, peers.AirlockGateway):
            pids = {"gateway": t.pid}
            if isinstance(t, peers.Airlock):
                pids["vault"] = t.vault_pid
            for p in t.gateway_processes():
                if p["role"] == "worker":
                    pids[f"worker {p['pid']}"] = p["pid"]
        if args.op == "GET":
            c.put_object(Bucket="bench", Key="g", Body=os.urandom(args.size))
            url = c.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": "g"}, ExpiresIn=3600)
        for _ in range(max(1, args.repeat)):
            measure(args, c, pids, url if args.op == "GET" else None)
    finally:
        t.stop()
        if args.keep_data:
            print(f"data left in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)    # a few cells of large PUTs leave gigabytes
    return 0


if __name__ == "__main__":
    sys.exit(main())
