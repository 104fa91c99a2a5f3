"""Latency-aware lending and connection ages, on real loopback servers of unequal speed."""

from __future__ import annotations

import gc
import socket as stdsocket
import subprocess
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import pytest
from _peers import PeerServer, is_closed, peer_saw_eof, wait_until
from gevent import socket
from gevent.server import StreamServer

from callosum_gevent import CallosumClient

pytestmark = pytest.mark.timeout(60)

FAST = 0.002  # seconds per request
SLOW = 4 * FAST


class Backend:
    """A loopback server answering each line after ``delay`` seconds with its name."""

    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()

    def handle(self, sock: Any, _address: Any) -> None:
        reader = sock.makefile("rb")
        try:
            while reader.readline():
                gevent.sleep(self.delay)
                sock.sendall(self.name.encode() + b"\n")
        except OSError:
            pass
        finally:
            reader.close()

    def connect(self) -> Any:
        return socket.create_connection(self.server.address)

    def stop(self) -> None:
        self.server.stop(timeout=1)


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    made = {
        "slow": Backend("slow", SLOW),
        "fast1": Backend("fast1", FAST),
        "fast2": Backend("fast2", FAST),
    }
    yield made
    for backend in made.values():
        backend.stop()


def call(client: CallosumClient) -> str:
    with client.connection(timeout=10) as sock:
        sock.sendall(b"ping\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk
            reply += chunk
    return reply.decode().strip()


def load(client: CallosumClient, greenlets: int, calls: int) -> Counter[str]:
    served: Counter[str] = Counter()

    def worker() -> None:
        for _ in range(calls):
            served[call(client)] += 1

    gevent.joinall([gevent.spawn(worker) for _ in range(greenlets)], raise_error=True)
    return served


def fill(client: CallosumClient, backends: dict[str, Backend], slots: range) -> None:
    # The slow server's connections arrive first, so they win every tie.
    for name in ("slow", "fast1", "fast2"):
        for slot in slots:
            assert client.new_connection(slot, backends[name].connect())


def test_slow_server_gets_at_most_its_capacity_share(backends: dict[str, Backend]) -> None:
    # Lowest slot first lends the slow server's slot 0 to every other call:
    # about 1/5 of the calls against a capacity share of 1/9.
    client = CallosumClient(max_slots=6)
    fill(client, backends, range(2))
    served = load(client, greenlets=2, calls=100)
    capacity_share = (1 / SLOW) / (1 / SLOW + 2 / FAST)
    assert served["slow"] / sum(served.values()) <= capacity_share, served
    client.close()


def test_rank_slot_lends_lowest_slot_whatever_the_speed(backends: dict[str, Backend]) -> None:
    client = CallosumClient(max_slots=6, rank="slot")
    fill(client, backends, range(2))
    for _ in range(3):
        assert load(client, greenlets=1, calls=10) == Counter(slow=10)
    client.close()


def test_one_slot_moves_to_the_faster_server(backends: dict[str, Backend]) -> None:
    # The new user: max_slots=1 against a fast and a 4x slower server
    # stayed on whichever came first. Now an untried server gets one turn and
    # the faster one keeps the slot.
    client = CallosumClient(max_slots=1)
    slow, fast = backends["slow"], backends["fast1"]
    first = slow.connect()
    assert client.new_connection(0, first)
    assert not client.new_connection(0, fast.connect())  # nothing measured yet
    assert load(client, 1, 10) == Counter(slow=10)
    assert client.new_connection(0, fast.connect())
    assert wait_until(lambda: is_closed(first), timeout=5)
    assert load(client, 1, 10) == Counter(fast1=10)
    assert not client.new_connection(0, slow.connect())  # measured slower
    assert load(client, 1, 10) == Counter(fast1=10)
    assert client.stats()["replaced"] == 1
    client.close()


def test_one_slot_rank_slot_stays_on_the_first(backends: dict[str, Backend]) -> None:
    client = CallosumClient(max_slots=1, rank="slot")
    assert client.new_connection(0, backends["slow"].connect())
    load(client, 1, 5)
    assert not client.new_connection(0, backends["fast1"].connect())
    assert load(client, 1, 5) == Counter(slow=5)
    client.close()


def test_connection_past_its_age_is_closed_when_handed_back(
    backends: dict[str, Backend],
) -> None:
    client = CallosumClient(max_slots=2, max_age=0.2)
    sock = backends["fast1"].connect()
    assert client.new_connection(0, sock)
    lent = client.get_connection(timeout=1)
    gevent.sleep(0.3)
    client.return_connection(lent)
    assert is_closed(sock)
    stats = client.stats()
    assert (stats["aged_out"], stats["slots"], stats["leased"]) == (1, 0, 0)
    client.close()


def test_idle_connection_ages_out_and_its_peer_sees_eof() -> None:
    server = StreamServer(("127.0.0.1", 0), lambda s, a: None)
    accepted: list[Any] = []
    server.set_handle(lambda s, a: (accepted.append(s), gevent.sleep(5)))
    server.start()
    try:
        client = CallosumClient(max_slots=2, max_age=0.1)
        sock = socket.create_connection(server.address)
        assert client.new_connection(0, sock)
        assert wait_until(lambda: is_closed(sock), timeout=5)
        assert client.stats()["aged_out"] == 1 and client.slot_count == 0
        assert wait_until(lambda: bool(accepted), timeout=5)
        assert peer_saw_eof(accepted[0])
        client.close()
    finally:
        server.stop(timeout=1)


def test_ages_are_jittered_within_ten_percent(backends: dict[str, Backend]) -> None:
    client = CallosumClient(max_slots=40, max_age=100)
    for slot in range(40):
        client.new_connection(slot, backends["fast1"].connect())
    ages = [c.expires - c.born for c in client._conns.values()]
    assert all(90 <= age <= 110 for age in ages) and len(set(ages)) > 1
    client.close()


def test_max_age_none_keeps_connections(backends: dict[str, Backend]) -> None:
    client = CallosumClient(max_slots=2, max_age=None, rank="slot")
    assert client._ticker is None  # nothing to time: no timer at all
    sock = backends["fast1"].connect()
    client.new_connection(0, sock)
    gevent.sleep(0.2)
    assert call(client) == "fast1" and not is_closed(sock)
    client.close()


def test_client_dropped_without_close_is_collected() -> None:
    # The timer holds the client weakly: a forgotten empty pool is still freed.
    client = CallosumClient(max_slots=2, max_age=0.05)
    ticker = client._ticker
    ref = weakref.ref(client)
    del client
    gc.collect()
    assert ref() is None
    assert wait_until(lambda: not ticker.active, timeout=5)


def test_close_stops_the_timer() -> None:
    client = CallosumClient(max_slots=2, max_age=0.1)
    ticker = client._ticker
    assert ticker is not None and ticker.active and not ticker.ref
    client.close()
    assert client._ticker is None and not ticker.active


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_age": 0}, ValueError),
        ({"max_age": -1.0}, ValueError),
        ({"max_age": float("nan")}, ValueError),
        ({"max_age": float("inf")}, ValueError),
        ({"max_age": "300"}, TypeError),
        ({"max_age": True}, TypeError),
        ({"rank": "fastest"}, ValueError),
        ({"rank": 1}, TypeError),
    ],
)
def test_bad_rank_or_max_age_is_refused(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        CallosumClient(**kwargs)


def test_age_timer_does_not_keep_the_hub_alive() -> None:
    # A pool with a timer, left open: the hub still finds nothing to wait for.
    code = (
        "import gevent\n"
        "from callosum_gevent import CallosumClient\n"
        "client = CallosumClient(max_age=0.5)\n"
        "gevent.wait()\n"
        "print('done')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "done"


def test_early_deaths_push_their_server_behind_the_others() -> None:
    # A server whose connections die young must not stay everyone's lowest
    # rank: each early death doubles its rank (for 30 s, halving).
    bad, good = PeerServer(), PeerServer()
    try:
        client = CallosumClient(max_slots=8)
        first = bad.connect()[0]
        assert client.new_connection(0, first)
        assert client.new_connection(1, good.connect()[0])
        assert client.get_connection(timeout=1) is first  # 1 x rank beats 2 x rank
        client.return_connection(first)
        for slot in (2, 3):
            sock, peer = bad.connect()
            assert client.new_connection(slot, sock)
            peer.close()  # it dies at once: evicted by its watcher
            assert wait_until(lambda sock=sock: is_closed(sock), timeout=5)
        assert client.stats()["early_deaths"] == 2
        lent = client.get_connection(timeout=1)
        assert lent is not first  # rank 1 x 4 now trails the good server's 2 x 1
        client.return_connection(lent)
        client.close()
    finally:
        bad.stop()
        good.stop()


def test_aged_connection_is_not_handed_to_a_waiter(backends: dict[str, Backend]) -> None:
    client = CallosumClient(max_slots=1, max_age=0.2)
    old = backends["fast1"].connect()
    assert client.new_connection(0, old)
    lent = client.get_connection(timeout=1)
    waiter = gevent.spawn(client.get_connection, 5)
    gevent.sleep(0.3)
    client.return_connection(lent)
    assert is_closed(old) and client.stats()["aged_out"] == 1 and not waiter.ready()
    fresh = backends["fast1"].connect()
    assert client.new_connection(0, fresh)  # the rover's refill goes to the waiter
    assert waiter.get(timeout=5) is fresh
    client.return_connection(fresh)
    client.close()


def test_servers_only_turned_down_are_not_remembered(backends: dict[str, Backend]) -> None:
    # A full client is offered connections from ever more server ids (a big
    # fleet, or one whose pods come and go): those it turns down carry nothing
    # to remember, and keeping them grew the table and each tick's work
    # (every untried server re-keyed against every other) without bound.
    client = CallosumClient(max_slots=1)
    assert client.new_connection(0, backends["fast1"].connect(), server="kept")
    for i in range(50):
        assert not client.new_connection(1, backends["fast2"].connect(), server=("gone", i))
    assert list(client.server_stats()) == ["kept"]
    assert len(client._state.servers) == 1
    client.close()


def test_killed_borrower_does_not_count_against_the_server(
    backends: dict[str, Backend],
) -> None:
    # gevent.kill says nothing about the server: the connection is discarded
    # (its protocol state is unknown) but must not count as an early death,
    # which would double a healthy server's rank (up to 1024x) whenever an
    # application cancels its greenlets soon after the rover connected.
    client = CallosumClient(max_slots=2)
    assert client.new_connection(0, backends["fast1"].connect())
    lent = gevent.event.Event()

    def borrower() -> None:
        with client.connection(timeout=5):
            lent.set()
            gevent.sleep(30)

    g = gevent.spawn(borrower)
    assert lent.wait(timeout=5)
    g.kill(block=True, timeout=5)
    stats = client.stats()
    assert stats["discarded"] == 1 and stats["early_deaths"] == 0
    (server,) = client._state.servers.values()
    assert server.penalty == 0.0
    client.close()


def test_lease_cut_by_a_timeout_counts_towards_its_server_average(
    backends: dict[str, Backend],
) -> None:
    # A server that stops answering: every lease on it ends in the borrower's
    # Timeout and a discard. Unmeasured, it kept its old fast average, and a
    # connection past its first seconds is no early death, so each refill to
    # it was lent first and cut again, for as long as the stall lasted.
    hung, fast = backends["fast1"], backends["fast2"]
    client = CallosumClient(max_slots=4)
    assert client.new_connection(0, hung.connect(), server="hung")
    assert client.new_connection(1, fast.connect(), server="fast")
    for _ in range(5):  # both measured: two leases at once
        assert sorted(load(client, 2, 1)) == ["fast1", "fast2"]
    gevent.sleep(3.5)  # past the early-death window
    hung.delay = 3.0
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.3):
        call(client)
    assert client.stats()["early_deaths"] == 0
    # Not a lease served: the rover reads leases_total as proof of service.
    assert client.server_stats()["hung"]["leases_total"] == 5
    assert client.new_connection(0, hung.connect(), server="hung")  # the rover's refill
    assert call(client) == "fast2"
    client.close()


@pytest.mark.timeout(10)
def test_close_after_the_hub_was_destroyed_does_not_raise() -> None:
    # The pool's timer belongs to the hub's loop: a thread that destroys its hub
    # before closing its client (as a test or a worker shutting down may) must
    # still be able to close it.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client = CallosumClient(max_slots=2)
            # The stdlib's sockets: gevent's own raise when closed after their loop is gone.
            ours, theirs = stdsocket.socketpair()
            client.new_connection(0, ours)  # idle: its watcher is armed
            gevent.get_hub().destroy(destroy_loop=True)
            client.close()
            assert client.closed and client.slot_count == 0
            theirs.close()
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert errors == []
