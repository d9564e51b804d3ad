"""Chunker throughput: compiled vs pure-Python twin vs raw BLAKE3 vs pyfastcdc.

    PYTHONPATH=src python benchmarks/bench_chunker.py [--mib 256] [--runs 5] [--baseline SO]

Reports the median (and the best) of `runs` runs in MiB/s over one random
buffer shared by every contender.  Runs are interleaved (run 1 of every contender, then run 2,
...) so that load from other processes hits all contenders alike.  The
pure-Python twin runs on an 8 MiB slice (it is ~100x+ slower).  pyfastcdc is
measured if importable, with the same min/avg/max and normalisation level 2
(its boundaries differ: different gear table and cut rule), followed by BLAKE3
of each chunk, single-threaded and with `max_threads=AUTO`.

`--baseline SO` also measures another build of the compiled chunker (e.g. the
previous commit's `_chunker*.so`) in the same run, for before/after figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import blake3  # noqa: E402

from airlock.chunk import _chunker_py  # noqa: E402

try:
    from airlock.chunk import _chunker  # noqa: E402
except ImportError:
    _chunker = None

try:
    import pyfastcdc  # noqa: E402
except ImportError:
    pyfastcdc = None

MIB = 1024 * 1024
TWIN_SLICE_MIB = 8        # the twin is slow; its figure is scaled from this slice
AUTO = blake3.blake3.AUTO


def load_baseline(path: str):
    """Import another build of the compiled chunker from a .so file (module name `_chunker`)."""
    spec = importlib.util.spec_from_file_location("_chunker", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compiled_contenders(label: str, mod, data: bytes) -> dict:
    n = len(data)

    def stream():
        sc = mod.StreamChunker()
        mv = memoryview(data)
        for i in range(0, n, MIB):
            sc.update(mv[i:i + MIB])
        sc.finish()

    def two_threads():
        half = memoryview(data)[: n // 2], memoryview(data)[n // 2:]
        ts = [threading.Thread(target=mod.chunk_and_digest, args=(h,)) for h in half]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def digest_auto():
        # Same boundaries and digests; BLAKE3 of each chunk may use several threads.
        saved = mod.BLAKE3_THREADS
        mod.BLAKE3_THREADS = AUTO
        try:
            mod.chunk_and_digest(data)
        finally:
            mod.BLAKE3_THREADS = saved

    return {
        f"{label} chunk_boundaries (scan only)": (lambda: mod.chunk_boundaries(data), n),
        f"{label} chunk_and_digest": (lambda: mod.chunk_and_digest(data), n),
        f"{label} chunk_and_digest, blake3 AUTO threads": (digest_auto, n),
        f"{label} StreamChunker (1 MiB feeds)": (stream, n),
        f"{label} chunk_and_digest, 2 threads": (two_threads, n),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", help="path of another _chunker*.so to measure in the same run")
    args = ap.parse_args()

    data = os.urandom(args.mib * MIB)
    n = len(data)
    mn, avg, mx = _chunker_py.MIN_SIZE, _chunker_py.AVG_SIZE, _chunker_py.MAX_SIZE

    # name -> (callable, bytes processed per call)
    contenders: dict = {
        "blake3 (whole buffer, 1 thread)": (lambda: blake3.blake3(data, max_threads=1).digest(), n),
        "blake3 (whole buffer, AUTO threads)": (lambda: blake3.blake3(data, max_threads=AUTO).digest(), n),
    }
    if _chunker is not None:
        contenders.update(compiled_contenders("cython", _chunker, data))
    if args.baseline:
        contenders.update(compiled_contenders("baseline", load_baseline(args.baseline), data))
    twin = memoryview(data)[: TWIN_SLICE_MIB * MIB]
    contenders[f"python twin chunk_and_digest ({TWIN_SLICE_MIB} MiB slice)"] = (
        lambda: _chunker_py.chunk_and_digest(twin), len(twin))
    if pyfastcdc is not None:
        cdc = pyfastcdc.FastCDC(avg, min_size=mn, max_size=mx, normalized_chunking=2)
        contenders["pyfastcdc cut_buf (scan only)"] = (lambda: list(cdc.cut_buf(data)), n)
        contenders["pyfastcdc cut_buf + blake3 (1 thread)"] = (
            lambda: [blake3.blake3(c.data, max_threads=1).digest() for c in cdc.cut_buf(data)], n)
        contenders["pyfastcdc cut_buf + blake3 (AUTO threads)"] = (
            lambda: [blake3.blake3(c.data, max_threads=AUTO).digest() for c in cdc.cut_buf(data)], n)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.runs):
        for name, (fn, _nbytes) in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    results = {name: contenders[name][1] / MIB / statistics.median(ts) for name, ts in times.items()}
    best = {name: contenders[name][1] / MIB / min(ts) for name, ts in times.items()}

    base = results.get("cython chunk_and_digest")
    print(f"buffer {args.mib} MiB, min/avg/max = {mn}/{avg}/{mx}, {args.runs} interleaved runs, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"  {'contender':52s} {'median':>9s} MiB/s  {'ratio':>7s}  {'best run':>9s}")
    for name, rate in results.items():
        ratio = f"{rate / base:6.2f}x" if base else ""
        print(f"  {name:52s} {rate:9.1f} MiB/s  {ratio:>7s}  {best[name]:9.1f}")
    if base:
        print("  (ratios: median relative to the median of cython chunk_and_digest; 'best run' is the")
        print("   fastest run, a better estimate of the code's speed when other processes load the CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
