"""CallosumClient against real loopback sockets and real greenlets."""

from __future__ import annotations

import logging
import os
import socket as stdsocket
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import gevent
import pytest
from _peers import PeerServer, is_closed, peer_saw_eof, reset, wait_until

from callosum_gevent import CallosumClient, CallosumError, PoolClosed, PoolTimeout

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def client() -> Iterator[CallosumClient]:
    with CallosumClient(max_slots=4) as c:
        yield c


def offer(client: CallosumClient, peers: PeerServer, slot: int) -> tuple[Any, Any, bool]:
    sock, peer = peers.connect()
    return sock, peer, client.new_connection(slot, sock)


# -- behaviour carried from callosum-client-tcp ----------------------------


def test_default_max_slots_is_100_and_configurable() -> None:
    assert CallosumClient().max_slots == 100
    assert CallosumClient(max_slots=7).max_slots == 7


@pytest.mark.parametrize(
    ("value", "error"), [("10", TypeError), (1.5, TypeError), (True, TypeError), (0, ValueError)]
)
def test_bad_max_slots_is_refused(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_slots"):
        CallosumClient(max_slots=value)


def test_empty_client_times_out_at_once() -> None:
    client = CallosumClient()
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        client.get_connection(timeout=0)
    assert time.monotonic() - started < 1.0
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, CallosumError)
    assert client.stats()["timeouts"] == 1


def test_lends_lowest_slot_first(client: CallosumClient, peers: PeerServer) -> None:
    socks = {slot: offer(client, peers, slot)[0] for slot in (5, 2, 9, 0)}
    lent = [client.get_connection(timeout=0) for _ in range(4)]
    assert lent == [socks[0], socks[2], socks[5], socks[9]]


def test_max_slots_2_with_slots_1_3_2(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=2)
    one, _, kept1 = offer(client, peers, 1)
    three, three_peer, kept3 = offer(client, peers, 3)
    two, _, kept2 = offer(client, peers, 2)
    assert (kept1, kept3, kept2) == (True, True, True)
    assert is_closed(three) and peer_saw_eof(three_peer)
    assert client.get_connection(timeout=0) is one
    assert client.get_connection(timeout=0) is two
    with pytest.raises(PoolTimeout):
        client.get_connection(timeout=0)
    assert client.stats()["replaced"] == 1


def test_higher_slot_turned_down_when_full(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    offer(client, peers, 3)
    sock, peer, kept = offer(client, peers, 3)
    assert not kept and is_closed(sock) and peer_saw_eof(peer)
    assert client.stats()["turned_down"] == 1


def test_equal_slots_from_different_servers(peers: PeerServer) -> None:
    other = PeerServer()
    try:
        client = CallosumClient(max_slots=2)
        a, _, kept_a = offer(client, peers, 0)
        b, _, kept_b = offer(client, other, 0)
        assert kept_a and kept_b and client.slot_count == 2
        assert {client.get_connection(timeout=0), client.get_connection(timeout=0)} == {a, b}
    finally:
        other.stop()


def test_connection_dying_outside_frees_its_slot(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    _, peer, _ = offer(client, peers, 0)
    peer.close()
    assert wait_until(lambda: client.slot_count == 0)
    assert client.stats()["evicted"] == 1
    _, _, kept = offer(client, peers, 5)
    assert kept


def test_returned_connection_is_lent_again(client: CallosumClient, peers: PeerServer) -> None:
    sock, _, _ = offer(client, peers, 0)
    assert client.get_connection(timeout=0) is sock
    client.return_connection(sock)
    assert client.get_connection(timeout=0) is sock


def test_retired_leased_connection_closes_on_return(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    worse, worse_peer, _ = offer(client, peers, 5)
    assert client.get_connection(timeout=0) is worse
    better, _, kept = offer(client, peers, 2)
    assert kept
    assert (client.slot_count, client.idle_count, client.leased_count) == (1, 1, 1)
    assert not is_closed(worse)  # the borrower still owns it
    client.return_connection(worse)
    assert is_closed(worse) and peer_saw_eof(worse_peer)
    assert client.get_connection(timeout=0) is better
    with pytest.raises(PoolTimeout):
        client.get_connection(timeout=0)


@pytest.mark.parametrize("how", ["fin", "rst", "local"])
def test_returning_dead_connection_frees_slot(
    client: CallosumClient, peers: PeerServer, how: str
) -> None:
    sock, peer, _ = offer(client, peers, 0)
    client.get_connection(timeout=0)
    if how == "fin":
        peer.close()
    elif how == "rst":
        reset(peer)
    else:
        sock.close()
    gevent.sleep(0.01)
    client.return_connection(sock)
    assert (client.slot_count, client.idle_count, client.leased_count) == (0, 0, 0)
    assert is_closed(sock)
    assert client.stats()["dead_at_return"] == 1


# -- offering --------------------------------------------------------------


@pytest.mark.parametrize(
    ("slot", "error"),
    [("1", TypeError), (1.0, TypeError), (True, TypeError), (None, TypeError), (-1, ValueError)],
)
def test_bad_slot_is_refused_and_socket_untouched(
    client: CallosumClient, peers: PeerServer, slot: Any, error: type[Exception]
) -> None:
    sock, _ = peers.connect()
    with pytest.raises(error, match="slot"):
        client.new_connection(slot, sock)
    assert not is_closed(sock)
    assert client.slot_count == 0 and client.stats()["kept"] == 0
    sock.close()


def test_slot_above_ceiling_is_refused(peers: PeerServer) -> None:
    client = CallosumClient(max_slot_number=1000)
    sock, _ = peers.connect()
    with pytest.raises(ValueError, match="slot"):
        client.new_connection(1001, sock)
    assert client.new_connection(1000, sock)


def test_non_socket_closed_socket_and_duplicate_are_refused(
    client: CallosumClient, peers: PeerServer
) -> None:
    with pytest.raises(TypeError, match="sock"):
        client.new_connection(0, object())
    dead, _ = peers.connect()
    dead.close()
    with pytest.raises(ValueError, match="closed"):
        client.new_connection(0, dead)
    sock, _, _ = offer(client, peers, 0)
    with pytest.raises(ValueError, match="already pooled"):
        client.new_connection(1, sock)
    assert client.slot_count == 1


def test_keepalive_is_set_on_kept_sockets(peers: PeerServer) -> None:
    client = CallosumClient(keepalive_idle=7, keepalive_interval=3, keepalive_count=2)
    sock, _, _ = offer(client, peers, 0)
    assert sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_KEEPIDLE) == 7
    assert sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_KEEPINTVL) == 3
    assert sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_KEEPCNT) == 2
    plain = CallosumClient(keepalive=False)
    other, _, _ = offer(plain, peers, 0)
    assert other.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_KEEPALIVE) == 0


# -- returning and discarding ----------------------------------------------


def test_foreign_and_double_return_raise_and_change_nothing(
    client: CallosumClient, peers: PeerServer
) -> None:
    sock, _, _ = offer(client, peers, 0)
    foreign, _ = peers.connect()
    before = client.stats()
    with pytest.raises(ValueError, match="not lent"):
        client.return_connection(foreign)
    with pytest.raises(ValueError, match="not lent"):
        client.return_connection(sock)  # idle: never lent
    with pytest.raises(ValueError, match="not lent"):
        client.discard_connection(foreign)
    assert client.stats() == before
    lent = client.get_connection(timeout=0)
    client.return_connection(lent)
    with pytest.raises(ValueError):
        client.return_connection(lent)
    assert (client.idle_count, client.leased_count) == (1, 0)
    assert not is_closed(foreign)


def test_discard_closes_and_frees_slot(client: CallosumClient, peers: PeerServer) -> None:
    sock, peer, _ = offer(client, peers, 0)
    client.discard_connection(client.get_connection(timeout=0))
    assert is_closed(sock) and peer_saw_eof(peer)
    assert client.slot_count == 0 and client.stats()["discarded"] == 1
    with pytest.raises(ValueError):
        client.discard_connection(sock)


def test_connection_context_returns_or_discards(client: CallosumClient, peers: PeerServer) -> None:
    sock, _, _ = offer(client, peers, 0)
    with client.connection(timeout=1) as lent:
        assert lent is sock
        assert client.leased_count == 1
    assert client.idle_count == 1
    with pytest.raises(RuntimeError, match="boom"), client.connection() as lent:
        raise RuntimeError("boom")
    assert is_closed(sock) and client.slot_count == 0


def test_connection_context_tolerates_borrower_discarding(
    client: CallosumClient, peers: PeerServer
) -> None:
    offer(client, peers, 0)
    with pytest.raises(OSError), client.connection() as lent:
        client.discard_connection(lent)
        raise OSError("broken")
    assert client.slot_count == 0


@pytest.mark.parametrize("bad", ["1", -1.0, float("nan")])
def test_bad_timeout_is_refused(client: CallosumClient, peers: PeerServer, bad: Any) -> None:
    offer(client, peers, 0)
    with pytest.raises((TypeError, ValueError), match="timeout"):
        client.get_connection(timeout=bad)
    assert client.idle_count == 1


@pytest.mark.parametrize("good", [Fraction(1, 2), Fraction(3)])
def test_any_real_number_is_a_timeout(client: CallosumClient, peers: PeerServer, good: Any) -> None:
    # numpy's integers and floats, Fractions and the like are real numbers too.
    offer(client, peers, 0)
    client.return_connection(client.get_connection(timeout=good))
    with client.connection(timeout=good):
        pass
    assert client.idle_count == 1


# -- waiting -----------------------------------------------------------------


def test_waiters_are_served_in_order_one_at_a_time(
    client: CallosumClient, peers: PeerServer
) -> None:
    sock, _, _ = offer(client, peers, 0)
    client.get_connection(timeout=0)
    served: list[int] = []

    def wait(i: int) -> None:
        with client.connection(timeout=5):
            served.append(i)
            gevent.sleep(0.01)

    greenlets = []
    for i in range(5):
        greenlets.append(gevent.spawn(wait, i))
        gevent.sleep(0)  # queue them in spawn order
    assert client.stats()["waiting"] == 5
    client.return_connection(sock)
    gevent.sleep(0.001)
    assert served == [0]  # one connection wakes one waiter
    gevent.joinall(greenlets, raise_error=True)
    assert served == [0, 1, 2, 3, 4]


def test_late_caller_cannot_barge_in(client: CallosumClient, peers: PeerServer) -> None:
    sock, _, _ = offer(client, peers, 0)
    client.get_connection(timeout=0)
    waiter = gevent.spawn(client.get_connection, timeout=5)
    gevent.sleep(0)
    client.return_connection(sock)
    with pytest.raises(PoolTimeout):
        client.get_connection(timeout=0)  # the waiter was first
    assert waiter.get() is sock


def test_new_connection_goes_to_waiter(client: CallosumClient, peers: PeerServer) -> None:
    waiter = gevent.spawn(client.get_connection, timeout=5)
    gevent.sleep(0)
    sock, _, _ = offer(client, peers, 3)
    assert waiter.get() is sock
    assert client.leased_count == 1 and client.idle_count == 0


def test_waiter_times_out_and_leaves_queue(client: CallosumClient) -> None:
    with pytest.raises(PoolTimeout):
        client.get_connection(timeout=0.05)
    assert client.stats()["waiting"] == 0 and client.stats()["timeouts"] == 1


@pytest.mark.parametrize("interruption", [gevent.GreenletExit, gevent.Timeout])
def test_interrupted_waiter_passes_handed_connection_on(
    client: CallosumClient, peers: PeerServer, interruption: type[BaseException]
) -> None:
    sock, _, _ = offer(client, peers, 0)
    client.get_connection(timeout=0)
    first = gevent.spawn(client.get_connection, timeout=5)
    second = gevent.spawn(client.get_connection, timeout=5)
    gevent.sleep(0)
    # The interruption is queued first, so it lands inside the first waiter's
    # wait after the connection was handed to it, before it could take it.
    first.kill(interruption, block=False)
    client.return_connection(sock)
    assert second.get(timeout=2) is sock
    assert first.dead and first.value is not sock
    assert client.slot_count == 1 and client.leased_count == 1


@pytest.mark.parametrize("interruption", [gevent.GreenletExit, gevent.Timeout])
def test_waits_after_served_timed_out_and_killed_ones_are_woken_and_time_out_in_full(
    client: CallosumClient, peers: PeerServer, interruption: type[BaseException]
) -> None:
    # Waiters (their Event and timer) are reused once served: a later wait,
    # whatever came before it, is woken by a hand-over, keeps no stale wake-up
    # and gets its full timeout, counted from its own start.
    sock, _, _ = offer(client, peers, 0)
    client.get_connection(timeout=0)
    for round_ in range(3):
        served = [gevent.spawn(client.get_connection, timeout=5) for _ in range(3)]
        killed = gevent.spawn(client.get_connection, timeout=5)
        gevent.sleep(0)
        for waiter in served:
            client.return_connection(sock)  # set() wakes the longest waiter
            assert waiter.get(timeout=2) is sock
        # Queued first, the interruption lands after the hand-over, before the take.
        killed.kill(interruption, block=False)
        client.return_connection(sock)
        killed.join(timeout=2)
        assert killed.dead and killed.value is not sock
        assert client.get_connection(timeout=0) is sock  # the killed one passed it on
        started = time.monotonic()
        # CPU-bound work first: the timer must still count from the wait's start.
        time.sleep(0.05)
        with pytest.raises(PoolTimeout):
            client.get_connection(timeout=0.1 + round_ * 0.05)
        assert time.monotonic() - started >= 0.15 + round_ * 0.05
    assert client.stats()["waiting"] == 0 and client.leased_count == 1


def test_outer_timeout_inside_get_connection_loses_nothing(
    client: CallosumClient, peers: PeerServer
) -> None:
    sock, _, _ = offer(client, peers, 0)
    client.get_connection(timeout=0)
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.02):
        client.get_connection()
    assert client.stats()["waiting"] == 0
    client.return_connection(sock)
    assert client.get_connection(timeout=0) is sock


def test_killed_borrower_inside_with_discards(client: CallosumClient, peers: PeerServer) -> None:
    offer(client, peers, 0)
    offer(client, peers, 1)

    def borrow() -> None:
        with client.connection():
            gevent.sleep(10)

    g = gevent.spawn(borrow)
    gevent.sleep(0.01)
    g.kill()
    assert client.slot_count == 1 and client.leased_count == 0
    with client.connection(timeout=1):
        pass


def test_close_wakes_waiters_with_pool_closed(client: CallosumClient) -> None:
    waiters = [gevent.spawn(client.get_connection) for _ in range(3)]
    gevent.sleep(0)
    client.close()
    for g in waiters:
        g.join(timeout=2)
        assert isinstance(g.exception, PoolClosed)
    assert client.stats()["waiting"] == 0


# -- the watcher and hand-out check -----------------------------------------


@pytest.mark.parametrize("how", ["fin", "rst", "bytes"])
def test_watcher_evicts_idle_connection(
    client: CallosumClient, peers: PeerServer, how: str
) -> None:
    sock, peer, _ = offer(client, peers, 0)
    keep, _, _ = offer(client, peers, 1)
    if how == "fin":
        peer.close()
    elif how == "rst":
        reset(peer)
    else:
        peer.sendall(b"stale")
    assert wait_until(lambda: client.slot_count == 1, timeout=2)
    assert is_closed(sock) and client.stats()["evicted"] == 1
    assert client.get_connection(timeout=0) is keep


def test_hand_out_refuses_connection_whose_fin_arrived(
    client: CallosumClient, peers: PeerServer
) -> None:
    dead, peer, _ = offer(client, peers, 0)
    alive, _, _ = offer(client, peers, 1)
    peer.close()
    time.sleep(0.02)  # a real sleep: the FIN arrives but the hub does not run
    assert client.idle_count == 2  # the watcher has not had a turn
    assert client.get_connection(timeout=0) is alive
    assert is_closed(dead) and client.stats()["dead_at_handout"] == 1


def test_leased_connection_is_not_watched(client: CallosumClient, peers: PeerServer) -> None:
    _, peer, _ = offer(client, peers, 0)
    lent = client.get_connection(timeout=0)
    peer.sendall(b"reply")
    gevent.sleep(0.02)
    assert client.leased_count == 1 and client.stats()["evicted"] == 0
    assert lent.recv(16) == b"reply"
    client.return_connection(lent)
    assert client.idle_count == 1


# -- closing, reporting, logging, fork --------------------------------------


def test_close_closes_idle_and_later_returns(client: CallosumClient, peers: PeerServer) -> None:
    lent_sock, _, _ = offer(client, peers, 0)
    idle, idle_peer, _ = offer(client, peers, 1)
    lent = client.get_connection(timeout=0)
    assert lent is lent_sock
    client.close()
    client.close()  # idempotent
    assert is_closed(idle) and peer_saw_eof(idle_peer)
    assert not is_closed(lent)
    with pytest.raises(PoolClosed):
        client.get_connection(timeout=0)
    late, _ = peers.connect()
    assert client.new_connection(0, late) is False and is_closed(late)
    foreign, _ = peers.connect()
    with pytest.raises(ValueError):
        client.return_connection(foreign)
    client.return_connection(lent)
    assert is_closed(lent)


def test_repr_and_stats(client: CallosumClient, peers: PeerServer) -> None:
    for slot in range(3):
        offer(client, peers, slot)
    client.get_connection(timeout=0)
    assert repr(client) == "<CallosumClient slots=3/4 idle=2 leased=1 waiting=0>"
    stats = client.stats()
    assert stats["kept"] == 3 and stats["idle"] == 2 and stats["leased"] == 1
    assert set(stats) >= {
        "kept",
        "turned_down",
        "replaced",
        "evicted",
        "dead_at_handout",
        "dead_at_return",
        "discarded",
        "waits",
        "timeouts",
        "waiting",
    }


def test_debug_logging(
    client: CallosumClient, peers: PeerServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="callosum_gevent"):
        offer(client, peers, 3)
    assert "kept slot 3" in caplog.text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_starts_afresh_without_closing_parents(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=2)
    sock, peer, _ = offer(client, peers, 0)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        ok = client.slot_count == 0 and client.idle_count == 0 and not client.closed
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not peer_saw_eof(peer, timeout=0.1)  # the parent's connection is still up
    assert client.get_connection(timeout=0) is sock


def test_tls_bytes_buffered_in_ssl_object_are_caught_at_hand_out(peers: PeerServer) -> None:
    import trustme
    from gevent import ssl

    ca = trustme.CA()
    # gevent's SSLContext: the stdlib's (what create_default_context makes)
    # would block the hub during the handshake.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    raw, raw_peer = peers.connect()
    handshake = gevent.spawn(server_ctx.wrap_socket, raw_peer, server_side=True)
    sock = client_ctx.wrap_socket(raw, server_hostname="localhost")
    peer = handshake.get(timeout=5)
    peer.sendall(b"0\r\nstale")  # one TLS record: the slot line and stray bytes
    assert sock.recv(3) == b"0\r\n"
    assert sock.pending() == 5  # decrypted, buffered: the kernel socket is quiet
    client = CallosumClient()
    assert client.new_connection(0, sock)
    with pytest.raises(PoolTimeout):
        client.get_connection(timeout=0)
    assert client.stats()["dead_at_handout"] == 1 and is_closed(sock)


def test_waiter_keeps_connection_handed_as_its_time_runs_out(
    client: CallosumClient, peers: PeerServer
) -> None:
    sock, _, _ = offer(client, peers, 0)
    client.get_connection(timeout=0)
    waiter = gevent.spawn(client.get_connection, timeout=0.01)
    gevent.sleep(0)
    time.sleep(0.05)  # a real sleep: the waiter's timer is due but has not run
    client.return_connection(sock)
    assert waiter.get(timeout=2) is sock  # handed over before the timer ran
    assert client.stats()["timeouts"] == 0


def test_dead_connection_handed_to_waiter_is_refused_by_it(
    client: CallosumClient, peers: PeerServer
) -> None:
    dead, peer, _ = offer(client, peers, 0)
    client.get_connection(timeout=0)
    waiter = gevent.spawn(client.get_connection, timeout=5)
    gevent.sleep(0)
    peer.close()
    gevent.sleep(0.01)
    client.return_connection(dead)  # straight to the waiter, who checks it
    fresh, _, _ = offer(client, peers, 1)
    assert waiter.get(timeout=2) is fresh
    assert is_closed(dead) and client.stats()["dead_at_handout"] == 1
    assert client.slot_count == 1


def test_connection_retired_on_its_way_to_a_waiter_is_never_lent(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    worse, worse_peer, _ = offer(client, peers, 5)
    client.get_connection(timeout=0)
    waiter = gevent.spawn(client.get_connection, timeout=5)
    gevent.sleep(0)
    better, _ = peers.connect()  # connect first: connecting yields to the hub
    client.return_connection(worse)  # handed to the waiter, which has not woken
    assert client.new_connection(2, better)  # retires the one on its way
    assert waiter.get(timeout=2) is better
    assert is_closed(worse) and peer_saw_eof(worse_peer)
    assert (client.slot_count, client.idle_count, client.leased_count) == (1, 0, 1)
