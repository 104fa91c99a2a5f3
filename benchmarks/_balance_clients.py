"""The balancers the balance benchmark compares, one instance per logical client.

Every balancer talks to the same servers over plain loopback TCP with the
same line protocol. ``request(rec)`` sends one request, sets ``rec.sid`` to
the server it went to and ``rec.sent`` to when it was sent, and raises on
failure. ``add_server``/``drop_server`` are the service-discovery updates.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Hashable
from typing import Any

from gevent import socket

from callosum_gevent import CallosumClient, Rover
from callosum_gevent._slotline import read_slot_line

Address = tuple[str, int]
POLICIES = ("random", "round-robin", "least-conn", "p2c", "oracle-jsq")


class Record:
    """One request: scheduled arrival, send time, server, outcome."""

    __slots__ = ("error", "latency", "sent", "sid", "t")

    def __init__(self, t: float) -> None:
        self.t = t
        self.sent = 0.0
        self.sid = -1
        self.latency: float | None = None
        self.error: str | None = None


def roundtrip(sock: Any, rec: Record) -> None:
    """Send ``rec``'s request line on ``sock`` and wait for its echo."""
    line = b"%d\n" % id(rec)
    rec.sent = time.perf_counter()
    sock.sendall(line)
    reply = b""
    while not reply.endswith(b"\n"):
        data = sock.recv(64)
        if not data:
            raise ConnectionError("server closed the connection mid-request")
        reply += data
    if reply != line:
        raise ConnectionError(f"reply {reply!r} does not match request {line!r}")


class PickingClient:
    """Choose a server per request by ``policy``; reuse idle connections per server.

    Connections are opened on demand, so a server's queue, not the client,
    absorbs bursts. ``queue_len(sid)`` gives the oracle the true number of
    requests in a server (queued plus in service).
    """

    def __init__(
        self, policy: str, servers: dict[int, Address], queue_len: Callable[[int], int]
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self.policy = policy
        self.queue_len = queue_len
        self.addrs: dict[int, Address] = {}
        self.idle: dict[int, list[Any]] = {}
        self.outstanding: dict[int, int] = {}
        self.turn = itertools.count(random.randrange(1000))
        for sid, addr in servers.items():
            self.add_server(sid, addr)

    def add_server(self, sid: int, addr: Address) -> None:
        self.addrs[sid] = addr
        self.idle[sid] = []
        self.outstanding.setdefault(sid, 0)

    def drop_server(self, sid: int) -> None:
        del self.addrs[sid]
        for sock in self.idle.pop(sid):
            sock.close()

    def choose(self) -> int:
        sids = list(self.addrs)
        if self.policy == "random":
            return random.choice(sids)
        if self.policy == "round-robin":
            return sids[next(self.turn) % len(sids)]
        if self.policy == "p2c":
            sids = random.sample(sids, 2)  # random order, so ties go either way
        load = self.queue_len if self.policy == "oracle-jsq" else self.outstanding.__getitem__
        return min(sids, key=lambda sid: (load(sid), random.random()))

    def request(self, rec: Record) -> None:
        sid = rec.sid = self.choose()
        idle = self.idle[sid]
        sock = idle.pop() if idle else self._connect(self.addrs[sid])
        self.outstanding[sid] += 1
        try:
            roundtrip(sock, rec)
        except BaseException:
            sock.close()
            raise
        finally:
            self.outstanding[sid] -= 1
        if sid in self.idle:
            self.idle[sid].append(sock)
        else:
            sock.close()

    @staticmethod
    def _connect(addr: Address) -> Any:
        sock = socket.create_connection(addr)
        read_slot_line(sock, timeout=5.0)
        return sock

    def close(self) -> None:
        for sid in list(self.addrs):
            self.drop_server(sid)


class CallosumBalancer:
    """A CallosumClient fed by its own Rover; the pool alone decides the server."""

    def __init__(self, servers: dict[int, Address], max_slots: int, interval: float) -> None:
        self.client = CallosumClient(max_slots=max_slots)
        routes: dict[Hashable, Address] = {sid: addr for sid, addr in servers.items()}
        self.rover = Rover(self.client, routes, interval=interval)
        self.sid_by_port = {addr[1]: sid for sid, addr in servers.items()}
        self.rover.start()

    def add_server(self, sid: int, addr: Address) -> None:
        self.sid_by_port[addr[1]] = sid
        self.rover.add_server(sid, addr)

    def drop_server(self, sid: int) -> None:
        self.rover.drop_server(sid)

    def request(self, rec: Record) -> None:
        with self.client.connection() as sock:
            rec.sid = self.sid_by_port.get(sock.getpeername()[1], -1)
            roundtrip(sock, rec)

    def close(self) -> None:
        self.rover.stop()
        self.client.close()
