"""A gateway of several processes (leader + workers, `--workers N`) behaves as
one: every write goes through the leader's commit point, a write acknowledged
by one process is read by any other, conditional writes on one key race
correctly across processes, a dead worker is replaced, a dead leader takes its
workers with it, and losing the primary's storage leaves the leader serving
from the vault alone."""
from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing, contextmanager

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import ACCESS_KEY, SECRET_KEY, Deployment, Gateway, wait_until

WORKERS = 3


def fresh_client(gw):
    """A client with its own connection pool: each new connection may land on
    any of the gateway's processes (the leader hands it to the least busy)."""
    return boto3.client("s3", endpoint_url=gw.endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                      max_pool_connections=1))


@contextmanager
def one_connection(gw):
    """A fresh client, closed after the block and given the time for the
    worker that served it to report the close (REPORT_S): until then the
    leader counts the connection as busy."""
    from airlock.primary.dispatch import REPORT_S
    with closing(fresh_client(gw)) as s3:
        yield s3
    time.sleep(3 * REPORT_S)


def health_or_none(gw) -> dict | None:
    """The health document, or None while the answering process is going away."""
    try:
        return gw.health()
    except OSError:
        return None


def serving(gw, n: int) -> bool:
    h = health_or_none(gw)
    return h is not None and len(h.get("processes", [])) == n


def worker_pids(gw) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-f", "airlock.primary.worker"],
                         capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


def _start_with_workers(root) -> Deployment:
    d = Deployment(root)
    d.vault.start()
    d.gateway.extra_args = d._gateway_args() + ["--workers", str(WORKERS)]
    try:
        d.gateway.start()
        wait_until(lambda: len(worker_pids(d.gateway)) == WORKERS - 1, "workers started")
        wait_until(lambda: serving(d.gateway, WORKERS), "workers serving")
    except BaseException:
        d.stop()
        raise
    return d


@pytest.fixture
def dep(tmp_path):
    """A deployment of its own, for a test that kills or restarts a part of it."""
    d = _start_with_workers(tmp_path / "deploy")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def _shared_deployment(tmp_path_factory):
    d = _start_with_workers(tmp_path_factory.mktemp("workers") / "deploy")
    yield d
    d.stop()


@pytest.fixture
def shared(_shared_deployment):
    """One deployment for the tests that neither kill nor restart any of
    its processes (each uses buckets of its own; a deployment per test was
    ~2-7 s of setup each).  Each test starts from a quiet gateway: all
    WORKERS processes serving, and no client connection of an earlier test
    still open (the dispatch tests count connections per process)."""
    d = _shared_deployment
    assert d.gateway.proc.poll() is None, "the shared gateway is gone"
    wait_until(lambda: len(worker_pids(d.gateway)) == WORKERS - 1, "workers running")
    wait_until(lambda: serving(d.gateway, WORKERS), "workers serving")
    _wait_all_closed(d.gateway)
    return d


def test_writes_from_any_process_are_read_by_every_other_and_reach_the_vault(shared):
    dep = shared
    gw = dep.gateway
    h0 = gw.health()                 # the shared gateway's counters before this test
    gets0 = {p["pid"]: p["stats"]["gets"] for p in h0["processes"]}
    fresh_client(gw).create_bucket(Bucket="many")
    fresh_client(gw).put_bucket_versioning(Bucket="many", VersioningConfiguration={"Status": "Enabled"})

    def one(i: int):
        body = os.urandom(500 + 997 * i)
        vid = fresh_client(gw).put_object(Bucket="many", Key=f"k/{i}", Body=body)["VersionId"]
        # read back at once over several new connections (so from other processes)
        for _ in range(4):
            got = fresh_client(gw).get_object(Bucket="many", Key=f"k/{i}")
            assert got["Body"].read() == body and got["VersionId"] == vid
        return vid

    with cf.ThreadPoolExecutor(8) as ex:
        vids = list(ex.map(one, range(48)))
    assert len(set(vids)) == 48
    big = os.urandom(9 << 20)                      # chunks shipped to the vault through the leader
    fresh_client(gw).put_object(Bucket="many", Key="big", Body=big)
    assert fresh_client(gw).get_object(Bucket="many", Key="big")["Body"].read() == big
    keys = [o["Key"] for o in fresh_client(gw).list_objects_v2(Bucket="many")["Contents"]]
    assert len(keys) == 49

    wait_until(lambda: serving(gw, WORKERS), "every process answers the health call")
    h = gw.health()
    assert h["vault_connected"] and len(h["processes"]) == WORKERS
    assert [p["role"] for p in h["processes"]].count("leader") == 1
    assert h["stats"]["puts"] - h0["stats"]["puts"] == 49
    # every process served some of the reads: the port really is shared
    assert all(p["stats"]["gets"] > gets0.get(p["pid"], 0) for p in h["processes"]), h["processes"]
    assert h["stats"]["gets"] == sum(p["stats"]["gets"] for p in h["processes"])
    r = dep.airlock("verify")
    assert "equal" in r.stdout.lower(), r.stdout


def test_bucket_changes_made_through_one_worker_are_seen_at_once_by_another(shared):
    """A worker caches bucket rows until the leader's index generation page
    says a bucket record was applied (docs/format/ipc.md): a change made
    through another process must be seen by the very next request."""
    dep = shared
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="gen")
    with leader_kept_busy(gw) as lead:
        w, x = fresh_client(gw), fresh_client(gw)
        assert "Status" not in w.get_bucket_versioning(Bucket="gen")     # w's worker caches the row
        x.head_bucket(Bucket="gen")
        w.head_bucket(Bucket="gen")
        busy = sorted(p["busy_connections"] for p in lead.health()["processes"] if p["role"] == "worker")
        assert busy == [1, 1], "w and x are not each served by a worker"
        for status in ("Enabled", "Suspended", "Enabled"):
            x.put_bucket_versioning(Bucket="gen", VersioningConfiguration={"Status": status})
            assert w.get_bucket_versioning(Bucket="gen")["Status"] == status
        x.delete_bucket(Bucket="gen")
        with pytest.raises(ClientError) as e:
            w.head_bucket(Bucket="gen")
        assert e.value.response["Error"]["Code"] == "404"
        with pytest.raises(ClientError) as e:
            w.put_object(Bucket="gen", Key="k", Body=b"x")
        assert e.value.response["Error"]["Code"] == "NoSuchBucket"
        x.create_bucket(Bucket="gen")
        w.put_object(Bucket="gen", Key="k", Body=b"x")
        assert x.get_object(Bucket="gen", Key="k")["Body"].read() == b"x"
        w.close()
        x.close()


def direct_chunks(gw) -> int:
    """Chunks the workers have sent to the vault on links of their own."""
    return wait_until(lambda: health_or_none(gw), "health")["stats"].get("chunks_shipped_direct", 0)


def put_until_stored(gw, bucket: str, key: str, body: bytes, tries: int = 40) -> None:
    """PUT over a fresh connection, again while the gateway answers 503 (its
    link to the vault is still coming back)."""
    for _ in range(tries):
        try:
            fresh_client(gw).put_object(Bucket=bucket, Key=key, Body=body)
            return
        except ClientError as e:
            assert e.response["Error"]["Code"] == "ServiceUnavailable", e.response
            time.sleep(0.25)
    raise AssertionError(f"{key} was never stored")


class leader_kept_busy:
    """Keeps one connection in the leader busy (a health call on it every
    0.25 s) while in the block, so that connections opened one at a time,
    each closed before the next (`one_connection`), go to the workers:
    without it each would find the leader idle and stay there
    (primary/dispatch.py).  `health()` asks on that same connection, so
    that asking does not add a request elsewhere."""

    def __init__(self, gw):
        self.gw = gw

    def health(self) -> dict:
        with self.lock:
            return _health_over(self.conn)

    def __enter__(self):
        import http.client
        import threading
        from airlock.primary.dispatch import ACTIVE_S
        time.sleep(ACTIVE_S + 0.1)       # the test's earlier connections idle: the leader takes this one
        self.conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=10)
        self.lock = threading.Lock()
        h = self.health()                # this request is in flight while the document is made
        leader = [p["busy_connections"] for p in h["processes"] if p["role"] == "leader"]
        workers = [p["busy_connections"] for p in h["processes"] if p["role"] == "worker"]
        assert leader == [1] and workers == [0] * (WORKERS - 1), h["processes"]
        self.stop = threading.Event()

        def beat():
            while not self.stop.wait(0.25):
                self.health()
        self.thread = threading.Thread(target=beat, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=15)
        self.conn.close()
        return False


def put_large_until_direct(gw, bucket: str, prefix: str, above: int = 0, limit: int = 40) -> dict:
    """1 MiB uploads over fresh connections, with the leader kept busy so
    that most go to the workers (a client not closed stays busy for a
    second), until a worker has sent chunks on its own link (more than
    `above` in all).  A worker opens that link in the
    background on its first large chunk; until it is up, large chunks go
    through the leader.  Returns what was stored."""
    bodies = {}
    with leader_kept_busy(gw):
        for i in range(limit):
            key, body = f"{prefix}{i}", os.urandom((1 << 20) + 4001 * i)
            put_until_stored(gw, bucket, key, body)
            bodies[key] = body
            if direct_chunks(gw) > above:
                return bodies
    raise AssertionError(f"no worker sent a chunk on its own link in {limit} uploads")


def _health_over(conn) -> dict:
    """The health document, asked over an open keep-alive connection."""
    import json
    conn.request("GET", "/_airlock/health")
    r = conn.getresponse()
    assert r.status == 200
    return json.loads(r.read())


def _open_served(gw, n: int) -> list:
    """n keep-alive connections, each opened and served one request before the next opens."""
    import http.client
    conns = []
    for _ in range(n):
        c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        _health_over(c)
        conns.append(c)
    return conns


def _wait_all_closed(gw) -> None:
    """Until no client connection is open (the clients this test process
    dropped are collected first: a boto3 client's pool closes with it)."""
    import gc
    gc.collect()

    def all_closed():
        h = health_or_none(gw)       # its own connection is the only one open
        return h is not None and sum(p["connections"] for p in h["processes"]) <= 1
    wait_until(all_closed, "the processes report their connections closed")
    time.sleep(0.2)                  # the health call's own connection closes too


def test_each_new_connection_goes_to_the_process_with_the_fewest_busy(shared):
    """The leader hands connections out by busy count (its own counting
    twice), not by the kernel's hash of addresses: six connections opened
    together to three processes are two each; after they close, three new
    ones are one each."""
    dep = shared
    gw = dep.gateway
    conns = _open_served(gw, 2 * WORKERS)
    h = _health_over(conns[0])
    assert sorted(p["connections"] for p in h["processes"]) == [2] * WORKERS, h["processes"]
    for c in conns:
        c.close()
    _wait_all_closed(gw)
    conns = _open_served(gw, WORKERS)
    h = _health_over(conns[0])
    assert sorted(p["connections"] for p in h["processes"]) == [1] * WORKERS, h["processes"]
    for c in conns:
        c.close()


def test_idle_connections_do_not_count_so_one_client_at_a_time_is_served_by_the_leader(shared):
    """A keep-alive connection idle for ACTIVE_S is not busy: three
    connections opened one after another, each idle by the time the next
    opens, all go to the leader (which serves a write without a worker's
    call to it); with one of them busy, the next ones go to the workers."""
    dep = shared
    from airlock.primary.dispatch import ACTIVE_S
    gw = dep.gateway
    _wait_all_closed(gw)
    time.sleep(ACTIVE_S)             # the health calls' connections, forgotten
    conns = []
    for _ in range(3):
        conns += _open_served(gw, 1)
        time.sleep(ACTIVE_S + 0.3)
    h = _health_over(conns[-1])
    by_role = sorted((p["role"], p["connections"]) for p in h["processes"])
    assert by_role == [("leader", 3)] + [("worker", 0)] * (WORKERS - 1), h["processes"]
    leader = next(p for p in h["processes"] if p["role"] == "leader")
    assert leader["busy_connections"] == 1, leader     # the one the health call came on
    conns += _open_served(gw, WORKERS - 1)   # the leader has one busy: one to each worker
    h = _health_over(conns[-1])
    assert sorted(p["connections"] for p in h["processes"] if p["role"] == "worker") == [1] * (WORKERS - 1), h["processes"]
    for c in conns:
        c.close()


def test_a_connection_closed_unused_does_not_send_the_next_client_to_a_worker(shared):
    """wrk (and a load balancer's TCP check) opens a connection and closes it
    unused just before the real one: the leader must not count that probe
    as busy, or a single client lands on a worker (and pays the worker ->
    leader commit call on every write)."""
    dep = shared
    import http.client
    from airlock.primary.dispatch import ACTIVE_S
    gw = dep.gateway

    def served_by() -> dict:
        h = _health_over(probe_free)
        return {p["pid"]: p["requests"] for p in h["processes"]}

    leader = gw.proc.pid
    for attempt in range(3):
        time.sleep(ACTIVE_S + 0.1)                       # every earlier connection idle
        probe = socket.create_connection(("127.0.0.1", gw.port))
        probe.close()
        probe_free = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        before = served_by()
        after = served_by()
        grew = {pid for pid in after if after[pid] != before.get(pid)}
        assert grew == {leader}, f"attempt {attempt}: the client's requests were served by {grew}"
        probe_free.close()


def test_new_connections_after_a_worker_is_killed_are_all_served(dep):
    """A killed worker's channel breaks; the leader hands no connection to it
    (it notices at the latest when passing one fails) and serves on."""
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="onward")
    victim = worker_pids(gw)[0]
    with leader_kept_busy(gw):       # so that new connections go to the workers, the dead one too
        os.kill(victim, signal.SIGKILL)
        for i in range(4 * WORKERS):     # each on a new connection, right after the kill
            fresh_client(gw).put_object(Bucket="onward", Key=f"k{i}", Body=b"x" * i)
            assert fresh_client(gw).get_object(Bucket="onward", Key=f"k{i}")["Body"].read() == b"x" * i
    wait_until(lambda: len(worker_pids(gw)) == WORKERS - 1 and victim not in worker_pids(gw),
               "the killed worker replaced")
    wait_until(lambda: serving(gw, WORKERS), "replacement serving")
    _wait_all_closed(gw)             # the clients above, closed
    conns = _open_served(gw, 2 * WORKERS)   # ... and the replacement takes its share again
    h = _health_over(conns[0])
    assert sorted(p["connections"] for p in h["processes"]) == [2] * WORKERS, h["processes"]
    for c in conns:
        c.close()


def test_large_uploads_on_every_process_reach_the_vault_whole(shared):
    dep = shared
    # chunks of 64 KiB and more: a worker sends them on its own link and
    # waits for the vault's answers before its commit goes to the leader
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="large")
    stored = put_large_until_direct(gw, "large", "warm")
    before = direct_chunks(gw)
    bodies = {f"o{i}": os.urandom((3 << 20) + 4099 * i) for i in range(10)}
    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda kv: fresh_client(gw).put_object(Bucket="large", Key=kv[0], Body=kv[1]),
                    bodies.items()))
    bodies.update(stored)
    for k, b in bodies.items():
        assert fresh_client(gw).get_object(Bucket="large", Key=k)["Body"].read() == b
    h = wait_until(lambda: health_or_none(gw), "health")
    # every chunk reached the vault while its body streamed: none had to be resent
    assert h["replication_stats"]["missing_chunks_resent"] == 0, h["replication_stats"]
    # the workers sent their large chunks on links of their own, not through the leader
    assert h["stats"]["chunks_shipped_direct"] > before and h["stats"]["direct_fallbacks"] == 0, h["stats"]
    assert dep.vault.status()["link"]["sessions"] >= 2
    # each process's own vault connection is in the health document
    links = {p["role"] + str(p["pid"]): p.get("vault_link") for p in h["processes"]}
    assert [p["vault_link"] for p in h["processes"] if p["role"] == "leader"] == ["connected"], links
    assert "connected" in [p.get("vault_link") for p in h["processes"] if p["role"] == "worker"], links
    assert set(links.values()) <= {"connected", "connecting", "not connected"}, links
    leader = next(p["pid"] for p in h["processes"] if p["role"] == "leader")
    st = dep.airlock("status", check=False)
    assert f"leader {leader} connected" in st.stdout, st.stdout
    r = dep.airlock("verify")
    assert "equal" in r.stdout.lower(), r.stdout


def test_large_uploads_on_workers_survive_a_vault_restart(dep):
    """A worker's own link to the vault breaks when the vault restarts: its
    large uploads go through the leader until it has connected again;
    nothing acknowledged is lost either way."""
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="restart")
    bodies = put_large_until_direct(gw, "restart", "a")
    before = direct_chunks(gw)
    dep.vault.stop()
    dep.vault.start()
    wait_until(lambda: (health_or_none(gw) or {}).get("vault_connected"), "leader reconnected")
    bodies.update(put_large_until_direct(gw, "restart", "b", above=before))   # reconnected
    for k, b in bodies.items():
        assert fresh_client(gw).get_object(Bucket="restart", Key=k)["Body"].read() == b
    r = dep.airlock("verify")
    assert "equal" in r.stdout.lower(), r.stdout


@pytest.fixture
def proxied_workers(tmp_path):
    """Vault, fault proxy, and a gateway of WORKERS processes linked through
    the proxy, with a short ack timeout."""
    from faultproxy import FaultProxy
    d = Deployment(tmp_path / "deploy", ack_timeout=2.0)
    d.vault.start()
    proxy = FaultProxy(d.vault.port).start()
    d.use_proxy(proxy)
    try:
        d.gateway.extra_args = d._gateway_args() + ["--workers", str(WORKERS)]
        d.gateway.start()
        wait_until(lambda: serving(d.gateway, WORKERS), "workers serving")
        yield d, proxy
    finally:
        d.stop()


def test_a_worker_that_cannot_open_its_own_link_sends_large_chunks_through_the_leader(proxied_workers):
    """The leader's link is up, but the vault (here: the fault proxy in front
    of it) refuses new connections, so the workers cannot open theirs: their
    large uploads still succeed, their chunks going to the vault through the
    leader as before; once connections are accepted again, they send directly."""
    d, proxy = proxied_workers
    gw = d.gateway
    fresh_client(gw).create_bucket(Bucket="refused")
    assert proxy.command("refuse on") == "ok"
    bodies = {f"r{i}": os.urandom((1 << 20) + 4001 * i) for i in range(6)}
    with leader_kept_busy(gw) as kb:     # the uploads go to the workers
        before = sum(p["requests"] for p in kb.health()["processes"] if p["role"] == "worker")
        for k, b in bodies.items():
            with one_connection(gw) as s3:
                s3.put_object(Bucket="refused", Key=k, Body=b)
        h = kb.health()
    assert sum(p["requests"] for p in h["processes"] if p["role"] == "worker") - before == 6, h["processes"]
    assert h["stats"].get("chunks_shipped_direct", 0) == 0, h["stats"]
    workers = [p for p in h.get("processes", []) if p["role"] == "worker"]
    assert workers and all(p["vault_link"] in ("connecting", "not connected") for p in workers), workers
    assert h["replication_stats"]["missing_chunks_resent"] == 0, h["replication_stats"]
    assert proxy.command("refuse off") == "ok"
    time.sleep(2.5)                          # past the workers' reconnect back-off (LINK_RETRY_S)
    bodies.update(put_large_until_direct(gw, "refused", "s"))
    for k, b in bodies.items():
        assert fresh_client(gw).get_object(Bucket="refused", Key=k)["Body"].read() == b
    r = d.airlock("verify")
    assert "equal" in r.stdout.lower(), r.stdout


def test_large_uploads_on_workers_end_in_bounded_time_when_the_vault_stops_answering(proxied_workers):
    """The vault's answers stop (the proxy holds vault -> gateway): every
    upload, on whichever process, ends within a few ack timeouts -- 503, or
    stored -- instead of waiting for answers that never come.  Once the
    answers flow again, uploads are stored and the vault holds everything
    acknowledged."""
    d, proxy = proxied_workers
    gw = d.gateway
    fresh_client(gw).create_bucket(Bucket="stall")
    stored = put_large_until_direct(gw, "stall", "w")
    assert proxy.command("hold down") == "ok"

    def one(i: int):
        body = os.urandom((1 << 20) + 17 * i)
        c = boto3.client("s3", endpoint_url=gw.endpoint, aws_access_key_id=ACCESS_KEY,
                         aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                         config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                       max_pool_connections=1, read_timeout=60))
        t0 = time.monotonic()
        try:
            c.put_object(Bucket="stall", Key=f"s{i}", Body=body)
            return "stored", time.monotonic() - t0, f"s{i}", body
        except ClientError as e:
            return e.response["Error"]["Code"], time.monotonic() - t0, f"s{i}", body

    with cf.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    assert all(code in ("stored", "ServiceUnavailable") for code, *_ in results), results
    # ack timeout 2 s: the worker's wait for its chunks' answers, the
    # leader's reconnect (5 s, shared by the requests queued meanwhile) and
    # its APPEND are each bounded; without bounds they waited for good
    assert max(t for _c, t, *_ in results) < 30, results
    assert proxy.command("release") == "ok" and proxy.command("pass") == "ok"
    for code, _t, key, body in results:
        put_until_stored(gw, "stall", key, body)
        stored[key] = body
    for k, b in stored.items():
        assert fresh_client(gw).get_object(Bucket="stall", Key=k)["Body"].read() == b
    r = d.airlock("verify")
    assert "equal" in r.stdout.lower(), r.stdout


def test_conditional_creates_of_one_key_from_many_processes_let_exactly_one_win(shared):
    dep = shared
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="race")

    def attempt(i: int):
        try:
            fresh_client(gw).put_object(Bucket="race", Key="only-once", Body=f"writer {i}".encode(),
                                        IfNoneMatch="*")
            return i
        except ClientError as e:
            assert e.response["Error"]["Code"] == "PreconditionFailed", e.response
            return None

    first = None
    for round_ in range(3):
        with cf.ThreadPoolExecutor(12) as ex:
            winners = [w for w in ex.map(attempt, range(24)) if w is not None]
        assert len(winners) == (1 if round_ == 0 else 0), winners
        first = first if first is not None else winners[0]
    assert fresh_client(gw).get_object(Bucket="race", Key="only-once")["Body"].read() == f"writer {first}".encode()


def test_conditional_deletes_from_many_processes_remove_only_the_object_they_name(shared):
    """Every process checks a delete's If-Match where the leader commits it,
    under the key's lock: of many deletes naming one ETag exactly one
    succeeds, and none naming an older ETag removes the newer object."""
    dep = shared
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="cdel")
    old = fresh_client(gw).put_object(Bucket="cdel", Key="k", Body=b"old")["ETag"]

    def attempt(etag: str):
        try:
            fresh_client(gw).delete_object(Bucket="cdel", Key="k", IfMatch=etag)
            return "deleted"
        except ClientError as e:
            return e.response["Error"]["Code"]

    with cf.ThreadPoolExecutor(12) as ex:
        outcomes = list(ex.map(attempt, [old] * 24))
    assert outcomes.count("deleted") == 1 and set(outcomes) == {"deleted", "NoSuchKey"}, outcomes
    fresh_client(gw).put_object(Bucket="cdel", Key="k", Body=b"new")
    with cf.ThreadPoolExecutor(12) as ex:
        outcomes = list(ex.map(attempt, [old] * 24))
    assert set(outcomes) == {"PreconditionFailed"}, outcomes
    assert fresh_client(gw).get_object(Bucket="cdel", Key="k")["Body"].read() == b"new"


def test_a_worker_killed_amid_writes_loses_nothing_acknowledged_and_is_replaced(dep):
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="sturdy")
    fresh_client(gw).put_bucket_versioning(Bucket="sturdy", VersioningConfiguration={"Status": "Enabled"})
    acked: dict[str, bytes] = {}
    race_winners: list[str] = []
    victim = worker_pids(gw)[0]

    def writer(i: int) -> None:
        body = os.urandom(2000 + i)
        try:
            fresh_client(gw).put_object(Bucket="sturdy", Key=f"o{i}", Body=body)
            acked[f"o{i}"] = body
        except Exception:        # noqa: BLE001 -- the killed process's requests fail; that is allowed
            pass
        try:                     # conditional creates of one key, racing across processes
            fresh_client(gw).put_object(Bucket="sturdy", Key="once", Body=f"{i}".encode(), IfNoneMatch="*")
            race_winners.append(f"{i}")
        except Exception:        # noqa: BLE001 -- 412, or the killed process
            pass
        if i == 20:
            os.kill(victim, signal.SIGKILL)

    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(writer, range(60)))
    wait_until(lambda: len(worker_pids(gw)) == WORKERS - 1 and victim not in worker_pids(gw),
               "the killed worker replaced")
    wait_until(lambda: serving(gw, WORKERS), "replacement serving")
    assert len(acked) >= 30
    for k, v in acked.items():
        assert fresh_client(gw).get_object(Bucket="sturdy", Key=k)["Body"].read() == v
    # at most one conditional create won, and the object is the winner's
    assert len(race_winners) <= 1
    if race_winners:
        got = fresh_client(gw).get_object(Bucket="sturdy", Key="once")["Body"].read()
        assert got == race_winners[0].encode()
    versions = fresh_client(gw).list_object_versions(Bucket="sturdy", Prefix="once").get("Versions", [])
    assert len(versions) <= 1        # a second "winner" would have left a second version
    fresh_client(gw).put_object(Bucket="sturdy", Key="after", Body=b"after the restart")
    assert "exited with -9; starting it again" in gw.log_text()
    assert "equal" in dep.airlock("verify").stdout.lower()


def test_a_failed_upload_through_a_worker_still_ships_its_chunks(shared):
    """A worker holds a small body's chunks to send them with the commit; if
    the upload fails (here: a wrong Content-MD5) it ships them anyway, so an
    identical upload later (dedup: no chunk is new) finds them on the vault."""
    dep = shared
    import base64
    import hashlib
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="retry")
    before = {p["pid"]: p["stats"]["gets"] for p in gw.health()["processes"]}
    with leader_kept_busy(gw):           # fresh connections, each closed after use: they land on workers
        for i in range(8):
            body = os.urandom(3000 + i)
            with pytest.raises(ClientError) as e, one_connection(gw) as s3:
                s3.put_object(Bucket="retry", Key=f"r{i}", Body=body,
                              ContentMD5=base64.b64encode(hashlib.md5(b"other").digest()).decode())
            assert e.value.response["Error"]["Code"] == "BadDigest"
            with one_connection(gw) as s3:
                s3.put_object(Bucket="retry", Key=f"r{i}", Body=body)
            with one_connection(gw) as s3:
                assert s3.get_object(Bucket="retry", Key=f"r{i}")["Body"].read() == body
    h = gw.health()
    assert h["replication_stats"]["missing_chunks_resent"] == 0
    # the reads were served by workers, and so were the writes before them
    # (a write's "puts" counter is the leader's, which commits it)
    on_workers = sum(p["stats"]["gets"] - before.get(p["pid"], 0) for p in h["processes"] if p["role"] == "worker")
    assert on_workers == 8, h["processes"]


def test_a_small_body_a_worker_takes_reaches_the_vault_while_the_leader_stores_its_row(shared):
    """A worker does not store a small body's row: the row rides with the
    commit call and the leader stores it while the record goes to the vault
    (docs/format/ipc.md, `ship_and_commit_object`).  The row commit is held
    here by taking the small-chunk store's lock: the record is durable in
    the vault, but the PUT is not answered and the object not visible until
    the row is in."""
    dep = shared
    import fcntl
    import threading
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="rows")
    fresh_client(gw).put_object(Bucket="rows", Key="warm", Body=b"the store exists")
    body = os.urandom(3000)
    answer: dict = {}
    with leader_kept_busy(gw):           # a fresh connection lands on a worker
        vault_before = dep.vault.status()["last_seq"]
        with open(gw.data / "chunks" / "small.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                s3 = fresh_client(gw)
                t = threading.Thread(target=lambda: answer.update(
                    put=s3.put_object(Bucket="rows", Key="k", Body=body)))
                t.start()
                wait_until(lambda: dep.vault.status()["last_seq"] == vault_before + 1,
                           "the record durable in the vault while its row waits", timeout=10)
                time.sleep(0.3)
                assert t.is_alive(), "answered before its row was durable"
                with pytest.raises(ClientError):
                    fresh_client(gw).head_object(Bucket="rows", Key="k")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        t.join(20)
        assert answer["put"]["ResponseMetadata"]["HTTPStatusCode"] == 200
        with one_connection(gw) as s3:
            assert s3.get_object(Bucket="rows", Key="k")["Body"].read() == body
    r = dep.airlock("verify")
    assert "equal" in r.stdout.lower(), r.stdout


def test_the_unfinished_chunk_files_of_a_dead_worker_are_removed(dep):
    gw = dep.gateway
    victim = worker_pids(gw)[0]
    tmp = gw.data / "chunks" / "tmp"
    theirs = tmp / f"{'ab' * 32}.worker{victim}-7"        # a write the worker did not finish
    other = tmp / f"{'cd' * 32}.worker{victim + 1000000}-1"  # another owner's: left alone
    theirs.write_bytes(b"partial")
    other.write_bytes(b"partial")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not theirs.exists(), "the dead worker's tmp file is removed", timeout=15)
    assert other.exists()
    wait_until(lambda: len(worker_pids(gw)) == WORKERS - 1 and victim not in worker_pids(gw),
               "the worker is replaced", timeout=20)


def test_a_killed_leader_takes_its_workers_with_it(dep):
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="after")
    fresh_client(gw).put_object(Bucket="after", Key="k", Body=b"written before the kill")
    pids = worker_pids(gw)
    assert len(pids) == WORKERS - 1
    gw.kill()

    def all_gone():
        return all(not os.path.exists(f"/proc/{p}") or _is_zombie(p) for p in pids)
    wait_until(all_gone, "workers exit when the leader is gone", timeout=15)
    # the port and the data directory are free again: a single-process
    # gateway can take both, and has every write
    dep.gateway.extra_args = dep._gateway_args() + ["--workers", "1"]
    dep.gateway.start()
    assert fresh_client(gw).get_object(Bucket="after", Key="k")["Body"].read() == b"written before the kill"


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_losing_the_primary_stops_the_workers_and_the_leader_serves_from_the_vault(dep, tmp_path):
    gw = dep.gateway
    fresh_client(gw).create_bucket(Bucket="lifeboat")
    bodies = {f"x{i}": os.urandom(200_000 * i + 5) for i in range(5)}
    for k, v in bodies.items():
        fresh_client(gw).put_object(Bucket="lifeboat", Key=k, Body=v)
    pids = worker_pids(gw)
    shutil.rmtree(gw.data)
    wait_until(lambda: (health_or_none(gw) or {}).get("primary_storage") == "failed", "degraded mode")
    wait_until(lambda: all(not os.path.exists(f"/proc/{p}") or _is_zombie(p) for p in pids),
               "workers stopped", timeout=20)
    for k, v in bodies.items():
        assert fresh_client(gw).get_object(Bucket="lifeboat", Key=k)["Body"].read() == v
    with pytest.raises(ClientError) as e:
        fresh_client(gw).put_object(Bucket="lifeboat", Key="new", Body=b"x")
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert worker_pids(gw) == []          # and none is started again while degraded


@pytest.mark.parametrize("value", ["0", "65", "two", "-1"])
def test_a_bad_worker_count_is_refused_with_one_line(tmp_path, value):
    r = subprocess.run([sys.executable, "-m", "airlock", "gateway", "--data", str(tmp_path / "p"),
                        f"--workers={value}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers" in lines[0], r.stderr
    assert not (tmp_path / "p").exists()


def test_auto_means_one_process_per_cpu_up_to_four():
    from airlock.config import AUTO_MAX_WORKERS, GatewayConfig, gateway_processes
    n = gateway_processes(GatewayConfig())                  # the default is "auto"
    assert 1 <= n <= AUTO_MAX_WORKERS == 4
    assert n == min(len(os.sched_getaffinity(0)), 4)
    assert gateway_processes(GatewayConfig(workers=1)) == 1


def test_a_single_process_gateway_serves_without_workers(tmp_path):
    gw = Gateway(tmp_path / "one", extra_args=["--workers", "1"]).start()
    try:
        s3 = fresh_client(gw)
        s3.create_bucket(Bucket="one")
        s3.put_object(Bucket="one", Key="k", Body=b"v")
        assert s3.get_object(Bucket="one", Key="k")["Body"].read() == b"v"
        assert worker_pids(gw) == [] and "processes" not in gw.health()
    finally:
        assert gw.stop() == 0


def test_a_bad_worker_count_in_the_config_file_is_refused(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nworkers = "many"\n')
    r = subprocess.run([sys.executable, "-m", "airlock", "gateway", "--data", str(tmp_path / "p"),
                        "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "[gateway] workers" in r.stderr


def test_a_local_only_gateway_with_workers_serves_and_stops_cleanly(tmp_path):
    gw = Gateway(tmp_path / "solo", extra_args=["--workers", "2"]).start()
    try:
        wait_until(lambda: len(worker_pids(gw)) == 1, "worker started")
        pids = worker_pids(gw)
        fresh_client(gw).create_bucket(Bucket="solo")
        for i in range(10):
            fresh_client(gw).put_object(Bucket="solo", Key=f"{i}", Body=b"%d" % i)
        for i in range(10):
            assert fresh_client(gw).get_object(Bucket="solo", Key=f"{i}")["Body"].read() == b"%d" % i
        procs = wait_until(lambda: (health_or_none(gw) or {}).get("processes"), "health of both processes")
        assert all("vault_link" not in p for p in procs), procs     # no vault, no link to report
    finally:
        assert gw.stop() == 0
    assert all(not os.path.exists(f"/proc/{p}") or _is_zombie(p) for p in pids)


def test_a_worker_restarted_after_the_installation_changed_is_not_run_and_the_rest_serve(tmp_path):
    """An upgrade while the gateway runs: a worker started afterwards would
    import other code than its leader's (the calls between them could differ
    in their arguments).  It refuses to serve, the leader does not start it
    again and says why, and the gateway goes on with its other processes."""
    import airlock
    pkg = tmp_path / "install"
    shutil.copytree(os.path.dirname(airlock.__file__), pkg / "airlock",
                    ignore=shutil.ignore_patterns("__pycache__"))
    gw = Gateway(tmp_path / "upgraded", extra_args=["--workers", "3"],
                 extra_env={"PYTHONPATH": str(pkg)}).start()
    try:
        wait_until(lambda: serving(gw, 3), "workers serving")
        s3 = fresh_client(gw)
        s3.create_bucket(Bucket="upgrade")
        s3.put_object(Bucket="upgrade", Key="before", Body=b"written before the upgrade")

        with open(pkg / "airlock" / "s3" / "app.py", "a") as f:
            f.write("\n# the next release\n")
        victim = worker_pids(gw)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "not started again: the airlock installation changed" in gw.log_text(),
                   "the leader gives the worker up", timeout=30)
        assert "the airlock installation changed since the gateway started" in gw.log_text()   # the worker's own line
        wait_until(lambda: serving(gw, 2), "the other processes serve")
        assert len(worker_pids(gw)) == 1 and victim not in worker_pids(gw)
        for i in range(6):            # new connections: each to the leader or the remaining worker
            c = fresh_client(gw)
            c.put_object(Bucket="upgrade", Key=f"after{i}", Body=b"%d" % i)
            assert c.get_object(Bucket="upgrade", Key="before")["Body"].read() == b"written before the upgrade"
        time.sleep(3)                 # well past the restart delay: still not started again
        assert len(worker_pids(gw)) == 1
        notes = gw.health()["workers_not_running"]       # what `airlock status` shows too
        assert len(notes) == 1 and "installation changed" in notes[0], notes
    finally:
        assert gw.stop() == 0


def test_workers_of_a_gateway_started_beside_another_airlock_package_run_the_leaders_code(tmp_path):
    """`airlock gateway` run from a directory holding another `airlock/`
    package (a source checkout of another release, say): its workers import
    the leader's package, not that one, and all of them serve."""
    elsewhere = tmp_path / "checkout"
    (elsewhere / "airlock").mkdir(parents=True)
    (elsewhere / "airlock" / "__init__.py").write_text('raise ImportError("not the airlock under test")\n')
    d = Deployment(tmp_path / "deploy")
    d.vault.start()
    d.gateway.cwd = elsewhere
    d.gateway.extra_args = d._gateway_args() + ["--workers", str(WORKERS)]
    try:
        d.gateway.start()
        gw = d.gateway
        wait_until(lambda: serving(gw, WORKERS), "every process serving", timeout=20)
        h = gw.health()
        assert "workers_not_running" not in h, h["workers_not_running"]
        assert [p.get("restarts", 0) for p in h["processes"] if p["role"] == "worker"] == [0] * (WORKERS - 1)
        assert len(worker_pids(gw)) == WORKERS - 1
        fresh_client(gw).create_bucket(Bucket="beside")
        for i in range(6):            # new connections: spread over every process
            c = fresh_client(gw)
            c.put_object(Bucket="beside", Key=f"k{i}", Body=b"%d" % i)
            assert c.get_object(Bucket="beside", Key=f"k{i}")["Body"].read() == b"%d" % i
        st = d.airlock("status")
        assert f"processes={WORKERS}" in st.stdout and "NOT RUNNING" not in st.stdout, st.stdout
        assert "not the airlock under test" not in gw.log_text()
    finally:
        d.stop()
