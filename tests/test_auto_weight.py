"""weight="auto" on real servers: a server twice as fast draws about twice the connections."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import gevent
import pytest
from _lineservers import wait_until

from callosum_gevent import CallosumClient, CallosumServer, Rover
from callosum_gevent._lineproto import request

CLIENTS = 4
MAX_SLOTS = 6
USERS = 16
THINK = 0.07  # seconds between a user's requests: about 70% of the fleet's capacity
RECYCLE = 0.1  # share of connections closed after use, as an age limit would


class Paced:
    """Answer lines one at a time, exactly ``service`` seconds each while busy.

    Each request ends at an absolute deadline (the previous one's plus
    ``service``), so a late wake-up does not push back the next: the capacity
    is ``1 / service`` however busy the test's hub is. LineService's sleeps
    each add the hub's lag, which differs between servers.
    """

    def __init__(self, service: float) -> None:
        self.service = service
        self.free_at = 0.0
        self.server: CallosumServer | None = None

    def __call__(self, sock: Any, address: Any) -> None:
        assert self.server is not None
        try:
            with sock.makefile("rb") as rfile:
                while line := rfile.readline():
                    with self.server.request(sock):
                        now = time.perf_counter()
                        self.free_at = max(now, self.free_at) + self.service
                        gevent.sleep(self.free_at - now)
                        sock.sendall(b"p " + line)
        except OSError:
            pass


@pytest.mark.timeout(60)
def test_a_server_twice_as_fast_draws_about_twice_the_connections() -> None:
    services = {"fast": Paced(0.005), "slow": Paced(0.010)}
    servers: dict[str, CallosumServer] = {}
    for name, service in services.items():
        servers[name] = server = CallosumServer(("127.0.0.1", 0), service, weight="auto")
        service.server = server
        server.start()
    addresses: dict[Any, Any] = {n: ("127.0.0.1", s.server_port) for n, s in servers.items()}
    clients = [CallosumClient(max_slots=MAX_SLOTS) for _ in range(CLIENTS)]
    rovers = [Rover(c, addresses, interval=0.05) for c in clients]
    stop = gevent.event.Event()

    def user(number: int) -> None:
        rng = random.Random(number)
        client = clients[number % CLIENTS]
        while not stop.is_set():
            sock = client.get_connection(timeout=5)
            try:
                request(sock, "x")
            except BaseException:
                client.discard_connection(sock)
                raise
            # Without closing some, the connections made before the weights
            # were known would be held for ever (the client's max_age does this).
            if rng.random() < RECYCLE:
                client.discard_connection(sock)
            else:
                client.return_connection(sock)
            gevent.sleep(rng.expovariate(1 / THINK))

    for rover in rovers:
        rover.start()
    users = [gevent.spawn(user, n) for n in range(USERS)]
    try:
        assert wait_until(lambda: all(s.rate is not None for s in servers.values()), 30), (
            "no trusted estimate: " + repr({n: s.stats() for n, s in servers.items()})
        )
        gevent.sleep(4)  # connections turn over under the new weights
        held: dict[str, list[int]] = {name: [] for name in servers}
        for _ in range(30):
            for name, server in servers.items():
                held[name].append(server.active)
            gevent.sleep(0.1)
    finally:
        stop.set()
        gevent.joinall(users, timeout=10, raise_error=True)
        for rover in rovers:
            rover.stop()
        for client in clients:
            client.close()
        for server in servers.values():
            server.stop(timeout=1)
    rates = {name: server.rate for name, server in servers.items()}
    weights = {name: server.weight for name, server in servers.items()}
    fast, slow = (statistics.mean(held[name]) for name in ("fast", "slow"))
    figures = f"rates {rates}, weights {weights}, connections held {fast:.1f} vs {slow:.1f}"
    assert rates["fast"] is not None and rates["slow"] is not None
    # 200 and 100 per second while busy; the last wake-up of each busy
    # stretch is late by the hub's lag, which costs the fast one more.
    assert 1.6 < rates["fast"] / rates["slow"] < 2.4, figures
    assert 1.4 < fast / slow < 2.8, figures
    print(figures)
