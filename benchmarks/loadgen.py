"""S3 load generator: several worker processes, each with a thread pool.

One boto3 process tops out around 1k requests/s (the GIL, signing, parsing),
so a cell of the matrix is spread over up to MAX_PROCS processes with
`concurrency / procs` threads each.  Workers are spawned once (`LoadGen`) and
reused for every cell; a cell starts at a common wall-clock instant so process
start-up and client creation are never timed.

PUT bodies are unique per request (a per-thread buffer with a counter stamped
every STAMP_STRIDE bytes), so content-defined dedup cannot make a store look
faster than it is.  GETs read one pre-uploaded object of the cell's size and
discard the body.

If `wrk` is installed, GET cells can instead be driven by wrk against a
presigned URL (`wrk_get`): a C client costs far less CPU than boto3, which
matters on a 2-core machine where client and server share the cores.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import statistics
import struct
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor

MAX_PROCS = 4                   # worker processes per cell (2-core box: more only adds contention)
STAMP_STRIDE = 16 * 1024        # bytes between per-request counter stamps (< smallest CDC chunk)
START_DELAY_S = 0.5             # cell start is scheduled this far in the future

_clients: dict = {}


def _client(endpoint: str, access_key: str, secret_key: str, threads: int):
    import boto3
    from botocore.config import Config
    key = (endpoint, threading.get_ident())
    c = _clients.get(key)
    if c is None:
        c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                         aws_secret_access_key=secret_key, region_name="us-east-1",
                         config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                       max_pool_connections=max(threads, 4),
                                       connect_timeout=10, read_timeout=120,
                                       request_checksum_calculation="when_required",
                                       response_checksum_validation="when_required"))
        _clients[key] = c
    return c


def _worker(spec: dict) -> dict:
    """Run `spec["threads"]` threads from spec["start_at"] until the duration or
    op budget is used up.  Returns counts and per-request latencies."""
    op, size, threads = spec["op"], spec["size"], spec["threads"]
    stop_at = spec["start_at"] + spec["duration"]
    budget = [spec["max_ops"]]
    lock = threading.Lock()
    lat: list[float] = []
    errors: list[str] = []
    done_bytes = [0]

    def take() -> bool:
        with lock:
            if budget[0] <= 0:
                return False
            budget[0] -= 1
            return True

    def run(tid: int) -> None:
        s3 = _client(spec["endpoint"], spec["access_key"], spec["secret_key"], threads)
        buf = bytearray(os.urandom(size)) if op == "PUT" else None
        n = 0
        while time.time() < spec["start_at"]:
            time.sleep(0.001)
        while time.time() < stop_at and take():
            try:
                t0 = time.perf_counter()
                if op == "PUT":
                    stamp = struct.pack("<IIQ", spec["proc"], tid, n)
                    for off in range(0, max(size - len(stamp), 1), STAMP_STRIDE):
                        buf[off:off + len(stamp)] = stamp
                    key = f"{spec['prefix']}/p{spec['proc']}t{tid}/{n % spec['keys_per_thread']}"
                    s3.put_object(Bucket=spec["bucket"], Key=key, Body=bytes(buf))
                    got = size
                else:
                    r = s3.get_object(Bucket=spec["bucket"], Key=spec["get_key"])
                    got = 0
                    for piece in r["Body"].iter_chunks(1 << 20):
                        got += len(piece)
                    if got != size:
                        raise RuntimeError(f"short GET {got} != {size}")
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    done_bytes[0] += got
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
            n += 1

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(spec["duration"] + 180)
    end = min(time.time(), stop_at) if lat else time.time()
    return {"ops": len(lat), "bytes": done_bytes[0], "errors": errors, "lat": lat,
            "elapsed": max(end - spec["start_at"], 1e-9), "end": time.time()}


class LoadGen:
    """A pool of worker processes reused across cells."""

    def __init__(self, max_procs: int = MAX_PROCS):
        import multiprocessing
        self.max_procs = max_procs
        self.pool = ProcessPoolExecutor(max_procs, mp_context=multiprocessing.get_context("spawn"))
        list(self.pool.map(_noop, range(max_procs)))        # spawn and import now

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, *, endpoint: str, access_key: str, secret_key: str, bucket: str, op: str,
            size: int, concurrency: int, duration: float, max_ops: int, prefix: str = "load",
            get_key: str | None = None, keys_per_thread: int = 4) -> dict:
        procs = min(concurrency, self.max_procs)
        per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
        start_at = time.time() + START_DELAY_S + (2.0 if size >= 32 << 20 else 0.0)
        specs = [dict(endpoint=endpoint, access_key=access_key, secret_key=secret_key, bucket=bucket,
                      op=op, size=size, threads=per[i], duration=duration,
                      max_ops=max(1, max_ops * per[i] // concurrency), start_at=start_at,
                      proc=i, prefix=prefix, get_key=get_key, keys_per_thread=keys_per_thread)
                 for i in range(procs)]
        results = list(self.pool.map(_worker, specs))
        lat = sorted(x for r in results for x in r["lat"])
        ops = sum(r["ops"] for r in results)
        elapsed = max(r["elapsed"] for r in results)
        nbytes = sum(r["bytes"] for r in results)
        errors = [e for r in results for e in r["errors"]]
        return {
            "op": op, "size": size, "concurrency": concurrency, "client": "boto3",
            "ops": ops, "errors": len(errors), "error_samples": errors[:3],
            "elapsed_s": elapsed, "ops_per_s": ops / elapsed, "mib_per_s": nbytes / elapsed / 2**20,
            "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        }


def _noop(_):
    import boto3  # noqa: F401 - warm the import in every worker
    return os.getpid()


# ---------------------------------------------------------------------------- wrk
def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_get(url: str, size: int, concurrency: int, duration: float) -> dict:
    """GET one presigned URL with wrk; bounded by `duration` seconds."""
    threads = max(1, min(concurrency, os.cpu_count() or 1))
    r = _run_wrk(["-t", str(threads), "-c", str(concurrency), url], duration)
    r.update(op="GET", size=size, concurrency=concurrency, mib_per_s=r["ops_per_s"] * size / 2**20)
    return r


# A wrk script for PUTs: each wrk thread cycles through its own list of
# presigned PUT paths (distinct keys, so no two requests in flight write the
# same key) and sends a body that is unique per request: the base body with
# (thread, counter) stamped every STAMP_STRIDE bytes, so CDC dedup never helps.
#
# The body is built once per thread in a LuaJIT FFI buffer and only its
# stamps are rewritten per request; the request is one copy out of that
# buffer.  The first version built every body from Lua strings (a 16 KiB
# string per stamp, a concat, and wrk.format's second concat): ~2.3 ms of
# wrk CPU per 1 MiB PUT and ~150 ms per 64 MiB PUT, spent between two
# requests of one connection, so at c=1 the client was a third to half of
# every target's cycle.
#
# Every stamp starts with a random per-invocation `run` nonce (which also
# seeds the random tail).  Without it each wrk run re-sent the previous run's
# bodies byte for byte (the counter restarts at 1), so every PUT cell after
# the first on one deployment -- matrix rounds 1 and 2, the --warmup, the
# --repeat cells of cpu_per_op.py -- stored bodies airlock already held: dedup,
# no chunk write, nothing shipped to the vault.  SeaweedFS and moto do not
# dedup, so the ratios flattered airlock (docs/performance.md, 2026-11-26).
_WRK_PUT_LUA = r"""
local ffi = require("ffi")
local paths_file, size, stride, run = "%(paths)s", %(size)d, %(stride)d, %(run)d
local counter = 0
local nthreads = 0
local tid = 0
local paths = {}
local STAMP = 30               -- bytes: run (8 hex), thread (4), request (12), piece (6)
local HEAD_ROOM = 8192          -- bytes before the body for the request line and headers
local buf = nil                 -- HEAD_ROOM + size bytes: the body is built here once, then stamped in place

function setup(thread)
  thread:set("tid", nthreads)
  nthreads = nthreads + 1
end

function init(args)
  tid = tonumber(wrk.thread:get("tid")) or 0
  local i = 0
  for line in io.lines(paths_file) do
    if i %% %(threads)d == tid then paths[#paths + 1] = line end
    i = i + 1
  end
  math.randomseed(run + tid * 7919 + 17)
  local t = {}
  for j = 1, stride do t[j] = string.char(math.random(0, 255)) end
  local tail = string.sub(table.concat(t), STAMP + 1)    -- stamp + random tail = one stride
  buf = ffi.new("uint8_t[?]", HEAD_ROOM + size)
  local off = STAMP
  while off < size do
    ffi.copy(buf + HEAD_ROOM + off, tail, math.min(#tail, size - off))
    off = off + stride
  end
end

function request()
  counter = counter + 1
  local i, off = 0, 0
  while off < size do
    i = i + 1
    local stamp = string.format("%%08x%%04d%%012d%%06d", run, tid, counter, i)
    ffi.copy(buf + HEAD_ROOM + off, stamp, math.min(STAMP, size - off))
    off = off + stride
  end
  local path = paths[(counter %% #paths) + 1]
  local head = string.format("PUT %%s HTTP/1.1\r\nHost: %%s\r\nContent-Length: %%d\r\n\r\n",
                             path, wrk.headers["Host"], size)
  local at = HEAD_ROOM - #head
  ffi.copy(buf + at, head, #head)
  return ffi.string(buf + at, #head + size)
end
"""


def put_presigner(client, bucket: str, prefix: str = "", expires: int = 3600):
    """`presign(key) -> url` of a PutObject into bucket/prefix+key, for wrk_put."""
    def presign(key: str) -> str:
        return client.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": prefix + key},
                                             ExpiresIn=expires)
    return presign


def wrk_put(presign, size: int, concurrency: int, duration: float, keys: int = 1024) -> dict:
    """PUT unique bodies of `size` bytes with wrk to `keys` presigned URLs
    (`presign(key) -> url`); bounded by `duration` seconds."""
    import tempfile
    from urllib.parse import urlsplit
    threads = max(1, min(concurrency, os.cpu_count() or 1))
    urls = [presign(f"wrk/{size}/{i}") for i in range(max(keys, concurrency * 4))]
    base = urlsplit(urls[0])
    with tempfile.TemporaryDirectory(prefix="wrkput-") as d:
        paths = os.path.join(d, "paths.txt")
        with open(paths, "w") as f:
            for u in urls:
                s = urlsplit(u)
                f.write(f"{s.path}?{s.query}\n")
        script = os.path.join(d, "put.lua")
        with open(script, "w") as f:
            f.write(_WRK_PUT_LUA % {"paths": paths, "size": size, "stride": STAMP_STRIDE, "threads": threads,
                                    "run": secrets.randbits(32)})
        r = _run_wrk(["-t", str(threads), "-c", str(concurrency), "-s", script,
                      f"{base.scheme}://{base.netloc}/"], duration)
    r.update(op="PUT", size=size, concurrency=concurrency, mib_per_s=r["ops_per_s"] * size / 2**20)
    return r


# ---------------------------------------------------------------------------- large PUTs
# wrk's Lua `request()` must return each request as a fresh Lua string, and
# wrk then copies it again into its own buffer: for a 64 MiB body that is
# ~70 ms of wrk CPU per request (measured against a socket that discards
# what it reads: 893 MiB/s at c=1, 69 ms of wrk CPU per request), spent
# between two requests of one connection, where the server can only wait.
# At c=1 that was ~60 ms of every target's ~300-460 ms cycle, which pulls
# every large-PUT ratio towards 1.  `raw_put` sends large bodies from one
# buffer per connection, stamped in place per request and handed to the
# kernel without a copy in user space.  Small bodies stay with wrk (C is
# cheaper per request there; its build cost is a few microseconds).
RAW_PUT_MIN_BYTES = 1 << 20
RAW_TIMEOUT_S = 60.0            # a request not answered within this is an error (as wrk --timeout)


def _raw_conn(netloc: str):
    import socket
    host, _, port = netloc.rpartition(":")
    sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=RAW_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Reader:
    """Buffered reads of HTTP/1.x responses from one socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _more(self) -> None:
        got = self.sock.recv(65536)
        if not got:
            raise ConnectionError("connection closed inside a response")
        self.buf += got

    def line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._more()
        out = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return out

    def skip(self, n: int) -> None:
        while len(self.buf) < n:
            self._more()
        del self.buf[:n]

    def response(self) -> tuple[int, bool]:
        """One final response (1xx ones skipped), its body read and dropped;
        (status, keep-alive).  ValueError for anything malformed."""
        while True:
            parts = self.line().split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise ValueError(f"not an HTTP status line: {parts!r}")
            version, status = parts[0], int(parts[1])
            headers = {}
            while line := self.line():
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            if 100 <= status < 200:
                continue
            keep = version == b"HTTP/1.1" and headers.get(b"connection") != b"close"
            if headers.get(b"transfer-encoding", b"").endswith(b"chunked"):
                while (size := int(self.line().split(b";")[0], 16)) > 0:
                    self.skip(size + 2)
                while self.line():          # trailers, up to the empty line
                    pass
            elif b"content-length" in headers:
                self.skip(int(headers[b"content-length"]))
            elif status not in (204, 304):
                raise ValueError("a response body without a length (read to close) is not supported")
            return status, keep


def raw_put(presign, size: int, concurrency: int, duration: float, keys: int = 1024,
            on_cell=None) -> dict:
    """PUT unique bodies of `size` bytes to `keys` presigned URLs over plain
    keep-alive sockets, one thread per connection; bounded by `duration`
    seconds (no request starts after it; those in flight finish and count).

    Each connection builds its body before the cell starts (random, a
    per-invocation nonce) and per request rewrites only the stamps every
    STAMP_STRIDE bytes (nonce, connection, counter, piece: the wrk
    script's layout, with the connection where wrk has its thread), so no
    two requests share a chunk.  Rate: every answered request over the time
    from the start to the last answer.  Any failure of a request (socket,
    malformed response, non-2xx/3xx status) is counted as an error and the
    connection is opened again.  `on_cell("start")` is called as the cell
    starts (after every set-up) and `on_cell("end")` once every connection
    is done, for callers that sample counters over the cell itself."""
    from urllib.parse import urlsplit
    urls = [urlsplit(presign(f"raw/{size}/{i}")) for i in range(max(keys, concurrency * 4))]
    netloc = urls[0].netloc
    run = secrets.randbits(32)
    offsets = range(0, size, STAMP_STRIDE)
    clock: dict = {}

    def set_clock() -> None:        # run once every body is built, before anyone is released
        clock["start"] = time.monotonic() + START_DELAY_S
        clock["deadline"] = clock["start"] + duration
        if on_cell is not None:
            threading.Timer(START_DELAY_S, on_cell, ("start",)).start()

    ready = threading.Barrier(concurrency + 1, action=set_clock, timeout=RAW_TIMEOUT_S)
    results: list[dict] = []
    lock = threading.Lock()

    def connection(cid: int) -> None:
        res = {"ok": 0, "errors": 0, "lat": [], "last": None, "samples": [], "cpu": 0.0}
        sock = reader = None

        def error(what: str) -> None:
            nonlocal sock
            res["errors"] += 1
            if len(res["samples"]) < 3:
                res["samples"].append(what)
            if sock is not None:
                sock.close()
            sock = None

        try:
            rnd = secrets.token_bytes(STAMP_STRIDE)
            body = bytearray(rnd * (size // STAMP_STRIDE + 1))[:size]
            view = memoryview(body)
            mine = urls[cid::concurrency]
            ready.wait()
            cpu0 = time.thread_time()
            start, deadline = clock["start"], clock["deadline"]
            time.sleep(max(0.0, start - time.monotonic()))
            n = 0
            while time.monotonic() < deadline:
                n += 1
                for piece, off in enumerate(offsets):
                    stamp = b"%08x%04d%012d%06d" % (run, cid, n, piece)
                    body[off:off + min(len(stamp), size - off)] = stamp[:size - off]
                u = mine[n % len(mine)]
                head = (f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: {netloc}\r\n"
                        f"Content-Length: {size}\r\n\r\n").encode()
                t0 = time.monotonic()
                try:
                    if sock is None:
                        sock = _raw_conn(netloc)
                        reader = _Reader(sock)
                    sock.sendall(head)
                    sock.sendall(view)
                    status, keep = reader.response()
                except (OSError, ValueError) as e:
                    error(repr(e))
                    continue
                t1 = time.monotonic()
                if 200 <= status < 400:
                    res["ok"] += 1
                    res["lat"].append(t1 - t0)
                    res["last"] = t1
                else:
                    error(f"HTTP {status}")
                    continue
                if not keep:
                    sock.close()
                    sock = None
            res["cpu"] = time.thread_time() - cpu0
        except BaseException as e:               # noqa: B036 -- reported with the cell, never lost
            ready.abort()                        # if it failed before the start: nobody waits for it
            res["errors"] += 1
            res["samples"].append(f"connection {cid} stopped: {e!r}")
        finally:
            if sock is not None:
                sock.close()
            with lock:
                results.append(res)

    threads = [threading.Thread(target=connection, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    try:
        ready.wait()            # every body built: the cell starts now, for every connection
    except threading.BrokenBarrierError:
        for t in threads:
            t.join(RAW_TIMEOUT_S)
        raise RuntimeError(f"raw_put: a connection failed before the start: "
                           f"{[x for r in results for x in r['samples']][:3]}") from None
    start = clock["start"]
    ends = start + duration + RAW_TIMEOUT_S + 30
    for t in threads:
        t.join(max(0.0, ends - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise RuntimeError("raw_put: a connection did not finish")
    if on_cell is not None:
        on_cell("end")
    ops = sum(r["ok"] for r in results)
    last = max((r["last"] for r in results if r["last"] is not None), default=None)
    span = last - start if last is not None else 0.0
    rate = ops / span if span > 0 else 0.0
    lat = sorted(x for r in results for x in r["lat"])
    return {"client": "raw sockets", "op": "PUT", "size": size, "concurrency": concurrency,
            "ops": ops, "errors": sum(r["errors"] for r in results),
            "error_samples": [x for r in results for x in r["samples"]][:3],
            "elapsed_s": span, "ops_per_s": rate, "mib_per_s": rate * size / 2**20,
            "client_cpu_s": sum(r["cpu"] for r in results),   # the connections' threads, set-up left out
            "p50_ms": statistics.median(lat) * 1e3 if lat else None,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else None}


def put_cell(presign, size: int, concurrency: int, duration: float, keys: int = 1024,
             wrk_large: bool = False, on_cell=None) -> dict:
    """The PUT client for one cell: raw_put for bodies of RAW_PUT_MIN_BYTES
    and more, wrk below (`wrk_large`: wrk for every size, the client of the
    figures before 2026-11-26 evening).  `on_cell`: see raw_put (for wrk,
    called around the wrk run)."""
    if size >= RAW_PUT_MIN_BYTES and not wrk_large:
        return raw_put(presign, size, concurrency, duration, keys=keys, on_cell=on_cell)
    if on_cell is not None:
        on_cell("start")
    r = wrk_put(presign, size, concurrency, duration, keys=keys)
    if on_cell is not None:
        on_cell("end")
    return r


def put_client_name(wrk_large: bool = False) -> str:
    """How put_cell drives PUTs, for reports."""
    if wrk_large:
        return "wrk (presigned URLs) for every PUT"
    return (f"wrk (presigned URLs) for PUTs under {RAW_PUT_MIN_BYTES >> 20} MiB, "
            "raw sockets (loadgen.raw_put, presigned URLs) from there")


def _run_wrk(args: list[str], duration: float) -> dict:
    dur = max(1, round(duration))
    r = subprocess.run(["wrk", *args[:-1], f"-d{dur}s", "--timeout", "60s", args[-1]],
                       capture_output=True, text=True, timeout=dur + 90)
    out = r.stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed: {r.stdout}\n{r.stderr}")
    n = int(m.group(1))
    t = float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = int(bad.group(1)) if bad else 0
    sock = re.search(r"Socket errors: (.*)", out)
    lat = re.search(r"Latency\s+([\d.]+)(us|ms|s)", out)
    avg_ms = float(lat.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[lat.group(2)] if lat else None
    ok = n - errs
    return {"client": "wrk", "ops": ok, "errors": errs + (1 if sock else 0),
            "error_samples": [sock.group(1)] if sock else [],
            "elapsed_s": t, "ops_per_s": ok / t,
            "p50_ms": avg_ms, "p99_ms": None}
