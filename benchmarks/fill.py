"""Fill: how long a ``Rover`` takes to fill an empty ``max_slots=100`` client from 3 servers.

The servers are ``CallosumServer`` echo servers, in this process or each in
its own child process. The clock runs from ``rover.start()`` to the offer
that makes the client full.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from functools import partial
from typing import Any

from gevent.event import Event

from callosum_gevent import CallosumClient, Rover

from ._child import ChildServer, EchoServer
from ._harness import fmt_stat, interleave, print_table, stat, target
from ._peers import Address, Sock

MAX_SLOTS = 100
SERVERS = 3


class FillClock(CallosumClient):
    """A client that sets ``full`` on the offer that fills it."""

    def __init__(self, max_slots: int) -> None:
        super().__init__(max_slots)
        self.full = Event()

    def new_connection(self, slot: int, sock: Sock) -> bool:
        kept = super().new_connection(slot, sock)
        if self.slot_count >= self.max_slots:
            self.full.set()
        return kept


def fill_ms(addresses: list[Address], attempts: list[int]) -> float:
    client = FillClock(MAX_SLOTS)
    rover = Rover(client, dict(enumerate(addresses)))
    start = time.perf_counter()
    rover.start()
    try:
        if not client.full.wait(timeout=30):
            raise TimeoutError(f"rover filled only {client.slot_count} of {MAX_SLOTS} slots")
        return (time.perf_counter() - start) * 1e3
    finally:
        rover.stop()
        attempts.append(rover.stats()["attempts"])
        client.close()


def run(quick: bool) -> dict[str, Any]:
    repeats = 3 if quick else 15
    attempts: dict[str, list[int]] = {"in-process": [], "child processes": []}
    with ExitStack() as stack:
        local = [EchoServer() for _ in range(SERVERS)]
        for server in local:
            stack.callback(server.stop)
        children = [stack.enter_context(ChildServer()) for _ in range(SERVERS)]
        samples = interleave(
            {
                "in-process": partial(fill_ms, [s.address for s in local], attempts["in-process"]),
                "child processes": partial(
                    fill_ms, [c.address for c in children], attempts["child processes"]
                ),
            },
            repeats,
        )
    print_table(
        f"fill: Rover fills an empty max_slots={MAX_SLOTS} client from {SERVERS} local "
        f"CallosumServers, {repeats} repeats",
        ["servers", "ms median (min-max)", "rover attempts median"],
        [
            [name, fmt_stat(stat(ms), 1), stat(attempts[name])["median"]]
            for name, ms in samples.items()
        ],
    )
    worst = max(stat(ms)["median"] for ms in samples.values())
    targets = [target("fill under 0.3 s (median, worst placement)", worst < 300, f"{worst:.1f} ms")]
    return {
        "max_slots": MAX_SLOTS,
        "servers": SERVERS,
        "repeats": repeats,
        "fill_ms": samples,
        "rover_attempts": attempts,
        "targets": targets,
    }
