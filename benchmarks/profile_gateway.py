"""Sampling profiles of the replicated gateway (and its vault) on three hot paths.

    python benchmarks/profile_gateway.py                  # every path below
    python benchmarks/profile_gateway.py --paths put4k_c16 --rate 200

Starts airlock as deployed (peers.Airlock: vault + gateway --vault,
synchronous replication, fsync on both sides) and, for each path, drives one
bounded load cell while `py-spy record` samples the gateway (and, for PUT
paths, the vault) for the length of the cell:

  put64m_c1   PUT 64 MiB, concurrency 1   (wrk on presigned URLs, unique bodies; boto3 without wrk)
  put4k_c16   PUT 4 KiB, concurrency 16   (wrk on presigned URLs, unique bodies; boto3 without wrk)
  put1m_c16   PUT 1 MiB, concurrency 16   (loadgen.raw_put on presigned URLs, unique bodies)
  put4k_c1    PUT 4 KiB, concurrency 1    (the latency chain of one small PUT; best with --workers 1)
  get4k_c16   GET 4 KiB, concurrency 16   (wrk on a presigned URL; boto3 if wrk is missing)

py-spy runs with its defaults (blocking, idle threads not sampled): a sample
is a thread that was on CPU or runnable, so the shares below are shares of
CPU-active samples, not of wall time; time a thread spends blocked in fsync
or epoll is not counted.  Output per path in benchmarks/results/profile-<ts>/:
<path>-<process>.speedscope.json (open in https://www.speedscope.app) and
<path>-<process>.txt, a summary: busy share per thread, top functions by self
share and by inclusive share, after dropping idle waits that py-spy counts as
active (a pool worker in queue.get, the loop in epoll).  Blocking syscalls
(fdatasync, fsync) are kept: they are on the request's path.  The summaries
are also printed; `--summarize DIR` redoes them from saved speedscope files.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import peers  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
# name -> (op, size, concurrency, seconds, max ops)
PATHS = {
    "put64m_c1": ("PUT", 64 * MiB, 1, 20.0, 40),
    "put4k_c16": ("PUT", 4 * KiB, 16, 10.0, 40000),
    "put1m_c16": ("PUT", 1 * MiB, 16, 10.0, 4000),
    "put4k_c1": ("PUT", 4 * KiB, 1, 10.0, 40000),
    "get4k_c16": ("GET", 4 * KiB, 16, 10.0, 10 ** 6),
}
TOP = 15
RESULTS = Path(__file__).resolve().parent / "results"


def py_spy() -> str:
    cand = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(cand, os.X_OK):
        raise SystemExit(f"py-spy not found; install with: {sys.executable} -m pip install py-spy")
    return cand


def frame_label(f: dict) -> str:
    path = f.get("file") or "?"
    for marker in ("/src/", "/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{f['name']} ({path}:{f.get('line', '?')})"


def is_idle_wait(f: dict) -> bool:
    """Leaf frames that are a thread waiting for work, which py-spy's idle
    detection does not always drop: a pool worker blocked in work_queue.get(),
    the event loop blocked in epoll, and asyncio's child watcher blocked in
    waitpid() for a gateway worker process (the leader's; ~20% of its
    "active" samples at 1 MiB c=16, none of it CPU)."""
    path = f.get("file") or ""
    return ((f["name"] == "_worker" and path.endswith("concurrent/futures/thread.py"))
            or (f["name"] == "EpollSelector.select" and path.endswith("selectors.py"))
            or (f["name"] == "ThreadedChildWatcher._do_waitpid" and path.endswith("unix_events.py")))


def summarize(speedscope: Path, top: int = TOP) -> str:
    """Shares of *busy* samples: py-spy's active samples minus idle waits
    (is_idle_wait).  Blocking syscalls such as fdatasync stay in: they are on
    the request's path.  Weights are seconds of samples."""
    doc = json.loads(speedscope.read_text())
    frames = doc["shared"]["frames"]
    self_c: collections.Counter = collections.Counter()
    incl_c: collections.Counter = collections.Counter()
    per_thread = collections.Counter()
    total = idle = 0.0
    for prof in doc["profiles"]:
        for stack, w in zip(prof["samples"], prof["weights"]):
            total += w
            if stack and is_idle_wait(frames[stack[-1]]):
                idle += w
                continue
            per_thread[prof["name"]] += w
            if stack:
                self_c[frame_label(frames[stack[-1]])] += w
            for label in {frame_label(frames[i]) for i in stack}:
                incl_c[label] += w
    busy = max(total - idle, 1e-9)
    out = [f"{speedscope.name}: {total:.2f} s of active samples, {idle:.2f} s of them idle waits "
           f"(pool queue.get, epoll, waitpid) dropped, {busy:.2f} s busy = 100% below", "", "busy share per thread:"]
    for name, n in per_thread.most_common(8):
        out.append(f"  {100 * n / busy:5.1f}%  {name}")
    out += ["", f"top {top} by self share:"]
    for label, n in self_c.most_common(top):
        out.append(f"  {100 * n / busy:5.1f}%  {label}")
    out += ["", f"top {top + 10} by inclusive share:"]
    for label, n in incl_c.most_common(top + 10):
        out.append(f"  {100 * n / busy:5.1f}%  {label}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--boto3-puts", action="store_true", help="drive PUT paths with the boto3 loadgen even if wrk exists")
    ap.add_argument("--workers", type=int, default=None,
                    help="gateway processes (default: airlock's); only the leader is sampled, so "
                         "--workers 1 puts every request in the profile")
    ap.add_argument("--summarize", type=Path, metavar="DIR",
                    help="only (re)write the .txt summaries of the speedscope files in DIR")
    args = ap.parse_args(argv)
    if args.summarize:
        for f in sorted(args.summarize.glob("*.speedscope.json")):
            text = summarize(f)
            f.with_suffix("").with_suffix(".txt").write_text(text)
            print(text)
        return 0
    spy = py_spy()
    out = RESULTS / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    work = peers.make_workdir("airlock-profile-")
    t = peers.Airlock(work / "airlock", workers=args.workers).start()
    gen = loadgen.LoadGen()
    try:
        s3 = t.client()
        s3.create_bucket(Bucket="bench")
        s3.put_object(Bucket="bench", Key="get/4096", Body=os.urandom(4096))
        print(f"gateway pid {t.pid}, vault pid {t.vault_pid}; results in {out}", flush=True)
        for name in filter(None, args.paths.split(",")):
            op, size, conc, duration, max_ops = PATHS[name]
            procs = {"gateway": t.pid} if op == "GET" else {"gateway": t.pid, "vault": t.vault_pid}
            lead = loadgen.START_DELAY_S + (2.0 if size >= 32 << 20 else 0.0)
            spies = {}
            for pname, pid in procs.items():
                dest = out / f"{name}-{pname}.speedscope.json"
                spies[pname] = (dest, subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "speedscope",
                     "--duration", str(int(duration + lead + 1)), "--output", str(dest)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            time.sleep(0.5)                 # let py-spy attach before the cell starts
            if op == "GET" and loadgen.wrk_available():
                url = s3.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": "get/4096"},
                                                ExpiresIn=3600)
                r = loadgen.wrk_get(url, size, conc, duration)
            elif op == "PUT" and loadgen.wrk_available() and not args.boto3_puts:
                time.sleep(lead)
                r = loadgen.put_cell(loadgen.put_presigner(s3, "bench", f"{name}/"), size, conc, duration,
                                     keys=64 if size >= 64 * MiB else 1024)
            else:
                r = gen.run(endpoint=t.endpoint, access_key=peers.ACCESS_KEY, secret_key=peers.SECRET_KEY,
                            bucket="bench", op=op, size=size, concurrency=conc, duration=duration,
                            max_ops=max_ops, prefix=name, get_key="get/4096",
                            keys_per_thread=2 if size >= 64 * MiB else 8)
            print(f"{name}: {r['ops']} ops, {r['ops_per_s']:.1f} ops/s, {r['mib_per_s']:.1f} MiB/s, "
                  f"errors {r['errors']} (client {r['client']})", flush=True)
            (out / f"{name}-load.json").write_text(json.dumps(r, indent=1))
            for pname, (dest, proc) in spies.items():
                _, err = proc.communicate(timeout=duration + 120)
                if proc.returncode != 0 or not dest.exists():
                    print(f"py-spy on {pname} failed: {err.decode(errors='replace')[-500:]}", flush=True)
                    continue
                text = summarize(dest)
                dest.with_suffix("").with_suffix(".txt").write_text(text)
                print(f"--- {name} {pname}\n{text}", flush=True)
    finally:
        gen.close()
        t.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
