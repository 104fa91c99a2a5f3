"""Waiters under Hypothesis: greenlets queue, are served first come, first served, or are killed.

A plain model predicts which waiting greenlet receives which connection;
after every step the counts agree, every finished waiter holds the socket the
model gave it, no socket is held by two borrowers, and no socket is lost or
left open. Borrowers also misbehave: they give a socket back twice while it
is on its way to a waiter, return or discard one already idle, and leave a
``with`` block whose socket they gave back themselves and which may since have
been lent again, or enter or leave a lease whose with block still waits in
another greenlet; each must be refused or ignored, changing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gevent
import pytest
from _model import CLOSED, IDLE, LEASED, RETIRED, Conn, PoolModel
from _peers import PeerServer, is_closed
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from callosum_gevent import CallosumClient


@dataclass
class Waiter:
    greenlet: Any
    lease: Any = None
    gets: Conn | None = None
    killed: bool = False
    # Gave its socket back with return_connection inside its with block: the
    # block's exit is still to come, and must do nothing.
    exit_pending: bool = False
    extra: list[Any] = field(default_factory=list)


def settle() -> None:
    """Let every woken greenlet run to its next wait."""
    for _ in range(3):
        gevent.sleep(0)


class WaitersModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.peers = PeerServer()
        self.model = PoolModel(max_slots=1)
        self.queue: list[Waiter] = []  # still waiting, oldest first
        self.done: list[Waiter] = []
        self.lent_once: list[Conn] = []  # every connection ever lent: stale handles

    @initialize(max_slots=st.integers(1, 3))
    def start(self, max_slots: int) -> None:
        self.model = PoolModel(max_slots)
        self.client = CallosumClient(max_slots=max_slots)

    def with_status(self, *statuses: str) -> list[Conn]:
        return self.model.with_status(*statuses)

    def serve(self, waiter: Waiter, conn: Conn) -> None:
        waiter.gets = conn
        conn.status = LEASED
        self.done.append(waiter)
        if conn not in self.lent_once:
            self.lent_once.append(conn)

    def hand_to_next_waiter(self, conn: Conn) -> None:
        if self.queue:
            self.serve(self.queue.pop(0), conn)

    @rule(slot=st.integers(0, 4))
    def offer(self, slot: int) -> None:
        conn, kept = self.model.offer(self.peers, slot)
        assert self.client.new_connection(slot, conn.sock) is kept
        if kept:
            self.hand_to_next_waiter(conn)
        settle()

    @rule(with_block=st.booleans())
    def wait(self, with_block: bool) -> None:
        if with_block:
            lease = self.client.connection(timeout=30)
            waiter = Waiter(gevent.spawn(lease.__enter__), lease)
        else:
            waiter = Waiter(gevent.spawn(self.client.get_connection, timeout=30))
        lowest = self.model.lowest_idle()
        if lowest is not None:  # nobody queues while a connection is idle
            self.serve(waiter, lowest)
        else:
            self.queue.append(waiter)
        settle()

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def kill_waiter(self, data: st.DataObject) -> None:
        waiter = data.draw(st.sampled_from(self.queue))
        self.queue.remove(waiter)
        waiter.killed = True
        waiter.greenlet.kill(block=True)

    @precondition(lambda self: any(w.lease is not None for w in self.queue))
    @rule(data=st.data(), by_exit=st.booleans())
    def intrude_on_a_waiting_lease(self, data: st.DataObject, by_exit: bool) -> None:
        # Another greenlet enters (or exits) a lease whose with block still waits.
        waiter = data.draw(st.sampled_from([w for w in self.queue if w.lease is not None]))
        call = (
            partial(waiter.lease.__exit__, None, None, None) if by_exit else waiter.lease.__enter__
        )
        intruder = gevent.spawn(call)
        settle()
        assert intruder.ready() and isinstance(intruder.exception, RuntimeError)

    def holders(self) -> list[Waiter]:
        return [w for w in self.done if w.gets and w.gets.status != CLOSED]

    @precondition(lambda self: self.holders())
    @rule(data=st.data(), by_exit=st.booleans())
    def give_back(self, data: st.DataObject, by_exit: bool) -> None:
        waiter = data.draw(st.sampled_from(self.holders()))
        conn = waiter.gets
        assert conn is not None
        waiter.gets = None
        if by_exit and waiter.lease is not None:
            waiter.lease.__exit__(None, None, None)
        else:
            self.client.return_connection(conn.sock)
            waiter.exit_pending = waiter.lease is not None
        if conn.status == RETIRED:
            conn.status = CLOSED
        else:
            conn.status = IDLE
            self.hand_to_next_waiter(conn)
        settle()

    @precondition(
        lambda self: bool(self.queue) and any(w.gets and w.gets.status == LEASED for w in self.done)
    )
    @rule(data=st.data())
    def give_back_as_first_waiter_dies(self, data: st.DataObject) -> None:
        holders = [w for w in self.done if w.gets and w.gets.status == LEASED]
        waiter = data.draw(st.sampled_from(holders))
        conn = waiter.gets
        assert conn is not None
        waiter.gets = None
        first = self.queue.pop(0)
        first.killed = True
        # The kill is queued first, so it lands after the connection was
        # handed to this waiter and before it could take it.
        first.greenlet.kill(block=False)
        self.client.return_connection(conn.sock)
        conn.status = IDLE
        self.hand_to_next_waiter(conn)
        settle()
        assert first.greenlet.dead

    @precondition(lambda self: self.holders())
    @rule(data=st.data(), by_exit=st.booleans())
    def discard(self, data: st.DataObject, by_exit: bool) -> None:
        waiter = data.draw(st.sampled_from(self.holders()))
        conn = waiter.gets
        assert conn is not None
        waiter.gets = None
        if by_exit and waiter.lease is not None:
            error = OSError("mid-protocol")
            waiter.lease.__exit__(OSError, error, None)
        else:
            self.client.discard_connection(conn.sock)
            waiter.exit_pending = waiter.lease is not None
        conn.status = CLOSED
        settle()

    @precondition(
        lambda self: bool(self.queue) and any(w.gets and w.gets.status == LEASED for w in self.done)
    )
    @rule(data=st.data())
    def give_back_twice_while_handed(self, data: st.DataObject) -> None:
        holders = [w for w in self.done if w.gets and w.gets.status == LEASED]
        waiter = data.draw(st.sampled_from(holders))
        conn = waiter.gets
        assert conn is not None
        waiter.gets = None
        self.client.return_connection(conn.sock)  # on its way to the first waiter
        before = self.client.stats()
        with pytest.raises(ValueError, match="not lent"):
            self.client.return_connection(conn.sock)
        with pytest.raises(ValueError, match="not lent"):
            self.client.discard_connection(conn.sock)
        if waiter.lease is not None:
            waiter.lease.__exit__(OSError, OSError("after giving it back"), None)
        assert self.client.stats() == before and not is_closed(conn.sock)
        conn.status = IDLE
        self.hand_to_next_waiter(conn)
        settle()

    @precondition(lambda self: any(w.exit_pending for w in self.done))
    @rule(data=st.data(), raised=st.booleans())
    def stale_exit(self, data: st.DataObject, raised: bool) -> None:
        # The block gave its socket back itself; the socket may be idle, lent
        # again (maybe to another with block), retired or closed by now.
        waiter = data.draw(st.sampled_from([w for w in self.done if w.exit_pending]))
        waiter.exit_pending = False
        before = self.client.stats()
        if raised:
            waiter.lease.__exit__(OSError, OSError("late"), None)
        else:
            waiter.lease.__exit__(None, None, None)
        assert self.client.stats() == before

    @precondition(lambda self: any(c.status == IDLE for c in self.lent_once))
    @rule(data=st.data())
    def stale_return_of_idle(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from([c for c in self.lent_once if c.status == IDLE]))
        before = self.client.stats()
        with pytest.raises(ValueError, match="not lent"):
            self.client.return_connection(conn.sock)
        with pytest.raises(ValueError, match="not lent"):
            self.client.discard_connection(conn.sock)
        assert self.client.stats() == before

    @invariant()
    def no_socket_held_by_two_borrowers(self) -> None:
        held = [w.gets.sock for w in self.done if w.gets is not None]
        assert len(held) == len({id(sock) for sock in held})
        for waiter in self.done:
            if waiter.gets is not None:
                assert waiter.gets.status in (LEASED, RETIRED)

    @invariant()
    def counts_agree(self) -> None:
        if not hasattr(self, "client"):
            return
        stats = self.client.stats()
        assert stats["waiting"] == len(self.queue)
        assert stats["slots"] == len(self.with_status(IDLE, LEASED)) <= self.model.max_slots
        assert stats["idle"] == len(self.with_status(IDLE))
        assert stats["leased"] == len(self.with_status(LEASED, RETIRED))

    @invariant()
    def each_waiter_holds_what_the_model_gave_it(self) -> None:
        for waiter in self.done:
            if waiter.gets is not None:
                assert waiter.greenlet.ready()
                assert waiter.greenlet.value is waiter.gets.sock
        for waiter in self.queue:
            assert not waiter.greenlet.ready()

    @invariant()
    def nothing_lost_nothing_left_open(self) -> None:
        for conn in self.model.conns:
            assert is_closed(conn.sock) == (conn.status == CLOSED)

    def teardown(self) -> None:
        try:
            if hasattr(self, "client"):
                self.client.close()
                settle()
                for waiter in self.queue:
                    assert waiter.greenlet.ready()  # woken with PoolClosed
                for conn in self.with_status(LEASED, RETIRED):
                    self.client.return_connection(conn.sock)
                assert all(is_closed(c.sock) for c in self.model.conns)
        finally:
            self.peers.stop()


WaitersModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWaitersModel = pytest.mark.timeout(120)(WaitersModel.TestCase)
