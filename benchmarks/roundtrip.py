"""Round trips: 200 greenlets send 64-byte requests to an echo server over 20 pooled connections.

The server (``CallosumServer`` sending the slot line, then echoing) runs in
this process or in a child process. Compared: a ``LifoQueue`` pool over the
same server (slot line read and ignored), one connection per greenlet, and two
reference rows showing what fairness itself costs: minimal strict-FIFO pools
with direct hand-off (``_peers.EventFloorPool``, ``_peers.SwitchFloorPool``).
Besides requests/s, each run records the process's CPU time per request; with
the child-process server that is the client's alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import gevent

from ._child import ChildServer, EchoServer
from ._harness import fmt_stat, interleave, print_table, ratio_stat, stat, target
from ._peers import (
    FLOOR_EVENT,
    FLOOR_SWITCH,
    Address,
    EventFloorPool,
    LifoPool,
    Sock,
    SwitchFloorPool,
    close_all,
    filled_client,
    open_many,
)

GREENLETS = 200
CONNECTIONS = 20
MESSAGE = b"x" * 64
REFERENCE = "LifoQueue"
# The Event floor waits with a timer, as the client's waits would with a timeout.
TIMEOUT = 60.0
CHILD = "child-process server"

Lend = Callable[[], AbstractContextManager[Sock]]


def echo_once(sock: Sock) -> None:
    sock.sendall(MESSAGE)
    got = 0
    while got < len(MESSAGE):
        chunk = sock.recv(len(MESSAGE) - got)
        if not chunk:
            raise ConnectionError("echo server closed the connection")
        got += len(chunk)


def requests_per_second(lends: list[Lend], requests: int, cpu: list[float]) -> float:
    """Greenlet ``i`` makes ``requests`` round trips through ``lends[i]``.

    Append the process CPU time per request, in microseconds, to ``cpu``.
    """

    def worker(lend: Lend) -> None:
        for _ in range(requests):
            with lend() as sock:
                echo_once(sock)

    cpu_start = time.process_time()
    start = time.perf_counter()
    gevent.joinall([gevent.spawn(worker, lend) for lend in lends], raise_error=True)
    seconds = time.perf_counter() - start
    cpu.append((time.process_time() - cpu_start) / (len(lends) * requests) * 1e6)
    return len(lends) * requests / seconds


def measure(
    address: Address, requests: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Return (requests/s, CPU microseconds per request) per pool."""
    pooled = open_many(address, 4 * CONNECTIONS)
    own = open_many(address, GREENLETS)
    # The client gets slots 0.. (it ranks by slot); the others take the rest.
    socks = [sock for _, sock in pooled]
    client = filled_client(socks[:CONNECTIONS])
    lifo = LifoPool(socks[CONNECTIONS : 2 * CONNECTIONS])
    event_floor = EventFloorPool(socks[2 * CONNECTIONS : 3 * CONNECTIONS])
    switch_floor = SwitchFloorPool(socks[3 * CONNECTIONS :])
    lends: dict[str, list[Lend]] = {
        REFERENCE: [lifo.connection] * GREENLETS,
        "callosum": [client.connection] * GREENLETS,
        FLOOR_EVENT: [partial(event_floor.connection, TIMEOUT)] * GREENLETS,
        FLOOR_SWITCH: [switch_floor.connection] * GREENLETS,
        "own connection each": [partial(nullcontext, sock) for _, sock in own],
    }
    cpu: dict[str, list[float]] = {name: [] for name in lends}
    try:
        rates = interleave(
            {
                name: partial(requests_per_second, ls, requests, cpu[name])
                for name, ls in lends.items()
            },
            repeats,
        )
    finally:
        client.close()
        close_all(sock for _, sock in pooled + own)
    return rates, cpu


def run(quick: bool) -> dict[str, Any]:
    requests, repeats = (5, 2) if quick else (50, 13)
    results: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    server = EchoServer()
    try:
        results["in-process server"], cpu["in-process server"] = measure(
            server.address, requests, repeats
        )
    finally:
        server.stop()
    with ChildServer() as child:
        results[CHILD], cpu[CHILD] = measure(child.address, requests, repeats)
    rows = [
        [
            where,
            name,
            fmt_stat(stat(rps)),
            fmt_stat(ratio_stat(rps, samples[REFERENCE]), 2),
            fmt_stat(ratio_stat(rps, samples[FLOOR_EVENT]), 2),
            fmt_stat(ratio_stat(rps, samples[FLOOR_SWITCH]), 2),
            fmt_stat(stat(cpu[where][name]), 1),
            fmt_stat(ratio_stat(cpu[where][name], cpu[where][REFERENCE]), 2),
        ]
        for where, samples in results.items()
        for name, rps in samples.items()
    ]
    print_table(
        f"roundtrip: {GREENLETS} greenlets x {requests} requests of {len(MESSAGE)} B, "
        f"{CONNECTIONS} pooled connections, {repeats} repeats. CPU: this process's, per "
        "request (with the child-process server, the client's alone). Floors: minimal "
        "strict-FIFO pools with direct hand-off",
        [
            "server",
            "client",
            "requests/s median (min-max)",
            f"ratio to {REFERENCE}",
            "ratio to Event floor",
            "ratio to switch floor",
            "CPU us/request",
            f"CPU ratio to {REFERENCE}",
        ],
        rows,
    )
    targets = []
    for where, samples in results.items():
        ratio = ratio_stat(samples["callosum"], samples[REFERENCE])["median"]
        targets.append(
            target(
                f"{where}: at least the {REFERENCE} pool's rate",
                ratio >= 1.0,
                f"{ratio:.2f}x ({stat(samples['callosum'])['median']:,.0f} vs "
                f"{stat(samples[REFERENCE])['median']:,.0f} requests/s)",
            )
        )
        floors = ", ".join(
            f"{ratio_stat(samples['callosum'], samples[floor])['median']:.2f}x the {floor}"
            for floor in (FLOOR_EVENT, FLOOR_SWITCH)
        )
        print(f"  (no target) {where}: callosum's rate is {floors}")
    ours, ref = cpu[CHILD]["callosum"], cpu[CHILD][REFERENCE]
    cpu_ratio = ratio_stat(ours, ref)["median"]
    targets.append(
        target(
            f"{CHILD}: client CPU per request at most 1.45x the {REFERENCE} pool's (issue 11)",
            cpu_ratio <= 1.45,
            f"{cpu_ratio:.2f}x ({stat(ours)['median']:.1f} vs {stat(ref)['median']:.1f} us)",
        )
    )
    return {
        "greenlets": GREENLETS,
        "connections": CONNECTIONS,
        "requests_per_greenlet": requests,
        "repeats": repeats,
        "requests_per_second": results,
        "cpu_us_per_request": cpu,
        "reference": REFERENCE,
        "floors": [FLOOR_EVENT, FLOOR_SWITCH],
        "targets": targets,
    }
