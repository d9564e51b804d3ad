"""The leader accepts every connection and hands each to the least busy process.

With workers, only the leader listens on the gateway's port.  Each accepted
connection goes to the process with the fewest busy connections (the
leader's counting double, as it also runs every commit; among equals the
one with fewer, then the leader, then in turn): the leader serves it
itself, or passes the socket to a worker over that worker's connection
channel (a SOCK_SEQPACKET socketpair, the descriptor as SCM_RIGHTS;
docs/format/ipc.md, "Connection channel").  The worker tells the leader,
on the same channel, the last connection it received and how many it has
busy, when they arrive and at most REPORT_S after the count changes; its
first report, sent once it can serve, makes it eligible.

Busy, not open (`Activity`): a connection with a request in flight, or
handed over or with a request begun or ended within ACTIVE_S.  A
client's keep-alive pool holds connections it may not use for minutes;
counted as open, one idle connection of a benchmark's set-up client sent
the busy one to a worker, where a small PUT costs a worker -> leader
commit call more (4 KiB PUT at one connection: 314 ops/s on the worker,
398 in the leader; docs/performance.md).  With ties going to the leader,
one busy client connection is served there and the second goes to a
worker.  A connection its client closed before sending anything (wrk
opens and closes one to test the address before its load; a load
balancer's TCP check does the same) is not busy either: counted from its
hand-over, it sent the single connection that follows it to a worker in 5
of 8 benchmark cells (`closed_unused`, which peeks at the socket).

Why not SO_REUSEPORT (every process listening, the kernel picking): the
kernel hashes each connection's addresses and ports onto a process, blind
to how many connections each already has, so four connections of one
client land all on one process of two about one time in eight, and that
process's CPU bounds them while the other idles (docs/performance.md).
Handing out from one place also means nothing can share the port with
the gateway.  A connection passed to a worker that dies before reading it
is lost (its client sees a reset), as one in a dying listener's accept
queue was.

A worker whose channel is broken (it died, or is being stopped) gets no
more connections; one whose channel is full, or that has not taken a
passed connection for STALLED_S (its event loop is stuck), none until it
reads again; they go to the next process in the order.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("airlock.dispatch")

MAGIC = b"ALCN"
VERSION = 2                      # 2: the worker reports busy connections, not open ones
CONN = struct.Struct("<4sBQ")    # leader -> worker: magic, version, the connection's number; its descriptor rides along
LOAD = struct.Struct("<4sBQI")   # worker -> leader: magic, version, last connection number received, connections busy
CONN_HEAD = LOAD_HEAD = MAGIC + bytes([VERSION])
REPORT_S = 0.05                  # a worker reports a changed count of busy connections this often at most
ACTIVE_S = 1.0                   # a connection without a request in flight is busy this long after its last sign of life
# The leader's busy connections count this many times each: it also runs
# every process's commits (a small PUT costs it ~0.4 ms more CPU when it
# serves the PUT's connection too).  With 2, a gateway of two processes
# holds 2 of 4 and 6 of 16 connections in the leader; 4 KiB PUTs at 16
# connections: +3% and +17% against 1 in two interleaved runs
# (docs/performance.md).
LEADER_WEIGHT = 2
STALLED_S = 5.0                  # a worker that has not taken a passed connection for this long gets no more
# errors of a send or receive on a channel that mean the other end is gone;
# any other (ENOBUFS, ENOMEM, ETOOMANYREFS: transient) only fails this one hand-over
BROKEN = (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN, errno.EBADF)
ACCEPT_BATCH = 64                # connections accepted per wake-up of a listening socket, at most
ACCEPT_RETRY_S = 1.0             # out of descriptors or memory: stop accepting for this long


def connection_channel() -> tuple[socket.socket, socket.socket]:
    """(leader's end, worker's end) of a new connection channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def listen_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address `host` resolves to
    (as `loop.create_server` makes them: SO_REUSEADDR, IPv6 sockets v6-only),
    all on one port: with port 0, the one the first socket was given."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            try:
                s = socket.socket(family, kind, proto)
            except OSError as e:
                if e.errno == errno.EAFNOSUPPORT and len(infos) > 1:
                    continue             # as asyncio: e.g. IPv6 disabled on the host, "" listens on IPv4 only
                raise
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(out) > 1:
                addr = (addr[0], out[0].getsockname()[1], *addr[2:])
            s.bind(addr)
            s.listen(backlog)
            s.setblocking(False)
        if not out:
            raise OSError(errno.EAFNOSUPPORT, f"no address family of {host!r} can be used")
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


class Activity:
    """When each of this process's connections last showed life (handed
    over, a request begun or ended) and how many requests each has in
    flight.  `wrap` puts it around the HTTP handler; `busy` counts."""

    def __init__(self):
        self._seen: dict = {}        # protocol -> time.monotonic() of its last sign of life
        self._in_flight: dict = {}   # protocol -> requests being handled (absent: none)
        self._fresh: dict = {}       # protocol -> its socket, while no request has begun on it
        self.requests = 0            # requests this process has begun serving (health: `requests`)

    def touch(self, proto, sock: socket.socket | None = None) -> None:
        """A sign of life; `sock`: a connection just handed over (busy from
        now on, unless its client closes it before sending a request)."""
        self._seen[proto] = time.monotonic()
        if sock is not None:
            self._fresh[proto] = sock

    def wrap(self, handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
        """`handler` (aiohttp's request -> response), keeping count."""
        seen, in_flight, fresh = self._seen, self._in_flight, self._fresh

        async def tracked(request):
            proto = request.protocol
            self.requests += 1
            fresh.pop(proto, None)
            seen[proto] = time.monotonic()
            in_flight[proto] = in_flight.get(proto, 0) + 1
            try:
                return await handler(request)
            finally:
                n = in_flight.pop(proto) - 1
                if n:
                    in_flight[proto] = n
                seen[proto] = time.monotonic()
        return tracked

    def busy(self, connections) -> int:
        """How many of `connections` (the live protocols) are busy: a
        request in flight, or a sign of life within ACTIVE_S.  Forgets
        connections no longer live."""
        since = time.monotonic() - ACTIVE_S
        seen, in_flight, fresh = self._seen, self._in_flight, self._fresh
        n = 0
        for proto in connections:
            if proto in in_flight:
                n += 1
            elif seen.get(proto, since) > since:
                sock = fresh.get(proto)
                if sock is None or not closed_unused(sock):
                    n += 1
        if len(seen) > len(connections):       # in place: `wrap`'s handlers hold these dicts
            live = set(connections)
            for proto in [p for p in seen if p not in live and p not in in_flight]:
                del seen[proto]
                fresh.pop(proto, None)
        return n


class _Serving:
    """Serves connections in this process with `server` -- aiohttp's
    `web.Server` (`runner.server`): the protocol factory, whose
    `connections` lists the ones it holds -- counting each from hand-over
    until aiohttp has it.  `activity` must wrap the server's HTTP handler
    (make_app) for requests to count."""

    def __init__(self, server, activity: Activity | None = None):
        self.server = server
        self.activity = activity or Activity()
        self._starting: set[socket.socket] = set()   # connections taken here that aiohttp does not hold yet
        self._tasks: set[asyncio.Task] = set()

    def open_connections(self) -> int:
        return len(self.server.connections) + len(self._starting)

    def busy_connections(self) -> int:
        return self.activity.busy(self.server.connections) + self._busy_starting()

    def _busy_starting(self) -> int:
        """The connections on their way to aiohttp, less those closed unused."""
        return sum(not closed_unused(s) for s in self._starting)

    def counts(self) -> dict:
        """This process's entries in the health document's `processes`."""
        return {"connections": self.open_connections(), "busy_connections": self.busy_connections(),
                "requests": self.activity.requests}

    def _serve(self, conn: socket.socket) -> None:
        self._starting.add(conn)
        t = asyncio.get_running_loop().create_task(self._connect(conn))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            _transport, proto = await asyncio.get_running_loop().connect_accepted_socket(self.server, conn)
            self.activity.touch(proto, conn)   # new: busy until idle for ACTIVE_S (or closed unused)
        except Exception as e:           # noqa: BLE001 -- one connection; its client sees it close
            log.warning("gateway process %d: could not serve a connection: %s", os.getpid(), e)
            conn.close()
        finally:
            self._starting.discard(conn)


def closed_unused(sock: socket.socket) -> bool | None:
    """Whether the client closed (or reset) `sock`, a connection on which no
    request has begun, without sending anything: wrk's connectivity probe
    before its load, a load balancer's TCP check.  Such a connection is not
    busy, though it counts as busy from its hand-over until then; a client
    that opens its real connection right after the probe would otherwise
    find the process busy with it.  Peeks, never reads (aiohttp reads the
    socket).  None: bytes are waiting (a request is on its way)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True                      # reset by its client, or closed here already
    return None if data else True



class Outlet:
    """The leader's end of one worker's connection channel."""

    def __init__(self, slot: int, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_broken: Callable[[int], None] | None = None):
        """`on_broken(slot)` runs once if the leader gives up on a channel whose
        worker may still run (a bad message): the pool stops that worker, and
        its restart brings a new channel."""
        self.slot = slot
        self.sock = sock
        self.loop = loop
        self.on_broken = on_broken
        self.sent = 0            # number of the last connection handed over
        self.acked = 0           # ... and of the last one the worker said it received
        self.reported_busy = 0   # connections busy in the worker at its last report
        self.ready = False       # the worker has reported once: it serves what it is given
        self.full = False        # the last hand-over found the channel full (logged once)
        self.waiting_since: float | None = None   # when the oldest connection it has not taken was passed
        self.stalled = False     # ... over STALLED_S ago: no more until it takes it (logged once)
        self.alive = True
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    def load(self) -> int:
        """Busy connections, counting the ones on their way as busy."""
        return self.reported_busy + (self.sent - self.acked)

    def eligible(self) -> bool:
        """Alive, reported ready, and not sitting on a connection for STALLED_S."""
        if not (self.alive and self.ready):
            return False
        if self.waiting_since is not None and self.loop.time() - self.waiting_since > STALLED_S:
            if not self.stalled:
                log.error("gateway worker %d has not taken a connection passed %.0f s ago; "
                          "giving it no more until it does", self.slot, STALLED_S)
            self.stalled = True
            return False
        return True

    def give(self, conn: socket.socket) -> bool:
        """Pass `conn` to the worker; False (and `conn` untouched) if it cannot take it."""
        try:
            socket.send_fds(self.sock, [CONN.pack(MAGIC, VERSION, self.sent + 1)], [conn.fileno()])
        except BlockingIOError:
            if not self.full:
                log.warning("gateway worker %d is not taking connections (channel full); "
                            "serving them elsewhere", self.slot)
            self.full = True
            return False
        except OSError as e:
            if e.errno in BROKEN:
                if self.alive:
                    log.warning("gateway worker %d: connection channel broken (%s)", self.slot, e)
                self.close()
            else:
                log.warning("gateway worker %d: could not pass a connection (%s); serving it elsewhere",
                            self.slot, e)
            return False
        if self.sent == self.acked:
            self.waiting_since = self.loop.time()
        self.sent += 1
        self.full = False
        return True

    def _on_readable(self) -> None:
        while True:
            try:
                msg = self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in BROKEN:
                    log.warning("gateway worker %d: connection channel: %s", self.slot, e)
                    return               # transient: the next report comes
                msg = b""
            if not msg:                  # the worker is gone
                self.close()
                return
            if len(msg) != LOAD.size or msg[:5] != LOAD_HEAD:
                log.error("gateway worker %d: bad connection-channel message %r; stopping it", self.slot, msg)
                self.close()
                if self.on_broken is not None:
                    self.on_broken(self.slot)
                return
            _m, _v, acked, n_busy = LOAD.unpack(msg)
            if acked < self.acked:       # messages come in order; this only guards against nonsense
                continue
            took = min(acked, self.sent) > self.acked
            self.acked, self.reported_busy = min(acked, self.sent), n_busy
            if took:                     # it takes connections: the rest wait from now, if any
                self.waiting_since = None if self.acked == self.sent else self.loop.time()
                if self.stalled:
                    log.warning("gateway worker %d takes connections again", self.slot)
                self.stalled = False
            self.ready = True

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.alive = False


class Dispatcher(_Serving):
    """The leader's listening sockets and the choice of process for each connection."""

    def __init__(self, server, activity: Activity | None = None):
        """`server`: aiohttp's `runner.server`, which serves the leader's own
        connections; `activity`: the one wrapped around its handler."""
        super().__init__(server, activity)
        self.outlets: dict[int, Outlet] = {}
        self.listeners: list[socket.socket] = []
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def listen(self, host: str, port: int, backlog: int) -> int:
        self._loop = asyncio.get_running_loop()
        self.listeners = listen_sockets(host, port, backlog)
        for s in self.listeners:
            self._loop.add_reader(s.fileno(), self._accept, s)
        return self.listeners[0].getsockname()[1]

    def add_worker(self, slot: int, sock: socket.socket, on_broken: Callable[[int], None] | None = None) -> None:
        self.remove_worker(slot)
        self.outlets[slot] = Outlet(slot, sock, self._loop or asyncio.get_running_loop(), on_broken)

    def remove_worker(self, slot: int) -> None:
        """No more connections for this worker (stopping, or gone)."""
        o = self.outlets.pop(slot, None)
        if o is not None:
            o.close()

    def stop_accepting(self) -> None:
        for s in self.listeners:
            if s.fileno() >= 0:
                self._loop.remove_reader(s.fileno())
                s.close()
        self.listeners = []

    # ------------------------------------------------------------------ accepting
    def _accept(self, lsock: socket.socket) -> None:
        held = None                      # busy connections aiohttp holds here: walked once per batch
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # as asyncio's own accept loop: pause rather than spin on a full table
                    log.error("gateway: cannot accept a connection (%s); pausing %.0f s", e, ACCEPT_RETRY_S)
                    self._loop.remove_reader(lsock.fileno())
                    self._loop.call_later(ACCEPT_RETRY_S, self._resume, lsock)
                    return
                raise
            if held is None:
                held = self.activity.busy(self.server.connections)   # also forgets the closed ones
            # the connections taken since (this batch's among them) are still
            # on their way to aiohttp: counted afresh, so that a probe closed
            # meanwhile is not busy (alone, the leader takes it whatever the count)
            self._dispatch(conn, held + self._busy_starting() if self.outlets else held)

    def _resume(self, lsock: socket.socket) -> None:
        if lsock.fileno() >= 0 and lsock in self.listeners:
            self._loop.add_reader(lsock.fileno(), self._accept, lsock)

    def _dispatch(self, conn: socket.socket, lead: int) -> None:
        """Give `conn` to a worker or serve it here; `lead`: the leader's
        busy connections."""
        for outlet in self._order(lead):
            if outlet is None:
                break
            if outlet.give(conn):
                conn.close()             # the worker holds it now
                return
            if not outlet.alive:
                self.outlets.pop(outlet.slot, None)
        self._serve(conn)

    def _order(self, lead: int) -> list[Outlet | None]:
        """Candidates, least loaded first (None is the leader, with `lead`
        busy connections weighing LEADER_WEIGHT each)."""
        cands: list[Outlet | None] = [None, *(o for o in self.outlets.values() if o.eligible())]
        if len(cands) == 1:
            return cands
        counts = [lead, *(o.load() for o in cands[1:])]
        n = len(cands)
        start = self._turn % n
        # weighted count; then the plain count (of equals, the process with
        # fewer busy connections); then the leader (at low load it serves a
        # request without the commit call a worker makes); then in turn
        order = sorted(range(n), key=lambda i: (counts[i] * (LEADER_WEIGHT if i == 0 else 1), counts[i],
                                                i != 0, (i - start) % n))
        self._turn = order[0] + 1
        return [cands[i] for i in order]


class Inlet(_Serving):
    """A worker's end of its connection channel: serves the connections the
    leader passes, and reports how many it has busy."""

    def __init__(self, sock: socket.socket, server, activity: Activity | None = None):
        super().__init__(server, activity)
        self.sock = sock
        self.seq = 0
        self._reported: tuple[int, int] | None = None    # (seq, busy) of the last report sent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reporter: asyncio.Task | None = None
        self.closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        self._reporter = self._loop.create_task(self._report_changes())
        self._report()                   # the first report says: ready for connections

    def _on_readable(self) -> None:
        got = False
        while not self.closed:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, 64, 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:      # the leader is gone (the IPC channel says so too)
                self.close()
                return
            if len(msg) != CONN.size or msg[:5] != CONN_HEAD or len(fds) != 1:
                for fd in fds:
                    socket.close(fd)
                log.error("gateway worker: bad connection-channel message %r (%d descriptors)", msg, len(fds))
                continue
            self.seq = CONN.unpack(msg)[2]
            got = True
            try:
                conn = socket.socket(fileno=fds[0])
            except OSError as e:
                socket.close(fds[0])
                log.warning("gateway worker: a passed connection is unusable: %s", e)
                continue
            self._serve(conn)
        if got:
            self._report()

    def _report(self) -> None:
        if self.closed:
            return
        n = self.busy_connections()
        try:
            self.sock.send(LOAD.pack(MAGIC, VERSION, self.seq, min(n, 0xFFFFFFFF)))
        except (BlockingIOError, InterruptedError):
            return                       # the next round sends it
        except OSError as e:
            if e.errno in BROKEN:
                self.close()
            return                       # else transient: the next round sends it
        self._reported = (self.seq, n)

    async def _report_changes(self) -> None:
        while not self.closed:
            await asyncio.sleep(REPORT_S)
            if (self.seq, self.busy_connections()) != self._reported:
                self._report()

    def close(self) -> None:
        """Take no more connections (those open are served on)."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self._reporter is not None and self._reporter is not asyncio.current_task():
            self._reporter.cancel()
