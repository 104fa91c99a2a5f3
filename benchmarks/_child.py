"""A slot-line echo server (``CallosumServer``), in this process or in a child process.

Run as ``python -m benchmarks._child``, it prints its port, then obeys lines on
stdin: ``close <gap_us>`` closes every connection it holds, one every
``gap_us`` microseconds (``shutdown`` then ``close``), and answers with one
JSON line mapping each client's port to the ``time.monotonic_ns()`` just
before its shutdown (CLOCK_MONOTONIC is system-wide on Linux, so the parent
can subtract its own readings); end of input stops the server.
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import time
from types import TracebackType
from typing import Any

import gevent
from gevent import subprocess
from gevent.fileobject import FileObjectPosix

from callosum_gevent import CallosumServer

from ._peers import Address, Sock


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class EchoServer:
    """Send the slot line, then echo; remember live connections by client port."""

    def __init__(self) -> None:
        self.conns: dict[int, Sock] = {}
        self.server = CallosumServer(("127.0.0.1", 0), self.echo)
        self.server.start()
        self.address: Address = ("127.0.0.1", self.server.server_port)

    def echo(self, sock: Sock, address: Address) -> None:
        self.conns[address[1]] = sock
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass
        finally:
            self.conns.pop(address[1], None)

    def close_all(self, gap: float) -> dict[int, int]:
        closed: dict[int, int] = {}
        for port, sock in list(self.conns.items()):
            gevent.sleep(gap)
            closed[port] = time.monotonic_ns()
            # The FIN goes out now; a bare close() would wait for this hub's next
            # turn, as gevent defers closing a socket a greenlet is reading.
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        return closed

    def stop(self) -> None:
        self.server.stop(timeout=1)


class ChildServer:
    """``EchoServer`` in a child process: ``with ChildServer() as child: child.address``."""

    def __enter__(self) -> ChildServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.address: Address = ("127.0.0.1", int(self.proc.stdout.readline()))
        return self

    def close_all(self, gap: float) -> dict[int, int]:
        """Have the child close all its connections, ``gap`` seconds apart."""
        self.proc.stdin.write(b"close %d\n" % (gap * 1e6))
        self.proc.stdin.flush()
        return {int(port): t for port, t in json.loads(self.proc.stdout.readline()).items()}

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    raise_fd_limit()
    server = EchoServer()
    print(server.address[1], flush=True)
    commands: Any = FileObjectPosix(sys.stdin.fileno(), "rb")
    for line in commands:
        verb, arg = line.split()
        if verb == b"close":
            print(json.dumps(server.close_all(int(arg) / 1e6)), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
