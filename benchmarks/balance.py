"""Balancing under open-loop Poisson load: Callosum against other balancers.

Four servers of unequal capacity (service times 1:1:2:4 x BASE, WORKERS
workers each, requests beyond that queue) run in child processes; twenty
logical clients (greenlets in this process) send open-loop Poisson load at a
fraction of the total capacity through one balancer at a time: Callosum
(plain, and with server weights set to capacity), random, round-robin,
least-connections and power-of-two-choices on the client's own outstanding
requests, and an oracle join-shortest-queue reading the servers' true queue
lengths. Every balancer gets fresh servers. Latency counts from the scheduled
arrival, so waiting in the client counts. In the churn run at the target
load a fast server is killed and, a second later, a fresh one is added.
"""

from __future__ import annotations

import itertools
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from gevent.pool import Group

from ._balance_clients import POLICIES, Address, CallosumBalancer, PickingClient, Record
from ._balance_server import BUSY_NS, CONNS, DONE, IN_SYSTEM, PORT, Stats
from ._harness import RESULTS_DIR, print_table, target

BASE = 0.010  # seconds of work on the fastest server
WORKERS = 4
FACTORS = (1, 1, 2, 4)  # service-time multipliers
CAPACITY_WEIGHTS = (4, 4, 2, 1)  # proportional to WORKERS / (BASE * factor)
CAPACITY = sum(WORKERS / (BASE * f) for f in FACTORS)  # requests per second
N_CLIENTS = 20
MAX_SLOTS = 8
ROVE_INTERVAL = 0.1
REQ_TIMEOUT = 2.0
SAMPLE_EVERY = 0.05
KILLED, TWIN, JOINER = 0, 1, len(FACTORS)  # kill a fast server, add a fast one
SHARE = 0.75  # the joiner "carries its share" at this fraction of its twin's rate
TARGET_LOAD = 0.7
CALLOSUMS = ("callosum", "callosum-weighted")
BALANCERS = (*CALLOSUMS, *POLICIES)
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mode:
    loads: tuple[float, ...]
    balancers: tuple[str, ...]
    repeats: int  # runs at TARGET_LOAD of the TARGET_BALANCERS
    sweep: tuple[int, ...]  # other max_slots to try Callosum with at TARGET_LOAD, twice each
    warm: float  # seconds of load before measuring
    measure: float  # seconds of steady measurement
    pre: float  # churn: seconds before the kill
    gap: float  # churn: seconds between kill and add
    after: float  # churn: seconds after the add


FULL = Mode(
    (0.5, 0.7, 0.9), BALANCERS, 3, (4, 16), warm=1.0, measure=4.0, pre=0.5, gap=1.0, after=2.5
)
TARGET_BALANCERS = (*CALLOSUMS, "least-conn", "p2c", "oracle-jsq")
# The smoke run leaves out random and round-robin: they cannot keep up above
# about 36% load, and their timed-out requests would double its length.
QUICK = Mode(
    (TARGET_LOAD,), TARGET_BALANCERS, 1, (), warm=0.4, measure=0.9, pre=0.2, gap=0.3, after=0.5
)


class RequestTimeout(Exception):
    """A request got no reply within REQ_TIMEOUT."""


class Fleet:
    """The server processes of one run and their shared counters."""

    def __init__(self, weighted: bool) -> None:
        self.weighted = weighted
        self.tmp = tempfile.mkdtemp(prefix="balance-")
        self.path = str(Path(self.tmp) / "stats")
        self.stats = Stats(self.path, create=True)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, index: int, factor: int) -> None:
        weight = CAPACITY_WEIGHTS[FACTORS.index(factor)] if self.weighted else 1
        args = [self.path, index, factor, WORKERS, weight, BASE]
        self.procs[index] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._balance_server", *map(str, args)], cwd=ROOT
        )

    def address(self, index: int, timeout: float = 20.0) -> Address:
        deadline = time.perf_counter() + timeout
        while not self.stats.get(index, PORT):
            if self.procs[index].poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"balance server {index} did not start")
            gevent.sleep(0.02)
        return ("127.0.0.1", self.stats.get(index, PORT))

    def kill(self, index: int) -> None:
        self.procs[index].kill()
        self.procs[index].wait()
        # The dead server cannot count its connections and requests down.
        for field in (IN_SYSTEM, CONNS):
            self.stats.add(index, field, -self.stats.get(index, field))

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.stats.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


Balancer = CallosumBalancer | PickingClient


def make_balancers(
    name: str, fleet: Fleet, servers: dict[int, Address], max_slots: int
) -> list[Balancer]:
    if name.startswith("callosum"):
        return [CallosumBalancer(servers, max_slots, ROVE_INTERVAL) for _ in range(N_CLIENTS)]

    def queue_len(sid: int) -> int:
        return fleet.stats.get(sid, IN_SYSTEM)

    return [PickingClient(name, servers, queue_len) for _ in range(N_CLIENTS)]


def wait_filled(balancers: Sequence[Balancer], timeout: float = 10.0) -> None:
    """Let Callosum clients fill their slots before the load starts."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if all(
            b.client.slot_count >= b.client.max_slots
            for b in balancers
            if isinstance(b, CallosumBalancer)
        ):
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


def sample(fleet: Fleet, n_servers: int, samples: list[tuple[float, list[list[int]]]]) -> None:
    while True:
        samples.append((time.perf_counter(), [fleet.stats.row(i) for i in range(n_servers)]))
        gevent.sleep(SAMPLE_EVERY)


@dataclass
class RunData:
    """What one run measured, before analysis."""

    name: str
    load: float
    records: list[Record]
    samples: list[tuple[float, list[list[int]]]]
    marks: dict[str, float]  # perf_counter times: start, m0, m1, kill, add, end
    in_flight_at_kill: int
    cpu: float  # this process's CPU seconds per wall second


def run_one(
    name: str, load: float, mode: Mode, churn: bool = False, max_slots: int = MAX_SLOTS
) -> RunData:
    fleet = Fleet(weighted=name == "callosum-weighted")
    balancers: list[Balancer] = []
    try:
        for i, factor in enumerate(FACTORS):
            fleet.spawn(i, factor)
        if churn:
            fleet.spawn(JOINER, FACTORS[KILLED])
        servers = {i: fleet.address(i) for i in range(len(FACTORS))}
        spare = fleet.address(JOINER) if churn else None
        balancers = make_balancers(name, fleet, servers, max_slots)
        wait_filled(balancers)
        records: list[Record] = []
        samples: list[tuple[float, list[list[int]]]] = []
        group = Group()
        duration = mode.warm + mode.measure + (mode.pre + mode.gap + mode.after) * churn
        marks = {"start": time.perf_counter()}
        cpu0 = time.process_time()
        until = marks["start"] + duration
        rate = load * CAPACITY / N_CLIENTS
        gens = [  # seeded, so every balancer gets the same arrivals
            gevent.spawn(generate, b, random.Random(i), rate, until, records, group)
            for i, b in enumerate(balancers)
        ]
        sampler = gevent.spawn(sample, fleet, len(fleet.procs), samples)
        gevent.sleep(mode.warm)
        marks["m0"] = time.perf_counter()
        gevent.sleep(mode.measure)
        marks["m1"] = time.perf_counter()
        in_flight = 0
        if churn and spare is not None:
            gevent.sleep(mode.pre)
            in_flight = fleet.stats.get(KILLED, IN_SYSTEM)
            fleet.kill(KILLED)
            marks["kill"] = time.perf_counter()
            for b in balancers:
                b.drop_server(KILLED)
            gevent.sleep(mode.gap)
            marks["add"] = time.perf_counter()
            for b in balancers:
                b.add_server(JOINER, spare)
        gevent.joinall(gens)
        marks["end"] = time.perf_counter()
        cpu = (time.process_time() - cpu0) / (marks["end"] - marks["start"])
        group.join(timeout=REQ_TIMEOUT + 1)
        sampler.kill()
        return RunData(name, load, records, samples, marks, in_flight, cpu)
    finally:
        for b in balancers:
            b.close()
        fleet.close()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def latencies(records: Sequence[Record], lo: float, hi: float) -> tuple[list[float], int]:
    """Sorted latencies of requests arriving in [lo, hi); failures count as infinite."""
    window = [r for r in records if lo <= r.t < hi]
    values = sorted(math.inf if r.latency is None else r.latency for r in window)
    return values, sum(r.latency is None for r in window)


def delta(run: RunData, lo: float, hi: float, field: int) -> tuple[list[int], float]:
    """Per-server change of a counter between the samples nearest ``lo`` and ``hi``,
    and the seconds between those samples."""
    t0, first = min(run.samples, key=lambda s: abs(s[0] - lo))
    t1, last = min(run.samples, key=lambda s: abs(s[0] - hi))
    return [b[field] - a[field] for a, b in zip(first, last, strict=True)], t1 - t0


def steady(run: RunData) -> dict[str, Any]:
    lo, hi = run.marks["m0"], run.marks["m1"]
    values, failed = latencies(run.records, lo, hi)
    busy, span = delta(run, lo, hi, BUSY_NS)
    done = delta(run, lo, hi, DONE)[0]
    window = [s[1] for s in run.samples if lo <= s[0] < hi]
    ms = {q: percentile(values, q) * 1000 for q in (0.5, 0.99, 0.999)}
    return {
        "requests": len(values),
        "failed": failed,
        "p50_ms": ms[0.5],
        "p99_ms": ms[0.99],
        "p999_ms": ms[0.999],
        "utilisation": [b / (WORKERS * span * 1e9) for b in busy[: len(FACTORS)]],
        "share": [d / max(1, sum(done)) for d in done[: len(FACTORS)]],
        "mean_conns": [
            sum(rows[i][CONNS] for rows in window) / len(window) for i in range(len(FACTORS))
        ],
        "client_cpu": run.cpu,
    }


def join_time(run: RunData) -> float | None:
    """Seconds from the add until the joiner did SHARE of its twin's work in one rove interval."""
    step = round(ROVE_INTERVAL / SAMPLE_EVERY)
    s = run.samples
    for k in range(step, len(s)):
        if s[k - step][0] < run.marks["add"]:
            continue
        joiner = s[k][1][JOINER][DONE] - s[k - step][1][JOINER][DONE]
        twin = s[k][1][TWIN][DONE] - s[k - step][1][TWIN][DONE]
        if twin and joiner >= SHARE * twin:
            return s[k][0] - run.marks["add"]
    return None


def churn(run: RunData) -> dict[str, Any]:
    kill = run.marks["kill"]
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
        "late_joiner_vs_twin": done[JOINER] / max(1, done[TWIN]),
    }


def series(run: RunData) -> dict[str, Any]:
    """Per-server completion rate and connection count over time, for the charts."""
    t0 = run.marks["start"]
    times, rates, conns = [], [], []
    for (ta, a), (tb, b) in itertools.pairwise(run.samples):
        times.append(round(tb - t0, 3))
        rates.append([round((y[DONE] - x[DONE]) / (tb - ta)) for x, y in zip(a, b, strict=True)])
        conns.append([y[CONNS] for y in b])
    marks = {k: round(v - t0, 3) for k, v in run.marks.items() if k != "start"}
    return {"t": times, "rate": rates, "conns": conns, "marks": marks}


def fmt(value: float) -> str:
    return "timeout" if math.isinf(value) else f"{value:.1f}"


def print_steady(load: float, rows: dict[str, dict[str, Any]]) -> None:
    print_table(
        f"load {load:.0%} of capacity ({load * CAPACITY:.0f} req/s), steady window",
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


def sweep(load: float, mode: Mode, p99s: dict[str, list[float]]) -> dict[str, list[float]]:
    """Callosum's p99 at other ``max_slots``: the pool size is its one free parameter."""
    runs = {f"{name} max_slots={MAX_SLOTS}": p99s[name] for name in CALLOSUMS}
    for slots in mode.sweep:
        for name in CALLOSUMS:
            runs[f"{name} max_slots={slots}"] = [
                steady(run_one(name, load, mode, max_slots=slots))["p99_ms"] for _ in range(2)
            ]
    print_repeats(f"Callosum's p99 ms at {load:.0%} by max_slots", runs)
    return runs


def print_repeats(title: str, p99s: dict[str, list[float]]) -> None:
    print_table(
        title,
        ["balancer", "median", "runs"],
        [
            [name, fmt(statistics.median(v)), " ".join(fmt(x) for x in v)]
            for name, v in p99s.items()
        ],
    )


def print_churn(load: float, rows: dict[str, dict[str, Any]]) -> None:
    print_table(
        f"churn at {load:.0%}: server {KILLED} killed, fresh server {JOINER} added later",
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


def evaluate(p99: dict[str, float], churns: dict[str, dict[str, Any]]) -> list[Any]:
    """The issue's targets, at TARGET_LOAD, on the median p99 over the repeats."""
    targets = []
    if "callosum" in p99 and {"least-conn", "p2c"} <= p99.keys():
        best = min(p99["least-conn"], p99["p2c"])
        targets.append(
            target(
                f"plain Callosum p99 <= best of least-conn and p2c at {TARGET_LOAD:.0%}",
                p99["callosum"] <= best,
                f"{fmt(p99['callosum'])} ms vs {fmt(best)} ms",
            )
        )
    if {"callosum-weighted", "oracle-jsq"} <= p99.keys():
        targets.append(
            target(
                f"weighted Callosum p99 <= oracle JSQ at {TARGET_LOAD:.0%}",
                p99["callosum-weighted"] <= p99["oracle-jsq"],
                f"{fmt(p99['callosum-weighted'])} ms vs {fmt(p99['oracle-jsq'])} ms",
            )
        )
    for name in CALLOSUMS:
        if name not in churns:
            continue
        c = churns[name]
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
    return targets


def run(quick: bool) -> dict[str, Any]:
    mode = QUICK if quick else FULL
    print(
        f"{len(FACTORS)} servers, service {BASE * 1000:.0f} ms x {FACTORS}, {WORKERS} workers "
        f"each, capacity {CAPACITY:.0f} req/s; {N_CLIENTS} clients in one process, Callosum "
        f"max_slots={MAX_SLOTS}, rove every {ROVE_INTERVAL * 1000:.0f} ms, weights "
        f"{CAPACITY_WEIGHTS}; request timeout {REQ_TIMEOUT} s"
    )
    results: dict[str, Any] = {"steady": {}, "churn": {}, "series": {}, "p99_repeats": {}}
    targets: list[Any] = []
    cdfs: dict[float, dict[str, list[float]]] = {}
    for load in mode.loads:
        rows: dict[str, dict[str, Any]] = {}
        churns: dict[str, dict[str, Any]] = {}
        p99s: dict[str, list[float]] = {}
        cdfs[load] = {}
        at_target = load == TARGET_LOAD
        # At the target load the balancers the targets name run again: one
        # Callosum run is one random draw of which client holds which slots.
        for repeat in range(mode.repeats if at_target else 1):
            for name in mode.balancers if repeat == 0 else TARGET_BALANCERS:
                data = run_one(name, load, mode, churn=at_target and repeat == 0)
                row = steady(data)
                p99s.setdefault(name, []).append(row["p99_ms"])
                if repeat:
                    continue
                rows[name] = row
                cdfs[load][name] = latencies(data.records, data.marks["m0"], data.marks["m1"])[0]
                if "kill" in data.marks:
                    churns[name] = churn(data)
                    results["series"][name] = series(data)
        print_steady(load, rows)
        results["steady"][f"{load:.2f}"] = rows
        if at_target:
            print_repeats(f"p99 ms at {load:.0%} over repeated runs (fresh servers, clients)", p99s)
            results["p99_repeats"] = p99s
            print_churn(load, churns)
            results["churn"] = churns
            targets = evaluate({name: statistics.median(v) for name, v in p99s.items()}, churns)
            if mode.sweep:
                results["max_slots_sweep"] = sweep(load, mode, p99s)
    results["targets"] = targets
    if quick:  # matplotlib's import and drawing alone take ~3 s
        print("charts: not drawn in a quick run")
        results["charts"] = []
    else:
        results["charts"] = draw_charts(RESULTS_DIR, cdfs, results["series"])
    results["config"] = {
        "base_s": BASE,
        "workers": WORKERS,
        "factors": FACTORS,
        "capacity_rps": CAPACITY,
        "weights": CAPACITY_WEIGHTS,
        "clients": N_CLIENTS,
        "max_slots": MAX_SLOTS,
        "rove_interval_s": ROVE_INTERVAL,
        "request_timeout_s": REQ_TIMEOUT,
        "mode": mode.__dict__,
    }
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
    directory: Path, cdfs: dict[float, dict[str, list[float]]], runs: dict[str, Any]
) -> list[str]:
    try:
        from ._balance_charts import draw
    except ImportError as exc:
        print(f"charts skipped: {exc}")
        return []
    paths = [str(p) for p in draw(directory, cdfs, runs)]
    print("charts:", *paths)
    return paths
