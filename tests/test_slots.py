"""ServerSlots: lowest free slot first, strict put, bounded memory."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from callosum_gevent import ServerSlots


def take(slots: ServerSlots, n: int) -> list[int]:
    return [slots.get() for _ in range(n)]


def test_hands_out_lowest_free_slot_first() -> None:
    slots = ServerSlots()
    assert take(slots, 3) == [0, 1, 2]
    slots.put(1)
    assert slots.get() == 1
    slots.put(2)
    slots.put(0)
    assert take(slots, 3) == [0, 2, 3]
    assert slots.in_use == len(slots) == 4


def test_freeing_the_top_slots_lowers_the_high_water_mark() -> None:
    slots = ServerSlots()
    take(slots, 10)
    for slot in (3, 5, 9, 8):
        slots.put(slot)
    assert slots.high_water == 8
    slots.put(7)
    slots.put(6)
    assert slots.high_water == 5
    assert take(slots, 3) == [3, 5, 6]
    for slot in (0, 1, 2, 4, 6, 5, 3):
        slots.put(slot)
    assert (slots.in_use, slots.high_water) == (0, 0)
    assert repr(slots) == "<ServerSlots in_use=0 free=0 high_water=0>"
    assert slots.get() == 0


@pytest.mark.parametrize(
    ("slot", "error"),
    [
        (1, ValueError),  # already free
        (3, ValueError),  # never handed out
        (-1, ValueError),
        (True, TypeError),
        (False, TypeError),
        ("0", TypeError),
        (0.0, TypeError),
        (None, TypeError),
    ],
)
def test_rejected_put_changes_nothing(slot: Any, error: type[Exception]) -> None:
    slots = ServerSlots()
    take(slots, 3)
    slots.put(1)
    before = repr(slots)
    with pytest.raises(error):
        slots.put(slot)
    assert repr(slots) == before
    assert take(slots, 3) == [1, 3, 4]


def test_double_put_does_not_hand_a_slot_out_twice() -> None:
    # The original npm package accepted this, and get() then gave 0, 0, 2.
    slots = ServerSlots()
    take(slots, 2)
    slots.put(0)
    with pytest.raises(ValueError, match="already free"):
        slots.put(0)
    assert take(slots, 2) == [0, 2]


def test_memory_stays_bounded_after_a_spike() -> None:
    slots = ServerSlots()
    take(slots, 10_000)
    for slot in range(0, 10_000, 2):
        slots.put(slot)
    for slot in range(9_999, 0, -2):
        slots.put(slot)
    assert (slots.in_use, slots.high_water) == (0, 0)
    # Only get() and put() are public; the heap is checked to prove the bound.
    assert len(slots._heap) <= 8


class SlotsAgainstModel(RuleBasedStateMachine):
    """Compare ServerSlots with the obvious model: a set of used slots."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = ServerSlots()
        self.used: set[int] = set()

    @rule()
    def get(self) -> None:
        expected = min(set(range(len(self.used) + 1)) - self.used)
        assert self.slots.get() == expected
        self.used.add(expected)

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def put_used(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.used)))
        self.slots.put(slot)
        self.used.remove(slot)

    @rule(slot=st.integers(min_value=-3, max_value=40))
    def put_unused(self, slot: int) -> None:
        if slot in self.used:
            return
        before = repr(self.slots)
        with pytest.raises(ValueError):
            self.slots.put(slot)
        assert repr(self.slots) == before

    @invariant()
    def counts_match(self) -> None:
        assert self.slots.in_use == len(self.used)
        assert self.slots.high_water == max(self.used, default=-1) + 1


TestSlotsAgainstModel = SlotsAgainstModel.TestCase
