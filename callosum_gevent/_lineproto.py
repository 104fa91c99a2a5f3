"""The line protocol of the demo, ``serve`` and ``call``.

A request is ``b"<message>\\n"``; the reply is ``b"<server-id> <message>\\n"``.
One request is in flight per connection at a time, so a reader never has to
keep bytes past the end of a reply.
"""

from __future__ import annotations

import random
import socket
from typing import Any

import gevent
from gevent.lock import BoundedSemaphore

from .errors import ProtocolError

__all__ = ["MAX_LINE", "LineService", "read_line", "request"]

#: The longest line either side accepts, newline included.
MAX_LINE = 64 * 1024


def read_line(sock: socket.socket) -> bytes:
    """Read one line from *sock* and return it without its newline.

    Raise ``ConnectionError`` if the peer closes first and ``ProtocolError``
    if the line runs past ``MAX_LINE``. Meant for replies and slot lines: it
    may read past the newline, so the peer must not send ahead.
    """
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    return bytes(buf[:-1])


def request(sock: socket.socket, message: str) -> tuple[str, str]:
    """Send *message* over *sock* and return the reply as ``(server_id, message)``."""
    if not isinstance(message, str):
        raise TypeError(f"message must be str, not {type(message).__name__}")
    if "\n" in message:
        raise ValueError("message must not contain a newline")
    sock.sendall(message.encode() + b"\n")
    server_id, sep, echoed = read_line(sock).decode(errors="replace").partition(" ")
    if not sep:
        raise ProtocolError(f"malformed reply {server_id!r}")
    return server_id, echoed


class LineService:
    """Serve the line protocol on each connection a ``CallosumServer`` hands over.

    Each request takes *service_time* seconds on average (exponentially
    distributed when *rng* is given, fixed otherwise), and at most *capacity*
    requests are served at once, so a busy server really queues. The counters
    feed the demo's table.
    """

    def __init__(
        self,
        server_id: str,
        service_time: float = 0.0,
        capacity: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not server_id or any(c.isspace() for c in server_id):
            raise ValueError(f"server_id must be a non-empty word, not {server_id!r}")
        if service_time < 0:
            raise ValueError(f"service_time must be >= 0, not {service_time!r}")
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, not {capacity!r}")
        self.server_id = server_id
        self.service_time = service_time
        self._rng = rng
        self._busy = BoundedSemaphore(capacity) if capacity is not None else None
        self.connections = 0
        self.peak_connections = 0
        self.served = 0

    def __call__(self, sock: socket.socket, address: Any) -> None:
        """Answer requests on *sock* until the client hangs up."""
        self.connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)
        try:
            # A buffered reader keeps any pipelined requests instead of losing them.
            with sock.makefile("rb") as rfile:
                while True:
                    line = rfile.readline(MAX_LINE)
                    if not line.endswith(b"\n"):
                        return  # hung up, or a line too long to be a request
                    self._work()
                    sock.sendall(self.server_id.encode() + b" " + line)
                    self.served += 1
        except OSError:
            return
        finally:
            self.connections -= 1

    def _work(self) -> None:
        delay = self.service_time
        if self._rng is not None and delay > 0:
            delay = self._rng.expovariate(1 / delay)
        if self._busy is None:
            gevent.sleep(delay)
            return
        with self._busy:
            gevent.sleep(delay)
