"""Faults the pool must survive: dead servers, half-open peers, killed borrowers, fork."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import gevent
import gevent.os
import pytest
from _farm import TICK, Farm, fin_pending, port_of, request
from _lineservers import wait_until
from _peers import is_closed
from _processes import line_server
from gevent import socket

from callosum_gevent import CallosumClient, PoolTimeout, Rover
from callosum_gevent._lineproto import request as line_request
from callosum_gevent._slotline import read_slot_line


@pytest.fixture
def farm() -> Iterator[Farm]:
    servers = Farm(3)
    yield servers
    servers.close()


def borrow_all(client: CallosumClient) -> list[Any]:
    """Borrow every idle connection; the caller hands them back."""
    socks = []
    while True:
        try:
            socks.append(client.get_connection(timeout=0))
        except PoolTimeout:
            return socks


def idle_ports(client: CallosumClient) -> list[int]:
    """Return the server port of every idle connection, leaving them idle."""
    socks = borrow_all(client)
    ports = [port_of(sock) for sock in socks]
    for sock in socks:
        client.return_connection(sock)
    return ports


# -- a server dies -----------------------------------------------------------


@pytest.mark.timeout(20)
def test_killed_server_idle_evicted_borrower_errors_rover_refills(farm: Farm) -> None:
    client = CallosumClient(max_slots=9)
    dying = farm.ports[0]
    # Three connections to the server that will die: slots 0, 1 and 2.
    seed = Rover(client, {0: ("127.0.0.1", dying)})
    assert [seed.rove() for _ in range(3)] == [0, 1, 2]
    leased = client.get_connection(timeout=0)
    assert port_of(leased) == dying
    rover = Rover(client, farm.addresses(), interval=3600, backoff_base=0.05)
    # Fill by hand, so that no attempt in the background displaces anything.
    while client.slot_count < 9:
        rover.rove()
    socks = borrow_all(client)
    doomed = [s for s in socks if port_of(s) == dying]
    for sock in socks:
        client.return_connection(sock)
    assert len(doomed) >= 2  # slots 1 and 2 of the dying server
    evicted = client.stats()["evicted"]
    with rover:
        farm.stop(0)  # stop(timeout=0): handlers killed, connections closed

        # Idle connections to it are evicted by their watchers, without a borrower.
        assert wait_until(lambda: all(is_closed(s) for s in doomed), timeout=5)
        assert client.stats()["evicted"] - evicted == len(doomed)
        # The borrower of the leased one gets an error, not a hang.
        with gevent.Timeout(5):
            try:
                reply = request(leased, b"ping")
            except OSError:
                reply = b""
        assert reply == b""
        before = client.slot_count
        client.discard_connection(leased)
        assert client.slot_count == before - 1
        # The rover refills from the two servers left (woken: its interval is an hour).
        rover.wake()
        assert wait_until(lambda: client.slot_count == 9, timeout=10)
        assert dying not in idle_ports(client)
        assert set(idle_ports(client)) <= {farm.ports[1], farm.ports[2]}
    assert client.leased_count == 0
    client.close()


@pytest.mark.timeout(30)
def test_no_request_is_lent_a_connection_already_dead(farm: Farm) -> None:
    """Requests run while servers die and come back on the same ports.

    At every hand-out, no FIN, RST or byte may already be waiting on the
    socket; a request that then meets EOF must be on a connection whose server
    end was shut down after the hand-out.
    """
    rng = random.Random(5)
    client = CallosumClient(max_slots=12)
    rover = Rover(client, farm.addresses(), interval=0.02, backoff_base=0.02, backoff_max=0.1)
    lent_dead: list[tuple[int, int]] = []
    outcomes = {"ok": 0, "eof": 0, "oserror": 0, "timeout": 0}
    eofs: list[tuple[int, int, int]] = []  # (server port, client port, hand-out tick)
    deadline = time.monotonic() + 2.5

    def check(sock: Any) -> int:
        tick = next(TICK)
        if fin_pending(sock):
            lent_dead.append((port_of(sock), tick))
        return tick

    def worker(n: int) -> None:
        while time.monotonic() < deadline:
            payload = b"%d\n" % n
            try:
                with client.connection(timeout=1) as sock:
                    tick = check(sock)
                    key = (port_of(sock), sock.getsockname()[1])
                    if request(sock, payload) != payload:
                        eofs.append((*key, tick))
                        raise EOFError  # the with block discards the connection
                outcomes["ok"] += 1
                gevent.sleep(rng.uniform(0, 0.004))  # leave connections idle now and then
            except EOFError:
                outcomes["eof"] += 1
            except PoolTimeout:
                outcomes["timeout"] += 1
            except OSError:
                outcomes["oserror"] += 1

    def chaos() -> None:
        while time.monotonic() < deadline - 0.3:
            gevent.sleep(rng.uniform(0.05, 0.2))
            i = rng.randrange(3)
            farm.stop(i)
            # Straight after the FINs left and before any watcher ran: the
            # hand-out check alone stands between them and a borrower.
            try:
                sock = client.get_connection(timeout=0)
            except PoolTimeout:
                pass
            else:
                check(sock)
                client.return_connection(sock)
            gevent.sleep(rng.uniform(0.02, 0.1))
            farm.start(i)

    with rover:
        assert wait_until(lambda: client.slot_count == 12)
        gevent.joinall(
            [gevent.spawn(chaos), *(gevent.spawn(worker, n) for n in range(8))],
            raise_error=True,
        )
    print(outcomes, client.stats())
    assert lent_dead == []
    assert outcomes["ok"] > 200
    for server_port, client_port, tick in eofs:
        closed = farm.closed.get((server_port, client_port))
        assert closed is not None and closed > tick, "EOF on a connection dead before hand-out"
    client.close()


# -- borrowers die ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_many_waiters_killed_or_timed_out_at_random_lose_nothing() -> None:
    """200 greenlets share 5 connections; a third are killed or timed out at random points."""
    rng = random.Random(7)
    farm = Farm(1)
    client = CallosumClient(max_slots=5)
    rover = Rover(client, farm.addresses(), interval=0.05)
    served: set[int] = set()
    interrupted: set[int] = set()

    def borrow(n: int, on_enter: Callable[[], object] | None = None) -> None:
        with client.connection(timeout=20) as sock:
            if on_enter is not None:
                on_enter()
            assert request(sock, b"%d\n" % n) == b"%d\n" % n
            gevent.sleep(rng.uniform(0.005, 0.02))
        served.add(n)

    def borrow_within(n: int, seconds: float, start_inside: bool) -> None:
        timer = gevent.Timeout(seconds)  # an outer Timeout: fires while waiting, or inside
        if not start_inside:
            timer.start()
        try:
            borrow(n, timer.start if start_inside else None)
        except gevent.Timeout as exc:
            assert exc is timer
            interrupted.add(n)
        finally:
            timer.close()

    def kill_soon() -> None:
        gevent.spawn_later(rng.uniform(0, 0.015), gevent.getcurrent().kill, block=False)

    try:
        with rover:
            assert wait_until(lambda: client.slot_count == 5)
            greenlets = []
            for n in range(200):
                fate = rng.randrange(12)
                if fate < 2:  # an outer Timeout, armed now or on entering the with
                    inside = fate == 1
                    seconds = rng.uniform(0, 0.015 if inside else 0.5)
                    greenlets.append(gevent.spawn(borrow_within, n, seconds, inside))
                    continue
                g = gevent.spawn(borrow, n, kill_soon if fate == 2 else None)
                greenlets.append(g)
                if fate == 3:  # killed at a random moment, most likely while waiting
                    gevent.spawn_later(rng.uniform(0, 0.5), g.kill, block=False)
            gevent.joinall(greenlets, timeout=25)
            assert all(g.dead for g in greenlets)
            killed = {
                n for n, g in enumerate(greenlets) if isinstance(g.value, gevent.GreenletExit)
            }
            errors = [g.exception for g in greenlets if g.exception is not None]
            assert errors == []
            # Everyone not interrupted was served, and many were interrupted.
            assert served | killed | interrupted == set(range(200))
            assert len(killed | interrupted) >= 30
            stats = client.stats()
            assert stats["discarded"] >= 10  # interrupted inside the with block
            # Connections discarded by interrupted borrowers are replaced by the rover.
            assert wait_until(lambda: client.slot_count == 5, timeout=10)
            stats = client.stats()
            assert (stats["leased"], stats["waiting"], stats["idle"]) == (0, 0, 5)
            # Nothing leaked on the server either: every dropped socket was closed.
            server = farm.servers[0]
            assert server is not None
            assert wait_until(lambda: server.active == 5, timeout=5)
            print(f"served={len(served)} killed={len(killed)} timed out={len(interrupted)}")
            print(stats)
    finally:
        client.close()
        farm.close()


# -- fork ----------------------------------------------------------------------


@pytest.mark.timeout(40)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_refills_from_fresh_rover_while_parent_keeps_its_own() -> None:
    with line_server("--id", "a") as (_pa, addr_a), line_server("--id", "b") as (_pb, addr_b):
        servers: dict[Hashable, str] = {"a": addr_a, "b": addr_b}
        client = CallosumClient(max_slots=4)
        with Rover(client, servers, interval=3600, fill_concurrency=1):
            assert wait_until(lambda: client.slot_count == 4)
        with client.connection(timeout=1) as sock:
            assert line_request(sock, "before fork")[1] == "before fork"
        kept = client.stats()["kept"]
        socks = borrow_all(client)
        parents = {sock.getsockname() for sock in socks}
        for sock in socks:
            client.return_connection(sock)
        read_end, write_end = os.pipe()

        pid = gevent.fork()  # os.fork plus gevent's reinit, as a preloading worker does
        if pid == 0:
            os.close(read_end)
            status = 1
            try:
                with gevent.Timeout(15):
                    assert client.slot_count == 0 and not client.closed
                    with Rover(client, servers, interval=3600):
                        assert wait_until(lambda: client.slot_count == 4)
                    for i in range(30):
                        with client.connection(timeout=5) as sock:
                            assert sock.getsockname() not in parents
                            assert line_request(sock, f"child {i}")[1] == f"child {i}"
                status = 0
            except BaseException:
                os.write(write_end, traceback.format_exc().encode())
            finally:
                os._exit(status)

        os.close(write_end)
        # The parent goes on with its own connections while the child runs.
        for i in range(60):
            with client.connection(timeout=5) as sock:
                assert sock.getsockname() in parents
                assert line_request(sock, f"parent {i}")[1] == f"parent {i}"
            gevent.sleep(0.005)
        waited = gevent.os.waitpid(pid, 0)  # gevent reaps the children it forks
        report = b""
        while chunk := os.read(read_end, 65536):
            report += chunk
        os.close(read_end)
        assert os.waitstatus_to_exitcode(waited[1]) == 0, report.decode()
        stats = client.stats()
        assert stats["kept"] == kept and stats["slots"] == 4
        assert stats["evicted"] + stats["dead_at_handout"] + stats["dead_at_return"] == 0
        client.close()


# -- a peer vanishes without FIN or RST -------------------------------------------


NS_SERVER = r"""
import socket, sys
listener = socket.socket()
listener.bind((sys.argv[1], 0))
listener.listen(8)
print(listener.getsockname()[1], flush=True)
held = []
while True:
    conn, _ = listener.accept()
    conn.sendall(b"0\r\n")
    held.append(conn)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.mark.timeout(40)
def test_keepalive_finds_half_open_peer_dead() -> None:
    """Keepalive evicts a pooled connection whose peer vanished without a FIN or RST.

    The peer runs in a network namespace made here, behind a veth pair with
    link-local addresses; taking its end of the link down makes it vanish
    silently. A client without keepalive keeps its connection: the control.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    pid = os.getpid()
    ns, here, there = f"cgka{pid}", f"cgka{pid}", f"cgkb{pid}"
    net = f"169.254.{100 + pid % 100}.{4 * (pid // 100 % 60)}"
    prefix, last = net.rsplit(".", 1)
    local, remote = f"{prefix}.{int(last) + 1}", f"{prefix}.{int(last) + 2}"
    try:
        _ip("netns", "add", ns)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot make a network namespace here: {exc}")
    server = None
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{local}/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"{remote}/30", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NS_SERVER, remote],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        port = int(server.stdout.readline())
        watched = CallosumClient(
            max_slots=1, keepalive_idle=1, keepalive_interval=1, keepalive_count=2
        )
        control = CallosumClient(max_slots=1, keepalive=False)
        for client in (watched, control):
            sock = socket.create_connection((remote, port), timeout=5)
            assert client.new_connection(read_slot_line(sock, 5.0), sock)

        _ip("-n", ns, "link", "set", there, "down")  # the peer vanishes: no FIN, no RST
        vanished = time.monotonic()
        assert wait_until(lambda: watched.slot_count == 0, timeout=15)
        detected = time.monotonic() - vanished
        print(f"keepalive 1+1*2 s found the half-open peer dead in {detected:.2f} s")
        assert watched.stats()["evicted"] == 1
        assert control.slot_count == 1 and control.stats()["evicted"] == 0
        watched.close()
        control.close()
    finally:
        if server is not None:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10, check=False)
