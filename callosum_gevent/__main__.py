"""Command line: ``callosum-gevent demo | serve | call``."""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.event
from gevent import socket as gsocket

from ._client import CallosumClient
from ._demo import DemoOptions, run_demo
from ._lineproto import LineService, NoReply, request
from ._server import CallosumServer
from ._slotline import read_slot_line
from .errors import CallosumError, ProtocolError

__all__ = ["main"]

_DEFAULTS = DemoOptions()
_DEMO_OPTIONS: list[tuple[str, type, str]] = [
    ("requests", int, "requests per pool"),
    ("duration", float, "seconds each pool's run should take"),
    ("servers", int, "servers at the start"),
    ("clients", int, "client pools"),
    ("max_slots", int, "connections per client"),
    ("users", int, "greenlets sending requests"),
    ("seed", int, "seed for service and think times"),
    ("turns_slow", float, "how many times slower a fast server turns part way"),
]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="callosum-gevent",
        description="Try the Callosum self-balancing connection pool on gevent.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what the pools and rovers do"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="compare Callosum with a random-choice pool on local servers",
        description="Run the same workload through Callosum and through a random-choice "
        "pool, each against fresh local servers (one slower), killing one server part "
        "way, adding one later and then slowing a fast one down; print a table per server "
        "with where the requests went before and after the slowdown.",
    )
    for name, kind, text in _DEMO_OPTIONS:
        demo.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=getattr(_DEFAULTS, name),
            help=f"{text} (default %(default)s)",
        )

    serve = commands.add_parser(
        "serve",
        help="run a server of the demo's line protocol",
        description="Serve the line protocol: each request line gets back "
        "'<server-id> <line>'. Runs until SIGTERM or Ctrl-C, then drains: stops "
        "accepting, finishes the requests in flight and closes each connection "
        "between requests; a second signal stops at once.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    serve.add_argument(
        "--port", type=_port, default=4040, help="port to bind, 0 for any (default %(default)s)"
    )
    serve.add_argument(
        "--service-time",
        type=_service_time,
        default=0.0,
        help="seconds each request takes (default %(default)s)",
    )
    serve.add_argument(
        "--capacity", type=_count, default=None, help="requests served at once (default: no limit)"
    )
    serve.add_argument(
        "--weight",
        type=_weight,
        default=1,
        help="connections per slot number, or 'auto' to set it from the measured "
        "capacity (default %(default)s)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=10.0,
        help="seconds to drain before killing the connections left (default %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=_count,
        default=None,
        help="connections held at most (default: no limit)",
    )
    serve.add_argument(
        "--id", type=_server_id, default=None, help="name in replies (default HOST:PORT)"
    )

    call = commands.add_parser(
        "call",
        help="send one request through a Callosum client",
        description="Connect to the given servers in random order until one sends "
        "its slot line, send MESSAGE through a Callosum client on that connection, and "
        "print the reply and the server and slot that answered.",
    )
    call.add_argument("servers", nargs="+", type=_address, metavar="HOST:PORT")
    call.add_argument("message", type=_message, metavar="MESSAGE")
    call.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        help="seconds to connect, to read the slot line and to wait for the reply "
        "(default %(default)s)",
    )
    return parser, {"demo": demo, "serve": serve, "call": call}


def _demo_options(args: argparse.Namespace) -> DemoOptions:
    return DemoOptions(**{name: getattr(args, name) for name, _, _ in _DEMO_OPTIONS})


def _weight(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor 'auto'") from None


def _port(text: str) -> int:
    """Return a port to bind: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {port}")
    return port


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {count}")
    return count


def _service_time(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= seconds < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return seconds


def _server_id(text: str) -> str:
    # Replies are "<id> <message>": a space, a newline or an unprintable
    # character in the id would garble them.
    if not text or not text.isprintable() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(
            f"--id must be one word of printable characters, got {text!r}"
        )
    return text


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _message(text: str) -> str:
    if "\n" in text or "\r" in text:
        raise argparse.ArgumentTypeError("MESSAGE must be one line (no newline)")
    return text


def _address(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{spec!r} is not HOST:PORT")
    if not 1 <= int(port) <= 65535:  # 0 means "any" to bind, but no server listens there
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {spec!r}")
    return host.strip("[]"), int(port)


def _serving(args: argparse.Namespace) -> tuple[LineService, CallosumServer]:
    """Build the service and its server; bad settings raise ValueError or TypeError."""
    service = LineService(args.id or "server", args.service_time, args.capacity)
    server = CallosumServer(
        (args.host, args.port),
        service,
        weight=args.weight,
        max_connections=args.max_connections,
        marks_requests=True,
    )
    service.server = server  # requests are marked, so the server can drain between them
    return service, server


def _serve(service: LineService, server: CallosumServer, args: argparse.Namespace) -> int:
    drain_timeout: float = args.drain_timeout
    server.start()
    where = _host_port(*server.address[:2])
    if args.id is None:
        service.server_id = where
    print(f"serving {service.server_id} on {where}", flush=True)
    signals = gevent.event.Event()
    count = 0

    def on_signal() -> None:
        nonlocal count
        count += 1
        signals.set()

    handlers = [gevent.signal_handler(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        signals.wait()
        signals.clear()
        held = server.stats()["active"]
        print(f"draining {held} connections (up to {drain_timeout:g} s)", flush=True)
        started = time.monotonic()
        drainer = gevent.spawn(server.drain, drain_timeout)
        # Whichever comes first: the drain ends, or a second signal cuts it short.
        gevent.wait([drainer, signals], count=1)
        drained = drainer.ready() and drainer.value is True
        left = server.stats()["active"]
    finally:
        for handler in handlers:
            handler.cancel()
        server.stop(timeout=0)
    if drained:
        print(f"stopped: drained in {time.monotonic() - started:.2f} s", flush=True)
    else:
        why = "a second signal" if count > 1 else f"{drain_timeout:g} s"
        print(f"stopped: {left} connections killed after {why}", flush=True)
    return 0


def _host_port(host: str, port: int) -> str:
    """Name an address as ``call`` reads it back: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect(servers: list[tuple[str, int]], timeout: float) -> tuple[Any, int, str]:
    """Return a socket that sent its slot line, the slot and the server's name.

    Try the servers in random order. Raise ProtocolError if one answered
    without a valid slot line and none sent one, else ConnectionError.
    """
    problems: list[str] = []
    protocol = False
    for host, port in random.sample(servers, len(servers)):
        name = _host_port(host, port)
        try:
            sock = gsocket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            problems.append(f"could not reach {name} ({exc.strerror or exc})")
            continue
        try:
            slot = read_slot_line(sock, timeout)
        except (ProtocolError, OSError) as exc:
            sock.close()
            protocol = True
            problems.append(f"{name} is not a Callosum server: {exc}")
            continue
        return sock, slot, name
    if protocol:
        raise ProtocolError("; ".join(problems))
    raise ConnectionError("; ".join(problems))


def _call(args: argparse.Namespace) -> int:
    sock, slot, name = _connect(args.servers, args.timeout)
    where = _host_port(*sock.getpeername()[:2])
    with CallosumClient(max_slots=1) as client:
        client.new_connection(slot, sock)
        with client.connection(timeout=0) as lent:
            lent.settimeout(args.timeout)
            try:
                server_id, reply = request(lent, args.message)
            except NoReply as exc:
                raise ConnectionError(f"{name} sent its slot line, then: {exc}") from None
            except ProtocolError as exc:
                raise ProtocolError(f"{name} does not speak the line protocol: {exc}") from None
            except TimeoutError:
                raise TimeoutError(f"no reply from {name} within {args.timeout:g} s") from None
    print(f"{reply}\n(answered by {server_id} on slot {slot} at {where})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with *argv* (default ``sys.argv[1:]``); return the exit code."""
    parser, commands = _parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(message)s")
    usage = commands[args.command]
    try:
        # Settings are checked before anything runs; a bad one is a usage error
        # of its own subcommand.
        try:
            if args.command == "demo":
                options = _demo_options(args)
            elif args.command == "serve":
                service, server = _serving(args)
        except (TypeError, ValueError) as exc:
            usage.error(str(exc))
        if args.command == "demo":
            return run_demo(options)
        if args.command == "serve":
            return _serve(service, server, args)
        return _call(args)
    except (OSError, CallosumError) as exc:
        print(f"callosum-gevent {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # the shell's code for Ctrl-C, without a traceback


if __name__ == "__main__":
    sys.exit(main())
