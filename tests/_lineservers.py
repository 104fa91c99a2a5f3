"""Small loopback servers and socket pairs for the slot-line and rover tests."""

from __future__ import annotations

import socket as stdsocket
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.event
import gevent.server
from gevent import socket

Script = Callable[[Any], None]


def send_segments(segments: Iterable[bytes], gap: float = 0.0) -> Script:
    """Return a script that sends *segments* with *gap* seconds between them."""

    def script(sock: Any) -> None:
        for i, segment in enumerate(segments):
            if i and gap:
                gevent.sleep(gap)
            sock.sendall(segment)

    return script


def reset(sock: Any) -> None:
    """Close *sock* abruptly: the peer sees ECONNRESET, not EOF."""
    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class ScriptServer:
    """Run *script* on every connection, then wait for the peer to close it.

    ``eofs`` counts the connections the peer closed, so a test can check that
    the client side really closed a socket it turned down.
    """

    def __init__(self, script: Script, ssl_context: Any = None) -> None:
        self.script = script
        self.accepted = 0
        self.eofs = 0
        self.changed = gevent.event.Event()
        kwargs = {"ssl_context": ssl_context} if ssl_context is not None else {}
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle, **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.address[:2]
        return host, port

    def _handle(self, sock: Any, _addr: Any) -> None:
        self.accepted += 1
        self.changed.set()
        try:
            self.script(sock)
            while sock.recv(4096):
                pass
            self.eofs += 1
        except OSError:
            pass
        finally:
            sock.close()
            self.changed.set()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until *predicate* holds, re-checking whenever a connection changes."""
        with gevent.Timeout(timeout, False):
            while not predicate():
                self.changed.clear()
                self.changed.wait()
        return predicate()

    def __enter__(self) -> ScriptServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(timeout=1)


@contextmanager
def tcp_pair(listener: Any) -> Iterator[tuple[Any, Any]]:
    """Yield a connected (client, server) pair of gevent sockets over loopback."""
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def make_listener() -> Any:
    """Return a gevent socket listening on a free loopback port."""
    listener = socket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener
