"""Server-side bookkeeping: the lowest free slot, and the server's measured capacity."""

from __future__ import annotations

import heapq

__all__ = ["CapacityEstimator", "ServerSlots"]


class ServerSlots:
    """Number connections with the lowest free non-negative slot.

    ``get()`` and ``put()`` cost O(log n) (amortised) and use memory bounded
    by the highest slot currently handed out, not by the historical peak.
    Pure bookkeeping with no I/O and no locking: use one instance from one
    thread (greenlets of one hub are fine, as no method yields).
    """

    __slots__ = ("_free", "_heap", "_high")

    def __init__(self) -> None:
        # The source of truth is ``_high`` and ``_free``: slots handed out are
        # ``range(_high)`` minus ``_free``. ``_heap`` only finds the minimum
        # of ``_free`` fast; it may hold stale entries (slots no longer in
        # ``_free``, dropped when ``_high`` shrinks), skipped lazily by get().
        self._high = 0
        self._free: set[int] = set()
        self._heap: list[int] = []

    @property
    def in_use(self) -> int:
        """Return how many slots are handed out and not yet put back."""
        return self._high - len(self._free)

    @property
    def high_water(self) -> int:
        """Return one more than the highest slot handed out, or 0 if none is."""
        return self._high

    def get(self) -> int:
        """Hand out the lowest free slot."""
        heap = self._heap
        while heap:
            slot = heapq.heappop(heap)
            if slot in self._free:
                self._free.remove(slot)
                return slot
        slot = self._high
        self._high += 1
        return slot

    def put(self, slot: int) -> None:
        """Give back a slot handed out by get(); reject anything else unchanged."""
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int, got {type(slot).__name__}")
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        if slot >= self._high:
            raise ValueError(f"slot {slot} was never handed out")
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        if slot == self._high - 1:
            self._shrink(slot)
        else:
            self._free.add(slot)
            heapq.heappush(self._heap, slot)

    def _shrink(self, top: int) -> None:
        """Lower the high-water mark past ``top`` and the free slots under it."""
        high = top
        while high and high - 1 in self._free:
            high -= 1
            self._free.remove(high)
        self._high = high
        # Rebuild once stale entries outnumber live ones, so the heap stays
        # within twice the free set at amortised O(log n) per operation.
        if len(self._heap) > 2 * len(self._free) + 8:
            self._heap = sorted(self._free)

    def __len__(self) -> int:
        return self.in_use

    def __repr__(self) -> str:
        return f"<ServerSlots in_use={self.in_use} free={len(self._free)} high_water={self._high}>"


class CapacityEstimator:
    """Estimate a server's capacity: requests completed per second of busy time.

    The server is busy while at least one request is in flight. Dividing the
    requests completed by the busy time measures how fast the server works
    however many requests overlap: a gevent server interleaves its requests
    on one CPU, so each request's own duration grows with the number in
    flight while the work done per busy second does not.

    The first estimate comes from the first ``blackout`` requests together,
    and nothing is trusted before: :attr:`rate` stays None. After that, every
    ``window`` requests give a new sample, blended into :attr:`rate` with
    weight ``smoothing`` (an exponentially weighted moving average).

    Pure bookkeeping: the caller passes the time (any monotonic clock, in
    seconds), so the estimator is tested without sleeping.
    """

    __slots__ = (
        "_blackout",
        "_busy",
        "_busy_since",
        "_completed",
        "_count",
        "_due",
        "_in_flight",
        "_rate",
        "_smoothing",
        "_window",
    )

    def __init__(self, *, window: int = 50, blackout: int = 200, smoothing: float = 0.2) -> None:
        for name, value in (("window", window), ("blackout", blackout)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
            raise TypeError(f"smoothing must be a number, got {type(smoothing).__name__}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self._window = window
        self._blackout = blackout
        self._smoothing = float(smoothing)
        self._in_flight = 0
        self._completed = 0
        self._count = 0  # requests completed in the current window
        self._due = blackout  # the count that closes the current window
        self._busy = 0.0  # busy seconds of the current window, up to _busy_since
        self._busy_since = 0.0
        self._rate: float | None = None

    @property
    def rate(self) -> float | None:
        """Return the trusted estimate in requests per busy second, or None yet."""
        return self._rate

    @property
    def in_flight(self) -> int:
        """Return how many requests have started and not finished."""
        return self._in_flight

    @property
    def completed(self) -> int:
        """Return how many requests have finished."""
        return self._completed

    def start(self, now: float) -> None:
        """Record that a request started at ``now``."""
        if not self._in_flight:
            self._busy_since = now
        self._in_flight += 1

    def finish(self, now: float) -> float | None:
        """Record that a request finished at ``now``; return the new rate if it changed."""
        # On every request's path: locals and no calls until a window closes.
        in_flight = self._in_flight - 1
        if in_flight < 0:
            raise RuntimeError("finish() without a matching start()")
        self._in_flight = in_flight
        self._completed += 1
        count = self._count = self._count + 1
        if not in_flight and now > self._busy_since:
            self._busy += now - self._busy_since
        if count < self._due:
            return None
        return self._close_window(now)

    def _close_window(self, now: float) -> float | None:
        busy = self._busy
        if self._in_flight and now > self._busy_since:
            # The busy stretch goes on: its part so far belongs to this window.
            busy += now - self._busy_since
            self._busy_since = now
        count, self._count, self._busy = self._count, 0, 0.0
        if busy <= 0.0:
            return None  # the clock did not move: no information
        sample = count / busy
        rate = self._rate
        self._rate = sample if rate is None else rate + self._smoothing * (sample - rate)
        self._due = self._window
        return self._rate

    def __repr__(self) -> str:
        return (
            f"<CapacityEstimator rate={self._rate} in_flight={self._in_flight} "
            f"completed={self._completed}>"
        )
