"""A fleet of Callosum echo servers plus one sinkhole, run as a child process.

``python tests/_fleet.py KIND [HEALTHY [CAP]]`` starts HEALTHY (default 3)
echo servers, each serving at most CAP connections (default: no limit), and
one sinkhole of the given KIND (``none``: a healthy server) on loopback,
prints one line,
``ports H0 H1 ... HOLE``, and serves until SIGTERM; it then prints one JSON
line with the connections each server accepted and exits. Running the fleet
apart keeps its CPU out of the measured process and gives the network
timing of a real deployment: the sinkhole's FIN reaches the client a moment
after its slot line, not in the same turn of one hub.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from callosum_gevent import CallosumServer


def echo(sock: Any, _address: Any) -> None:
    while data := sock.recv(4096):
        sock.sendall(data)


def closes_at_once(sock: Any, _address: Any) -> None:
    """Return at once: the server closes the connection right after the slot line."""


def raises(sock: Any, _address: Any) -> None:
    raise RuntimeError("backend bug")


def greets(sock: Any, _address: Any) -> None:
    sock.sendall(b"220 welcome\r\n")  # bytes nobody asked for
    while sock.recv(4096):
        pass


def closes_later(sock: Any, _address: Any) -> None:
    gevent.sleep(0.05)


def greets_later(sock: Any, address: Any) -> None:
    gevent.sleep(0.05)
    greets(sock, address)


SINKHOLES: dict[str, Callable[[Any, Any], None]] = {
    "none": echo,
    "closes-at-once": closes_at_once,
    "raises": raises,
    "greets": greets,
    "closes-later": closes_later,
    "greets-later": greets_later,
}


def main() -> None:
    kind = sys.argv[1]
    healthy = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cap = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "0" else None
    servers = [CallosumServer(("127.0.0.1", 0), echo, max_connections=cap) for _ in range(healthy)]
    servers.append(CallosumServer(("127.0.0.1", 0), SINKHOLES[kind]))
    for server in servers:
        server.start()
    print("ports", *(server.server_port for server in servers), flush=True)
    done = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, done.set)
    done.wait()
    accepted = [server.stats()["accepted"] for server in servers]
    for server in servers:
        server.stop(timeout=0.1)
    print(json.dumps({"accepted": accepted}), flush=True)


if __name__ == "__main__":
    main()
