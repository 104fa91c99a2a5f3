"""The pools we compare against, and loopback socket helpers shared by the benchmarks.

* ``LifoPool``: the hand-written pool most gevent code uses, a ``gevent.queue.LifoQueue``
  of sockets, raw (``get``/``put``) or as a small context manager (``connection``).
* ``CheckedLifoPool``: the same with a checkout liveness check, a dead socket
  dropped: redis-py's (a non-blocking ``MSG_PEEK`` recv, ``is_dead``) or
  urllib3's (a fresh ``select.poll`` with timeout 0, ``is_readable``).
* ``gsocketpool_pool``: gsocketpool 0.1.6 (``with pool.connection()``).
* ``SemaphoreDequePool``: stands in for geventconnpool 0.2.1 (labelled
  ``geventconnpool*``), which does not import on Python 3: our own
  implementation of the algorithm its pool uses.
* ``EventFloorPool`` and ``SwitchFloorPool``: reference rows, not peers. Minimal
  strict-FIFO pools with direct hand-off, showing what fairness itself costs on
  the machine: ``floor: Event + poll + timer`` keeps what the client keeps
  (waiting on an ``Event``, a per-wait timer, the hand-out check),
  ``floor: raw greenlet switch`` drops all of it.
"""

from __future__ import annotations

import select
import socket as stdsocket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol, TypeAlias

import gevent
from gevent import getcurrent, socket
from gevent.event import Event
from gevent.lock import BoundedSemaphore
from gevent.queue import LifoQueue

from callosum_gevent import CallosumClient
from callosum_gevent._slotline import read_slot_line

Sock: TypeAlias = socket.socket
Address = tuple[str, int]
PEEK = stdsocket.MSG_PEEK | stdsocket.MSG_DONTWAIT


def is_dead(sock: Sock) -> bool:
    """Non-blocking ``MSG_PEEK``: has the peer closed ``sock``? (redis-py's check)."""
    try:
        return bool(sock._sock.recv(1, PEEK) == b"")
    except BlockingIOError:
        return False
    except OSError:
        return True


def open_slotted(address: Address) -> tuple[int, Sock]:
    """Connect to a slot-line server; return ``(slot, socket)``."""
    sock = socket.create_connection(address)
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    return read_slot_line(sock, timeout=10.0), sock


def open_many(address: Address, n: int, concurrency: int = 50) -> list[tuple[int, Sock]]:
    """Open ``n`` slotted connections, ``concurrency`` at a time, in slot order."""
    out: list[tuple[int, Sock]] = []
    for start in range(0, n, concurrency):
        jobs = [gevent.spawn(open_slotted, address) for _ in range(min(concurrency, n - start))]
        out += [job.get() for job in jobs]
    return sorted(out, key=lambda pair: pair[0])


def loopback_pairs(n: int) -> tuple[list[Sock], list[Sock]]:
    """Return ``n`` connected loopback TCP pairs as (client ends, server ends)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    accepted: list[Sock] = []

    def accept() -> None:
        while len(accepted) < n:
            accepted.append(listener.accept()[0])

    acceptor = gevent.spawn(accept)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(n)]
    acceptor.join()
    listener.close()
    return clients, accepted


def is_readable(sock: Sock) -> bool:
    """urllib3's ``is_connection_dropped``: anything to read (EOF included) means dropped."""
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


def filled_client(socks: list[Sock]) -> CallosumClient:
    """A ``CallosumClient`` holding ``socks`` as slots 0, 1, 2, ..."""
    client = CallosumClient(max_slots=len(socks))
    for slot, sock in enumerate(socks):
        assert client.new_connection(slot, sock)
    return client


class _Pool(Protocol):
    def get(self, timeout: float | None = None) -> Sock: ...
    def put(self, sock: Sock) -> None: ...


class _Lease:
    """``with pool.connection() as sock:`` for the queue and floor pools, as a plain class."""

    __slots__ = ("_pool", "_sock", "_timeout")

    def __init__(self, pool: _Pool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout

    def __enter__(self) -> Sock:
        self._sock = self._pool.get(self._timeout)
        return self._sock

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._pool.put(self._sock)


class LifoPool:
    """A ``LifoQueue`` of sockets: the usual hand-written gevent pool."""

    def __init__(self, socks: Iterable[Sock]) -> None:
        self._queue: LifoQueue[Sock] = LifoQueue()
        for sock in socks:
            self._queue.put(sock)

    def get(self, timeout: float | None = None) -> Sock:
        sock: Sock = self._queue.get(timeout=timeout)
        return sock

    def put(self, sock: Sock) -> None:
        self._queue.put(sock)

    def connection(self, timeout: float | None = None) -> _Lease:
        return _Lease(self, timeout)


class CheckedLifoPool(LifoPool):
    """``LifoPool`` that checks liveness at checkout and drops dead sockets."""

    def __init__(self, socks: Iterable[Sock], dead: Callable[[Sock], bool] = is_dead) -> None:
        super().__init__(socks)
        self._dead = dead

    def get(self, timeout: float | None = None) -> Sock:
        while True:
            sock = super().get(timeout)
            if not self._dead(sock):
                return sock
            sock.close()


def gsocketpool_pool(socks: Iterable[Sock]) -> Any:
    """A gsocketpool ``Pool`` over already connected sockets."""
    from gsocketpool import Connection, Pool  # type: ignore[import-untyped]

    class Loopback(Connection):  # type: ignore[misc]
        def __init__(self, sock: Sock) -> None:
            self.sock = sock

        def open(self) -> None:
            pass

        def close(self) -> None:
            self.sock.close()

        def get(self) -> Sock:
            return self.sock

        def is_connected(self) -> bool:
            return True

    pending = list(socks)
    return Pool(
        lambda: Loopback(pending.pop()),
        initial_connections=len(pending),
        max_connections=len(pending),
        reap_expired_connections=False,
    )


class SemaphoreDequePool:
    """The algorithm of geventconnpool 0.2.1's pool, written afresh: the ``geventconnpool*`` row.

    The published package does not import on Python 3 (``from pool import ...``,
    ``gevent.coros``, ``xrange``), so the benchmark measures this stand-in. A
    bounded semaphore holds one permit per free connection, so a borrower waits
    only when all are out; the free connections sit in a deque, taken from the
    left and put back on the right, so they are used in turn. Nothing checks a
    connection's health at checkout. If the ``with`` block raises one of
    ``broken`` the connection is closed and its permit stays taken (geventconnpool
    releases it once a replacement has been opened; the benchmark never breaks
    one); any other exception puts the connection back as usual.
    """

    def __init__(
        self, socks: Iterable[Sock], broken: tuple[type[BaseException], ...] = (OSError,)
    ) -> None:
        self._free: deque[Sock] = deque(socks)
        self._permits = BoundedSemaphore(len(self._free))
        self._broken = broken

    @contextmanager
    def connection(self) -> Iterator[Sock]:
        """Lend the connection that has been free longest, for a ``with`` block."""
        self._permits.acquire()
        sock = self._free.popleft()
        healthy = True
        try:
            yield sock
        except self._broken:
            healthy = False
            sock.close()
            raise
        finally:
            if healthy:
                self._free.append(sock)
                self._permits.release()


FLOOR_EVENT = "floor: Event + poll + timer"
FLOOR_SWITCH = "floor: raw greenlet switch"


class _FloorWaiter:
    """A greenlet waiting in ``EventFloorPool.get``."""

    __slots__ = ("event", "expired", "sock")

    def __init__(self) -> None:
        self.event = Event()
        self.sock: Sock | None = None
        self.expired = False


def _expire(waiter: _FloorWaiter) -> None:
    # The wait's timer, run by the hub: wake the waiter to time out unless a
    # socket reached it first.
    waiter.expired = True
    waiter.event.set()


class EventFloorPool:
    """Floor (a): the least a fair pool that waits on an ``Event`` can do.

    Strict FIFO with direct hand-off: ``put`` gives the socket to the longest
    waiter, so the returning greenlet cannot take it back. A waiter sleeps on a
    ``gevent.event.Event`` of its own, with one libev timer per wait (a timeout,
    as the client's waits have). Every hand-out, from idle or handed over, runs
    a non-blocking ``poll`` on the socket and closes it if it is readable
    (EOF, reset or stray bytes). No heaps (idle sockets are a list, waiters a
    deque), no idle watchers, no statistics: the client's fairness, Event,
    timer and check with none of its bookkeeping.
    """

    def __init__(self, socks: Iterable[Sock]) -> None:
        self._idle: list[Sock] = []
        self._polls: dict[Sock, Any] = {}
        self._waiters: deque[_FloorWaiter] = deque()
        self._loop = gevent.get_hub().loop
        for sock in socks:
            poll = select.poll()
            poll.register(sock, select.POLLIN)
            self._polls[sock] = poll
            self._idle.append(sock)

    def _fit(self, sock: Sock) -> bool:
        # The hand-out check: readable means dead or out of step, never lend it.
        if self._polls[sock].poll(0):
            del self._polls[sock]
            sock.close()
            return False
        return True

    def get(self, timeout: float | None = None) -> Sock:
        """Lend an idle socket, or wait first come, first served; ``TimeoutError`` at the end."""
        sock = self._take_idle()
        return sock if sock is not None else self._wait(timeout)

    def _take_idle(self) -> Sock | None:
        idle = self._idle
        while idle:
            sock = idle.pop()
            if self._fit(sock):
                return sock
        return None

    def _wait(self, timeout: float | None) -> Sock:
        waiter = _FloorWaiter()
        self._waiters.append(waiter)
        timer = None
        if timeout is not None:
            timer = self._loop.timer(timeout)
            timer.start(_expire, waiter)
        try:
            while True:
                waiter.event.wait()
                waiter.event.clear()
                sock = waiter.sock
                if sock is not None:
                    waiter.sock = None
                    if self._fit(sock):
                        return sock
                    # Dead on the way: take an idle one or wait again, still first.
                    sock = self._take_idle()
                    if sock is not None:
                        return sock
                    self._waiters.appendleft(waiter)
                if waiter.expired:
                    raise TimeoutError(f"no socket became free within {timeout} s")
        except BaseException:
            # Timed out or killed: leave the queue, pass on a socket handed over meanwhile.
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if waiter.sock is not None:
                self.put(waiter.sock)
                waiter.sock = None
            raise
        finally:
            if timer is not None:
                timer.close()

    def put(self, sock: Sock) -> None:
        """Hand ``sock`` to the longest waiter, or make it idle."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.sock = sock
            waiter.event.set()
        else:
            self._idle.append(sock)

    def connection(self, timeout: float | None = None) -> _Lease:
        return _Lease(self, timeout)


class SwitchFloorPool:
    """Floor (b): the least a fair pool can do in gevent at all.

    The same strict FIFO with direct hand-off as ``EventFloorPool``, but a
    waiter parks its greenlet in the hub (``hub.switch()``) and ``put`` has the
    hub switch to it with the socket (``loop.run_callback(greenlet.switch,
    sock)``), so the returning greenlet runs on and the hand-off costs one hub
    callback and one switch. No ``Event``, no timer (``timeout`` is ignored),
    no liveness check, and a waiter must not be killed: a benchmark floor, not
    a usable pool.
    """

    def __init__(self, socks: Iterable[Sock]) -> None:
        self._idle: list[Sock] = list(socks)
        self._waiters: deque[Any] = deque()
        self._hub = gevent.get_hub()
        self._callback = self._hub.loop.run_callback

    def get(self, timeout: float | None = None) -> Sock:
        """Lend an idle socket, or wait first come, first served, without limit."""
        if self._idle:
            return self._idle.pop()
        self._waiters.append(getcurrent())
        sock: Sock = self._hub.switch()
        return sock

    def put(self, sock: Sock) -> None:
        """Hand ``sock`` to the longest waiter (the hub switches to it), or make it idle."""
        if self._waiters:
            self._callback(self._waiters.popleft().switch, sock)
        else:
            self._idle.append(sock)

    def connection(self, timeout: float | None = None) -> _Lease:
        return _Lease(self, timeout)


def close_all(socks: Iterable[Sock]) -> None:
    for sock in socks:
        sock.close()
