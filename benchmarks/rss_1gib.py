"""Peak RSS of the gateway while it receives a 1 GiB object.

    python benchmarks/rss_1gib.py [--size-mib 1024] [--mode single|multipart|both]

Writes a 1 GiB file of random bytes to a temp dir, starts a gateway without a
vault (peers.AirlockLocalOnly; rss_5gib.py measures the replicated deployment,
gateway and vault, with a generated body), and uploads
the file with boto3 from disk (the client never holds the body in memory):
`single` is one PutObject streaming the file, `multipart` is upload_fileobj
(8 MiB parts, 10 threads).  A sampler thread reads VmRSS from
/proc/<pid>/status every 50 ms; at the end VmHWM (the kernel's own peak) is
read too.  Each mode gets a fresh gateway process so the peaks are separate.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402

SAMPLE_EVERY_S = 0.05
WRITE_BLOCK = 8 << 20


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0, 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, KeyError):
                return
            time.sleep(SAMPLE_EVERY_S)


def make_file(path: Path, size: int) -> str:
    h = hashlib.md5()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(WRITE_BLOCK, left))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


def measure(mode: str, src: Path, size: int, work: Path) -> dict:
    from boto3.s3.transfer import TransferConfig
    gw = peers.AirlockLocalOnly(work / f"airlock-{mode}").start()
    try:
        s3 = gw.client(read_timeout=600, request_checksum_calculation="when_required")
        s3.create_bucket(Bucket="rss")
        idle = status_kib(gw.pid, "VmRSS")
        sampler = Sampler(gw.pid)
        sampler.start()
        t0 = time.perf_counter()
        with open(src, "rb") as f:
            if mode == "single":
                s3.put_object(Bucket="rss", Key="big", Body=f, ContentLength=size)
            else:
                s3.upload_fileobj(f, "rss", "big", Config=TransferConfig(
                    multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=10))
        elapsed = time.perf_counter() - t0
        sampler.stop_event.set()
        sampler.join()
        hwm = status_kib(gw.pid, "VmHWM")
        head = s3.head_object(Bucket="rss", Key="big")
        assert head["ContentLength"] == size, head
        return {"mode": mode, "idle_rss_mib": idle / 1024, "peak_rss_sampled_mib": sampler.peak / 1024,
                "vmhwm_mib": hwm / 1024, "samples": sampler.samples, "seconds": elapsed,
                "mib_per_s": size / 2**20 / elapsed, "etag": head["ETag"]}
    finally:
        gw.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--mode", choices=["single", "multipart", "both"], default="both")
    args = ap.parse_args(argv)
    size = args.size_mib << 20
    work = peers.make_workdir("airlock-rss-")
    try:
        src = work / "body.bin"
        md5 = make_file(src, size)
        for mode in (["single", "multipart"] if args.mode == "both" else [args.mode]):
            r = measure(mode, src, size, work)
            if mode == "single":
                assert r["etag"].strip('"') == md5, (r["etag"], md5)
            print(f"{mode:9s} {args.size_mib} MiB in {r['seconds']:.1f} s ({r['mib_per_s']:.0f} MiB/s): "
                  f"gateway RSS idle {r['idle_rss_mib']:.0f} MiB, peak sampled every 50 ms "
                  f"{r['peak_rss_sampled_mib']:.0f} MiB ({r['samples']} samples), VmHWM {r['vmhwm_mib']:.0f} MiB",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
