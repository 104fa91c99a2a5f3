"""Real loopback connections whose server end a test can close, reset or write to."""

from __future__ import annotations

from typing import Any

import gevent
from _lineservers import reset, wait_until
from gevent import socket
from gevent.event import Event
from gevent.queue import Queue
from gevent.server import StreamServer

__all__ = ["PeerServer", "is_closed", "peer_saw_eof", "reset", "wait_until"]


class PeerServer:
    """A gevent StreamServer that hands each accepted socket to the test.

    ``connect()`` returns ``(client_end, server_end)``; the server end stays
    open until the test closes it or the server stops.
    """

    def __init__(self) -> None:
        self._accepted: Queue[Any] = Queue()
        self._stop = Event()
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    def _handle(self, sock: Any, _address: Any) -> None:
        self._accepted.put(sock)
        self._stop.wait()

    def connect(self) -> tuple[Any, Any]:
        client = socket.create_connection(self.server.address)
        return client, self._accepted.get(timeout=5)

    def stop(self) -> None:
        self._stop.set()
        self.server.stop(timeout=1)


def is_closed(sock: Any) -> bool:
    """Tell whether ``sock`` was closed locally."""
    return bool(sock.fileno() == -1)


def peer_saw_eof(server_end: Any, timeout: float = 2.0) -> bool:
    """Tell whether the client end of ``server_end`` was closed (EOF or reset)."""
    try:
        with gevent.Timeout(timeout):
            return bool(server_end.recv(1) == b"")
    except gevent.Timeout:
        return False
    except ConnectionResetError:
        return True
