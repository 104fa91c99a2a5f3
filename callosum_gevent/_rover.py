"""The rover: keep offering a client fresh connections to randomly chosen servers."""

from __future__ import annotations

import inspect
import ipaddress
import logging
import math
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.pool
import gevent.ssl
from gevent import socket as gsocket

from ._servers import EARLY_DEATH_S
from ._slotline import DEFAULT_MAX_SLOT, read_slot_line
from .errors import PoolClosed, ProtocolError

__all__ = ["Address", "ConnectionSink", "Rover", "parse_address"]

_log = logging.getLogger("callosum_gevent")

#: A server address: ``(host, port)``, ``"host:port"`` or ``"[v6-host]:port"``.
Address = tuple[str, int] | str
#: ``on_unreachable(server_id, (host, port))``.
UnreachableCallback = Callable[[Hashable, tuple[str, int]], object]

#: More connects at once than there are port numbers cannot happen.
_MAX_FILL_CONCURRENCY = 65535

_COUNTERS = (
    "attempts",
    "kept",
    "turned_down",
    "connect_errors",
    "protocol_errors",
    "resolves",
    "resolve_errors",
    "client_errors",
    "early_deaths",
)

#: After the client keeps a connection, the rover reads its early deaths
#: this long: a death is reported a moment after it happens.
_YOUNG = 2 * EARLY_DEATH_S


class ConnectionSink(Protocol):
    """What a rover feeds: CallosumClient, or anything with this method.

    Optional extras a rover uses when the sink has them: a ``server``
    keyword on ``new_connection`` (the rover passes its server id),
    ``retire_server(server_id)`` (called by :meth:`Rover.drop_server` and
    :meth:`Rover.set_address`) and ``server_stats()`` (its
    ``early_deaths_total`` per server lets the rover back off sinkholes).
    """

    def new_connection(self, slot: int, sock: socket.socket) -> bool: ...


def _takes_keyword(method: Callable[..., Any], name: str) -> bool:
    """Tell whether *method* declares a parameter *name* that can be passed by keyword.

    A bare ``**kwargs`` does not count: a wrapper that forwards it to a sink
    with the two-argument method would fail on every call.
    """
    try:
        parameter = inspect.signature(method).parameters.get(name)
    except (TypeError, ValueError):  # no signature to read (a builtin, say)
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _check_server_id(server_id: object) -> None:
    try:
        hash(server_id)
    except TypeError:
        raise TypeError(f"server_id must be hashable, got {type(server_id).__name__}") from None


def _host_problem(host: str) -> str | None:
    """Return why *host* is neither an IP address nor a DNS name, or None if it is one.

    ``getaddrinfo`` raises UnicodeError (not OSError) for names it cannot
    encode, and TLS refuses an empty or leading-dot ``server_hostname``:
    both are configuration typos, so they are refused up front.
    """
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if not host:
        return "is empty"
    if any(ch.isspace() or not ch.isprintable() for ch in host):
        return "contains whitespace or a control character"
    if ":" in host:
        return "is not an IP address, and a host name cannot hold ':'"
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if "" in labels:
        return "has an empty DNS label"
    for label in labels:
        if label.isascii() and len(label) > 63:
            return f"has a DNS label longer than 63 characters ({label[:20]}...)"
    try:
        encoded = host.encode("idna")
    except UnicodeError as exc:
        return f"is not a valid DNS name ({exc})"
    if len(encoded.rstrip(b".")) > 253:
        return "is longer than 253 bytes"
    return None


def _lookup_form(host: str) -> str:
    """Return *host* as ``getaddrinfo`` is given it: IDNA-encoded ASCII for a name.

    Encoding here, once, means the resolver's worker threads never meet a
    name they cannot encode (they would print the error from the hub).
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return host.encode("idna").decode("ascii")


def parse_address(address: object, name: str = "address") -> tuple[str, int]:
    """Return ``(host, port)`` for a tuple or ``"host:port"`` string; raise naming *name*.

    The host must be an IP address or a DNS name that can be looked up
    (no empty or overlong labels, no whitespace).
    """
    if isinstance(address, str):
        host, colon, port_text = address.rpartition(":")
        if not colon or not port_text.isascii() or not port_text.isdigit():
            raise ValueError(f"{name} {address!r} is not 'host:port'")
        if len(port_text) > 5:  # also keeps int() off huge digit strings
            raise ValueError(f"{name} {address!r} has a port outside 1-65535")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{name} {address!r}: write an IPv6 host in brackets, '[::1]:4040'")
        port = int(port_text)
    elif isinstance(address, tuple) and len(address) == 2:
        host_part, port_part = address
        if not isinstance(host_part, str) or type(port_part) is not int:
            raise TypeError(f"{name} must be (str, int), got {address!r}")
        host, port = host_part, port_part
    else:
        raise TypeError(
            f"{name} must be a (host, port) tuple or a 'host:port' string,"
            f" got {type(address).__name__}"
        )
    if not host:
        raise ValueError(f"{name} {address!r} has an empty host")
    if not 0 < port < 65536:
        raise ValueError(f"{name} {address!r} has port {port} outside 1-65535")
    problem = _host_problem(host)
    if problem is not None:
        raise ValueError(f"{name} {address!r}: host {host!r} {problem}")
    return host, port


def _check_number(
    name: str,
    value: object,
    *,
    integer: bool = False,
    minimum: float = 0,
    maximum: int | None = None,
) -> None:
    """Raise unless *value* is a finite number (an int if *integer*) above *minimum*.

    For ints, *minimum* itself is allowed; for seconds, it is not. An int
    may be capped at *maximum*.
    """
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    ok = value >= minimum if integer else math.isfinite(value) and value > minimum
    if not ok:
        raise ValueError(f"{name} must be {'>=' if integer else '>'} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")


@dataclass(eq=False)
class _Endpoint:
    """One resolved address of a server, with its own backoff."""

    server: _Server
    family: int
    sockaddr: tuple[Any, ...]
    # Failed attempts since the last success: while above 0 the endpoint is
    # probed one attempt at a time, each failure doubling its backoff.
    failures: int = 0
    due: float = 0.0  # monotonic time before which it is not tried
    in_flight: int = 0
    tried: bool = False  # a new server is tried at once, not at the next interval
    # Monotonic times of the last connection the client kept from here, of the
    # first one kept since the last failure (a connection that died early
    # counts as one), and of that failure.
    kept_at: float = -math.inf
    trial_at: float = -math.inf
    failed_at: float = -math.inf

    @property
    def server_id(self) -> Hashable:
        return self.server.id

    @property
    def address(self) -> tuple[str, int]:
        return self.sockaddr[0], self.sockaddr[1]


@dataclass(eq=False)
class _Server:
    id: Hashable
    host: str
    port: int
    endpoints: list[_Endpoint] = field(default_factory=list)
    resolve_due: float = 0.0  # monotonic time when the host name is looked up again
    resolve_failures: int = 0
    resolving: bool = False
    # The client's early_deaths_total and leases_total for this id when last
    # read (None: unknown), and when a lease was last seen to end on it.
    deaths_seen: int | None = None
    leases_seen: int | None = None
    lease_seen_at: float = -math.inf

    @property
    def lookup_host(self) -> str:
        return _lookup_form(self.host)


def _counter(report: Mapping[Hashable, Any], server_id: Hashable, name: str) -> int | None:
    """Return counter *name* of *server_id* from a client's server_stats(), if it has one."""
    entry = report.get(server_id)
    value = entry.get(name) if isinstance(entry, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _after_slot_line(sock: Any) -> str | None:
    """Return what is wrong if the server already closed or spoke after its slot line.

    Looks without waiting: a sinkhole whose FIN or greeting came with its
    slot line is refused here; one a moment later is left to the client's
    early-death count.
    """
    if isinstance(sock, ssl.SSLSocket | gevent.ssl.SSLSocket):
        # TLS records such as session tickets may follow the handshake: only
        # decrypted bytes are the server speaking.
        return "bytes nobody asked for" if sock.pending() else None
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        ahead = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    finally:
        sock.settimeout(timeout)
    return "bytes nobody asked for" if ahead else "the connection closed"


def _probing(endpoint: _Endpoint) -> bool:
    """Tell whether a failing endpoint has its one probe in flight."""
    return endpoint.failures > 0 and endpoint.in_flight > 0


def _may_try(endpoint: _Endpoint, now: float) -> bool:
    """Tell whether an attempt may start at *endpoint* now.

    A failing endpoint gets one attempt at a time (a probe), so a dead
    address costs one connect per backoff step, not ``fill_concurrency``.
    """
    return endpoint.due <= now and not _probing(endpoint)


class Rover:
    """Open connections to random servers and offer them to a client.

    While the client holds fewer than ``max_slots`` connections the rover
    fills it fast, up to ``fill_concurrency`` attempts at a time; once full it
    makes one attempt every ``interval`` seconds (±10% jitter, so that many
    clients do not rove in lockstep), which lets the client trade its highest
    slots for lower ones. A client without ``slot_count`` and ``max_slots``
    counts as full.

    A host name that resolves to several addresses counts as one server per
    address; names are looked up again every ``resolve_interval`` seconds and
    after a connection to them fails. A server that cannot be reached or that
    breaks the protocol is logged, counted in :meth:`stats`, reported to
    ``on_unreachable(server_id, (host, port))`` and backed off exponentially
    (``backoff_base`` doubling up to ``backoff_max`` seconds, jittered); it
    stays in the list, and one success resets its backoff. While backed off,
    an address gets one attempt at a time (a probe), even while the client
    is filling. Every error an attempt raises, whatever its class, is
    counted and backed off this way; none escapes to the hub.

    Host names (and ``server_hostname``) are checked when given: a name with
    an empty or overlong DNS label, or whitespace, raises ValueError.

    A sinkhole (a server that sends its slot line, then closes, fails or
    speaks unasked) is backed off like an unreachable one. The rover refuses
    a connection whose FIN or stray bytes arrived with the slot line
    (``protocol_errors``); one that dies a moment later is seen in the
    client's ``server_stats()[server_id]["early_deaths_total"]`` (when the
    client has ``server_stats``), which the rover reads while connections
    it handed over are young: new early deaths back off the addresses that
    supplied them (counted in ``early_deaths``), unless the server completed
    a lease in the last 3 s (then the application, not the server, most
    likely discarded them). After any failure an address stays on
    probation: one attempt per backoff step, a success not resetting the
    backoff, until the first connection kept since the failure has lasted
    the client's early-death window (3 s) with no new early death; then it
    is trusted again at full speed.

    Nothing runs until :meth:`start` (or ``with rover:``); :meth:`stop` ends
    every greenlet the rover started and closes connections still being set
    up. ``start`` on a running rover does nothing. ``rove()`` runs in the
    caller's greenlet and is not stopped by ``stop``.

    :param client: receives ``client.new_connection(slot, sock)``, plus
        ``server=server_id`` if that method declares a ``server`` parameter
        (checked once, here); it owns the socket from then on, whatever it
        returns.
    :param servers: ``{server_id: address}``; an address is ``(host, port)``,
        ``"host:port"`` or ``"[ipv6]:port"``.
    :param connect_timeout: bound on connecting, including a TLS handshake.
    :param slot_timeout: bound on reading the whole slot line.
    :param max_slot: a slot above this is a protocol error.
    :param ssl_context: speak TLS to the servers; the host name checked is
        ``server_hostname`` or else the host of each server's address.

    The options are kept as attributes of the same names; ``interval`` may be
    changed while running and takes effect from the next tick.
    """

    def __init__(
        self,
        client: ConnectionSink,
        servers: Mapping[Any, Address] | None = None,
        *,
        interval: float = 1.0,
        connect_timeout: float = 1.0,
        slot_timeout: float = 1.0,
        fill_concurrency: int = 8,
        max_slot: int = DEFAULT_MAX_SLOT,
        resolve_interval: float = 30.0,
        backoff_base: float = 0.1,
        backoff_max: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        on_unreachable: UnreachableCallback | None = None,
    ) -> None:
        new_connection = getattr(client, "new_connection", None)
        if not callable(new_connection):
            raise TypeError("client must have a new_connection(slot, sock) method")
        if servers is None:
            servers = {}
        if not isinstance(servers, Mapping):
            raise TypeError(
                f"servers must be a mapping of id to address, got {type(servers).__name__}"
            )
        parsed = {id_: parse_address(a, f"servers[{id_!r}]") for id_, a in servers.items()}
        seconds = {
            "interval": interval,
            "connect_timeout": connect_timeout,
            "slot_timeout": slot_timeout,
            "resolve_interval": resolve_interval,
            "backoff_base": backoff_base,
            "backoff_max": backoff_max,
        }
        for name, value in seconds.items():
            _check_number(name, value)
        if backoff_max < backoff_base:
            raise ValueError(f"backoff_max {backoff_max} must be >= backoff_base {backoff_base}")
        _check_number(
            "fill_concurrency",
            fill_concurrency,
            integer=True,
            minimum=1,
            maximum=_MAX_FILL_CONCURRENCY,
        )
        _check_number("max_slot", max_slot, integer=True)
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(
                f"ssl_context must be an ssl.SSLContext, got {type(ssl_context).__name__}"
            )
        if server_hostname is not None:
            if not isinstance(server_hostname, str):
                raise TypeError(
                    f"server_hostname must be a str, got {type(server_hostname).__name__}"
                )
            problem = _host_problem(server_hostname)
            if problem is not None:
                raise ValueError(f"server_hostname {server_hostname!r} {problem}")
        if on_unreachable is not None and not callable(on_unreachable):
            raise TypeError("on_unreachable must be callable")

        self._client = client
        # Looked up once: the sink may be another implementation without them.
        self._pass_server = _takes_keyword(new_connection, "server")
        retire_server = getattr(client, "retire_server", None)
        self._retire_server: Callable[[Hashable], object] | None = (
            retire_server if callable(retire_server) else None
        )
        server_stats = getattr(client, "server_stats", None)
        self._server_stats: Callable[[], Mapping[Hashable, Any]] | None = (
            server_stats if callable(server_stats) else None
        )
        self._stats_read_at = -math.inf
        self._interval = float(interval)
        self._connect_timeout = float(connect_timeout)
        self._slot_timeout = float(slot_timeout)
        self._fill_concurrency = fill_concurrency
        self._max_slot = max_slot
        self._resolve_interval = float(resolve_interval)
        self._backoff_base = float(backoff_base)
        self._backoff_max = float(backoff_max)
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._on_unreachable = on_unreachable

        self._servers = {id_: _Server(id_, *hp) for id_, hp in parsed.items()}
        self._counts: Counter[str] = Counter(dict.fromkeys(_COUNTERS, 0))
        self._note_deaths_so_far(*self._servers.values())
        self._failures: Counter[Hashable] = Counter()
        self._pool = gevent.pool.Pool(fill_concurrency)
        self._loop: gevent.Greenlet | None = None
        # Set whenever something the loop waits on changes: an attempt ended,
        # a server was added or resolved, or wake() was called.
        self._wakeup = gevent.event.Event()
        self._client_closed = False
        self._in_flight = 0

    # -- public API ---------------------------------------------------------

    @property
    def interval(self) -> float:
        """Seconds between attempts once the client is full (jittered ±10%)."""
        return self._interval

    @interval.setter
    def interval(self, seconds: float) -> None:
        _check_number("interval", seconds)
        self._interval = float(seconds)

    @property
    def connect_timeout(self) -> float:
        """Seconds allowed to connect (and finish a TLS handshake)."""
        return self._connect_timeout

    @property
    def slot_timeout(self) -> float:
        """Seconds allowed to read the slot line."""
        return self._slot_timeout

    @property
    def fill_concurrency(self) -> int:
        """Attempts in flight at most while the client is filling."""
        return self._fill_concurrency

    @property
    def max_slot(self) -> int:
        """Highest slot number accepted from a server."""
        return self._max_slot

    def start(self) -> None:
        """Start roving in the background; do nothing if already running."""
        if self._loop is None or self._loop.dead:
            self._loop = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop roving: end every greenlet started here and close connections in setup."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.kill(block=True)
        self._pool.kill(block=True)
        self._in_flight = 0  # attempts killed before they ran never counted down

    def wake(self) -> None:
        """Check the client now rather than at the next tick, e.g. after it lost connections."""
        self._wakeup.set()

    def rove(self) -> int | None:
        """Make one attempt now, in this greenlet; return the slot read, or None.

        A server in backoff is tried anyway if no other is due.
        """
        return self._attempt(force=True)

    def add_server(self, server_id: Hashable, address: Address) -> None:
        """Add a server to rove to; raise ValueError if *server_id* is already known."""
        _check_server_id(server_id)
        host, port = parse_address(address)
        if server_id in self._servers:
            raise ValueError(f"server_id {server_id!r} is already known")
        self._servers[server_id] = server = _Server(server_id, host, port)
        self._note_deaths_so_far(server)
        self._wakeup.set()

    def drop_server(self, server_id: Hashable, *, retire: bool = True) -> None:
        """Stop roving to a server and, unless *retire* is false, retire its connections.

        Retiring calls ``client.retire_server(server_id)`` if the client has
        it (CallosumClient closes idle connections now and lent ones when they
        are handed back). A connection to the server still being set up is
        closed, not offered.
        """
        self._known(server_id)
        if not isinstance(retire, bool):
            raise TypeError(f"retire must be a bool, got {type(retire).__name__}")
        del self._servers[server_id]
        if retire:
            self._retire(server_id)

    def set_address(self, server_id: Hashable, address: Address, *, retire: bool = True) -> None:
        """Move a known server to *address*; unless *retire* is false, retire its connections.

        The rover stops connecting to the old address at once (a connection
        to it still being set up is closed, not offered), looks the new one
        up afresh and tries it at once, with no backoff. Retiring works as in
        :meth:`drop_server`. Setting the address a server already has
        changes nothing.
        """
        server = self._known(server_id)
        host, port = parse_address(address)
        if not isinstance(retire, bool):
            raise TypeError(f"retire must be a bool, got {type(retire).__name__}")
        if (host, port) == (server.host, server.port):
            return
        self._servers[server_id] = moved = _Server(server_id, host, port)
        moved.deaths_seen, moved.leases_seen = server.deaths_seen, server.leases_seen
        moved.lease_seen_at = server.lease_seen_at
        if retire:
            self._retire(server_id)
        self._wakeup.set()

    def _known(self, server_id: Hashable) -> _Server:
        _check_server_id(server_id)
        server = self._servers.get(server_id)
        if server is None:
            raise ValueError(f"server_id {server_id!r} is not known")
        return server

    def _retire(self, server_id: Hashable) -> None:
        if self._retire_server is None:
            return
        retired = self._retire_server(server_id)
        _log.debug("rover: server %r: client retired %s connections", server_id, retired)

    @property
    def running(self) -> bool:
        """Return whether the background loop is running."""
        return self._loop is not None and not self._loop.dead

    def stats(self) -> dict[str, Any]:
        """Return counters, per-server failures and the current shape of the server list.

        Counters: ``attempts``, ``kept``, ``turned_down``, ``connect_errors``,
        ``protocol_errors``, ``resolves``, ``resolve_errors``,
        ``client_errors`` (the client raised) and ``early_deaths`` (handed-over
        connections the client reports dead within its early-death window).
        """
        now = time.monotonic()
        endpoints = self._endpoints()
        return {
            **self._counts,
            "failures": dict(self._failures),
            "servers": len(self._servers),
            "endpoints": len(endpoints),
            "backed_off": sum(ep.due > now for ep in endpoints),
            "in_flight": self._in_flight,
            "running": self.running,
        }

    def __enter__(self) -> Rover:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<Rover {state} servers={len(self._servers)} attempts={self._counts['attempts']}"
            f" kept={self._counts['kept']} in_flight={self._in_flight}>"
        )

    # -- the loop -----------------------------------------------------------

    def _endpoints(self) -> list[_Endpoint]:
        return [ep for server in self._servers.values() for ep in server.endpoints]

    def _missing(self) -> int:
        """Return how many connections the client lacks (0 if it cannot say)."""
        held = getattr(self._client, "slot_count", None)
        wanted = getattr(self._client, "max_slots", None)
        if not isinstance(held, int) or not isinstance(wanted, int):
            return 0
        return wanted - held

    def _run(self) -> None:
        next_rove = time.monotonic()
        # A closed CallosumClient turns everything down; roving on would only churn servers.
        while not (self._client_closed or getattr(self._client, "closed", False) is True):
            self._wakeup.clear()
            now = time.monotonic()
            missing = self._missing()
            timeout: float | None = None
            if missing <= 0 and now < next_rove and not self._untried(now):
                timeout = next_rove - now
            # Filling keeps fill_concurrency attempts going even when fewer are
            # missing, so attempts stalled on a slow server cannot stop it.
            elif self._in_flight < (self._fill_concurrency if missing > 0 else 1):
                due_in = self._due_in(now)
                if due_in == 0.0:
                    # Counted by hand: the pool forgets a greenlet only some
                    # time after it ends, too late for the wakeup it sends.
                    self._in_flight += 1
                    self._pool.spawn(self._background_attempt)
                    # Jittered, so that many clients do not rove in lockstep.
                    next_rove = now + self._interval * random.uniform(0.9, 1.1)
                    continue
                timeout = due_in
            # Otherwise the pool is busy: the next attempt to end wakes us.
            self._wakeup.wait(timeout)

    def _untried(self, now: float) -> bool:
        """Tell whether a server was added (or a name is due a first look-up) and not yet tried."""
        return any(not ep.tried and ep.due <= now for ep in self._endpoints()) or any(
            not s.endpoints and s.resolve_due <= now for s in self._servers.values()
        )

    def _due_in(self, now: float) -> float | None:
        """Return seconds until some server may be tried (0.0: now), or None if none exist."""
        # A name due to be looked up counts as due: the attempt resolves it.
        dues = [s.resolve_due for s in self._servers.values() if not s.resolving]
        # An endpoint being probed is due again when its probe ends, which wakes the loop.
        dues += [ep.due for ep in self._endpoints() if not _probing(ep)]
        return max(0.0, min(dues) - now) if dues else None

    def _background_attempt(self) -> None:
        try:
            self._attempt(force=False)
        finally:
            self._in_flight -= 1
            self._wakeup.set()

    # -- one attempt --------------------------------------------------------

    def _pick(self, force: bool) -> _Endpoint | None:
        """Choose a random endpoint that is not backed off, resolving names that are due."""
        for server in list(self._servers.values()):
            if server.resolve_due <= time.monotonic() and not server.resolving:
                self._resolve(server)
        now = time.monotonic()
        endpoints = self._endpoints()
        ready = [ep for ep in endpoints if _may_try(ep, now)]
        untried = [ep for ep in ready if not ep.tried]
        if untried:
            # A server just added (or a new address of one) offers its lowest
            # slots: take them now rather than wait for chance to pick it.
            return random.choice(untried)
        if ready:
            # Least busy first, so a server that stalls attempts holds at most
            # one more of them than the others and cannot take over the pool.
            least = min(ep.in_flight for ep in ready)
            return random.choice([ep for ep in ready if ep.in_flight == least])
        if force and endpoints:
            return min(endpoints, key=lambda ep: ep.due)
        return None

    def _resolve(self, server: _Server) -> None:
        server.resolving = True
        try:
            infos = gsocket.getaddrinfo(server.lookup_host, server.port, 0, socket.SOCK_STREAM)
            self._counts["resolves"] += 1
        except Exception as exc:
            # Whatever the class (a resolver may raise UnicodeError, a
            # ValueError): count it and back off, never retry at once.
            server.resolve_failures += 1
            server.resolve_due = time.monotonic() + self._backoff(server.resolve_failures)
            warn = server.resolve_failures == 1
            self._failed(server.id, (server.host, server.port), "resolve_errors", exc, warn)
            return
        finally:
            server.resolving = False
            self._wakeup.set()
        # Keep the backoff of addresses the name still has.
        old = {ep.sockaddr: ep for ep in server.endpoints}
        fresh = {info[4]: info[0] for info in infos}
        server.endpoints = [
            old.get(sockaddr) or _Endpoint(server, family, sockaddr)
            for sockaddr, family in fresh.items()
        ]
        server.resolve_failures = 0
        server.resolve_due = time.monotonic() + self._resolve_interval

    def _backoff(self, failures: int) -> float:
        delay = min(self._backoff_max, self._backoff_base * 2.0 ** min(failures - 1, 64))
        return delay * random.uniform(0.5, 1.0)

    def _attempt(self, force: bool) -> int | None:
        self._watch_deaths()
        endpoint = self._pick(force)
        if endpoint is None:
            return None
        self._counts["attempts"] += 1
        endpoint.in_flight += 1
        endpoint.tried = True
        sock: Any = None
        try:
            sock = gsocket.socket(endpoint.family, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with gevent.Timeout(self._connect_timeout, TimeoutError("connect timed out")):
                sock.connect(endpoint.sockaddr)
                if self._ssl_context is not None:
                    sock = self._wrap(sock, endpoint)
                    sock.do_handshake()
            slot = read_slot_line(sock, self._slot_timeout, self._max_slot)
            problem = _after_slot_line(sock)
            if problem is not None:
                raise ProtocolError(f"slot {slot}, then {problem}")
            if self._servers.get(endpoint.server_id) is not endpoint.server:
                # Dropped or moved while this attempt was in flight: the
                # client may already have retired its connections to it.
                _log.debug(
                    "rover: server %r at %s: gone, slot %d closed",
                    endpoint.server_id,
                    endpoint.address,
                    slot,
                )
                return None
            offered, sock = sock, None
        except ProtocolError as exc:
            self._endpoint_failed(endpoint, "protocol_errors", exc)
            return None
        except Exception as exc:
            # OSError mostly; anything else (an odd resolver answer, a TLS
            # setting the context refuses) is backed off the same way rather
            # than escaping to the hub and being retried at once.
            self._endpoint_failed(endpoint, "connect_errors", exc)
            return None
        finally:
            endpoint.in_flight -= 1
            # Still set only if the attempt failed or was killed (stop()).
            if sock is not None:
                sock.close()
        kept = self._offer(slot, offered, endpoint)
        now = time.monotonic()
        if kept is None:
            # The client rejected it outright (a slot above its ceiling, say):
            # back off rather than refill from this server at full speed.
            self._back_off(endpoint)
            return slot
        if kept:
            endpoint.kept_at = now
            if endpoint.trial_at <= endpoint.failed_at:
                endpoint.trial_at = now
        if endpoint.failures and self._server_stats is not None:
            # A slot line is no proof: a sinkhole sends one too. The endpoint
            # stays on probation, one probe per backoff step, until a
            # connection outlives the early-death window (see _watch_deaths).
            endpoint.due = now + self._backoff(endpoint.failures)
        else:
            endpoint.failures, endpoint.due = 0, 0.0
        return slot

    def _wrap(self, sock: Any, endpoint: _Endpoint) -> Any:
        hostname = self._server_hostname
        if hostname is None:
            hostname = endpoint.server.host
        # gevent's SSLSocket accepts a plain ssl.SSLContext; its wrap_socket
        # would build a blocking stdlib socket instead.
        return gevent.ssl.SSLSocket(
            sock=sock,
            server_hostname=hostname,
            do_handshake_on_connect=False,
            _context=self._ssl_context,
        )

    def _offer(self, slot: int, sock: Any, endpoint: _Endpoint) -> bool | None:
        """Hand *sock* to the client; return whether it kept it, or None if it raised."""
        server_id, address = endpoint.server_id, endpoint.address
        try:
            if self._pass_server:
                kept = self._client.new_connection(slot, sock, server=server_id)  # type: ignore[call-arg]
            else:
                kept = self._client.new_connection(slot, sock)
        except PoolClosed:
            sock.close()
            _log.info("rover: client closed, roving ends")
            self._client_closed = True
            self._wakeup.set()
            return False
        except Exception:
            # A faulty client must not end the rover; the socket is ours again.
            sock.close()
            self._counts["client_errors"] += 1
            _log.exception(
                "rover: server %r at %s: client.new_connection(%d, ...) raised",
                server_id,
                address,
                slot,
            )
            return None
        self._counts["kept" if kept else "turned_down"] += 1
        _log.debug(
            "rover: server %r at %s: slot %d %s",
            server_id,
            address,
            slot,
            "kept" if kept else "turned down",
        )
        return bool(kept)

    def _back_off(self, endpoint: _Endpoint) -> bool:
        """Push *endpoint*'s next try back one step; return False if it already was."""
        now = time.monotonic()
        # Attempts that were in flight together fail together: back off one
        # step for all of them, not one step each.
        if endpoint.due > now:
            return False
        endpoint.failures += 1
        endpoint.failed_at = now
        endpoint.due = now + self._backoff(endpoint.failures)
        return True

    def _endpoint_failed(self, endpoint: _Endpoint, kind: str, exc: Exception) -> None:
        first = self._back_off(endpoint)
        if kind == "connect_errors":
            endpoint.server.resolve_due = 0.0  # the name may point elsewhere now
        warn = first and endpoint.failures == 1
        self._failed(endpoint.server_id, endpoint.address, kind, exc, warn)

    # -- sinkholes: connections that die young ---------------------------

    def _read_deaths(self) -> Mapping[Hashable, Any] | None:
        """Return the client's per-server stats, or None if it has none to give."""
        if self._server_stats is None:
            return None
        try:
            return self._server_stats()
        except Exception:
            # A broken server_stats stays broken: log it once, then do without.
            self._server_stats = None
            self._counts["client_errors"] += 1
            _log.exception("rover: client.server_stats() raised; sinkholes go undetected")
            return None

    def _note_deaths_so_far(self, *servers: _Server) -> None:
        """Record the client's counters for *servers* before the rover feeds them."""
        report = self._read_deaths() if servers else None
        if report is None:
            return
        self._stats_read_at = time.monotonic()
        for server in servers:
            # A server the client has not heard of yet starts from zero.
            server.deaths_seen = _counter(report, server.id, "early_deaths_total") or 0
            server.leases_seen = _counter(report, server.id, "leases_total") or 0

    def _watch_deaths(self) -> None:
        """Treat endpoints whose fresh connections die young as failing; clear proven ones.

        Reads the client's ``early_deaths_total`` per server, only while some
        connection the client kept is young or some endpoint is on probation.
        """
        if self._server_stats is None:
            return
        now = time.monotonic()
        watched = {
            ep.server
            for ep in self._endpoints()
            if ep.kept_at > now - _YOUNG or (ep.failures and ep.kept_at > ep.failed_at)
        }
        report = self._read_deaths() if watched else None
        if report is None:
            return
        read_before, self._stats_read_at = self._stats_read_at, now
        for server in self._servers.values():
            leases = _counter(report, server.id, "leases_total")
            if leases is None:
                continue
            if server.leases_seen is not None and leases > server.leases_seen:
                # Ended at some moment since the last read: date it no later
                # than that read, so a stale count never masks a sinkhole.
                server.lease_seen_at = read_before
            server.leases_seen = leases
        for server in watched:
            deaths = _counter(report, server.id, "early_deaths_total")
            if deaths is None:
                continue
            seen, server.deaths_seen = server.deaths_seen, deaths
            if seen is None or deaths < seen:  # a new baseline (the client was reset)
                continue
            if deaths > seen:
                self._died_young(server, deaths - seen, now)
                continue
            for ep in server.endpoints:
                if (
                    ep.failures
                    and ep.trial_at > ep.failed_at
                    and now - ep.trial_at >= EARLY_DEATH_S
                ):
                    # Connections kept for a whole window, none dead young: healthy again.
                    ep.failures, ep.due = 0, 0.0
                    _log.info(
                        "rover: server %r at %s: connections last again", server.id, ep.address
                    )

    def _died_young(self, server: _Server, deaths: int, now: float) -> None:
        """Back off the endpoints of *server* that had connections kept since their last failure."""
        self._counts["early_deaths"] += deaths
        if server.lease_seen_at > now - EARLY_DEATH_S:
            # It served requests just now: these connections were most likely
            # discarded by the application (a borrower's timeout, say),
            # which the client counts alike. A sinkhole serves none.
            return
        # The client counts per server id, not per address: blame the addresses
        # that had a connection kept lately and since their last failure.
        # Deaths with none to blame are stragglers of a batch already counted.
        for ep in server.endpoints:
            if ep.kept_at <= ep.failed_at or ep.kept_at <= now - _YOUNG:
                continue
            ep.failures += 1
            ep.failed_at = now
            ep.due = now + self._backoff(ep.failures)
            exc = ProtocolError(
                f"{deaths} connection(s) died within {EARLY_DEATH_S:g} s of admission"
            )
            self._failed(server.id, ep.address, "early_deaths", exc, ep.failures == 1, count=0)

    def _failed(
        self,
        server_id: Hashable,
        address: tuple[str, int],
        kind: str,
        exc: Exception,
        warn: bool = True,
        count: int = 1,
    ) -> None:
        self._counts[kind] += count
        self._failures[server_id] += 1
        # Warn when a server starts failing; repeats while it stays down are noise.
        level = logging.WARNING if warn else logging.DEBUG
        # An error of an unexpected class may be a bug: show where it came from.
        trace = warn and not isinstance(exc, OSError | ProtocolError)
        _log.log(
            level,
            "rover: server %r at %s: %s: %r",
            server_id,
            address,
            kind,
            exc,
            exc_info=exc if trace else None,
        )
        if self._on_unreachable is not None:
            try:
                self._on_unreachable(server_id, address)
            except Exception:
                _log.exception("rover: on_unreachable(%r, %s) raised", server_id, address)
