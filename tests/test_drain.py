"""Graceful drain over real loopback sockets: finish requests, close between them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.server
import gevent.socket
import gevent.ssl
import pytest
import trustme

from callosum_gevent import CallosumClient, CallosumServer
from callosum_gevent._lineproto import LineService, NoReply, call, read_line, request
from callosum_gevent._slotline import read_slot_line

pytestmark = pytest.mark.timeout(15)

Start = Callable[..., CallosumServer]


@pytest.fixture
def start() -> Iterator[Start]:
    servers: list[CallosumServer] = []

    def start(handle: Any, **kwargs: Any) -> CallosumServer:
        server = CallosumServer(("127.0.0.1", 0), handle, **kwargs)
        if isinstance(handle, LineService):
            handle.server = server
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(timeout=1)


def address(server: CallosumServer) -> tuple[str, int]:
    return ("127.0.0.1", server.server_port)


def connect(server: CallosumServer) -> Any:
    sock = gevent.socket.create_connection(address(server), timeout=5)
    read_slot_line(sock, timeout=5)
    return sock


def closed_by_peer(sock: Any) -> bool:
    """Return True if the peer closed ``sock`` (EOF or reset) within 5 s."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class Gate:
    """A handler whose requests wait inside server.request() until released."""

    def __init__(self) -> None:
        self.server: CallosumServer | None = None
        self.inside = gevent.event.Event()
        self.release = gevent.event.Event()
        self.served = 0

    def __call__(self, sock: Any, address: Any) -> None:
        assert self.server is not None
        with sock.makefile("rb") as rfile:
            while line := rfile.readline():
                with self.server.request(sock):
                    self.inside.set()
                    self.release.wait()
                    sock.sendall(b"done " + line)
                self.served += 1


def test_drain_closes_idle_connections_at_once_and_stops_accepting(start: Start) -> None:
    service = LineService("a")
    server = start(service)
    socks = [connect(server) for _ in range(3)]
    request(socks[0], "mark")  # the first marked request: boundaries are in use
    began = time.monotonic()
    assert server.drain(timeout=5) is True
    assert time.monotonic() - began < 2  # generous: it has nothing to wait for
    assert all(closed_by_peer(s) for s in socks)
    assert server.stats()["drained"] == 3
    assert server.slots.in_use == 0
    with pytest.raises(ConnectionRefusedError):
        gevent.socket.create_connection(address(server), timeout=5)
    for sock in socks:
        sock.close()


def test_the_request_in_flight_finishes_then_its_connection_closes(start: Start) -> None:
    gate = Gate()
    server = start(gate)
    gate.server = server
    busy, idle = connect(server), connect(server)
    busy.sendall(b"work\n")
    assert gate.inside.wait(timeout=5)
    drainer = gevent.spawn(server.drain, 10)
    assert closed_by_peer(idle)  # closed at once
    assert not drainer.ready()
    assert server.stats()["in_request"] == 1
    gate.release.set()
    assert read_line(busy) == b"done work"  # the whole reply, then
    assert closed_by_peer(busy)  # the close
    assert drainer.get(timeout=5) is True
    assert gate.served == 1
    busy.close()
    idle.close()


def test_drain_reports_false_at_its_timeout_and_stop_kills_the_rest(start: Start) -> None:
    gate = Gate()
    server = start(gate)
    gate.server = server
    sock = connect(server)
    sock.sendall(b"stuck\n")
    assert gate.inside.wait(timeout=5)
    assert server.drain(timeout=0.2) is False
    assert server.active == 1  # still there, for stop() or a longer drain
    server.stop(timeout=0.1)
    assert closed_by_peer(sock)
    assert server.active == 0 and server.slots.in_use == 0
    sock.close()


def test_stop_drains_first(start: Start) -> None:
    gate = Gate()
    server = start(gate)
    gate.server = server
    sock = connect(server)
    sock.sendall(b"last\n")
    assert gate.inside.wait(timeout=5)
    gevent.spawn_later(0.1, gate.release.set)
    server.stop(timeout=5)
    assert read_line(sock) == b"done last"
    assert closed_by_peer(sock)
    sock.close()


def test_handlers_that_never_mark_requests_keep_todays_behaviour(start: Start) -> None:
    def echo(sock: Any, address: Any) -> None:
        while data := sock.recv(100):
            sock.sendall(data)

    server = start(echo)
    sock = connect(server)
    assert server.drain(timeout=0.2) is False
    sock.sendall(b"still served")  # the drain did not touch it
    assert sock.recv(100) == b"still served"
    server.stop(timeout=0)
    assert closed_by_peer(sock)
    assert server.stats()["drained"] == 0
    sock.close()


def test_a_server_told_its_handler_marks_requests_drains_before_the_first(start: Start) -> None:
    service = LineService("m")
    server = start(service, marks_requests=True)
    assert server.marks_requests
    socks = [connect(server) for _ in range(2)]  # connected, no request yet
    assert server.drain(timeout=5) is True
    assert all(closed_by_peer(s) for s in socks)
    for sock in socks:
        sock.close()


def test_a_first_marked_request_during_the_drain_closes_the_idle_ones(start: Start) -> None:
    service = LineService("late")
    server = start(service)
    assert not server.marks_requests
    idle, active = connect(server), connect(server)
    drainer = gevent.spawn(server.drain, 10)
    gevent.sleep(0.05)  # the drain began; nobody had marked a request yet
    assert not drainer.ready()
    assert request(active, "first") == ("late", "first")
    assert closed_by_peer(idle)
    assert closed_by_peer(active)
    assert drainer.get(timeout=5) is True
    assert server.marks_requests
    idle.close()
    active.close()


def test_a_request_that_arrives_as_the_drain_closes_is_never_served(start: Start) -> None:
    service = LineService("r")
    server = start(service)
    sock = connect(server)
    request(sock, "mark")
    # The request is in the server's socket buffer, not yet read by its
    # handler, when the drain closes the connection as idle.
    sock.sendall(b"too late\n")
    assert server.drain(timeout=5) is True
    with pytest.raises(NoReply):
        read_line(sock)
    assert service.served == 1  # only "mark"
    sock.close()


def test_a_connection_accepted_as_the_drain_begins_gets_no_slot() -> None:
    spawned = gevent.event.Event()

    def spawn_later(func: Any, *args: Any) -> Any:
        spawned.set()
        return gevent.spawn_later(0.2, func, *args)  # its greenlet starts after the drain

    service = LineService("s")
    server = CallosumServer(("127.0.0.1", 0), service, spawn=spawn_later)
    service.server = server
    server.start()
    try:
        sock = gevent.socket.create_connection(address(server), timeout=5)
        assert spawned.wait(timeout=5)
        drainer = gevent.spawn(server.drain, 5)
        gevent.sleep(0.05)
        assert not drainer.ready()  # an accepted socket counts before its greenlet runs
        assert sock.recv(16) == b""  # no slot line: refused
        assert drainer.get(timeout=5) is True  # it waited for that connection too
        assert server.stats()["refused"] == 1
        assert server.stats()["accepted"] == 0
        sock.close()
    finally:
        server.stop(timeout=1)


def test_drain_over_tls_closes_idle_connections(start: Start) -> None:
    ca = trustme.CA()
    server_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    service = LineService("tls")
    server = start(service, ssl_context=server_ctx)
    raw = gevent.socket.create_connection(address(server), timeout=5)
    with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        read_slot_line(sock, timeout=5)
        assert request(sock, "secret") == ("tls", "secret")
        assert server.drain(timeout=5) is True
        assert closed_by_peer(sock)


def test_serve_forever_returns_once_the_drain_is_done() -> None:
    service = LineService("f")
    server = CallosumServer(("127.0.0.1", 0), service)
    service.server = server
    runner = gevent.spawn(server.serve_forever)
    gevent.sleep(0)  # let it start; a yield, not a wait
    sock = connect(server)
    request(sock, "hi")
    assert server.drain(timeout=5) is True
    assert runner.join(timeout=5) is None and runner.dead
    sock.close()


@pytest.mark.parametrize(
    ("timeout", "error"), [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError)]
)
def test_drain_refuses_a_bad_timeout_and_does_not_start(
    start: Start, timeout: Any, error: type[Exception]
) -> None:
    server = start(LineService("t"))
    with pytest.raises(error, match="timeout"):
        server.drain(timeout)
    assert not server.draining
    connect(server).close()  # still accepting


# -- the client's side of the race ------------------------------------------


def pooled(client: CallosumClient, server: CallosumServer) -> None:
    sock = gevent.socket.create_connection(address(server), timeout=5)
    assert client.new_connection(read_slot_line(sock, timeout=5), sock)


def test_call_sends_again_once_when_no_reply_byte_came(start: Start) -> None:
    def swallow(sock: Any, address: Any) -> None:
        sock.recv(100)  # takes the request and hangs up without a word

    first, second = start(swallow), start(LineService("b"))
    retried: list[NoReply] = []
    with CallosumClient(max_slots=2) as client:
        pooled(client, first)  # slot 0: lent first
        pooled(client, second)  # slot 0 as well: lent next
        assert call(client, "hello", timeout=5, on_retry=retried.append) == ("b", "hello")
        assert len(retried) == 1
        assert client.slot_count == 1  # the closed one was discarded


def test_call_does_not_resend_what_is_not_idempotent_or_was_half_answered(start: Start) -> None:
    def swallow(sock: Any, address: Any) -> None:
        sock.recv(100)

    def half(sock: Any, address: Any) -> None:
        sock.recv(100)
        sock.sendall(b"h partial")  # no newline: the reply is cut short

    for handle, error in ((swallow, NoReply), (half, ConnectionError)):
        bad, good = start(handle), start(LineService("ok"))
        retried: list[NoReply] = []
        with CallosumClient(max_slots=2) as client:
            pooled(client, bad)
            pooled(client, good)
            with pytest.raises(error) as caught:
                call(client, "m", timeout=5, idempotent=handle is half, on_retry=retried.append)
            assert retried == []
            assert (type(caught.value) is NoReply) == (handle is swallow)


def test_a_connection_the_drain_closed_under_a_lent_socket_gives_no_reply(start: Start) -> None:
    # The race itself: the client holds the connection (lent, about to send)
    # when the server closes it between requests.
    server = start(LineService("d"))
    with CallosumClient(max_slots=1) as client:
        pooled(client, server)
        with client.connection(timeout=5) as sock:
            request(sock, "mark")
        sock = client.get_connection(timeout=5)
        assert server.drain(timeout=5) is True
        with pytest.raises(NoReply):
            request(sock, "lost")
        client.discard_connection(sock)


# -- found by review: handshakes, restarts and the drained count -------------


def tls_contexts() -> tuple[Any, Any]:
    ca = trustme.CA()
    server_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


def test_drain_cuts_a_connection_still_in_its_tls_handshake(start: Start) -> None:
    server_ctx, _ = tls_contexts()
    service = LineService("tls")
    # A handshake may take up to 30 s; the drain must not wait for it.
    server = start(service, ssl_context=server_ctx, slot_line_timeout=30, marks_requests=True)
    silent = gevent.socket.create_connection(address(server), timeout=10)  # never says hello
    assert wait_for(lambda: server.stats()["active"] == 0 and server._live == 1)
    began = time.monotonic()
    assert server.drain(timeout=10) is True
    assert time.monotonic() - began < 5  # generous; before the fix it waited the 30 s out
    assert closed_by_peer(silent)
    stats = server.stats()
    assert stats["failed"] == 0  # not the peer's failure: the drain refused it
    assert stats["refused"] == 1
    assert stats["accepted"] == 0
    silent.close()


def test_a_tls_connection_whose_greenlet_starts_after_the_drain_has_no_handshake() -> None:
    server_ctx, _ = tls_contexts()
    spawned = gevent.event.Event()

    def spawn_later(func: Any, *args: Any) -> Any:
        spawned.set()
        return gevent.spawn_later(0.2, func, *args)

    server = CallosumServer(
        ("127.0.0.1", 0), LineService("t"), ssl_context=server_ctx, spawn=spawn_later
    )
    server.start()
    try:
        raw = gevent.socket.create_connection(address(server), timeout=5)
        assert spawned.wait(timeout=5)
        assert server.drain(timeout=5) is True
        assert closed_by_peer(raw)  # closed without a handshake
        assert server.stats()["refused"] == 1 and server.stats()["failed"] == 0
        raw.close()
    finally:
        server.stop(timeout=1)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


@pytest.mark.parametrize("how", ["drain", "stop", "drain timed out"])
def test_start_after_a_drain_raises_instead_of_half_starting(how: str) -> None:
    gate = Gate()
    server = CallosumServer(("127.0.0.1", 0), gate, marks_requests=True)
    gate.server = server
    server.start()
    try:
        if how == "drain":
            assert server.drain(timeout=5) is True
        elif how == "stop":
            server.stop(timeout=1)
        else:
            sock = connect(server)
            sock.sendall(b"stuck\n")
            assert gate.inside.wait(timeout=5)
            assert server.drain(timeout=0) is False
        with pytest.raises(RuntimeError, match="drain"):
            server.start()
        with pytest.raises(RuntimeError, match="drain"):
            server.serve_forever()
        assert getattr(server, "socket", None) is None or server.socket.fileno() == -1
    finally:
        gate.release.set()
        server.stop(timeout=1)


def test_a_closed_server_that_never_drained_still_starts_again() -> None:
    service = LineService("again")
    server = CallosumServer(("127.0.0.1", 0), service)
    service.server = server
    server.start()
    server.close()  # StreamServer's close: no drain, so it may start again
    server.start()
    try:
        sock = connect(server)
        assert request(sock, "hi") == ("again", "hi")
        sock.close()
    finally:
        server.stop(timeout=1)


def test_a_connection_that_closed_itself_is_not_counted_as_drained(start: Start) -> None:
    service = LineService("c")
    server = start(service, marks_requests=True)
    gone, stays = connect(server), connect(server)
    assert wait_for(lambda: server.stats()["active"] == 2)
    gone.close()  # its handler has not seen the EOF yet when the drain begins
    assert server.drain(timeout=5) is True
    assert closed_by_peer(stays)
    assert server.stats()["drained"] == 1  # only the one the drain closed
    stays.close()


def test_a_connection_its_handler_closed_is_not_counted_as_drained(start: Start) -> None:
    closed = gevent.event.Event()
    leave = gevent.event.Event()
    box: list[CallosumServer] = []

    def handler(sock: Any, address: Any) -> None:
        with box[0].request(sock):
            sock.recv(16)
        sock.close()  # done with it, but still cleaning up when the drain comes
        closed.set()
        leave.wait()

    server = start(handler)
    box.append(server)
    sock = connect(server)
    sock.sendall(b"bye\n")
    assert closed.wait(timeout=5)
    drainer = gevent.spawn(server.drain, 5)
    gevent.sleep(0.05)
    leave.set()
    assert drainer.get(timeout=5) is True
    assert server.stats()["drained"] == 0
    sock.close()


# gevent's own wrap_socket builds its context with the deprecated PROTOCOL_TLS.
@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
def test_tls_from_keyfile_and_certfile_still_serves_and_drains(start: Start) -> None:
    ca = trustme.CA()
    client_ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    with ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.tempfile() as pem:
        service = LineService("pem")
        server = start(service, keyfile=pem, certfile=pem)  # gevent.ssl.wrap_socket's way
        raw = gevent.socket.create_connection(address(server), timeout=5)
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            read_slot_line(sock, timeout=5)
            assert request(sock, "hi") == ("pem", "hi")
            assert server.drain(timeout=5) is True
            assert closed_by_peer(sock)
