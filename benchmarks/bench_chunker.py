"""Chunker throughput: compiled vs pure-Python twin vs raw BLAKE3 vs pyfastcdc.

    PYTHONPATH=src python benchmarks/bench_chunker.py [--mib 256] [--runs 5]

Reports the median of `runs` runs in MiB/s over one reused random buffer.  The
pure-Python twin runs on an 8 MiB slice (it is ~100x slower).  pyfastcdc is
measured if importable, with the same min/avg/max and normalisation level 2
(its boundaries differ: different gear table and cut rule).
"""
from __future__ import annotations

import argparse
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


def median_rate(fn, nbytes: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / MIB / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    data = os.urandom(args.mib * MIB)
    n = len(data)
    mn, avg, mx = _chunker_py.MIN_SIZE, _chunker_py.AVG_SIZE, _chunker_py.MAX_SIZE
    results: dict[str, float] = {}

    results["blake3 (whole buffer, 1 thread)"] = median_rate(
        lambda: blake3.blake3(data, max_threads=1).digest(), n, args.runs)
    if _chunker is not None:
        results["cython chunk_boundaries (scan only)"] = median_rate(
            lambda: _chunker.chunk_boundaries(data), n, args.runs)
        results["cython chunk_and_digest"] = median_rate(lambda: _chunker.chunk_and_digest(data), n, args.runs)

        def stream():
            sc = _chunker.StreamChunker()
            mv = memoryview(data)
            for i in range(0, n, MIB):
                sc.update(mv[i:i + MIB])
            sc.finish()
        results["cython StreamChunker (1 MiB feeds)"] = median_rate(stream, n, args.runs)

        def two_threads():
            half = memoryview(data)[: n // 2], memoryview(data)[n // 2:]
            ts = [threading.Thread(target=_chunker.chunk_and_digest, args=(h,)) for h in half]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        results["cython chunk_and_digest, 2 threads"] = median_rate(two_threads, n, args.runs)
    twin = memoryview(data)[: TWIN_SLICE_MIB * MIB]
    results[f"python twin chunk_and_digest ({TWIN_SLICE_MIB} MiB slice)"] = median_rate(
        lambda: _chunker_py.chunk_and_digest(twin), len(twin), max(1, min(args.runs, 3)))
    if pyfastcdc is not None:
        cdc = pyfastcdc.FastCDC(avg, min_size=mn, max_size=mx, normalized_chunking=2)
        results["pyfastcdc cut_buf (scan only)"] = median_rate(lambda: list(cdc.cut_buf(data)), n, args.runs)
        results["pyfastcdc cut_buf + blake3"] = median_rate(
            lambda: [blake3.blake3(c.data, max_threads=1).digest() for c in cdc.cut_buf(data)], n, args.runs)

    base = results.get("cython chunk_and_digest")
    print(f"buffer {args.mib} MiB, min/avg/max = {mn}/{avg}/{mx}, median of {args.runs} runs")
    for name, rate in results.items():
        ratio = f"{rate / base:6.2f}x" if base else ""
        print(f"  {name:48s} {rate:9.1f} MiB/s  {ratio}")
    if base:
        print("  (ratios relative to cython chunk_and_digest)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
