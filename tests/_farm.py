"""Echo CallosumServers on ports that survive restarts, recording when each connection ends."""

from __future__ import annotations

import contextlib
import itertools
import select
import socket as stdsocket
from collections.abc import Hashable
from typing import Any

from callosum_gevent import CallosumServer

__all__ = ["Farm", "fin_pending", "port_of", "request"]

#: One clock for the whole process: greenlets of one hub never run at once, so
#: the order of two numbers drawn from it is the order of the two events.
TICK = itertools.count()

_DEAD = select.POLLIN | select.POLLPRI | select.POLLRDHUP


def fin_pending(sock: Any) -> bool:
    """Tell, without yielding, whether a FIN, RST, error or bytes wait on *sock*."""
    poll = select.poll()  # the stdlib's: tests do not monkey-patch
    poll.register(sock.fileno(), _DEAD)
    return bool(poll.poll(0))


def port_of(sock: Any) -> int:
    """Return the server port *sock* is connected to."""
    port: int = sock.getpeername()[1]
    return port


def request(sock: Any, payload: bytes) -> bytes:
    """Send *payload* and read back as many bytes; fewer means the server closed."""
    sock.sendall(payload)
    reply = b""
    while len(reply) < len(payload):
        chunk = sock.recv(len(payload) - len(reply))
        if not chunk:
            break
        reply += chunk
    return reply


class Farm:
    """``n`` echo CallosumServers on loopback that a test stops and restarts on the same ports.

    ``closed[(server_port, client_port)]`` is the TICK at which the server end
    of that connection was shut down (the FIN has left by then).
    """

    def __init__(self, n: int, **server_kwargs: Any) -> None:
        self.ports = [0] * n
        self.servers: list[CallosumServer | None] = [None] * n
        self.closed: dict[tuple[int, int], int] = {}
        self.restarts = 0
        self._kwargs = server_kwargs
        for i in range(n):
            self.start(i)

    def addresses(self) -> dict[Hashable, tuple[str, int]]:
        return {i: ("127.0.0.1", port) for i, port in enumerate(self.ports)}

    def start(self, i: int) -> CallosumServer:
        port = self.ports[i]

        def echo(sock: Any, address: Any) -> None:
            try:
                while data := sock.recv(4096):
                    sock.sendall(data)
            finally:
                # Shut down here, so the FIN leaves before the tick is taken
                # (a plain close may be deferred by gevent to a later turn).
                with contextlib.suppress(OSError):
                    sock.shutdown(stdsocket.SHUT_RDWR)
                self.closed[(port, address[1])] = next(TICK)

        server = CallosumServer(("127.0.0.1", port), echo, **self._kwargs)
        server.start()
        self.ports[i] = port = server.server_port
        self.servers[i] = server
        return server

    def stop(self, i: int, timeout: float = 0) -> None:
        server, self.servers[i] = self.servers[i], None
        if server is not None:
            server.stop(timeout=timeout)

    def restart(self, i: int) -> None:
        self.stop(i)
        self.start(i)
        self.restarts += 1

    def close(self) -> None:
        for i in range(len(self.servers)):
            self.stop(i, timeout=1)
