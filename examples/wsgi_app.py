"""A gevent WSGI app whose requests reach line-protocol backends through one Callosum client.

Every HTTP request borrows a pooled connection with ``client.connection()``,
sends one line and answers with the backend's reply. The client and its rover
are made on first use in each process, so they are never shared across a fork.

Standalone, with backends of ``python -m callosum_gevent serve`` (or, without
``BACKENDS``, two local ones it starts itself)::

    BACKENDS=127.0.0.1:4040,127.0.0.1:4041 python examples/wsgi_app.py --port 8000
    python examples/wsgi_app.py --self-test     # fire a few requests at itself, exit

Under gunicorn's gevent worker (``--preload`` works too)::

    BACKENDS=127.0.0.1:4040 gunicorn -k gevent -w 2 examples.wsgi_app:app
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import gevent
from gevent.pywsgi import WSGIServer

from callosum_gevent import CallosumClient, CallosumError, CallosumServer, Rover

StartResponse = Callable[..., Any]

_pool: tuple[int, CallosumClient, Rover] | None = None


def parse_backends(spec: str) -> dict[Hashable, tuple[str, int]]:
    """Turn ``"host:port,host:port"`` into the rover's server map."""
    servers: dict[Hashable, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        host, _, port = item.rpartition(":")
        servers[item] = (host, int(port))
    if not servers:
        raise ValueError("BACKENDS names no host:port")
    return servers


def client() -> CallosumClient:
    """Return this process's client, making it and its rover on first use."""
    global _pool
    # Nothing here yields, so no other greenlet can make a second pool meanwhile.
    # A pool inherited through fork belongs to the parent: make a new one.
    if _pool is None or _pool[0] != os.getpid():
        new = CallosumClient(max_slots=int(os.environ.get("MAX_SLOTS", "8")))
        rover = Rover(new, parse_backends(os.environ.get("BACKENDS", "")), interval=0.2)
        rover.start()
        _pool = (os.getpid(), new, rover)
    return _pool[1]


def shutdown() -> None:
    """Stop this process's rover and close its client, if it made them."""
    global _pool
    if _pool is not None and _pool[0] == os.getpid():
        _pool[2].stop()
        _pool[1].close()
    _pool = None


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Send the ``q`` query parameter to a backend and return its reply."""
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    message = query.get("q", ["hello"])[0].replace("\n", " ")
    try:
        with client().connection(timeout=2) as sock, sock.makefile("rb") as stream:
            sock.sendall(message.encode() + b"\n")
            reply = stream.readline(65536)
            if not reply.endswith(b"\n"):
                # Raising inside the block makes the client discard the connection.
                raise ConnectionError("the backend hung up")
        status = "200 OK"
    except (OSError, CallosumError) as exc:
        reply, status = f"backend unavailable: {exc}\n".encode(), "503 Service Unavailable"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(reply)))])
    return [reply]


def echo(sock: Any, address: Any) -> None:
    """Be a local backend: answer each line with ``port-<port> <line>``."""
    name = b"port-%d " % sock.getsockname()[1]
    with sock.makefile("rwb") as stream:
        for line in stream:
            stream.write(name + line)
            stream.flush()


def self_test(port: int) -> int:
    """Fire requests at the running app and say how they went."""
    # gevent's socket, not urllib: the app runs in this very process and hub.
    from gevent import socket

    def get(number: int) -> tuple[str, str]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /?q=req%d HTTP/1.0\r\nHost: localhost\r\n\r\n" % number)
            with sock.makefile("rb") as stream:
                head, _, body = stream.read().decode().partition("\r\n\r\n")
        return head.split()[1], body

    answers = [g.get() for g in gevent.joinall([gevent.spawn(get, n) for n in range(20)])]
    ok = [body for status, body in answers if status == "200"]
    backends = {body.split()[0] for body in ok}
    print(f"self-test: {len(ok)}/{len(answers)} requests answered 200 by {len(backends)} backends")
    return 0 if len(ok) == len(answers) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="HTTP port, 0 for any")
    parser.add_argument("--self-test", action="store_true", help="send requests to itself, exit")
    args = parser.parse_args(argv)
    backends = []
    if "BACKENDS" not in os.environ:
        backends = [CallosumServer(("127.0.0.1", 0), echo) for _ in range(2)]
        for backend in backends:
            backend.start()
        os.environ["BACKENDS"] = ",".join(f"127.0.0.1:{b.server_port}" for b in backends)
    http = WSGIServer(("127.0.0.1", 0 if args.self_test else args.port), app, log=None)
    http.start()
    print(f"serving http://127.0.0.1:{http.server_port}/?q=hello via {os.environ['BACKENDS']}")
    try:
        if args.self_test:
            return self_test(http.server_port)
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.stop(timeout=1)
        shutdown()
        for backend in backends:
            backend.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
