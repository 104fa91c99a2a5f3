"""How to watch idle sockets: which watcher greenlet costs least on lend and return.

The issue asked to measure, not assume, whether a watcher greenlet per socket
is cheap on the lend/return path. Each variant here runs the same cycle on a
real loopback socket: stop watching (lend), start watching (return), then one
``gevent.sleep(0)`` so that whatever work a variant deferred to the hub is
done inside the cycle, as it would be in a request loop. "no watcher" is the
cycle with nothing watched; the other rows add their own cost to it.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket
from gevent.event import Event
from greenlet import greenlet

from ._harness import fmt_stat, interleave, print_table, stat, target

_READ = 1


class _Cancel(Exception):
    pass


def _noop() -> None:
    pass


class IoWatcher:
    """A bare libev io watcher whose callback runs in the hub."""

    def __init__(self, fd: int) -> None:
        self.io = gevent.get_hub().loop.io(fd, _READ)
        self.io.ref = False
        self.callback: Callable[[], object] = _noop

    def idle(self) -> None:
        self.io.start(self.callback)

    def lend(self) -> None:
        self.io.stop()

    def close(self) -> None:
        self.io.stop()
        self.io.close()


class WokenGreenlet(IoWatcher):
    """What CallosumClient does: a greenlet per socket, switched to by the io watcher.

    Lending and returning arm and disarm the io watcher; the greenlet runs
    only if the idle socket turns readable.
    """

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.callback = greenlet(_noop, gevent.get_hub()).switch


class ParkedGreenlet:
    """One greenlet per socket that waits on an Event for idleness, then on the socket."""

    def __init__(self, fd: int) -> None:
        self.hub = gevent.get_hub()
        self.io = self.hub.loop.io(fd, _READ)
        self.idle_event = Event()
        self.watching = False
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            self.idle_event.wait()
            self.watching = True
            try:
                self.hub.wait(self.io)
                return  # readable: the pool would evict here
            except _Cancel:
                pass
            finally:
                self.watching = False

    def idle(self) -> None:
        self.idle_event.set()

    def lend(self) -> None:
        self.idle_event.clear()
        if self.watching:
            self.hub.cancel_wait(self.io, _Cancel())

    def close(self) -> None:
        self.greenlet.kill(block=False)


class GreenletPerReturn:
    """A new greenlet waiting on the socket after every return, killed at lend."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.greenlet: Any = None

    def idle(self) -> None:
        self.greenlet = gevent.spawn(socket.wait_read, self.fd)

    def lend(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None

    def close(self) -> None:
        self.lend()


class NoWatcher:
    def __init__(self, fd: int) -> None:
        pass

    def idle(self) -> None:
        pass

    def lend(self) -> None:
        pass

    def close(self) -> None:
        pass


KINDS: dict[str, Callable[[int], Any]] = {
    "no watcher": NoWatcher,
    "greenlet woken by io watcher (ours)": WokenGreenlet,
    "bare io watcher": IoWatcher,
    "greenlet parked on an Event": ParkedGreenlet,
    "greenlet per return": GreenletPerReturn,
}


def _cycle_sampler(watcher: Any, n: int) -> Callable[[], float]:
    def sample() -> float:
        lend, idle, sleep = watcher.lend, watcher.idle, gevent.sleep
        start = time.perf_counter_ns()
        for _ in range(n):
            lend()
            idle()
            sleep(0)
        return (time.perf_counter_ns() - start) / n

    return sample


def _bytes_per_idle_watcher(kind: Callable[[int], Any], fds: list[int]) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    watchers = [kind(fd) for fd in fds]
    for w in watchers:
        w.idle()
    gevent.sleep(0.01)  # let parked greenlets reach their wait
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    for w in watchers:
        w.close()
    gevent.sleep(0.01)
    return used / len(fds)


def run(quick: bool) -> dict[str, Any]:
    n, repeats, count = (2_000, 3, 200) if quick else (20_000, 7, 1_000)
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        fd = pairs[0][0].fileno()
        watchers = {name: kind(fd) for name, kind in KINDS.items()}
        for w in watchers.values():
            w.idle()
        samples = interleave({k: _cycle_sampler(w, n) for k, w in watchers.items()}, repeats)
        for w in watchers.values():
            w.close()
        base = samples["no watcher"]
        rows = []
        result: dict[str, Any] = {"variants": {}}
        for name, values in samples.items():
            extra = stat([v - b for v, b in zip(values, base, strict=True)])
            memory = _bytes_per_idle_watcher(KINDS[name], [p[0].fileno() for p in pairs])
            result["variants"][name] = {"ns": stat(values), "extra_ns": extra, "bytes": memory}
            rows.append([name, fmt_stat(stat(values)), fmt_stat(extra), f"{memory:,.0f}"])
        print_table(
            f"watcher: lend + return + sleep(0), one socket, {n:,} cycles x {repeats} repeats;"
            f" memory per idle watcher over {count:,} sockets",
            ["variant", "ns/cycle median (min-max)", "ns above no watcher", "bytes/idle watcher"],
            rows,
        )
        ours = result["variants"]["greenlet woken by io watcher (ours)"]
        cheapest_other = min(
            result["variants"][k]["extra_ns"]["median"]
            for k in ("greenlet parked on an Event", "greenlet per return")
        )
        result["targets"] = [
            target(
                "our watcher greenlet costs less per cycle than parking or spawning one",
                ours["extra_ns"]["median"] < cheapest_other,
                f"{ours['extra_ns']['median']:,.0f} ns vs {cheapest_other:,.0f} ns",
            )
        ]
        return result
    finally:
        for a, b in pairs:
            a.close()
            b.close()
