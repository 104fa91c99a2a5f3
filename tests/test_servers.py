"""Per-server bookkeeping on its own, and as the pool state files connections."""

from __future__ import annotations

import pytest

from callosum_gevent._servers import ALPHA, EARLY_DEATH_S, OUTLIER, Server
from callosum_gevent._state import CLOSED, IDLE, LEASED, RETIRED, Entry, PoolState


def test_lease_average_starts_at_first_sample_and_decays() -> None:
    server = Server("a")
    assert not server.measured
    server.lease(0.010)
    assert server.measured and server.avg == pytest.approx(0.010)
    server.lease(0.020)
    # The first 1/ALPHA leases are averaged plainly, then they decay.
    assert server.avg == pytest.approx(0.015)
    warm = round(1 / ALPHA)
    for _ in range(warm - 2):
        server.lease(0.015)
    assert server.avg == pytest.approx(0.015)
    server.lease(0.025)
    assert server.avg == pytest.approx(0.015 + 0.010 * ALPHA)
    for _ in range(2000):
        server.lease(0.002)
    assert server.avg == pytest.approx(0.002, rel=1e-6)
    assert server.leases == warm + 1 + 2000


def test_deaths_are_counted_by_kind_and_age() -> None:
    server = Server("a")
    assert server.died(0.01, evicted=True)
    assert server.died(EARLY_DEATH_S / 2, evicted=False)
    assert not server.died(EARLY_DEATH_S, evicted=False)
    assert not server.died(600.0, evicted=True)
    assert (server.evictions, server.errors, server.early_deaths) == (2, 2, 2)


def make(state: PoolState[Entry, object], slot: int, server_id: str) -> tuple[Entry, bool]:
    entry = Entry(slot, object(), state.server(server_id))
    kept, _ = state.admit(entry)
    if kept:
        state.restore(entry)
    return entry, kept


def test_state_files_connections_by_server() -> None:
    state: PoolState[Entry, object] = PoolState(max_slots=3)
    a0, _ = make(state, 0, "a")
    make(state, 1, "b")
    a2, _ = make(state, 2, "a")
    assert state.lend() is a0
    stats = state.server_stats()
    assert stats["a"]["connections"] == 2 and stats["a"]["idle"] == 1
    assert stats["a"]["leased"] == 1 and stats["b"]["idle"] == 1
    assert stats["a"]["latency_ms"] is None
    # A lower slot from b displaces a's idle slot 2: retired and closed.
    _, kept = make(state, 0, "b")
    assert kept and a2.state == CLOSED
    stats = state.server_stats()
    assert stats["a"]["retired_total"] == 1 and stats["a"]["connections"] == 1
    assert stats["b"]["connections"] == 2


def test_retire_closes_idle_and_retires_lent() -> None:
    state: PoolState[Entry, object] = PoolState(max_slots=4)
    a0, _ = make(state, 0, "a")
    a1, _ = make(state, 1, "a")
    assert state.lend() is a0
    assert not state.retire(a0) and a0.state == RETIRED
    assert state.retire(a1) and a1.state == CLOSED
    assert not state.retire(a1)  # already closed: left alone
    assert (state.slot_count, state.idle_count, state.leased_count) == (0, 0, 1)
    assert state.server_stats()["a"]["retired_total"] == 2
    state.remove(a0)
    assert state.leased_count == 0 and not state.servers["a"].entries


def test_entry_without_server_is_filed_under_none() -> None:
    state: PoolState[Entry, object] = PoolState(max_slots=1)
    entry = Entry(0, object())
    state.admit(entry)
    assert entry.server is state.servers[None] and entry.state == LEASED
    state.restore(entry)
    assert entry.state == IDLE


def test_one_long_lease_does_not_bury_a_fast_server() -> None:
    # A borrower that streams or sleeps while holding a connection says little
    # about the server: one 10 s lease on a 2 ms server must not rank it 100x
    # worse (before the clamp it did, for ~220 leases it would then rarely get).
    server = Server("a")
    for _ in range(round(1 / ALPHA) + 10):
        server.lease(0.002)
    server.lease(10.0)
    assert server.avg < 0.002 * (1 + ALPHA * OUTLIER)
    # A real slowdown still shows: ten times slower is within the clamp.
    for _ in range(200):
        server.lease(0.020)
    assert server.avg == pytest.approx(0.020, rel=0.05)
