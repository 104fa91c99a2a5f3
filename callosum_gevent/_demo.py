"""The demo: Callosum against a random-choice pool on the same local servers.

Each run starts its own servers (one slower than the rest), lets hundreds of
user greenlets send requests through a few clients, kills one server part
way, adds a fresh one later, and then slows a fast one down. The table shows
where the requests went, before and after the slowdown, and how long they
took.
"""

from __future__ import annotations

import math
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import gevent
import gevent.event
from gevent import socket as gsocket
from gevent.lock import BoundedSemaphore

from ._client import CallosumClient
from ._lineproto import LineService, request
from ._rover import Rover
from ._server import CallosumServer
from ._slotline import read_slot_line
from .errors import CallosumError

__all__ = ["DemoOptions", "run_demo"]

Address = tuple[str, int]

#: A request that fails this way is retried once, then counted as failed.
FAILURES = (OSError, CallosumError)
#: Upper bound on one attempt, so a lost reply cannot hang the demo.
ATTEMPT_TIMEOUT = 10.0
#: How often each full client is offered a connection; often, as a run lasts seconds.
ROVE_INTERVAL = 0.1
#: When the victim is killed, the joiner joins and a fast server turns slow,
#: as shares of the requests answered.
KILL_AT = 0.25
JOIN_AT = 0.45
SLOW_AT = 0.6


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs; every run uses the same."""

    requests: int = 6000
    duration: float = 8.0
    servers: int = 4
    clients: int = 4
    max_slots: int = 4
    users: int = 200
    seed: int = 1
    service_time: float = 0.010
    capacity: int = 5
    slowdown: float = 2.0
    turns_slow: float = 3.0

    def __post_init__(self) -> None:
        for name in ("requests", "clients", "max_slots", "users", "capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")
        for name in ("duration", "service_time"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")
        if self.servers < 2:
            raise ValueError(f"servers must be >= 2 (one is killed), not {self.servers!r}")
        for name in ("slowdown", "turns_slow"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")

    @property
    def server_ids(self) -> list[str]:
        return [f"s{i}" for i in range(1, self.servers + 1)]

    @property
    def slow_id(self) -> str:
        return self.server_ids[-1]

    @property
    def victim_id(self) -> str:
        return self.server_ids[0]

    @property
    def joiner_id(self) -> str:
        return f"s{self.servers + 1}"

    @property
    def turner_id(self) -> str:
        """The server that turns slow part way: a fast one that is neither killed nor slow."""
        return self.server_ids[1] if self.servers > 2 else self.joiner_id


class Fleet:
    """The line-protocol servers of one run, on ephemeral loopback ports."""

    def __init__(self, options: DemoOptions) -> None:
        self._options = options
        self.services: dict[str, LineService] = {}
        self._servers: dict[str, CallosumServer] = {}
        self._slowed: dict[str, float] = {}

    def start(self, server_id: str) -> Address:
        """Start server *server_id* and return its address."""
        opts = self._options
        slowdown = opts.slowdown if server_id == opts.slow_id else 1.0
        slowdown *= self._slowed.get(server_id, 1.0)
        service = LineService(
            server_id,
            opts.service_time * slowdown,
            opts.capacity,
            random.Random(f"{opts.seed}-{server_id}"),
        )
        server = CallosumServer(("127.0.0.1", 0), service, marks_requests=True)
        service.server = server  # mark each request, so the server sees its boundaries
        server.start()
        self.services[server_id] = service
        self._servers[server_id] = server
        return ("127.0.0.1", server.server_port)

    def kill(self, server_id: str) -> None:
        """Stop *server_id* at once, dropping its connections mid-request."""
        self._servers[server_id].stop(timeout=0)

    def slow_down(self, server_id: str, factor: float) -> None:
        """Make every request *server_id* serves from now on *factor* times slower."""
        self._slowed[server_id] = factor
        if server_id in self.services:  # else it takes the factor when it starts
            self.services[server_id].service_time *= factor

    def stop(self) -> None:
        """Stop every server of the run."""
        for server in self._servers.values():
            server.stop(timeout=0)


class Pools(Protocol):
    """The clients of one run, as seen by the driver."""

    def request(self, client: int, message: str) -> tuple[str, str]: ...

    def add_server(self, server_id: str, address: Address) -> None: ...

    def close(self) -> None: ...


class CallosumPools:
    """One ``CallosumClient`` and ``Rover`` per simulated client process."""

    def __init__(self, options: DemoOptions, servers: dict[str, Address]) -> None:
        self.clients = [CallosumClient(max_slots=options.max_slots) for _ in range(options.clients)]
        # Rover takes Mapping[Hashable, ...], whose key type a dict[str, ...] does not match.
        roving: dict[Hashable, Address] = {}
        roving.update(servers)
        self.rovers = [Rover(c, roving, interval=ROVE_INTERVAL) for c in self.clients]
        for rover in self.rovers:
            rover.start()

    def request(self, client: int, message: str) -> tuple[str, str]:
        with self.clients[client].connection(timeout=ATTEMPT_TIMEOUT) as sock:
            return request(sock, message)

    def add_server(self, server_id: str, address: Address) -> None:
        for rover in self.rovers:
            rover.add_server(server_id, address)

    def close(self) -> None:
        for rover in self.rovers:
            rover.stop()
        for client in self.clients:
            client.close()


class RandomPool:
    """Baseline: send each request to a server picked uniformly at random.

    Keeps up to *per_server* connections to each server and stops picking a
    server that refuses a connection, as a plain health check would.
    """

    def __init__(self, servers: dict[str, Address], per_server: int, rng: random.Random) -> None:
        self._per_server = per_server
        self._rng = rng
        self._addresses: dict[str, Address] = {}
        self._idle: dict[str, list[socket.socket]] = {}
        self._free: dict[str, BoundedSemaphore] = {}
        for server_id, address in servers.items():
            self.add_server(server_id, address)

    def add_server(self, server_id: str, address: Address) -> None:
        self._addresses[server_id] = address
        self._idle[server_id] = []
        self._free[server_id] = BoundedSemaphore(self._per_server)

    def request(self, message: str) -> tuple[str, str]:
        server_id = self._rng.choice(list(self._addresses))
        address = self._addresses[server_id]
        with self._free[server_id]:
            idle = self._idle[server_id]
            sock = idle.pop() if idle else self._connect(server_id, address)
            try:
                reply = request(sock, message)
            except BaseException:
                sock.close()
                raise
            idle.append(sock)
            return reply

    def _connect(self, server_id: str, address: Address) -> socket.socket:
        try:
            sock: socket.socket = gsocket.create_connection(address, timeout=ATTEMPT_TIMEOUT)
        except OSError:
            if len(self._addresses) > 1:
                self._addresses.pop(server_id, None)
            raise
        try:
            read_slot_line(sock, ATTEMPT_TIMEOUT)  # a random pool ignores the slot
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


def random_per_server(options: DemoOptions) -> int:
    """Return the random pool's connections per server: Callosum's total, spread."""
    return max(1, round(options.max_slots / options.servers))


class RandomPools:
    """One ``RandomPool`` per simulated client."""

    def __init__(self, options: DemoOptions, servers: dict[str, Address]) -> None:
        per_server = random_per_server(options)
        self.pools = [
            RandomPool(servers, per_server, random.Random(f"{options.seed}-pool-{i}"))
            for i in range(options.clients)
        ]

    def request(self, client: int, message: str) -> tuple[str, str]:
        return self.pools[client].request(message)

    def add_server(self, server_id: str, address: Address) -> None:
        for pool in self.pools:
            pool.add_server(server_id, address)

    def close(self) -> None:
        for pool in self.pools:
            pool.close()


class Progress:
    """Show how far a run is: a ``\\r`` bar on a terminal, a line every 2 s otherwise."""

    WIDTH = 30

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self._stream = stream
        self._label = label
        self._total = total
        self._tty = stream.isatty()
        self.done = 0
        self._shown = -1
        self._finished = gevent.event.Event()

    @contextmanager
    def shown(self) -> Iterator[Progress]:
        """Show progress while the block runs."""
        painter = gevent.spawn(self._paint)
        try:
            yield self
        finally:
            self._finished.set()
            painter.join()

    def _paint(self) -> None:
        interval = 0.1 if self._tty else 2.0
        while not self._finished.wait(interval):
            self._render()
        self._render()
        if self._tty:
            self._stream.write("\n")
        self._stream.flush()

    def _render(self) -> None:
        done = self.done
        if self._tty:
            filled = round(done / self._total * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self._stream.write(f"\r{self._label:<9} [{bar}] {done}/{self._total}")
        elif done != self._shown:
            self._stream.write(f"{self._label}: {done}/{self._total} requests\n")
        self._shown = done
        self._stream.flush()


@dataclass
class RunResult:
    """What one run measured; latencies are seconds, by the server that answered."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    #: Requests answered by each server, by whether they were sent before the slowdown.
    before: Counter[str] = field(default_factory=Counter)
    after: Counter[str] = field(default_factory=Counter)
    connections: dict[str, tuple[int, int]] = field(default_factory=dict)
    retried: int = 0
    failed: int = 0
    elapsed: float = 0.0


def run_once(
    options: DemoOptions,
    make_pools: Callable[[DemoOptions, dict[str, Address]], Pools],
    progress: Progress,
) -> RunResult:
    """Run the workload once against fresh servers through *make_pools*."""
    fleet = Fleet(options)
    result = RunResult()
    try:
        pools = make_pools(options, {sid: fleet.start(sid) for sid in options.server_ids})
        try:
            with progress.shown():
                _drive(options, pools, fleet, result, progress)
            for sid, service in fleet.services.items():
                result.connections[sid] = (service.connections, service.peak_connections)
        finally:
            pools.close()
    finally:
        fleet.stop()
    return result


def _drive(
    options: DemoOptions, pools: Pools, fleet: Fleet, result: RunResult, progress: Progress
) -> None:
    slowed = False

    def join() -> None:
        pools.add_server(options.joiner_id, fleet.start(options.joiner_id))

    def slow_down() -> None:
        nonlocal slowed
        fleet.slow_down(options.turner_id, options.turns_slow)
        slowed = True

    milestones: list[tuple[float, Callable[[], None]]] = [
        (KILL_AT * options.requests, lambda: fleet.kill(options.victim_id)),
        (JOIN_AT * options.requests, join),
        (SLOW_AT * options.requests, slow_down),
    ]
    # Users think between requests so that the offered load matches --duration.
    think = options.users * options.duration / options.requests
    issued = 0
    finished = gevent.event.Event()

    def attempt(client: int, message: str) -> str:
        with gevent.Timeout(ATTEMPT_TIMEOUT, TimeoutError("no reply in time")):
            return pools.request(client, message)[0]

    def user(number: int) -> None:
        nonlocal issued
        rng = random.Random(f"{options.seed}-user-{number}")
        while True:
            gevent.sleep(rng.expovariate(1 / think))
            if issued >= options.requests:
                return
            client, issued = issued % options.clients, issued + 1
            phase = result.after if slowed else result.before
            started = time.perf_counter()
            try:
                server_id = attempt(client, f"request {issued}")
            except FAILURES:
                result.retried += 1
                try:
                    server_id = attempt(client, f"request {issued} retry")
                except FAILURES:
                    result.failed += 1
                    server_id = ""
            if server_id:
                latency = time.perf_counter() - started
                result.latencies.setdefault(server_id, []).append(latency)
                phase[server_id] += 1
            progress.done += 1
            if progress.done == options.requests:
                finished.set()
            while milestones and progress.done >= milestones[0][0]:
                gevent.spawn(milestones.pop(0)[1])

    started = time.perf_counter()
    users = [gevent.spawn(user, n) for n in range(options.users)]
    for greenlet in users:
        greenlet.link_exception(lambda _: finished.set())
    finished.wait()
    result.elapsed = time.perf_counter() - started
    # The rest are thinking, with nothing left to send; a user that crashed raises here.
    gevent.killall(users)
    gevent.joinall(users, raise_error=True)


def percentile(values: list[float], share: float) -> float:
    """Return the nearest-rank percentile (*share* in 0..1) of non-empty *values*."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _all_latencies(result: RunResult) -> list[float]:
    return [x for xs in result.latencies.values() for x in xs]


def _share(counts: Counter[str], sid: str | None) -> str:
    total = sum(counts.values())
    if sid is None:
        return f"{1 if total else 0:.0%}"
    return f"{counts[sid] / total:.0%}" if total else "-"


def _columns(result: RunResult, sid: str | None) -> str:
    if sid is None:
        latencies = _all_latencies(result)
        held = tuple(sum(c[i] for c in result.connections.values()) for i in (0, 1))
    else:
        latencies = result.latencies.get(sid, [])
        held = result.connections.get(sid, (0, 0))
    conns = f"{held[0]}/{held[1]}"
    shares = f"{_share(result.before, sid):>6} {_share(result.after, sid):>5}"
    if not latencies:
        return f"{conns:>9} {0:>6} {'-':>7} {'-':>7} {shares}"
    mean = 1000 * sum(latencies) / len(latencies)
    p99 = 1000 * percentile(latencies, 0.99)
    return f"{conns:>9} {len(latencies):>6} {mean:>7.1f} {p99:>7.1f} {shares}"


def _notes(options: DemoOptions) -> dict[str, str]:
    notes: dict[str, list[str]] = {}
    for sid, note in (
        (options.victim_id, "killed"),
        (options.slow_id, f"{options.slowdown:g}x slower"),
        (options.joiner_id, "joined later"),
        (options.turner_id, f"{options.turns_slow:g}x slower at {SLOW_AT:.0%}"),
    ):
        notes.setdefault(sid, []).append(note)
    return {sid: ", ".join(texts) for sid, texts in notes.items()}


def format_table(options: DemoOptions, callosum: RunResult, baseline: RunResult) -> str:
    """Lay the two runs out side by side, one row per server, and sum them up."""
    head = f"{'held/peak':>9} {'served':>6} {'mean ms':>7} {'p99 ms':>7} {'before':>6} {'after':>5}"
    width = len(head)
    notes = _notes(options)
    label = 6 + 1 + max(map(len, notes.values()))
    rule = "-" * (label + 3 + width + 3 + width)
    lines = [
        f"{'':<{label}} | {'Callosum':^{width}} | {'random choice':^{width}}",
        f"{'server':<{label}} | {head} | {head}",
        rule,
    ]
    for sid in [*options.server_ids, options.joiner_id]:
        lines.append(
            f"{sid:<6} {notes.get(sid, ''):<{label - 7}} | "
            f"{_columns(callosum, sid)} | {_columns(baseline, sid)}"
        )
    lines.append(rule)
    lines.append(f"{'all':<{label}} | {_columns(callosum, None)} | {_columns(baseline, None)}")
    lines.append("held/peak: connections open at the end / at most (rover probes count)")
    lines.append(
        f"before/after: share of the requests sent before / after {options.turner_id} turned slow"
    )
    for name, result in (("Callosum", callosum), ("random choice", baseline)):
        lines.append(
            f"{name}: {result.retried} retried, {result.failed} failed after a retry, "
            f"{result.elapsed:.1f} s"
        )
    tails, shares = [], []
    for result in (callosum, baseline):
        tails.append(1000 * percentile(_all_latencies(result) or [0.0], 0.99))
        served = sum(map(len, result.latencies.values())) or 1
        shares.append(len(result.latencies.get(options.slow_id, [])) / served)
    lines.append(
        f"Callosum vs random choice: p99 {tails[0]:.1f} vs {tails[1]:.1f} ms; the slow server "
        f"{options.slow_id} served {shares[0]:.0%} vs {shares[1]:.0%} of requests"
    )
    turner = options.turner_id
    lines.append(
        f"After {turner} turned {options.turns_slow:g}x slower it got "
        f"{_share(callosum.after, turner)} of Callosum's requests "
        f"({_share(callosum.before, turner)} before) and {_share(baseline.after, turner)} "
        f"of random choice's ({_share(baseline.before, turner)} before)"
    )
    return "\n".join(line.rstrip() for line in lines)


def run_demo(options: DemoOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run both pools over the same workload and print the table; return 0.

    The table goes to *out* (default stdout), progress to *err* (default stderr).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    out.write(
        f"{options.servers} servers ({options.slow_id} {options.slowdown:g}x slower, "
        f"{options.capacity} requests at once each); {options.clients} clients with "
        f"{options.max_slots} connections each (random choice: {random_per_server(options)} "
        f"per server);\n{options.users} users send "
        f"{options.requests} requests per pool, paced for ~{options.duration:g} s (longer if "
        f"the pools fall behind); "
        f"{options.victim_id} is killed after {KILL_AT:.0%}, {options.joiner_id} joins "
        f"after {JOIN_AT:.0%}, {options.turner_id} turns {options.turns_slow:g}x slower "
        f"after {SLOW_AT:.0%}.\n"
    )
    out.flush()
    results = [
        run_once(options, make, Progress(err, label, options.requests))
        for label, make in (("Callosum", CallosumPools), ("random", RandomPools))
    ]
    out.write(format_table(options, *results) + "\n")
    out.flush()
    return 0
