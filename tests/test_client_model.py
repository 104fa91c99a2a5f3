"""The client and a plain reference model, driven side by side by Hypothesis.

After every step: slot_count <= max_slots and every count agrees with the
model; a lent socket is always the lowest idle slot; every socket ever offered
is pooled, lent or closed, exactly as the model says: none lost, none left open.
"""

from __future__ import annotations

from typing import Any

import gevent
import pytest
from _model import CLOSED, IDLE, LEASED, RETIRED, Conn, PoolModel
from _peers import PeerServer, is_closed, wait_until
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from callosum_gevent import CallosumClient, PoolClosed, PoolTimeout


class ClientModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.peers = PeerServer()
        self.model = PoolModel(max_slots=1)
        self.closed = False

    @initialize(max_slots=st.integers(1, 4), rank=st.sampled_from(["latency", "slot"]))
    def start(self, max_slots: int, rank: str) -> None:
        # One server: lending by latency rank must equal lowest slot first.
        self.model = PoolModel(max_slots)
        self.client = CallosumClient(max_slots=max_slots, rank=rank)

    # -- helpers -------------------------------------------------------------

    def with_status(self, *statuses: str) -> list[Conn]:
        return self.model.with_status(*statuses)

    def pick(self, data: st.DataObject, *statuses: str) -> Conn:
        return data.draw(st.sampled_from(self.with_status(*statuses)))

    # -- rules -----------------------------------------------------------------

    @rule(slot=st.integers(0, 6))
    def offer(self, slot: int) -> None:
        conn, kept = self.model.offer(self.peers, slot, closed=self.closed)
        assert self.client.new_connection(slot, conn.sock) is kept

    @rule()
    def lend(self) -> None:
        lowest = self.model.lowest_idle()
        if self.closed:
            with pytest.raises(PoolClosed):
                self.client.get_connection(timeout=0)
        elif lowest is None:
            with pytest.raises(PoolTimeout):
                self.client.get_connection(timeout=0)
        else:
            assert self.client.get_connection(timeout=0) is lowest.sock
            lowest.status = LEASED

    @precondition(lambda self: self.with_status(LEASED, RETIRED))
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        conn = self.pick(data, LEASED, RETIRED)
        self.client.return_connection(conn.sock)
        fit = conn.status == LEASED and not self.closed and not conn.peer_gone
        conn.status = IDLE if fit else CLOSED

    @precondition(lambda self: self.with_status(LEASED, RETIRED))
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        conn = self.pick(data, LEASED, RETIRED)
        self.client.discard_connection(conn.sock)
        conn.status = CLOSED

    @precondition(lambda self: any(not c.peer_gone for c in self.with_status(IDLE, LEASED)))
    @rule(data=st.data())
    def remote_close(self, data: st.DataObject) -> None:
        conn = data.draw(
            st.sampled_from([c for c in self.with_status(IDLE, LEASED) if not c.peer_gone])
        )
        conn.peer.close()
        conn.peer_gone = True
        if conn.status == IDLE:
            # The watcher evicts it on the hub's next turn.
            assert wait_until(lambda: is_closed(conn.sock), timeout=5)
            conn.status = CLOSED
        else:
            gevent.sleep(0.002)  # the FIN arrives; the borrower still owns the socket

    @rule()
    def close(self) -> None:
        self.client.close()
        self.closed = True
        for conn in self.with_status(IDLE):
            conn.status = CLOSED

    @rule(slot=st.one_of(st.integers(max_value=-1), st.booleans(), st.text(max_size=2)))
    def bad_offer(self, slot: Any) -> None:
        sock, _ = self.peers.connect()
        before = self.client.stats()
        with pytest.raises((TypeError, ValueError), match="slot"):
            self.client.new_connection(slot, sock)
        assert self.client.stats() == before and not is_closed(sock)
        sock.close()

    @rule()
    def bad_return(self) -> None:
        sock, _ = self.peers.connect()
        before = self.client.stats()
        for method in (self.client.return_connection, self.client.discard_connection):
            with pytest.raises(ValueError, match="not lent"):
                method(sock)
        assert self.client.stats() == before and not is_closed(sock)
        sock.close()

    # -- invariants -------------------------------------------------------------

    @invariant()
    def counts_agree(self) -> None:
        if not hasattr(self, "client"):
            return
        holders = len(self.with_status(IDLE, LEASED))
        assert self.client.slot_count == holders <= self.model.max_slots
        assert self.client.idle_count == len(self.with_status(IDLE))
        assert self.client.leased_count == len(self.with_status(LEASED, RETIRED))

    @invariant()
    def nothing_lost_nothing_left_open(self) -> None:
        for conn in self.model.conns:
            assert is_closed(conn.sock) == (conn.status == CLOSED), conn

    def teardown(self) -> None:
        try:
            if hasattr(self, "client"):
                self.client.close()
                for conn in self.with_status(LEASED, RETIRED):
                    self.client.return_connection(conn.sock)
                    conn.status = CLOSED
                assert all(is_closed(c.sock) for c in self.model.conns)
                assert self.client.slot_count == self.client.leased_count == 0
        finally:
            self.peers.stop()


ClientModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestClientModel = pytest.mark.timeout(120)(ClientModel.TestCase)
