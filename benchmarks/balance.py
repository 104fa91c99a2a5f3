"""Balancing under open-loop Poisson load: Callosum against other balancers.

Servers of unequal capacity (service times 1:1:2:4 x BASE, WORKERS workers
each, requests beyond that queue) run in child processes; twenty logical
clients (greenlets in this process) send open-loop Poisson load at a fraction
of the total capacity through one balancer at a time: Callosum (default
client and servers; servers with ``weight="auto"`` and aged connections; the
seed's lowest-slot rule, ``rank="slot"``; operator weights set to capacity),
random, round-robin, least-connections and power-of-two-choices on the
client's own outstanding requests, P2C with peak-EWMA (the Finagle/Linkerd
default), and an oracle join-shortest-queue reading the servers' true queue
lengths. Every run gets fresh servers (fresh slots and speed estimates; the
processes are reused) and the same seeded arrivals. Latency counts from the
scheduled arrival, so waiting in the client counts.

Scenarios: (a) steady load at 50/70/90% of capacity; (b) slowdown: at 70%
a fast server turns 3x slower after the steady window, measured in windows
after the change; (c) stall: one of eight equal servers answers every
request after 1 s for 30 s; (d) four equal servers; (e) a sinkhole server
(its handler returns at once after the slot line) among the healthy ones,
under load and with one idle client; and churn: a fast server is killed
and, a second later, a fresh one is added.
"""

from __future__ import annotations

import itertools
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from gevent import subprocess
from gevent.pool import Group

from ._balance_clients import (
    PEAK_EWMA,
    POLICIES,
    Address,
    CallosumBalancer,
    PickingClient,
    Record,
    Variant,
    client_parameters,
    missing_api,
)
from ._balance_server import ACCEPTED, BUSY_NS, CONNS, DONE, IN_SYSTEM, MAX_SERVERS, Stats
from ._harness import RESULTS_DIR, print_table, target

BASE = 0.010  # seconds of work on the fastest server
WORKERS = 4
FACTORS = (1.0, 1.0, 2.0, 4.0)  # service-time multipliers
EQUAL = (2.0,) * 4  # 800 req/s in all, like the others, so the client keeps up
STALL_FLEET = (4.0,) * 8  # eight equal servers of 100 req/s, so the client keeps up
N_CLIENTS = 20
MAX_SLOTS = 8
ROVE_INTERVAL = 0.1
REQ_TIMEOUT = 2.0
SAMPLE_EVERY = 0.05
TARGET_LOAD = 0.7
SLOWED, SLOWDOWN = 0, 3.0  # a fast server turns 3x slower
STALLED, STALL_DELAY = 0, 1.0
KILLED, TWIN = 0, 1  # churn kills a fast server; its twin is the joiner's yardstick
SHARE = 0.75  # the joiner "carries its share" at this fraction of its twin's rate
FULL_ENOUGH = 0.98  # "the client stays full": mean share of slots held under load
SETTLE_RATIO = 1.2  # settled: p99 within this factor of the oracle's in the same window
#: Connection age for Callosum with weight="auto" servers: short enough that
#: the servers' weights reach held connections within a run, long against
#: the roving interval (50 of them; the defaults give 300). Every aged-out
#: connection is refilled from a server the rover picks at random, so at
#: 1.5 s (15 intervals) the refills kept ~20% of the connections on the
#: slowest server and p99 measured 0.94x the oracle's; at 5 s, 0.55-0.73x.
AUTO_MAX_AGE = 5.0
#: The fleet's ``reference_rate`` for weight="auto": the slowest server's
#: capacity, so weights run 1-4 like the operator's. A server's weight stays
#: 1 until it has served 200 requests, and the slowest one serves fewer than
#: that in a run: with the default reference (1000 req/s, 2.5x the fastest
#: server) it ranked as the fleet's fastest all run, held ~30% of the
#: connections, and p99 measured 1.2-1.35x the oracle's (max_age 5 s).
AUTO_REFERENCE = WORKERS / (BASE * max(FACTORS))
#: The balancers whose steady p99 the targets name run this many times per load.
REPEATED = ("callosum", "callosum-auto", "oracle-jsq")
ORACLE = "oracle-jsq"

VARIANTS = {
    "callosum": Variant("one"),
    # The servers' weights need requests to be trusted, then connections
    # must age out to carry them: warm up for that before measuring.
    # The extra warm-up lets the fast servers' estimates be trusted and the
    # rover's offers carry them; s3's estimate is not (see AUTO_REFERENCE).
    "callosum-auto": Variant("auto", {"max_age": AUTO_MAX_AGE}, settle=3.0),
    "callosum-slot": Variant("one", {"rank": "slot"}),
    "callosum-weighted": Variant("capacity"),
}
BALANCERS = (*VARIANTS, *POLICIES)
ROOT = Path(__file__).resolve().parent.parent


def capacity(factors: Iterable[float]) -> float:
    """Requests per second the servers of these service-time multipliers can serve."""
    return sum(WORKERS / (BASE * f) for f in factors)


CAPACITY = capacity(FACTORS)


@dataclass(frozen=True)
class Fleet:
    """The servers of one scenario."""

    name: str
    factors: tuple[float, ...]
    sinkhole: int | None = None  # this server's handler returns at once
    spare: bool = False  # one more fast server, added to the balancers at "add"

    @property
    def healthy(self) -> list[float]:
        return [f for i, f in enumerate(self.factors) if i != self.sinkhole]

    @property
    def capacity(self) -> float:
        return capacity(self.healthy)

    def weight(self, index: int, variant: Variant | None) -> int | str:
        """The server's ``weight=``: operator weights are proportional to capacity."""
        if variant is None or variant.weights == "one":
            return 1
        if variant.weights == "auto":
            return "auto"
        factor = self.factors[index] if index < len(self.factors) else 1.0
        return max(1, round(max(self.healthy) / factor))


UNEQUAL = Fleet("1:1:2:4", FACTORS)
SINKHOLE = Fleet("1:1:2:4 + sinkhole", (*FACTORS, 1.0), sinkhole=len(FACTORS))


@dataclass(frozen=True)
class Plan:
    """One run: fleet, load, and events at offsets (seconds) after the steady window."""

    kind: str
    fleet: Fleet
    load: float
    events: tuple[tuple[float, str], ...] = ()
    post: float = 0.0  # seconds of load after the steady window
    measure: bool = True  # False: no steady window, the events follow the warm-up


@dataclass(frozen=True)
class Mode:
    warm: float  # seconds of load before the steady window
    settle: bool  # add each Callosum variant's own extra warm-up
    measure: float  # seconds of the steady window
    steady: tuple[tuple[float, tuple[str, ...]], ...]  # loads and who runs steady-only there
    repeats: int  # runs per load of the REPEATED balancers (slowdown runs count at 70%)
    slowdown: tuple[str, ...]  # their 70% steady rows come from these runs' first window
    windows: tuple[float, float, float]  # ends of the windows after the slowdown (s)
    roll: tuple[float, float]  # rolling p99 window and step, for settling
    stall: tuple[str, ...]
    stall_s: float
    stall_after: float
    equal: tuple[str, ...]
    equal_repeats: int  # runs of callosum and callosum-slot on equal servers
    sinkhole: tuple[str, ...]
    idle_s: float  # the idle client's time against the fleet with a sinkhole
    churn: tuple[str, ...]
    pre: float  # churn: seconds before the kill
    gap: float  # churn: seconds between kill and add
    after: float  # churn: seconds after the add


SLOWDOWN_SET = (
    "callosum",
    "callosum-auto",
    "callosum-slot",
    "callosum-weighted",
    PEAK_EWMA,
    ORACLE,
)
FULL = Mode(
    warm=1.0,
    settle=True,
    measure=3.0,
    steady=(
        (0.5, BALANCERS),
        (TARGET_LOAD, ("random", "round-robin", "least-conn", "p2c")),
        # Random and round-robin cannot keep up above about 36% load: their
        # rows would say "timeout" and their timed-out requests lengthen the run.
        (0.9, tuple(b for b in BALANCERS if b not in ("random", "round-robin"))),
    ),
    repeats=2,
    slowdown=SLOWDOWN_SET,
    windows=(10.0, 30.0, 35.0),
    roll=(5.0, 1.0),
    stall=("callosum", PEAK_EWMA, ORACLE),
    stall_s=30.0,
    stall_after=1.0,
    equal=("callosum", "callosum-slot", "callosum-auto", ORACLE),
    equal_repeats=2,
    sinkhole=("callosum", "callosum-slot", PEAK_EWMA),
    idle_s=10.0,
    churn=("callosum", ORACLE),
    pre=0.5,
    gap=1.0,
    after=2.5,
)
# The smoke run: every scenario once, a second or two each, with the
# balancers that exercise distinct code; too short for the figures to mean much.
QUICK = Mode(
    warm=0.25,
    settle=False,
    measure=0.5,
    steady=((TARGET_LOAD, ("callosum-auto", "callosum-slot", PEAK_EWMA)),),
    repeats=1,
    slowdown=("callosum", ORACLE),
    windows=(0.3, 0.6, 1.0),
    roll=(0.4, 0.2),
    stall=("callosum",),
    stall_s=1.05,
    stall_after=0.1,
    equal=("callosum", "callosum-slot"),
    equal_repeats=1,
    sinkhole=("callosum",),
    idle_s=0.5,
    churn=("callosum",),
    pre=0.15,
    gap=0.25,
    after=0.4,
)


class RequestTimeout(Exception):
    """A request got no reply within REQ_TIMEOUT."""


class Backends:
    """The server processes, started once and given a fresh server for every run."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="balance-")
        self.path = str(Path(self.tmp) / "stats")
        self.stats = Stats(self.path, create=True)
        self.procs: list[Any] = []

    def ensure(self, count: int) -> None:
        """Have at least ``count`` server processes."""
        while len(self.procs) < count:
            args = [self.path, len(self.procs), BASE, WORKERS]
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks._balance_server", *map(str, args)],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )

    def ask(self, index: int, *command: object) -> str:
        proc = self.procs[index]
        proc.stdin.write(" ".join(map(str, command)).encode() + b"\n")
        proc.stdin.flush()
        reply = proc.stdout.readline().decode().strip()
        if not reply or reply.startswith("error"):
            raise RuntimeError(f"balance server {index}: {command} -> {reply or 'no reply'}")
        return str(reply)

    def start(self, index: int, factor: float, weight: int | str, sinkhole: bool) -> Address:
        self.ensure(index + 1)
        mode = "sinkhole" if sinkhole else "serve"
        extra = (AUTO_REFERENCE,) if weight == "auto" else ()
        return ("127.0.0.1", int(self.ask(index, "start", factor, weight, mode, *extra)))

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.stats.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


Balancer = CallosumBalancer | PickingClient


def make_balancers(
    name: str, stats: Stats, servers: dict[int, Address], max_slots: int
) -> list[Balancer]:
    variant = VARIANTS.get(name)
    if variant is not None:
        return [
            CallosumBalancer(servers, max_slots, ROVE_INTERVAL, variant.client)
            for _ in range(N_CLIENTS)
        ]

    def queue_len(sid: int) -> int:
        return stats.get(sid, IN_SYSTEM)

    return [PickingClient(name, servers, queue_len) for _ in range(N_CLIENTS)]


def wait_filled(balancers: Sequence[Balancer], timeout: float) -> None:
    """Let Callosum clients fill their slots before the load starts (a sinkhole may
    keep them from it: then start anyway)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if all(b.fill is None or b.fill >= 1.0 for b in balancers):
            return
        gevent.sleep(0.02)


def issue(balancer: Balancer, rec: Record) -> None:
    try:
        with gevent.Timeout(REQ_TIMEOUT, RequestTimeout):
            balancer.request(rec)
        rec.latency = time.perf_counter() - rec.t
    except Exception as exc:
        rec.error = type(exc).__name__


def generate(
    balancer: Balancer,
    arrivals: random.Random,
    rate: float,
    until: float,
    records: list[Record],
    group: Group,
) -> None:
    """Open loop: start a request at each Poisson arrival, never wait for one."""
    t = time.perf_counter()
    while (t := t + arrivals.expovariate(rate)) < until:
        delay = t - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)
        rec = Record(t)
        records.append(rec)
        group.spawn(issue, balancer, rec)


Sample = tuple[float, list[list[int]], list[float]]  # time, server counters, client fills


def sample(
    stats: Stats, n_servers: int, balancers: Sequence[Balancer], samples: list[Sample]
) -> None:
    while True:
        fills = [b.fill for b in balancers]
        samples.append(
            (
                time.perf_counter(),
                [stats.row(i) for i in range(n_servers)],
                [f for f in fills if f is not None],
            )
        )
        gevent.sleep(SAMPLE_EVERY)


@dataclass
class RunData:
    """What one run measured, before analysis."""

    name: str
    plan: Plan
    records: list[Record]
    samples: list[Sample]
    marks: dict[str, float]  # perf_counter times: start, m0, m1, then the events, end
    in_flight_at_kill: int
    cpu: float  # this process's CPU seconds per wall second
    fill_wait: float  # seconds the clients took to fill before the load started


def run_one(
    backends: Backends, name: str, plan: Plan, mode: Mode, max_slots: int = MAX_SLOTS
) -> RunData:
    fleet = plan.fleet
    variant = VARIANTS.get(name)
    n = len(fleet.factors)
    used = n + fleet.spare
    balancers: list[Balancer] = []
    try:
        backends.ensure(used)
        servers = {
            i: backends.start(i, f, fleet.weight(i, variant), i == fleet.sinkhole)
            for i, f in enumerate(fleet.factors)
        }
        spare = backends.start(n, 1.0, fleet.weight(n, variant), False) if fleet.spare else None
        balancers = make_balancers(name, backends.stats, servers, max_slots)
        filling = time.perf_counter()
        wait_filled(balancers, 1.5 if fleet.sinkhole is None else 0.5)
        fill_wait = time.perf_counter() - filling
        records: list[Record] = []
        samples: list[Sample] = []
        group = Group()
        marks = {"start": time.perf_counter()}
        cpu0 = time.process_time()
        measure = mode.measure if plan.measure else 0.0
        warm = mode.warm + (variant.settle if variant and mode.settle else 0.0)
        until = marks["start"] + warm + measure + plan.post
        rate = plan.load * fleet.capacity / N_CLIENTS
        gens = [  # seeded, so every balancer gets the same arrivals
            gevent.spawn(generate, b, random.Random(i), rate, until, records, group)
            for i, b in enumerate(balancers)
        ]
        sampler = gevent.spawn(sample, backends.stats, used, balancers, samples)
        gevent.sleep(warm)
        marks["m0"] = time.perf_counter()
        gevent.sleep(measure)
        marks["m1"] = time.perf_counter()
        in_flight = 0
        for offset, event in plan.events:
            gevent.sleep(max(0.0, marks["m1"] + offset - time.perf_counter()))
            if event == "slow":
                backends.ask(SLOWED, "factor", fleet.factors[SLOWED] * SLOWDOWN)
            elif event == "stall":
                backends.ask(STALLED, "stall", STALL_DELAY)
            elif event == "unstall":
                backends.ask(STALLED, "stall", 0)
            elif event == "kill":
                in_flight = backends.stats.get(KILLED, IN_SYSTEM)
                backends.ask(KILLED, "stop")
                for b in balancers:
                    b.drop_server(KILLED)
            elif event == "add" and spare is not None:
                for b in balancers:
                    b.add_server(n, spare)
            marks[event] = time.perf_counter()
        gevent.joinall(gens)
        marks["end"] = time.perf_counter()
        cpu = (time.process_time() - cpu0) / (marks["end"] - marks["start"])
        group.join(timeout=REQ_TIMEOUT + 1)
        sampler.kill()
        return RunData(name, plan, records, samples, marks, in_flight, cpu, fill_wait)
    finally:
        for b in balancers:
            b.close()
        for i in range(used):
            backends.ask(i, "stop")


# -- analysis -------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)] if sorted_values else 0.0


def latencies(records: Sequence[Record], lo: float, hi: float) -> tuple[list[float], int]:
    """Sorted latencies of requests arriving in [lo, hi); failures count as infinite."""
    window = [r for r in records if lo <= r.t < hi]
    values = sorted(math.inf if r.latency is None else r.latency for r in window)
    return values, sum(r.latency is None for r in window)


def p99_ms(records: Sequence[Record], lo: float, hi: float) -> float:
    return percentile(latencies(records, lo, hi)[0], 0.99) * 1000


def nearest(run: RunData, t: float) -> Sample:
    return min(run.samples, key=lambda s: abs(s[0] - t))


def delta(run: RunData, lo: float, hi: float, field: int) -> tuple[list[int], float]:
    """Per-server change of a counter between the samples nearest ``lo`` and ``hi``,
    and the seconds between those samples."""
    t0, first, _ = nearest(run, lo)
    t1, last, _ = nearest(run, hi)
    return [b[field] - a[field] for a, b in zip(first, last, strict=True)], t1 - t0


def shares(run: RunData, lo: float, hi: float) -> list[float]:
    done = delta(run, lo, hi, DONE)[0][: len(run.plan.fleet.factors)]
    return [d / max(1, sum(done)) for d in done]


def fills(run: RunData, lo: float, hi: float) -> tuple[float, float] | None:
    """Mean and least share of slots the Callosum clients held in [lo, hi)."""
    seen = [f for t, _, fs in run.samples if lo <= t < hi for f in fs]
    return (statistics.fmean(seen), min(seen)) if seen else None


def steady(run: RunData) -> dict[str, Any]:
    lo, hi = run.marks["m0"], run.marks["m1"]
    values, failed = latencies(run.records, lo, hi)
    n = len(run.plan.fleet.factors)
    busy, span = delta(run, lo, hi, BUSY_NS)
    window = [s[1] for s in run.samples if lo <= s[0] < hi]
    ms = {q: percentile(values, q) * 1000 for q in (0.5, 0.99, 0.999)}
    return {
        "requests": len(values),
        "failed": failed,
        "p50_ms": ms[0.5],
        "p99_ms": ms[0.99],
        "p999_ms": ms[0.999],
        "utilisation": [b / (WORKERS * span * 1e9) for b in busy[:n]],
        "share": shares(run, lo, hi),
        "mean_conns": [sum(rows[i][CONNS] for rows in window) / len(window) for i in range(n)],
        "client_cpu": run.cpu,
        "fill_wait_s": run.fill_wait,
        "fill_mean": None if (fill := fills(run, lo, hi)) is None else fill[0],
    }


def rolling_p99(run: RunData, since: float, roll: tuple[float, float]) -> list[float]:
    """p99 (ms) in windows of ``roll[0]`` s every ``roll[1]`` s from ``since`` to the end."""
    length, step = roll
    out = []
    k = 0
    while since + k * step + length <= run.marks["end"] + 1e-9:
        lo = since + k * step
        out.append(p99_ms(run.records, lo, lo + length))
        k += 1
    return out


def settle_time(ratios: Sequence[float], roll: tuple[float, float]) -> float | None:
    """Seconds after the change to the end of the first rolling window from which on
    every window's p99 is within SETTLE_RATIO of the oracle's; None if never."""
    k = len(ratios)
    while k > 0 and ratios[k - 1] <= SETTLE_RATIO:
        k -= 1
    return None if k == len(ratios) else k * roll[1] + roll[0]


def slowdown(run: RunData, oracle: RunData | None, mode: Mode) -> dict[str, Any]:
    change = run.marks["slow"]
    edges = (0.0, *mode.windows)
    rows: dict[str, Any] = {
        "p99_before_ms": p99_ms(run.records, run.marks["m0"], run.marks["m1"]),
        "windows_s": [[a, b] for a, b in itertools.pairwise(edges)],
        "p99_ms": [
            p99_ms(run.records, change + a, change + b) for a, b in itertools.pairwise(edges)
        ],
        "p99_from_10s_ms": p99_ms(run.records, change + edges[1], change + edges[-1]),
        "slowed_share_before": shares(run, run.marks["m0"], run.marks["m1"])[SLOWED],
        "slowed_share_after": shares(run, change + edges[1], run.marks["end"])[SLOWED],
        "rolling_p99_ms": rolling_p99(run, change, mode.roll),
        "roll_s": list(mode.roll),
    }
    if oracle is not None:
        ochange = oracle.marks["slow"]
        base = [
            p99_ms(oracle.records, ochange + a, ochange + b) for a, b in itertools.pairwise(edges)
        ]
        rows["vs_oracle"] = [x / y for x, y in zip(rows["p99_ms"], base, strict=True)]
        rows["from_10s_vs_oracle"] = rows["p99_from_10s_ms"] / p99_ms(
            oracle.records, ochange + edges[1], ochange + edges[-1]
        )
        mine, theirs = rows["rolling_p99_ms"], rolling_p99(oracle, ochange, mode.roll)
        ratios = [x / y for x, y in zip(mine, theirs, strict=False)]
        rows["rolling_vs_oracle"] = ratios
        rows["settled_s"] = settle_time(ratios, mode.roll)
    return rows


def stall(run: RunData) -> dict[str, Any]:
    lo, hi = run.marks["stall"], run.marks["unstall"]
    window = [r for r in run.records if lo <= r.t < hi]
    slow = [r for r in window if r.latency is None or r.latency > STALL_DELAY]
    values = latencies(run.records, lo, hi)[0]
    return {
        "requests": len(window),
        "slower_than_1s": len(slow),
        "slow_share": len(slow) / max(1, len(window)),
        "failed": sum(r.latency is None for r in window),
        "p99_ms": percentile(values, 0.99) * 1000,
        "p50_ms": percentile(values, 0.5) * 1000,
        "stalled_share": sum(r.sid == STALLED for r in window) / max(1, len(window)),
    }


def sinkhole(run: RunData) -> dict[str, Any]:
    hole = run.plan.fleet.sinkhole
    failed = [r for r in run.records if r.error is not None]
    on_hole = [r for r in failed if r.sid == hole]
    accepted, span = delta(run, run.marks["start"], run.marks["end"], ACCEPTED)
    fill = fills(run, run.marks["start"], run.marks["end"])
    return {
        "requests": len(run.records),
        "failed": len(failed),
        "failed_on_sinkhole": len(on_hole),
        "failed_other": len(failed) - len(on_hole),
        "errors": sorted({r.error for r in failed if r.error}),
        "fill_mean": None if fill is None else fill[0],
        "fill_min": None if fill is None else fill[1],
        "sinkhole_accepts_per_client_10s": None
        if hole is None or not span
        else accepted[hole] * 10 / span / N_CLIENTS,
        "p99_ms": p99_ms(run.records, run.marks["m0"], run.marks["m1"]),
        "client_cpu": run.cpu,
    }


def idle_rover(backends: Backends, seconds: float) -> dict[str, Any]:
    """One idle client, its rover and the sinkhole fleet: what does roving cost?"""
    fleet = SINKHOLE
    servers = {i: backends.start(i, f, 1, i == fleet.sinkhole) for i, f in enumerate(fleet.factors)}
    balancer = CallosumBalancer(servers, 10, ROVE_INTERVAL)
    seen: list[float] = []
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        deadline = t0 + seconds
        while (now := time.perf_counter()) < deadline:
            gevent.sleep(min(0.1, deadline - now))
            seen.append(balancer.client.slot_count / balancer.client.max_slots)
        wall = time.perf_counter() - t0
        cpu = (time.process_time() - cpu0) / wall
        attempts = backends.stats.get(len(FACTORS), ACCEPTED)
        return {
            "seconds": wall,
            "cpu": cpu,
            "sinkhole_attempts": attempts,
            "sinkhole_attempts_per_10s": attempts * 10 / wall,
            "rover_attempts": balancer.rover.stats()["attempts"],
            "fill_mean": statistics.fmean(seen) if seen else None,
            "fill_end": seen[-1] if seen else None,
        }
    finally:
        balancer.close()
        for i in servers:
            backends.ask(i, "stop")


def join_time(run: RunData) -> float | None:
    """Seconds from the add until the joiner did SHARE of its twin's work in one rove interval."""
    joiner = len(run.plan.fleet.factors)
    step = round(ROVE_INTERVAL / SAMPLE_EVERY)
    s = run.samples
    for k in range(step, len(s)):
        if s[k - step][0] < run.marks["add"]:
            continue
        joined = s[k][1][joiner][DONE] - s[k - step][1][joiner][DONE]
        twin = s[k][1][TWIN][DONE] - s[k - step][1][TWIN][DONE]
        if twin and joined >= SHARE * twin:
            return s[k][0] - run.marks["add"]
    return None


def churn(run: RunData) -> dict[str, Any]:
    kill = run.marks["kill"]
    joiner = len(run.plan.fleet.factors)
    after = [r for r in run.records if r.t >= run.marks["m1"]]
    failed = [r for r in after if r.error is not None]
    in_flight = [r for r in failed if r.sid == KILLED and 0 < r.sent < kill]
    joined = join_time(run)
    late = (run.marks["add"] + run.marks["end"]) / 2
    done = delta(run, late, run.marks["end"], DONE)[0]
    return {
        "requests": len(after),
        "failed": len(failed),
        "in_flight_at_kill": run.in_flight_at_kill,
        "failed_in_flight": len(in_flight),
        "failed_other": len(failed) - len(in_flight),
        "errors": sorted({r.error for r in failed if r.error}),
        "join_s": joined,
        "join_intervals": None if joined is None else joined / ROVE_INTERVAL,
        "late_joiner_vs_twin": done[joiner] / max(1, done[TWIN]),
    }


def series(run: RunData) -> dict[str, Any]:
    """Per-server completion rate and connection count over time, for the charts."""
    t0 = run.marks["start"]
    times, rates, conns = [], [], []
    for (ta, a, _), (tb, b, _) in itertools.pairwise(run.samples):
        times.append(round(tb - t0, 3))
        rates.append([round((y[DONE] - x[DONE]) / (tb - ta)) for x, y in zip(a, b, strict=True)])
        conns.append([y[CONNS] for y in b])
    marks = {k: round(v - t0, 3) for k, v in run.marks.items() if k != "start"}
    return {"t": times, "rate": rates, "conns": conns, "marks": marks}


# -- tables ---------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return "timeout" if math.isinf(value) else f"{value:.{digits}f}"


def fmt_x(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def print_steady(load: float, rows: dict[str, dict[str, Any]], note: str = "") -> None:
    print_table(
        f"load {load:.0%} of capacity ({load * CAPACITY:.0f} req/s), steady window{note}",
        [
            "balancer",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "failed/req",
            "util % s0 s1 s2 s3",
            "share % s0 s1 s2 s3",
            "conns s0 s1 s2 s3",
            "client cpu",
        ],
        [
            [
                name,
                fmt(r["p50_ms"]),
                fmt(r["p99_ms"]),
                fmt(r["p999_ms"]),
                f"{r['failed']}/{r['requests']}",
                " ".join(f"{u * 100:.0f}" for u in r["utilisation"]),
                " ".join(f"{s * 100:.0f}" for s in r["share"]),
                " ".join(f"{c:.0f}" for c in r["mean_conns"]),
                f"{r['client_cpu']:.0%}",
            ]
            for name, r in rows.items()
        ],
    )


def print_repeats(title: str, p99s: dict[str, list[float]]) -> None:
    print_table(
        title,
        ["balancer", "median", "runs"],
        [
            [name, fmt(statistics.median(v)), " ".join(fmt(x) for x in v)]
            for name, v in p99s.items()
        ],
    )


def print_slowdown(rows: dict[str, dict[str, Any]], mode: Mode) -> None:
    edges = (0.0, *mode.windows)
    spans = [f"{a:g}-{b:g} s" for a, b in itertools.pairwise(edges)]
    print_table(
        f"slowdown at {TARGET_LOAD:.0%}: server {SLOWED} turns {SLOWDOWN:g}x slower after the "
        f"steady window; p99 ms in windows after the change (x the oracle's in the same window)",
        [
            "balancer",
            "before",
            *spans,
            f"{edges[1]:g} s on",
            f"settled (rolling {mode.roll[0]:g} s p99 <= {SETTLE_RATIO:g}x oracle's)",
            f"s{SLOWED} share before/after",
        ],
        [
            [
                name,
                fmt(r["p99_before_ms"]),
                *(
                    f"{fmt(p)} ({fmt_x(x)})"
                    for p, x in zip(r["p99_ms"], r.get("vs_oracle", [None] * 3), strict=True)
                ),
                f"{fmt(r['p99_from_10s_ms'])} ({fmt_x(r.get('from_10s_vs_oracle'))})",
                "n/a"
                if "settled_s" not in r
                else "never"
                if r["settled_s"] is None
                else f"after {r['settled_s']:.1f} s",
                f"{r['slowed_share_before']:.0%} / {r['slowed_share_after']:.0%}",
            ]
            for name, r in rows.items()
        ],
    )


def print_stall(rows: dict[str, dict[str, Any]], mode: Mode) -> None:
    print_table(
        f"stall at {TARGET_LOAD:.0%}: 1 of {len(STALL_FLEET)} equal servers answers every "
        f"request after {STALL_DELAY:g} s for {mode.stall_s:g} s (requests arriving meanwhile)",
        ["balancer", f"slower than {STALL_DELAY:g} s", "p50 ms", "p99 ms", "sent to it", "failed"],
        [
            [
                name,
                f"{r['slow_share']:.2%} ({r['slower_than_1s']}/{r['requests']})",
                fmt(r["p50_ms"]),
                fmt(r["p99_ms"]),
                f"{r['stalled_share']:.2%}",
                r["failed"],
            ]
            for name, r in rows.items()
        ],
    )


def print_sinkhole(rows: dict[str, dict[str, Any]], idle: dict[str, Any] | None) -> None:
    print_table(
        f"sinkhole at {TARGET_LOAD:.0%} of the healthy servers' capacity: server "
        f"{SINKHOLE.sinkhole} closes every connection right after the slot line",
        [
            "balancer",
            "failed/req",
            "on sinkhole",
            "other",
            "client fill mean/min",
            "connections to it per client /10 s",
            "p99 ms",
            "client cpu",
        ],
        [
            [
                name,
                f"{r['failed']}/{r['requests']}",
                r["failed_on_sinkhole"],
                r["failed_other"],
                "-" if r["fill_mean"] is None else f"{r['fill_mean']:.1%} / {r['fill_min']:.0%}",
                fmt(r["sinkhole_accepts_per_client_10s"], 0),
                fmt(r["p99_ms"]),
                f"{r['client_cpu']:.0%}",
            ]
            for name, r in rows.items()
        ],
    )
    if idle is not None:
        print(
            f"one idle client (max_slots=10, rove every {ROVE_INTERVAL * 1000:.0f} ms) for "
            f"{idle['seconds']:.1f} s: {idle['sinkhole_attempts']} connections to the sinkhole "
            f"({idle['sinkhole_attempts_per_10s']:.0f} per 10 s), {idle['rover_attempts']} rover "
            f"attempts in all, CPU {idle['cpu']:.1%}, fill {fmt(idle['fill_mean'], 2)} mean, "
            f"{fmt(idle['fill_end'], 2)} at the end"
        )


def print_churn(load: float, rows: dict[str, dict[str, Any]]) -> None:
    print_table(
        f"churn at {load:.0%}: server {KILLED} killed, fresh server {len(FACTORS)} added later",
        [
            "balancer",
            "failed/req",
            "in flight at kill",
            "failed in flight",
            "failed other",
            "joiner at share after",
            "joiner/twin, late",
        ],
        [
            [
                name,
                f"{r['failed']}/{r['requests']}",
                r["in_flight_at_kill"],
                r["failed_in_flight"],
                r["failed_other"],
                "never"
                if r["join_s"] is None
                else f"{r['join_s'] * 1000:.0f} ms ({r['join_intervals']:.1f} intervals)",
                f"{r['late_joiner_vs_twin']:.2f}",
            ]
            for name, r in rows.items()
        ],
    )


# -- targets --------------------------------------------------------------


def not_measured(description: str, why: str) -> dict[str, Any]:
    return target(description, False, f"nothing ({why})")


def evaluate(results: dict[str, Any], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """The issue's targets, each MET or MISSED with the figure it was judged on."""
    targets = []

    def why(ran: Iterable[str], *names: str) -> str:
        gone = [f"{n} ({skipped[n]})" if n in skipped else n for n in names if n not in ran]
        return "no run of " + ", ".join(gone)

    medians = {
        load: {name: statistics.median(v) for name, v in p99s.items()}
        for load, p99s in results["p99_repeats"].items()
    }
    slow_share = (WORKERS / (BASE * FACTORS[-1])) / CAPACITY
    for key, bound in (("0.50", 1.0), ("0.70", 1.0), ("0.90", 1.1)):
        text = (
            f"default Callosum p99 <= {bound:g}x the oracle's at {float(key):.0%} (median of runs)"
        )
        p99 = medians.get(key, {})
        if {"callosum", ORACLE} <= p99.keys():
            ratio = p99["callosum"] / p99[ORACLE]
            targets.append(
                target(
                    text,
                    ratio <= bound,
                    f"{fmt(p99['callosum'])} ms vs {fmt(p99[ORACLE])} ms = {ratio:.2f}x",
                )
            )
        else:
            targets.append(not_measured(text, why(p99, "callosum", ORACLE)))
        row = results["steady"].get(key, {}).get("callosum")
        text = (
            f"default Callosum: the slowest server serves <= its capacity share at {float(key):.0%}"
        )
        if row is None:
            targets.append(not_measured(text, why((), "callosum")))
        else:
            share = row["share"][-1]
            targets.append(target(text, share <= slow_share, f"{share:.1%} vs {slow_share:.1%}"))
    text = (
        f"Callosum with weight='auto' servers and max_age={AUTO_MAX_AGE:g} s: "
        "p99 <= 0.8x the oracle's at 70%"
    )
    p99 = medians.get("0.70", {})
    if {"callosum-auto", ORACLE} <= p99.keys():
        ratio = p99["callosum-auto"] / p99[ORACLE]
        targets.append(
            target(
                text,
                ratio <= 0.8,
                f"{fmt(p99['callosum-auto'])} ms vs {fmt(p99[ORACLE])} ms = {ratio:.2f}x",
            )
        )
    else:
        targets.append(not_measured(text, why(p99, "callosum-auto", ORACLE)))
    text = "operator-weighted Callosum p99 <= the oracle's at 70%"
    if {"callosum-weighted", ORACLE} <= p99.keys():
        targets.append(
            target(
                text,
                p99["callosum-weighted"] <= p99[ORACLE],
                f"{fmt(p99['callosum-weighted'])} ms vs {fmt(p99[ORACLE])} ms",
            )
        )
    slow = results["slowdown"].get("callosum", {})
    text = (
        f"slowdown: default Callosum p99 from {results['config']['slowdown_windows_s'][0]:g} s "
        f"after the change <= {SETTLE_RATIO:g}x the oracle's in the same window"
    )
    if "from_10s_vs_oracle" in slow:
        ratio = slow["from_10s_vs_oracle"]
        settled = slow["settled_s"]
        targets.append(
            target(
                text,
                ratio <= SETTLE_RATIO,
                f"{fmt(slow['p99_from_10s_ms'])} ms = {ratio:.2f}x; settled "
                + ("never" if settled is None else f"after {settled:.1f} s"),
            )
        )
    else:
        targets.append(not_measured(text, why(results["slowdown"], "callosum", ORACLE)))
    stalls = results["stall"]
    text = f"stall: share of requests slower than {STALL_DELAY:g} s <= P2C+peak-EWMA's"
    if {"callosum", PEAK_EWMA} <= stalls.keys():
        ours, theirs = stalls["callosum"]["slow_share"], stalls[PEAK_EWMA]["slow_share"]
        targets.append(target(text, ours <= theirs, f"{ours:.2%} vs {theirs:.2%}"))
    else:
        targets.append(not_measured(text, why(stalls, "callosum", PEAK_EWMA)))
    equal = {name: statistics.median(v) for name, v in results["equal"].items()}
    text = "equal servers: default Callosum p99 <= 1.05x rank='slot''s (median of runs)"
    if {"callosum", "callosum-slot"} <= equal.keys():
        ratio = equal["callosum"] / equal["callosum-slot"]
        targets.append(
            target(
                text,
                ratio <= 1.05,
                f"{fmt(equal['callosum'])} ms vs {fmt(equal['callosum-slot'])} ms = {ratio:.2f}x",
            )
        )
    else:
        targets.append(not_measured(text, why(equal, "callosum", "callosum-slot")))
    hole = results["sinkhole"].get("callosum")
    texts = (
        "sinkhole: no request fails except those sent to the sinkhole",
        f"sinkhole: the clients stay full (mean fill >= {FULL_ENOUGH:.0%} under load)",
    )
    if hole is None:
        targets += [not_measured(text, why((), "callosum")) for text in texts]
    else:
        targets.append(
            target(
                texts[0],
                hole["failed_other"] == 0,
                f"{hole['failed']} failed of {hole['requests']}: {hole['failed_on_sinkhole']} "
                f"on the sinkhole, {hole['failed_other']} other",
            )
        )
        healthy = results["steady"].get(f"{TARGET_LOAD:.2f}", {}).get("callosum", {})
        targets.append(
            target(
                texts[1],
                hole["fill_mean"] is not None and hole["fill_mean"] >= FULL_ENOUGH,
                f"mean {fmt(hole['fill_mean'], 3)}, least {fmt(hole['fill_min'], 2)} "
                f"(without the sinkhole: mean {fmt(healthy.get('fill_mean'), 3)})",
            )
        )
    idle = results["idle_rover"]
    if idle is not None:
        fill = idle["fill_mean"]
        targets.append(
            target(
                "sinkhole: an idle client's rover uses < 5% CPU and < 100 connections "
                f"to the sinkhole per 10 s, and the client stays full (mean >= {FULL_ENOUGH:.0%})",
                idle["cpu"] < 0.05
                and idle["sinkhole_attempts_per_10s"] < 100
                and fill is not None
                and fill >= FULL_ENOUGH,
                f"{idle['cpu']:.1%} CPU, {idle['sinkhole_attempts_per_10s']:.0f} per 10 s, "
                f"fill {fmt(fill, 3)} mean",
            )
        )
    for name, c in results["churn"].items():
        if name not in VARIANTS:
            continue
        targets.append(
            target(
                f"{name}: after a kill only requests in flight on that server fail",
                c["failed_other"] == 0,
                f"{c['failed']} failed, {c['failed_in_flight']} in flight on it "
                f"(server had {c['in_flight_at_kill']}), {c['failed_other']} other",
            )
        )
        joined = c["join_s"]
        targets.append(
            target(
                f"{name}: joining server carries its share within two roving intervals",
                joined is not None and joined <= 2 * ROVE_INTERVAL,
                "never"
                if joined is None
                else f"{joined * 1000:.0f} ms = {joined / ROVE_INTERVAL:.1f}"
                f" intervals of {ROVE_INTERVAL * 1000:.0f} ms",
            )
        )
    print(
        "  (not measured here: interop with JavaScript peers; tests/test_interop_node.py "
        "checks the wire format against Node.js peers of our own, the original npm "
        "packages being unreachable)"
    )
    return targets


# -- the run --------------------------------------------------------------


@dataclass
class Runner:
    """Runs plans for the balancers this build supports; notes the ones it skips."""

    backends: Backends
    mode: Mode
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, variant in VARIANTS.items():
            gap = missing_api(variant)
            if gap is not None:
                self.skipped[name] = f"this build lacks {gap}"
                print(f"note: {name} skipped: this build lacks {gap}")
        if "rank" not in client_parameters():
            print(
                "note: without rank=, CallosumClient lends by lowest slot: "
                "'callosum' is the seed's rule"
            )

    def runs(self, names: Iterable[str], plan: Plan) -> dict[str, RunData]:
        return {
            name: run_one(self.backends, name, plan, self.mode)
            for name in names
            if name not in self.skipped
        }


def estimate_seconds(mode: Mode) -> float:
    """Roughly how long ``mode`` takes, at half a second of set-up per run."""
    loads = dict(mode.steady)
    loads.setdefault(TARGET_LOAD, ())
    runs: list[tuple[str, float]] = []  # (balancer, seconds of load)
    steady = mode.warm + mode.measure
    runs += [(name, steady + mode.windows[-1]) for name in mode.slowdown]
    for load, names in loads.items():
        runs += [(name, steady) for name in names]
        present = set(names) | (set(mode.slowdown) if load == TARGET_LOAD else set())
        runs += [(n, steady) for n in REPEATED if n in present] * (mode.repeats - 1)
    runs += [(name, mode.warm + mode.stall_s + mode.stall_after) for name in mode.stall]
    runs += [(name, steady) for name in mode.equal]
    runs += [("callosum", steady), ("callosum-slot", steady)] * (mode.equal_repeats - 1)
    runs += [(name, steady) for name in mode.sinkhole]
    runs += [(name, mode.warm + mode.pre + mode.gap + mode.after) for name in mode.churn]
    extra = {name: v.settle if mode.settle else 0.0 for name, v in VARIANTS.items()}
    return sum(0.5 + seconds + extra.get(name, 0.0) for name, seconds in runs) + mode.idle_s


def run(quick: bool) -> dict[str, Any]:
    mode = QUICK if quick else FULL
    print(
        f"{len(FACTORS)} servers, service {BASE * 1000:.0f} ms x {FACTORS}, {WORKERS} workers "
        f"each, capacity {CAPACITY:.0f} req/s; {N_CLIENTS} clients in one process, Callosum "
        f"max_slots={MAX_SLOTS}, rove every {ROVE_INTERVAL * 1000:.0f} ms, operator weights "
        f"{[UNEQUAL.weight(i, VARIANTS['callosum-weighted']) for i in range(len(FACTORS))]}, "
        f"callosum-auto: max_age={AUTO_MAX_AGE:g} s, reference_rate={AUTO_REFERENCE:g}; "
        f"request timeout {REQ_TIMEOUT} s; "
        f"about {estimate_seconds(mode) / 60:.1f} min"
    )
    backends = Backends()
    backends.ensure(MAX_SERVERS)  # all at once: their start-up overlaps
    try:
        return analyse(Runner(backends, mode), mode, quick)
    finally:
        backends.close()


def analyse(runner: Runner, mode: Mode, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "steady": {},
        "p99_repeats": {},
        "slowdown": {},
        "stall": {},
        "equal": {},
        "sinkhole": {},
        "idle_rover": None,
        "churn": {},
        "series": {},
        "skipped": runner.skipped,
    }
    results["config"] = {
        "base_s": BASE,
        "workers": WORKERS,
        "factors": FACTORS,
        "capacity_rps": CAPACITY,
        "clients": N_CLIENTS,
        "max_slots": MAX_SLOTS,
        "rove_interval_s": ROVE_INTERVAL,
        "request_timeout_s": REQ_TIMEOUT,
        "auto_max_age_s": AUTO_MAX_AGE,
        "auto_reference_rate": AUTO_REFERENCE,
        "slowdown_windows_s": [mode.windows[0], mode.windows[-1]],
        "mode": mode.__dict__,
    }
    cdfs: dict[str, dict[str, list[float]]] = {}

    # (b) first: its steady window is also each balancer's first 70% run.
    slowed = runner.runs(
        mode.slowdown,
        Plan("slowdown", UNEQUAL, TARGET_LOAD, ((0.0, "slow"),), mode.windows[-1]),
    )
    oracle = slowed.get(ORACLE)
    for name, data in slowed.items():
        results["slowdown"][name] = slowdown(data, oracle, mode)
        results["series"][f"slowdown {name}"] = series(data)

    # (a) steady loads; the REPEATED balancers run mode.repeats times per load.
    loads = sorted({load for load, _ in mode.steady} | {TARGET_LOAD})
    for load in loads:
        key = f"{load:.2f}"
        names = dict(mode.steady).get(load, ())
        first = {
            **(slowed if load == TARGET_LOAD else {}),
            **runner.runs(names, Plan("steady", UNEQUAL, load)),
        }
        p99s = {name: [steady(d)["p99_ms"]] for name, d in first.items()}
        for _ in range(mode.repeats - 1):
            extra = runner.runs([n for n in REPEATED if n in first], Plan("steady", UNEQUAL, load))
            for name, data in extra.items():
                p99s[name].append(steady(data)["p99_ms"])
        rows = {
            name: steady(d)
            for name, d in sorted(first.items(), key=lambda kv: BALANCERS.index(kv[0]))
        }
        if not rows:
            continue
        print_steady(
            load,
            rows,
            f" ({', '.join(slowed)}: the slowdown runs' window before the change)"
            if load == TARGET_LOAD and slowed
            else "",
        )
        results["steady"][key] = rows
        results["p99_repeats"][key] = p99s
        if mode.repeats > 1:
            print_repeats(f"p99 ms at {load:.0%} over repeated runs (fresh servers, clients)", p99s)
        cdfs[f"{load:.0%} load"] = {
            name: latencies(d.records, d.marks["m0"], d.marks["m1"])[0] for name, d in first.items()
        }
    if results["slowdown"]:
        print_slowdown(results["slowdown"], mode)

    # (c) stall
    stalled = runner.runs(
        mode.stall,
        Plan(
            "stall",
            Fleet("8 equal", STALL_FLEET),
            TARGET_LOAD,
            ((0.0, "stall"), (mode.stall_s, "unstall")),
            mode.stall_s + mode.stall_after,
            measure=False,
        ),
    )
    results["stall"] = {name: stall(d) for name, d in stalled.items()}
    if stalled:
        print_stall(results["stall"], mode)
        cdfs["stall"] = {
            name: latencies(d.records, d.marks["stall"], d.marks["unstall"])[0]
            for name, d in stalled.items()
        }

    # (d) equal servers
    equal: dict[str, list[float]] = {}
    equal_first: dict[str, RunData] = {}
    for repeat in range(mode.equal_repeats):
        names = mode.equal if repeat == 0 else ("callosum", "callosum-slot")
        for name, data in runner.runs(
            names, Plan("equal", Fleet("equal", EQUAL), TARGET_LOAD)
        ).items():
            equal.setdefault(name, []).append(steady(data)["p99_ms"])
            equal_first.setdefault(name, data)
    results["equal"] = equal
    if equal:
        print_repeats(f"four equal servers at {TARGET_LOAD:.0%}: p99 ms", equal)
        cdfs["equal servers"] = {
            name: latencies(d.records, d.marks["m0"], d.marks["m1"])[0]
            for name, d in equal_first.items()
        }

    # (e) sinkhole
    holes = runner.runs(mode.sinkhole, Plan("sinkhole", SINKHOLE, TARGET_LOAD))
    results["sinkhole"] = {name: sinkhole(d) for name, d in holes.items()}
    results["idle_rover"] = idle_rover(runner.backends, mode.idle_s)
    print_sinkhole(results["sinkhole"], results["idle_rover"])

    # churn
    churned = runner.runs(
        mode.churn,
        Plan(
            "churn",
            Fleet("1:1:2:4 + joiner", FACTORS, spare=True),
            TARGET_LOAD,
            ((mode.pre, "kill"), (mode.pre + mode.gap, "add")),
            mode.pre + mode.gap + mode.after,
            measure=False,
        ),
    )
    results["churn"] = {name: churn(d) for name, d in churned.items()}
    if churned:
        print_churn(TARGET_LOAD, results["churn"])
        for name, d in churned.items():
            results["series"][f"churn {name}"] = series(d)

    results["targets"] = evaluate(results, runner.skipped)
    if quick:  # matplotlib's import and drawing alone take ~3 s
        print("charts: not drawn in a quick run")
        results["charts"] = []
    else:
        results["charts"] = draw_charts(RESULTS_DIR, cdfs, results)
    safe: dict[str, Any] = json_safe(results)
    return safe


def json_safe(value: Any) -> Any:
    """Replace infinite latencies (failed requests) with None, which JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def draw_charts(
    directory: Path, cdfs: dict[str, dict[str, list[float]]], results: dict[str, Any]
) -> list[str]:
    try:
        from ._balance_charts import draw
    except ImportError as exc:
        print(f"charts skipped: {exc}")
        return []
    paths = [str(p) for p in draw(directory, cdfs, results)]
    print("charts:", *paths)
    return paths
