"""Bad input: from the network (fuzzed servers and clients, floods) and from the caller."""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
import socket as stdsocket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
from _leaks import HubErrors, open_fds, warm_up
from _lineservers import ScriptServer, make_listener, reset, send_segments, tcp_pair, wait_until
from _peers import PeerServer
from gevent import socket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_slotline import expected, read_rest

from callosum_gevent import CallosumClient, CallosumServer, ProtocolError, Rover, ServerSlots
from callosum_gevent._slotline import DEFAULT_MAX_SLOT, MAX_LINE, read_slot_line

# -- the rover against servers that misbehave -------------------------------------

TOKENS = [b"0", b"1", b"7", b"9", b"\r", b"\n", b"\r\n", b"+", b"-", b"_", b" ", b"\x00", b"x"]
TOKENS += ["٣".encode(), "\uff11".encode(), b"%d" % 10**40, b"%d" % (DEFAULT_MAX_SLOT + 1)]

slot_bytes = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=12).map(b"".join),
    st.integers(min_value=0, max_value=2**40).map(lambda n: b"%d\r\n" % n),
    st.binary(max_size=40),
    st.integers(min_value=1, max_value=200).map(lambda n: b"1" * n),  # never ends
)


@dataclass
class Behaviour:
    data: bytes
    cuts: list[int]
    gap: float
    ending: str  # how the server carries on after the data

    def segments(self) -> list[bytes]:
        bounds = sorted({0, len(self.data), *(c for c in self.cuts if c < len(self.data))})
        return [self.data[a:b] for a, b in itertools.pairwise(bounds)]

    def script(self, sock: Any) -> None:
        send_segments(self.segments(), self.gap)(sock)
        if self.ending == "close":
            sock.shutdown(stdsocket.SHUT_WR)
        elif self.ending == "reset":
            reset(sock)
        elif self.ending == "more":
            sock.sendall(b"HELLO")
        # "hang": say no more; the slot timeout must end the wait


behaviours = st.builds(
    Behaviour,
    data=slot_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=4),
    gap=st.sampled_from([0.0, 0.0, 0.001, 0.01]),
    ending=st.sampled_from(["close", "reset", "hang", "more"]),
)

SLOT_TIMEOUT = 0.2


@pytest.mark.timeout(120)
def test_rover_survives_any_slot_line() -> None:
    """Whatever a server sends, an attempt ends in time with the right slot or a counted error."""
    warm_up()
    fds = open_fds()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(behaviour=behaviours, max_slot=st.sampled_from([DEFAULT_MAX_SLOT, 1000, 0]))
    def attempt(behaviour: Behaviour, max_slot: int) -> None:
        with ScriptServer(behaviour.script) as server:
            client = CallosumClient(max_slots=4)
            rover = Rover(
                client, {"s": server.address}, slot_timeout=SLOT_TIMEOUT, max_slot=max_slot
            )
            want = expected(behaviour.data, max_slot)
            started = time.monotonic()
            got = rover.rove()
            elapsed = time.monotonic() - started
            stats = rover.stats()
            # Bounded: the slot timeout (plus the drip the server chose) and a wide margin.
            assert elapsed < SLOT_TIMEOUT + behaviour.gap * len(behaviour.cuts) + 2.0
            # A valid line followed by more bytes or a FIN is a sinkhole the rover
            # refuses if they came with the line (a moment later, they may not have).
            trailing = want is not None and (
                len(behaviour.data) > want[1] or behaviour.ending in ("close", "more")
            )
            if trailing:
                assert want is not None and got in (want[0], None)
            elif behaviour.ending != "reset" or got is not None:  # a reset may overtake a line
                assert got == (want[0] if want else None)
            if got is None:
                assert stats["protocol_errors"] + stats["connect_errors"] == 1
                assert client.slot_count == 0
            else:
                assert stats["kept"] == 1
            client.close()  # closes whatever was pooled, even if already evicted
            if behaviour.ending != "reset":  # else the server closed first
                assert wait_until(lambda: server.peer_closed == 1, timeout=5)

    attempt()
    gevent.sleep(0.05)
    assert open_fds() == fds


@pytest.mark.timeout(20)
def test_megabytes_without_crlf_are_cut_off_after_the_line_limit() -> None:
    listener = make_listener()
    sent = 4 * 1024 * 1024
    with tcp_pair(listener) as (client, server):
        writer = gevent.spawn(lambda: (server.sendall(b"1" * sent), server.close()))
        with pytest.raises(ProtocolError, match=f"within {MAX_LINE} bytes"):
            read_slot_line(client, 5.0)
        consumed = sent - len(read_rest(client))
        writer.join()
    listener.close()
    assert consumed <= MAX_LINE


@pytest.mark.timeout(20)
def test_endless_server_is_refused_long_before_the_slot_timeout() -> None:
    def endless(sock: Any) -> None:  # a digit every 5 ms, never a CRLF
        with gevent.Timeout(10, False):
            while True:
                sock.sendall(b"9")
                gevent.sleep(0.005)

    with ScriptServer(endless) as server:
        client = CallosumClient()
        rover = Rover(client, {"s": server.address}, slot_timeout=5.0)
        started = time.monotonic()
        assert rover.rove() is None
        assert time.monotonic() - started < 2.5  # cut at 20 bytes: about 0.1 s
        assert rover.stats()["protocol_errors"] == 1 and client.slot_count == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("line", "kwargs", "offered"),
    [
        (b"99\r\n", {"max_slot": 99}, True),
        (b"100\r\n", {"max_slot": 99}, False),
        (b"%d\r\n" % DEFAULT_MAX_SLOT, {}, True),
        (b"%d\r\n" % (DEFAULT_MAX_SLOT + 1), {}, False),
    ],
)
def test_rover_ceiling_on_slot_numbers(line: bytes, kwargs: dict[str, Any], offered: bool) -> None:
    with ScriptServer(send_segments([line])) as server:
        client = CallosumClient()
        rover = Rover(client, {"s": server.address}, **kwargs)
        rover.rove()
        assert client.slot_count == int(offered)
        assert rover.stats()["protocol_errors"] == int(not offered)
        client.close()


@pytest.mark.timeout(20)
def test_client_ceiling_turns_down_what_the_rover_read() -> None:
    with ScriptServer(send_segments([b"51\r\n"])) as server:
        client = CallosumClient(max_slot_number=50)
        rover = Rover(client, {"s": server.address})
        assert rover.rove() == 51
        assert client.slot_count == 0 and rover.stats()["client_errors"] == 1
        assert wait_until(lambda: server.peer_closed == 1)  # the rover closed it


@pytest.mark.timeout(20)
def test_client_never_reads_what_a_peer_pushes_into_a_pooled_socket() -> None:
    peers = PeerServer()
    try:
        client = CallosumClient(max_slots=2)
        sock, peer = peers.connect()
        client.new_connection(0, sock)
        pusher = gevent.spawn(peer.sendall, b"x" * (4 * 1024 * 1024))
        assert wait_until(lambda: client.slot_count == 0)  # evicted, not drained
        assert client.stats()["evicted"] == 1
        # Closing a socket with unread bytes sends RST, not FIN: the bytes were never read.
        with pytest.raises(ConnectionResetError), gevent.Timeout(5):
            pusher.get()
            peer.recv(1)
    finally:
        peers.stop()


# -- the server against clients that misbehave ---------------------------------------


def handle_fuzz(sock: Any, _address: Any) -> None:
    """Echo one chunk; after ``s``, stream to a client that may never read."""
    first = sock.recv(1)
    if first == b"s":
        while True:
            sock.sendall(b"x" * 65536)
    if first:
        sock.sendall(first + sock.recv(1024))
    while sock.recv(4096):
        pass


ACTIONS = ["send", "drip", "half-close", "reset", "close", "read-slot", "silent"]


@pytest.mark.timeout(120)
def test_server_survives_any_client() -> None:
    server = CallosumServer(("127.0.0.1", 0), handle_fuzz, slot_line_timeout=0.5)
    server.start()
    address = ("127.0.0.1", server.server_port)
    try:
        with HubErrors().recording() as hub:

            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
            @given(
                clients=st.lists(
                    st.tuples(
                        st.lists(st.sampled_from(ACTIONS), max_size=5), st.binary(max_size=64)
                    ),
                    min_size=1,
                    max_size=6,
                )
            )
            def session(clients: list[tuple[list[str], bytes]]) -> None:
                def client(actions: list[str], junk: bytes) -> None:
                    sock = socket.create_connection(address)
                    try:
                        for action in actions:
                            if action == "send":
                                sock.sendall(junk or b"\xff")
                            elif action == "drip":
                                for byte in junk[:5]:
                                    sock.sendall(bytes([byte]))
                                    gevent.sleep(0.002)
                            elif action == "half-close":
                                sock.shutdown(stdsocket.SHUT_WR)
                            elif action == "reset":
                                reset(sock)
                                return
                            elif action == "close":
                                return
                            elif action == "read-slot":
                                read_slot_line(sock, 2.0)
                            else:
                                gevent.sleep(0.01)
                    except (OSError, ProtocolError):
                        pass  # our own half-close or reset caught up with us
                    finally:
                        sock.close()

                gevent.joinall([gevent.spawn(client, *c) for c in clients], raise_error=True)
                # Every slot comes back, and a well-behaved client is served from slot 0.
                assert wait_until(lambda: server.slots.in_use == 0 and server.active == 0)
                with socket.create_connection(address) as good:
                    assert read_slot_line(good, 2.0) == 0
                    good.sendall(b"ping")
                    assert good.recv(16) == b"ping"

            session()
        assert hub.errors == []
        assert wait_until(lambda: server.slots.high_water == 0)
    finally:
        server.stop(timeout=1)


@pytest.mark.timeout(60)
def test_flood_and_never_reading_clients_keep_limits_and_memory() -> None:
    """1,000 connects and disconnects while 30 clients never read a byte.

    ``max_connections`` holds throughout, every slot comes back, memory does
    not grow with the flood, and a well-behaved client is still served.
    """
    limit = 40  # 30 silent clients leave room for 10 of the 100 flooding at a time
    server = CallosumServer(("127.0.0.1", 0), handle_fuzz, max_connections=limit, backlog=1024)
    server.start()
    address = ("127.0.0.1", server.server_port)
    peak_active = 0

    def watch() -> None:
        nonlocal peak_active
        while True:
            peak_active = max(peak_active, server.active)
            gevent.sleep(0.001)

    def connect_and_go(n: int) -> None:
        sock = socket.create_connection(address)
        try:
            if n % 4 == 0:
                reset(sock)
                return
            if n % 4 == 1:
                sock.recv(16)  # slot line, or b"" if refused
            elif n % 4 == 2:
                sock.sendall(b"junk that is not a request")
            gevent.sleep(0.02)  # hold it a moment, so the flood presses on max_connections
        except OSError:
            pass
        sock.close()

    watcher = gevent.spawn(watch)
    silent = []
    try:
        for _ in range(30):  # ask for a stream, then never read: the server's sendall blocks
            sock = socket.create_connection(address)
            sock.sendall(b"s")
            silent.append(sock)
        assert wait_until(lambda: server.active == 30)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, 1000, 100):
            gevent.joinall(
                [gevent.spawn(connect_and_go, n) for n in range(start, start + 100)],
                raise_error=True,
            )
        # Only the silent clients hold slots now, and the flood left nothing behind.
        assert wait_until(lambda: server.active == 30 and server.slots.in_use == 30)
        gevent.sleep(0.05)
        grown, peak = (x - before for x in tracemalloc.get_traced_memory())
        tracemalloc.stop()
        stats = server.stats()
        print(f"flood: {stats}, peak active {peak_active}, memory +{grown} B, peak +{peak} B")
        assert peak_active <= limit and stats["refused"] > 0
        assert server.slots.high_water <= limit
        assert grown < 512 * 1024 and peak < 16 * 1024 * 1024
        with socket.create_connection(address) as good:
            assert read_slot_line(good, 2.0) < limit
            good.sendall(b"hello")
            assert good.recv(16) == b"hello"
    finally:
        watcher.kill()
        for sock in silent:
            sock.close()
        server.stop(timeout=1)
    assert server.slots.in_use == 0


# -- the caller: wrong types and values ---------------------------------------------


class Env:
    """One of each public object, with a pooled idle and a lent connection."""

    def __init__(self) -> None:
        self.peers = PeerServer()
        self.client = CallosumClient(max_slots=4)
        self.idle, _ = self.peers.connect()
        self.lent, _ = self.peers.connect()
        self.spare, _ = self.peers.connect()
        self.client.new_connection(1, self.lent)
        assert self.client.get_connection(timeout=0) is self.lent
        self.client.new_connection(2, self.idle)
        self.server = CallosumServer(("127.0.0.1", 0), handle_fuzz)
        self.server.start()
        self.rover = Rover(self.client, {"a": ("127.0.0.1", self.server.server_port)})
        self.slots = ServerSlots()
        self.slots.get()

    def state(self) -> tuple[Any, ...]:
        return (
            self.client.stats(),
            self.rover.stats(),
            self.server.stats(),
            repr(self.slots),
            [s.fileno() >= 0 for s in (self.idle, self.lent, self.spare)],
        )

    def close(self) -> None:
        self.client.return_connection(self.lent)
        self.client.close()
        self.spare.close()
        self.server.stop(timeout=1)
        self.peers.stop()


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


Call = Callable[[Any], object]  # Any: the rows pass wrong types on purpose
V, T = ValueError, TypeError


def client(**kwargs: Any) -> CallosumClient:
    return CallosumClient(**kwargs)


def server(**kwargs: Any) -> CallosumServer:
    return CallosumServer(("127.0.0.1", 0), handle_fuzz, **kwargs)


def rover(e: Env, servers: Any = None, **kwargs: Any) -> Rover:
    return Rover(e.client, servers or {}, **kwargs)


def bad(id_: str, error: type[Exception], name: str, call: Call) -> Any:
    """One row: ``call`` must raise ``error`` naming ``name``."""
    return pytest.param(call, error, name, id=id_)


BAD_CALLS = [
    # CallosumClient(...)
    bad("client-keepalive-int", T, "keepalive", lambda e: client(keepalive=1)),
    bad("client-idle-0", V, "keepalive_idle", lambda e: client(keepalive_idle=0)),
    bad("client-intvl-str", T, "keepalive_interval", lambda e: client(keepalive_interval="5")),
    bad("client-count-bool", T, "keepalive_count", lambda e: client(keepalive_count=True)),
    bad("client-ceiling-0", V, "max_slot_number", lambda e: client(max_slot_number=0)),
    bad("client-ceiling-float", T, "max_slot_number", lambda e: client(max_slot_number=2.0)),
    bad("client-idle-2**40", V, "keepalive_idle", lambda e: client(keepalive_idle=2**40)),
    bad("client-count-999", V, "keepalive_count", lambda e: client(keepalive_count=999)),
    # CallosumClient methods
    bad("offer-2**31", V, "slot", lambda e: e.client.new_connection(2**31, e.spare)),
    bad("offer-10**40", V, "slot", lambda e: e.client.new_connection(10**40, e.spare)),
    bad("offer-none", T, "sock", lambda e: e.client.new_connection(0, None)),
    bad("offer-lent", V, "sock", lambda e: e.client.new_connection(0, e.lent)),
    bad("offer-list", T, "sock", lambda e: e.client.new_connection(0, [e.spare])),
    bad("get-bool", T, "timeout", lambda e: e.client.get_connection(timeout=True)),
    bad("get-minus-inf", V, "timeout", lambda e: e.client.get_connection(timeout=-math.inf)),
    bad("get-complex", T, "timeout", lambda e: e.client.get_connection(timeout=1j)),
    bad("get-10**400", V, "timeout", lambda e: e.client.get_connection(timeout=10**400)),
    bad("with-str", T, "timeout", lambda e: e.client.connection(timeout="1").__enter__()),
    bad("return-none", V, "sock", lambda e: e.client.return_connection(None)),
    bad("return-idle", V, "sock", lambda e: e.client.return_connection(e.idle)),
    bad("return-list", T, "sock", lambda e: e.client.return_connection([])),
    bad("discard-foreign", V, "sock", lambda e: e.client.discard_connection(e.spare)),
    bad("discard-dict", T, "sock", lambda e: e.client.discard_connection({})),
    # CallosumServer
    bad("server-weight", V, "weight", lambda e: server(weight=-1)),
    bad("server-max-bool", T, "max_connections", lambda e: server(max_connections=True)),
    bad("server-nan", V, "slot_line_timeout", lambda e: server(slot_line_timeout=math.nan)),
    bad("server-slots-int", T, "slots", lambda e: server(slots=3)),
    bad("server-set-handle", T, "handle", lambda e: e.server.set_handle(None)),
    # Rover
    bad("rover-ceiling-float", T, "max_slot", lambda e: rover(e, max_slot=2.0)),
    bad("rover-ceiling-bool", T, "max_slot", lambda e: rover(e, max_slot=True)),
    bad("rover-timeout-nan", V, "slot_timeout", lambda e: rover(e, slot_timeout=math.nan)),
    bad("rover-connect-neg", V, "connect_timeout", lambda e: rover(e, connect_timeout=-1)),
    bad("rover-backoff-str", T, "backoff_max", lambda e: rover(e, backoff_max="x")),
    bad("rover-backoff-inf", V, "backoff_max", lambda e: rover(e, backoff_max=math.inf)),
    bad("rover-fill-bool", T, "fill_concurrency", lambda e: rover(e, fill_concurrency=True)),
    bad("rover-resolve-nan", V, "resolve_interval", lambda e: rover(e, resolve_interval=math.nan)),
    bad("port-5000", V, "servers['x']", lambda e: rover(e, {"x": "h:" + "9" * 5000})),
    bad("add-no-port", V, "address", lambda e: e.rover.add_server("b", "host-without-port")),
    bad("add-port-huge", V, "address", lambda e: e.rover.add_server("b", ("h", 2**70))),
    bad("add-known-id", V, "server_id", lambda e: e.rover.add_server("a", "h:1")),
    bad("drop-list", T, "server_id", lambda e: e.rover.drop_server([1])),
    # ServerSlots
    bad("put-str", T, "slot", lambda e: e.slots.put("0")),
    bad("put-huge", V, "slot", lambda e: e.slots.put(2**100)),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("call", "error", "name"), BAD_CALLS)
def test_bad_argument_is_refused_by_name_and_changes_nothing(
    env: Env, call: Call, error: type[Exception], name: str
) -> None:
    before = env.state()
    with pytest.raises(error, match=re.escape(name)):
        call(env)
    assert env.state() == before


# -- atheris, when it is installed ---------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_fuzzes_the_slot_line_reader() -> None:
    script = Path(__file__).with_name("_atheris_slotline.py")
    done = subprocess.run(
        [sys.executable, str(script), "-runs=1500", "-max_len=64", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Done 1500 runs" in done.stderr
