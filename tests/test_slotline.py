"""The slot-line reader: strict, bounded in time and length, consumes exactly the line."""

from __future__ import annotations

import itertools
import socket as stdsocket
import ssl
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.ssl
import pytest
import trustme
from _lineservers import make_listener, reset, tcp_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callosum_gevent import ProtocolError
from callosum_gevent._slotline import DEFAULT_MAX_SLOT, MAX_LINE, read_slot_line


@pytest.fixture(scope="module")
def listener() -> Iterator[Any]:
    sock = make_listener()
    yield sock
    sock.close()


def feed(sock: Any, segments: list[bytes], gap: float = 0.002, close: bool = True) -> Any:
    """Send *segments* from a greenlet, *gap* seconds apart, then half-close."""

    def run() -> None:
        for segment in segments:
            sock.sendall(segment)
            gevent.sleep(gap)
        if close:
            sock.shutdown(stdsocket.SHUT_WR)

    return gevent.spawn(run)


def read_rest(sock: Any) -> bytes:
    """Return everything left in *sock* up to EOF."""
    rest = b""
    while chunk := sock.recv(4096):
        rest += chunk
    return rest


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("segments", "slot"),
    [
        ([b"13\r\n"], 13),
        ([b"0\r\n"], 0),
        ([b"007\r\n"], 7),
        ([b"1", b"3", b"\r", b"\n"], 13),
        ([b"42\r", b"\n"], 42),
        ([b"0" * 17 + b"5\r\n"], 5),  # exactly MAX_LINE bytes
        ([str(DEFAULT_MAX_SLOT).encode() + b"\r\n"], DEFAULT_MAX_SLOT),
    ],
)
def test_valid_lines(listener: Any, segments: list[bytes], slot: int) -> None:
    with tcp_pair(listener) as (client, server):
        feed(server, segments)
        assert read_slot_line(client, 5.0) == slot
        assert read_rest(client) == b""


@pytest.mark.timeout(10)
def test_consumes_exactly_the_line(listener: Any) -> None:
    with tcp_pair(listener) as (client, server):
        server.sendall(b"7\r\nHELLO")
        assert read_slot_line(client, 5.0) == 7
        assert client.recv(100) == b"HELLO"


@pytest.mark.timeout(10)
def test_leaves_following_line_when_split(listener: Any) -> None:
    with tcp_pair(listener) as (client, server):
        feed(server, [b"2", b"1\r\n8\r\n", b"tail"])
        assert read_slot_line(client, 5.0) == 21
        assert read_slot_line(client, 5.0) == 8
        assert read_rest(client) == b"tail"


BAD_LINES = [
    pytest.param("١٢\r\n".encode(), id="arabic-indic"),
    pytest.param(b"+5\r\n", id="plus"),
    pytest.param(b"1_0\r\n", id="underscore"),
    pytest.param(b" 5\r\n", id="space"),
    pytest.param(b"5 \r\n", id="trailing-space"),
    pytest.param(b"-1\r\n", id="negative"),
    pytest.param(str(10**40).encode() + b"\r\n", id="10**40"),
    pytest.param(str(DEFAULT_MAX_SLOT + 1).encode() + b"\r\n", id="above-ceiling"),
    pytest.param(b"5\n", id="bare-lf"),
    pytest.param(b"\r\n", id="empty"),
    pytest.param(b"\n", id="empty-lf"),
    pytest.param(b"5\r5\r\n", id="lone-cr"),
    pytest.param(b"5\r\r\n", id="double-cr"),
    pytest.param(b"GET / HTTP/1.1\r\n", id="garbage"),
    pytest.param(b"0" * 19 + b"5\r\n", id="overlong"),
    pytest.param(b"1" * 100, id="endless-digits"),
    pytest.param(b"", id="eof"),
    pytest.param(b"12", id="eof-mid-line"),
    pytest.param(b"12\r", id="eof-after-cr"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("data", BAD_LINES)
def test_bad_lines_raise(listener: Any, data: bytes) -> None:
    with tcp_pair(listener) as (client, server):
        feed(server, [data])
        with pytest.raises(ProtocolError):
            read_slot_line(client, 5.0)


@pytest.mark.timeout(10)
def test_garbage_fails_without_waiting_for_more(listener: Any) -> None:
    with tcp_pair(listener) as (client, server):
        feed(server, [b"x"], close=False)
        with pytest.raises(ProtocolError, match="not ASCII digits"):
            read_slot_line(client, 5.0)


@pytest.mark.timeout(10)
def test_max_slot_is_a_ceiling(listener: Any) -> None:
    with tcp_pair(listener) as (client, server):
        server.sendall(b"100\r\n100\r\n")
        with pytest.raises(ProtocolError, match="ceiling 99"):
            read_slot_line(client, 5.0, max_slot=99)
        assert read_slot_line(client, 5.0, max_slot=100) == 100


@pytest.mark.timeout(10)
def test_silent_server_times_out(listener: Any) -> None:
    with (
        tcp_pair(listener) as (client, _server),
        pytest.raises(ProtocolError, match=r"within 0\.2 s"),
    ):
        read_slot_line(client, 0.2)


@pytest.mark.timeout(20)
def test_slow_drip_is_bounded_by_one_deadline(listener: Any) -> None:
    # 19 digits at 0.2 s apart would take ~4 s and then fail as overlong; the
    # deadline for the whole line must fire first.
    with tcp_pair(listener) as (client, server):
        dripper = feed(server, [b"1"] * 19, gap=0.2, close=False)
        with pytest.raises(ProtocolError, match=r"within 0\.5 s"):
            read_slot_line(client, 0.5)
        dripper.kill()


@pytest.mark.timeout(10)
def test_outer_timeout_is_not_swallowed(listener: Any) -> None:
    with tcp_pair(listener) as (client, _server):
        outer = gevent.Timeout(0.1)
        with pytest.raises(gevent.Timeout) as caught, outer:
            read_slot_line(client, 5.0)
        assert caught.value is outer


@pytest.mark.timeout(10)
def test_reset_mid_line_is_a_socket_error(listener: Any) -> None:
    with tcp_pair(listener) as (client, server):
        server.sendall(b"1")
        gevent.sleep(0.05)
        reset(server)
        with pytest.raises(OSError):
            read_slot_line(client, 5.0)


@pytest.mark.timeout(10)
def test_tls_line_is_read_without_peeking() -> None:
    ca = trustme.CA()
    server_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    listener = make_listener()
    with tcp_pair(listener) as (raw_client, raw_server):

        def serve() -> None:
            tls = server_ctx.wrap_socket(raw_server, server_side=True)
            tls.sendall(b"7\r\n")
            tls.sendall(b"HELLO")

        server = gevent.spawn(serve)
        client = client_ctx.wrap_socket(raw_client, server_hostname="127.0.0.1")
        assert read_slot_line(client, 5.0) == 7
        assert client.recv(100) == b"HELLO"
        server.join()
    listener.close()


def expected(data: bytes, max_slot: int) -> tuple[int, int] | None:
    """Return (slot, line length) for data that starts with a valid line, else None."""
    end = data.find(b"\n") + 1
    body = data[: end - 2]
    if not 0 < end <= MAX_LINE or data[end - 2 : end] != b"\r\n" or not body:
        return None
    if not set(body) <= set(b"0123456789") or int(body) > max_slot:
        return None
    return int(body), end


line_like = st.lists(
    st.sampled_from([b"0", b"1", b"9", b"\r", b"\n", b"\r\n", b"x", b" ", "٣".encode()]),
    max_size=25,
).map(b"".join)


@pytest.mark.timeout(60)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(line_like, st.binary(max_size=30), line_like.map(lambda b: b + b"\r\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=4),
    max_slot=st.sampled_from([DEFAULT_MAX_SLOT, 1000, 0]),
)
def test_reader_matches_model(listener: Any, data: bytes, cuts: list[int], max_slot: int) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    segments = [data[a:b] for a, b in itertools.pairwise(bounds)]
    want = expected(data, max_slot)
    with tcp_pair(listener) as (client, server):
        feed(server, segments, gap=0.001)
        try:
            got: int | None = read_slot_line(client, 5.0, max_slot=max_slot)
        except ProtocolError:
            got = None
        rest = read_rest(client)
    assert got == (want[0] if want else None)
    consumed = len(data) - len(rest)
    assert data.endswith(rest)
    if want:
        assert consumed == want[1]
    else:
        end = data.find(b"\n") + 1 or len(data)
        assert consumed <= min(end, MAX_LINE)
