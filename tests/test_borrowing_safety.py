"""Borrowing safety (issue 9): no socket ever reaches two borrowers, whatever the caller does.

Real loopback sockets, real greenlets; each test reproduces one way a caller
(or a fork, a thread, a busy greenlet) used to hand one socket to two
borrowers, leak a closed or reconfigured socket, or cut a wait short.
"""

from __future__ import annotations

import io
import logging
import os
import random
import socket as stdsocket
import threading
import time
from typing import Any

import gevent
import pytest
from _peers import PeerServer, is_closed

from callosum_gevent import CallosumClient, PoolTimeout

pytestmark = pytest.mark.timeout(30)


def offer(client: CallosumClient, peers: PeerServer, slot: int) -> Any:
    sock, _ = peers.connect()
    assert client.new_connection(slot, sock)
    return sock


def busy(seconds: float) -> None:
    """Keep this greenlet on the CPU, never yielding to the hub."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


# -- item 1: stale returns and discards -------------------------------------


def test_second_return_while_handed_to_a_waiter_is_refused(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    sock = offer(client, peers, 0)
    assert client.get_connection(timeout=0) is sock
    waiter = gevent.spawn(client.get_connection, timeout=5)
    third = gevent.spawn(client.get_connection, timeout=0.3)
    gevent.sleep(0)
    client.return_connection(sock)  # straight to the waiter, who has not woken
    with pytest.raises(ValueError, match="not lent"):
        client.return_connection(sock)
    with pytest.raises(ValueError, match="not lent"):
        client.discard_connection(sock)
    assert waiter.get(timeout=2) is sock and not is_closed(sock)
    with pytest.raises(PoolTimeout):
        third.get(timeout=2)  # the socket was never pooled twice
    assert (client.slot_count, client.idle_count, client.leased_count) == (1, 0, 1)


def test_discard_after_return_does_not_close_the_next_borrowers_socket(
    peers: PeerServer,
) -> None:
    client = CallosumClient(max_slots=1)
    sock = offer(client, peers, 0)
    client.get_connection(timeout=0)
    waiter = gevent.spawn(client.get_connection, timeout=5)
    gevent.sleep(0)
    client.return_connection(sock)
    with pytest.raises(ValueError, match="not lent"):
        client.discard_connection(sock)
    assert waiter.get(timeout=2) is sock
    sock.sendall(b"still mine")  # no EBADF for the innocent borrower


def test_with_block_returning_its_socket_itself_exits_quietly(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    sock = offer(client, peers, 0)
    got: list[Any] = []

    def wait() -> None:
        got.append(client.get_connection(timeout=5))

    with client.connection(timeout=1) as lent:
        waiter = gevent.spawn(wait)
        gevent.sleep(0)
        client.return_connection(lent)  # handed to the waiter
        gevent.sleep(0)  # the waiter now holds it
        assert got == [sock]
    # Exit did nothing: the waiter still holds it, nothing was pooled twice.
    waiter.join()
    assert (client.idle_count, client.leased_count) == (0, 1)
    client.return_connection(got[0])
    assert client.idle_count == 1


def test_with_block_raising_after_giving_back_does_not_discard_the_waiters_socket(
    peers: PeerServer,
) -> None:
    client = CallosumClient(max_slots=1)
    sock = offer(client, peers, 0)
    with pytest.raises(RuntimeError, match="boom"), client.connection(timeout=1) as lent:
        waiter = gevent.spawn(client.get_connection, timeout=5)
        gevent.sleep(0)
        client.return_connection(lent)
        raise RuntimeError("boom")
    assert waiter.get(timeout=2) is sock and not is_closed(sock)
    assert client.slot_count == 1 and client.stats()["discarded"] == 0


def test_lease_entered_twice_or_from_two_greenlets_is_refused(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=2)
    offer(client, peers, 0)
    offer(client, peers, 1)
    lease = client.connection(timeout=1)
    with lease:
        with pytest.raises(RuntimeError, match="already in use"), lease:
            pass
        other = gevent.spawn(lease.__enter__)
        with pytest.raises(RuntimeError, match="already in use"):
            other.get(timeout=2)
        assert client.leased_count == 1
    assert client.idle_count == 2
    with lease:  # entered again after its exit: a fresh lease of its own
        assert client.leased_count == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_socket_reaches_two_borrowers_under_contention(peers: PeerServer, seed: int) -> None:
    """150 greenlets on 5 connections, some returning or discarding inside their with block."""
    rng = random.Random(seed)
    client = CallosumClient(max_slots=5)
    for slot in range(5):
        offer(client, peers, slot)
    holders: dict[Any, int] = {}
    shared: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def borrow(me: int) -> None:
        for _ in range(20):
            action = rng.random()
            try:
                with client.connection(timeout=10) as sock:
                    if sock in holders:
                        shared.append((holders[sock], me))
                    holders[sock] = me
                    gevent.sleep(0)
                    if holders.get(sock) != me:
                        shared.append((holders.get(sock, -1), me))
                    del holders[sock]
                    if action < 0.2:
                        client.return_connection(sock)  # then exit does nothing
                        with pytest.raises(ValueError):
                            client.return_connection(sock)
                    elif action < 0.25:
                        client.return_connection(sock)
                        raise OSError("after giving it back")
                    elif action < 0.27:
                        client.discard_connection(sock)
                    gevent.sleep(0)
            except OSError:
                pass
            except BaseException as exc:
                errors.append(exc)
                raise
            if client.slot_count < 5:
                client.new_connection(5 + me, peers.connect()[0])  # replace a discarded one

    greenlets = [gevent.spawn(borrow, n) for n in range(150)]
    gevent.joinall(greenlets, timeout=50)
    assert all(g.ready() for g in greenlets)
    assert not errors, errors[:3]
    assert not shared, shared[:5]
    stats = client.stats()
    assert stats["leased"] == 0 and stats["waiting"] == 0
    assert stats["idle"] == stats["slots"] <= 5


# -- item 2: fork with a handover pending ------------------------------------


def _child_exit(check: Any) -> None:
    try:
        code = check()
    except BaseException:  # the child reports through its exit code only
        code = 99
    os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_with_a_handover_pending_starts_the_child_empty(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=2)
    a = offer(client, peers, 0)
    b = offer(client, peers, 1)
    exits: list[str] = []

    def borrow_across_fork() -> None:
        with client.connection(timeout=5):
            exits.append("entered")
            gevent.sleep(0.2)
        exits.append("exited")

    borrower = gevent.spawn(borrow_across_fork)
    gevent.sleep(0)
    assert client.get_connection(timeout=0) is b
    waiter = gevent.spawn(client.get_connection, timeout=5)
    gevent.sleep(0)
    client.return_connection(b)  # handed to the waiter, who has not woken
    address = peers.server.address
    pid = gevent.fork()  # before the waiter runs
    if pid == 0:

        def check() -> int:
            stats = client.stats()
            if (stats["slots"], stats["idle"], stats["leased"], stats["kept"]) != (0, 0, 0, 0):
                return 2
            gevent.sleep(0.01)  # the waiter wakes to a socket not its own
            stats = client.stats()
            if waiter.ready() or (stats["slots"], stats["leased"], stats["waiting"]) != (0, 0, 1):
                return 3
            # The parent's descriptors are closed here: a new socket may reuse
            # one's number, and the waiter must get the new socket.
            mine = stdsocket.create_connection(address)
            fresh = gevent.socket.socket(fileno=mine.detach())
            if not client.new_connection(0, fresh):
                return 4
            if waiter.get(timeout=2) is not fresh:
                return 5
            borrower.join(timeout=2)  # its with block exits quietly
            if not borrower.successful() or exits != ["entered", "exited"]:
                return 6
            stats = client.stats()
            if (stats["slots"], stats["idle"], stats["leased"]) != (1, 0, 1):
                return 7
            return 0

        _child_exit(check)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent is untouched: the waiter and the borrower go on as before.
    assert waiter.get(timeout=2) is b
    borrower.join(timeout=2)
    assert borrower.successful() and exits == ["entered", "exited"]
    assert not is_closed(a) and client.get_connection(timeout=0) is a
    assert (client.slot_count, client.leased_count) == (2, 2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_zeroes_the_counters(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=2)
    offer(client, peers, 0)
    client.discard_connection(client.get_connection(timeout=0))
    assert client.stats()["kept"] == 1
    pid = gevent.fork()
    if pid == 0:
        _child_exit(lambda: 0 if not any(client.stats().values()) else 2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.stats()["kept"] == 1 and client.stats()["discarded"] == 1


# -- item 3: waits after CPU-bound work ---------------------------------------


def test_wait_after_cpu_bound_work_lasts_its_full_timeout(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    sock = offer(client, peers, 0)
    client.get_connection(timeout=0)

    def give_back_later() -> None:
        gevent.sleep(1.2)  # from now: 0.2 s into the wait below
        client.return_connection(sock)

    returner = gevent.spawn(give_back_later)
    # Resumed by a timer, not the callback queue: the loop's cached time then
    # stays as it was while this greenlet works.
    gevent.sleep(0.001)
    busy(1.0)
    start = time.perf_counter()
    assert client.get_connection(timeout=0.5) is sock
    assert time.perf_counter() - start >= 0.1
    returner.join()
    # And with nothing coming back, the wait lasts its whole timeout.
    gevent.sleep(0.001)
    busy(1.0)
    start = time.perf_counter()
    with pytest.raises(PoolTimeout):
        client.get_connection(timeout=0.3)
    assert time.perf_counter() - start >= 0.25


# -- item 4: closed and reconfigured sockets at return -----------------------


def test_socket_closed_with_a_live_makefile_is_not_lent_again(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=2)
    sock = offer(client, peers, 0)
    with client.connection(timeout=1) as lent:
        rfile = lent.makefile("rb")
        lent.close()  # gevent defers the real close while rfile lives
    assert client.stats()["dead_at_return"] == 1 and client.slot_count == 0
    other = offer(client, peers, 1)
    assert client.get_connection(timeout=0) is other
    rfile.close()
    assert is_closed(sock)


def test_timeout_and_blocking_mode_are_restored_at_return(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    sock = offer(client, peers, 0)
    pooled = sock.gettimeout()
    with client.connection(timeout=1) as lent:
        lent.settimeout(0.001)
    assert client.get_connection(timeout=0).gettimeout() == pooled
    sock.setblocking(False)
    client.return_connection(sock)
    with client.connection(timeout=1) as lent:
        assert lent.gettimeout() == pooled
        lent.settimeout(2.5)
    waiter = gevent.spawn(client.get_connection, timeout=5)
    with client.connection(timeout=1) as lent:
        gevent.sleep(0)
        lent.settimeout(0.001)  # then handed straight to the waiter
    assert waiter.get(timeout=2).gettimeout() == pooled


# -- item 5: sockets refused at new_connection --------------------------------


def test_unconnected_udp_foreign_and_file_sockets_are_refused(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=4)
    unconnected = gevent.socket.socket()
    udp = gevent.socket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
    udp.connect(peers.server.address)  # connected, so it has a peer
    sock, _ = peers.connect()
    other = CallosumClient(max_slots=4)
    assert other.new_connection(0, sock)
    spare, _ = peers.connect()
    rwfile = spare.makefile("rwb")
    for bad, error, match in [
        (unconnected, ValueError, "sock is not connected"),
        (udp, ValueError, "sock must be a stream"),
        (sock, ValueError, "sock is already pooled by another client"),
        (rwfile, TypeError, "sock must be a socket"),
        (io.BytesIO(), TypeError, "sock must be a socket"),
    ]:
        with pytest.raises(error, match=match):
            client.new_connection(0, bad)
    assert client.slot_count == 0 and client.stats()["kept"] == 0
    assert not any(is_closed(s) for s in (unconnected, udp, sock, spare))
    assert other.get_connection(timeout=0) is sock
    other.discard_connection(sock)  # gone from the registry: a new socket may reuse its fd
    again, _ = peers.connect()
    assert client.new_connection(0, again)
    for s in (unconnected, udp, spare):
        s.close()


# -- item 6: threads ------------------------------------------------------------


def test_waiting_from_another_os_thread_is_refused(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=1)
    outcome: list[BaseException | object] = []

    def use() -> None:
        try:
            outcome.append(client.get_connection(timeout=1))
        except BaseException as exc:  # reported to the test below
            outcome.append(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError)
    assert "thread" in str(outcome[0])


# -- item 8: debug logs name the server ------------------------------------------


def test_debug_logs_name_the_server(peers: PeerServer, caplog: pytest.LogCaptureFixture) -> None:
    client = CallosumClient(max_slots=1)
    with caplog.at_level(logging.DEBUG, logger="callosum_gevent"):
        sock, _ = peers.connect()
        client.new_connection(3, sock, server="b1")
        client.discard_connection(client.get_connection(timeout=0))
    assert "kept slot 3 of 'b1'" in caplog.text
    assert "closed slot 3 of 'b1': discarded" in caplog.text


def test_lease_entered_by_a_second_greenlet_while_the_first_waits_is_refused(
    peers: PeerServer,
) -> None:
    client = CallosumClient(max_slots=2)
    first = offer(client, peers, 0)
    second = offer(client, peers, 1)
    assert client.get_connection(timeout=0) is first
    assert client.get_connection(timeout=0) is second
    lease = client.connection(timeout=5)
    got: list[Any] = []

    def use() -> None:
        with lease as sock:
            got.append(sock)
            gevent.sleep(0.05)
            sock.sendall(b"mine")

    waiting = gevent.spawn(use)
    gevent.sleep(0)  # it waits inside lease.__enter__
    intruder = gevent.spawn(use)
    with pytest.raises(RuntimeError, match="already in use"):
        intruder.get(timeout=2)
    client.return_connection(first)
    client.return_connection(second)
    waiting.get(timeout=2)
    assert got == [first]
    # The lease gave back the one socket it took; the other stayed idle throughout.
    assert (client.slot_count, client.idle_count, client.leased_count) == (2, 2, 0)
    # And a lease whose wait failed can be entered again.
    lease = client.connection(timeout=0.01)
    held = [client.get_connection(timeout=0), client.get_connection(timeout=0)]
    with pytest.raises(PoolTimeout), lease:
        pass
    client.return_connection(held[0])
    with lease as sock:
        assert sock is held[0]
    client.return_connection(held[1])
    assert client.idle_count == 2


def test_duplicates_of_a_pooled_socket_are_refused(peers: PeerServer) -> None:
    """dup(), fromfd() and socket(fileno=os.dup()) copy the descriptor, not the connection."""
    client = CallosumClient(max_slots=4)
    other = CallosumClient(max_slots=4)
    sock = offer(client, peers, 0)
    copies = [
        sock.dup(),
        gevent.socket.fromfd(sock.fileno(), sock.family, sock.type),
        gevent.socket.socket(fileno=os.dup(sock.fileno())),
        stdsocket.socket(fileno=os.dup(sock.fileno())),
    ]
    for copy in copies:
        for pool, whose in ((client, "this"), (other, "another")):
            with pytest.raises(ValueError, match=f"sock is already pooled by {whose} client"):
                pool.new_connection(1, copy)
    assert client.stats()["kept"] == 1 and other.stats()["kept"] == 0
    assert not any(is_closed(copy) for copy in copies)
    # Once the pool lets the original go, a copy may be pooled in its place.
    client.discard_connection(client.get_connection(timeout=0))
    assert other.new_connection(0, copies[0])
    with pytest.raises(ValueError, match="already pooled by another client"):
        client.new_connection(0, copies[1])
    for copy in copies[1:]:
        copy.close()


class _TextFileno(gevent.socket.socket):
    def fileno(self) -> Any:
        return str(super().fileno())


class _BogusFileno(gevent.socket.socket):
    def fileno(self) -> int:
        return 2**20  # no such descriptor


class _FailingFileno(gevent.socket.socket):
    def fileno(self) -> int:
        raise OSError("no descriptor")


def test_sockets_with_a_weird_fileno_are_refused_naming_sock(peers: PeerServer) -> None:
    client = CallosumClient(max_slots=2)
    for kind, error, match in [
        (_TextFileno, TypeError, "sock.fileno"),
        (_FailingFileno, ValueError, "sock is closed"),
        (_BogusFileno, ValueError, "sock is closed"),
    ]:
        sock, _ = peers.connect()
        weird = kind(fileno=sock.detach())
        with pytest.raises(error, match=match):
            client.new_connection(0, weird)
        assert client.stats()["kept"] == 0 and not weird._closed
        weird.close()
