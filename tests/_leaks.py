"""Count what a test could leak: file descriptors, live greenlets, errors escaping greenlets."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.socket
from gevent.threadpool import _WorkerGreenlet
from greenlet import greenlet

__all__ = ["HubErrors", "live_greenlets", "open_fds", "warm_up"]


def open_fds() -> int:
    """Return how many file descriptors this process has open, once it has settled.

    Earlier tests may leave sockets whose peers are still closing, and
    unreachable ones waiting for the garbage collector: let both finish first.
    """
    gevent.sleep(0.05)
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def warm_up() -> None:
    """Start what gevent starts once and keeps: the resolver's thread pool and its wakeup fd."""
    gevent.socket.getaddrinfo("127.0.0.1", 1)


def live_greenlets() -> int:
    """Count this thread's greenlets that have not finished, the hub and main included.

    The threads of gevent's resolver pool, which grows on demand and stays,
    are left out: their greenlets are the pool's, not the code under test's.
    """
    gc.collect()
    main = greenlet.getcurrent()
    while main.parent is not None:
        main = main.parent
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, greenlet)
        and not obj.dead
        and (obj.parent is not None or obj is main)
        and not isinstance(obj, _WorkerGreenlet)
    )


class HubErrors:
    """Record every error the hub reports, i.e. every exception that escapes a greenlet."""

    def __init__(self) -> None:
        self.errors: list[tuple[Any, type[BaseException] | None, BaseException | None]] = []

    @contextmanager
    def recording(self) -> Iterator[HubErrors]:
        hub = gevent.get_hub()
        original = hub.handle_error

        def handle_error(context: Any, type_: Any, value: Any, tb: Any) -> None:
            self.errors.append((context, type_, value))
            original(context, type_, value, tb)

        hub.handle_error = handle_error
        try:
            yield self
        finally:
            # The instance attribute shadows the method; removing it restores the method.
            del hub.handle_error
