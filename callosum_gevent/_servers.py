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
#: Lease times are noisy (service times vary, queueing adds more): with a
#: coefficient of variation near 1, an average with weight a wanders by about
#: sqrt(a / (2 - a)) of itself, 33% at 0.2 but 10% at 0.02. Fed exponential
#: lease times, the average leaves its +-25% band (a re-key) 290 times per
#: 1000 leases at 0.2, 108 at 0.1, 32 at 0.05 and 5 at 0.02; after a 3x
#: slowdown the key has doubled within 5, 13, 33 and 48 leases. 0.02 keeps
#: re-keying off the hot path and ranks steady on noise; short balance runs
#: (1:1:2:4 at 70%) gave p99 0.74-0.82x the oracle's at 0.02, 0.88-0.89x at 0.2,
#: and after a fast server turned 3x slower, p99 from 10 s on was 1.09x and
#: 0.98x the oracle's (settled after 18 s and 8 s). Rising faster than falling
#: (0.06 up) did no better there (1.00x, 0.98x) and biases the average upwards.
#: The first 1/ALPHA leases are averaged plainly (weight 1/n), so one odd
#: first sample does not linger.
ALPHA: Final = 0.02
_WARM: Final = round(1 / ALPHA)

#: Once warm, a lease counts at most OUTLIER times the average. A borrower that
#: streams, or sleeps holding its connection, says little about the server: one
#: 10 s lease on a 2 ms server moved the average 100x, and the server, ranked
#: last, then got too few leases (~220 needed) to recover. Clamped, one such
#: lease moves it 1.3x; a real slowdown (3x, 10x) is inside the clamp, and a
#: stall still compounds 1.3x per lease. Cut leases (``cut``) are not clamped:
#: a borrower gave up on the server.
OUTLIER: Final = 16.0

#: An early death doubles its server's rank; the doubling decays by half every
#: PENALTY_HALF_LIFE seconds, up to PENALTY_MAX_DOUBLINGS at once.
PENALTY_HALF_LIFE: Final = 30.0
PENALTY_MAX_DOUBLINGS: Final = 10.0

#: A server's rank key is re-computed only when its average leaves this band
#: around the average the key was computed from.
BAND: Final = 1.25


class Server:
    """What the client knows about one server: its connections and its history.

    ``avg`` is the decaying average lease time in seconds, negative until the
    first lease is measured. ``entries`` holds the connections to this server
    that the client still owns (idle, lent or retired while lent).

    ``key`` is the integer rank multiplier the pool state files this server's
    idle connections under (``_state.PoolState.rekey`` sets it), and
    ``band_lo``/``band_hi`` the range of ``avg`` within which it stays
    valid. ``penalty`` counts doublings of the rank for early deaths, as of
    time ``penalised_at`` (the client's clock), and ``factor`` is 2**penalty.
    """

    __slots__ = (
        "avg",
        "band_hi",
        "band_lo",
        "early_deaths",
        "entries",
        "errors",
        "evictions",
        "factor",
        "id",
        "key",
        "leases",
        "penalised_at",
        "penalty",
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
        self.key = 1
        # An empty band: the first lease asks for a key from its measurement.
        self.band_lo = float("inf")
        self.band_hi = float("-inf")
        self.penalty = 0.0
        self.penalised_at = 0.0
        self.factor = 1.0

    def __repr__(self) -> str:
        return f"<Server {self.id!r} conns={len(self.entries)} avg={self.avg:.6f}>"

    @property
    def measured(self) -> bool:
        """Whether at least one lease time was recorded."""
        return self.avg >= 0.0

    def lease(self, seconds: float) -> bool:
        """Record a lease that ended normally after ``seconds``.

        Return whether the average left the band of the server's rank key,
        so that the pool state must re-key it.
        """
        self.leases = n = self.leases + 1
        avg = self.avg
        if n > _WARM:
            limit = avg * OUTLIER
            avg += ((seconds if seconds < limit else limit) - avg) * ALPHA
        else:
            avg += (seconds - avg) / n
        self.avg = avg
        return avg < self.band_lo or avg > self.band_hi

    def cut(self, seconds: float) -> bool:
        """Record a lease cut short after ``seconds`` (a lower bound on its time).

        It moves the average as a lease would, but is not counted in
        ``leases``: it served nothing. Return whether the average left the band.
        """
        avg = self.avg
        weight = ALPHA if self.leases >= _WARM else 1.0 / (self.leases + 1)
        self.avg = avg = avg + (seconds - avg) * weight
        return avg < self.band_lo or avg > self.band_hi

    def penalise(self, now: float) -> None:
        """Double the rank for an early death at ``now`` (seconds, any clock)."""
        self.decay(now)
        self.penalty = min(self.penalty + 1.0, PENALTY_MAX_DOUBLINGS)
        self.factor = 2.0**self.penalty

    def decay(self, now: float) -> None:
        """Let the penalty decay until ``now``: the doublings fall by one per half-life."""
        if self.penalty > 0.0:
            left = self.penalty - (now - self.penalised_at) / PENALTY_HALF_LIFE
            self.penalty = left if left > 0.0 else 0.0
            self.factor = 2.0**self.penalty
        self.penalised_at = now

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
