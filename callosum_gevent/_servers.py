"""Per-server bookkeeping: counters and the decaying lease-time average.

Pure like ``_state.py``: nothing here reads a clock or touches a socket. The
client passes durations and ages in seconds; this module only does the sums.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Final

#: A connection that dies (evicted by its watcher, found dead at hand-out or
#: return, or discarded) within this many seconds of its admission counts as an
#: early death. A backend that accepts and then drops or refuses to serve kills
#: its connections within a round trip or two (milliseconds); a healthy one
#: keeps them for minutes, and a silent peer is found only by keepalive (25 s by
#: default). Three seconds also catches a backend that drops after a short
#: server-side timeout, while a connection killed by an ordinary restart counts
#: only if the restart came within seconds of its admission.
EARLY_DEATH_S: Final = 3.0

#: Weight of each new lease time in the per-server average (see ``Server.lease``).
ALPHA: Final = 0.2


class Server:
    """What the client knows about one server: its connections and its history.

    ``avg`` is the decaying average lease time in seconds, negative until the
    first lease is measured. ``entries`` holds the connections to this server
    that the client still owns (idle, lent or retired while lent).
    """

    __slots__ = (
        "avg",
        "early_deaths",
        "entries",
        "errors",
        "evictions",
        "id",
        "leases",
        "retired",
    )

    def __init__(self, server_id: Hashable) -> None:
        self.id = server_id
        self.entries: set[Any] = set()
        self.avg = -1.0
        self.leases = 0
        self.errors = 0
        self.evictions = 0
        self.early_deaths = 0
        self.retired = 0

    def __repr__(self) -> str:
        return f"<Server {self.id!r} conns={len(self.entries)} avg={self.avg:.6f}>"

    @property
    def measured(self) -> bool:
        """Whether at least one lease time was recorded."""
        return self.avg >= 0.0

    def lease(self, seconds: float) -> None:
        """Record a lease that ended normally after ``seconds``."""
        self.leases += 1
        avg = self.avg
        self.avg = seconds if avg < 0.0 else avg + (seconds - avg) * ALPHA

    def died(self, age: float, *, evicted: bool) -> bool:
        """Record a connection that died ``age`` seconds after admission.

        ``evicted``: its watcher found it dead while idle; otherwise it was found
        dead at hand-out or return, or discarded. Return whether it died early.
        """
        if evicted:
            self.evictions += 1
        else:
            self.errors += 1
        if age < EARLY_DEATH_S:
            self.early_deaths += 1
            return True
        return False
