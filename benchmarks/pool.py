"""Uncontended lend + return: one greenlet, 16 pooled loopback TCP connections.

The contention benchmark's two floors (``_peers.EventFloorPool``,
``_peers.SwitchFloorPool``) are reference rows here too: uncontended, the Event
floor's ``with`` is a list pop/append plus the hand-out ``poll(0)``, the switch
floor's a list pop/append, each behind the same two-call lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ._harness import Samples, fmt_stat, interleave, print_table, ratio_stat, stat, target
from ._peers import (
    FLOOR_EVENT,
    FLOOR_SWITCH,
    CheckedLifoPool,
    EventFloorPool,
    LifoPool,
    SemaphoreDequePool,
    Sock,
    SwitchFloorPool,
    close_all,
    filled_client,
    gsocketpool_pool,
    is_dead,
    is_readable,
    loopback_pairs,
)

N_CONNECTIONS = 16
REFERENCE = "LifoQueue with"
# Pools that, like ours, are packaged or check liveness; the bare LifoQueue
# wrapper does neither and is reported on its own line.
GEVENT_PEERS_WITH = (
    "LifoQueue+peek with",
    "LifoQueue+poll with",
    "gsocketpool with",
    "geventconnpool* with",
)


def per_op(loop: Callable[[int], None], n: int) -> Callable[[], float]:
    """Turn ``loop(n)`` into a sampler returning nanoseconds per iteration."""

    def sample() -> float:
        start = time.perf_counter_ns()
        loop(n)
        return (time.perf_counter_ns() - start) / n

    return sample


def with_loop(lend: Callable[[], AbstractContextManager[Any]]) -> Callable[[int], None]:
    """The loop ``with lend(): pass``, n times."""

    def loop(n: int) -> None:
        for _ in range(n):
            with lend():
                pass

    return loop


def variants(socks: list[Sock], n: int) -> dict[str, Callable[[], float]]:
    """The lend + return loops; each pool gets its own copy of the socket list."""
    floor = list(socks)
    lifo = LifoPool(socks)
    peek = CheckedLifoPool(socks, is_dead)
    polled = CheckedLifoPool(socks, is_readable)
    gsp = gsocketpool_pool(socks)
    gcp = SemaphoreDequePool(socks)
    event_floor = EventFloorPool(socks)
    switch_floor = SwitchFloorPool(socks)
    client = filled_client(socks)

    def floor_loop(n: int) -> None:
        for _ in range(n):
            floor.append(floor.pop())

    def lifo_raw(n: int) -> None:
        for _ in range(n):
            lifo.put(lifo.get())

    def callosum_raw(n: int) -> None:
        for _ in range(n):
            client.return_connection(client.get_connection())

    loops = {
        "list pop/append": floor_loop,
        "LifoQueue get/put": lifo_raw,
        "LifoQueue with": with_loop(lifo.connection),
        "LifoQueue+peek with": with_loop(peek.connection),
        "LifoQueue+poll with": with_loop(polled.connection),
        "gsocketpool with": with_loop(gsp.connection),
        "geventconnpool* with": with_loop(gcp.connection),
        f"{FLOOR_EVENT} with": with_loop(event_floor.connection),
        f"{FLOOR_SWITCH} with": with_loop(switch_floor.connection),
        "callosum get/return": callosum_raw,
        "callosum with": with_loop(client.connection),
    }
    return {name: per_op(loop, n) for name, loop in loops.items()}


def faster_than(samples: Samples, peers: Sequence[str], what: str) -> dict[str, Any]:
    ours = samples["callosum with"]
    best = min(peers, key=lambda p: ratio_stat(samples[p], ours)["median"])
    margin = ratio_stat(samples[best], ours)["median"]
    return target(
        f"callosum `with` faster than {what}",
        margin > 1.0,
        f"{stat(ours)['median']:.0f} ns vs {best} {stat(samples[best])['median']:.0f} ns "
        f"(peer/ours, pair by pair: {margin:.2f}x)",
    )


def run(quick: bool) -> dict[str, Any]:
    n, repeats = (2_000, 3) if quick else (10_000, 31)
    clients, servers = loopback_pairs(N_CONNECTIONS)
    try:
        samples = interleave(variants(clients, n), repeats)
    finally:
        close_all(clients + servers)
    ref = samples[REFERENCE]
    rows = [
        [name, fmt_stat(stat(ns)), fmt_stat(ratio_stat(ns, ref), 2)] for name, ns in samples.items()
    ]
    print_table(
        f"pool: one lend + return, 1 greenlet, {N_CONNECTIONS} loopback TCP connections, "
        f"{n:,} cycles x {repeats} repeats. +peek: redis-py's MSG_PEEK check at checkout; "
        "+poll: urllib3's poll(0); * geventconnpool 0.2.1's algorithm in our own code (the "
        "package does not import on Python 3)",
        ["variant", "ns/cycle median (min-max)", f"ratio to {REFERENCE}"],
        rows,
    )
    ours = samples["callosum with"]
    gsp_ratio = ratio_stat(ours, samples["gsocketpool with"])["median"]
    targets = [
        faster_than(samples, GEVENT_PEERS_WITH, "every gevent peer's `with`"),
        faster_than(samples, ["LifoQueue with"], "the bare LifoQueue `with` (no check)"),
        target(
            "callosum `with` at most 1.1x gsocketpool's (issue 11)",
            gsp_ratio <= 1.1,
            f"{gsp_ratio:.2f}x ({stat(ours)['median']:.0f} vs "
            f"{stat(samples['gsocketpool with'])['median']:.0f} ns)",
        ),
    ]
    floors = ", ".join(
        f"{ratio_stat(ours, samples[f'{floor} with'])['median']:.2f}x the {floor}"
        for floor in (FLOOR_EVENT, FLOOR_SWITCH)
    )
    print(f"  (no target) callosum `with` is {floors}")
    return {
        "connections": N_CONNECTIONS,
        "cycles": n,
        "repeats": repeats,
        "ns_per_cycle": samples,
        "summary": {name: stat(ns) for name, ns in samples.items()},
        "ratio_to_reference": {name: ratio_stat(ns, ref) for name, ns in samples.items()},
        "reference": REFERENCE,
        "floors": [FLOOR_EVENT, FLOOR_SWITCH],
        "targets": targets,
    }
