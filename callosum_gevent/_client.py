"""CallosumClient: the greenlet-safe, self-balancing connection pool."""

from __future__ import annotations

import logging
import os
import random
import socket
import weakref
from collections.abc import Hashable
from contextlib import suppress
from functools import partial
from numbers import Real
from time import perf_counter
from types import TracebackType
from typing import Any, Final, Protocol, cast

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.monkey import get_original
from greenlet import GreenletExit, getcurrent, greenlet

from ._servers import Server
from ._state import CLOSED, HANDED, IDLE, LEASED, RANKS, RETIRED, Entry, PoolState
from .errors import PoolClosed, PoolTimeout

__all__ = ["CallosumClient"]

_log = logging.getLogger("callosum_gevent")

# The unpatched poll: gevent's would wait on the hub, and a hand-out check
# must neither block nor yield.
_poll = get_original("select", "poll")
_select = get_original("select", ["POLLIN", "POLLPRI", "POLLRDHUP"])
# Readable, urgent data or peer shutdown; POLLERR/POLLHUP/POLLNVAL come anyway.
_DEAD_MASK: Final = _select[0] | _select[1] | _select[2]
_READ: Final = 1  # libev EV_READ

_MAX_SLOT_NUMBER: Final = 2**31 - 1
_INF: Final = float("inf")

# Lease times and connection ages: monotonic, and the cheapest such clock.
_clock = perf_counter
# The OS thread's id, unpatched: monkey-patching makes threading.get_ident
# name the greenlet, and greenlets of one thread share a client.
_get_ident = get_original("_thread", "get_ident")

# What new_connection accepts: the stdlib's and gevent's sockets (TLS ones
# subclass them). Both keep ``_closed`` and ``timeout``, read at each return.
_SOCKET_TYPES: Final = (socket.socket, gsocket.socket)

# Every socket pooled by any client in this process, by its inode: one socket
# offered to two clients would be lent by both at once, and so would copies of
# one made by dup() or fromfd(), which share the inode, not the descriptor.
# Weak, so that a client dropped without close() lets its sockets go as before.
_pooled: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

#: Default connection age, seconds. Long enough that reconnecting costs
#: nothing measurable (one handshake per connection per 5 minutes), short
#: enough that a weight change or a slowdown reaches connections already held,
#: and the start-up lottery of low slots is redrawn, within minutes; gRPC
#: deployments commonly pick minutes for MAX_CONNECTION_AGE for the same reason.
DEFAULT_MAX_AGE: Final = 300.0
# Connection ages vary by this fraction either way, so that connections made
# together (a client's start) do not all age out in the same moment.
_AGE_JITTER: Final = 0.1
# The pool's housekeeping timer: idle connections age out and penalties decay
# on its ticks, at most this many seconds apart (and 20 per max_age).
_TICK_S: Final = 1.0


class _Socket(Protocol):
    @property
    def timeout(self) -> float | None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class _Conn(Entry):
    """A pooled connection: the bookkeeping entry plus its I/O helpers."""

    __slots__ = (
        "born",
        "expires",
        "ident",
        "io",
        "lent_at",
        "lent_time",
        "poll",
        "timeout",
        "wake",
    )

    item: Any
    poll: Any
    io: Any
    wake: Any

    def __init__(
        self, slot: int, sock: _Socket, ident: int, server: Server, max_age: float | None
    ) -> None:
        super().__init__(slot, sock, server)
        self.ident = ident  # the socket's inode: its key in _pooled
        self.lent_at = -1
        self.born = self.lent_time = born = _clock()
        self.expires = (
            born + max_age * (1.0 + _AGE_JITTER * (2.0 * random.random() - 1.0))
            if max_age is not None
            else float("inf")
        )
        # What the pool lends it with: a borrower's settimeout() or
        # setblocking() must not reach the next borrower.
        self.timeout = sock.timeout


class _Waiter:
    """A greenlet waiting in get_connection for a connection to be handed over.

    Reused by later waits once its wait took a connection (see ``_SPARE``),
    with its Event and its timer: ``after`` is the length the timer was made for.
    """

    __slots__ = ("after", "conn", "event", "expired", "timer")

    def __init__(self) -> None:
        self.event = Event()
        self.conn: _Conn | None = None
        self.expired = False
        self.timer: Any = None
        self.after = -1.0


# Waiters kept for reuse per client: a new Event and libev timer per wait cost
# about a tenth of a contended cycle. Only a wait that ended with a connection
# gives its waiter back (unlinked, its timer stopped); one timed out, closed or
# killed is dropped, whatever may still be pending for it in the hub.
_SPARE: Final = 64


def _expire(waiter: _Waiter) -> None:
    # The wait's timer, run by the hub: wake the waiter to time out, unless a
    # connection reached it first (it then keeps the connection).
    waiter.expired = True
    waiter.event.set()


def _evict_idle(client: CallosumClient, conn: _Conn) -> None:
    # The watcher greenlet's body. Its socket's io watcher switches to it when
    # the idle socket turns readable: FIN, RST, an error, or bytes nobody asked
    # for. Any of them makes the connection unfit to lend.
    if conn.state == IDLE:
        client._evicted += 1
        client._fail(conn, "evicted by watcher", evicted=True)


class _Lease:
    """``with client.connection() as sock``: return on success, discard on error.

    Each lease is its own token (``Entry.holder``): at exit it gives back only
    a socket it still holds. If the block gave the socket back itself (or it
    was closed, or the process forked), exit does nothing, even when the
    socket has since been lent to someone else.
    """

    __slots__ = ("_client", "_conn", "_timeout")

    _client: CallosumClient
    _conn: _Conn | None
    _timeout: float | None

    def __enter__(self) -> Any:
        if self._conn is not None:
            raise RuntimeError(
                "this lease is already in use: call client.connection() for each with block"
            )
        client = self._client
        timeout = self._timeout
        # A finite float >= 0 needs no further checks (NaN fails the range).
        if timeout is not None and (type(timeout) is not float or not 0.0 <= timeout < _INF):
            timeout = _check_timeout(timeout)
        # get_connection's fast path, inlined: the with block is the hot path,
        # and it needs the connection, not just its socket.
        conn = client._state.lend()
        if conn is not None and not conn.poll(0):
            conn.io.stop()
            conn.lent_at = client._loop.iteration
            conn.lent_time = _clock()
        else:
            # Taken before waiting: another greenlet entering this lease while
            # this one waits must be refused, not given a socket of its own
            # that this one's exit would then give back.
            self._conn = _ENTERING
            try:
                conn = client._lend_slowly(conn, timeout)
            except BaseException:
                self._conn = None
                raise
        conn.holder = self
        self._conn = conn
        return conn.item

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError("this lease was not entered")
        self._conn = None
        if conn.holder is not self:
            if conn is _ENTERING:
                self._conn = conn  # still the entering greenlet's
                raise RuntimeError("this lease is being entered by another greenlet")
            # Given back or discarded in the block (maybe lent again since),
            # or the parent's after a fork: not ours to give back.
            return
        if exc_type is None:
            # Held by this lease, so LEASED or RETIRED: no need to look it up.
            self._client._give_back(conn)
        else:
            # The protocol state is unknown after an error: never mask the
            # borrower's exception. A killed or interrupted borrower says
            # nothing about the server, so its connection is no early death.
            blame = not issubclass(exc_type, _NOT_THE_SERVERS)
            self._client._discard(conn.item, quiet=True, blame=blame)


_new_lease = object.__new__
# Exceptions that end a lease for the borrower's own reasons: its connection is
# discarded, but not counted against its server.
_NOT_THE_SERVERS: Final = (GreenletExit, KeyboardInterrupt, SystemExit)
# A lease's connection while its __enter__ waits for one (holder None: never ours).
_ENTERING: Final[Any] = Entry(-1, None)

_clients: weakref.WeakSet[CallosumClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _pooled.clear()
    for client in list(_clients):
        client._forget_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _unfit_check(sock: Any, fd: int) -> Any:
    """Return ``check(0)``: truthy when ``sock`` is closed, reset or has stray bytes."""
    poll = _poll()
    poll.register(fd, _DEAD_MASK)
    pending = getattr(sock, "pending", None)
    if not callable(pending):
        return poll.poll
    # TLS: stray bytes may sit decrypted in the SSL object, out of poll's sight.
    check = poll.poll

    def check_tls(timeout: int) -> Any:
        return check(timeout) or pending()

    return check_tls


def _check_timeout(timeout: object) -> float | None:
    # int and float first: the abstract Real check (numpy's numbers, Fraction) is slower.
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, Real)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    number = cast(float, timeout)  # a real number: it compares and converts like one
    if not number >= 0:
        raise ValueError(f"timeout must be >= 0, not {timeout!r}")
    try:
        seconds = float(number)
    except OverflowError:
        raise ValueError("timeout is too large; use None to wait without limit") from None
    return None if seconds == float("inf") else seconds


def _tick(ref: weakref.ref[CallosumClient], timer: Any) -> None:
    # The pool's housekeeping timer, run by the hub. It holds the client
    # weakly, so that a client dropped without close() is still collected.
    client = ref()
    if client is None:
        timer.close()
    else:
        client._housekeep()


def _check_max_age(max_age: object) -> float | None:
    if max_age is None:
        return None
    if isinstance(max_age, bool) or not isinstance(max_age, (int, float)):
        raise TypeError(f"max_age must be a number or None, not {type(max_age).__name__}")
    if not 0 < max_age < float("inf"):
        raise ValueError(f"max_age must be > 0 and finite, or None, not {max_age!r}")
    return float(max_age)


def _check_positive_int(name: str, value: object, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1 or (most is not None and value > most):
        bounds = f"between 1 and {most}" if most is not None else ">= 1"
        raise ValueError(f"{name} must be {bounds}, not {value!r}")
    return value


class CallosumClient:
    """A pool of at most ``max_slots`` connections that lends the fastest first.

    Connections come from a rover (or any code) through :meth:`new_connection`.
    Borrowers take the idle connection with the lowest rank with
    :meth:`get_connection` or :meth:`connection` and hand it back with
    :meth:`return_connection`, or :meth:`discard_connection` if it is broken.

    With ``rank="latency"`` (the default) a connection's rank is (slot + 1)
    x its server's decaying average lease time (lend to return); a server not
    yet measured ranks as the mean of the measured ones, and each connection
    to it that died within seconds of admission doubles its rank, a doubling
    that halves every 30 s. Among one server's connections the lowest slot is
    lent first. ``rank="slot"`` lends by lowest slot alone.

    A connection older than ``max_age`` seconds (jittered by +-10%) is closed
    when handed back or while idle, so that the rover replaces it: new slots
    and speeds reach connections already held. ``max_age=None`` keeps
    connections for as long as they live.

    Every idle connection is watched: if its peer closes or resets it, or sends
    bytes nobody asked for, it is closed and its slot freed on the hub's next
    turn. At hand-out a non-blocking ``poll`` refuses one whose FIN or RST has
    already arrived.

    A client belongs to the hub of the OS thread that created it; all of its
    methods run without yielding between reading and updating the
    bookkeeping, so greenlets share it without locks, but threads must not:
    offering a connection or waiting for one from another thread raises
    :class:`RuntimeError` (lending and returning are not checked, to keep
    them cheap). In a forked child the client starts empty, with its counters
    at zero; the parent's connections are closed in the child, never lent.

    Pooled TCP sockets get keepalive (``keepalive_idle`` seconds of silence,
    then ``keepalive_count`` probes ``keepalive_interval`` seconds apart), so
    a peer that vanishes without FIN or RST is found dead within
    ``idle + interval * count`` seconds (25 s by default); ``keepalive=False``
    leaves sockets as they are.
    """

    def __init__(
        self,
        max_slots: int = 100,
        *,
        keepalive: bool = True,
        keepalive_idle: int = 10,
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        max_slot_number: int = _MAX_SLOT_NUMBER,
        rank: str = "latency",
        max_age: float | None = DEFAULT_MAX_AGE,
    ) -> None:
        _check_positive_int("max_slots", max_slots)
        # The kernel's own limits (include/net/tcp.h: MAX_TCP_KEEPIDLE and co.).
        _check_positive_int("keepalive_idle", keepalive_idle, 32767)
        _check_positive_int("keepalive_interval", keepalive_interval, 32767)
        _check_positive_int("keepalive_count", keepalive_count, 127)
        _check_positive_int("max_slot_number", max_slot_number)
        if not isinstance(keepalive, bool):
            raise TypeError(f"keepalive must be a bool, not {type(keepalive).__name__}")
        if not isinstance(rank, str):
            raise TypeError(f"rank must be a str, not {type(rank).__name__}")
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, not {rank!r}")
        self._max_age = _check_max_age(max_age)
        self._rank = rank
        self._max_slots = max_slots
        self._keepalive = (
            (keepalive_idle, keepalive_interval, keepalive_count) if keepalive else None
        )
        self._max_slot_number = max_slot_number
        self._hub = gevent.get_hub()
        self._loop = self._hub.loop
        # The hub is per OS thread: the thread's id tells a foreign caller cheaply.
        self._thread = _get_ident()
        self._state: PoolState[_Conn, _Waiter] = PoolState(max_slots, rank)
        # Every connection this client owns, idle or lent, by its socket.
        self._conns: dict[Any, _Conn] = {}
        self._spare: list[_Waiter] = []
        self._closed = False
        self._zero_counters()
        self._ticker: Any = None
        self._start_ticker()
        _clients.add(self)

    def _zero_counters(self) -> None:
        self._kept = self._turned_down = self._replaced = 0
        self._evicted = self._dead_at_handout = self._dead_at_return = 0
        self._discarded = self._waits = self._timeouts = 0
        self._early_deaths = self._retired = self._aged_out = 0

    def _check_thread(self) -> None:
        if _get_ident() != self._thread:
            raise RuntimeError(
                "a CallosumClient belongs to the OS thread (and gevent hub) that made it; "
                "create one client per thread"
            )

    def _start_ticker(self) -> None:
        # One timer per pool, not per connection: ages are checked and penalties
        # decay on its ticks. Unreferenced: an idle pool never keeps the hub alive.
        if self._max_age is None and self._rank == "slot":
            return
        every = _TICK_S if self._max_age is None else min(_TICK_S, self._max_age / 20)
        self._ticker = timer = self._loop.timer(every, every)
        timer.ref = False
        timer.start(_tick, weakref.ref(self), timer)

    def _housekeep(self) -> None:
        # A tick: retire idle connections past their age, let penalties decay.
        now = _clock()
        self._state.tick(now)
        if self._max_age is None:
            return
        state = self._state
        for conn in [c for c in self._conns.values() if c.state == IDLE and now >= c.expires]:
            self._aged_out += 1
            if state.retire(conn):
                self._close(conn)
                _log.debug("closed slot %d: aged out", conn.slot)

    # -- properties --------------------------------------------------------

    @property
    def max_slots(self) -> int:
        """The most connections this client keeps."""
        return self._max_slots

    @property
    def slot_count(self) -> int:
        """Connections holding a slot, idle or lent (retired ones do not)."""
        return self._state.slot_count

    @property
    def idle_count(self) -> int:
        """Connections waiting in the pool to be lent."""
        return self._state.idle_count

    @property
    def leased_count(self) -> int:
        """Connections lent out, retired ones included."""
        return self._state.leased_count

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    # -- offering ----------------------------------------------------------

    def new_connection(self, slot: int, sock: Any, *, server: Hashable = None) -> bool:
        """Keep ``sock`` (True) or close it (False), as its ``slot`` merits.

        Below ``max_slots`` every connection is kept. At ``max_slots`` one
        is kept only if its slot is lower than the highest slot held, and that
        highest one is retired: closed now if idle, or when handed back. At an
        equal slot (with ``rank="latency"``) the offer wins only if the held
        one's server was measured and the offered server was measured at least
        1.25x faster, or not yet measured and never penalised: so a client with
        one slot tries each server once and keeps the faster.
        ``server`` names the server ``sock`` is connected to (any hashable id,
        as a rover knows it); by default its peer address, ``"host:port"``.
        A bad argument raises and leaves ``sock`` open for the caller: not a
        socket (a ``makefile()`` object, say), closed, not connected, not a
        stream socket, or already pooled by this or another client (itself or
        a copy of it from ``dup()`` or ``fromfd()``).
        """
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int, not {type(slot).__name__}")
        if not 0 <= slot <= self._max_slot_number:
            raise ValueError(f"slot must be between 0 and {self._max_slot_number}, not {slot}")
        if not isinstance(sock, _SOCKET_TYPES):
            raise TypeError(f"sock must be a socket, not {type(sock).__name__}")
        self._check_thread()
        try:
            fd = sock.fileno()
        except OSError:
            raise ValueError("sock is closed") from None
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError(f"sock.fileno() must return an int, not {type(fd).__name__}")
        if getattr(sock, "_closed", False) or fd < 0:
            raise ValueError("sock is closed")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"sock must be a stream socket, not {sock.type!r}")
        if sock in self._conns:
            raise ValueError("sock is already pooled by this client")
        try:
            ident = os.fstat(fd).st_ino
        except OSError:  # a subclass's fileno() naming no open descriptor
            raise ValueError("sock is closed") from None
        other = _pooled.get(ident)
        if other is not None and not other._closed:
            whose = "this" if other in self._conns else "another"
            raise ValueError(f"sock is already pooled by {whose} client (it or a dup() of it)")
        try:
            hash(server)
        except TypeError:
            raise TypeError(f"server must be hashable, not {type(server).__name__}") from None
        try:
            peer = sock.getpeername()
        except OSError:
            raise ValueError("sock is not connected") from None
        if server is None:
            server = _peer_name(peer)
        if self._closed:
            _close_quietly(sock)
            self._turned_down += 1
            return False
        # Before admitting it, so that nothing here can strand a counted slot.
        self._set_keepalive(sock)
        conn = _Conn(slot, sock, ident, self._state.server(server), self._max_age)
        kept, displaced = self._state.admit(conn)
        if not kept:
            self._turned_down += 1
            _log.debug("turned down slot %d of %r", slot, server)
            _close_quietly(sock)
            return False
        self._kept += 1
        _pooled[ident] = sock
        conn.poll = _unfit_check(sock, fd)
        conn.io = io = self._loop.io(fd, _READ)
        # An idle pool must not keep the hub alive on its own.
        io.ref = False
        # The watcher greenlet: started by the io watcher only if the socket
        # turns readable while idle, so lending and returning never switch to it.
        conn.wake = greenlet(partial(_evict_idle, self, conn), self._hub).switch
        self._conns[sock] = conn
        if displaced is not None:
            self._replaced += 1
            _log.debug(
                "slot %d of %r replaces slot %d of %r",
                slot,
                server,
                displaced.slot,
                displaced.server.id,
            )
            if displaced.state != RETIRED:
                # Idle or on its way to a waiter: the bookkeeping already let it go.
                self._close(displaced)
        else:
            _log.debug("kept slot %d of %r", slot, server)
        self._release(conn)
        return True

    def _set_keepalive(self, sock: Any) -> None:
        if self._keepalive is None:
            return
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            idle, interval, count = self._keepalive
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        except (AttributeError, OSError) as exc:
            # Not a TCP socket, or a platform without these options.
            _log.debug("keepalive not set on %r: %s", sock, exc)

    # -- lending -----------------------------------------------------------

    def get_connection(self, timeout: float | None = None) -> Any:
        """Lend the idle connection with the lowest rank, waiting if none is idle.

        ``timeout=None`` waits without limit and ``0`` does not wait. Raise
        :class:`PoolTimeout` when time runs out, :class:`PoolClosed` when the
        client is or becomes closed. Waiters are served first come, first served.
        """
        if timeout is not None and (type(timeout) is not float or not 0.0 <= timeout < _INF):
            timeout = _check_timeout(timeout)
        conn = self._state.lend()
        if conn is not None and not conn.poll(0):
            conn.io.stop()
            conn.lent_at = self._loop.iteration
            conn.lent_time = _clock()
            return conn.item
        return self._lend_slowly(conn, timeout).item

    def _lend_slowly(self, conn: _Conn | None, timeout: float | None) -> _Conn:
        # The slow path of lending: ``conn`` was found dead at hand-out (or is
        # None); skip any other dead ones, else wait. The caller sets the holder.
        if conn is not None:
            self._dead_at_handout += 1
            self._fail(conn, "found dead at hand-out")
            taken = self._take_idle()
            if taken is not None:
                return taken
        # None: lend() found the idle heap empty, so waiting is all that is left.
        return self._wait(timeout)

    def _take_idle(self) -> _Conn | None:
        # Skip idle connections found dead; lend the first live one.
        while (conn := self._state.lend()) is not None:
            if not conn.poll(0):
                conn.io.stop()
                conn.lent_at = self._loop.iteration
                conn.lent_time = _clock()
                return conn
            self._dead_at_handout += 1
            self._fail(conn, "found dead at hand-out")
        return None

    def connection(self, timeout: float | None = None) -> _Lease:
        """Lend a connection for a ``with`` block; discard it if the block raises.

        At exit the block gives back only the socket it still holds: if it
        already returned or discarded the socket itself, exit does nothing,
        even if the socket was lent to someone else meanwhile. A lease is
        entered by one ``with`` at a time (else :class:`RuntimeError`). A block
        ended by GreenletExit (a killed borrower), KeyboardInterrupt or
        SystemExit discards the socket without counting it against its server.
        """
        # object.__new__ and three stores cost less than a call to an __init__.
        lease = _new_lease(_Lease)
        lease._client = self
        lease._timeout = timeout
        lease._conn = None
        return lease

    def return_connection(self, sock: Any) -> None:
        """Hand back a lent connection: pool it, or close it if it is unfit.

        A socket not lent from this client (foreign, idle, or already handed
        back and not lent again) raises :class:`ValueError` and changes nothing.
        A stale return after the socket was lent again cannot be told from a
        real one (the socket is not tied to a borrower): prefer
        :meth:`connection`, whose leases can. A socket closed by its borrower
        is dropped, and one whose timeout or blocking mode the borrower changed
        gets the pool's back. One half-closed with ``shutdown(SHUT_WR)`` is not
        seen (the check would cost a system call per return): it is dropped
        once its peer closes in turn, else its next borrower's send fails.
        """
        try:
            conn = self._conns.get(sock)
        except TypeError:
            conn = self._lent(sock)  # raises, naming the argument
        if conn is None or not LEASED <= conn.state <= RETIRED:
            raise ValueError(_not_lent(conn))
        self._give_back(conn)

    def _give_back(self, conn: _Conn) -> None:
        # return_connection once the socket is known to be lent: LEASED or RETIRED.
        if conn.state == RETIRED:
            self._measure(conn, _clock())
            self._drop(conn, "retired")
            return
        sock = conn.item
        if self._closed:
            self._drop(conn, "client closed")
            return
        if sock._closed:
            # Closed by its borrower; gevent defers the real close while a
            # makefile() object lives, so the descriptor may still be open.
            self._dead_at_return += 1
            self._fail(conn, "closed by its borrower")
            return
        if sock.timeout is not conn.timeout and sock.timeout != conn.timeout:
            sock.settimeout(conn.timeout)
        # Given back: a with block that still names this lease must not give it
        # back again. Cleared here and in _drop, the holder is None whenever a
        # connection is idle or handed over, so lending need not clear it.
        conn.holder = None
        state = self._state
        if (
            # With a waiter queued, it checks the connection when it wakes: one
            # poll, not two. Checked at hand-out in this same turn of the hub
            # (lent_at is -1 until first lent): the FIN a poll could find now
            # would also be found at the next hand-out, and the watcher acts on
            # it within a turn, so save the system call.
            not state.waiters and conn.lent_at != self._loop.iteration and conn.poll(0)
        ):
            self._dead_at_return += 1
            self._fail(conn, "found dead at return")
            return
        now = _clock()
        if now >= conn.expires:
            self._measure(conn, now)
            self._age_out(conn)
            return
        waiter = state.release(conn, now - conn.lent_time)
        if waiter is None:
            conn.io.start(conn.wake)
        else:
            waiter.conn = conn
            waiter.event.set()

    def _measure(self, conn: _Conn, now: float) -> None:
        # Record a lease that ended at ``now``; re-key its server if it moved.
        if conn.server.lease(now - conn.lent_time):
            self._state.rekey(conn.server)

    def _age_out(self, conn: _Conn) -> None:
        # A lent connection handed back past its age: give up its slot, close it.
        self._aged_out += 1
        self._state.retire(conn)
        self._drop(conn, "aged out")

    def discard_connection(self, sock: Any) -> None:
        """Close a lent connection that is broken or mid-protocol, freeing its slot.

        A socket not lent from this client raises :class:`ValueError`.
        """
        self._discard(sock, quiet=False)

    def _lent(self, sock: Any) -> _Conn | None:
        try:
            return self._conns.get(sock)
        except TypeError:  # unhashable: certainly not one of ours
            raise TypeError(f"sock must be a socket, not {type(sock).__name__}") from None

    def _discard(self, sock: Any, *, quiet: bool, blame: bool = True) -> None:
        conn = self._lent(sock)
        if conn is None or conn.state < LEASED:
            if quiet:
                return
            raise ValueError(_not_lent(conn))
        self._discarded += 1
        if blame:
            server = conn.server
            took = _clock() - conn.lent_time
            # Cut short (a Timeout, say) after longer than its server's
            # average: a lower bound on that server's time, so a server that
            # stalls is seen slow. A quick failure proves no speed.
            if server.measured and took > server.avg and server.cut(took):
                self._state.rekey(server)
            self._fail(conn, "discarded")
        else:
            self._drop(conn, "discarded: borrower killed or interrupted")

    # -- waiting -----------------------------------------------------------

    def _release(self, conn: _Conn) -> None:
        # Hand a LEASED connection to the longest waiter (HANDED: in transit
        # until the waiter wakes, nobody may return or discard it), or make it idle.
        waiter = self._state.release(conn)
        if waiter is None:
            conn.io.start(conn.wake)
        else:
            waiter.conn = conn
            waiter.event.set()

    def _wait(self, timeout: float | None) -> _Conn:
        if self._closed:
            raise PoolClosed("client is closed")
        if timeout == 0:
            self._timeouts += 1
            raise PoolTimeout("no idle connection")
        # Waiting needs this thread's hub: from another thread it would end in LoopExit.
        if _get_ident() != self._thread:
            self._check_thread()
        self._waits += 1
        spare = self._spare
        waiter = spare.pop() if spare else _Waiter()
        event = waiter.event
        # One timer for the whole wait, setting the same Event as a handover:
        # a gevent.Timeout per Event.wait() would cost more than the wait.
        timer = waiter.timer
        if timeout is not None:
            if waiter.after != timeout:
                if timer is not None:
                    timer.close()
                waiter.timer = timer = self._loop.timer(timeout)
                waiter.after = timeout
            # From the current time: the loop's cached time is stale after
            # CPU-bound work in this greenlet, and the wait would be cut short.
            timer.start(_expire, waiter, update=True)
        # Queued only now: a timer that could not be made (a destroyed loop)
        # must not leave a waiter that nobody is, to be handed a connection.
        # self._state, not a local: a fork while waiting replaces it.
        self._state.enqueue(waiter)
        # Event.wait() without its wrapping (hub capture, a dummy Timeout, the
        # return value): link this greenlet and sleep in the hub until set()
        # switches back. The notifier unlinks it before switching; every
        # other way out unlinks it here.
        switch = getcurrent().switch
        hub_switch = self._hub.switch
        try:
            while True:
                event.rawlink(switch)
                if hub_switch() is not event:
                    event.unlink(switch)  # not woken by the Event: check anyway
                event.clear()
                conn = waiter.conn
                if conn is not None:
                    waiter.conn = None
                    taken = self._vet_handed(conn)
                    if taken is None:
                        taken = self._take_idle()
                    if taken is not None:
                        break
                    # It went bad on the way: wait again at the head of the
                    # queue, where this waiter already stood.
                    self._state.enqueue(waiter, first=True)
                if self._closed:
                    raise PoolClosed("client was closed while waiting")
                if waiter.expired:
                    self._timeouts += 1
                    raise PoolTimeout(f"no connection became free within {timeout} s")
        except BaseException:
            # Timed out, closed, killed or interrupted by an outer Timeout: leave
            # the queue, and pass on a connection handed over meanwhile.
            event.unlink(switch)
            if timer is not None:
                timer.close()
            self._state.cancel(waiter)
            conn = waiter.conn
            if conn is not None:
                waiter.conn = None
                # Not HANDED: closed on its way (retired, or the parent's after a fork).
                if conn.state == HANDED:
                    if self._closed:
                        self._drop(conn, "not taken")
                    else:
                        self._release(conn)
            raise
        # Served: nothing can set the Event any more (the timer stops here and
        # the waiter is out of the queue), so the next wait may use it as new.
        if timer is not None:
            timer.stop()
        waiter.expired = False
        spare = self._spare  # not the local: a fork while waiting replaced it
        if len(spare) < _SPARE:
            spare.append(waiter)
        return taken

    def _vet_handed(self, conn: _Conn) -> _Conn | None:
        # Check a connection handed over while this waiter slept; None if unfit.
        if conn.state != HANDED:
            pass  # closed on its way: retired, or the parent's after a fork
        elif self._closed:
            self._drop(conn, "client closed")
        elif conn.poll(0):
            self._dead_at_handout += 1
            self._fail(conn, "found dead at hand-out")
        else:
            conn.state = LEASED  # taken by the waiter: HANDED -> LEASED
            conn.lent_at = self._loop.iteration
            conn.lent_time = _clock()
            return conn
        return None

    # -- closing -----------------------------------------------------------

    def _fail(self, conn: _Conn, why: str, *, evicted: bool = False) -> None:
        # Found dead or discarded: count it against its server, then drop it.
        now = _clock()
        if conn.server.died(now - conn.born, evicted=evicted):
            self._early_deaths += 1
            # Died young: its server must not become everyone's lowest rank.
            self._state.penalise(conn.server, now)
        self._drop(conn, why)

    def _drop(self, conn: _Conn, why: str) -> None:
        conn.holder = None
        self._state.remove(conn)
        self._close(conn)
        _log.debug("closed slot %d of %r: %s", conn.slot, conn.server.id, why)

    def _close(self, conn: _Conn) -> None:
        # Stop watching before closing: libev must never watch a closed fd.
        # A loop destroyed with its hub watches nothing any more.
        with suppress(ValueError):
            conn.io.stop()
            conn.io.close()
        conn.wake = None
        self._conns.pop(conn.item, None)
        if _pooled.get(conn.ident) is conn.item:
            del _pooled[conn.ident]
        _close_quietly(conn.item)

    def close(self) -> None:
        """Close idle connections and wake waiters with :class:`PoolClosed`.

        Connections still lent are closed when handed back. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            # Its loop may have been destroyed with the hub: nothing to stop then.
            with suppress(ValueError):
                ticker.close()
        for conn in self._state.idle_entries():
            self._drop(conn, "client closed")
        while (waiter := self._state.dequeue()) is not None:
            waiter.event.set()
        _clients.discard(self)

    def _forget_inherited(self) -> None:
        # In a forked child: the parent's connections are not ours to use. Close
        # our copies of the descriptors (the parent's stay open: no shutdown()),
        # and start afresh with the same settings.
        # Marked CLOSED, so a with block, a waiter or a late return that still
        # holds one lets it go quietly, and a reused descriptor number never
        # lends it. The waiters stay queued, for the child's own connections.
        for conn in list(self._conns.values()):
            conn.state = CLOSED
            conn.holder = None
            conn.io.stop()
            _close_quietly(conn.item)
        waiters = self._state.waiters
        self._hub = gevent.get_hub()
        self._loop = self._hub.loop
        self._thread = _get_ident()
        self._conns = {}
        # Made for the parent's loop: the child's waits make their own.
        self._spare = []
        self._state = PoolState[_Conn, _Waiter](self._max_slots, self._rank)
        self._state.waiters = waiters
        self._zero_counters()
        if self._ticker is not None:
            self._ticker.close()
            self._start_ticker()

    def retire_server(self, server: Hashable) -> int:
        """Retire every connection to ``server``; return how many.

        Idle ones are closed now, lent ones when handed back; their slots are
        free at once. A server this client does not know returns 0.
        """
        try:
            known = self._state.servers.get(server)
        except TypeError:
            raise TypeError(f"server must be hashable, not {type(server).__name__}") from None
        if known is None:
            return 0
        count = 0
        for conn in list(known.entries):
            if conn.state >= RETIRED:
                continue  # already retired: it is closed when handed back
            count += 1
            if self._state.retire(conn):
                self._close(conn)
        self._retired += count
        if count:
            _log.debug("retired %d connections to %r", count, server)
        return count

    def ready(self) -> bool:
        """Tell whether the client is open and holds at least one live connection."""
        return not self._closed and self._state.slot_count > 0

    def __enter__(self) -> CallosumClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reporting ---------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Return the counters and the current idle, leased and waiting counts.

        ``aged_out`` counts connections closed for reaching ``max_age``.
        """
        return {
            "kept": self._kept,
            "turned_down": self._turned_down,
            "replaced": self._replaced,
            "evicted": self._evicted,
            "dead_at_handout": self._dead_at_handout,
            "dead_at_return": self._dead_at_return,
            "discarded": self._discarded,
            "early_deaths": self._early_deaths,
            "retired": self._retired,
            "aged_out": self._aged_out,
            "waits": self._waits,
            "timeouts": self._timeouts,
            "slots": self._state.slot_count,
            "idle": self._state.idle_count,
            "leased": self._state.leased_count,
            "waiting": len(self._state.waiters),
        }

    def server_stats(self) -> dict[Hashable, dict[str, int | float | None]]:
        """Break connections, leases and failures down by server id.

        Per server: ``connections`` holding a slot, ``idle``, ``leased``
        (retired ones included), ``latency_ms`` (decaying average lease time,
        None until a lease was returned; a lease discarded after longer than
        the average counts too, not in ``leases_total``), ``leases_total`` (leases handed back),
        ``errors_total`` (found dead at hand-out or return, or discarded; not
        when a ``with`` block ended by GreenletExit, KeyboardInterrupt or SystemExit),
        ``evictions_total`` (closed by its watcher while idle),
        ``early_deaths_total`` (errors and evictions within a few seconds of
        admission) and ``retired_total`` (given up on purpose: replaced by a
        lower or equal slot, retired, or aged out).
        """
        return self._state.server_stats()

    def __repr__(self) -> str:
        state = self._state
        closed = " closed" if self._closed else ""
        return (
            f"<CallosumClient{closed} slots={state.slot_count}/{self._max_slots} "
            f"idle={state.idle_count} leased={state.leased_count} waiting={len(state.waiters)}>"
        )


def _peer_name(peer: Any) -> str:
    """Name a connection's server by its peer address: ``host:port``, ``[v6]:port``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "unknown"


def _not_lent(conn: _Conn | None) -> str:
    if conn is None:
        return "sock is not lent from this client"
    if conn.state == HANDED:
        return "sock is not lent: it was handed back and is on its way to a waiter"
    return "sock is not lent: it is idle in the pool (handed back twice?)"


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except (OSError, ValueError) as exc:  # ValueError: gevent's, once its loop was destroyed
        _log.debug("error closing %r: %s", sock, exc)
