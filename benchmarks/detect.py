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

from gevent import socket

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


def one_round(child: ChildServer, n: int, gap: float) -> tuple[list[float], dict[str, int]]:
    """Pool ``n`` connections in each pool, have the child close them all; measure."""
    ours = [(slot, timed(sock)) for slot, sock in open_many(child.address, n)]
    TimedSocket.closed_at = {}
    client = CallosumClient(max_slots=n)
    for slot, sock in ours:
        client.new_connection(slot, sock)
    others = [[sock for _, sock in open_many(child.address, n)] for _ in range(3)]
    lifo, checked, gsp = (
        LifoPool(others[0]),
        CheckedLifoPool(others[1]),
        gsocketpool_pool(others[2]),
    )
    closed = child.close_all(gap)
    latencies = [(TimedSocket.closed_at[s.port] - closed[s.port]) / 1e6 for _, s in ours]
    lends: dict[str, Callable[[], Sock]] = {
        "LifoQueue": lambda: lifo.get(timeout=0.01),
        "LifoQueue+check": lambda: checked.get(timeout=0.01),
        "gsocketpool": lambda: gsp.acquire().get(),
        "callosum": lambda: client.get_connection(timeout=0.01),
    }
    dead = {name: dead_handed_out(lend, n) for name, lend in lends.items()}
    client.close()
    close_all(sock for socks in others for sock in socks)
    return latencies, dead


def run(quick: bool) -> dict[str, Any]:
    n, rounds, gap = (10, 1, 0.002) if quick else (50, 5, 0.005)
    latencies: list[float] = []
    dead: dict[str, int] = {}
    with ChildServer() as child:
        for _ in range(rounds):
            ms, handed = one_round(child, n, gap)
            latencies += ms
            for name, count in handed.items():
                dead[name] = dead.get(name, 0) + count
    s = stat(latencies)
    p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))]
    print_table(
        f"detect: server (child process) closes {n} idle pooled connections {gap * 1e3:g} ms "
        f"apart, {rounds} round(s); close -> eviction in ms",
        ["closes", "median", "p90", "min", "max"],
        [[len(latencies), *(f"{v:.3f}" for v in (s["median"], p90, s["min"], s["max"]))]],
    )
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
        "close_to_eviction_ms": latencies,
        "summary_ms": {**s, "p90": p90},
        "dead_handed_out": dead,
        "targets": targets,
    }
