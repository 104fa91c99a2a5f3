"""One backend of the balance benchmark, run as a child process and reused run after run.

``python -m benchmarks._balance_server STATS INDEX BASE WORKERS`` obeys
commands on stdin, one per line, and answers each with one line on stdout:

- ``start FACTOR WEIGHT MODE [REFERENCE]``: start a fresh ``CallosumServer``
  (fresh slots, and with ``WEIGHT`` ``auto`` a fresh speed estimate, weight 1
  standing for REFERENCE requests per busy second if given) on an ephemeral
  loopback port and answer the port. Each request line ``b"<id>\\n"`` is
  answered with the same line after ``BASE * FACTOR`` seconds of simulated
  work on one of WORKERS workers (requests beyond WORKERS queue). With MODE
  ``sinkhole`` the handler returns at once after the slot line, so every
  connection is closed as soon as it is made.
- ``factor F``: from now on each request takes ``BASE * F`` of work.
- ``stall S``: from now on every request is answered after S seconds, without
  taking a worker (a hang, not work); ``stall 0`` ends it.
- ``stop``: stop the server at once, killing its handlers mid-request.
- ``info``: answer the running server's ``weight`` and ``rate`` (None while
  its estimate is not trusted, or with a fixed weight), or ``none``.

``factor``, ``stall`` and ``stop`` answer ``ok``; a failed command answers ``error <reason>``. The
server publishes live counters in the shared STATS file (one row per
server, this process the only writer of its row while a server runs) and
exits at the end of its input, that is when its parent goes away.

Handlers mark each request with ``with server.request(sock):`` when the
server has that method, so that ``weight="auto"`` can measure the server.
"""

from __future__ import annotations

import mmap
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import gevent
from gevent.fileobject import FileObjectPosix
from gevent.lock import BoundedSemaphore

from callosum_gevent import CallosumServer

#: int64 counters per server, in this order, in the shared stats file.
FIELDS = ("in_system", "busy_ns", "done", "conns", "accepted")
IN_SYSTEM, BUSY_NS, DONE, CONNS, ACCEPTED = range(len(FIELDS))
MAX_SERVERS = 9


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

    def reset(self, index: int) -> None:
        for field in range(len(FIELDS)):
            self._cells[index * len(FIELDS) + field] = 0

    def close(self) -> None:
        self._cells.release()
        self._map.close()


class Backend:
    """The simulated service behind whichever CallosumServer runs now."""

    def __init__(self, stats: Stats, index: int, base: float, workers: int) -> None:
        self.stats = stats
        self.index = index
        self.base = base
        self.sem = BoundedSemaphore(workers)
        self.factor = 1.0
        self.stall = 0.0
        self.server: CallosumServer | None = None
        # gevent.sleep overshoots by about a millisecond (epoll's timeout is in
        # whole ms, and the CPU is shared), which would cut the fast servers'
        # capacity by ~10%; sleeping ``service - lag`` and nudging ``lag`` by
        # the error keeps the mean service time at ``service``.
        self.lag = 0.0

    def answer(self, line: bytes) -> bytes:
        stats, index = self.stats, self.index
        stats.add(index, IN_SYSTEM, 1)
        try:
            if self.stall:
                gevent.sleep(self.stall)
            else:
                with self.sem:
                    service = self.base * self.factor
                    start = time.perf_counter_ns()
                    gevent.sleep(max(0.0, service - self.lag))
                    took = time.perf_counter_ns() - start
                    self.lag += 0.05 * (took / 1e9 - service)
                    stats.add(index, BUSY_NS, took)
        finally:
            stats.add(index, IN_SYSTEM, -1)
        stats.add(index, DONE, 1)
        return line + b"\n"

    def start(self, weight: int | str, sinkhole: bool, reference: float | None = None) -> int:
        self.stop()
        self.stall = 0.0
        stats, index = self.stats, self.index
        # A fresh server has fresh counters; the old one's handlers are all dead.
        stats.reset(index)
        server: CallosumServer

        def handle(sock: Any, _address: Any) -> None:
            stats.add(index, ACCEPTED, 1)
            if sinkhole:
                return
            mark: Callable[[Any], AbstractContextManager[Any]] | None = getattr(
                server, "request", None
            )
            stats.add(index, CONNS, 1)
            buf = b""
            try:
                while data := sock.recv(4096):
                    *lines, buf = (buf + data).split(b"\n")
                    for line in lines:
                        if mark is None:
                            sock.sendall(self.answer(line))
                            continue
                        with mark(sock):
                            sock.sendall(self.answer(line))
            except OSError:
                pass
            finally:
                stats.add(index, CONNS, -1)

        # A dict, as builds before weight="auto" type weight as int only.
        options: dict[str, Any] = {"weight": weight}
        if reference is not None:
            options["reference_rate"] = reference
        server = CallosumServer(("127.0.0.1", 0), handle, **options)
        server.start()
        self.server = server
        return int(server.server_port)

    def stop(self) -> None:
        """Stop the server now: no drain, handlers die mid-request, as in a crash."""
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        server.pool.kill(block=True)


def obey(backend: Backend, command: list[str]) -> str:
    verb, args = command[0], command[1:]
    if verb == "start":
        factor, weight, mode, *rest = args
        backend.factor = float(factor)
        reference = float(rest[0]) if rest else None
        return str(
            backend.start(
                weight if weight == "auto" else int(weight), mode == "sinkhole", reference
            )
        )
    if verb == "factor":
        backend.factor = float(args[0])
    elif verb == "stall":
        backend.stall = float(args[0])
    elif verb == "stop":
        backend.stop()
    elif verb == "info":
        server = backend.server
        if server is None:
            return "none"
        return f"{server.weight} {getattr(server, 'rate', None)}"
    else:
        raise ValueError(f"unknown command {verb!r}")
    return "ok"


def main(argv: list[str]) -> None:
    path, index, base, workers = argv
    backend = Backend(Stats(path), int(index), float(base), int(workers))
    commands: Any = FileObjectPosix(sys.stdin.fileno(), "rb")
    for line in commands:
        try:
            reply = obey(backend, line.decode().split())
        except (ValueError, TypeError, OSError) as exc:
            reply = f"error {type(exc).__name__}: {exc}".replace("\n", " ")
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
    backend.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
