"""The rover never spins: every failing attempt is counted and backed off, whatever it raised."""

from __future__ import annotations

import logging
import socket as stdsocket
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
from _leaks import HubErrors
from _lineservers import wait_until
from gevent import socket

from callosum_gevent import CallosumServer, Rover


class Recorder:
    """Keeps up to max_slots sockets, as a client would."""

    def __init__(self, max_slots: int = 10) -> None:
        self.max_slots = max_slots
        self.kept: list[Any] = []

    @property
    def slot_count(self) -> int:
        return len(self.kept)

    def new_connection(self, slot: int, sock: Any) -> bool:
        if len(self.kept) < self.max_slots:
            self.kept.append(sock)
            return True
        sock.close()
        return False

    def close(self) -> None:
        while self.kept:
            self.kept.pop().close()


def until_eof(sock: Any, _address: Any) -> None:
    while sock.recv(4096):
        pass


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


@pytest.fixture
def make_rover() -> Iterator[Callable[..., Rover]]:
    rovers: list[Rover] = []

    def make(client: Any, servers: Any, **kw: Any) -> Rover:
        rover = Rover(client, servers, **kw)
        rovers.append(rover)
        return rover

    yield make
    for rover in rovers:
        rover.stop()


@pytest.fixture
def staged_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[[], Any]]:
    """Answer look-ups of chosen names with chosen results or errors; others really resolve."""
    answers: dict[str, Callable[[], Any]] = {}
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return answers[host]()
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def run_for(rover: Rover, seconds: float) -> float:
    """Run *rover* for *seconds*; return the CPU seconds this process spent meanwhile."""
    cpu = time.process_time()
    rover.start()
    gevent.sleep(seconds)
    rover.stop()
    return time.process_time() - cpu


def raise_(exc: BaseException) -> Callable[[], Any]:
    def answer() -> Any:
        raise exc

    return answer


@pytest.mark.timeout(20)
def test_lookup_raising_a_non_oserror_is_counted_reported_and_backed_off(
    staged_dns: dict[str, Callable[[], Any]], make_rover: Any
) -> None:
    # getaddrinfo raises UnicodeError (a ValueError) for names it cannot encode.
    staged_dns["typo.test"] = raise_(UnicodeError("label empty or too long"))
    reports: list[Any] = []
    rover = make_rover(
        Recorder(),
        {"typo": "typo.test:4040"},
        backoff_base=0.05,
        backoff_max=0.2,
        on_unreachable=lambda *r: reports.append(r),
    )
    with HubErrors().recording() as hub:
        cpu = run_for(rover, 1.0)
    stats = rover.stats()
    print(
        f"lookup raising UnicodeError: {stats['resolve_errors']} look-ups, {cpu:.3f} s CPU in 1 s"
    )
    assert hub.errors == []
    assert 2 <= stats["resolve_errors"] <= 30  # backoff capped at 0.2 s: about 8
    assert stats["attempts"] == 0
    assert reports[0] == ("typo", ("typo.test", 4040))
    assert stats["failures"] == {"typo": stats["resolve_errors"]}
    assert cpu < 0.5  # the old code spun at ~100%


@pytest.mark.timeout(20)
def test_connect_raising_a_non_oserror_is_counted_and_backed_off(
    staged_dns: dict[str, Callable[[], Any]], make_rover: Any
) -> None:
    # A resolver answering a port connect() refuses with OverflowError.
    bogus = [(stdsocket.AF_INET, stdsocket.SOCK_STREAM, 6, "", ("127.0.0.1", 70000))]
    staged_dns["odd.test"] = lambda: bogus
    rover = make_rover(Recorder(), {"odd": "odd.test:4040"}, backoff_base=0.05, backoff_max=0.2)
    with HubErrors().recording() as hub:
        cpu = run_for(rover, 1.0)
    stats = rover.stats()
    print(f"connect raising OverflowError: {stats['attempts']} attempts, {cpu:.3f} s CPU in 1 s")
    assert hub.errors == []
    assert stats["connect_errors"] == stats["attempts"]
    assert 1 <= stats["attempts"] <= 40
    assert cpu < 0.5


@pytest.mark.timeout(20)
def test_dead_address_gets_one_probe_per_backoff_step_while_filling(make_rover: Any) -> None:
    recorder = Recorder(max_slots=10)
    rover = make_rover(
        recorder, {"gone": ("127.0.0.1", free_port())}, backoff_base=0.05, backoff_max=0.2
    )
    run_for(rover, 2.0)
    stats = rover.stats()
    # Steps last at least 0.025, 0.05, then 0.1 s (half of the capped 0.2 s):
    # at most ~22 steps in 2 s. The first burst fills at full concurrency
    # (nothing is known yet); after it, one probe per step, not eight.
    print(f"dead address while filling: {stats['attempts']} attempts in 2 s")
    assert stats["connect_errors"] == stats["attempts"]
    assert rover.fill_concurrency <= stats["attempts"] <= rover.fill_concurrency + 25


@pytest.mark.timeout(20)
def test_probe_success_restores_full_fill_speed(make_rover: Any) -> None:
    port = free_port()
    recorder = Recorder(max_slots=30)
    rover = make_rover(recorder, {"late": ("127.0.0.1", port)}, backoff_base=0.05, backoff_max=0.1)
    rover.start()
    assert wait_until(lambda: rover.stats()["connect_errors"] >= 3)
    server = CallosumServer(("127.0.0.1", port), until_eof)
    server.start()
    try:
        assert wait_until(lambda: recorder.slot_count == 30, timeout=5)
    finally:
        rover.stop()
        recorder.close()
        server.stop(timeout=0.1)


@pytest.mark.timeout(10)
def test_debug_logs_name_the_server(make_rover: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = CallosumServer(("127.0.0.1", 0), until_eof)
    server.start()
    recorder = Recorder(max_slots=1)
    try:
        rover = make_rover(recorder, {"b7": server.address[:2]})
        with caplog.at_level(logging.DEBUG, logger="callosum_gevent"):
            assert rover.rove() == 0
            assert rover.rove() == 1
        rover_lines = [r.getMessage() for r in caplog.records if "rover" in r.getMessage()]
        assert any("'b7'" in line and "slot 0" in line and "kept" in line for line in rover_lines)
        assert any(
            "'b7'" in line and "slot 1" in line and "turned down" in line for line in rover_lines
        )
    finally:
        recorder.close()
        server.stop(timeout=0.1)
