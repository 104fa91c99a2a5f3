"""CallosumServer over real loopback sockets: slot lines, slot release, lifecycle."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from typing import Any, Callable

import gevent
import gevent.event
import gevent.queue
import gevent.socket
import gevent.ssl
import pytest
import trustme

from callosum_gevent import CallosumServer, ServerSlots

pytestmark = pytest.mark.timeout(10)

Start = Callable[..., CallosumServer]


class RecordingSlots(ServerSlots):
    """ServerSlots that reports every put, so tests can wait for a release."""

    def __init__(self) -> None:
        super().__init__()
        self.freed: gevent.queue.Queue[int] = gevent.queue.Queue()

    def put(self, slot: int) -> None:
        # Record first, so a double put shows up even though put() rejects it.
        self.freed.put(slot)
        super().put(slot)


@pytest.fixture
def start() -> Iterator[Start]:
    servers: list[CallosumServer] = []

    def start(handle: Callable[[Any, Any], object], **kwargs: Any) -> CallosumServer:
        kwargs.setdefault("slots", RecordingSlots())
        server = CallosumServer(("127.0.0.1", 0), handle, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(timeout=1)


def connect(server: CallosumServer) -> Any:
    return gevent.socket.create_connection(("127.0.0.1", server.server_port), timeout=5)


def read_slot(sock: Any) -> int:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"connection closed after {line!r}")
        line += chunk
    assert line.endswith(b"\r\n")
    return int(line)


def until_eof(sock: Any, address: Any) -> None:
    while sock.recv(1024):
        pass


def freed(server: CallosumServer, n: int = 1) -> list[int]:
    """Wait for ``n`` slot releases, and check there are no more."""
    slots = server.slots
    assert isinstance(slots, RecordingSlots)
    released = [slots.freed.get(timeout=5) for _ in range(n)]
    # A second put would come from the same finally block, without yielding.
    assert slots.freed.empty(), "a slot was freed twice"
    return released


def reset(sock: Any) -> None:
    """Close with SO_LINGER 0, so the peer gets a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_successive_connections_get_lowest_free_slots(start: Start) -> None:
    server = start(until_eof)
    conns = [connect(server) for _ in range(3)]
    assert [read_slot(c) for c in conns] == [0, 1, 2]
    conns[1].close()
    assert freed(server) == [1]
    conns[1] = connect(server)
    assert read_slot(conns[1]) == 1
    assert server.stats()["active"] == server.slots.in_use == 3
    for conn in conns:
        conn.close()
    assert sorted(freed(server, 3)) == [0, 1, 2]
    assert server.slots.in_use == 0


def test_handler_sees_the_connection_after_the_slot_line(start: Start) -> None:
    def echo(sock: Any, address: Any) -> None:
        sock.sendall(sock.recv(1024))

    server = start(echo)
    with connect(server) as conn:
        assert read_slot(conn) == 0
        conn.sendall(b"ping")
        assert conn.recv(1024) == b"ping"
        assert conn.recv(1024) == b""  # closed once the handler returns
    assert freed(server) == [0]


def test_raising_handler_is_logged_and_frees_its_slot(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(sock: Any, address: Any) -> None:
        raise RuntimeError("boom")

    server = start(boom)
    with caplog.at_level(logging.WARNING, logger="callosum_gevent"), connect(server) as conn:
        assert read_slot(conn) == 0
        assert conn.recv(1) == b""
        assert freed(server) == [0]
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    assert server.stats()["errors"] == 1
    with connect(server) as conn:  # still serving
        assert read_slot(conn) == 0


def test_killed_handler_frees_its_slot_and_closes(start: Start) -> None:
    handlers: gevent.queue.Queue[Any] = gevent.queue.Queue()

    def hang(sock: Any, address: Any) -> None:
        handlers.put(gevent.getcurrent())
        until_eof(sock, address)

    server = start(hang)
    with connect(server) as conn:
        assert read_slot(conn) == 0
        handlers.get(timeout=5).kill()
        assert conn.recv(1) == b""
    assert freed(server) == [0]


def test_peer_reset_mid_handler_frees_the_slot(start: Start) -> None:
    entered = gevent.event.Event()

    def wait(sock: Any, address: Any) -> None:
        entered.set()
        until_eof(sock, address)

    server = start(wait)
    conn = connect(server)
    assert read_slot(conn) == 0
    assert entered.wait(timeout=5)
    reset(conn)
    assert freed(server) == [0]
    assert server.stats()["errors"] == 1  # ECONNRESET surfaced in the handler


def test_peer_reset_before_the_slot_line_frees_the_slot() -> None:
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    conn = gevent.socket.create_connection(listener.getsockname(), timeout=5)
    reset(conn)  # sits reset in the accept queue until the server starts
    called = []
    slots = RecordingSlots()
    server = CallosumServer(listener, lambda s, a: called.append(a), slots)
    server.start()
    try:
        assert slots.freed.get(timeout=5) == 0
        assert server.pool.join(timeout=5)
        assert called == []
        assert server.stats()["failed"] == 1
        assert slots.freed.empty()
    finally:
        server.stop(timeout=1)


def test_max_connections_refuses_without_taking_a_slot(start: Start) -> None:
    server = start(until_eof, max_connections=2)
    conns = [connect(server) for _ in range(2)]
    assert [read_slot(c) for c in conns] == [0, 1]
    with connect(server) as extra:
        assert extra.recv(16) == b""  # closed at once, no slot line
    assert server.stats()["refused"] == 1
    assert server.slots.in_use == 2
    conns[0].close()
    assert freed(server) == [0]
    conns[0] = connect(server)
    assert read_slot(conns[0]) == 0
    for conn in conns:
        conn.close()


def test_weight_numbers_each_slot_weight_times(start: Start) -> None:
    server = start(until_eof, weight=2)
    conns = [connect(server) for _ in range(5)]
    assert [read_slot(c) for c in conns] == [0, 0, 1, 1, 2]
    conns[1].close()
    freed(server)
    conns[1] = connect(server)
    assert read_slot(conns[1]) == 0
    for conn in conns:
        conn.close()
    freed(server, 5)
    assert server.slots.in_use == 0


def test_stop_timeout_kills_stuck_handlers_and_clients_see_eof(start: Start) -> None:
    entered = gevent.event.Event()

    def stuck(sock: Any, address: Any) -> None:
        entered.set()
        sock.recv(1)  # the client never sends

    server = start(stuck)
    with connect(server) as conn:
        assert read_slot(conn) == 0
        assert entered.wait(timeout=5)
        server.stop(timeout=0.1)
        assert conn.recv(1) == b""
    assert server.slots.in_use == 0
    assert freed(server) == [0]


def test_serve_forever_returns_after_stop() -> None:
    server = CallosumServer(("127.0.0.1", 0), until_eof)
    runner = gevent.spawn(server.serve_forever)
    gevent.sleep(0)  # let serve_forever bind and listen; a yield, not a wait
    with connect(server) as conn:
        assert read_slot(conn) == 0
    server.stop(timeout=1)
    assert runner.join(timeout=5) is None
    assert runner.dead


def test_flood_of_concurrent_connections_returns_every_slot(start: Start) -> None:
    n = 300
    server = start(until_eof, backlog=1024)
    seen: list[int] = []
    all_in = gevent.event.Event()

    def client() -> None:
        with connect(server) as conn:
            seen.append(read_slot(conn))
            if len(seen) == n:
                all_in.set()
            all_in.wait()  # hold every connection until all have their slot

    gevent.joinall([gevent.spawn(client) for _ in range(n)], timeout=5, raise_error=True)
    assert sorted(seen) == list(range(n))

    def churn() -> None:
        for _ in range(3):
            with connect(server) as conn:
                read_slot(conn)

    gevent.joinall([gevent.spawn(churn) for _ in range(n)], timeout=5, raise_error=True)
    assert sorted(set(freed(server, 4 * n))) == list(range(n))
    assert server.pool.join(timeout=5)
    assert server.slots.in_use == 0
    with connect(server) as conn:
        assert read_slot(conn) == 0


def test_client_that_never_reads_does_not_block_others(start: Start) -> None:
    def serve(sock: Any, address: Any) -> None:
        if sock.recv(1) == b"f":
            while True:  # fill the buffers of a client that never reads
                sock.sendall(b"x" * 65536)
        sock.sendall(sock.recv(1024))

    server = start(serve)
    with connect(server) as silent, connect(server) as other:
        silent.sendall(b"f")  # and never read, not even the slot line
        assert read_slot(other) == 1
        other.sendall(b"e")
        other.sendall(b"hello")
        assert other.recv(1024) == b"hello"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_slot_line_goes_over_tls(start: Start, ca: trustme.CA) -> None:
    # gevent's SSLContext, so the handshake yields instead of blocking the hub.
    server_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)

    def echo(sock: Any, address: Any) -> None:
        sock.sendall(sock.recv(1024))

    server = start(echo, ssl_context=server_ctx)
    with client_ctx.wrap_socket(connect(server), server_hostname="localhost") as conn:
        assert read_slot(conn) == 0
        conn.sendall(b"secret")
        assert conn.recv(1024) == b"secret"
    assert freed(server) == [0]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"handle": None}, TypeError, "handle"),
        ({"slots": [0]}, TypeError, "slots"),
        ({"weight": 0}, ValueError, "weight"),
        ({"weight": True}, TypeError, "weight"),
        ({"weight": 1.5}, TypeError, "weight"),
        ({"max_connections": 0}, ValueError, "max_connections"),
        ({"max_connections": "10"}, TypeError, "max_connections"),
        ({"slot_line_timeout": 0}, ValueError, "slot_line_timeout"),
        ({"slot_line_timeout": float("inf")}, ValueError, "slot_line_timeout"),
        ({"slot_line_timeout": "1"}, TypeError, "slot_line_timeout"),
        ({"backlog": 10**100}, ValueError, "backlog"),
        ({"backlog": 2**31}, ValueError, "backlog"),
        ({"backlog": -1}, ValueError, "backlog"),
        ({"backlog": "8"}, TypeError, "backlog"),
        ({"backlog": 8.0}, TypeError, "backlog"),
        ({"weight": "fast"}, ValueError, "weight"),
        ({"weight": b"auto"}, TypeError, "weight"),
        ({"weight": "auto", "reference_rate": 0}, ValueError, "reference_rate"),
        ({"weight": "auto", "reference_rate": float("nan")}, ValueError, "reference_rate"),
        ({"weight": "auto", "reference_rate": 10**400}, ValueError, "reference_rate"),
        ({"weight": "auto", "reference_rate": "1"}, TypeError, "reference_rate"),
        ({"marks_requests": 1}, TypeError, "marks_requests"),
    ],
)
def test_bad_arguments_are_rejected(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    kwargs.setdefault("handle", until_eof)
    with pytest.raises(error, match=name):
        CallosumServer(("127.0.0.1", 0), **kwargs)


def test_set_handle_replaces_the_handler_and_keeps_slots(start: Start) -> None:
    server = start(until_eof)
    with pytest.raises(TypeError, match="handle"):
        server.set_handle("not callable")

    def greet(sock: Any, address: Any) -> None:
        sock.sendall(b"hi")

    server.set_handle(greet)
    with connect(server) as conn:
        assert read_slot(conn) == 0
        assert conn.recv(16) == b"hi"
    assert freed(server) == [0]


def test_the_largest_backlog_listen_takes_still_starts(start: Start) -> None:
    server = start(until_eof, backlog=2**31 - 1)
    with connect(server) as conn:
        assert read_slot(conn) == 0


# -- request boundaries ------------------------------------------------------


def line_handler(server_box: list[CallosumServer]) -> Callable[[Any, Any], None]:
    """Answer each line with itself, marking each as one request."""

    def handle(sock: Any, address: Any) -> None:
        server = server_box[0]
        with sock.makefile("rb") as rfile:
            while line := rfile.readline():
                with server.request(sock):
                    sock.sendall(line)

    return handle


def test_requests_are_counted_while_open_and_when_done(start: Start) -> None:
    inside = gevent.event.Event()
    release = gevent.event.Event()
    box: list[CallosumServer] = []

    def handle(sock: Any, address: Any) -> None:
        while sock.recv(1):
            with box[0].request(sock):
                inside.set()
                release.wait()
                sock.sendall(b"k")

    server = start(handle)
    box.append(server)
    with connect(server) as conn:
        read_slot(conn)
        conn.sendall(b"x")
        assert inside.wait(timeout=5)
        assert server.stats()["in_request"] == 1
        assert server.stats()["requests"] == 0
        release.set()
        assert conn.recv(1) == b"k"
        assert server.stats()["in_request"] == 0
        assert server.stats()["requests"] == 1


def test_request_refuses_misuse_with_clear_errors(start: Start) -> None:
    box: list[CallosumServer] = []
    seen: gevent.queue.Queue[str] = gevent.queue.Queue()

    def handle(sock: Any, address: Any) -> None:
        server = box[0]
        marker = server.request(sock)
        with marker:
            try:
                with server.request(sock):
                    seen.put("nested entered")
            except RuntimeError as exc:
                seen.put(f"nested: {exc}")
        try:
            marker.__exit__(None, None, None)
        except RuntimeError as exc:
            seen.put(f"exit: {exc}")
        with marker:  # the same marker serves the next request
            seen.put("again")
        box.append(marker)  # kept past the handler's end
        until_eof(sock, address)

    server = start(handle)
    box.append(server)
    with connect(server) as conn:
        read_slot(conn)
        assert "one at a time" in seen.get(timeout=5)
        assert "without being entered" in seen.get(timeout=5)
        assert seen.get(timeout=5) == "again"
        with pytest.raises(ValueError, match="sock"):
            server.request(conn)  # the client's end is not one the server serves
    freed(server)
    with pytest.raises(ValueError, match="sock"):
        server.request(gevent.socket.socket())
    with pytest.raises(TypeError, match="sock"):
        server.request([])
    with pytest.raises(ValueError, match="returned"), box[1]:
        pass  # a marker kept after its handler returned
    assert server.stats()["requests"] == 2
    assert server.stats()["in_request"] == 0


def test_request_works_over_tls(start: Start, ca: trustme.CA) -> None:
    server_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    box: list[CallosumServer] = []
    server = start(line_handler(box), ssl_context=server_ctx)
    box.append(server)
    with client_ctx.wrap_socket(connect(server), server_hostname="localhost") as conn:
        assert read_slot(conn) == 0
        for _ in range(3):
            conn.sendall(b"hi\n")
            assert conn.recv(16) == b"hi\n"
    freed(server)
    assert server.stats()["requests"] == 3


@pytest.mark.timeout(30)
def test_auto_weight_numbers_slots_by_the_measured_capacity(start: Start) -> None:
    box: list[CallosumServer] = []
    # A reference far above any loopback echo's rate gives a weight below 1,
    # so every position gets its own, spread-out slot number.
    server = start(line_handler(box), weight="auto", reference_rate=1e7)
    box.append(server)
    assert server.weight == 1
    assert server.rate is None
    with connect(server) as conn:
        assert read_slot(conn) == 0
        rfile = conn.makefile("rb")
        for n in range(199):
            conn.sendall(b"%d\n" % n)
            rfile.readline()
        assert server.rate is None, "trusted before the blackout ended"
        assert server.weight == 1
        conn.sendall(b"last\n")
        rfile.readline()
        rate = server.rate
        assert rate is not None and rate > 0
        weight = server.weight
        assert weight == max(0.001, rate / 1e7)
        assert isinstance(weight, float) and weight < 1
        # Positions 1..8 (0 is held by conn) take slot floor(position / weight).
        others = [connect(server) for _ in range(8)]
        try:
            assert [read_slot(c) for c in others] == [int(p / weight) for p in range(1, 9)]
        finally:
            for other in others:
                other.close()
        rfile.close()


def test_a_handler_that_never_marks_requests_keeps_weight_1(start: Start) -> None:
    server = start(until_eof, weight="auto")
    conns = [connect(server) for _ in range(3)]
    assert [read_slot(c) for c in conns] == [0, 1, 2]
    assert server.weight == 1
    assert server.rate is None
    for conn in conns:
        conn.close()
