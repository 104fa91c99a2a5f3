"""The client's per-server view on real loopback sockets: ids, counters, readiness, retiring."""

from __future__ import annotations

import socket as stdsocket
from collections.abc import Iterator
from typing import Any

import pytest
from _peers import PeerServer, is_closed, peer_saw_eof, wait_until
from gevent import socket
from gevent.server import StreamServer

from callosum_gevent import CallosumClient, _servers

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def other() -> Iterator[PeerServer]:
    server = PeerServer()
    yield server
    server.stop()


def name(peers: PeerServer) -> str:
    host, port = peers.server.address[:2]
    return f"{host}:{port}"


def test_server_defaults_to_peer_address(peers: PeerServer, other: PeerServer) -> None:
    client = CallosumClient(max_slots=4)
    for p, slot in ((peers, 0), (peers, 1), (other, 0)):
        assert client.new_connection(slot, p.connect()[0])
    stats = client.server_stats()
    assert set(stats) == {name(peers), name(other)}
    assert stats[name(peers)]["connections"] == 2 and stats[name(other)]["idle"] == 1


def test_ipv6_peer_is_named_in_brackets() -> None:
    if not stdsocket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = StreamServer(("::1", 0), lambda s, a: s.recv(1))
        server.start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        sock = socket.create_connection(("::1", server.server_port))
        client = CallosumClient(max_slots=1)
        assert client.new_connection(0, sock)
        assert list(client.server_stats()) == [f"[::1]:{server.server_port}"]
        client.close()
    finally:
        server.stop(timeout=1)


def test_rover_given_id_and_two_argument_call(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=3)
    assert client.new_connection(0, peers.connect()[0], server="b1")
    assert client.new_connection(1, peers.connect()[0], server=("dc", 7))
    assert client.new_connection(2, peers.connect()[0])
    assert set(client.server_stats()) == {"b1", ("dc", 7), name(peers)}


@pytest.mark.parametrize("bad", [[], {}, {"a"}])
def test_unhashable_server_is_refused_and_socket_untouched(peers: PeerServer, bad: Any) -> None:
    client = CallosumClient(max_slots=1)
    sock, _ = peers.connect()
    before = client.stats()
    with pytest.raises(TypeError, match="server"):
        client.new_connection(0, sock, server=bad)
    assert client.stats() == before and client.server_stats() == {} and not is_closed(sock)
    with pytest.raises(TypeError, match="server"):
        client.retire_server(bad)
    sock.close()


def test_leases_latency_errors_and_evictions(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=4)
    socks = []
    for slot in range(3):
        sock, peer = peers.connect()
        socks.append((sock, peer))
        client.new_connection(slot, sock, server="s")
    stats = client.server_stats()["s"]
    assert stats["latency_ms"] is None and stats["leases_total"] == 0
    for _ in range(5):
        with client.connection():
            pass
    lent = client.get_connection(timeout=0)
    stats = client.server_stats()["s"]
    assert stats["leases_total"] == 5 and stats["leased"] == 1 and stats["idle"] == 2
    latency = stats["latency_ms"]
    assert isinstance(latency, float) and 0.0 <= latency < 1000.0
    client.discard_connection(lent)
    socks[2][1].close()  # the peer closes an idle one: its watcher evicts it
    assert wait_until(lambda: client.server_stats()["s"]["evictions_total"] == 1)
    stats = client.server_stats()["s"]
    assert stats["errors_total"] == 1 and stats["connections"] == 1
    # Both died within seconds of admission.
    assert stats["early_deaths_total"] == 2 and client.stats()["early_deaths"] == 2


def test_old_connections_dying_are_not_early(
    peers: PeerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_servers, "EARLY_DEATH_S", 0.0)
    client = CallosumClient(max_slots=2)
    a, a_peer = peers.connect()
    b, _ = peers.connect()
    client.new_connection(0, a, server="s")
    client.new_connection(1, b, server="s")
    a_peer.close()
    assert wait_until(lambda: client.server_stats()["s"]["evictions_total"] == 1)
    client.discard_connection(client.get_connection(timeout=0))
    stats = client.server_stats()["s"]
    assert stats["errors_total"] == 1 and stats["early_deaths_total"] == 0


def test_ready_needs_an_open_client_with_a_live_connection(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=2)
    assert not client.ready()
    sock, peer = peers.connect()
    client.new_connection(0, sock)
    assert client.ready()
    lent = client.get_connection(timeout=0)
    assert client.ready()  # lent, but still holding its slot
    client.return_connection(lent)
    peer.close()
    assert wait_until(lambda: not client.ready())
    client.new_connection(0, peers.connect()[0])
    assert client.ready()
    client.close()
    assert not client.ready()


def test_retire_server_closes_idle_now_and_lent_on_return(
    peers: PeerServer, other: PeerServer
) -> None:
    client = CallosumClient(max_slots=4)
    idle, idle_peer = peers.connect()
    lent, lent_peer = peers.connect()
    keep, _ = other.connect()
    client.new_connection(1, idle, server="old")
    client.new_connection(0, lent, server="old")
    client.new_connection(2, keep, server="new")
    assert client.get_connection(timeout=0) is lent
    assert client.retire_server("old") == 2
    assert is_closed(idle) and peer_saw_eof(idle_peer)
    assert not is_closed(lent)
    assert client.slot_count == 1 and client.leased_count == 1
    assert client.retire_server("old") == 0  # the lent one is already retired
    assert client.retire_server("nobody") == 0
    client.return_connection(lent)
    assert is_closed(lent) and peer_saw_eof(lent_peer)
    assert client.get_connection(timeout=0) is keep
    stats = client.server_stats()
    assert stats["old"]["retired_total"] == 2 and stats["old"]["connections"] == 0
    assert stats["old"]["errors_total"] == 0 and client.stats()["retired"] == 2
    # The freed slots take new connections again.
    assert client.new_connection(5, peers.connect()[0], server="old")
    assert client.server_stats()["old"]["connections"] == 1
