"""Small loopback servers and socket pairs for the slot-line and rover tests."""

from __future__ import annotations

import socket as stdsocket
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
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

    ``peer_closed`` counts the connections the peer closed (EOF, or a reset
    when it closed with our bytes unread), so a test can check that the
    client really closed a socket it gave up on.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.peer_closed = 0
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.address[:2]
        return host, port

    def _handle(self, sock: Any, _addr: Any) -> None:
        self.accepted += 1
        try:
            self.script(sock)
            while sock.recv(4096):
                pass
            self.peer_closed += 1
        except ConnectionError:  # reset, or a broken pipe while still sending
            self.peer_closed += 1
        except OSError:
            pass
        finally:
            sock.close()

    def __enter__(self) -> ScriptServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(timeout=1)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait until *predicate* holds or *timeout* passes; return whether it holds.

    Polls, because the states tests wait on (pools, servers, counters) have no
    common event to wait on.
    """
    with gevent.Timeout(timeout, False):
        while not predicate():
            gevent.sleep(0.005)
    return predicate()


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
