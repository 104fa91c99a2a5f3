"""The Prometheus collector, scraped for real: real pools, rovers, servers and HTTP."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.monkey
import gevent.pywsgi
import pytest
from _lineservers import wait_until
from gevent import socket
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

from callosum_gevent import CallosumClient, CallosumServer, Rover
from callosum_gevent._slotline import read_slot_line
from callosum_gevent.prometheus import CallosumCollector

pytestmark = pytest.mark.timeout(30)

# Threads of the operating system, even if some other test monkey-patched threading.
_Thread = gevent.monkey.get_original("threading", "Thread")


def echo(sock: Any, _address: Any) -> None:
    while data := sock.recv(4096):
        sock.sendall(data)


def address_of(server: CallosumServer) -> str:
    host, port = server.address[:2]
    return f"{host}:{port}"


@pytest.fixture
def servers() -> Iterator[list[CallosumServer]]:
    started = [CallosumServer(("127.0.0.1", 0), echo) for _ in range(3)]
    for server in started:
        server.start()
    yield started
    for server in started:
        server.stop(timeout=0.1)


@pytest.fixture
def client() -> Iterator[CallosumClient]:
    with CallosumClient(max_slots=6) as c:
        yield c


@pytest.fixture
def make_rover() -> Iterator[Callable[..., Rover]]:
    rovers: list[Rover] = []

    def make(client: CallosumClient, servers: list[CallosumServer], **kw: Any) -> Rover:
        ids = {f"b{i}": address_of(server) for i, server in enumerate(servers, 1)}
        rover = Rover(client, ids, **kw)
        rovers.append(rover)
        return rover

    yield make
    for rover in rovers:
        rover.stop()


def filled(client: CallosumClient, rover: Rover) -> None:
    """Start ``rover`` and wait until ``client`` is full."""
    rover.start()
    assert wait_until(lambda: client.slot_count == client.max_slots)


def round_trips(client: CallosumClient, count: int) -> None:
    for i in range(count):
        with client.connection(timeout=5) as sock:
            sock.sendall(b"ping %d\n" % i)
            assert sock.recv(64) == b"ping %d\n" % i


def scrape(registry: CollectorRegistry) -> dict[str, Metric]:
    """Expose ``registry`` as Prometheus text and parse it back, by family name."""
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    """Return the one sample named ``sample`` with exactly ``labels``."""
    found = [
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample and s.labels == labels
    ]
    assert len(found) == 1, f"{sample}{labels}: {len(found)} samples"
    return found[0]


def get(http: gevent.pywsgi.WSGIServer, path: str) -> tuple[bytes, bytes]:
    """GET ``path`` over HTTP/1.0 from a gevent socket; return the head and body."""
    with socket.create_connection(http.address[:2], timeout=10) as sock:
        sock.sendall(b"GET %s HTTP/1.0\r\nHost: ops\r\n\r\n" % path.encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


def label_sets(families: dict[str, Metric], name: str) -> list[dict[str, str]]:
    return [s.labels for s in families[name].samples]


# -- the pool, its rover ------------------------------------------------------

POOL_GAUGES = {
    "callosum_ready",
    "callosum_max_connections",
    "callosum_connections",
    "callosum_idle_connections",
    "callosum_leased_connections",
    "callosum_waiting_borrowers",
}
POOL_COUNTERS = {
    "callosum_connections_kept",
    "callosum_connections_turned_down",
    "callosum_connections_replaced",
    "callosum_connections_evicted",
    "callosum_connections_dead_at_handout",
    "callosum_connections_dead_at_return",
    "callosum_connections_discarded",
    "callosum_connections_aged_out",
    "callosum_borrower_waits",
    "callosum_borrower_timeouts",
}
ROVER_GAUGES = {
    "callosum_rover_servers",
    "callosum_rover_endpoints",
    "callosum_rover_backed_off_endpoints",
    "callosum_rover_attempts_in_flight",
    "callosum_rover_running",
}
ROVER_COUNTERS = {
    "callosum_rover_attempts",
    "callosum_rover_offers_kept",
    "callosum_rover_offers_turned_down",
    "callosum_rover_connect_errors",
    "callosum_rover_protocol_errors",
    "callosum_rover_resolves",
    "callosum_rover_resolve_errors",
    "callosum_rover_client_errors",
}


def test_pool_and_rover_are_scraped_with_names_types_labels_and_values(
    client: CallosumClient, servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    rover = make_rover(client, servers, interval=60)
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="rpc", rover=rover))
    assert value(scrape(registry), "callosum_ready", pool="rpc") == 0.0

    filled(client, rover)
    round_trips(client, 5)
    with client.connection(timeout=5):
        families = scrape(registry)

    for name in POOL_GAUGES | ROVER_GAUGES:
        assert families[name].type == "gauge", name
        assert label_sets(families, name) == [{"pool": "rpc"}], name
    for name in POOL_COUNTERS | ROVER_COUNTERS:
        assert families[name].type == "counter", name
        assert [s.name for s in families[name].samples] == [name + "_total"], name
        assert label_sets(families, name) == [{"pool": "rpc"}], name
    assert all(family.documentation for family in families.values())

    stats = client.stats()
    assert value(families, "callosum_ready", pool="rpc") == 1.0
    assert value(families, "callosum_max_connections", pool="rpc") == 6
    assert value(families, "callosum_connections", pool="rpc") == 6
    assert value(families, "callosum_leased_connections", pool="rpc") == 1
    assert value(families, "callosum_idle_connections", pool="rpc") == 5
    assert value(families, "callosum_waiting_borrowers", pool="rpc") == 0
    assert value(families, "callosum_connections_kept_total", pool="rpc") == stats["kept"] >= 6
    rover_stats = rover.stats()
    assert value(families, "callosum_rover_attempts_total", pool="rpc") == rover_stats["attempts"]
    assert value(families, "callosum_rover_offers_kept_total", pool="rpc") == stats["kept"]
    assert value(families, "callosum_rover_servers", pool="rpc") == 3
    assert value(families, "callosum_rover_running", pool="rpc") == 1

    rover.stop()
    client.close()
    families = scrape(registry)
    assert value(families, "callosum_ready", pool="rpc") == 0.0
    assert value(families, "callosum_rover_running", pool="rpc") == 0.0


def test_rover_failures_are_counted_by_server(client: CallosumClient) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    rover = Rover(client, {"gone": ("127.0.0.1", port)}, backoff_base=0.01, backoff_max=0.05)
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="p", rover=rover))
    try:
        rover.start()
        assert wait_until(lambda: rover.stats()["connect_errors"] >= 3)
        rover.stop()
    finally:
        rover.stop()
    families = scrape(registry)
    failures = rover.stats()["failures"]["gone"]
    assert failures >= 3
    assert families["callosum_rover_server_failures"].type == "counter"
    assert value(families, "callosum_rover_server_failures_total", pool="p", server="gone") == (
        failures
    )
    assert value(families, "callosum_rover_connect_errors_total", pool="p") == failures
    assert value(families, "callosum_ready", pool="p") == 0.0


def test_borrower_waits_and_timeouts_are_counted(client: CallosumClient) -> None:
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client))
    for _ in range(3):
        with pytest.raises(TimeoutError):
            client.get_connection(timeout=0.01)
    families = scrape(registry)
    assert value(families, "callosum_borrower_waits_total", pool="default") == 3
    assert value(families, "callosum_borrower_timeouts_total", pool="default") == 3


def test_several_pools_share_one_collector_with_their_own_labels(
    servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    with CallosumClient(max_slots=2) as small, CallosumClient(max_slots=4) as large:
        rover = make_rover(small, servers, interval=60)
        collector = CallosumCollector(small, pool="small", rover=rover)
        collector.add_pool(large, pool="large")
        assert collector.pools == ("small", "large")
        registry = CollectorRegistry()
        registry.register(collector)
        filled(small, rover)
        families = scrape(registry)
        assert label_sets(families, "callosum_max_connections") == [
            {"pool": "small"},
            {"pool": "large"},
        ]
        assert value(families, "callosum_max_connections", pool="small") == 2
        assert value(families, "callosum_max_connections", pool="large") == 4
        assert value(families, "callosum_connections", pool="small") == 2
        assert value(families, "callosum_ready", pool="small") == 1
        assert value(families, "callosum_ready", pool="large") == 0
        # Only "small" has a rover.
        assert label_sets(families, "callosum_rover_attempts") == [{"pool": "small"}]

        collector.remove_pool("small")
        families = scrape(registry)
        assert label_sets(families, "callosum_max_connections") == [{"pool": "large"}]
        assert "callosum_rover_attempts" not in families


def test_a_second_collector_with_the_same_names_is_refused_by_the_registry() -> None:
    registry = CollectorRegistry()
    registry.register(CallosumCollector(CallosumClient(), pool="a"))
    # DuplicateTimeseries in recent prometheus_client; a plain ValueError before.
    with pytest.raises(ValueError, match=r"Duplicated timeseries.*callosum_ready"):
        registry.register(CallosumCollector(CallosumClient(), pool="b"))


def test_the_exposition_is_valid_openmetrics(
    client: CallosumClient, servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    rover = make_rover(client, servers, interval=60)
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, rover=rover, server=servers[0]))
    filled(client, rover)
    round_trips(client, 2)
    text = om_exposition.generate_latest(registry).decode()
    # The OpenMetrics parser is strict: names, _total suffixes, units and EOF.
    families = {f.name: f for f in om_parser.text_string_to_metric_families(text)}
    assert families["callosum_connections_kept"].type == "counter"
    assert families["callosum_ready"].type == "gauge"
    assert families["callosum_listener_accepted"].type == "counter"


# -- the pool's view of each server ----------------------------------------------

SERVER_GAUGES = {
    "callosum_server_connections",
    "callosum_server_idle_connections",
    "callosum_server_leased_connections",
}
SERVER_COUNTERS = {
    "callosum_server_leases",
    "callosum_server_errors",
    "callosum_server_evictions",
    "callosum_server_early_deaths",
    "callosum_server_retired",
}


def connect(client: CallosumClient, server: CallosumServer, server_id: Any) -> Any:
    """Open a connection to ``server`` by hand and offer it to ``client`` as ``server_id``."""
    sock = socket.create_connection(server.address[:2], timeout=5)
    slot = read_slot_line(sock, 5)
    sock.settimeout(None)
    assert client.new_connection(slot, sock, server=server_id)
    return sock


def test_per_server_metrics_follow_server_stats(
    client: CallosumClient, servers: list[CallosumServer]
) -> None:
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="p"))
    b1 = {"pool": "p", "server": "b1"}
    b2 = {"pool": "p", "server": "b2"}
    for _ in range(2):
        connect(client, servers[0], "b1")
    round_trips(client, 7)  # every lease goes to b1: b2 is not there yet
    for _ in range(2):
        connect(client, servers[1], "b2")
    with client.connection(timeout=5):
        families = scrape(registry)
        stats = client.server_stats()

    for name in SERVER_GAUGES:
        assert families[name].type == "gauge", name
        assert label_sets(families, name) == [b1, b2], name
    for name in SERVER_COUNTERS:
        assert families[name].type == "counter", name
        assert label_sets(families, name) == [b1, b2], name
    latency = families["callosum_server_lease_latency_seconds"]
    assert latency.type == "gauge"
    assert label_sets(families, "callosum_server_lease_latency_seconds") == [b1]  # b2: unmeasured

    assert value(families, "callosum_server_leases_total", **b1) == 7
    assert value(families, "callosum_server_leases_total", **b2) == 0
    assert value(families, "callosum_server_connections", **b1) == 2
    assert value(families, "callosum_server_connections", **b2) == 2
    leased = [value(families, "callosum_server_leased_connections", **x) for x in (b1, b2)]
    idle = [value(families, "callosum_server_idle_connections", **x) for x in (b1, b2)]
    assert sum(leased) == 1 and sum(idle) == 3
    latency_ms = stats["b1"]["latency_ms"]
    assert isinstance(latency_ms, float) and latency_ms > 0
    assert value(families, "callosum_server_lease_latency_seconds", **b1) == pytest.approx(
        latency_ms / 1000
    )

    # A discarded connection is an error; a server that goes away evicts the rest.
    sock = client.get_connection(timeout=5)
    server_of_sock = "b1" if sock.getpeername()[1] == servers[0].address[1] else "b2"
    client.discard_connection(sock)
    servers[1].stop(timeout=0.1)
    assert wait_until(lambda: client.server_stats()["b2"]["connections"] == 0)
    families = scrape(registry)
    stats = client.server_stats()
    for server_id, labels in (("b1", b1), ("b2", b2)):
        for key in ("errors", "evictions", "early_deaths", "retired"):
            sample = f"callosum_server_{key}_total"
            assert value(families, sample, **labels) == stats[server_id][key + "_total"], sample
    b1_errors = value(families, "callosum_server_errors_total", **b1)
    b2_errors = value(families, "callosum_server_errors_total", **b2)
    assert (b1_errors, b2_errors) == ((1, 0) if server_of_sock == "b1" else (0, 1))
    b2_gone = 2 - int(server_of_sock == "b2")
    assert value(families, "callosum_server_evictions_total", **b2) == b2_gone
    assert value(families, "callosum_server_connections", **b2) == 0
    assert value(families, "callosum_connections", pool="p") == 4 - 1 - b2_gone


def test_retired_servers_are_counted(client: CallosumClient, servers: list[CallosumServer]) -> None:
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="p"))
    for _ in range(3):
        connect(client, servers[0], "b1")
    assert client.retire_server("b1") == 3
    families = scrape(registry)
    assert value(families, "callosum_server_retired_total", pool="p", server="b1") == 3
    assert value(families, "callosum_connections_retired_total", pool="p") == 3
    assert value(families, "callosum_ready", pool="p") == 0


def test_server_ids_that_are_not_strings_are_labelled_by_str(
    client: CallosumClient, servers: list[CallosumServer]
) -> None:
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="p"))
    connect(client, servers[0], 7)
    connect(client, servers[1], ("backend", 2))
    connect(client, servers[2], None)  # named by its peer address
    families = scrape(registry)
    assert {s.labels["server"] for s in families["callosum_server_connections"].samples} == {
        "7",
        "('backend', 2)",
        address_of(servers[2]),
    }


def test_rover_fed_pool_has_one_server_label_per_server(
    client: CallosumClient, servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    rover = make_rover(client, servers, interval=60)
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="rpc", rover=rover))
    filled(client, rover)
    round_trips(client, 9)
    families = scrape(registry)
    stats = client.server_stats()
    assert {s.labels["server"] for s in families["callosum_server_connections"].samples} == {
        str(server_id) for server_id in stats
    }
    leases = families["callosum_server_leases"].samples
    assert sum(s.value for s in leases) == 9
    assert sum(s.value for s in families["callosum_server_connections"].samples) == value(
        families, "callosum_connections", pool="rpc"
    )


def test_health_and_metrics_on_one_gevent_pywsgi_server(
    client: CallosumClient, servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    rover = make_rover(client, servers, interval=60)
    # The README's recipe, as written there.
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="rpc", rover=rover))
    metrics_app = make_wsgi_app(registry)

    def ops_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/health":
            ready = client.ready()
            status = "200 OK" if ready else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain")])
            return [b"ready\n" if ready else b"no live backend connection\n"]
        body: list[bytes] = metrics_app(environ, start_response)
        return body

    ops = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), ops_app, log=None)
    ops.start()
    try:
        assert get(ops, "/health")[0].startswith(b"HTTP/1.1 503")
        filled(client, rover)
        head, body = get(ops, "/health")
        assert head.startswith(b"HTTP/1.1 200") and body == b"ready\n"
        head, body = get(ops, "/metrics")
    finally:
        ops.stop(timeout=1)
    assert head.startswith(b"HTTP/1.1 200")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert value(families, "callosum_ready", pool="rpc") == 1


# -- a CallosumServer ---------------------------------------------------------


def test_server_counters_are_scraped_by_address_or_name(
    client: CallosumClient, servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    collector = CallosumCollector(server=servers[0])
    collector.add_server(servers[1], name="second")
    registry = CollectorRegistry()
    registry.register(collector)
    filled(client, make_rover(client, servers[:2], interval=60))
    # Connections the client turned down are closed; wait for the servers to see it.
    assert wait_until(lambda: sum(s.stats()["active"] for s in servers[:2]) == 6)
    families = scrape(registry)
    first = {"server": address_of(servers[0])}
    second = {"server": "second"}
    assert label_sets(families, "callosum_listener_connections") == [first, second]
    for server, labels in ((servers[0], first), (servers[1], second)):
        stats = server.stats()
        assert value(families, "callosum_listener_connections", **labels) == stats["active"]
        assert value(families, "callosum_listener_accepted_total", **labels) == stats["accepted"]
        assert value(families, "callosum_listener_refused_total", **labels) == 0
        assert value(families, "callosum_listener_slot_line_failures_total", **labels) == 0
        assert value(families, "callosum_listener_handler_errors_total", **labels) == 0
        assert value(families, "callosum_listener_weight", **labels) == 1
    assert sum(value(families, "callosum_listener_connections", **x) for x in (first, second)) == 6
    assert "callosum_ready" not in families  # no pool added

    collector.remove_server(servers[0])
    assert label_sets(scrape(registry), "callosum_listener_connections") == [second]


# -- where and how the scrape runs ---------------------------------------------


def test_collecting_never_yields_to_other_greenlets(
    client: CallosumClient, servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    rover = make_rover(client, servers, interval=60)
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, rover=rover, server=servers[0]))
    filled(client, rover)
    ran: list[bool] = []
    gevent.spawn(ran.append, True)
    for _ in range(3):
        generate_latest(registry)
    assert ran == []
    gevent.sleep(0)
    assert ran == [True]  # the greenlet was ready: a yield would have run it


def test_a_scrape_from_another_os_thread_is_read_by_the_hub(
    client: CallosumClient, servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    rover = make_rover(client, servers, interval=60)
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="rpc", rover=rover))
    filled(client, rover)
    # prometheus_client's own HTTP server, in a thread of its own (not monkey-patched).
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/metrics"

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: bytes = response.read()
                return body

        # The fetching thread waits for the HTTP thread, which waits for this hub.
        body = gevent.get_hub().threadpool.spawn(fetch).get(timeout=20)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert value(families, "callosum_connections", pool="rpc") == 6
    assert value(families, "callosum_ready", pool="rpc") == 1


def test_a_hub_that_does_not_answer_is_left_out_of_the_scrape(
    client: CallosumClient, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, hub_timeout=0.05))
    bodies: list[bytes] = []
    scraper = _Thread(target=lambda: bodies.append(generate_latest(registry)))
    with caplog.at_level(logging.WARNING, logger="callosum_gevent"):
        scraper.start()
        # An OS-level join: the hub is blocked until the scraping thread has given up.
        scraper.join()
    assert len(bodies) == 1
    assert b"callosum_" not in bodies[0]
    assert "did not answer" in caplog.text
    gevent.sleep(0)  # the hub now runs the late read; it must not fail
    assert b"callosum_ready" in generate_latest(registry)


def test_errors_in_another_thread_reach_the_scraper(client: CallosumClient) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("stats broke")

    client.stats = broken  # type: ignore[method-assign]
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client))
    with pytest.raises(RuntimeError, match="stats broke"):
        generate_latest(registry)
    errors: list[BaseException] = []

    def scrape_in_thread() -> None:
        try:
            generate_latest(registry)
        except RuntimeError as exc:
            errors.append(exc)

    gevent.get_hub().threadpool.spawn(scrape_in_thread).get(timeout=20)
    assert [str(e) for e in errors] == ["stats broke"]


def test_served_over_http_by_gevent_pywsgi(
    client: CallosumClient, servers: list[CallosumServer], make_rover: Callable[..., Rover]
) -> None:
    rover = make_rover(client, servers, interval=60)
    registry = CollectorRegistry()
    registry.register(CallosumCollector(client, pool="web", rover=rover))
    filled(client, rover)
    http = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), make_wsgi_app(registry), log=None)
    http.start()
    try:
        head, body = get(http, "/metrics")
    finally:
        http.stop(timeout=1)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Type: text/plain" in head
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert value(families, "callosum_connections", pool="web") == 6


# -- arguments -------------------------------------------------------------------


def test_bad_arguments_are_refused_and_change_nothing(
    client: CallosumClient, servers: list[CallosumServer]
) -> None:
    collector = CallosumCollector(client, pool="a")
    with pytest.raises(TypeError, match="client"):
        collector.add_pool(object(), pool="b")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rover"):
        collector.add_pool(CallosumClient(), pool="b", rover=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pool"):
        collector.add_pool(CallosumClient(), pool=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool"):
        collector.add_pool(CallosumClient(), pool="")
    with pytest.raises(ValueError, match="'a' is already added"):
        collector.add_pool(CallosumClient(), pool="a")
    with pytest.raises(ValueError, match="client is already added"):
        collector.add_pool(client, pool="b")
    with pytest.raises(ValueError, match="'b' is not added"):
        collector.remove_pool("b")
    assert collector.pools == ("a",)

    with pytest.raises(TypeError, match="server"):
        collector.add_server(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        collector.add_server(servers[0], name=3)  # type: ignore[arg-type]
    collector.add_server(servers[0], name="s")
    with pytest.raises(ValueError, match="already added"):
        collector.add_server(servers[0], name="t")
    with pytest.raises(ValueError, match="'s' is already added"):
        collector.add_server(servers[1], name="s")
    with pytest.raises(ValueError, match="not added"):
        collector.remove_server(servers[1])

    with pytest.raises(TypeError, match="hub_timeout"):
        CallosumCollector(hub_timeout="1")  # type: ignore[arg-type]
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="hub_timeout"):
            CallosumCollector(hub_timeout=bad)
    with pytest.raises(ValueError, match="rover"):
        CallosumCollector(rover=Rover(client))


def test_without_prometheus_client_the_import_error_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "import callosum_gevent\n"
        "try:\n"
        "    import callosum_gevent.prometheus\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=20
    ).stdout
    assert "callosum_gevent[prometheus]" in out
    assert "prometheus_client" in out


def test_the_package_imports_without_the_extra() -> None:
    code = "import sys; sys.modules['prometheus_client'] = None; import callosum_gevent"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)


def pool_in_another_thread(
    collector: CallosumCollector, name: str, *, then: Callable[[], object]
) -> Any:
    """Add a pool from an OS thread of its own (its own hub), then run ``then`` there."""
    added = gevent.monkey.get_original("threading", "Event")()

    def run() -> None:
        with CallosumClient(max_slots=2) as other:
            collector.add_pool(other, pool=name)
            added.set()
            then()

    thread = _Thread(target=run, daemon=True)
    thread.start()
    added.wait(10)
    return thread


def test_a_scrape_shares_one_deadline_across_hubs_that_do_not_answer(
    client: CallosumClient, caplog: pytest.LogCaptureFixture
) -> None:
    collector = CallosumCollector(client, pool="here", hub_timeout=0.5)
    registry = CollectorRegistry()
    registry.register(collector)
    release = gevent.monkey.get_original("threading", "Event")()
    # Each thread's hub is stuck in an OS-level wait: it never runs the read.
    threads = [
        pool_in_another_thread(collector, f"stuck{i}", then=lambda: release.wait(20))
        for i in range(4)
    ]
    try:
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="callosum_gevent"):
            body = generate_latest(registry)
        took = time.monotonic() - began
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    assert b'callosum_ready{pool="here"} 0.0' in body  # read, though empty
    assert b"stuck" not in body
    # One deadline for the whole scrape, not 0.5 s per hub (2 s for four);
    # the margin is generous.
    assert took < 1.5, took


@pytest.mark.parametrize("how", ["destroyed", "thread ended"])
def test_a_pool_whose_hub_is_gone_is_left_out_without_waiting_or_raising(
    client: CallosumClient, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    collector = CallosumCollector(client, pool="here", hub_timeout=5)
    registry = CollectorRegistry()
    registry.register(collector)

    def end() -> None:
        if how == "destroyed":
            gevent.get_hub().destroy(destroy_loop=True)

    pool_in_another_thread(collector, "gone", then=end).join(10)
    with caplog.at_level(logging.WARNING, logger="callosum_gevent"):
        began = time.monotonic()
        body = generate_latest(registry)
        assert time.monotonic() - began < 2.5  # generous: it must not wait 5 s
        generate_latest(registry)
    assert b'callosum_ready{pool="here"} 0.0' in body  # read, though empty
    assert b'pool="gone"' not in body
    assert caplog.text.count("gone") == 1  # said once, not at every scrape
