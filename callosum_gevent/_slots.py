"""Slot bookkeeping for a Callosum server: hand out the lowest free slot."""

from __future__ import annotations

import heapq

__all__ = ["ServerSlots"]


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
