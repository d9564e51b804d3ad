"""The connection channel between the gateway's leader and a worker
(primary/dispatch.py, docs/format/ipc.md "Connection channel"), end to end
over real socketpairs in one event loop: what the leader does when a worker
does not take what it was passed, sends nonsense, or goes away, and what a
worker does with a bad message.  (The whole gateway with workers:
test_gateway_workers.py.)"""
from __future__ import annotations

import asyncio
import os
import socket

import pytest

from airlock.primary import dispatch
from airlock.primary.dispatch import (CONN, LOAD, MAGIC, VERSION, Activity, Dispatcher, Inlet, Outlet,
                                      connection_channel)


def report(worker_end: socket.socket, last: int, n_busy: int) -> None:
    worker_end.send(LOAD.pack(MAGIC, VERSION, last, n_busy))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


async def ready_outlet(slot: int) -> tuple[Outlet, socket.socket, list]:
    """A leader's outlet whose worker end has reported ready: (outlet, worker end, slots it asked to restart)."""
    leader_end, worker_end = connection_channel()
    broken: list[int] = []
    o = Outlet(slot, leader_end, asyncio.get_running_loop(), on_broken=broken.append)
    report(worker_end, 0, 0)
    await settle()
    assert o.eligible()
    return o, worker_end, broken


def test_a_worker_that_does_not_take_a_passed_connection_gets_none_until_it_does(monkeypatch):
    monkeypatch.setattr(dispatch, "STALLED_S", 0.1)

    async def main():
        leader_end, worker_end = connection_channel()
        o = Outlet(1, leader_end, asyncio.get_running_loop())
        assert not o.eligible()                  # not before its first report
        report(worker_end, 0, 0)
        await settle()
        assert o.eligible() and o.load() == 0
        a, b = socket.socketpair()
        assert o.give(a)
        a.close()
        assert o.load() == 1 and o.eligible()    # passed, not yet taken: counted as busy
        await asyncio.sleep(0.15)
        assert not o.eligible()                  # waited longer than STALLED_S
        msg, fds, _f, _a = socket.recv_fds(worker_end, 64, 1)
        assert CONN.unpack(msg)[2] == 1 and len(fds) == 1
        os.close(fds[0])
        report(worker_end, 1, 1)
        await settle()
        assert o.eligible() and o.load() == 1
        o.close()
        worker_end.close()
        b.close()
    asyncio.run(main())


def test_a_bad_report_takes_the_worker_out_and_asks_for_its_restart():
    async def main():
        o, worker_end, broken = await ready_outlet(3)
        worker_end.send(b"ALCN\x09" + bytes(12))   # another version
        await settle()
        assert broken == [3] and not o.alive and not o.eligible()
        worker_end.close()
    asyncio.run(main())


def test_a_dead_worker_is_out_at_once_and_the_connection_is_left_to_the_caller():
    async def main():
        o, worker_end, broken = await ready_outlet(2)
        worker_end.close()                        # the worker died
        a, b = socket.socketpair()
        assert not o.give(a)                      # EPIPE (or end of file seen first)
        assert a.fileno() >= 0                    # still the caller's to serve
        assert not o.alive and broken == []       # gone by itself: nothing to stop
        a.close()
        b.close()
    asyncio.run(main())


class EchoServer:
    """A protocol factory with `connections`, as aiohttp's web.Server."""

    def __init__(self):
        self.served: list[Echo] = []

    def __call__(self) -> "Echo":
        p = Echo()
        self.served.append(p)
        return p

    @property
    def connections(self) -> list:
        return [p for p in self.served if not p.transport.is_closing()]


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data.upper())


def test_a_worker_serves_what_it_is_passed_reports_it_and_drops_bad_messages():
    async def main():
        leader_end, worker_end = connection_channel()
        server = EchoServer()
        inlet = Inlet(worker_end, server)
        inlet.start()
        leader_end.setblocking(False)
        await settle()
        first = LOAD.unpack(leader_end.recv(64))
        assert first[2:] == (0, 0)                # ready, nothing busy
        # a message with a bad magic: its descriptor is closed, not served
        x, y = socket.socketpair()
        socket.send_fds(leader_end, [b"XXXX\x01" + bytes(8)], [x.fileno()])
        x.close()
        await settle()
        y.settimeout(2)
        assert y.recv(10) == b""                  # the worker closed its copy: the peer sees end of file
        y.close()
        # a good one: served by the protocol
        c, d = socket.socketpair()
        socket.send_fds(leader_end, [CONN.pack(MAGIC, VERSION, 1)], [c.fileno()])
        c.close()
        await settle()
        rep = LOAD.unpack(leader_end.recv(64))
        assert rep[2:] == (1, 1)                  # connection 1 received, one busy (just handed over)
        d.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(d, b"hello")
        assert await asyncio.wait_for(loop.sock_recv(d, 10), 2) == b"HELLO"
        d.close()
        inlet.close()
        for p in server.served:
            p.transport.close()
        leader_end.close()
    asyncio.run(main())


class _Request:
    def __init__(self, protocol):
        self.protocol = protocol


class _Server:
    """Stands for aiohttp's web.Server: the live connections (protocols)."""

    def __init__(self):
        self.connections: list = []


def test_a_connection_is_busy_while_a_request_runs_and_for_ACTIVE_S_after_any_sign_of_life(monkeypatch):
    monkeypatch.setattr(dispatch, "ACTIVE_S", 0.2)

    async def main():
        act = Activity()
        a, b, idle = object(), object(), object()
        conns = [a, b, idle]
        assert act.busy(conns) == 0               # never seen: idle keep-alive connections
        act.touch(a)                              # handed over
        assert act.busy(conns) == 1
        release = asyncio.Event()

        async def slow(request):
            await release.wait()
            return "done"

        async def quick(request):
            return "done"
        running = asyncio.ensure_future(act.wrap(slow)(_Request(b)))
        assert await act.wrap(quick)(_Request(a)) == "done"
        await asyncio.sleep(0)
        assert act.busy(conns) == 2
        await asyncio.sleep(0.3)                  # a went idle longer than ACTIVE_S; b is still at work
        assert act.busy(conns) == 1
        release.set()
        assert await running == "done"
        assert act.busy(conns) == 1               # b just finished: busy for ACTIVE_S more
        await asyncio.sleep(0.3)
        assert act.busy(conns) == 0
        assert act.busy([idle]) == 0 and set(act._seen) <= {idle}   # closed ones are forgotten
        assert await act.wrap(quick)(_Request(idle)) == "done"
        assert act.busy([idle]) == 1              # and the handlers still keep count after that
    asyncio.run(main())


def test_a_connection_closed_before_any_request_is_not_busy(monkeypatch):
    """A handed-over connection counts as busy at once, unless its client
    closed it without sending anything (wrk's probe, a load balancer's TCP
    check): a connection waiting to send, or whose request is on its way,
    still counts."""
    monkeypatch.setattr(dispatch, "ACTIVE_S", 600.0)   # no stall of this machine makes them idle
    act = Activity()
    pairs = [socket.socketpair() for _ in range(4)]
    protos = [object() for _ in pairs]
    for proto, (ours, _theirs) in zip(protos, pairs):
        act.touch(proto, ours)
    assert act.busy(protos) == 4
    pairs[0][1].close()                            # closed unused
    pairs[1][1].sendall(b"GET / HTTP/1.1\r\n")      # a request on its way
    pairs[2][1].sendall(b"PUT")
    pairs[2][1].close()                            # sent, then closed: its request still counts
    assert act.busy(protos) == 3
    assert dispatch.closed_unused(pairs[0][0]) is True
    assert dispatch.closed_unused(pairs[1][0]) is None
    assert dispatch.closed_unused(pairs[3][0]) is False
    pairs[3][0].close()                            # closed on this side (aiohttp closed it)
    assert dispatch.closed_unused(pairs[3][0]) is True
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def test_a_probe_closed_unused_in_the_same_accept_batch_does_not_send_the_next_connection_away():
    """wrk connects, closes at once, then opens its real connection: when
    both wait in the backlog, one accept batch takes them, and the probe
    (kept by the idle leader) must not count as busy for the next."""
    async def main():
        server = EchoServer()
        d = Dispatcher(server)
        port = d.listen("127.0.0.1", 0, 8)
        leader_end, worker_end = connection_channel()
        d.add_worker(1, leader_end)
        report(worker_end, 0, 0)
        await settle()
        # both connect before the loop runs the accept: the kernel completes them
        probe = socket.create_connection(("127.0.0.1", port))
        probe.close()
        real = socket.create_connection(("127.0.0.1", port))
        real.setblocking(False)
        await settle()
        assert d.outlets[1].sent == 0, "the real connection went to the worker"
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(real, b"hi")
        assert await asyncio.wait_for(loop.sock_recv(real, 10), 2) == b"HI"   # served in the leader
        real.close()
        d.stop_accepting()
        d.remove_worker(1)
        worker_end.close()
        for p in server.served:
            p.transport.close()
        await asyncio.sleep(0)
    asyncio.run(main())


def test_the_leader_serves_a_lone_busy_connection_and_hands_the_next_to_a_worker():
    async def main():
        server = _Server()
        d = Dispatcher(server)
        leader_end, worker_end = connection_channel()
        d.add_worker(1, leader_end)
        report(worker_end, 0, 0)
        await settle()
        idle = object()
        server.connections.append(idle)           # an idle keep-alive connection in the leader
        assert d._order(d.busy_connections())[0] is None   # nobody busy: the leader first
        busy = object()
        server.connections.append(busy)
        d.activity.touch(busy)
        assert d._order(d.busy_connections())[0] is d.outlets[1]   # the leader's one busy connection counts twice
        report(worker_end, 0, 2)
        await settle()
        assert d._order(d.busy_connections())[0] is None   # 2 against 2, and the leader has fewer
        d.remove_worker(1)
        worker_end.close()
    asyncio.run(main())


def test_a_leader_serving_alone_forgets_the_connections_that_closed():
    """With no worker to choose from (degraded mode, all restarting) the
    leader still walks its connections at each accept, so closed ones do
    not pile up in its Activity."""
    async def main():
        server = EchoServer()
        d = Dispatcher(server)
        port = d.listen("127.0.0.1", 0, 8)
        for _ in range(20):
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            await settle()
            w.close()
            await w.wait_closed()
            await settle()
        assert len(server.served) == 20
        assert len(d.activity._seen) <= 2, len(d.activity._seen)
        d.stop_accepting()
        for p in server.served:
            p.transport.close()
        await asyncio.sleep(0)
    asyncio.run(main())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_leader_listens_on_every_address_of_its_host_on_one_port(host):
    socks = dispatch.listen_sockets(host, 0, 8)
    try:
        assert socks and len({s.getsockname()[1] for s in socks}) == 1
        assert all(s.getblocking() is False for s in socks)
    finally:
        for s in socks:
            s.close()
