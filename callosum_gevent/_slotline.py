"""Read the slot line a Callosum server sends first on every connection."""

from __future__ import annotations

import socket
import ssl

import gevent
import gevent.ssl

from .errors import ProtocolError

__all__ = ["DEFAULT_MAX_SLOT", "MAX_LINE", "read_slot_line"]

#: Longest slot line accepted, counting the ``\r\n``.
MAX_LINE = 20
#: Highest slot accepted unless the caller says otherwise.
DEFAULT_MAX_SLOT = 2**31 - 1

_DIGITS = frozenset(b"0123456789")


def _check(line: bytes) -> bool:
    """Return True if *line* is a complete slot line; raise if it cannot become one."""
    body, cr, rest = line.partition(b"\r")
    if not set(body) <= _DIGITS or (cr and rest not in (b"", b"\n")) or b"\n" in body:
        raise ProtocolError(f"slot line {line!r} is not ASCII digits and CRLF")
    if rest != b"\n":
        if len(line) >= MAX_LINE:
            raise ProtocolError(f"slot line {line!r} has no CRLF within {MAX_LINE} bytes")
        return False
    if not body:
        raise ProtocolError("slot line is empty")
    return True


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Receive exactly *n* bytes that a peek has already shown to be buffered."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProtocolError("connection closed inside the slot line")
        data += chunk
    return data


def _read(sock: socket.socket, max_slot: int) -> int:
    # TLS sockets cannot peek, but reading one byte at a time never reads past the line either.
    peek = not isinstance(sock, ssl.SSLSocket | gevent.ssl.SSLSocket)
    line = b""
    while True:
        ahead = sock.recv(MAX_LINE - len(line), socket.MSG_PEEK) if peek else sock.recv(1)
        if not ahead:
            raise ProtocolError(f"connection closed before the slot line ended (got {line!r})")
        # Only bytes up to and including the first LF belong to the line.
        ahead = ahead[: ahead.find(b"\n") + 1 or len(ahead)]
        done = _check(line + ahead)
        line += _recv_exactly(sock, len(ahead)) if peek else ahead
        if done:
            slot = int(line[:-2])
            if slot > max_slot:
                raise ProtocolError(f"slot {slot} is above the ceiling {max_slot}")
            return slot


def read_slot_line(sock: socket.socket, timeout: float, max_slot: int = DEFAULT_MAX_SLOT) -> int:
    """Read one slot line from *sock* within *timeout* seconds and return the slot.

    Consume exactly the line, so bytes the server sends after it stay in the
    socket. Raise ProtocolError for a malformed, overlong, truncated or late
    line, or a slot above *max_slot*; socket errors propagate as OSError.
    """
    timer = gevent.Timeout(timeout)
    timer.start()
    try:
        return _read(sock, max_slot)
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise ProtocolError(f"no complete slot line within {timeout} s") from None
    finally:
        timer.close()
