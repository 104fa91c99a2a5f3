"""A gevent StreamServer that sends every connection its Callosum slot first."""

from __future__ import annotations

import logging
import math
from contextlib import closing
from typing import Any, Callable

from gevent.pool import Pool
from gevent.server import StreamServer

from ._slots import ServerSlots

__all__ = ["CallosumServer", "Handler"]

_log = logging.getLogger("callosum_gevent")

#: ``handle(sock, address)``; its return value is ignored.
Handler = Callable[[Any, Any], object]


def _check_count(name: str, value: object, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_handle(handle: object) -> None:
    if not callable(handle):
        raise TypeError(f"handle must be callable, got {type(handle).__name__}")


class CallosumServer(StreamServer):  # type: ignore[misc]
    """Serve TCP (or TLS) connections, each opened with its slot line.

    Every accepted connection takes the lowest free slot, receives
    ``b"%d\\r\\n" % slot`` and is then passed to ``handle(sock, address)`` in
    its own greenlet. The slot is freed exactly once, when the handler returns,
    raises or is killed, or when the slot line cannot be sent; the socket is
    closed afterwards, as with any StreamServer. Pass the handler rather than
    overriding :meth:`handle`, which does the slot work.

    All of StreamServer's lifecycle works unchanged (``start``,
    ``serve_forever``, ``stop(timeout)``, ``close``, ``address``,
    ``ssl_context=``, ``spawn=``, ``with``). The default ``spawn`` is an
    unbounded :class:`gevent.pool.Pool`, so ``stop(timeout)`` kills handlers
    still running after ``timeout`` and closes their connections, and clients
    move elsewhere. Unless the process is monkey-patched, ``ssl_context``
    must be a :class:`gevent.ssl.SSLContext`, or TLS handshakes block the hub.

    :param slots: a :class:`ServerSlots` to share or inspect; a fresh one if
        None. With ``weight`` > 1 it counts weight-fold positions, not slots.
    :param weight: number each slot ``weight`` times (weight 2 gives 0, 0, 1,
        1, 2, ...), so the server draws ``weight`` times the connections of a
        weight-1 server. The cost: slot numbers no longer say exactly how many
        connections the server holds, clients with a small ``max_slots`` see
        coarser steps, and a client cannot tell two connections with the same
        slot apart when choosing which to keep.
    :param max_connections: connections beyond this many are closed at once,
        without a slot (with TLS, after the handshake). None means no limit.
    :param slot_line_timeout: seconds allowed to send the slot line; a peer
        that lets it time out is closed.
    """

    def __init__(
        self,
        listener: Any,
        handle: Handler,
        slots: ServerSlots | None = None,
        *,
        weight: int = 1,
        max_connections: int | None = None,
        slot_line_timeout: float = 5.0,
        backlog: int | None = None,
        spawn: Any = "default",
        **ssl_args: Any,
    ) -> None:
        _check_handle(handle)
        if slots is not None and not isinstance(slots, ServerSlots):
            raise TypeError(f"slots must be a ServerSlots, got {type(slots).__name__}")
        _check_count("weight", weight)
        _check_count("max_connections", max_connections, allow_none=True)
        if isinstance(slot_line_timeout, bool) or not isinstance(slot_line_timeout, (int, float)):
            raise TypeError(
                f"slot_line_timeout must be a number, got {type(slot_line_timeout).__name__}"
            )
        if not (slot_line_timeout > 0 and math.isfinite(slot_line_timeout)):
            raise ValueError(f"slot_line_timeout must be > 0 and finite, got {slot_line_timeout}")
        self._slots = ServerSlots() if slots is None else slots
        self._weight = weight
        self._max_connections = max_connections
        self._slot_line_timeout = float(slot_line_timeout)
        self._accepted = 0
        self._refused = 0
        self._active = 0
        self._failed = 0
        self._errors = 0
        if isinstance(spawn, str) and spawn == "default":
            spawn = Pool()
        super().__init__(listener, handle, backlog=backlog, spawn=spawn, **ssl_args)

    @property
    def slots(self) -> ServerSlots:
        """Return the ServerSlots this server draws from."""
        return self._slots

    @property
    def weight(self) -> int:
        """Return how many connections share each slot number."""
        return self._weight

    @property
    def max_connections(self) -> int | None:
        """Return the most connections served at once, or None for no limit."""
        return self._max_connections

    @property
    def slot_line_timeout(self) -> float:
        """Return the seconds allowed to send the slot line."""
        return self._slot_line_timeout

    @property
    def active(self) -> int:
        """Return how many connections hold a slot right now."""
        return self._active

    def stats(self) -> dict[str, int]:
        """Return counters: accepted, refused, active, failed and errors."""
        return {
            "accepted": self._accepted,
            "refused": self._refused,
            "active": self._active,
            "failed": self._failed,
            "errors": self._errors,
        }

    def set_handle(self, handle: Handler) -> None:
        """Replace the handler that new connections are given to."""
        _check_handle(handle)
        self._user_handle = handle
        # gevent's own set_handle would drop the TLS wrapping here.
        tls = getattr(self, "ssl_args", None) is not None  # unset while __init__ runs
        self._handle = self.wrap_socket_and_handle if tls else self.handle

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        """Do the TLS handshake within ``slot_line_timeout``, then :meth:`handle`.

        A failed or silent handshake is counted in ``failed`` and the socket
        closed; nothing escapes the connection's greenlet.
        """
        client_socket.settimeout(self._slot_line_timeout)
        try:
            ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except OSError as exc:  # ssl.SSLError and timeouts included
            self._failed += 1
            _log.debug("TLS handshake with %s failed: %r", address, exc)
            return None
        with closing(ssl_socket):
            ssl_socket.settimeout(None)
            return self.handle(ssl_socket, address)

    def handle(self, sock: Any, address: Any) -> None:
        """Give ``sock`` a slot, send the slot line, run the user's handler."""
        if self._max_connections is not None and self._active >= self._max_connections:
            self._refused += 1
            _log.debug("refusing %s: %d connections already", address, self._active)
            return
        # Nothing between get() and try may yield, or a kill could leak the slot.
        position = self._slots.get()
        self._active += 1
        try:
            if self._send_slot_line(sock, address, position // self._weight):
                self._accepted += 1
                self._user_handle(sock, address)
        except OSError:
            self._errors += 1
            _log.debug("connection from %s failed in its handler", address, exc_info=True)
        except Exception:
            self._errors += 1
            _log.warning("handler for %s raised", address, exc_info=True)
        finally:
            self._active -= 1
            self._slots.put(position)

    def _send_slot_line(self, sock: Any, address: Any, slot: int) -> bool:
        """Send the slot line within ``slot_line_timeout``; say whether it went."""
        timeout = sock.gettimeout()
        sock.settimeout(self._slot_line_timeout)
        try:
            sock.sendall(b"%d\r\n" % slot)
        except OSError as exc:
            self._failed += 1
            _log.debug("could not send slot %d to %s: %r", slot, address, exc)
            return False
        sock.settimeout(timeout)
        return True
