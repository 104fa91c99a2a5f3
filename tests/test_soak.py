"""Soak: clients with rovers against three servers that keep dying and coming back.

The short run (3 s) is part of the default suite. The long one (60 s) runs
with ``pytest -m soak tests/test_soak.py`` or ``CALLOSUM_SOAK=1 pytest tests/test_soak.py``.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import gevent
import pytest
from _farm import Farm
from _farm import request as echo_request
from _leaks import HubErrors, live_greenlets, open_fds, warm_up
from _lineservers import wait_until

from callosum_gevent import CallosumClient, PoolTimeout, Rover

CLIENTS = 3
WORKERS = 6  # per client
MAX_SLOTS = 8
MAX_REQUESTS = 2_000_000  # a bound on count as well as on time


def long_soak_selected(config: pytest.Config) -> bool:
    markexpr = str(config.getoption("markexpr") or "")
    return os.environ.get("CALLOSUM_SOAK") == "1" or (
        "soak" in markexpr and "not soak" not in markexpr
    )


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(3.0, id="3s", marks=pytest.mark.timeout(45)),
        pytest.param(60.0, id="60s", marks=[pytest.mark.soak, pytest.mark.timeout(180)]),
    ],
)
def test_servers_restarting_on_the_same_ports(
    seconds: float, request: pytest.FixtureRequest
) -> None:
    if seconds > 10 and not long_soak_selected(request.config):
        pytest.skip("the long soak runs with -m soak or CALLOSUM_SOAK=1")
    rng = random.Random(31)
    warm_up()
    fds, greenlets = open_fds(), live_greenlets()

    outcomes: Counter[str] = Counter()
    with HubErrors().recording() as hub:
        farm = Farm(3)
        clients = [CallosumClient(max_slots=MAX_SLOTS) for _ in range(CLIENTS)]
        rovers = [
            Rover(
                client,
                farm.addresses(),
                interval=0.05,
                connect_timeout=0.5,
                slot_timeout=0.5,
                backoff_base=0.02,
                backoff_max=0.2,
            )
            for client in clients
        ]
        for rover in rovers:
            rover.start()
        deadline = time.monotonic() + seconds

        def worker(client: CallosumClient, n: int) -> None:
            payload = b"%d\n" % n
            while time.monotonic() < deadline and outcomes.total() < MAX_REQUESTS:
                try:
                    with client.connection(timeout=0.5) as sock:
                        if echo_request(sock, payload) != payload:
                            raise EOFError("the server closed mid-request")
                    outcomes["ok"] += 1
                except PoolTimeout:
                    outcomes["pool timeout"] += 1
                    gevent.sleep(0.01)
                except EOFError:
                    outcomes["eof"] += 1
                except OSError:
                    outcomes["oserror"] += 1
                gevent.sleep(rng.uniform(0, 0.002))

        def chaos() -> None:
            while time.monotonic() < deadline:
                gevent.sleep(rng.uniform(0.1, 0.4))
                down = rng.sample(range(3), rng.choice([1, 1, 1, 2]))
                for i in down:
                    farm.stop(i)
                gevent.sleep(rng.uniform(0, 0.1))
                for i in down:
                    farm.start(i)
                    farm.restarts += 1

        jobs = [gevent.spawn(chaos)]
        jobs += [gevent.spawn(worker, c, n) for c in clients for n in range(WORKERS)]
        gevent.joinall(jobs, raise_error=True)
        # With every server up again, the pools refill and serve.
        assert wait_until(lambda: all(c.slot_count == MAX_SLOTS for c in clients), timeout=10)
        for client in clients:
            with client.connection(timeout=1) as sock:
                assert echo_request(sock, b"last\n") == b"last\n"
        stats = [client.stats() for client in clients]
        rover_stats = [rover.stats() for rover in rovers]
        for rover in rovers:
            rover.stop()
        for client in clients:
            client.close()
        farm.close()
        gevent.sleep(0.05)

    print(f"{seconds} s, {farm.restarts} restarts: {dict(outcomes)}")
    print(stats[0])
    print({k: v for k, v in rover_stats[0].items() if k != "failures"})
    assert hub.errors == []
    assert farm.restarts >= seconds  # a restart every 0.1-0.5 s
    assert outcomes["ok"] > 100 * seconds
    assert (open_fds(), live_greenlets()) == (fds, greenlets)
