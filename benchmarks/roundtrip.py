"""Round trips: 200 greenlets send 64-byte requests to an echo server over 20 pooled connections.

The server (``CallosumServer`` sending the slot line, then echoing) runs in
this process or in a child process. Compared: a ``LifoQueue`` pool over the
same server (slot line read and ignored) and one connection per greenlet.
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
from ._peers import Address, LifoPool, Sock, close_all, filled_client, open_many

GREENLETS = 200
CONNECTIONS = 20
MESSAGE = b"x" * 64
REFERENCE = "LifoQueue"

Lend = Callable[[], AbstractContextManager[Sock]]


def echo_once(sock: Sock) -> None:
    sock.sendall(MESSAGE)
    got = 0
    while got < len(MESSAGE):
        chunk = sock.recv(len(MESSAGE) - got)
        if not chunk:
            raise ConnectionError("echo server closed the connection")
        got += len(chunk)


def requests_per_second(lends: list[Lend], requests: int) -> float:
    """Greenlet ``i`` makes ``requests`` round trips through ``lends[i]``."""

    def worker(lend: Lend) -> None:
        for _ in range(requests):
            with lend() as sock:
                echo_once(sock)

    start = time.perf_counter()
    gevent.joinall([gevent.spawn(worker, lend) for lend in lends], raise_error=True)
    return len(lends) * requests / (time.perf_counter() - start)


def measure(address: Address, requests: int, repeats: int) -> dict[str, list[float]]:
    pooled = open_many(address, 2 * CONNECTIONS)
    own = open_many(address, GREENLETS)
    client = filled_client([sock for _, sock in pooled[:CONNECTIONS]])
    lifo = LifoPool(sock for _, sock in pooled[CONNECTIONS:])
    lends: dict[str, list[Lend]] = {
        REFERENCE: [lifo.connection] * GREENLETS,
        "callosum": [client.connection] * GREENLETS,
        "own connection each": [partial(nullcontext, sock) for _, sock in own],
    }
    try:
        return interleave(
            {name: partial(requests_per_second, ls, requests) for name, ls in lends.items()},
            repeats,
        )
    finally:
        client.close()
        close_all(sock for _, sock in pooled + own)


def run(quick: bool) -> dict[str, Any]:
    requests, repeats = (5, 2) if quick else (50, 13)
    results: dict[str, dict[str, list[float]]] = {}
    server = EchoServer()
    try:
        results["in-process server"] = measure(server.address, requests, repeats)
    finally:
        server.stop()
    with ChildServer() as child:
        results["child-process server"] = measure(child.address, requests, repeats)
    rows = [
        [where, name, fmt_stat(stat(rps)), fmt_stat(ratio_stat(rps, samples[REFERENCE]), 2)]
        for where, samples in results.items()
        for name, rps in samples.items()
    ]
    print_table(
        f"roundtrip: {GREENLETS} greenlets x {requests} requests of {len(MESSAGE)} B, "
        f"{CONNECTIONS} pooled connections, {repeats} repeats",
        ["server", "client", "requests/s median (min-max)", f"ratio to {REFERENCE}"],
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
    return {
        "greenlets": GREENLETS,
        "connections": CONNECTIONS,
        "requests_per_greenlet": requests,
        "repeats": repeats,
        "requests_per_second": results,
        "reference": REFERENCE,
        "targets": targets,
    }
