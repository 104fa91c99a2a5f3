"""Contention: 1,000 greenlets share 10 connections, yielding while they hold one.

Each greenlet runs lend / ``gevent.sleep(0)`` / return cycles, every lend with
a timeout. We time the whole run and the longest any greenlet waited for its
first connection: a ``LifoQueue`` lets a greenlet that just returned a
connection take it straight back, so late greenlets starve. Two reference rows
show what fairness itself costs here: minimal strict-FIFO pools with direct
hand-off (``_peers.EventFloorPool``, ``_peers.SwitchFloorPool``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import gevent

from ._harness import fmt_stat, interleave, print_table, ratio_stat, stat, target
from ._peers import (
    FLOOR_EVENT,
    FLOOR_SWITCH,
    EventFloorPool,
    LifoPool,
    Sock,
    SwitchFloorPool,
    close_all,
    filled_client,
    loopback_pairs,
)

GREENLETS = 1_000
CONNECTIONS = 10
TIMEOUT = 60.0
REFERENCE = "LifoQueue"

Lend = Callable[[float], AbstractContextManager[Sock]]


def contend(lend: Lend, greenlets: int, cycles: int) -> tuple[float, float]:
    """Return (total seconds, longest first wait in seconds)."""
    first_waits: list[float] = []

    def worker() -> None:
        asked = time.perf_counter()
        for _ in range(cycles):
            with lend(TIMEOUT):
                if asked:
                    first_waits.append(time.perf_counter() - asked)
                    asked = 0.0
                gevent.sleep(0)

    start = time.perf_counter()
    gevent.joinall([gevent.spawn(worker) for _ in range(greenlets)], raise_error=True)
    return time.perf_counter() - start, max(first_waits)


def run(quick: bool) -> dict[str, Any]:
    cycles, repeats = (10, 2) if quick else (100, 7)
    clients, servers = loopback_pairs(CONNECTIONS)
    lends: dict[str, Lend] = {
        REFERENCE: LifoPool(clients).connection,
        "callosum": filled_client(clients).connection,
        FLOOR_EVENT: EventFloorPool(clients).connection,
        FLOOR_SWITCH: SwitchFloorPool(clients).connection,
    }
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in lends}

    def sampler(name: str) -> Callable[[], float]:
        def sample() -> float:
            figures[name].append(contend(lends[name], GREENLETS, cycles))
            return figures[name][-1][0]

        return sample

    try:
        interleave({name: sampler(name) for name in lends}, repeats)
    finally:
        close_all(clients + servers)
    totals = {name: [t * 1e3 for t, _ in runs] for name, runs in figures.items()}
    waits = {name: [w * 1e3 for _, w in runs] for name, runs in figures.items()}
    rows = [
        [
            name,
            fmt_stat(stat(totals[name]), 1),
            fmt_stat(ratio_stat(totals[name], totals[REFERENCE]), 2),
            fmt_stat(ratio_stat(totals[name], totals[FLOOR_EVENT]), 2),
            fmt_stat(ratio_stat(totals[name], totals[FLOOR_SWITCH]), 2),
            fmt_stat(stat(waits[name]), 2),
            fmt_stat(ratio_stat(waits[name], waits[REFERENCE]), 3),
        ]
        for name in lends
    ]
    print_table(
        f"contention: {GREENLETS:,} greenlets, {CONNECTIONS} connections, {cycles} lend/"
        f"sleep(0)/return cycles each, timeout={TIMEOUT:g} s, {repeats} repeats. Floors: "
        "minimal strict-FIFO pools with direct hand-off (Event + poll + timer: what the "
        "client keeps; raw greenlet switch: no Event, poll or timer)",
        [
            "pool",
            "total ms",
            f"total / {REFERENCE}",
            "total / Event floor",
            "total / switch floor",
            "longest first wait ms",
            "wait ratio",
        ],
        rows,
    )
    ours = totals["callosum"]

    def vs(ref: str, most: float, label: str) -> dict[str, Any]:
        ratio = ratio_stat(ours, totals[ref])["median"]
        return target(
            f"total time at most {most:g}x {label}",
            ratio <= most,
            f"{ratio:.2f}x ({stat(ours)['median']:.1f} ms vs {stat(totals[ref])['median']:.1f} ms)",
        )

    wait_ratio = ratio_stat(waits["callosum"], waits[REFERENCE])["median"]
    targets = [
        vs(REFERENCE, 1.5, REFERENCE),
        vs(REFERENCE, 3.0, f"{REFERENCE} (issue 11)"),
        vs(FLOOR_EVENT, 1.1, f"the {FLOOR_EVENT} (issue 11)"),
        target(
            f"longest first wait under 0.1x {REFERENCE}'s",
            wait_ratio < 0.1,
            f"{wait_ratio:.3f}x ({stat(waits['callosum'])['median']:.2f} ms vs "
            f"{stat(waits[REFERENCE])['median']:.2f} ms)",
        ),
    ]
    switch_ratio = ratio_stat(ours, totals[FLOOR_SWITCH])["median"]
    print(f"  (no target) total vs the {FLOOR_SWITCH}: {switch_ratio:.2f}x")
    return {
        "greenlets": GREENLETS,
        "connections": CONNECTIONS,
        "cycles": cycles,
        "repeats": repeats,
        "total_ms": totals,
        "longest_first_wait_ms": waits,
        "reference": REFERENCE,
        "floors": [FLOOR_EVENT, FLOOR_SWITCH],
        "targets": targets,
    }
