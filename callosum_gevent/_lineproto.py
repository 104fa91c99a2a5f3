"""The line protocol of the demo, ``serve`` and ``call``.

A request is ``b"<message>\\n"``; the reply is ``b"<server-id> <message>\\n"``.
One request is in flight per connection at a time, so a reader never has to
keep bytes past the end of a reply. Every request is idempotent (the server
echoes it), so a client may send it again when no reply came.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.lock import BoundedSemaphore

from .errors import ProtocolError

if TYPE_CHECKING:
    from ._client import CallosumClient
    from ._server import CallosumServer

__all__ = ["MAX_LINE", "LineService", "NoReply", "call", "read_line", "request"]


class NoReply(ConnectionError):
    """The connection closed or reset before the first byte of the reply.

    The request may not have reached the server's handler at all: a draining
    server closes connections between requests, and one it closes just as
    the client sends looks like this. An idempotent request can be sent
    again on another connection.
    """


#: The longest line either side accepts, newline included.
MAX_LINE = 64 * 1024


def read_line(sock: socket.socket) -> bytes:
    """Read one line from *sock* and return it without its newline.

    Raise :class:`NoReply` if the peer closes or resets the connection before
    sending a byte, ``ConnectionError`` if it closes mid-line, and
    ``ProtocolError`` if the line runs past ``MAX_LINE``. Meant for replies:
    it may read past the newline, so the peer must not send ahead.
    """
    buf = bytearray()
    while not buf.endswith(b"\n"):
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError as exc:
            if buf:
                raise
            raise NoReply(f"the server reset the connection before replying: {exc}") from exc
        if not chunk:
            if buf:
                raise ConnectionError("the server closed the connection mid-reply")
            raise NoReply("the server closed the connection before replying")
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
    try:
        sock.sendall(message.encode() + b"\n")
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise NoReply(f"the server closed the connection before the request went: {exc}") from exc
    server_id, sep, echoed = read_line(sock).decode(errors="replace").partition(" ")
    if not sep:
        raise ProtocolError(f"malformed reply {server_id!r}")
    return server_id, echoed


def call(
    client: CallosumClient,
    message: str,
    *,
    timeout: float | None = None,
    idempotent: bool = True,
    on_retry: Callable[[NoReply], object] | None = None,
) -> tuple[str, str]:
    """Send *message* on a connection lent by *client*; return the reply.

    When the connection closes before the first byte of the reply
    (:class:`NoReply`) and the request is *idempotent*, send it once more on
    another connection, after calling ``on_retry(exc)``; a second
    :class:`NoReply`, or any other error, propagates. A reply cut short is
    never retried: the server may have acted on the request. *timeout*
    bounds each wait for a connection, not the reply: set the socket's own
    timeout for that.
    """
    try:
        with client.connection(timeout) as sock:
            return request(sock, message)
    except NoReply as exc:
        if not idempotent:
            raise
        if on_retry is not None:
            on_retry(exc)
    # The failed connection was discarded on the way out of the with block.
    with client.connection(timeout) as sock:
        return request(sock, message)


class LineService:
    """Serve the line protocol on each connection a ``CallosumServer`` hands over.

    Each request takes *service_time* seconds on average (exponentially
    distributed when *rng* is given, fixed otherwise), and at most *capacity*
    requests are served at once, so a busy server really queues. The counters
    feed the demo's table.

    Set :attr:`server` to the ``CallosumServer`` that runs the service
    (created with ``marks_requests=True``), and each request is marked with
    ``server.request(sock)``, so the server can drain between requests and
    measure its capacity (``weight="auto"``).
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
        #: The server whose request boundaries to mark, if any.
        self.server: CallosumServer | None = None

    def __call__(self, sock: socket.socket, address: Any) -> None:
        """Answer requests on *sock* until the client hangs up."""
        self.connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)
        server = self.server
        try:
            # A buffered reader keeps any pipelined requests instead of losing them.
            with sock.makefile("rb") as rfile:
                while True:
                    line = rfile.readline(MAX_LINE)
                    if not line.endswith(b"\n"):
                        return  # hung up, or a line too long to be a request
                    if server is None:
                        self._answer(sock, line)
                    else:
                        # Raises ConnectionAbortedError once a drain closed the connection.
                        with server.request(sock):
                            self._answer(sock, line)
                    self.served += 1
        except OSError:
            return
        finally:
            self.connections -= 1

    def _answer(self, sock: socket.socket, line: bytes) -> None:
        self._work()
        sock.sendall(self.server_id.encode() + b" " + line)

    def _work(self) -> None:
        delay = self.service_time
        if self._rng is not None and delay > 0:
            delay = self._rng.expovariate(1 / delay)
        if self._busy is None:
            gevent.sleep(delay)
            return
        with self._busy:
            gevent.sleep(delay)
