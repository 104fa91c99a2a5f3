"""Dead-connection detection: the server closes idle pooled connections one by one.

A ``CallosumServer`` in a child process closes each connection, noting
``time.monotonic_ns()`` just before; our client's socket notes the same clock
when the pool closes it on eviction (CLOCK_MONOTONIC is system-wide on Linux).
The parent waits in the hub (a blocking read of the child's answer), as an
application would, so libev polls I/O at once. Then every pool is drained to
count the dead connections it hands out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from queue import Empty
from typing import Any

import gevent
from gevent import socket
from gevent.socket import wait_read

from callosum_gevent import CallosumClient, PoolTimeout

from ._child import ChildServer
from ._harness import print_table, stat, target
from ._peers import (
    CheckedLifoPool,
    LifoPool,
    Sock,
    close_all,
    gsocketpool_pool,
    is_dead,
    open_many,
)


class TimedSocket(socket.socket):  # type: ignore[misc]
    """A socket that notes when it is first closed, by its local port."""

    closed_at: dict[int, int] = {}  # noqa: RUF012 - replaced per round

    def adopt(self) -> TimedSocket:
        self.port: int = self.getsockname()[1]
        return self

    def close(self) -> None:
        self.closed_at.setdefault(self.port, time.monotonic_ns())
        super().close()


def timed(sock: Sock) -> TimedSocket:
    return TimedSocket(fileno=sock.detach()).adopt()


def dead_handed_out(lend: Callable[[], Sock], n: int) -> int:
    """Lend up to ``n`` connections without returning them; count the dead ones."""
    dead = 0
    for _ in range(n):
        try:
            dead += is_dead(lend())
        except (Empty, PoolTimeout):
            break
    return dead


def woken_at(socks: list[Sock]) -> tuple[dict[int, int], list[gevent.Greenlet]]:
    """The baseline: a greenlet per socket blocked in ``wait_read``, noting when it wakes."""
    woke: dict[int, int] = {}

    def watch(sock: Sock) -> None:
        port = sock.getsockname()[1]
        wait_read(sock.fileno())
        woke[port] = time.monotonic_ns()

    return woke, [gevent.spawn(watch, sock) for sock in socks]


def one_round(
    child: ChildServer, n: int, gap: float
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Pool ``n`` connections in each pool, have the child close them all; measure."""
    ours = [(slot, timed(sock)) for slot, sock in open_many(child.address, n)]
    TimedSocket.closed_at = {}
    client = CallosumClient(max_slots=n)
    for slot, sock in ours:
        client.new_connection(slot, sock)
    others = [[sock for _, sock in open_many(child.address, n)] for _ in range(4)]
    lifo, checked, gsp = (
        LifoPool(others[0]),
        CheckedLifoPool(others[1]),
        gsocketpool_pool(others[2]),
    )
    woke, watchers = woken_at(others[3])
    gevent.sleep(0.01)  # let the watchers block
    closed = child.close_all(gap)
    gevent.joinall(watchers, timeout=1)
    latencies = {
        "callosum eviction": [
            (TimedSocket.closed_at[s.port] - closed[s.port]) / 1e6 for _, s in ours
        ],
        "bare wait_read wake-up": [(t - closed[port]) / 1e6 for port, t in woke.items()],
    }
    lends: dict[str, Callable[[], Sock]] = {
        "LifoQueue": lambda: lifo.get(timeout=0.01),
        "LifoQueue+peek": lambda: checked.get(timeout=0.01),
        "gsocketpool": lambda: gsp.acquire().get(),
        "callosum": lambda: client.get_connection(timeout=0.01),
    }
    dead = {name: dead_handed_out(lend, n) for name, lend in lends.items()}
    client.close()
    close_all(sock for socks in others for sock in socks)
    return latencies, dead


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def run(quick: bool) -> dict[str, Any]:
    n, rounds, gap = (10, 1, 0.002) if quick else (50, 5, 0.005)
    latencies: dict[str, list[float]] = {}
    dead: dict[str, int] = {}
    with ChildServer() as child:
        for _ in range(rounds):
            ms, handed = one_round(child, n, gap)
            for name, values in ms.items():
                latencies.setdefault(name, []).extend(values)
            for name, count in handed.items():
                dead[name] = dead.get(name, 0) + count
    summary = {name: {**stat(ms), "p90": p90(ms)} for name, ms in latencies.items()}
    print_table(
        f"detect: server (child process) closes idle connections {gap * 1e3:g} ms apart, "
        f"{rounds} round(s) of {n}; ms from the server's close to the client noticing",
        ["what notices", "closes", "median", "p90", "min", "max"],
        [
            [name, len(latencies[name]), *(f"{s[k]:.3f}" for k in ("median", "p90", "min", "max"))]
            for name, s in summary.items()
        ],
    )
    s = summary["callosum eviction"]
    print_table(
        f"dead connections handed out after the server closed all {n * rounds} of each pool's",
        ["pool", "dead handed out", "of"],
        [[name, count, n * rounds] for name, count in dead.items()],
    )
    targets = [
        target("eviction median under 0.5 ms", s["median"] < 0.5, f"{s['median']:.3f} ms"),
        target("eviction maximum under 2 ms", s["max"] < 2.0, f"{s['max']:.3f} ms"),
        target("callosum hands out no dead connection", dead["callosum"] == 0, str(dead)),
    ]
    return {
        "connections": n,
        "rounds": rounds,
        "gap_s": gap,
        "close_to_notice_ms": latencies,
        "summary_ms": summary,
        "dead_handed_out": dead,
        "targets": targets,
    }
