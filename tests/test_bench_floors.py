"""The benchmarks' floor pools are what their rows claim: strict FIFO with direct hand-off.

Real loopback sockets and greenlets. The benchmarks stay out of the sdist, so
these tests skip where ``benchmarks`` does not import (run from the repository
root with ``python -m pytest``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

peers = pytest.importorskip("benchmarks._peers", reason="benchmarks/ is not in the sdist")

pytestmark = pytest.mark.timeout(20)

FLOORS: list[Callable[[Any], Any]] = [peers.EventFloorPool, peers.SwitchFloorPool]


@pytest.fixture
def pair() -> Iterator[tuple[list[Any], list[Any]]]:
    clients, servers = peers.loopback_pairs(2)
    yield clients, servers
    peers.close_all(clients + servers)


@pytest.mark.parametrize("make", FLOORS, ids=["event", "switch"])
def test_waiters_are_served_in_arrival_order_and_the_returner_queues(
    make: Callable[[Any], Any], pair: tuple[list[Any], list[Any]]
) -> None:
    pool = make(pair[0][:1])
    order: list[int] = []

    def borrower(i: int) -> None:
        with pool.connection(10.0):
            order.append(i)
            gevent.sleep(0)

    held = pool.get(10.0)
    jobs = [gevent.spawn(borrower, i) for i in range(5)]
    gevent.sleep(0)  # all five now wait, in spawn order
    pool.put(held)
    # Direct hand-off: the returner asks again at once but queues behind them.
    again = pool.get(10.0)
    order.append(-1)
    pool.put(again)
    gevent.joinall(jobs, raise_error=True)
    assert order == [0, 1, 2, 3, 4, -1]


@pytest.mark.parametrize("make", FLOORS, ids=["event", "switch"])
def test_an_idle_socket_is_lent_without_waiting(
    make: Callable[[Any], Any], pair: tuple[list[Any], list[Any]]
) -> None:
    pool = make(pair[0])
    socks = {pool.get(0), pool.get(0)}
    assert socks == set(pair[0])


def test_event_floor_times_out_and_leaves_the_queue(pair: tuple[list[Any], list[Any]]) -> None:
    pool = peers.EventFloorPool(pair[0][:1])
    held = pool.get(1.0)
    with pytest.raises(TimeoutError):
        pool.get(0.01)
    pool.put(held)  # nobody waits any more: it goes idle
    assert pool.get(0) is held


def test_event_floor_checks_at_hand_out_and_a_killed_waiter_leaves_the_queue(
    pair: tuple[list[Any], list[Any]],
) -> None:
    (first, second), (first_end, _) = pair
    pool = peers.EventFloorPool([second, first])
    first_end.close()
    gevent.sleep(0.05)  # the FIN reaches the client end
    # The idle list lends from the end: first comes out, found dead, closed.
    assert pool.get(1.0) is second
    assert first.fileno() == -1
    killed = gevent.spawn(pool.get, 10.0)
    later = gevent.spawn(pool.get, 10.0)
    gevent.sleep(0)
    killed.kill()
    pool.put(second)
    assert later.get(timeout=5) is second
