"""Waits through reused waiters, Events and timers (issue 11), tried adversarially.

A waiter sleeps in the hub through a raw link on its Event; these tests wake
it by everything but a hand-over (stale switches, timers firing in the same
turn as a hand-over) and break its wait before it sleeps, and check that no
connection is lost or reaches two borrowers and that reused waiters start clean.
"""

from __future__ import annotations

import socket as stdsocket
import threading
import time
from typing import Any

import gevent
import pytest
from _peers import PeerServer

from callosum_gevent import CallosumClient, PoolTimeout

pytestmark = pytest.mark.timeout(30)


def lent_out(peers: PeerServer) -> tuple[CallosumClient, Any]:
    """Return a one-slot client and its socket, lent out."""
    client = CallosumClient(max_slots=1)
    sock, _ = peers.connect()
    assert client.new_connection(0, sock)
    assert client.get_connection(timeout=0) is sock
    return client, sock


def wait_for(check: Any) -> None:
    for _ in range(2000):
        if check():
            return
        gevent.sleep(0.001)
    raise AssertionError("condition not reached within 2 s")


def test_stale_switches_into_a_waiter_neither_end_nor_spoil_its_waits(peers: PeerServer) -> None:
    # A switch left over from elsewhere resumes the waiter's hub.switch() with
    # a value that is not its Event, sometimes before the hand-over's wake-up
    # is delivered: the waiter must keep waiting or take what was handed over,
    # and its reused Event must wake the next wait all the same.
    client, sock = lent_out(peers)
    hub = gevent.get_hub()

    def borrow_four_times() -> list[bool]:
        got = []
        for _ in range(4):
            lent = client.get_connection(timeout=5.0)
            got.append(lent is sock)
            client.return_connection(lent)
            gevent.sleep(0.01)  # let the main greenlet take it back
        return got

    waiter = gevent.spawn(borrow_four_times)
    for round_ in range(4):
        wait_for(lambda: client.stats()["waiting"] == 1)
        hub.loop.run_callback(waiter.switch, "stale")
        if round_ % 2:
            gevent.sleep(0)  # delivered alone: the waiter must go back to sleep
            assert client.stats()["waiting"] == 1 and not waiter.ready()
        client.return_connection(sock)  # otherwise delivered before its wake-up
        wait_for(lambda: client.idle_count == 1)
        assert client.get_connection(timeout=0) is sock
    assert waiter.get(timeout=5) == [True] * 4
    assert client.stats()["timeouts"] == 0


def test_timer_firing_in_the_turn_of_a_hand_over_leaves_no_stale_wake_up(
    peers: PeerServer,
) -> None:
    # The waiter's timer expires while the hub is blocked, the connection is
    # handed over in the same turn: the waiter keeps it, and the reused waiter
    # (timer and Event) then waits its full time again.
    client, sock = lent_out(peers)
    for _ in range(3):
        waiter = gevent.spawn(client.get_connection, timeout=0.01)
        gevent.sleep(0)
        time.sleep(0.03)  # the hub is blocked past the waiter's time
        client.return_connection(sock)
        assert waiter.get(timeout=2) is sock
        started = time.monotonic()
        reused = gevent.spawn(client.get_connection, timeout=0.1)
        with pytest.raises(PoolTimeout):
            reused.get(timeout=2)
        assert time.monotonic() - started >= 0.1
    stats = client.stats()
    assert (stats["timeouts"], stats["waiting"], stats["leased"]) == (3, 0, 1)


def test_a_wait_that_cannot_start_leaves_no_waiter_queued() -> None:
    # The wait's timer cannot be made (here: its hub's loop was destroyed).
    # The failed call must leave no waiter behind, or the next return hands
    # the connection to a waiter that nobody is: the slot is lost for good.
    seen: dict[str, Any] = {}

    def in_its_own_thread() -> None:
        client = CallosumClient(max_slots=1)
        mine, theirs = stdsocket.socketpair()
        try:
            client.new_connection(0, mine)
            client.get_connection(timeout=0)
            gevent.get_hub().destroy(destroy_loop=True)
            with pytest.raises(ValueError, match="destroyed loop"):
                client.get_connection(timeout=1.0)
            seen["waiting"] = client.stats()["waiting"]
            seen["leased"] = client.leased_count
        except BaseException as exc:  # reported to the test's thread
            seen["error"] = exc
        finally:
            theirs.close()
            mine.close()

    thread = threading.Thread(target=in_its_own_thread)
    thread.start()
    thread.join(10)
    assert "error" not in seen, seen
    assert seen == {"waiting": 0, "leased": 1}
