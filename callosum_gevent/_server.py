"""A gevent StreamServer that sends every connection its Callosum slot first."""

from __future__ import annotations

import _socket
import logging
import math
import socket
from contextlib import AbstractContextManager, closing
from time import perf_counter
from types import TracebackType
from typing import Any, Callable, Final, Literal

from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from ._slots import CapacityEstimator, ServerSlots

__all__ = ["REFERENCE_RATE", "WEIGHT_RANGE", "CallosumServer", "Handler", "weight_for"]

_log = logging.getLogger("callosum_gevent")

#: ``handle(sock, address)``; its return value is ignored.
Handler = Callable[[Any, Any], object]

#: Requests per busy second that weight 1 stands for under ``weight="auto"``.
REFERENCE_RATE: Final = 1000.0
#: The lowest and highest weight ``weight="auto"`` sets.
WEIGHT_RANGE: Final = (0.001, 1000.0)

_MAX_SLOT: Final = 2**31 - 1  # what clients accept by default
_MAX_BACKLOG: Final = 2**31 - 1  # listen() takes a C int


def _check_count(name: str, value: object, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_seconds(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float if it is a finite number of seconds >= 0."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large, got {value}") from None
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    return seconds


def _check_handle(handle: object) -> None:
    if not callable(handle):
        raise TypeError(f"handle must be callable, got {type(handle).__name__}")


def _check_backlog(backlog: object) -> None:
    if backlog is None:
        return
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int or None, got {type(backlog).__name__}")
    if not 0 <= backlog <= _MAX_BACKLOG:
        raise ValueError(f"backlog must be between 0 and {_MAX_BACKLOG}, got {backlog}")


def weight_for(rate: float, reference: float = REFERENCE_RATE) -> float:
    """Return the weight for a capacity of ``rate``, clamped to :data:`WEIGHT_RANGE`.

    ``rate`` is requests per busy second (>= 0); ``reference`` the rate that
    weight 1 stands for (> 0 and finite).
    """
    for name, value in (("rate", rate), ("reference", reference)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if isinstance(value, int) and abs(value) > 2**1023:
            raise ValueError(f"{name} is too large, got {value}")
    if not rate >= 0:  # NaN fails too
        raise ValueError(f"rate must be >= 0, got {rate}")
    if not (reference > 0 and math.isfinite(reference)):
        raise ValueError(f"reference must be > 0 and finite, got {reference}")
    low, high = WEIGHT_RANGE
    return min(high, max(low, rate / reference))


def _shut(sock: Any) -> bool:
    """Shut both directions of ``sock`` at the descriptor, whatever wraps it.

    The peer gets a FIN now, and a greenlet blocked reading ``sock`` wakes to
    end of file, as if the peer had hung up. Going round the wrapper matters:
    gevent's ``shutdown`` fails a blocked reader with EBADF instead, and an
    SSLSocket's drops its TLS state under the reader's feet.

    Return whether this closed a live connection: False if ``sock`` was
    closed already, or its peer had hung up or reset it first.
    """
    try:
        fd = sock.fileno()
    except OSError:
        return False
    if fd < 0:
        return False
    try:
        raw = _socket.socket(fileno=fd)
    except OSError:
        return False  # not a socket after all: nothing to shut
    try:
        try:
            # Peek without waiting: an end of file already queued means the
            # peer left on its own, and the drain only tidies up.
            alive = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive = True  # open, nothing to read: the usual idle connection
        except OSError:
            alive = False  # reset by the peer
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False  # already reset or shut: nothing left to do
    finally:
        raw.detach()  # the descriptor still belongs to ``sock``
    return alive


# A connection's state, as its request boundaries see it.
_IDLE: Final = 0  # between requests
_BUSY: Final = 1  # inside server.request()
_SHUT: Final = 2  # closed by a drain
_ENDED: Final = 3  # its handler has returned

_REFUSALS: Final = {
    _BUSY: (RuntimeError, "a request is already open on this connection (one at a time)"),
    _SHUT: (ConnectionAbortedError, "the server closed this connection to drain"),
    _ENDED: (ValueError, "this connection's handler has returned"),
}


class _Connection:
    """One served connection and its request boundaries (``server.request(sock)``)."""

    __slots__ = ("_server", "sock", "state")

    def __init__(self, server: CallosumServer, sock: Any) -> None:
        self._server = server
        self.sock = sock
        self.state = _IDLE

    def __enter__(self) -> None:
        if self.state:
            error, message = _REFUSALS[self.state]
            raise error(message)
        self.state = _BUSY
        server = self._server
        if not server._boundaries:
            server._first_boundary()
        estimator = server._estimator
        if estimator is not None:
            estimator.start(perf_counter())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state == _BUSY:
            self.state = _IDLE
        elif self.state != _ENDED:  # a handler may return while another greenlet serves
            raise RuntimeError("request boundary left without being entered")
        server = self._server
        estimator = server._estimator
        if estimator is None:
            server._requests += 1
        elif (rate := estimator.finish(perf_counter())) is not None:
            server._rated(rate)  # every window of requests: rarely
        if server._draining:
            self.close()

    def close(self) -> None:
        """Close between requests: FIN to the client, end of file to the handler."""
        if self.state != _IDLE:
            return
        self.state = _SHUT
        # Counted only if the drain cut it: not one its handler or peer closed first.
        if _shut(self.sock):
            self._server._drained += 1


class CallosumServer(StreamServer):  # type: ignore[misc]
    """Serve TCP (or TLS) connections, each opened with its slot line.

    Every accepted connection takes the lowest free slot, receives
    ``b"%d\\r\\n" % slot`` and is then passed to ``handle(sock, address)`` in
    its own greenlet. The slot is freed exactly once, when the handler returns,
    raises or is killed, or when the slot line cannot be sent; the socket is
    closed afterwards, as with any StreamServer. Pass the handler rather than
    overriding :meth:`handle`, which does the slot work.

    Handlers mark each request with ``with server.request(sock): ...`` (see
    :meth:`request`). That lets :meth:`drain` close connections between
    requests, and ``weight="auto"`` measure the server's capacity.

    All of StreamServer's lifecycle works (``start``, ``serve_forever``,
    ``stop(timeout)``, ``close``, ``address``, ``ssl_context=``, ``spawn=``,
    ``with``); ``stop(timeout)`` drains first, then kills handlers still
    running. The default ``spawn`` is an unbounded :class:`gevent.pool.Pool`.
    Unless the process is monkey-patched, ``ssl_context`` must be a
    :class:`gevent.ssl.SSLContext`, or TLS handshakes block the hub.

    :param slots: a :class:`ServerSlots` to share or inspect; a fresh one if
        None. With a weight other than 1 it counts positions, not slots.
    :param weight: number each slot ``weight`` times (weight 2 gives 0, 0, 1,
        1, 2, ...), so the server draws ``weight`` times the connections of a
        weight-1 server. The cost: slot numbers no longer say exactly how many
        connections the server holds, clients with a small ``max_slots`` see
        coarser steps, and a client cannot tell two connections with the same
        slot apart when choosing which to keep. ``"auto"`` measures the
        server's capacity from its request boundaries and sets the weight to
        capacity / ``reference_rate`` (between 0.001 and 1000; connection
        number ``n`` gets slot ``floor(n / weight)``): weight 1 until the
        first ``200`` requests are measured, and for good if the handler
        never marks requests. The weight then follows every 50 requests.
    :param reference_rate: with ``weight="auto"``, the requests per busy
        second that weight 1 stands for. Give every server of a fleet the same.
    :param marks_requests: say that the handler marks every request with
        :meth:`request`, so a drain closes connections that have not begun a
        request yet. Otherwise the server learns it from the first marked
        request, and a drain before that leaves connections running.
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
        weight: int | Literal["auto"] = 1,
        reference_rate: float = REFERENCE_RATE,
        marks_requests: bool = False,
        max_connections: int | None = None,
        slot_line_timeout: float = 5.0,
        backlog: int | None = None,
        spawn: Any = "default",
        **ssl_args: Any,
    ) -> None:
        _check_handle(handle)
        if slots is not None and not isinstance(slots, ServerSlots):
            raise TypeError(f"slots must be a ServerSlots, got {type(slots).__name__}")
        initial: int = 1
        auto = isinstance(weight, str) and weight == "auto"
        if isinstance(weight, str):
            if not auto:
                raise ValueError(f"weight must be an int >= 1 or 'auto', got {weight!r}")
        else:
            _check_count("weight", weight)
            initial = weight
        reference = _check_seconds("reference_rate", reference_rate)
        if not reference:
            raise ValueError(f"reference_rate must be > 0, got {reference_rate}")
        _check_count("max_connections", max_connections, allow_none=True)
        line_timeout = _check_seconds("slot_line_timeout", slot_line_timeout)
        if not line_timeout:
            raise ValueError(f"slot_line_timeout must be > 0 and finite, got {slot_line_timeout}")
        _check_backlog(backlog)
        if not isinstance(marks_requests, bool):
            raise TypeError(f"marks_requests must be a bool, got {type(marks_requests).__name__}")
        self._slots = ServerSlots() if slots is None else slots
        self._weight: int | float = initial
        self._reference_rate = reference
        self._estimator = CapacityEstimator() if auto else None
        self._max_connections = max_connections
        self._slot_line_timeout = line_timeout
        self._accepted = 0
        self._refused = 0
        self._active = 0
        self._failed = 0
        self._errors = 0
        self._requests = 0  # under "auto" the estimator counts them
        self._drained = 0
        # Served connections by socket, for request(sock) and drain().
        self._conns: dict[Any, _Connection] = {}
        self._handshakes: set[Any] = set()  # TLS sockets still in their handshake
        self._boundaries = marks_requests  # does the handler mark its requests?
        self._draining = False
        self._live = 0  # accepted sockets not yet closed
        self._all_gone = Event()
        self._all_gone.set()
        if isinstance(spawn, str) and spawn == "default":
            spawn = Pool()
        super().__init__(listener, handle, backlog=backlog, spawn=spawn, **ssl_args)

    @property
    def slots(self) -> ServerSlots:
        """Return the ServerSlots this server draws from."""
        return self._slots

    @property
    def weight(self) -> int | float:
        """Return how many connections share each slot number (a float under "auto")."""
        return self._weight

    @property
    def rate(self) -> float | None:
        """Return the measured capacity in requests per busy second, under "auto".

        None with a fixed weight, and until the first estimate is trusted.
        """
        return None if self._estimator is None else self._estimator.rate

    @property
    def reference_rate(self) -> float:
        """Return the requests per busy second that weight 1 stands for."""
        return self._reference_rate

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

    @property
    def marks_requests(self) -> bool:
        """Return whether the handler marks its requests (declared, or seen once)."""
        return self._boundaries

    @property
    def draining(self) -> bool:
        """Return whether :meth:`drain` (or :meth:`stop`) has begun."""
        return self._draining

    def stats(self) -> dict[str, int]:
        """Return counters and gauges.

        ``accepted``, ``refused`` (over ``max_connections``, or while
        draining), ``active``, ``failed`` and ``errors``; ``requests`` marked
        with :meth:`request` and finished,
        ``in_request`` open now, ``drained`` connections a drain closed
        between requests (not those the handler or the client closed first).
        A TLS handshake cut short by a drain counts as ``refused``.
        """
        estimator = self._estimator
        return {
            "accepted": self._accepted,
            "refused": self._refused,
            "active": self._active,
            "failed": self._failed,
            "errors": self._errors,
            "requests": self._requests if estimator is None else estimator.completed,
            "in_request": sum(conn.state == _BUSY for conn in self._conns.values()),
            "drained": self._drained,
        }

    # -- request boundaries ------------------------------------------------

    def request(self, sock: Any) -> AbstractContextManager[None]:
        """Return the context manager that marks one request on ``sock``.

        ``with server.request(sock): ...`` around each request, from the
        moment the request has arrived until its reply is sent (flushed): the
        time between requests, waiting for the client, stays outside. One
        request at a time per connection; ``sock`` is the socket the handler
        was given. Entering raises :class:`RuntimeError` if a request is
        already open on the connection, and :class:`ConnectionAbortedError`
        (an ``OSError``) once a drain has closed the connection, so the
        handler ends as it would for a client that hung up. Leaving it while
        draining closes the connection.
        """
        try:
            conn = self._conns.get(sock)
        except TypeError:  # unhashable: not a socket of ours
            raise TypeError(f"sock must be a socket, got {type(sock).__name__}") from None
        if conn is None:
            raise ValueError("sock is not a connection this server's handler is serving")
        return conn

    def _first_boundary(self) -> None:
        # From now on a connection outside request() is between requests.
        self._boundaries = True
        if self._draining:
            self._close_idle()

    def _rated(self, rate: float) -> None:
        weight = weight_for(rate, self._reference_rate)
        if weight != self._weight:
            _log.debug("weight %.4g: %.1f requests per busy second", weight, rate)
        self._weight = weight

    # -- draining ----------------------------------------------------------

    def drain(self, timeout: float | None = None) -> bool:
        """Close every connection between requests; return True once all are closed.

        Stop accepting at once, let each handler finish the request it is
        serving, and close each connection when it is between requests (a
        FIN to the client, end of file to the handler). Return False if
        ``timeout`` seconds pass first (None waits without limit): the rest
        keep running, for :meth:`stop` to kill or a later drain to wait for.
        Connections whose handler never marked a request (see :meth:`request`)
        are left to end by themselves, as before.
        """
        seconds = _check_seconds("timeout", timeout, allow_none=True)
        if not self._draining:
            self._draining = True
            _log.debug("draining %d connections", len(self._conns))
            self.stop_accepting()
            listener = getattr(self, "socket", None)
            if listener is not None:
                listener.close()  # clients still in the accept queue get a reset
            for tls in list(self._handshakes):
                _shut(tls)  # no request in flight yet: the handshake fails at once
            if self._boundaries:
                self._close_idle()
        # wait(0) would still yield a turn of the hub: 0 means do not wait at all.
        if self._all_gone.is_set() if seconds == 0 else self._all_gone.wait(seconds):
            self.close()  # so that serve_forever returns
            return True
        return False

    def _close_idle(self) -> None:
        for conn in list(self._conns.values()):
            conn.close()  # a connection inside a request closes when it leaves

    def start(self) -> None:
        """Bind if needed and start accepting; raise RuntimeError once a drain has begun.

        A drained server stays drained: create a new one to serve again.
        """
        self._check_not_drained()
        super().start()

    def serve_forever(self, stop_timeout: float | None = None) -> None:
        """Start if not started, and serve until stopped or drained.

        Raise RuntimeError, as :meth:`start` does, once a drain has begun.
        """
        self._check_not_drained()
        super().serve_forever(stop_timeout=stop_timeout)

    def _check_not_drained(self) -> None:
        if self._draining:
            raise RuntimeError(
                "this server has been drained or stopped and cannot start again: "
                "create a new CallosumServer"
            )

    def start_accepting(self) -> None:
        # A bounded spawn pool calls this when it has room again: not while draining.
        if not self._draining:
            super().start_accepting()

    def stop(self, timeout: float | None = None) -> None:
        """Drain for up to ``timeout`` seconds (default ``stop_timeout``), then kill the rest.

        With a handler that marks no requests this is StreamServer's stop:
        stop accepting, wait for handlers to return, kill those left.
        """
        self.drain(self.stop_timeout if timeout is None else timeout)
        super().stop(timeout=0)

    # -- serving -----------------------------------------------------------

    def set_handle(self, handle: Handler) -> None:
        """Replace the handler that new connections are given to."""
        _check_handle(handle)
        self._user_handle = handle
        # gevent's own set_handle would drop the TLS wrapping here.
        tls = getattr(self, "ssl_args", None) is not None  # unset while __init__ runs
        self._handle = self.wrap_socket_and_handle if tls else self.handle

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        """Do the TLS handshake within ``slot_line_timeout``, then serve.

        A failed or silent handshake is counted in ``failed`` and the socket
        closed; nothing escapes the connection's greenlet. A drain cuts a
        handshake short (the connection has no request yet) and counts it in
        ``refused``.
        """
        if self._draining:  # accepted just before the drain: no handshake at all
            self._refused += 1
            return None
        # The handshake is done here rather than inside wrap_socket, so that
        # drain() can reach the socket while it is under way.
        ssl_args = {**self.ssl_args, "do_handshake_on_connect": False}
        handshakes = self._handshakes
        try:
            ssl_socket = self.wrap_socket(client_socket, **ssl_args)
        except OSError as exc:
            self._failed += 1
            _log.debug("TLS set-up with %s failed: %r", address, exc)
            return None
        with closing(ssl_socket):
            ssl_socket.settimeout(self._slot_line_timeout)
            handshakes.add(ssl_socket)
            try:
                ssl_socket.do_handshake()
            except OSError as exc:  # ssl.SSLError and timeouts included
                if self._draining:
                    self._refused += 1
                    _log.debug("TLS handshake with %s cut by the drain", address)
                else:
                    self._failed += 1
                    _log.debug("TLS handshake with %s failed: %r", address, exc)
                return None
            finally:
                handshakes.discard(ssl_socket)
            ssl_socket.settimeout(None)
            return self.handle(ssl_socket, address)

    def do_handle(self, *args: Any) -> None:
        """Count the connection from now until :meth:`do_close`, then spawn its greenlet."""
        # Counted before its greenlet even starts, so drain() waits for it too.
        self._live += 1
        self._all_gone.clear()
        super().do_handle(*args)  # calls do_close itself if spawning fails

    def do_close(self, *args: Any) -> None:
        """Close the accepted socket once its greenlet is done, and uncount it."""
        try:
            super().do_close(*args)
        finally:
            self._live -= 1
            if not self._live:
                self._all_gone.set()

    def handle(self, sock: Any, address: Any) -> None:
        """Give ``sock`` a slot, send the slot line, run the user's handler."""
        if self._draining:
            self._refused += 1
            _log.debug("refusing %s: draining", address)
            return
        if self._max_connections is not None and self._active >= self._max_connections:
            self._refused += 1
            _log.debug("refusing %s: %d connections already", address, self._active)
            return
        # Nothing between get() and try may yield, or a kill could leak the slot.
        position = self._slots.get()
        self._active += 1
        try:
            if not self._send_slot_line(sock, address, self._slot_for(position)):
                return
            if self._draining:  # began while the slot line was on its way
                self._refused += 1
                return
            self._accepted += 1
            conn = _Connection(self, sock)
            self._conns[sock] = conn
            try:
                self._user_handle(sock, address)
            finally:
                conn.state = _ENDED
                del self._conns[sock]
        except OSError:
            self._errors += 1
            _log.debug("connection from %s failed in its handler", address, exc_info=True)
        except Exception:
            self._errors += 1
            _log.warning("handler for %s raised", address, exc_info=True)
        finally:
            self._active -= 1
            self._slots.put(position)

    def _slot_for(self, position: int) -> int:
        weight = self._weight
        # Integer weights divide exactly, as before "auto" existed.
        slot = position // weight if type(weight) is int else int(position / weight)
        return min(slot, _MAX_SLOT)

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
