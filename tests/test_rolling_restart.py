"""A rolling restart under steady load: every backend drained and restarted, no request lost.

The backends are ``callosum-gevent serve`` processes, stopped with SIGTERM (so
they drain) and started again on the same port; two clients with their rovers
send requests all along through the line protocol's ``call``, which sends a
request again once when its connection closed before any byte of the reply.
"""

from __future__ import annotations

import random
import signal
import socket as stdsocket
import sys
from typing import Any

import gevent
import gevent.event
import pytest
from _processes import ROOT, child_env
from gevent import subprocess

from callosum_gevent import CallosumClient, Rover
from callosum_gevent._lineproto import NoReply, call

BACKENDS = 3
USERS = 24
THINK = 0.02  # seconds between a user's requests


def free_port() -> int:
    with stdsocket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Backend:
    """One ``callosum-gevent serve`` process on a fixed port, restartable."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.process: Any = None
        self.outputs: list[str] = []

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "callosum_gevent", "serve", "--port", str(self.port)),
                *("--id", self.name, "--service-time", "0.005", "--drain-timeout", "10"),
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = self.process.stdout.readline()
        if not first.startswith("serving "):
            raise RuntimeError(f"{self.name} did not start: {first!r}")

    def stop(self, signum: int = signal.SIGTERM) -> str:
        """Signal the process, wait for its exit and return what it printed."""
        self.process.send_signal(signum)
        out, err = self.process.communicate(timeout=20)
        assert self.process.returncode == 0, err
        assert "Traceback" not in err, err
        self.outputs.append(out)
        return str(out)


@pytest.mark.timeout(90)
def test_a_rolling_restart_under_load_fails_no_request() -> None:
    backends = [Backend(f"b{i}", free_port()) for i in range(BACKENDS)]
    for backend in backends:
        backend.start()
    servers: dict[Any, Any] = {b.name: ("127.0.0.1", b.port) for b in backends}
    clients = [CallosumClient(max_slots=4) for _ in range(2)]
    rovers = [Rover(c, servers, interval=0.1, backoff_max=0.5) for c in clients]
    stop = gevent.event.Event()
    served: dict[str, int] = {b.name: 0 for b in backends}
    failures: list[BaseException] = []
    retries: list[NoReply] = []

    def user(number: int) -> None:
        rng = random.Random(number)
        client = clients[number % len(clients)]
        while not stop.is_set():
            try:
                with gevent.Timeout(10, TimeoutError("no reply within 10 s")):
                    server_id, _ = call(client, f"u{number}", timeout=5, on_retry=retries.append)
                served[server_id] += 1
            except Exception as exc:
                failures.append(exc)
            gevent.sleep(rng.expovariate(1 / THINK))

    for rover in rovers:
        rover.start()
    users = [gevent.spawn(user, n) for n in range(USERS)]
    try:
        gevent.sleep(1.0)
        for backend in backends:
            before = dict(served)
            out = backend.stop()
            assert "stopped: drained in" in out, out
            backend.start()
            # Wait until the new process serves traffic before the next goes down.
            with gevent.Timeout(20, AssertionError(f"{backend.name} got no traffic back")):
                while served[backend.name] == before[backend.name]:
                    gevent.sleep(0.05)
        gevent.sleep(0.5)
    finally:
        stop.set()
        gevent.joinall(users, timeout=15)
        for rover in rovers:
            rover.stop()
        for client in clients:
            client.close()
        for backend in backends:
            if backend.process is not None and backend.process.poll() is None:
                backend.stop()
    total = sum(served.values())
    figures = f"{total} served {served}, {len(retries)} sent again, failures {failures[:5]}"
    print(figures)
    assert failures == [], figures
    assert all(n > 0 for n in served.values()), figures
    assert total > 500, figures  # the load really was steady
