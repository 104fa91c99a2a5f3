"""The line protocol and the command line: demo, serve and call."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import pytest
from gevent import socket

from callosum_gevent import CallosumServer, ProtocolError
from callosum_gevent._lineproto import MAX_LINE, LineService, read_line, request
from callosum_gevent._slotline import read_slot_line


@pytest.fixture
def serve_line() -> Iterator[Any]:
    """Yield a function that starts a CallosumServer running a LineService."""
    servers: list[CallosumServer] = []

    def start(service: LineService) -> tuple[str, int]:
        server = CallosumServer(("127.0.0.1", 0), service)
        server.start()
        servers.append(server)
        return ("127.0.0.1", server.server_port)

    yield start
    for server in servers:
        server.stop(timeout=1)


@contextmanager
def socketpair() -> Iterator[tuple[Any, Any]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def connect(address: tuple[str, int]) -> Any:
    sock = socket.create_connection(address, timeout=5)
    read_slot_line(sock, timeout=5)
    return sock


@pytest.mark.timeout(10)
def test_request_gets_the_message_back_with_the_server_id(serve_line: Any) -> None:
    service = LineService("alpha")
    sock = connect(serve_line(service))
    with sock:
        assert request(sock, "hello world") == ("alpha", "hello world")
        assert request(sock, "") == ("alpha", "")
        assert service.served == 2
        assert service.connections == service.peak_connections == 1


@pytest.mark.timeout(10)
def test_server_answers_pipelined_requests_in_order(serve_line: Any) -> None:
    sock = connect(serve_line(LineService("b")))
    with sock:
        sock.sendall(b"one\ntwo\n")
        assert read_line(sock) + read_line(sock) == b"b oneb two"


@pytest.mark.timeout(10)
def test_service_counts_connections_until_the_client_hangs_up(serve_line: Any) -> None:
    service = LineService("c")
    address = serve_line(service)
    socks = [connect(address) for _ in range(3)]
    for sock in socks:
        request(sock, "x")  # each handler has surely started once it answered
    assert service.connections == service.peak_connections == 3
    for sock in socks:
        sock.close()
    with gevent.Timeout(5):
        while service.connections:
            gevent.sleep(0.01)
    assert service.peak_connections == 3


@pytest.mark.timeout(10)
def test_capacity_makes_requests_queue(serve_line: Any) -> None:
    address = serve_line(LineService("d", service_time=0.1, capacity=1))
    socks = [connect(address) for _ in range(3)]
    started = time.perf_counter()
    gevent.joinall([gevent.spawn(request, s, "m") for s in socks], raise_error=True)
    # Served one at a time they cannot finish sooner than 3 x 0.1 s.
    assert time.perf_counter() - started >= 0.29
    for sock in socks:
        sock.close()


@pytest.mark.timeout(10)
def test_read_line_raises_when_the_peer_closes_or_runs_on() -> None:
    with socketpair() as (a, b):
        b.sendall(b"partial")
        b.close()
        with pytest.raises(ConnectionError):
            read_line(a)
    with socketpair() as (a, b):
        gevent.spawn(b.sendall, b"x" * (MAX_LINE + 10))
        with pytest.raises(ProtocolError):
            read_line(a)


@pytest.mark.parametrize(("message", "error"), [("two\nlines", ValueError), (b"bytes", TypeError)])
def test_request_refuses_bad_messages_before_sending(message: Any, error: type) -> None:
    with socketpair() as (a, b):
        with pytest.raises(error, match="message"):
            request(a, message)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"server_id": "two words"}, "server_id"),
        ({"server_id": ""}, "server_id"),
        ({"server_id": "a", "service_time": -1}, "service_time"),
        ({"server_id": "a", "capacity": 0}, "capacity"),
    ],
)
def test_line_service_names_the_bad_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LineService(**kwargs)
