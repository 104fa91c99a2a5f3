"""The line protocol and the command line: demo, serve and call."""

from __future__ import annotations

import io
import re
import signal
import socket as stdsocket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.server
import pytest
from _processes import line_server, run_python, stop
from gevent import socket

from callosum_gevent import CallosumServer, ProtocolError
from callosum_gevent.__main__ import _parser, _serving, main
from callosum_gevent._demo import (
    CallosumPools,
    DemoOptions,
    Progress,
    RandomPools,
    percentile,
    run_once,
)
from callosum_gevent._lineproto import MAX_LINE, LineService, read_line, request
from callosum_gevent._slotline import read_slot_line


class LineServers:
    """Start CallosumServers running a LineService; stop them all at the end."""

    def __init__(self) -> None:
        self.servers: list[CallosumServer] = []

    def __call__(self, service: LineService) -> tuple[str, int]:
        server = CallosumServer(("127.0.0.1", 0), service)
        server.start()
        self.servers.append(server)
        return ("127.0.0.1", server.server_port)


@pytest.fixture
def serve_line() -> Iterator[LineServers]:
    servers = LineServers()
    yield servers
    for server in servers.servers:
        server.stop(timeout=1)


@contextmanager
def socketpair() -> Iterator[tuple[Any, Any]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def connect(address: tuple[str, int]) -> Any:
    sock = socket.create_connection(address, timeout=5)
    read_slot_line(sock, timeout=5)
    return sock


@pytest.mark.timeout(10)
def test_request_gets_the_message_back_with_the_server_id(serve_line: LineServers) -> None:
    service = LineService("alpha")
    sock = connect(serve_line(service))
    with sock:
        assert request(sock, "hello world") == ("alpha", "hello world")
        assert request(sock, "") == ("alpha", "")
        assert service.served == 2
        assert service.connections == service.peak_connections == 1


@pytest.mark.timeout(10)
def test_server_answers_pipelined_requests_in_order(serve_line: LineServers) -> None:
    sock = connect(serve_line(LineService("b")))
    with sock:
        sock.sendall(b"one\ntwo\n")
        assert read_line(sock) + read_line(sock) == b"b oneb two"


@pytest.mark.timeout(10)
def test_service_counts_connections_until_the_client_hangs_up(serve_line: LineServers) -> None:
    service = LineService("c")
    address = serve_line(service)
    socks = [connect(address) for _ in range(3)]
    for sock in socks:
        request(sock, "x")  # each handler has surely started once it answered
    assert service.connections == service.peak_connections == 3
    for sock in socks:
        sock.close()
    (server,) = serve_line.servers
    assert server.pool.join(timeout=5), "handlers still running after the client hung up"
    assert service.connections == 0
    assert service.peak_connections == 3


@pytest.mark.timeout(10)
def test_capacity_makes_requests_queue(serve_line: LineServers) -> None:
    address = serve_line(LineService("d", service_time=0.1, capacity=1))
    socks = [connect(address) for _ in range(3)]
    started = time.perf_counter()
    gevent.joinall([gevent.spawn(request, s, "m") for s in socks], raise_error=True)
    # Served one at a time they cannot finish sooner than 3 x 0.1 s.
    assert time.perf_counter() - started >= 0.29
    for sock in socks:
        sock.close()


@pytest.mark.timeout(10)
def test_read_line_raises_when_the_peer_closes_or_runs_on() -> None:
    with socketpair() as (a, b):
        b.sendall(b"partial")
        b.close()
        with pytest.raises(ConnectionError):
            read_line(a)
    with socketpair() as (a, b):
        gevent.spawn(b.sendall, b"x" * (MAX_LINE + 10))
        with pytest.raises(ProtocolError):
            read_line(a)


@pytest.mark.parametrize(("message", "error"), [("two\nlines", ValueError), (b"bytes", TypeError)])
def test_request_refuses_bad_messages_before_sending(message: Any, error: type) -> None:
    with socketpair() as (a, b):
        with pytest.raises(error, match="message"):
            request(a, message)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"server_id": "two words"}, "server_id"),
        ({"server_id": ""}, "server_id"),
        ({"server_id": "a", "service_time": -1}, "service_time"),
        ({"server_id": "a", "capacity": 0}, "capacity"),
    ],
)
def test_line_service_names_the_bad_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LineService(**kwargs)


SMALL_DEMO = ["--requests", "400", "--duration", "1", "--users", "40", "--max-slots", "4"]


def table_rows(output: str) -> dict[str, list[str]]:
    """Return the table's rows by first word, cells split on ``|``."""
    return {
        line.split()[0]: [cell.strip() for cell in line.split("|")]
        for line in output.splitlines()
        if line.count("|") == 2 and line.split()
    }


@pytest.mark.timeout(40)
def test_demo_runs_a_small_workload_and_prints_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", *SMALL_DEMO, "--clients", "2", "--seed", "7"]) == 0
    out, err = capsys.readouterr()
    rows = table_rows(out)
    assert set(rows) >= {"server", "s1", "s2", "s3", "s4", "s5", "all"}
    assert "2x slower" in rows["s4"][0] and "killed" in rows["s1"][0]
    for pool in (1, 2):
        served = {sid: int(rows[sid][pool].split()[1]) for sid in ("s1", "s2", "s3", "s4", "s5")}
        assert served["s1"] > 0  # the victim served until it was killed
        assert int(rows["all"][pool].split()[1]) == sum(served.values())
    failed = [int(n) for n in re.findall(r"(\d+) failed after a retry", out)]
    assert len(failed) == 2
    assert sum(int(rows["all"][pool].split()[1]) for pool in (1, 2)) + sum(failed) == 800
    assert "400/400 requests" in err
    assert "Traceback" not in out + err


@pytest.mark.timeout(60)
def test_callosum_spares_the_slow_server_and_cuts_the_tail() -> None:
    options = DemoOptions(requests=3000, duration=3, seed=3)
    shares, tails = [], []
    for pools in (CallosumPools, RandomPools):
        result = run_once(options, pools, Progress(io.StringIO(), "test", options.requests))
        served = {sid: len(latencies) for sid, latencies in result.latencies.items()}
        # The rovers (and the random pool) took the newcomer up.
        assert served.get(options.joiner_id, 0) > 0
        shares.append(served[options.slow_id] / sum(served.values()))
        tails.append(percentile([x for xs in result.latencies.values() for x in xs], 0.99))
    # Random choice sends each of 4 servers about a quarter and queues behind
    # the slow one; Callosum lends whichever connection is idle, and the slow
    # server's stay busy longer.
    assert shares[1] > 0.2
    assert shares[0] < shares[1]
    assert tails[0] < tails[1]


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["demo", "--servers", "1"], "servers must be >= 2"),
        (["demo", "--requests", "0"], "requests must be >= 1"),
        (["call", "localhost", "hi"], "is not HOST:PORT"),
        (["call", "127.0.0.1:9", "two\nlines"], "MESSAGE must be one line"),
        (["serve", "--port", "x"], "argument --port: 'x' is not a port number"),
        (["serve", "--port", "0", "--weight", "0"], "weight must be >= 1"),
        (["serve", "--port", "0", "--weight", "heavy"], "neither an integer nor 'auto'"),
        (["serve", "--port", "0", "--capacity", "0"], "argument --capacity: must be >= 1"),
        (["serve", "--port", "0", "--drain-timeout", "-1"], "positive number of seconds"),
        (["call", "127.0.0.1:9", "hi", "--timeout", "-1"], "timeout"),
        (["serve", "--port", "70000"], "port must be between 0 and 65535"),
        (["serve", "--port", "-1"], "port must be between 0 and 65535"),
        (["serve", "--port", "abc"], "'abc' is not a port number"),
        (["call", "127.0.0.1:0", "hi"], "port must be between 1 and 65535"),
        (["call", "127.0.0.1:70000", "hi"], "port must be between 1 and 65535"),
        (["call", "127.0.0.1:abc", "hi"], "is not HOST:PORT"),
        (["serve", "--port", "0", "--service-time", "-1"], "'-1' is not a number of seconds >= 0"),
        (["serve", "--port", "0", "--service-time", "nan"], "is not a number of seconds >= 0"),
        (["serve", "--port", "0", "--service-time", "inf"], "is not a number of seconds >= 0"),
        (["serve", "--port", "0", "--service-time", "soon"], "is not a number of seconds"),
        (["serve", "--port", "0", "--id", ""], "--id must be one word"),
        (["serve", "--port", "0", "--id", "two words"], "--id must be one word"),
        (["serve", "--port", "0", "--id", "a\nb"], "--id must be one word"),
        (["serve", "--port", "0", "--id", "bell\x07"], "--id must be one word"),
        (["serve", "--port", "0", "--capacity", "many"], "'many' is not a whole number"),
        (["serve", "--port", "0", "--max-connections", "0"], "must be >= 1"),
    ],
)
def test_bad_options_exit_2_with_their_own_subcommands_usage(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert complaint in err
    # The usage of the subcommand at fault, not the top-level one.
    assert err.startswith(f"usage: callosum-gevent {argv[0]} ")
    assert f"callosum-gevent {argv[0]}: error: " in err


@pytest.mark.timeout(40)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_and_call_talk_to_each_other_and_serve_stops_cleanly(signum: int) -> None:
    with line_server("--id", "alpha", "--service-time", "0.01") as (server, address):
        done = run_python("-m", "callosum_gevent", "call", address, "hello there")
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"hello there\n(answered by alpha on slot 0 at {address})\n"
        out, err = stop(server, signum)
    assert server.returncode == 0, err
    assert re.search(r"\nstopped: drained in \d+\.\d\d s\n$", out), out
    assert "Traceback" not in err


@pytest.mark.parametrize(("weight", "auto"), [("auto", True), ("3", False)])
def test_serve_builds_a_server_that_marks_requests(weight: str, auto: bool) -> None:
    parser, _ = _parser()
    args = parser.parse_args(["serve", "--port", "0", "--weight", weight])
    service, server = _serving(args)
    assert service.server is server
    assert server.marks_requests
    assert server.weight == (1 if auto else 3)
    assert (server._estimator is not None) == auto
    server.close()


def read_reply_line(sock: stdsocket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"closed after {line!r}")
        line += chunk
    return line


@pytest.mark.timeout(40)
def test_serve_drains_on_sigterm_answering_the_request_in_flight() -> None:
    with line_server("--id", "d", "--service-time", "1") as (server, address):
        host, port = address.rsplit(":", 1)
        busy, idle = (stdsocket.create_connection((host, int(port)), timeout=20) for _ in "ab")
        with busy, idle:
            for sock in (busy, idle):
                assert read_reply_line(sock).endswith(b"\r\n")  # the slot line
            busy.sendall(b"slow one\n")
            time.sleep(0.3)  # well inside the 1 s of work
            server.send_signal(signal.SIGTERM)
            assert idle.recv(1) == b""  # closed at once, between requests
            assert read_reply_line(busy) == b"d slow one\n"  # answered, then
            assert busy.recv(1) == b""  # closed
            out, err = server.communicate(timeout=10)
    assert server.returncode == 0, err
    assert "draining 2 connections (up to 10 s)\n" in out
    assert re.search(r"\nstopped: drained in (0\.[7-9]|1\.)\d* s\n$", out), out


@pytest.mark.timeout(40)
def test_a_second_signal_cuts_the_drain_short() -> None:
    with line_server("--id", "e", "--service-time", "30") as (server, address):
        host, port = address.rsplit(":", 1)
        with stdsocket.create_connection((host, int(port)), timeout=20) as busy:
            read_reply_line(busy)
            busy.sendall(b"endless\n")
            time.sleep(0.3)
            server.send_signal(signal.SIGTERM)
            assert server.stdout is not None
            assert server.stdout.readline().startswith("draining 1 connections")
            server.send_signal(signal.SIGINT)
            assert busy.recv(1) == b""  # killed, unanswered
            out, err = server.communicate(timeout=10)
    assert server.returncode == 0, err
    assert out == "stopped: 1 connections killed after a second signal\n", out


@pytest.mark.timeout(40)
def test_call_goes_to_a_live_server_when_another_refuses() -> None:
    with line_server("--id", "beta") as (_server, address):
        done = run_python("-m", "callosum_gevent", "call", f"127.0.0.1:{free_port()}", address, "x")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("x\n(answered by beta on slot 0")


@pytest.mark.timeout(40)
def test_call_to_a_refused_port_exits_1_with_one_line() -> None:
    port = free_port()
    done = run_python("-m", "callosum_gevent", "call", f"127.0.0.1:{port}", "hello")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"callosum-gevent call: error: could not reach 127.0.0.1:{port} (Connection refused)\n"
    )


@contextmanager
def stream_server(handle: Any) -> Iterator[str]:
    """Run a plain (not Callosum) gevent server in this process; yield its HOST:PORT."""
    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=1)


def ssh_banner(sock: Any, _address: Any) -> None:
    try:
        sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        sock.recv(1)
    except OSError:
        pass  # the caller gave up on us: reset, as it should


@pytest.mark.timeout(20)
def test_call_to_a_reachable_port_that_is_not_callosum_is_a_protocol_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with stream_server(ssh_banner) as address:
        assert main(["call", address, "hi", "--timeout", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"callosum-gevent call: error: {address} is not a Callosum server: ")
    assert "could not reach" not in err
    assert err.count("\n") == 1


@pytest.mark.timeout(20)
def test_call_names_each_server_and_what_went_wrong_with_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    refused = f"127.0.0.1:{free_port()}"
    with stream_server(ssh_banner) as address:
        assert main(["call", refused, address, "hi", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert f"could not reach {refused} (Connection refused)" in err
    assert f"{address} is not a Callosum server" in err


@pytest.mark.timeout(20)
def test_call_to_a_callosum_server_that_does_not_speak_the_line_protocol(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def garbage(sock: Any, _address: Any) -> None:
        sock.recv(100)
        sock.sendall(b"nonsense\n")
        sock.recv(1)

    server = CallosumServer(("127.0.0.1", 0), garbage)
    server.start()
    try:
        assert main(["call", f"127.0.0.1:{server.server_port}", "hi", "--timeout", "2"]) == 1
    finally:
        server.stop(timeout=1)
    err = capsys.readouterr().err
    assert err.startswith(f"callosum-gevent call: error: 127.0.0.1:{server.server_port} ")
    assert "does not speak the line protocol" in err


@pytest.mark.timeout(40)
def test_serve_on_a_taken_port_exits_1_with_one_line() -> None:
    with stdsocket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_python("-m", "callosum_gevent", "serve", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.startswith("callosum-gevent serve: error: ")
    assert "in use" in done.stderr
    assert done.stderr.count("\n") == 1


def free_port() -> int:
    """Return a loopback port that nothing listens on (just closed)."""
    with stdsocket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.timeout(10)
def test_progress_redraws_one_bar_on_a_terminal_and_writes_lines_elsewhere() -> None:
    terminal, log = FakeTerminal(), io.StringIO()
    bars = [Progress(terminal, "run", 10), Progress(log, "run", 10)]
    for bar in bars:
        with bar.shown():
            for _ in range(10):
                bar.done += 1
                gevent.sleep(0.03)
    drawn = terminal.getvalue()
    assert drawn.startswith("\r") and drawn.endswith("\n") and drawn.count("\n") == 1
    assert drawn.rsplit("\r", 1)[-1] == f"run       [{'#' * 30}] 10/10\n"
    # Off a terminal: a line now and then, and never the same count twice.
    lines = log.getvalue().splitlines()
    assert lines[-1] == "run: 10/10 requests"
    assert len(lines) == len(set(lines))


@pytest.mark.timeout(40)
def test_serve_names_an_ipv6_address_with_brackets_and_call_reaches_it() -> None:
    with line_server("--host", "::1") as (server, address):
        assert re.fullmatch(r"\[::1\]:\d+", address), address
        done = run_python("-m", "callosum_gevent", "call", address, "six")
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"six\n(answered by {address} on slot 0 at {address})\n"
        _out, err = stop(server)
    assert server.returncode == 0, err
