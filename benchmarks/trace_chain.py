"""Where one PUT's latency goes, stage by stage, in the gateway and the vault.

    python benchmarks/trace_chain.py                      # 4 KiB PUTs, c=1, one gateway process
    python benchmarks/trace_chain.py --size 1048576 --conc 4 --workers 2

A sampling profiler (profile_gateway.py) shows where CPU goes; it cannot
show a serial chain of waits -- an fdatasync behind a thread hop, a round
trip to the vault -- which is what bounds a PUT at low concurrency.  This
wraps the stages of the write path in the server processes themselves
with perf_counter timers (a `sitecustomize` put on their PYTHONPATH, active
only with AIRLOCK_TRACE_DIR set; nothing in the package changes), drives
one wrk cell (presigned PUTs, unique bodies), and prints per process the
median and mean wall time of each stage.  Stages nest: `s3.handle`
contains `put_object`, which contains `ingest_body` and `commit_object`,
and so on; `link.append` (the primary's APPEND round trip) contains the
vault's `vault.append`.

The timers cost time themselves (a few us per stage, and the cell runs
some 10-30% slower than untraced), so compare stages with each other and
with the same trace of other code, not with untraced throughput.  The
first fifth of every stage's samples (warm-up) is dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import peers  # noqa: E402

# (module, class or None, function, "a"sync / "s"ync, label)
STAGES = [
    ("airlock.s3.app", "S3App", "handle", "a", "s3.handle"),
    ("airlock.primary.engine", "Engine", "put_object", "a", "put_object"),
    ("airlock.primary.engine", "Engine", "commit_object", "a", "commit_object"),
    ("airlock.primary.ingest", None, "ingest_body", "a", "ingest_body"),
    ("airlock.chunk.small", "SmallChunks", "put", "s", "small_chunk.put"),
    ("airlock.primary.replication", "ReplicatedCommitPoint", "commit", "a", "commit_point.commit"),
    ("airlock.primary.replication", "ReplicatedCommitPoint", "ship_chunks", "a", "commit_point.ship_chunks"),
    ("airlock.link.client", "LinkClient", "append", "a", "link.append"),
    ("airlock.log.writer", "LogWriter", "append", "a", "log.append"),
    ("airlock.log.writer", "LogWriter", "_write_and_sync", "s", "log.write_and_sync"),
    ("airlock.primary.index", "Index", "apply", "s", "index.apply"),
    ("airlock.vault.store", "VaultStore", "_append_serialized", "a", "vault.append"),
    ("airlock.vault.store", "VaultStore", "_sync_newest", "s", "vault.sync_overlay"),
    ("airlock.vault.store", "VaultStore", "put_chunk", "s", "vault.put_chunk"),
    ("airlock.link.server", None, "_verify_and_put", "s", "vault.verify_and_put"),
    # inside ingest_body: the hashing jobs (per buffer) and the large chunk files' writes
    ("airlock.primary.ingest", "Ingest", "feed_md5", "s", "ingest.md5"),
    ("airlock.primary.ingest", "Ingest", "feed_rest", "s", "ingest.feed_rest"),
    ("airlock.primary.ingest", "Ingest", "finish_rest", "s", "ingest.finish_rest"),
    ("airlock.primary.ingest", "Ingest", "wait_durable", "s", "ingest.wait_durable"),
    ("airlock.chunk.store", "ChunkStore", "_write_file", "s", "store.write_file"),
]

SITECUSTOMIZE = r'''
import functools, importlib.abc, importlib.util, json, os, sys, threading, time
_DIR = os.environ.get("AIRLOCK_TRACE_DIR")
if _DIR:
    _STAGES = %(stages)r
    _D = {}

    def _dump_when_asked():
        while True:
            time.sleep(0.5)
            if os.path.exists(os.path.join(_DIR, "dump")):
                with open(os.path.join(_DIR, "out-%%d.json" %% os.getpid()), "w") as f:
                    json.dump({"argv": sys.argv, "stages": _D}, f)
                return

    threading.Thread(target=_dump_when_asked, daemon=True).start()

    def _timed(f, kind, label):
        acc = _D.setdefault(label, [])
        if kind == "a":
            @functools.wraps(f)
            async def w(*a, **k):
                t = time.perf_counter_ns()
                try:
                    return await f(*a, **k)
                finally:
                    acc.append((time.perf_counter_ns() - t) / 1e6)
        else:
            @functools.wraps(f)
            def w(*a, **k):
                t = time.perf_counter_ns()
                try:
                    return f(*a, **k)
                finally:
                    acc.append((time.perf_counter_ns() - t) / 1e6)
        return w

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            todo = [s for s in _STAGES if s[0] == name]
            if not todo:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(mod):
                run(mod)          # patched before anyone imports names from it
                for _m, cls, fn, kind, label in todo:
                    owner = getattr(mod, cls) if cls else mod
                    setattr(owner, fn, _timed(getattr(owner, fn), kind, label))
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="PUT body bytes")
    ap.add_argument("--conc", type=int, default=1, help="connections")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=1, help="gateway processes (1: every request on the leader)")
    args = ap.parse_args(argv)
    if not loadgen.wrk_available():
        raise SystemExit("wrk is needed (Debian package wrk)")
    with tempfile.TemporaryDirectory(prefix="airlock-trace-") as tdir:
        Path(tdir, "sitecustomize.py").write_text(SITECUSTOMIZE % {"stages": STAGES})
        os.environ["AIRLOCK_TRACE_DIR"] = tdir
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tdir, os.environ.get("PYTHONPATH")]))
        work = peers.make_workdir("airlock-trace-")
        t = peers.Airlock(work / "airlock", workers=args.workers).start()
        try:
            s3 = t.client()
            s3.create_bucket(Bucket="bench")
            time.sleep(1.0)
            r = loadgen.put_cell(loadgen.put_presigner(s3, "bench"), args.size, args.conc, args.seconds)
            Path(tdir, "dump").touch()
            deadline = time.monotonic() + 10
            while len(list(Path(tdir).glob("out-*.json"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)       # workers, if any, dump too
        finally:
            t.stop()
            shutil.rmtree(work, ignore_errors=True)
        print(f"PUT {args.size} B c={args.conc}, {args.workers} gateway process(es), traced: "
              f"{r['ops_per_s']:.0f} ops/s, wrk p50 {r['p50_ms']:.2f} ms")
        for f in sorted(Path(tdir).glob("out-*.json")):
            doc = json.loads(f.read_text())
            argv = doc["argv"]
            role = (argv[1] if len(argv) > 1 and argv[1] in ("vault", "gateway")
                    else "gateway worker" if argv[0].endswith("worker.py") else " ".join(argv[:2]))
            print(f"\n{role} (pid {f.stem[4:]}): stage, calls, p50 ms, mean ms")
            for label in [s[4] for s in STAGES]:
                v = doc["stages"].get(label) or []
                v = v[len(v) // 5:]
                if v:
                    print(f"  {label:26s} {len(v):7d} {statistics.median(v):8.3f} {statistics.mean(v):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
