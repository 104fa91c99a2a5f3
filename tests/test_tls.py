"""TLS end to end: CallosumServer, Rover and CallosumClient with certificates made by trustme."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.ssl
import pytest
import trustme
from _farm import Farm, request
from _leaks import HubErrors
from _lineservers import wait_until
from gevent import socket

from callosum_gevent import CallosumClient, Rover

pytestmark = pytest.mark.timeout(20)

HOST = "backend.test"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *, client_certs: bool = False) -> Any:
    # gevent's SSLContext, so that server handshakes yield instead of blocking the hub.
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", HOST).configure_cert(context)
    if client_certs:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


def client_context(ca: trustme.CA, cert_from: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert_from is not None:
        cert_from.issue_cert("client.test").configure_cert(context)
    return context


@pytest.fixture
def tls_farm(ca: trustme.CA) -> Iterator[Farm]:
    farm = Farm(2, ssl_context=server_context(ca))
    yield farm
    farm.close()


def requests_succeed(client: CallosumClient, count: int) -> None:
    for n in range(count):
        with client.connection(timeout=2) as sock:
            assert isinstance(sock, gevent.ssl.SSLSocket)
            assert sock.version() in ("TLSv1.2", "TLSv1.3")
            assert request(sock, b"secret %d\n" % n) == b"secret %d\n" % n


def assert_refused(rover: Rover, client: CallosumClient, farm: Farm) -> None:
    """The rover keeps failing, counts it, and the client never pools a connection."""

    def failures() -> int:
        stats = rover.stats()
        return int(stats["connect_errors"] + stats["protocol_errors"])

    with rover:
        assert wait_until(lambda: failures() >= 10)
    stats = rover.stats()
    assert stats["kept"] == 0 and client.slot_count == 0 and client.stats()["kept"] == 0
    assert wait_until(lambda: all(s is None or s.slots.in_use == 0 for s in farm.servers))


def test_pooled_tls_connections_carry_requests(ca: trustme.CA, tls_farm: Farm) -> None:
    client = CallosumClient(max_slots=4)
    rover = Rover(
        client,
        tls_farm.addresses(),
        ssl_context=client_context(ca),
        server_hostname=HOST,
        interval=0.05,
        backoff_base=0.05,
    )
    with rover:
        assert wait_until(lambda: client.slot_count == 4)
        requests_succeed(client, 40)
        # Idle TLS connections are watched like plain ones: a dead server's are evicted.
        tls_farm.stop(0)
        assert wait_until(lambda: client.stats()["evicted"] >= 1)
        assert wait_until(lambda: client.slot_count == 4)
        requests_succeed(client, 10)
    stats = client.stats()
    assert stats["dead_at_handout"] + stats["dead_at_return"] == 0
    assert rover.stats()["protocol_errors"] == 0
    client.close()


@pytest.mark.parametrize("mistake", ["wrong-ca", "wrong-host"])
def test_untrusted_server_is_refused_and_counted(
    ca: trustme.CA, tls_farm: Farm, mistake: str
) -> None:
    client = CallosumClient(max_slots=4)
    trusted = trustme.CA() if mistake == "wrong-ca" else ca
    rover = Rover(
        client,
        tls_farm.addresses(),
        ssl_context=client_context(trusted),
        server_hostname="other.test" if mistake == "wrong-host" else HOST,
        interval=0.05,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    assert_refused(rover, client, tls_farm)
    assert rover.stats()["connect_errors"] >= 10  # certificate verification failed


def test_mutual_tls_serves_clients_with_a_certificate(ca: trustme.CA) -> None:
    farm = Farm(2, ssl_context=server_context(ca, client_certs=True))
    try:
        client = CallosumClient(max_slots=4)
        rover = Rover(
            client,
            farm.addresses(),
            ssl_context=client_context(ca, cert_from=ca),
            server_hostname=HOST,
            interval=0.05,
        )
        with rover:
            assert wait_until(lambda: client.slot_count == 4)
            requests_succeed(client, 20)
        client.close()
    finally:
        farm.close()


@pytest.mark.parametrize("cert", ["none", "other-ca"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    ca: trustme.CA, cert: str
) -> None:
    farm = Farm(2, ssl_context=server_context(ca, client_certs=True))
    errors = HubErrors()
    try:
        client = CallosumClient(max_slots=4)
        rover = Rover(
            client,
            farm.addresses(),
            ssl_context=client_context(ca, cert_from=trustme.CA() if cert == "other-ca" else None),
            server_hostname=HOST,
            interval=0.05,
            backoff_base=0.01,
            backoff_max=0.05,
        )
        with errors.recording():
            assert_refused(rover, client, farm)
        print(f"{len(errors.errors)} server handshakes failed: {errors.errors[:1]}")
    finally:
        farm.close()


# -- what unauthenticated peers can do to a TLS server ---------------------------


def test_failed_server_handshakes_are_counted_not_raised(tls_farm: Farm) -> None:
    server = tls_farm.servers[0]
    assert server is not None
    with HubErrors().recording() as hub:
        for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b""):
            sock = socket.create_connection(("127.0.0.1", tls_farm.ports[0]))
            sock.sendall(junk)
            sock.close()
        wait_until(lambda: len(hub.errors) + server.stats()["failed"] >= 3, timeout=3)
    assert hub.errors == []
    assert server.stats()["failed"] == 3


def test_peer_that_never_says_hello_is_cut_off(ca: trustme.CA) -> None:
    farm = Farm(1, ssl_context=server_context(ca), slot_line_timeout=0.2)
    try:
        sock = socket.create_connection(("127.0.0.1", farm.ports[0]))
        data = None
        with gevent.Timeout(2, False):
            data = sock.recv(1)  # no ClientHello: the server should give up and close
        sock.close()
        assert data == b""
    finally:
        farm.close()


def test_set_handle_keeps_tls(tls_farm: Farm) -> None:
    server = tls_farm.servers[0]
    assert server is not None
    server.set_handle(lambda sock, address: sock.recv(1))
    sock = socket.create_connection(("127.0.0.1", tls_farm.ports[0]))
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello: an alert, or a close
    try:
        first = sock.recv(16)
    except ConnectionResetError:
        first = b""
    sock.close()
    assert not first.endswith(b"\r\n"), f"a slot line in clear text: {first!r}"
