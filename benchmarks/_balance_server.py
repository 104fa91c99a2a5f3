"""One backend of the balance benchmark, run as a child process.

``python -m benchmarks._balance_server STATS INDEX FACTOR WORKERS WEIGHT BASE``
answers each request line ``b"<id>\\n"`` with the same line after ``BASE *
FACTOR`` seconds of simulated work on one of WORKERS workers (requests beyond
WORKERS queue), behind a CallosumServer that opens every connection with its
slot line. It publishes its port and live counters in the shared STATS file
and exits when its parent does.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from typing import Any

import gevent
from gevent.lock import BoundedSemaphore

from callosum_gevent import CallosumServer

#: int64 counters per server, in this order, in the shared stats file.
FIELDS = ("port", "in_system", "busy_ns", "done", "conns")
PORT, IN_SYSTEM, BUSY_NS, DONE, CONNS = range(len(FIELDS))
MAX_SERVERS = 8


class Stats:
    """Counters shared through a memory-mapped file; one writer per server."""

    def __init__(self, path: str, create: bool = False) -> None:
        size = MAX_SERVERS * len(FIELDS) * 8
        if create:
            with open(path, "wb") as f:
                f.write(bytes(size))
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)
        self._cells = memoryview(self._map).cast("q")

    def get(self, index: int, field: int) -> int:
        return int(self._cells[index * len(FIELDS) + field])

    def add(self, index: int, field: int, delta: int) -> None:
        self._cells[index * len(FIELDS) + field] += delta

    def row(self, index: int) -> list[int]:
        start = index * len(FIELDS)
        return list(self._cells[start : start + len(FIELDS)])

    def close(self) -> None:
        self._cells.release()
        self._map.close()


def serve(stats: Stats, index: int, service: float, workers: int, weight: int) -> None:
    """Serve until the parent process goes away."""
    parent = os.getppid()
    sem = BoundedSemaphore(workers)

    # gevent.sleep overshoots by about a millisecond (epoll's timeout is in
    # whole ms, and the CPU is shared), which would cut the fast servers'
    # capacity by ~10%; sleeping ``service - lag`` and nudging ``lag`` by the
    # error keeps the mean service time at ``service``.
    lag = 0.0

    def answer(line: bytes) -> bytes:
        nonlocal lag
        stats.add(index, IN_SYSTEM, 1)
        try:
            with sem:
                start = time.perf_counter_ns()
                gevent.sleep(max(0.0, service - lag))
                took = time.perf_counter_ns() - start
                lag += 0.05 * (took / 1e9 - service)
                stats.add(index, BUSY_NS, took)
        finally:
            stats.add(index, IN_SYSTEM, -1)
        stats.add(index, DONE, 1)
        return line + b"\n"

    def handle(sock: Any, _address: Any) -> None:
        stats.add(index, CONNS, 1)
        buf = b""
        try:
            while data := sock.recv(4096):
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    sock.sendall(answer(line))
        except OSError:
            pass
        finally:
            stats.add(index, CONNS, -1)

    server = CallosumServer(("127.0.0.1", 0), handle, weight=weight)
    server.start()
    stats.add(index, PORT, server.address[1])
    while os.getppid() == parent:
        gevent.sleep(0.2)


def main(argv: list[str]) -> None:
    path, index, factor, workers, weight, base = argv
    serve(Stats(path), int(index), float(base) * float(factor), int(workers), int(weight))


if __name__ == "__main__":
    main(sys.argv[1:])
