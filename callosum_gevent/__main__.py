"""Command line: ``callosum-gevent demo | serve | call``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Hashable, Sequence

import gevent
import gevent.event

from ._client import CallosumClient
from ._demo import DemoOptions, run_demo
from ._lineproto import LineService, request
from ._rover import Rover
from ._server import CallosumServer
from .errors import CallosumError

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


def _parser() -> argparse.ArgumentParser:
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
        "'<server-id> <line>'. Runs until Ctrl-C or SIGTERM.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    serve.add_argument(
        "--port", type=int, default=4040, help="port to bind, 0 for any (default %(default)s)"
    )
    serve.add_argument(
        "--service-time",
        type=float,
        default=0.0,
        help="seconds each request takes (default %(default)s)",
    )
    serve.add_argument(
        "--capacity", type=int, default=None, help="requests served at once (default: no limit)"
    )
    serve.add_argument(
        "--weight", type=int, default=1, help="connections per slot number (default %(default)s)"
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="connections held at most (default: no limit)",
    )
    serve.add_argument("--id", default=None, help="name in replies (default HOST:PORT)")

    call = commands.add_parser(
        "call",
        help="send one request through a Callosum client",
        description="Send MESSAGE through a Callosum client and rover over the given "
        "servers; print the reply and the server and slot that answered.",
    )
    call.add_argument("servers", nargs="+", type=_address, metavar="HOST:PORT")
    call.add_argument("message", metavar="MESSAGE")
    call.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for a connection (default %(default)s)",
    )
    return parser


def _demo_options(args: argparse.Namespace) -> DemoOptions:
    return DemoOptions(**{name: getattr(args, name) for name, _, _ in _DEMO_OPTIONS})


def _serve(args: argparse.Namespace) -> int:
    service = LineService(args.id or "server", args.service_time, args.capacity)
    server = CallosumServer(
        (args.host, args.port),
        service,
        weight=args.weight,
        max_connections=args.max_connections,
    )
    server.start()
    host, port = server.address[:2]
    if args.id is None:
        service.server_id = f"{host}:{port}"
    print(f"serving {service.server_id} on {host}:{port}", flush=True)
    stopping = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, stopping.set) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        stopping.wait()
    finally:
        for handler in handlers:
            handler.cancel()
        server.stop(timeout=1)
    print("stopped", flush=True)
    return 0


def _address(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{spec!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _call(args: argparse.Namespace) -> int:
    servers: dict[Hashable, tuple[str, int]] = {f"{h}:{p}": (h, p) for h, p in args.servers}
    with CallosumClient(max_slots=1) as client:
        rover = Rover(client, servers, connect_timeout=args.timeout, slot_timeout=args.timeout)
        # Roving by hand tells which slot the one pooled connection got; a
        # failed server is backed off, so each try picks one not yet tried.
        slot = None
        for _ in servers:
            slot = rover.rove()
            if slot is not None:
                break
        if slot is None:
            raise ConnectionError(f"could not reach {', '.join(map(str, servers))}")
        with client.connection(timeout=args.timeout) as sock:
            host, port = sock.getpeername()[:2]
            server_id, reply = request(sock, args.message)
    print(f"{reply}\n(answered by {server_id} on slot {slot} at {host}:{port})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with *argv* (default ``sys.argv[1:]``); return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "demo":
            return run_demo(_demo_options(args))
        if args.command == "serve":
            return _serve(args)
        return _call(args)
    except ValueError as exc:
        parser.error(str(exc))
    except (OSError, CallosumError) as exc:
        print(f"callosum-gevent {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # the shell's code for Ctrl-C, without a traceback


if __name__ == "__main__":
    sys.exit(main())
