"""Ranked lending in the bookkeeping alone: no sockets, no greenlets, no clocks.

A Hypothesis state machine drives the pool state beside a plain model: after
every step each lend takes the idle connection with the lowest
(slot + 1) x server key (arrival order on ties), the lowest slot among its own
server's, every server's key matches its average and penalty within the
band, and no connection is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from callosum_gevent._servers import BAND, PENALTY_HALF_LIFE
from callosum_gevent._state import CLOSED, IDLE, LEASED, RETIRED, SWAP_RATIO, Entry, PoolState

State = PoolState[Entry, object]


def make(state: State, slot: int, server_id: str) -> tuple[Entry, bool, Entry | None]:
    entry = Entry(slot, object(), state.server(server_id))
    kept, displaced = state.admit(entry)
    if kept:
        state.restore(entry)
    return entry, kept, displaced


def give_back(state: State, entry: Entry, seconds: float) -> None:
    """Hand back a lent entry after a lease of ``seconds``, as the client does."""
    assert state.release(entry, seconds) is None  # nobody waits here: it is idle again


def measure(state: State, server_id: str, seconds: float, times: int = 1) -> None:
    server = state.servers[server_id]
    for _ in range(times):
        if server.lease(seconds):
            state.rekey(server)


def test_lends_by_slot_times_server_average() -> None:
    state: State = PoolState(max_slots=8)
    slow0, _, _ = make(state, 0, "slow")
    fast = [make(state, slot, "fast")[0] for slot in (0, 1, 2, 3)]
    measure(state, "slow", 0.040)
    measure(state, "fast", 0.010)
    # ranks: fast 1,2,3,4 x 10 ms; slow 1 x 40 ms: ties go to arrival (slow first).
    assert [state.lend() for _ in range(5)] == [fast[0], fast[1], fast[2], slow0, fast[3]]


def test_unmeasured_server_ranks_as_the_mean_of_the_measured() -> None:
    state: State = PoolState(max_slots=8)
    a, _, _ = make(state, 1, "a")
    b, _, _ = make(state, 1, "b")
    c, _, _ = make(state, 1, "new")
    measure(state, "a", 0.010)
    measure(state, "b", 0.030)
    assert state.servers["new"].key == round(0.020 * 1e6)
    assert [state.lend() for _ in range(3)] == [a, c, b]


def test_rank_slot_keeps_the_seed_rule_whatever_the_speeds() -> None:
    state: State = PoolState(max_slots=8, rank="slot")
    entries = [make(state, slot, server)[0] for slot, server in ((2, "a"), (0, "b"), (1, "a"))]
    measure(state, "b", 5.0, times=3)
    measure(state, "a", 0.001, times=3)
    assert state.servers["a"].key == state.servers["b"].key == 1
    assert [state.lend() for _ in range(3)] == [entries[1], entries[2], entries[0]]


def test_key_moves_only_when_the_average_leaves_its_band() -> None:
    state: State = PoolState(max_slots=4)
    make(state, 0, "a")
    server = state.servers["a"]
    measure(state, "a", 0.010)
    key = server.key
    assert key == 10_000 and server.band_lo < 0.010 < server.band_hi
    idle_keys, _ = state.heap_sizes()
    measure(state, "a", 0.011, times=5)  # within 25%: no re-key, no new heap keys
    assert server.key == key and state.heap_sizes()[0] == idle_keys
    measure(state, "a", 0.100, times=40)
    assert server.key > key * BAND and server.band_lo <= server.avg <= server.band_hi


def test_early_deaths_double_the_rank_and_the_doubling_decays() -> None:
    state: State = PoolState(max_slots=4)
    bad, _, _ = make(state, 0, "bad")
    good, _, _ = make(state, 1, "good")
    measure(state, "bad", 0.010)
    measure(state, "good", 0.010)
    assert state.lend() is bad
    state.restore(bad)
    state.penalise(state.servers["bad"], now=100.0)
    state.penalise(state.servers["bad"], now=100.0)
    assert state.servers["bad"].key == 40_000  # x4: now behind good's slot 1
    assert state.lend() is good
    state.restore(good)
    state.tick(100.0 + PENALTY_HALF_LIFE)
    assert state.servers["bad"].key == 20_000
    state.tick(100.0 + 3 * PENALTY_HALF_LIFE)
    assert state.servers["bad"].key == 10_000 and state.servers["bad"].penalty == 0.0
    assert state.lend() is bad


def test_equal_slot_offer_from_a_faster_or_untried_server_displaces() -> None:
    state: State = PoolState(max_slots=1)
    slow, _, _ = make(state, 0, "slow")
    # Neither measured: an idle client does not swap back and forth.
    _, kept, _ = make(state, 0, "fast")
    assert not kept
    measure(state, "slow", 0.040)
    # The held server is measured, the offered one untried: try it.
    fast, kept, displaced = make(state, 0, "fast")
    assert kept and displaced is slow and slow.state == CLOSED
    measure(state, "fast", 0.010)
    # Slower, or from the held server: turned down. A lower slot still wins.
    assert not make(state, 0, "slow")[1]
    assert not make(state, 0, "fast")[1]
    assert not make(state, 1, "fast")[1]
    # Every untried server gets its one turn, and loses the slot to a faster one.
    other, kept, displaced = make(state, 0, "other")
    assert kept and displaced is fast
    measure(state, "other", 0.050)
    again, kept, displaced = make(state, 0, "fast")
    assert kept and displaced is other
    assert state.lend() is again
    assert not state.retire(again) and again.state == RETIRED


def test_equal_slot_offer_not_taken_from_a_penalised_server() -> None:
    state: State = PoolState(max_slots=1)
    make(state, 0, "held")
    measure(state, "held", 0.040)
    state.penalise(state.server("sink"), now=0.0)
    assert not make(state, 0, "sink")[1]


def test_equal_slot_offer_not_taken_from_an_untried_server_once_penalised() -> None:
    # An untried server whose connection died young is a sinkhole until a
    # lease on it proves otherwise: once its penalty has decayed it must not
    # take a one-slot client's only (measured, healthy) slot every half-life.
    state: State = PoolState(max_slots=1)
    make(state, 0, "held")
    measure(state, "held", 0.040)
    assert state.server("sink").died(0.001, evicted=True)
    state.penalise(state.server("sink"), now=0.0)
    state.tick(10 * PENALTY_HALF_LIFE)
    assert state.servers["sink"].penalty == 0.0
    assert not make(state, 0, "sink")[1]


def test_rank_slot_never_displaces_at_equal_slot() -> None:
    state: State = PoolState(max_slots=1, rank="slot")
    make(state, 0, "slow")
    measure(state, "slow", 0.040)
    assert not make(state, 0, "fast")[1]


def test_bad_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="rank"):
        PoolState(max_slots=1, rank="fastest")


# -- the model ---------------------------------------------------------------


@dataclass
class Item:
    entry: Entry
    server: str
    slot: int
    seq: int


SERVERS = ("a", "b", "c", "d", "e", "f")


class RankModel(RuleBasedStateMachine):
    """The state beside a list of what it holds; ranks come from the servers' keys."""

    def __init__(self) -> None:
        super().__init__()
        self.state: State = PoolState(max_slots=4)
        self.items: list[Item] = []
        self.seq = 0
        self.now = 0.0

    def with_state(self, *states: int) -> list[Item]:
        return [i for i in self.items if i.entry.state in states]

    def rank(self, item: Item) -> tuple[int, int]:
        return ((item.slot + 1) * self.state.servers[item.server].key, item.seq)

    def displaces(self, offered: str, held: str) -> bool:
        """The equal-slot rule, spelled out: held measured, offered untried or 1.25x faster."""
        a, h = self.state.server(offered), self.state.servers[held]
        if offered == held or not h.measured or a.penalty > 0:
            return False
        if not a.measured:
            return a.early_deaths == 0
        return h.avg * h.factor > SWAP_RATIO * a.avg * a.factor

    @rule(slot=st.integers(0, 2), server=st.sampled_from(SERVERS))
    def offer(self, slot: int, server: str) -> None:
        holders = self.with_state(IDLE, LEASED)
        worst = max(holders, key=lambda i: (i.slot, i.seq)) if holders else None
        if len(holders) < self.state.max_slots:
            want, gone = True, None
        else:
            assert worst is not None
            want = slot < worst.slot or (
                slot == worst.slot and self.displaces(server, worst.server)
            )
            gone = worst if want else None
        self.seq += 1
        entry = Entry(slot, object(), self.state.server(server))
        kept, displaced = self.state.admit(entry)
        assert kept == want
        assert displaced is (None if gone is None else gone.entry)
        if kept:
            self.items.append(Item(entry, server, slot, self.seq))
            self.state.restore(entry)
        if displaced is not None:
            assert displaced.state in (CLOSED, RETIRED)

    @precondition(lambda self: self.with_state(IDLE, LEASED))
    @rule(data=st.data())
    def retire(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self.with_state(IDLE, LEASED)))
        was_idle = item.entry.state == IDLE
        assert self.state.retire(item.entry) == was_idle

    @rule()
    def lend(self) -> None:
        idle = self.with_state(IDLE)
        entry = self.state.lend()
        if not idle:
            assert entry is None
            return
        best = min(idle, key=self.rank)
        assert entry is best.entry and entry.state == LEASED
        same = [i for i in idle if i.server == best.server]
        assert (best.slot, best.seq) == min((i.slot, i.seq) for i in same)

    @precondition(lambda self: self.with_state(LEASED))
    @rule(data=st.data(), seconds=st.floats(0.0, 0.2))
    def give_back(self, data: st.DataObject, seconds: float) -> None:
        item = data.draw(st.sampled_from(self.with_state(LEASED)))
        give_back(self.state, item.entry, seconds)

    @rule(server=st.sampled_from(SERVERS), seconds=st.floats(0.0, 0.2))
    def lease_elsewhere(self, server: str, seconds: float) -> None:
        # A lease another connection to this server ended (it may hold none here).
        measure(self.state, self.state.server(server).id, seconds)

    @precondition(lambda self: self.with_state(IDLE, LEASED, RETIRED))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self.with_state(IDLE, LEASED, RETIRED)))
        self.state.remove(item.entry)

    @rule(server=st.sampled_from(SERVERS), seconds=st.floats(0.0, 2.0))
    def cut(self, server: str, seconds: float) -> None:
        # A lease discarded after longer than the average, as the client does.
        known = self.state.server(server)
        leases = known.leases
        if known.measured and seconds > known.avg and known.cut(seconds):
            self.state.rekey(known)
        assert known.leases == leases

    @rule(server=st.sampled_from(SERVERS), later=st.floats(0.0, 40.0))
    def penalise(self, server: str, later: float) -> None:
        self.now += later
        # As the client does: an early death is recorded, then penalised.
        assert self.state.server(server).died(0.0, evicted=True)
        self.state.penalise(self.state.server(server), self.now)

    @rule(later=st.floats(0.0, 40.0))
    def tick(self, later: float) -> None:
        self.now += later
        self.state.tick(self.now)

    @invariant()
    def counts_agree(self) -> None:
        state = self.state
        assert state.idle_count == len(self.with_state(IDLE))
        assert state.slot_count == len(self.with_state(IDLE, LEASED)) <= state.max_slots
        assert state.leased_count == len(self.with_state(LEASED, RETIRED))
        assert {id(e) for e in state.idle_entries()} == {id(i.entry) for i in self.with_state(IDLE)}

    @invariant()
    def keys_follow_averages(self) -> None:
        for server in self.state.servers.values():
            assert server.key >= 1
            if server.measured:
                assert server.band_lo <= server.avg <= server.band_hi
                want = max(server.avg, 1e-6) * server.factor * 1e6
                assert server.key <= want * BAND + 1 and server.key >= want / BAND - 1


TestRankModel = RankModel.TestCase
TestRankModel.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
