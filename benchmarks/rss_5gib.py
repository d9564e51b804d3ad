"""Peak RSS of the gateway AND the vault while a replicated airlock receives a
large object (default 5 GiB); with several gateway processes, of each one.

    python benchmarks/rss_5gib.py                         # 5 GiB, single PutObject then multipart
    python benchmarks/rss_5gib.py --size-mib 1024 --mode multipart

Starts airlock as deployed (peers.Airlock: `airlock vault` + `airlock gateway
--vault`, synchronous replication, fsync on both sides), fresh for each mode,
and uploads one object with boto3:

  single     one PutObject of the whole body (ContentLength set; botocore reads
             the body once to sign it, seeks back, then streams it);
  multipart  `upload_fileobj`, 8 MiB parts, 10 client threads.

The body is generated, never held in memory and never written to disk: a
seekable file object (GeneratedBody) whose bytes at any offset are a fixed
8 MiB random block with the block number stamped every STAMP_STRIDE bytes, so
no two CDC chunks are alike and dedup cannot shrink the work.  A sampler thread
reads VmRSS of both processes from /proc every 50 ms; VmHWM (the kernel's own
peak) is read at the end.  The issue's target: both peaks < 256 MiB.
Writes benchmarks/results/rss-<size>-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from rss_1gib import Sampler, status_kib  # noqa: E402

BLOCK = 8 << 20                 # bytes of random data repeated, with a stamp per stride
STAMP_STRIDE = 16 * 1024        # below the chunker's minimum chunk size: every chunk is unique
TARGET_MIB = 256                # issue target for each process
RESULTS = Path(__file__).resolve().parent / "results"


class GeneratedBody(io.RawIOBase):
    """`size` bytes of unique-per-block pseudo-random content, produced on read."""

    def __init__(self, size: int, seed: int = 1):
        self.size, self.pos = size, 0
        import random
        self._base = random.Random(seed).randbytes(BLOCK)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def _block(self, n: int) -> bytearray:
        b = bytearray(self._base)
        stamp = struct.pack("<Q", n)
        for off in range(0, BLOCK, STAMP_STRIDE):
            b[off:off + 8] = stamp
        return b

    def readinto(self, out) -> int:
        want = min(len(out), self.size - self.pos)
        if want <= 0:
            return 0
        view = memoryview(out)
        done = 0
        while done < want:
            n, off = divmod(self.pos, BLOCK)
            if getattr(self, "_cached", (None,))[0] != n:
                self._cached = (n, self._block(n))
            take = min(want - done, BLOCK - off)
            view[done:done + take] = self._cached[1][off:off + take]
            done += take
            self.pos += take
        return done

    def __len__(self) -> int:
        return self.size


def measure(mode: str, size: int, work: Path) -> dict:
    from boto3.s3.transfer import TransferConfig
    t = peers.Airlock(work / f"airlock-{mode}").start()
    try:
        s3 = t.client(read_timeout=1800, request_checksum_calculation="when_required",
                      response_checksum_validation="when_required")
        s3.create_bucket(Bucket="rss")
        pids = {"gateway": t.pid, "vault": t.vault_pid}
        for i, p in enumerate(q for q in t.gateway_processes() if q["role"] == "worker"):
            pids[f"worker{i + 1}"] = p["pid"]
        idle = {k: status_kib(p, "VmRSS") for k, p in pids.items()}
        samplers = {k: Sampler(p) for k, p in pids.items()}
        for s in samplers.values():
            s.start()
        body = io.BufferedReader(GeneratedBody(size), buffer_size=1 << 20)
        t0 = time.perf_counter()
        if mode == "single":
            s3.put_object(Bucket="rss", Key="big", Body=body, ContentLength=size)
        else:
            s3.upload_fileobj(body, "rss", "big", Config=TransferConfig(
                multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=10))
        elapsed = time.perf_counter() - t0
        for s in samplers.values():
            s.stop_event.set()
            s.join()
        hwm = {k: status_kib(p, "VmHWM") for k, p in pids.items()}
        head = s3.head_object(Bucket="rss", Key="big")
        assert head["ContentLength"] == size, head
        health = t.health()
        return {"mode": mode, "size": size, "seconds": elapsed, "mib_per_s": size / 2**20 / elapsed,
                "replication_stats": health.get("replication_stats"),
                **{f"{k}_idle_rss_mib": idle[k] / 1024 for k in pids},
                **{f"{k}_peak_rss_sampled_mib": samplers[k].peak / 1024 for k in pids},
                **{f"{k}_vmhwm_mib": hwm[k] / 1024 for k in pids},
                "samples": {k: s.samples for k, s in samplers.items()}}
    finally:
        t.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=5120)
    ap.add_argument("--mode", choices=["single", "multipart", "both"], default="both")
    args = ap.parse_args(argv)
    size = args.size_mib << 20
    work = peers.make_workdir("airlock-rss-")
    results = []
    try:
        for mode in (["single", "multipart"] if args.mode == "both" else [args.mode]):
            r = measure(mode, size, work)
            results.append(r)
            print(f"{mode:9s} {args.size_mib} MiB in {r['seconds']:.1f} s ({r['mib_per_s']:.0f} MiB/s)", flush=True)
            for k in [k for k in r["samples"]]:
                peak = max(r[f"{k}_peak_rss_sampled_mib"], r[f"{k}_vmhwm_mib"])
                print(f"  {k:7s} RSS idle {r[f'{k}_idle_rss_mib']:.0f} MiB, peak sampled every 50 ms "
                      f"{r[f'{k}_peak_rss_sampled_mib']:.0f} MiB ({r['samples'][k]} samples), "
                      f"VmHWM {r[f'{k}_vmhwm_mib']:.0f} MiB -> target < {TARGET_MIB} MiB "
                      f"{'met' if peak < TARGET_MIB else 'NOT met'}", flush=True)
            shutil.rmtree(work / f"airlock-{mode}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"rss-{args.size_mib}mib-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
