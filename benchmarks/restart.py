"""Rolling restarts: what a client loses while every backend restarts, one at a time, under load.

Three line-protocol backends (``CallosumServer`` + ``LineService``, 10 ms of
work per request, no limit on concurrency) run in child processes; two
clients with their rovers in this process send open-loop Poisson load. Each
backend in turn is stopped and started again on the same port, then given
time to take traffic back. Stopped how:

- ``drain``: SIGTERM, and the handler marks its requests, so ``stop(10)``
  drains: requests in flight finish, idle connections close between requests;
- ``stop(1), no drain``: today's behaviour: the handler marks nothing, so
  ``stop(timeout=1)`` waits a second, then kills the handlers still running;
- ``kill -9``: SIGKILL.

Every request goes through the line protocol's ``call``, which sends a
request again once when its connection closed before any byte of the reply;
a request counts as "failed without retry" if its first attempt failed, and
"failed with one retry" if the second failed too (the two columns come from
the same run). Latency counts from the scheduled arrival, over the requests
scheduled from the first stop to the end.

Run as ``python -m benchmarks.restart PORT MODE``, it is one backend.
"""

from __future__ import annotations

import random
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.pool
from gevent import subprocess

from callosum_gevent import CallosumClient, CallosumServer, Rover
from callosum_gevent._lineproto import LineService, call

from ._harness import print_table, target

SERVICE = 0.010
BACKENDS = 3
CLIENTS = 2
MAX_SLOTS = 8
RATE = 300.0  # requests per second, about 10% of the fleet's capacity
REQ_TIMEOUT = 5.0
DRAIN_TIMEOUT = 10.0
MODES = ("drain", "stop(1), no drain", "kill -9")
CHILD_MODE = {"drain": "drain", "stop(1), no drain": "stop", "kill -9": "stop"}


@dataclass
class Run:
    """What one rolling restart measured."""

    requests: int = 0
    failed_first: int = 0  # first attempt failed: what a client without retry loses
    failed: int = 0  # failed after the one retry
    retried: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    stops: list[float] = field(default_factory=list)  # seconds in server.stop(), kill -9: 0
    exits: list[float] = field(default_factory=list)  # seconds from signal to exit
    errors: dict[str, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Backend:
    """A child process serving the line protocol on a fixed port."""

    def __init__(self, port: int, mode: str) -> None:
        self.port = port
        self.mode = mode
        self.process: Any = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.restart", str(self.port), self.mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if line != "ready\n":
            raise RuntimeError(f"backend on port {self.port} did not start: {line!r}")

    def stop(self, signum: int) -> tuple[float, float]:
        """Signal the child, wait for its exit; return its seconds in stop() and to exit."""
        began = time.perf_counter()
        self.process.send_signal(signum)
        out, _ = self.process.communicate(timeout=DRAIN_TIMEOUT + 10)
        exited = time.perf_counter() - began
        words = out.split()  # "stopped SECONDS" unless killed
        return (float(words[1]) if words[:1] == ["stopped"] else 0.0), exited


def rolling_restart(mode: str, settle: float, warm: float, seed: int) -> Run:
    """Run load, restart every backend once in ``mode``, and return what was lost."""
    backends = [Backend(free_port(), CHILD_MODE[mode]) for _ in range(BACKENDS)]
    for backend in backends:
        backend.start()
    servers: dict[Any, Any] = {i: ("127.0.0.1", b.port) for i, b in enumerate(backends)}
    clients = [CallosumClient(max_slots=MAX_SLOTS) for _ in range(CLIENTS)]
    rovers = [Rover(c, servers, interval=0.1, backoff_max=0.5) for c in clients]
    run = Run()
    measuring = False
    rng = random.Random(seed)

    def one(client: CallosumClient, scheduled: float, measured: bool) -> None:
        retried = []
        ok = True
        try:
            with gevent.Timeout(REQ_TIMEOUT, TimeoutError("no reply in time")):
                call(client, "x", timeout=REQ_TIMEOUT, on_retry=retried.append)
        except Exception as exc:
            ok = False
            if measured:
                name = type(exc).__name__
                run.errors[name] = run.errors.get(name, 0) + 1
        if not measured:
            return
        run.requests += 1
        run.retried += len(retried)
        run.failed_first += bool(retried) or not ok
        run.failed += not ok
        if ok:
            run.latencies.append(time.perf_counter() - scheduled)

    stopping = gevent.event.Event()

    def load() -> None:
        group = gevent.pool.Group()
        at = time.perf_counter()
        n = 0
        while not stopping.is_set():
            at += rng.expovariate(RATE)
            gevent.sleep(max(0.0, at - time.perf_counter()))
            group.spawn(one, clients[n % CLIENTS], at, measuring)
            n += 1
        group.join(timeout=REQ_TIMEOUT + 1)

    for rover in rovers:
        rover.start()
    loader = gevent.spawn(load)
    try:
        gevent.sleep(warm)
        measuring = True
        for backend in backends:
            stopped, exited = backend.stop(signal.SIGKILL if mode == "kill -9" else signal.SIGTERM)
            run.stops.append(stopped)
            run.exits.append(exited)
            backend.start()
            gevent.sleep(settle)
    finally:
        stopping.set()
        loader.join()
        for rover in rovers:
            rover.stop()
        for client in clients:
            client.close()
        for backend in backends:
            if backend.process.poll() is None:
                backend.stop(signal.SIGTERM)
    return run


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(share * len(ordered)) - 1)] if ordered else float("nan")


def run(quick: bool) -> dict[str, Any]:
    repeats, settle, warm = (1, 0.5, 0.5) if quick else (3, 1.5, 1.0)
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        # Rotate the order, so that drift of a shared machine hits all alike.
        for mode in MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]:
            runs[mode].append(rolling_restart(mode, settle, warm, seed=repeat))
    rows, summary = [], {}
    for mode, done in runs.items():
        latencies = [x for r in done for x in r.latencies]
        figures = {
            "requests": sum(r.requests for r in done),
            "failed_without_retry": sum(r.failed_first for r in done),
            "failed_with_one_retry": sum(r.failed for r in done),
            "sent_again": sum(r.retried for r in done),
            "p50_ms": 1000 * percentile(latencies, 0.5),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "max_ms": 1000 * max(latencies, default=float("nan")),
            "slowest_stop_s": max(s for r in done for s in r.stops),
            "median_stop_s": statistics.median(s for r in done for s in r.stops),
            "median_exit_s": statistics.median(s for r in done for s in r.exits),
            "errors": {k: sum(r.errors.get(k, 0) for r in done) for r in done for k in r.errors},
        }
        summary[mode] = figures
        rows.append(
            [
                mode,
                figures["requests"],
                figures["failed_without_retry"],
                figures["failed_with_one_retry"],
                figures["sent_again"],
                f"{figures['p50_ms']:.1f}",
                f"{figures['p99_ms']:.1f}",
                f"{figures['max_ms']:.0f}",
                f"{figures['median_stop_s']:.3f} / {figures['slowest_stop_s']:.3f}",
                f"{figures['median_exit_s']:.2f}",
            ]
        )
    print_table(
        f"restart: {BACKENDS} backends restarted one at a time under {RATE:.0f} requests/s "
        f"({SERVICE * 1000:.0f} ms each), {CLIENTS} clients x {MAX_SLOTS} connections, "
        f"{repeats} rolling restart(s) per row",
        [
            "stopped by",
            "requests",
            "failed without retry",
            "failed with one retry",
            "sent again",
            "p50 ms",
            "p99 ms",
            "max ms",
            "stop() s median / max",
            "signal to exit s",
        ],
        rows,
    )
    drain = summary["drain"]
    targets = [
        target(
            "drain: no request fails (with one retry when no reply byte came)",
            drain["failed_with_one_retry"] == 0,
            f"{drain['failed_with_one_retry']} of {drain['requests']}",
        ),
        target(
            "drain: fewer first attempts fail than with today's stop(1)",
            drain["failed_without_retry"] < summary["stop(1), no drain"]["failed_without_retry"],
            f"{drain['failed_without_retry']} vs "
            f"{summary['stop(1), no drain']['failed_without_retry']}",
        ),
    ]
    return {
        "backends": BACKENDS,
        "rate": RATE,
        "service_s": SERVICE,
        "repeats": repeats,
        "modes": summary,
        "targets": targets,
    }


def child(port: int, mode: str) -> None:
    """Serve on ``port`` until SIGTERM; with mode ``drain`` requests are marked."""
    service = LineService(f"b{port}", SERVICE)
    server = CallosumServer(("127.0.0.1", port), service, marks_requests=mode == "drain")
    if mode == "drain":
        service.server = server
    server.start()
    print("ready", flush=True)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    began = time.perf_counter()
    server.stop(timeout=DRAIN_TIMEOUT if mode == "drain" else 1.0)
    print(f"stopped {time.perf_counter() - began:.6f}", flush=True)


if __name__ == "__main__":
    child(int(sys.argv[1]), sys.argv[2])
