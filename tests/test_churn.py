"""Churn: 10,000 random cycles of offer, lend, return, discard and remote close leak nothing."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import gevent
import pytest
from _leaks import live_greenlets, open_fds, warm_up
from _lineservers import make_listener, reset
from _peers import is_closed
from gevent import socket

from callosum_gevent import CallosumClient, PoolTimeout

CYCLES = 10_000
MAX_SLOTS = 16


@pytest.mark.timeout(60)
def test_ten_thousand_random_cycles_leave_no_fd_or_greenlet_behind() -> None:
    rng = random.Random(20261125)
    listener = make_listener()
    warm_up()
    fds, greenlets = open_fds(), live_greenlets()

    client = CallosumClient(max_slots=MAX_SLOTS)
    pairs: list[tuple[Any, Any]] = []  # (client end, server end) of every connection made
    lent: list[Any] = []
    borrowers: list[gevent.Greenlet] = []
    ops: Counter[str] = Counter()

    def borrow(hold: float, timeout: float, fail: bool) -> None:
        try:
            with client.connection(timeout=timeout):
                gevent.sleep(hold)
                if fail:
                    raise OSError("the borrower's request failed")
        except (PoolTimeout, OSError):
            pass

    for _ in range(CYCLES):
        draw = rng.random()
        if draw < 0.22:
            ops["offer"] += 1
            sock = socket.create_connection(listener.getsockname())
            peer, _ = listener.accept()
            pairs.append((sock, peer))
            if not client.new_connection(rng.randrange(3 * MAX_SLOTS), sock):
                assert is_closed(sock)
        elif draw < 0.40:
            try:
                lent.append(client.get_connection(timeout=0))
                ops["lend"] += 1
            except PoolTimeout:
                ops["none idle"] += 1
        elif draw < 0.55 and lent:
            ops["return"] += 1
            client.return_connection(lent.pop(rng.randrange(len(lent))))
        elif draw < 0.62 and lent:
            ops["discard"] += 1
            client.discard_connection(lent.pop(rng.randrange(len(lent))))
        elif draw < 0.72 and pairs:
            ops["remote close"] += 1
            _, peer = pairs[rng.randrange(len(pairs))]
            if not is_closed(peer):
                if rng.random() < 0.5:
                    peer.close()
                else:
                    reset(peer)
        elif draw < 0.82:
            ops["borrower"] += 1
            hold, timeout = rng.uniform(0, 0.002), rng.choice([0, 0.001, 0.01])
            borrowers.append(gevent.spawn(borrow, hold, timeout, rng.random() < 0.2))
        else:
            ops["yield"] += 1
            gevent.sleep(rng.choice([0, 0, 0.0005]))
        assert client.slot_count <= MAX_SLOTS
        assert client.leased_count >= len(lent)
        if len(pairs) > 64:  # close server ends whose client end is gone
            for pair in [p for p in pairs if is_closed(p[0])]:
                pairs.remove(pair)
                pair[1].close()
            borrowers = [g for g in borrowers if not g.dead]

    gevent.joinall(borrowers, raise_error=True)
    for sock in lent:
        client.return_connection(sock)
    stats = client.stats()
    print(dict(ops), stats)
    # Every connection the client still holds is idle, and it is every open one.
    assert stats["leased"] == stats["waiting"] == 0
    assert stats["idle"] == stats["slots"] == sum(not is_closed(s) for s, _ in pairs)
    client.close()
    assert all(is_closed(sock) for sock, _ in pairs)
    for _, peer in pairs:
        peer.close()
    gevent.sleep(0.01)  # closes that gevent defers to the next turn of the loop
    assert (open_fds(), live_greenlets()) == (fds, greenlets)
    assert ops["offer"] > 2000 and stats["evicted"] > 100 and stats["dead_at_return"] > 10
