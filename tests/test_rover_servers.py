"""The rover names its servers to the client, drops them with their connections, moves them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _lineservers import ScriptServer, send_segments, wait_until

from callosum_gevent import CallosumClient, CallosumServer, Rover

pytestmark = pytest.mark.timeout(20)


def until_eof(sock: Any, _address: Any) -> None:
    while sock.recv(4096):
        pass


def address_of(server: Any) -> tuple[str, int]:
    host, port = server.address[:2]
    return host, port


class TwoArgumentSink:
    """A sink written for the original protocol: new_connection(slot, sock) only."""

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


class NamingSink(TwoArgumentSink):
    """Records the server id each connection came with."""

    def __init__(self, max_slots: int = 10) -> None:
        super().__init__(max_slots)
        self.servers: list[Any] = []

    def new_connection(self, slot: int, sock: Any, *, server: Any = None) -> bool:
        self.servers.append(server)
        return super().new_connection(slot, sock)


@pytest.fixture
def make_server() -> Iterator[Callable[..., CallosumServer]]:
    started: list[CallosumServer] = []

    def make(handle: Any = until_eof, address: Any = ("127.0.0.1", 0)) -> CallosumServer:
        server = CallosumServer(address, handle)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(timeout=0.1)


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
def client() -> Iterator[CallosumClient]:
    with CallosumClient(max_slots=6) as pool:
        yield pool


# -- server ids --------------------------------------------------------------


def test_client_files_connections_under_the_rovers_server_ids(
    client: CallosumClient, make_server: Any
) -> None:
    a, b = make_server(), make_server()
    rover = Rover(client, {"a": address_of(a), ("dc", 2): address_of(b)})
    for _ in range(6):
        assert rover.rove() is not None
    stats = client.server_stats()
    assert set(stats) == {"a", ("dc", 2)}
    assert sum(s["connections"] or 0 for s in stats.values()) == 6


def test_sinks_with_and_without_the_server_keyword(make_server: Any) -> None:
    server = make_server()
    naming, plain = NamingSink(), TwoArgumentSink()
    assert Rover(naming, {"n": address_of(server)}).rove() == 0
    assert Rover(plain, {"p": address_of(server)}).rove() == 1
    assert naming.servers == ["n"]
    assert len(plain.kept) == 1
    naming.close()
    plain.close()


# -- dropping ------------------------------------------------------------------


def test_drop_server_retires_its_connections_idle_now_lent_when_returned(
    client: CallosumClient, make_server: Any, make_rover: Any
) -> None:
    a, b = make_server(), make_server()
    rover = make_rover(client, {"a": address_of(a)}, interval=0.05)
    rover.start()
    assert wait_until(lambda: client.slot_count == 6)
    lent = client.get_connection(timeout=1)
    rover.add_server("b", address_of(b))
    rover.drop_server("a")
    accepted = a.stats()["accepted"]
    # Idle ones are closed now; the lent one stays with its borrower until returned.
    assert wait_until(lambda: a.active == 1)
    assert client.server_stats()["a"]["connections"] == 0
    lent.sendall(b"still mine")
    client.return_connection(lent)
    assert wait_until(lambda: a.active == 0)
    # The rover refills from b alone.
    assert wait_until(lambda: client.slot_count == 6 and b.active == 6)
    assert a.stats()["accepted"] == accepted
    assert rover.stats()["servers"] == 1


def test_drop_server_can_keep_pooled_connections(client: CallosumClient, make_server: Any) -> None:
    a = make_server()
    rover = Rover(client, {"a": address_of(a)})
    rover.rove()
    rover.rove()
    rover.drop_server("a", retire=False)
    assert client.server_stats()["a"]["connections"] == 2
    assert a.active == 2


def test_drop_server_rejects_bad_ids_and_keyword(client: CallosumClient) -> None:
    rover = Rover(client, {"a": "127.0.0.1:1"})
    with pytest.raises(ValueError, match="server_id 'b'"):
        rover.drop_server("b")
    with pytest.raises(TypeError, match="server_id"):
        rover.drop_server(["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retire"):
        rover.drop_server("a", retire=None)  # type: ignore[arg-type]
    assert rover.stats()["servers"] == 1


def test_connection_in_setup_to_a_dropped_server_is_closed_not_offered(
    make_rover: Any,
) -> None:
    sink = NamingSink()
    # The slot line comes late, so the attempt is still in flight when the server is dropped.
    with ScriptServer(send_segments([b"", b"0\r\n"], gap=0.5)) as slow:
        rover = make_rover(sink, {"slow": slow.address}, fill_concurrency=1)
        rover.start()
        assert wait_until(lambda: slow.accepted == 1)
        rover.drop_server("slow")
        assert wait_until(lambda: slow.peer_closed == 1)
        assert rover.stats()["in_flight"] == 0
        assert sink.servers == []


# -- moving ------------------------------------------------------------------


def test_set_address_moves_a_server_and_retires_connections_to_the_old_address(
    client: CallosumClient, make_server: Any, make_rover: Any
) -> None:
    old, new = make_server(), make_server()
    rover = make_rover(client, {"a": address_of(old)}, interval=0.05)
    rover.start()
    assert wait_until(lambda: client.slot_count == 6)
    rover.set_address("a", f"127.0.0.1:{address_of(new)[1]}")
    assert wait_until(lambda: old.active == 0 and new.active == 6)
    assert client.server_stats()["a"]["connections"] == 6
    assert rover.stats()["servers"] == 1
    with client.connection(timeout=1) as sock:
        assert sock.getpeername()[:2] == address_of(new)


def test_set_address_can_keep_pooled_connections(client: CallosumClient, make_server: Any) -> None:
    old, new = make_server(), make_server()
    rover = Rover(client, {"a": address_of(old)})
    rover.rove()
    rover.set_address("a", address_of(new), retire=False)
    assert rover.rove() == 0  # from the new address: its first slot
    assert (old.active, new.active) == (1, 1)
    assert client.server_stats()["a"]["connections"] == 2


def test_set_address_to_the_same_address_changes_nothing(
    client: CallosumClient, make_server: Any
) -> None:
    server = make_server()
    rover = Rover(client, {"a": address_of(server)})
    rover.rove()
    rover.set_address("a", f"127.0.0.1:{address_of(server)[1]}")
    assert client.server_stats()["a"]["connections"] == 1
    assert server.active == 1


@pytest.mark.parametrize(
    ("server_id", "address", "error", "name"),
    [
        ("b", "127.0.0.1:2", ValueError, "server_id 'b'"),
        (["a"], "127.0.0.1:2", TypeError, "server_id"),
        ("a", "127.0.0.1", ValueError, "address"),
        ("a", "backend..internal:2", ValueError, "address"),
        ("a", 2, TypeError, "address"),
    ],
)
def test_set_address_rejects_bad_arguments_and_changes_nothing(
    client: CallosumClient, make_server: Any, server_id: Any, address: Any, error: Any, name: str
) -> None:
    server = make_server()
    rover = Rover(client, {"a": address_of(server)})
    rover.rove()
    with pytest.raises(error, match=name):
        rover.set_address(server_id, address)
    assert rover.rove() == 1  # still roving to the same server
    assert client.server_stats()["a"]["connections"] == 2
