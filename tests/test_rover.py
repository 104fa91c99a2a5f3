"""The rover against real loopback servers: filling, roving, failures, backoff, stop, TLS."""

from __future__ import annotations

import logging
import math
import socket as stdsocket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.ssl
import pytest
import trustme
from _leaks import HubErrors, live_greenlets, open_fds, warm_up
from _lineservers import ScriptServer, reset, send_segments, wait_until
from gevent import socket
from hypothesis import given
from hypothesis import strategies as st

from callosum_gevent import CallosumClient, CallosumServer, PoolClosed, Rover
from callosum_gevent._rover import parse_address


class Recorder:
    """The smallest client: keeps up to max_slots sockets and records every offer."""

    def __init__(self, max_slots: int = 10) -> None:
        self.max_slots = max_slots
        self.kept: list[tuple[int, Any]] = []
        self.offers: list[int] = []

    @property
    def slot_count(self) -> int:
        return len(self.kept)

    def new_connection(self, slot: int, sock: Any) -> bool:
        self.offers.append(slot)
        if len(self.kept) < self.max_slots:
            self.kept.append((slot, sock))
            return True
        sock.close()
        return False

    def lose(self, count: int) -> None:
        for _ in range(count):
            self.kept.pop()[1].close()

    def close(self) -> None:
        self.lose(len(self.kept))


def until_eof(sock: Any, _address: Any) -> None:
    while sock.recv(4096):
        pass


def echo(sock: Any, _address: Any) -> None:
    while data := sock.recv(4096):
        sock.sendall(data)


def free_port() -> int:
    """Return a loopback port nothing listens on (bound once, then released)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def address_of(server: Any) -> tuple[str, int]:
    host, port = server.address[:2]
    return host, port


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


@pytest.fixture
def make_server() -> Iterator[Callable[..., CallosumServer]]:
    started: list[CallosumServer] = []

    def make(handle: Any = until_eof, address: Any = ("127.0.0.1", 0), **kw: Any) -> Any:
        server = CallosumServer(address, handle, **kw)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(timeout=0.1)  # handlers wait for EOF; don't wait for them


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


# -- arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (("10.0.0.5", 4040), ("10.0.0.5", 4040)),
        ("backend-b:4040", ("backend-b", 4040)),
        ("[::1]:4040", ("::1", 4040)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("backend.internal.:4040", ("backend.internal.", 4040)),  # fully qualified
        ("my_service:4040", ("my_service", 4040)),  # compose-style names resolve
        ("bücher.example:4040", ("bücher.example", 4040)),
        ("[fe80::1%lo]:4040", ("fe80::1%lo", 4040)),
        (("a" * 63 + ".example", 1), ("a" * 63 + ".example", 1)),
    ],
)
def test_parse_address(address: Any, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("backend", ValueError),
        ("backend:", ValueError),
        ("backend:http", ValueError),
        ("backend:٤٠", ValueError),
        ("backend:+40", ValueError),
        (":4040", ValueError),
        ("::1:4040", ValueError),
        ("backend:0", ValueError),
        ("backend:65536", ValueError),
        ("backend:" + "9" * 5000, ValueError),
        # Host names getaddrinfo cannot even encode (UnicodeError, a ValueError).
        ("backend..internal:4040", ValueError),
        (".backend:4040", ValueError),
        (".:4040", ValueError),
        ("a" * 64 + ".internal:4040", ValueError),
        (".".join(["a" * 60] * 5) + ":4040", ValueError),  # over 253 bytes
        ("\udcff:4040", ValueError),
        ("back end:4040", ValueError),
        ("back\x00end:4040", ValueError),
        (("backend..internal", 4040), ValueError),
        (("backend:4040", 4040), ValueError),
        (("backend", "4040"), TypeError),
        (("backend", True), TypeError),
        ((b"backend", 4040), TypeError),
        (("backend", 4040, 0), TypeError),
        (4040, TypeError),
        (None, TypeError),
    ],
)
def test_bad_addresses_are_rejected(address: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"servers\['s'\]"):
        Rover(Recorder(), {"s": address})
    rover = Rover(Recorder(), {})
    with pytest.raises(error, match="address"):
        rover.add_server("s", address)
    assert rover.stats()["servers"] == 0


@given(st.one_of(st.text(max_size=30), st.tuples(st.text(max_size=10), st.integers())))
def test_parse_address_returns_a_valid_pair_or_raises_cleanly(address: Any) -> None:
    try:
        host, port = parse_address(address)
    except (TypeError, ValueError) as exc:
        assert "address" in str(exc)
        return
    assert host and isinstance(port, int) and 0 < port < 65536
    if isinstance(address, str):
        assert int(address.rpartition(":")[2]) == port
        assert host in address


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"interval": 0}, ValueError, "interval"),
        ({"interval": -1.0}, ValueError, "interval"),
        ({"interval": math.nan}, ValueError, "interval"),
        ({"interval": math.inf}, ValueError, "interval"),
        ({"interval": "1"}, TypeError, "interval"),
        ({"interval": True}, TypeError, "interval"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout"),
        ({"slot_timeout": -1}, ValueError, "slot_timeout"),
        ({"resolve_interval": 0}, ValueError, "resolve_interval"),
        ({"fill_concurrency": 0}, ValueError, "fill_concurrency"),
        ({"fill_concurrency": 2.0}, TypeError, "fill_concurrency"),
        ({"fill_concurrency": 2**63}, ValueError, "fill_concurrency"),
        ({"fill_concurrency": 10**100}, ValueError, "fill_concurrency"),
        ({"max_slot": -1}, ValueError, "max_slot"),
        ({"backoff_base": 0}, ValueError, "backoff_base"),
        ({"backoff_base": 2.0, "backoff_max": 1.0}, ValueError, "backoff_max"),
        ({"ssl_context": object()}, TypeError, "ssl_context"),
        ({"server_hostname": b"x"}, TypeError, "server_hostname"),
        (
            {"server_hostname": "", "ssl_context": ssl.create_default_context()},
            ValueError,
            "server_hostname",
        ),
        (
            {"server_hostname": ".example", "ssl_context": ssl.create_default_context()},
            ValueError,
            "server_hostname",
        ),
        (
            {"server_hostname": "a..example", "ssl_context": ssl.create_default_context()},
            ValueError,
            "server_hostname",
        ),
        ({"server_hostname": "a\x00b"}, ValueError, "server_hostname"),
        ({"on_unreachable": 3}, TypeError, "on_unreachable"),
    ],
)
def test_bad_options_are_rejected(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        Rover(Recorder(), {}, **kwargs)


def test_bad_client_and_servers_are_rejected() -> None:
    with pytest.raises(TypeError, match="client"):
        Rover(object(), {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="servers"):
        Rover(Recorder(), [("127.0.0.1", 1)])  # type: ignore[arg-type]


def test_add_and_drop_unknown_or_duplicate_ids() -> None:
    rover = Rover(Recorder(), {"a": "127.0.0.1:1"})
    with pytest.raises(ValueError, match="server_id 'a'"):
        rover.add_server("a", "127.0.0.1:2")
    with pytest.raises(ValueError, match="server_id 'b'"):
        rover.drop_server("b")
    with pytest.raises(TypeError, match="server_id"):
        rover.add_server(["c"], "127.0.0.1:2")  # type: ignore[arg-type]
    assert rover.stats()["servers"] == 1


# -- one attempt ---------------------------------------------------------------


@pytest.mark.timeout(10)
def test_rove_hands_lowest_slots_to_the_client(recorder: Recorder, make_server: Any) -> None:
    server = make_server()
    rover = Rover(recorder, {"a": address_of(server)})
    assert not rover.running
    assert [rover.rove(), rover.rove(), rover.rove()] == [0, 1, 2]
    assert [slot for slot, _ in recorder.kept] == [0, 1, 2]
    sock = recorder.kept[0][1]
    assert sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY)
    assert rover.stats()["attempts"] == 3
    assert rover.stats()["kept"] == 3
    assert server.active == 3


@pytest.mark.timeout(10)
def test_turned_down_connection_is_closed(make_server: Any) -> None:
    server = make_server()
    rec = Recorder(max_slots=1)
    rover = Rover(rec, {"a": address_of(server)})
    assert rover.rove() == 0
    assert rover.rove() == 1
    assert rover.stats()["turned_down"] == 1
    assert wait_until(lambda: server.active == 1)
    rec.lose(1)


BAD_SERVERS = [
    pytest.param(send_segments([b"GET / HTTP/1.1\r\n"]), "protocol_errors", id="garbage"),
    pytest.param(send_segments(["١٢\r\n".encode()]), "protocol_errors", id="arabic-indic"),
    pytest.param(send_segments([b"+5\r\n"]), "protocol_errors", id="plus"),
    pytest.param(send_segments([b"-1\r\n"]), "protocol_errors", id="negative"),
    pytest.param(send_segments([b"%d\r\n" % 10**40]), "protocol_errors", id="huge"),
    pytest.param(send_segments([b"1" * 100]), "protocol_errors", id="endless-digits"),
    pytest.param(send_segments([b"5\n"]), "protocol_errors", id="bare-lf"),
    pytest.param(send_segments([]), "protocol_errors", id="silent"),
    pytest.param(send_segments([b"1"] * 50, gap=0.05), "protocol_errors", id="slow-drip"),
    pytest.param(lambda sock: sock.shutdown(stdsocket.SHUT_WR), "protocol_errors", id="eof"),
    pytest.param(reset, "connect_errors", id="reset"),
    # Sinkholes the rover sees itself: the FIN or a greeting came with the slot line.
    pytest.param(send_segments([b"0\r\nHELLO\r\n"]), "protocol_errors", id="slot-then-greeting"),
    pytest.param(
        lambda sock: (sock.sendall(b"0\r\n"), sock.shutdown(stdsocket.SHUT_WR)),
        "protocol_errors",
        id="slot-then-eof",
    ),
]


@pytest.mark.timeout(15)
@pytest.mark.parametrize(("script", "kind"), BAD_SERVERS)
def test_bad_server_is_counted_reported_and_closed(
    recorder: Recorder, make_server: Any, script: Any, kind: str
) -> None:
    reports: list[tuple[Any, tuple[str, int]]] = []
    good = make_server()
    with ScriptServer(script) as bad:
        rover = Rover(
            recorder,
            {"bad": bad.address},
            slot_timeout=0.3,
            backoff_base=30.0,  # so the last rove() cannot pick it again
            on_unreachable=lambda *report: reports.append(report),
        )
        assert rover.rove() is None
        stats = rover.stats()
        assert stats[kind] == 1
        assert stats["attempts"] == 1
        assert stats["kept"] == 0
        assert stats["failures"] == {"bad": 1}
        assert stats["backed_off"] == 1
        assert reports == [("bad", bad.address)]
        assert recorder.offers == []
        if script is not reset:
            # The rover closed its end.
            assert wait_until(lambda: bad.peer_closed == 1)
        # The rover still works.
        rover.add_server("good", address_of(good))
        assert rover.rove() == 0


@pytest.mark.timeout(10)
def test_refused_port_is_a_connect_error(recorder: Recorder) -> None:
    reports: list[Any] = []
    address = ("127.0.0.1", free_port())
    rover = Rover(recorder, {"gone": address}, on_unreachable=lambda *r: reports.append(r))
    assert rover.rove() is None
    assert rover.stats()["connect_errors"] == 1
    assert reports == [("gone", address)]


@pytest.mark.timeout(10)
def test_failing_callback_does_not_stop_the_rover(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*_report: Any) -> None:
        raise RuntimeError("callback bug")

    rover = Rover(recorder, {"gone": ("127.0.0.1", free_port())}, on_unreachable=explode)
    with caplog.at_level(logging.WARNING, logger="callosum_gevent"):
        assert rover.rove() is None
        assert rover.rove() is None
    assert rover.stats()["connect_errors"] == 2
    assert any("on_unreachable" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(10)
def test_backed_off_server_is_avoided_and_success_resets_it(make_server: Any) -> None:
    recorder = Recorder(max_slots=50)
    good = make_server()
    port = free_port()
    rover = Rover(recorder, {"flaky": ("127.0.0.1", port)}, backoff_base=30.0, backoff_max=60.0)
    assert rover.rove() is None
    rover.add_server("good", address_of(good))
    for _ in range(20):
        assert rover.rove() is not None
    assert rover.stats()["connect_errors"] == 1
    assert good.active == 20
    # Alone and backed off, the server is still tried by rove(); once it is
    # back, one success clears its backoff.
    rover.drop_server("good")
    recorder.lose(20)
    flaky = make_server(address=("127.0.0.1", port))
    assert rover.rove() == 0
    assert rover.stats()["backed_off"] == 0
    assert flaky.active == 1
    recorder.lose(1)


@pytest.mark.timeout(10)
def test_client_errors_close_the_socket_and_back_off(
    make_server: Any, make_rover: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server()

    class Broken(Recorder):
        def new_connection(self, slot: int, sock: Any) -> bool:
            raise ValueError("slot above my ceiling")

    rover = make_rover(Broken(), {"a": address_of(server)}, backoff_base=5.0)
    assert rover.rove() == 0
    assert rover.stats()["client_errors"] == 1
    assert wait_until(lambda: server.active == 0)
    assert "new_connection(0, ...) raised" in caplog.text
    # Filling a client that keeps raising must not hammer the server.
    rover.start()
    assert wait_until(lambda: rover.stats()["in_flight"] == 0)
    errors = rover.stats()["client_errors"]
    gevent.sleep(0.3)
    assert rover.stats()["client_errors"] == errors <= 1 + rover.fill_concurrency
    assert rover.running


@pytest.mark.timeout(10)
def test_closed_client_ends_roving(make_server: Any) -> None:
    server = make_server()

    class Closed(Recorder):
        def new_connection(self, slot: int, sock: Any) -> bool:
            raise PoolClosed("closed")

    rover = Rover(Closed(), {"a": address_of(server)})
    rover.start()
    assert wait_until(lambda: not rover.running)
    assert wait_until(lambda: server.active == 0)


# -- the loop ----------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("make_client", [Recorder, CallosumClient])
def test_fills_fast_from_three_servers_then_roves(
    make_client: Callable[..., Any], make_server: Any, make_rover: Any
) -> None:
    servers = [make_server() for _ in range(3)]
    pool = make_client(max_slots=100)
    rover = make_rover(pool, {i: address_of(s) for i, s in enumerate(servers)}, interval=0.05)
    started = time.perf_counter()
    rover.start()
    assert wait_until(lambda: pool.slot_count == 100)
    elapsed = time.perf_counter() - started
    print(f"{type(pool).__name__} filled 100 slots from 3 servers in {elapsed:.3f} s")
    assert elapsed < 5.0
    # Least-busy-first picking spreads the fill over every server.
    assert min(s.active for s in servers) >= 10
    # Extras from the last fill round are closed; the servers see it a moment later.
    assert wait_until(lambda: sum(s.active for s in servers) == 100)
    # Full: one attempt per interval, not back to back.
    attempts = rover.stats()["attempts"]
    assert wait_until(lambda: rover.stats()["attempts"] >= attempts + 3)
    gevent.sleep(0.5)
    assert rover.stats()["attempts"] - attempts < 60  # ~13 expected; a spin makes thousands
    rover.stop()
    pool.close()


@pytest.mark.timeout(20)
def test_refills_after_losses_on_next_tick_or_wake(make_server: Any, make_rover: Any) -> None:
    server = make_server()
    rec = Recorder(max_slots=20)
    rover = make_rover(rec, {"a": address_of(server)}, interval=0.1)
    rover.start()
    assert wait_until(lambda: rec.slot_count == 20)
    rec.lose(15)
    assert wait_until(lambda: rec.slot_count == 20)
    # With a long interval only wake() brings the refill forward.
    rover.interval = 3600.0
    gevent.sleep(0.3)  # let the loop start its long wait
    rec.lose(10)
    rover.wake()
    assert wait_until(lambda: rec.slot_count == 20, timeout=5)
    rec.lose(20)


@pytest.mark.timeout(10)
def test_added_server_is_tried_at_once_when_full(make_server: Any, make_rover: Any) -> None:
    rec = Recorder(max_slots=4)
    rover = make_rover(rec, {"a": address_of(make_server())}, interval=3600.0)
    rover.start()
    assert wait_until(lambda: rec.slot_count == 4)
    gevent.sleep(0.2)  # full: the loop now waits out its hour
    joiner = make_server()
    rover.add_server("b", address_of(joiner))
    # Its low slots are offered now, not an hour (one roving interval) later.
    assert wait_until(lambda: joiner.stats()["accepted"] == 1, timeout=3)
    gevent.sleep(0.2)
    assert joiner.stats()["accepted"] == 1  # once tried, it waits its turn like the rest
    rec.close()


@pytest.mark.timeout(10)
def test_no_servers_means_no_spin_until_one_is_added(
    recorder: Recorder, make_server: Any, make_rover: Any
) -> None:
    rover = make_rover(recorder, {})
    rover.start()
    gevent.sleep(0.2)
    assert rover.stats()["attempts"] == 0
    rover.add_server("a", address_of(make_server()))
    assert wait_until(lambda: recorder.slot_count == recorder.max_slots)


@pytest.mark.timeout(10)
def test_backed_off_servers_wait_rather_than_spin(recorder: Recorder, make_rover: Any) -> None:
    rover = make_rover(recorder, {"gone": ("127.0.0.1", free_port())}, backoff_base=5.0)
    rover.start()
    # The first burst of fill attempts fails together and backs off one step.
    assert wait_until(lambda: rover.stats()["connect_errors"] >= 1)
    assert wait_until(lambda: rover.stats()["in_flight"] == 0)
    attempts = rover.stats()["attempts"]
    gevent.sleep(0.3)
    assert rover.stats()["attempts"] == attempts
    assert rover.stats()["backed_off"] == 1


@pytest.mark.timeout(15)
def test_stop_ends_greenlets_and_closes_connections_in_setup(
    recorder: Recorder, make_rover: Any
) -> None:
    with ScriptServer(send_segments([])) as silent:
        rover = make_rover(recorder, {"silent": silent.address}, slot_timeout=30.0)
        rover.start()
        rover.start()  # a no-op while running
        assert wait_until(lambda: silent.accepted == 8)  # fill_concurrency attempts in flight
        assert rover.stats()["in_flight"] == 8
        rover.stop()
        assert not rover.running
        assert rover.stats()["in_flight"] == 0
        assert wait_until(lambda: silent.peer_closed == 8)
        rover.stop()  # idempotent
        assert silent.accepted == 8


@pytest.mark.timeout(15)
def test_silent_server_does_not_stall_the_others(make_server: Any, make_rover: Any) -> None:
    # Random picking alone would soon have every attempt stuck on the silent
    # server; least-busy-first leaves it one attempt more than the good one.
    recorder = Recorder(max_slots=50)
    good = make_server()
    with ScriptServer(send_segments([])) as silent:
        servers = {"silent": silent.address, "good": address_of(good)}
        rover = make_rover(recorder, servers, slot_timeout=30.0, fill_concurrency=4)
        with rover:
            assert wait_until(lambda: recorder.slot_count == recorder.max_slots)
            assert silent.accepted <= 3
        assert not rover.running
        recorder.lose(50)


@pytest.mark.timeout(10)
def test_dropped_server_keeps_pooled_connections(recorder: Recorder, make_server: Any) -> None:
    a, b = make_server(), make_server()
    rover = Rover(recorder, {"a": address_of(a)})
    rover.rove()
    rover.add_server("b", address_of(b))
    rover.drop_server("a")
    for _ in range(5):
        rover.rove()
    assert (a.active, b.active) == (1, 5)
    assert rover.stats()["servers"] == 1


@pytest.mark.timeout(10)
def test_host_name_counts_one_server_per_address(recorder: Recorder, make_server: Any) -> None:
    server = make_server()
    port = address_of(server)[1]
    infos = socket.getaddrinfo("localhost", port, 0, stdsocket.SOCK_STREAM)
    if ("127.0.0.1", port) not in [info[4][:2] for info in infos]:
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    rover = Rover(recorder, {"name": f"localhost:{port}"}, backoff_base=30.0, backoff_max=30.0)
    # Addresses the server does not listen on (::1) fail once and back off.
    slots = [rover.rove() for _ in range(len(infos) + 2)]
    assert rover.stats()["endpoints"] == len({info[4] for info in infos})
    assert [s for s in slots if s is not None][:2] == [0, 1]


@pytest.mark.timeout(10)
def test_ipv6_literal(recorder: Recorder, make_server: Any) -> None:
    try:
        server = make_server(address=("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    rover = Rover(recorder, {"v6": f"[::1]:{address_of(server)[1]}"})
    assert rover.rove() == 0


# -- TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA, make_server: Any) -> Any:
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "slots.example").configure_cert(context)
    return make_server(handle=echo, ssl_context=context)


@pytest.mark.timeout(10)
def test_tls_connection_is_handed_over_and_works(
    ca: trustme.CA, tls_server: Any, recorder: Recorder
) -> None:
    context = ssl.create_default_context()  # a plain stdlib context is fine
    ca.configure_trust(context)
    rover = Rover(recorder, {"tls": address_of(tls_server)}, ssl_context=context)
    assert rover.rove() == 0
    sock = recorder.kept[0][1]
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    rover = Rover(
        recorder,
        {"tls": address_of(tls_server)},
        ssl_context=context,
        server_hostname="slots.example",
    )
    assert rover.rove() == 1


@pytest.mark.timeout(10)
@pytest.mark.parametrize("mistake", ["wrong-ca", "wrong-host", "plain-server"])
def test_tls_failures_are_connect_errors(
    ca: trustme.CA, tls_server: Any, make_server: Any, recorder: Recorder, mistake: str
) -> None:
    context = ssl.create_default_context()
    (trustme.CA() if mistake == "wrong-ca" else ca).configure_trust(context)
    server = make_server() if mistake == "plain-server" else tls_server
    hostname = "other.example" if mistake == "wrong-host" else None
    rover = Rover(
        recorder,
        {"tls": address_of(server)},
        ssl_context=context,
        server_hostname=hostname,
        connect_timeout=2.0,
    )
    assert rover.rove() is None
    stats = rover.stats()
    assert stats["connect_errors"] + stats["protocol_errors"] == 1
    if mistake != "plain-server":
        assert stats["connect_errors"] == 1
    assert recorder.offers == []
    assert wait_until(lambda: server.active == 0)


# -- with the real client ------------------------------------------------------


@pytest.fixture
def client() -> Iterator[CallosumClient]:
    with CallosumClient(max_slots=10) as pool:
        yield pool


@pytest.mark.timeout(40)
def test_client_survives_a_server_dying_and_uses_it_again_when_back(
    client: CallosumClient, make_server: Any, make_rover: Any
) -> None:
    servers = [make_server() for _ in range(3)]
    addresses = {i: address_of(s) for i, s in enumerate(servers)}
    rover = make_rover(client, addresses, interval=0.05, backoff_base=0.05, backoff_max=0.5)
    rover.start()
    assert wait_until(lambda: client.slot_count == 10)

    servers[0].stop(timeout=0.1)  # closes its connections: the client evicts them
    survivors = servers[1:]
    assert wait_until(lambda: client.slot_count == 10 and sum(s.active for s in survivors) == 10)
    with client.connection(timeout=5) as sock:
        assert sock.getpeername()[:2] in (addresses[1], addresses[2])
    assert rover.stats()["failures"].get(0, 0) >= 1

    revived = make_server(address=addresses[0])
    # It offers low slots again, so the client trades its highest ones for them.
    assert wait_until(lambda: revived.active >= 2)
    assert wait_until(lambda: client.slot_count == 10)
    assert rover.running


@pytest.mark.timeout(20)
def test_closing_the_client_ends_roving(client: CallosumClient, make_server: Any) -> None:
    server = make_server()
    with Rover(client, {"a": address_of(server)}, interval=0.05) as rover:
        assert wait_until(lambda: client.slot_count == 10)
        client.close()
        assert wait_until(lambda: not rover.running)
        assert wait_until(lambda: server.active == 0)


@pytest.mark.timeout(20)
def test_unresolvable_name_is_reported_retried_and_does_not_stall(
    make_server: Any, make_rover: Any
) -> None:
    reports: list[Any] = []
    good = make_server()
    recorder = Recorder(max_slots=5)
    servers = {"nx": "no-such-host.invalid:4040"}
    rover = make_rover(
        recorder,
        servers,
        backoff_base=0.05,
        backoff_max=0.1,
        on_unreachable=lambda *r: reports.append(r),
    )
    rover.start()
    # Backoff capped at 0.1 s: the name is looked up again and again, not given up.
    assert wait_until(lambda: rover.stats()["resolve_errors"] >= 3)
    rover.add_server("good", address_of(good))
    assert wait_until(lambda: recorder.slot_count == 5)
    assert ("nx", ("no-such-host.invalid", 4040)) in reports
    assert rover.stats()["servers"] == 2
    recorder.lose(5)


@pytest.mark.timeout(10)
def test_names_are_looked_up_again_after_resolve_interval(
    recorder: Recorder, make_server: Any
) -> None:
    server = make_server()
    port = address_of(server)[1]
    rover = Rover(recorder, {"name": ("127.0.0.1", port)}, resolve_interval=0.05)
    assert rover.rove() == 0
    assert rover.rove() == 1
    assert rover.stats()["resolves"] == 1
    gevent.sleep(0.1)
    assert rover.rove() == 2
    assert rover.stats()["resolves"] == 2


@pytest.mark.timeout(15)
def test_name_with_several_addresses_spreads_and_follows_changes(
    monkeypatch: pytest.MonkeyPatch, make_server: Any
) -> None:
    # Real servers on three loopback addresses; only the DNS answer is staged,
    # as a headless Service would give it.
    first = make_server(address=("127.0.0.1", 0))
    port = address_of(first)[1]
    pods = [first] + [make_server(address=(f"127.0.0.{i}", port)) for i in (2, 3)]
    answer = ["127.0.0.1", "127.0.0.2"]
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "pods.test":
            return real_getaddrinfo(host, *args, **kwargs)
        return [(stdsocket.AF_INET, stdsocket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    recorder = Recorder(max_slots=100)
    rover = Rover(recorder, {"pods": f"pods.test:{port}"}, resolve_interval=0.05)
    for _ in range(30):
        rover.rove()
    assert rover.stats()["endpoints"] == 2
    assert pods[0].active > 0 and pods[1].active > 0 and pods[2].active == 0
    assert pods[0].active + pods[1].active == 30

    answer[:] = ["127.0.0.2", "127.0.0.3"]  # a pod moved
    gevent.sleep(0.1)
    before = pods[0].active
    for _ in range(30):
        rover.rove()
    assert pods[0].active == before
    assert pods[2].active > 0
    assert rover.stats()["resolves"] >= 2
    recorder.close()


@pytest.mark.timeout(30)
def test_start_stop_cycles_leak_no_fds_greenlets_or_errors(make_server: Any) -> None:
    warm_up()
    good = make_server()
    with (
        ScriptServer(send_segments([])) as silent,
        ScriptServer(send_segments([b"x"])) as garbage,
    ):
        servers = {
            "good": address_of(good),
            "silent": silent.address,
            "garbage": garbage.address,
            "gone": ("127.0.0.1", free_port()),
        }
        fds, greenlets = open_fds(), live_greenlets()
        with HubErrors().recording() as hub:
            for _ in range(3):
                recorder = Recorder(max_slots=20)
                with Rover(recorder, servers, interval=0.01, slot_timeout=30.0) as rover:
                    assert wait_until(lambda: recorder.slot_count == 20)  # noqa: B023
                    assert wait_until(lambda: rover.stats()["in_flight"] > 0)
                recorder.close()
            assert wait_until(lambda: open_fds() == fds and live_greenlets() == greenlets)
        assert hub.errors == []
