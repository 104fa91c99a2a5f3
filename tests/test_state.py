"""The pool's bookkeeping on its own: no sockets, no greenlets."""

from __future__ import annotations

import random

from callosum_gevent._state import CLOSED, HANDED, IDLE, LEASED, RETIRED, Entry, PoolState


def admit(state: PoolState[Entry, object], slot: int) -> tuple[Entry, bool, Entry | None]:
    entry = Entry(slot, object())
    kept, displaced = state.admit(entry)
    if kept:
        state.restore(entry)
    return entry, kept, displaced


def test_lend_lowest_and_retire_highest() -> None:
    state: PoolState[Entry, object] = PoolState(max_slots=3)
    five, _, _ = admit(state, 5)
    one, _, _ = admit(state, 1)
    three, _, _ = admit(state, 3)
    assert state.lend() is one
    _, kept, displaced = admit(state, 9)
    assert not kept and displaced is None
    two, kept, displaced = admit(state, 2)
    assert kept and displaced is five and five.state == CLOSED
    assert [state.lend(), state.lend(), state.lend()] == [two, three, None]
    zero, kept, displaced = admit(state, 0)
    assert displaced is three and three.state == RETIRED
    assert (state.slot_count, state.idle_count, state.leased_count) == (3, 1, 3)
    state.remove(three)
    assert (state.slot_count, state.leased_count) == (3, 2)
    assert state.lend() is zero and zero.state == LEASED


def test_remove_frees_slot_once() -> None:
    state: PoolState[Entry, object] = PoolState(max_slots=2)
    a, _, _ = admit(state, 0)
    state.remove(a)
    state.remove(a)
    assert state.slot_count == 0 and state.idle_count == 0 and a.state == CLOSED


def test_stale_keys_stay_bounded_under_churn() -> None:
    rng = random.Random(7)
    state: PoolState[Entry, object] = PoolState(max_slots=50)
    live: list[Entry] = []
    for _ in range(20_000):
        if len(live) < 50 or rng.random() < 0.5:
            entry, kept, displaced = admit(state, rng.randrange(100))
            if displaced is not None:
                live.remove(displaced)
            if kept:
                live.append(entry)
        else:
            victim = live.pop(rng.randrange(len(live)))
            state.remove(victim)  # an eviction from the middle of both heaps
        idle_keys, slot_keys = state.heap_sizes()
        assert idle_keys <= 2 * state.idle_count + 17
        assert slot_keys <= 2 * state.slot_count + 17
    assert all(e.state == IDLE for e in live) and state.slot_count == len(live)


def test_waiters_fifo_with_cancel_and_requeue_first() -> None:
    state: PoolState[Entry, str] = PoolState(max_slots=1)
    for name in "abcd":
        state.enqueue(name)
    state.cancel("b")
    state.cancel("zz")  # unknown: a no-op
    assert state.dequeue() == "a"
    state.enqueue("a", first=True)
    assert [state.dequeue() for _ in range(4)] == ["a", "c", "d", None]


def test_release_hands_to_the_longest_waiter_else_restores_and_measures_both() -> None:
    state: PoolState[Entry, str] = PoolState(max_slots=2)
    a = Entry(0, object())
    b = Entry(1, object())
    for entry in (a, b):
        state.admit(entry)
    state.enqueue("first")
    state.enqueue("second")
    assert state.release(a, 0.002) == "first" and a.state == HANDED
    assert state.release(b) == "second" and b.state == HANDED
    assert state.release(a, 0.004) is None and a.state == IDLE
    assert state.release(b) is None and b.state == IDLE
    assert a.server.leases == 2 and abs(a.server.avg - 0.003) < 1e-12  # release() measures nothing
    assert [state.lend(), state.lend(), state.lend()] == [a, b, None]
    assert (state.idle_count, state.leased_count) == (0, 2)


def test_handed_entry_closes_when_displaced_or_retired_and_frees_its_slot() -> None:
    # HANDED: given back to a waiter that has not taken it; nobody holds it.
    state: PoolState[Entry, object] = PoolState(max_slots=2)
    low, _, _ = admit(state, 1)
    high, _, _ = admit(state, 5)
    assert state.lend() is low and state.lend() is high
    high.state = HANDED
    _, kept, displaced = admit(state, 0)
    assert kept and displaced is high and high.state == CLOSED
    assert (state.slot_count, state.leased_count) == (2, 1)
    low.state = HANDED
    assert state.retire(low) and low.state == CLOSED
    assert (state.slot_count, state.retired_count, state.leased_count) == (1, 0, 0)
    states = [IDLE, HANDED, LEASED, RETIRED, CLOSED]
    assert states == sorted(states) and RETIRED > LEASED > HANDED  # state >= RETIRED: no slot
