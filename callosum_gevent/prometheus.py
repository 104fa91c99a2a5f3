"""Prometheus metrics for clients, their rovers and servers (the ``prometheus`` extra).

Register one :class:`CallosumCollector` with a ``prometheus_client`` registry
and add every pool (client, with its rover if any) and server to it::

    from prometheus_client import REGISTRY
    from callosum_gevent.prometheus import CallosumCollector

    collector = CallosumCollector(client, pool="rpc", rover=rover)
    collector.add_pool(other_client, pool="cache")
    REGISTRY.register(collector)

One collector holds them all because a registry refuses two collectors
that export the same metric names; the ``pool`` label (and ``server`` for a
:class:`~callosum_gevent.CallosumServer`) tells them apart.

Reading the numbers never yields and never blocks the hub. A scrape served
by the hub's own thread (``gevent.pywsgi`` serving
``prometheus_client.make_wsgi_app()``, or ``start_http_server`` after
``gevent.monkey.patch_all()``) reads them directly. A scrape from another OS
thread (``start_http_server`` without monkey-patching) asks the hub to read
them on its next turn, because the pool is not safe to read while the hub
changes it, and waits up to ``hub_timeout`` seconds in all, however many
hubs it asks; the sources of a hub that does not answer in time are left
out of that scrape, with a warning. Sources whose hub was destroyed, or
whose thread has ended, are left out at once (warned about once).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from time import monotonic
from typing import Any, NamedTuple

import gevent
import gevent.monkey

from ._client import CallosumClient
from ._rover import Rover
from ._server import CallosumServer

try:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "callosum_gevent.prometheus needs the prometheus_client package: "
        "install the extra with pip install 'callosum_gevent[prometheus]'"
    ) from exc

__all__ = ["CallosumCollector"]

_log = logging.getLogger("callosum_gevent")

# The OS thread's identity and a plain lock, even when threading is monkey-patched.
_get_ident: Callable[[], int] = gevent.monkey.get_original("_thread", "get_ident")
_allocate_lock: Callable[[], Any] = gevent.monkey.get_original("_thread", "allocate_lock")

# (key in the stats dict, metric name, help). Counter names carry ``_total``
# here as they appear in the exposition; CounterMetricFamily adds it back.
_Row = tuple[str, str, str]
_Family = CounterMetricFamily | GaugeMetricFamily

_POOL_GAUGES: tuple[_Row, ...] = (
    ("slots", "callosum_connections", "Connections the pool holds with a slot, idle or lent."),
    ("idle", "callosum_idle_connections", "Connections waiting in the pool to be lent."),
    (
        "leased",
        "callosum_leased_connections",
        "Connections lent out, including retired ones not yet handed back.",
    ),
    ("waiting", "callosum_waiting_borrowers", "Borrowers waiting for a connection."),
)
_POOL_COUNTERS: tuple[_Row, ...] = (
    ("kept", "callosum_connections_kept_total", "Offered connections the pool kept."),
    (
        "turned_down",
        "callosum_connections_turned_down_total",
        "Offered connections the pool closed: full, and no lower slot.",
    ),
    (
        "replaced",
        "callosum_connections_replaced_total",
        "Connections retired to make room for a lower slot or a faster server.",
    ),
    (
        "evicted",
        "callosum_connections_evicted_total",
        "Idle connections closed because the peer closed, reset or wrote to them.",
    ),
    (
        "dead_at_handout",
        "callosum_connections_dead_at_handout_total",
        "Connections found dead when about to be lent.",
    ),
    (
        "dead_at_return",
        "callosum_connections_dead_at_return_total",
        "Connections found dead when handed back.",
    ),
    (
        "discarded",
        "callosum_connections_discarded_total",
        "Connections borrowers discarded as broken.",
    ),
    (
        "early_deaths",
        "callosum_connections_early_deaths_total",
        "Connections that died (evicted, found dead, discarded) within seconds of being kept.",
    ),
    (
        "retired",
        "callosum_connections_retired_total",
        "Connections retired by retire_server(); replacements count as replaced.",
    ),
    (
        "aged_out",
        "callosum_connections_aged_out_total",
        "Connections closed for reaching the pool's max_age, so that the rover replaces them.",
    ),
    ("waits", "callosum_borrower_waits_total", "Borrowers that had to wait for a connection."),
    (
        "timeouts",
        "callosum_borrower_timeouts_total",
        "Borrowers that gave up waiting for a connection.",
    ),
)
_SERVER_GAUGES: tuple[_Row, ...] = (
    (
        "connections",
        "callosum_server_connections",
        "Connections to this server the pool holds with a slot.",
    ),
    ("idle", "callosum_server_idle_connections", "Idle connections to this server."),
    ("leased", "callosum_server_leased_connections", "Lent connections to this server."),
)
_SERVER_LATENCY: _Row = (
    "latency_ms",
    "callosum_server_lease_latency_seconds",
    "Decaying average of how long a connection to this server stays lent.",
)
_SERVER_COUNTERS: tuple[_Row, ...] = (
    (
        "leases_total",
        "callosum_server_leases_total",
        "Leases of connections to this server handed back.",
    ),
    (
        "errors_total",
        "callosum_server_errors_total",
        "Connections to this server found dead at hand-out or return, or discarded.",
    ),
    (
        "evictions_total",
        "callosum_server_evictions_total",
        "Idle connections to this server closed because the peer closed, reset or wrote.",
    ),
    (
        "early_deaths_total",
        "callosum_server_early_deaths_total",
        "Connections to this server that died soon after the pool kept them.",
    ),
    (
        "retired_total",
        "callosum_server_retired_total",
        "Connections to this server given up on purpose: replaced, retired, or aged out.",
    ),
)
_ROVER_GAUGES: tuple[_Row, ...] = (
    ("servers", "callosum_rover_servers", "Servers the rover connects to."),
    ("endpoints", "callosum_rover_endpoints", "Resolved addresses of those servers."),
    ("backed_off", "callosum_rover_backed_off_endpoints", "Addresses in backoff after failing."),
    ("in_flight", "callosum_rover_attempts_in_flight", "Connection attempts under way."),
    ("running", "callosum_rover_running", "1 while the rover runs, else 0."),
)
_ROVER_COUNTERS: tuple[_Row, ...] = (
    ("attempts", "callosum_rover_attempts_total", "Connection attempts."),
    ("kept", "callosum_rover_offers_kept_total", "Connections offered that the pool kept."),
    (
        "turned_down",
        "callosum_rover_offers_turned_down_total",
        "Connections offered that the pool turned down.",
    ),
    ("connect_errors", "callosum_rover_connect_errors_total", "Attempts that failed to connect."),
    (
        "protocol_errors",
        "callosum_rover_protocol_errors_total",
        "Attempts whose server broke the slot-line protocol.",
    ),
    ("resolves", "callosum_rover_resolves_total", "Host name lookups."),
    ("resolve_errors", "callosum_rover_resolve_errors_total", "Host name lookups that failed."),
    (
        "client_errors",
        "callosum_rover_client_errors_total",
        "Offers the pool answered by raising.",
    ),
    (
        "early_deaths",
        "callosum_rover_early_deaths_total",
        "Connections the rover offered that the pool saw die young (sinkhole detection).",
    ),
)
_ROVER_FAILURES: _Row = (
    "failures",
    "callosum_rover_server_failures_total",
    "Failed connection attempts and lookups, by server.",
)
_LISTENER_GAUGES: tuple[_Row, ...] = (
    ("active", "callosum_listener_connections", "Connections holding a slot on this server."),
    (
        "in_request",
        "callosum_listener_requests_in_progress",
        "Requests marked with server.request() and not finished.",
    ),
    ("weight", "callosum_listener_weight", "How many connections share each slot number."),
    ("draining", "callosum_listener_draining", "1 while the server drains, else 0."),
)
_LISTENER_COUNTERS: tuple[_Row, ...] = (
    (
        "accepted",
        "callosum_listener_accepted_total",
        "Connections accepted and sent their slot line.",
    ),
    (
        "refused",
        "callosum_listener_refused_total",
        "Connections closed at once: max_connections were open, or the server was draining.",
    ),
    (
        "failed",
        "callosum_listener_slot_line_failures_total",
        "Connections lost before their slot line went out (TLS handshake or send failed).",
    ),
    ("errors", "callosum_listener_handler_errors_total", "Handlers that raised."),
    (
        "requests",
        "callosum_listener_requests_total",
        "Requests marked with server.request() that finished.",
    ),
    (
        "drained",
        "callosum_listener_drained_total",
        "Connections a drain closed between requests.",
    ),
)
_READY: _Row = ("", "callosum_ready", "1 while the pool is open and holds a live connection.")
_MAX: _Row = ("", "callosum_max_connections", "The most connections the pool keeps (max_slots).")

_POOL = ("pool",)
_POOL_SERVER = ("pool", "server")
_LISTENER = ("server",)


@dataclass(frozen=True)
class _Pool:
    name: str
    client: CallosumClient
    rover: Rover | None
    hub: Any


@dataclass(frozen=True)
class _Listener:
    name: str | None  # None: named by its address when read
    server: CallosumServer
    hub: Any


class _PoolReading(NamedTuple):
    name: str
    stats: Mapping[str, Any]
    max_connections: int
    ready: bool
    servers: Mapping[Hashable, Mapping[str, Any]]
    rover: Mapping[str, Any] | None


class _ListenerReading(NamedTuple):
    name: str
    stats: Mapping[str, Any]


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{kind} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{kind} must not be empty")
    return name


def _address_name(address: object) -> str:
    """Name a listening address ``host:port`` (``[v6]:port``), or by its str()."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _label(server_id: Hashable) -> str:
    return server_id if isinstance(server_id, str) else str(server_id)


def _read_pool(pool: _Pool) -> _PoolReading:
    client = pool.client
    return _PoolReading(
        pool.name,
        client.stats(),
        client.max_slots,
        client.ready(),
        client.server_stats(),
        None if pool.rover is None else pool.rover.stats(),
    )


def _read_listener(listener: _Listener) -> _ListenerReading:
    name = listener.name
    if name is None:
        name = _address_name(listener.server.address)
    server = listener.server
    # draining: from the server track's drain(); absent on older servers.
    extra = {"weight": server.weight, "draining": getattr(server, "draining", None)}
    return _ListenerReading(name, {**extra, **server.stats()})


class CallosumCollector:
    """Export pools, their rovers and servers to Prometheus.

    Every metric is named ``callosum_...``: counters end in ``_total``,
    durations are in seconds, and the rest are gauges of what is there now.
    Pool metrics carry a ``pool`` label, and the pool's view of each server
    (``callosum_server_...``) a ``server`` label too, the server's id as
    ``str()``. A :class:`~callosum_gevent.CallosumServer`'s own metrics are
    ``callosum_listener_...``, labelled ``server`` with the given name or its
    listening address, so they do not mix with the pools' view.

    :param client: a first pool to add, as :meth:`add_pool` would.
    :param server: a first server to add, as :meth:`add_server` would.
    :param hub_timeout: seconds a scrape from another OS thread waits for
        the other hubs to read their sources: one deadline for all of them.

    Add sources from the thread whose hub runs them.
    """

    def __init__(
        self,
        client: CallosumClient | None = None,
        *,
        pool: str = "default",
        rover: Rover | None = None,
        server: CallosumServer | None = None,
        hub_timeout: float = 5.0,
    ) -> None:
        if isinstance(hub_timeout, bool) or not isinstance(hub_timeout, (int, float)):
            raise TypeError(f"hub_timeout must be a number, not {type(hub_timeout).__name__}")
        if not (hub_timeout > 0 and math.isfinite(hub_timeout)):
            raise ValueError(f"hub_timeout must be > 0 and finite, not {hub_timeout!r}")
        if client is None and rover is not None:
            raise ValueError("rover needs the client it feeds")
        self._hub_timeout = float(hub_timeout)
        # Replaced whole, never changed in place, so a scrape in another thread
        # iterates a consistent snapshot without a lock.
        self._pools: dict[str, _Pool] = {}
        self._listeners: tuple[_Listener, ...] = ()
        self._gone: frozenset[int] = frozenset()  # hubs already reported gone
        if client is not None:
            self.add_pool(client, pool=pool, rover=rover)
        if server is not None:
            self.add_server(server)

    @property
    def pools(self) -> tuple[str, ...]:
        """Return the names of the pools added."""
        return tuple(self._pools)

    def add_pool(
        self, client: CallosumClient, *, pool: str = "default", rover: Rover | None = None
    ) -> None:
        """Export ``client`` (and the ``rover`` feeding it) under the label ``pool``."""
        if not isinstance(client, CallosumClient):
            raise TypeError(f"client must be a CallosumClient, not {type(client).__name__}")
        if rover is not None and not isinstance(rover, Rover):
            raise TypeError(f"rover must be a Rover or None, not {type(rover).__name__}")
        _check_name("pool", pool)
        if pool in self._pools:
            raise ValueError(f"pool {pool!r} is already added")
        if any(p.client is client for p in self._pools.values()):
            raise ValueError("client is already added under another pool name")
        self._pools = {**self._pools, pool: _Pool(pool, client, rover, gevent.get_hub())}

    def remove_pool(self, pool: str) -> None:
        """Stop exporting the pool named ``pool``; raise ValueError if unknown."""
        if pool not in self._pools:
            raise ValueError(f"pool {pool!r} is not added")
        self._pools = {name: p for name, p in self._pools.items() if name != pool}

    def add_server(self, server: CallosumServer, *, name: str | None = None) -> None:
        """Export ``server``'s counters, labelled ``name`` (default: its address)."""
        if not isinstance(server, CallosumServer):
            raise TypeError(f"server must be a CallosumServer, not {type(server).__name__}")
        if name is not None:
            _check_name("name", name)
            if any(lst.name == name for lst in self._listeners):
                raise ValueError(f"a server named {name!r} is already added")
        if any(lst.server is server for lst in self._listeners):
            raise ValueError("server is already added")
        self._listeners = (*self._listeners, _Listener(name, server, gevent.get_hub()))

    def remove_server(self, server: CallosumServer) -> None:
        """Stop exporting ``server``; raise ValueError if it was not added."""
        kept = tuple(lst for lst in self._listeners if lst.server is not server)
        if len(kept) == len(self._listeners):
            raise ValueError("server is not added")
        self._listeners = kept

    # -- the prometheus_client collector protocol ---------------------------

    def describe(self) -> Iterable[Metric]:
        """Return every metric family, without samples, for the registry's name check."""
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        """Read every source now and return the metric families with samples."""
        pools, listeners = self._read()
        families = _Families()
        for reading in pools:
            _add_pool(families, reading)
        for lst in listeners:
            _add_rows(families, lst.stats, _LISTENER_GAUGES + _LISTENER_COUNTERS, (lst.name,))
        return [family for family in families.all() if family.samples]

    # -- reading ------------------------------------------------------------

    def _read(self) -> tuple[list[_PoolReading], list[_ListenerReading]]:
        pools, listeners = list(self._pools.values()), self._listeners
        hubs = {id(source.hub): source.hub for source in pools}
        hubs.update((id(source.hub), source.hub) for source in listeners)
        # Every other thread's hub is asked at once, and all share one
        # deadline: a scrape waits hub_timeout at most, however many hubs.
        deadline = monotonic() + self._hub_timeout
        pending: list[tuple[Any, _Answer]] = []
        pool_readings: list[_PoolReading] = []
        listener_readings: list[_ListenerReading] = []
        for hub_id, hub in hubs.items():
            mine = [p for p in pools if id(p.hub) == hub_id]
            theirs = [lst for lst in listeners if id(lst.hub) == hub_id]

            def read(
                mine: list[_Pool] = mine, theirs: list[_Listener] = theirs
            ) -> tuple[list[_PoolReading], list[_ListenerReading]]:
                return [_read_pool(p) for p in mine], [_read_listener(lst) for lst in theirs]

            if _get_ident() == hub.thread_ident:
                got = read()
                pool_readings += got[0]
                listener_readings += got[1]
                continue
            loop = hub.loop  # None once the hub is destroyed
            if loop is None or hub.thread_ident not in sys._current_frames():
                self._report_gone(hub)  # nobody is left to read for it
                continue
            pending.append((hub, _Answer(loop, read)))
        for hub, answer in pending:
            got = answer.wait(max(0.0, deadline - monotonic()))
            if got is None:
                _log.warning(
                    "metrics: the hub of thread %#x did not answer in %.1f s; its pools left out",
                    hub.thread_ident,
                    self._hub_timeout,
                )
                continue
            pool_readings += got[0]
            listener_readings += got[1]
        return pool_readings, listener_readings

    def _report_gone(self, hub: Any) -> None:
        """Warn, once per hub, that a destroyed hub or ended thread leaves its pools out."""
        if id(hub) in self._gone:  # a hub held here keeps its id
            return
        self._gone = self._gone | {id(hub)}
        _log.warning(
            "metrics: the hub of thread %#x is gone (destroyed, or its thread ended); "
            "its pools are left out: remove them",
            hub.thread_ident,
        )

    def __repr__(self) -> str:
        return f"<CallosumCollector pools={list(self._pools)} servers={len(self._listeners)}>"


class _Answer:
    """A read asked of another thread's hub, run there on its next turn."""

    def __init__(self, loop: Any, read: Callable[[], Any]) -> None:
        self._read = read
        self._done = _allocate_lock()
        self._done.acquire()
        self._box: list[Any] = []
        loop.run_callback_threadsafe(self._run)

    def _run(self) -> None:
        try:
            self._box.append(self._read())
        except BaseException as exc:  # handed to the scraping thread to raise
            self._box.append(exc)
        finally:
            self._done.release()

    def wait(self, timeout: float) -> Any:
        """Return what the read returned, raise what it raised, or None after ``timeout``."""
        if not self._done.acquire(timeout=timeout):
            return None
        result = self._box[0]
        if isinstance(result, BaseException):
            raise result
        return result


class _Families:
    """Every metric family this module exports, empty, in a stable order."""

    def __init__(self) -> None:
        self._by_name: dict[str, _Family] = {}
        for rows, labels, counter in _LAYOUT:
            for _, name, help_text in rows:
                unit = "seconds" if name.endswith("_seconds") else ""
                family: _Family
                if counter:
                    family = CounterMetricFamily(name, help_text, labels=labels, unit=unit)
                else:
                    family = GaugeMetricFamily(name, help_text, labels=labels, unit=unit)
                self._by_name[name] = family

    def __getitem__(self, row: _Row) -> _Family:
        return self._by_name[row[1]]

    def all(self) -> list[Metric]:
        return list(self._by_name.values())


_LAYOUT: tuple[tuple[tuple[_Row, ...], tuple[str, ...], bool], ...] = (
    ((_READY, _MAX, *_POOL_GAUGES), _POOL, False),
    (_POOL_COUNTERS, _POOL, True),
    ((*_SERVER_GAUGES, _SERVER_LATENCY), _POOL_SERVER, False),
    (_SERVER_COUNTERS, _POOL_SERVER, True),
    (_ROVER_GAUGES, _POOL, False),
    (_ROVER_COUNTERS, _POOL, True),
    ((_ROVER_FAILURES,), _POOL_SERVER, True),
    (_LISTENER_GAUGES, _LISTENER, False),
    (_LISTENER_COUNTERS, _LISTENER, True),
)


def _add(family: _Family, labels: Iterable[str], value: float) -> None:
    family.add_metric(list(labels), value)


def _add_rows(
    families: _Families, stats: Mapping[str, Any], rows: Iterable[_Row], labels: tuple[str, ...]
) -> None:
    """Add one sample per row whose key ``stats`` has (an older or newer source may lack some)."""
    for row in rows:
        value = stats.get(row[0])
        if value is not None:
            _add(families[row], labels, float(value))


def _add_pool(families: _Families, reading: _PoolReading) -> None:
    pool = (reading.name,)
    _add(families[_READY], pool, 1.0 if reading.ready else 0.0)
    _add(families[_MAX], pool, float(reading.max_connections))
    _add_rows(families, reading.stats, _POOL_GAUGES + _POOL_COUNTERS, pool)
    for server_id, stats in reading.servers.items():
        labels = (reading.name, _label(server_id))
        _add_rows(families, stats, _SERVER_GAUGES + _SERVER_COUNTERS, labels)
        latency_ms = stats.get(_SERVER_LATENCY[0])
        if latency_ms is not None:
            _add(families[_SERVER_LATENCY], labels, float(latency_ms) / 1000.0)
    if reading.rover is not None:
        _add_rows(families, reading.rover, _ROVER_GAUGES + _ROVER_COUNTERS, pool)
        for server_id, count in (reading.rover.get(_ROVER_FAILURES[0]) or {}).items():
            _add(families[_ROVER_FAILURES], (reading.name, _label(server_id)), float(count))
