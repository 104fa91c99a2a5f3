"""The balancers the balance benchmark compares, one instance per logical client.

Every balancer talks to the same servers over plain loopback TCP with the
same line protocol. ``request(rec)`` sends one request, sets ``rec.sid`` to
the server it went to and ``rec.sent`` to when it was sent, and raises on
failure. ``add_server``/``drop_server`` are the service-discovery updates.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from gevent import socket

from callosum_gevent import CallosumClient, CallosumServer, Rover
from callosum_gevent._slotline import read_slot_line

Address = tuple[str, int]
PEAK_EWMA = "p2c-peak-ewma"
POLICIES = ("random", "round-robin", "least-conn", "p2c", PEAK_EWMA, "oracle-jsq")
#: Peak-EWMA's decay time, Finagle's and Linkerd's default.
DECAY = 10.0
#: What an unmeasured server costs while it has a request outstanding: more
#: than any measured one, so a new server gets one probe at a time.
UNMEASURED_BUSY = 1e6


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


class PeakEwma:
    """A server's peak-EWMA latency, after the published description of Finagle's balancer.

    A sample above the current estimate replaces it at once (the peak); a
    lower one is averaged in with weight ``1 - exp(-elapsed / DECAY)``, and
    between samples the estimate decays towards zero on the same clock, so
    a server that was slow once is tried again in time. The cost of sending
    one more request is the estimate times (outstanding + 1). A server never
    measured costs nothing while idle and more than any measured one while
    busy. Failures are not samples: this is the balancer alone, without
    Finagle's separate failure accrual.
    """

    __slots__ = ("estimate", "measured", "stamp")

    def __init__(self) -> None:
        self.estimate = 0.0
        self.stamp = time.perf_counter()
        self.measured = False

    def observe(self, rtt: float, now: float) -> None:
        keep = math.exp(-(now - self.stamp) / DECAY)
        decayed = self.estimate * keep
        self.estimate = rtt if rtt > decayed else decayed + (1.0 - keep) * rtt
        self.stamp = now
        self.measured = True

    def cost(self, outstanding: int, now: float) -> float:
        if not self.measured:
            return 0.0 if outstanding == 0 else UNMEASURED_BUSY + outstanding
        return self.estimate * math.exp(-(now - self.stamp) / DECAY) * (outstanding + 1)


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
        self.ewma: dict[int, PeakEwma] = {}
        self.turn = itertools.count(random.randrange(1000))
        for sid, addr in servers.items():
            self.add_server(sid, addr)

    def add_server(self, sid: int, addr: Address) -> None:
        self.addrs[sid] = addr
        self.idle[sid] = []
        self.outstanding.setdefault(sid, 0)
        self.ewma[sid] = PeakEwma()

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
        if self.policy == PEAK_EWMA:
            a, b = random.sample(sids, 2)
            now = time.perf_counter()
            cost_a = self.ewma[a].cost(self.outstanding[a], now)
            cost_b = self.ewma[b].cost(self.outstanding[b], now)
            return a if cost_a < cost_b or (cost_a == cost_b and random.random() < 0.5) else b
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
        now = time.perf_counter()
        if sid in self.idle:
            self.ewma[sid].observe(now - rec.sent, now)
            self.idle[sid].append(sock)
        else:
            sock.close()

    @staticmethod
    def _connect(addr: Address) -> Any:
        sock = socket.create_connection(addr)
        try:
            read_slot_line(sock, timeout=5.0)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def fill(self) -> float | None:
        return None

    def close(self) -> None:
        for sid in list(self.addrs):
            self.drop_server(sid)


@dataclass(frozen=True)
class Variant:
    """One way to run Callosum: the servers' weights and the client's options."""

    weights: str  # "one", "capacity" (the operator's) or "auto" (the servers' own)
    client: dict[str, Any] = field(default_factory=dict)
    settle: float = 0.0  # seconds of extra warm-up in a full run, to reach its steady state


def client_parameters() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(CallosumClient).parameters)


def server_takes_auto_weight() -> bool:
    """Tell whether ``CallosumServer(weight="auto")`` is accepted (not yet bound or started)."""
    options: dict[str, Any] = {"weight": "auto"}  # a dict: older builds type weight as int
    try:
        CallosumServer(("127.0.0.1", 0), lambda _sock, _addr: None, **options)
    except (TypeError, ValueError):
        return False
    return True


def missing_api(variant: Variant) -> str | None:
    """Say what this build of callosum_gevent lacks to run ``variant``, or None."""
    params = client_parameters()
    absent = [f"CallosumClient({name}=)" for name in variant.client if name not in params]
    if variant.weights == "auto" and not server_takes_auto_weight():
        absent.append('CallosumServer(weight="auto")')
    return ", ".join(absent) or None


class CallosumBalancer:
    """A CallosumClient fed by its own Rover; the pool alone decides the server."""

    def __init__(
        self,
        servers: dict[int, Address],
        max_slots: int,
        interval: float,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.client = CallosumClient(max_slots=max_slots, **(client_options or {}))
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
            try:
                port = sock.getpeername()[1]
            except OSError:  # reset before it was lent: sid stays unknown
                port = -1
            rec.sid = self.sid_by_port.get(port, -1)
            roundtrip(sock, rec)

    @property
    def fill(self) -> float | None:
        """The share of its slots the client holds."""
        return self.client.slot_count / self.client.max_slots

    def close(self) -> None:
        self.rover.stop()
        self.client.close()
