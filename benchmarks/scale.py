"""Scale: lend + return cost and memory per pooled connection at 10 to 10,000 connections.

The connections go to a ``CallosumServer`` in a child process, so this process
holds only the client ends. Memory is ``tracemalloc``'s count of what the
client allocates while pooling already open sockets: its bookkeeping, the
poll object and the libev watcher of each connection, not the socket objects
themselves nor kernel buffers.
"""

from __future__ import annotations

import time
import tracemalloc
from functools import partial
from typing import Any

import gevent

from callosum_gevent import CallosumClient

from ._child import ChildServer, raise_fd_limit
from ._harness import fmt_stat, interleave, print_table, ratio_stat, stat, target
from ._peers import Sock, open_many


def pooled_bytes(socks: list[tuple[int, Sock]]) -> tuple[CallosumClient, int]:
    """Pool ``socks`` in a new client; return it and the bytes that took."""
    tracemalloc.start()
    client = CallosumClient(max_slots=len(socks))
    for slot, sock in socks:
        client.new_connection(slot, sock)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return client, size


def cycle_ns(client: CallosumClient, n: int, hub_turn: bool) -> float:
    """Nanoseconds per ``with client.connection()`` (and ``gevent.sleep(0)`` inside)."""
    start = time.perf_counter_ns()
    if hub_turn:
        for _ in range(n):
            with client.connection():
                gevent.sleep(0)
    else:
        for _ in range(n):
            with client.connection():
                pass
    return (time.perf_counter_ns() - start) / n


def run(quick: bool) -> dict[str, Any]:
    sizes, n, repeats = ((10, 1_000), 2_000, 3) if quick else ((10, 1_000, 10_000), 20_000, 11)
    raise_fd_limit()
    clients: dict[int, CallosumClient] = {}
    memory: dict[int, float] = {}
    with ChildServer() as child:
        for size in sizes:
            socks = open_many(child.address, size)
            clients[size], used = pooled_bytes(socks)
            memory[size] = used / size
            assert clients[size].idle_count == size
        try:
            plain = interleave(
                {str(s): partial(cycle_ns, c, n, False) for s, c in clients.items()}, repeats
            )
            turns = interleave(
                {str(s): partial(cycle_ns, c, n // 10, True) for s, c in clients.items()}, repeats
            )
        finally:
            for client in clients.values():
                client.close()
    ref = str(sizes[0])
    rows = [
        [
            f"{size:,}",
            fmt_stat(stat(plain[str(size)])),
            fmt_stat(ratio_stat(plain[str(size)], plain[ref]), 2),
            fmt_stat(stat(turns[str(size)])),
            fmt_stat(ratio_stat(turns[str(size)], turns[ref]), 2),
            f"{memory[size]:,.0f}",
        ]
        for size in sizes
    ]
    print_table(
        f"scale: `with client.connection()` ns per cycle ({n:,} cycles; {n // 10:,} with a "
        f"gevent.sleep(0) inside), {repeats} repeats; tracemalloc bytes per pooled connection",
        ["pooled", "ns/cycle", f"ratio to {ref}", "ns/cycle + sleep(0)", "ratio", "bytes/conn"],
        rows,
    )
    top = str(sizes[-1])
    cost = ratio_stat(plain[top], plain[ref])["median"]
    worst_memory = max(memory.values())
    targets = [
        target(
            f"cost at {sizes[-1]:,} at most 1.5x the cost at {ref}", cost <= 1.5, f"{cost:.2f}x"
        ),
        target(
            "memory under 8 KiB per idle pooled connection",
            worst_memory < 8192,
            f"{worst_memory:,.0f} B at most",
        ),
    ]
    return {
        "sizes": list(sizes),
        "cycles": n,
        "repeats": repeats,
        "ns_per_cycle": plain,
        "ns_per_cycle_with_sleep0": turns,
        "bytes_per_connection": memory,
        "targets": targets,
    }
