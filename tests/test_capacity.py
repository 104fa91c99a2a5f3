"""CapacityEstimator alone: requests per busy second, on simulated timelines.

Each timeline lists when requests enter and leave ``server.request()``; the
estimator sees them in time order, exactly as a server would, without sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import pytest

from callosum_gevent._server import WEIGHT_RANGE, weight_for
from callosum_gevent._slots import CapacityEstimator

Spans = list[tuple[float, float]]  # (entered, left) of each request


def feed(estimator: CapacityEstimator, spans: Iterable[tuple[float, float]]) -> list[float]:
    """Replay request spans in time order; return the rates reported on the way."""
    # At a tie a finish goes first (0), then starts (1), then the finish of a
    # request that took no time at all (2), which must follow its own start.
    events = sorted(
        [(start, 1) for start, _ in spans]
        + [(end, 2 if end == start else 0) for start, end in spans]
    )
    reported = []
    for at, kind in events:
        if kind == 1:
            estimator.start(at)
        elif (rate := estimator.finish(at)) is not None:
            reported.append(rate)
    return reported


def serial_queue(service: float, arrivals: Iterable[float]) -> Spans:
    """One request at a time, first come first served; each waits inside the block."""
    spans, free_at = [], 0.0
    for arrival in arrivals:
        free_at = max(free_at, arrival) + service
        spans.append((arrival, free_at))
    return spans


def shared_cpu(service: float, batch: int, batches: int, gap: float) -> Spans:
    """``batch`` requests at once share one CPU (gevent's greenlets): all end together."""
    spans, at = [], 0.0
    for _ in range(batches):
        spans += [(at, at + batch * service)] * batch
        at += batch * service + gap
    return spans


def bursts(rng: random.Random, n: int, mean_gap: float, burst: int) -> list[float]:
    """Arrival times: bursts of ``burst`` requests, exponential gaps between bursts."""
    times, at = [], 0.0
    while len(times) < n:
        at += rng.expovariate(1 / mean_gap)
        times += [at] * burst
    return times[:n]


def mean_duration(spans: Spans) -> float:
    return sum(end - start for start, end in spans) / len(spans)


def test_a_queue_inside_the_request_does_not_lower_the_estimate() -> None:
    # 10 ms per request, one at a time; bursts of 8 wait behind each other.
    spans = serial_queue(0.010, bursts(random.Random(1), 400, 0.2, 8))
    estimator = CapacityEstimator()
    feed(estimator, spans)
    assert estimator.rate == pytest.approx(100.0)
    # Service time alone would count the queue: a request lasts 45 ms on
    # average here, so 1 / duration says 22 per second, not 100.
    assert 1 / mean_duration(spans) < 25


def test_requests_sharing_one_cpu_do_not_lower_the_estimate() -> None:
    # Four greenlets at a time interleave on one CPU: each lasts 4 x 5 ms.
    spans = shared_cpu(0.005, batch=4, batches=100, gap=0.5)
    estimator = CapacityEstimator()
    feed(estimator, spans)
    # Within 1%: a window may close between requests that end at the same instant.
    assert estimator.rate == pytest.approx(200.0, rel=0.01)
    assert 1 / mean_duration(spans) == pytest.approx(50.0)


@pytest.mark.parametrize("speedup", [2.0, 1.5, 3.25])
def test_a_faster_server_measures_faster_by_the_same_ratio(speedup: float) -> None:
    rates = []
    for service in (0.010, 0.010 / speedup):
        estimator = CapacityEstimator()
        feed(estimator, serial_queue(service, bursts(random.Random(2), 600, 0.05, 3)))
        assert estimator.rate is not None
        rates.append(estimator.rate)
    assert rates[1] / rates[0] == pytest.approx(speedup)


def test_idle_time_between_requests_does_not_count() -> None:
    # One 20 ms request every second: the server is idle 98% of the time.
    spans = [(float(i), i + 0.020) for i in range(300)]
    estimator = CapacityEstimator()
    feed(estimator, spans)
    assert estimator.rate == pytest.approx(50.0)


def test_nothing_is_trusted_before_the_blackout_ends() -> None:
    estimator = CapacityEstimator(window=10, blackout=40)
    spans = serial_queue(0.01, [i * 0.02 for i in range(60)])
    events = feed(estimator, spans[:39])
    assert events == [] and estimator.rate is None
    assert feed(estimator, spans[39:40]) == [pytest.approx(100.0)]
    # Then a new sample every window.
    assert len(feed(estimator, spans[40:])) == 2
    assert estimator.completed == 60 and estimator.in_flight == 0


def test_a_change_of_speed_is_followed_within_a_few_windows() -> None:
    estimator = CapacityEstimator(window=50, blackout=200, smoothing=0.2)
    fast = serial_queue(0.005, [i * 0.01 for i in range(400)])
    feed(estimator, fast)
    assert estimator.rate == pytest.approx(200.0)
    # The server turns 3x slower: one window moves a fifth of the way...
    slow = serial_queue(0.015, [5.0 + i * 0.03 for i in range(1000)])
    reported = feed(estimator, slow[:50])
    assert reported == [pytest.approx(200.0 + 0.2 * (66.667 - 200.0), rel=1e-3)]
    # ...and twenty windows later it is within 3% (0.8 ** 20 of the gap is left).
    feed(estimator, slow[50:])
    assert estimator.rate == pytest.approx(66.667 + 133.333 * 0.8**20, rel=1e-3)
    assert estimator.rate == pytest.approx(66.667, rel=0.03)


def test_a_window_closing_mid_busy_stretch_splits_its_time() -> None:
    # Never idle: ten overlapping requests at a time, each 100 ms, staggered.
    spans = [(i * 0.01, i * 0.01 + 0.1) for i in range(500)]
    estimator = CapacityEstimator(window=50, blackout=100, smoothing=1.0)
    first, *rest = feed(estimator, spans)
    # The first 100 requests took 1.09 s of busy time (the first 0.1 s
    # completed nothing); after that, 50 requests every 0.5 s busy second.
    assert first == pytest.approx(100 / 1.09)
    assert len(rest) == 8
    assert all(r == pytest.approx(100.0) for r in rest)


def test_parallel_workers_show_their_overlap_not_their_ceiling() -> None:
    # What busy-time throughput cannot see: four independent workers, lightly
    # loaded, rarely overlap, so the estimate sits near 1 / service time and
    # rises toward 4 / service time only as they fill. Two such servers of
    # different speed at the same load still compare by their speed.
    def workers(service: float, arrivals: list[float], n: int) -> Spans:
        free = [0.0] * n
        spans = []
        for arrival in arrivals:
            i = min(range(n), key=free.__getitem__)
            start = max(arrival, free[i])
            free[i] = start + service
            spans.append((arrival, free[i]))
        return spans

    rng = random.Random(3)
    light = sorted(rng.uniform(0, 100) for _ in range(1000))  # 10/s, 4 x 10 ms workers
    heavy = sorted(rng.uniform(0, 3) for _ in range(1000))  # 333/s, near saturation
    rates = {}
    for name, arrivals, service in (
        ("light", light, 0.010),
        ("heavy", heavy, 0.010),
        ("light-fast", [t / 2 for t in light], 0.005),
    ):
        estimator = CapacityEstimator(blackout=1000)
        feed(estimator, workers(service, arrivals, 4))
        rates[name] = estimator.rate
    assert rates["light"] == pytest.approx(100.0, rel=0.1)
    assert 300.0 < rates["heavy"] <= 400.0
    assert rates["light-fast"] == pytest.approx(2 * rates["light"])


def test_a_clock_that_does_not_move_gives_no_estimate() -> None:
    estimator = CapacityEstimator(window=5, blackout=5)
    assert feed(estimator, [(1.0, 1.0)] * 5) == []
    assert estimator.rate is None


def test_finish_without_start_raises_and_changes_nothing() -> None:
    estimator = CapacityEstimator()
    with pytest.raises(RuntimeError, match="start"):
        estimator.finish(1.0)
    assert estimator.completed == 0 and estimator.in_flight == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"window": 0}, ValueError, "window"),
        ({"window": 2.0}, TypeError, "window"),
        ({"blackout": True}, TypeError, "blackout"),
        ({"blackout": -5}, ValueError, "blackout"),
        ({"smoothing": 0}, ValueError, "smoothing"),
        ({"smoothing": 1.5}, ValueError, "smoothing"),
        ({"smoothing": float("nan")}, ValueError, "smoothing"),
        ({"smoothing": "0.2"}, TypeError, "smoothing"),
    ],
)
def test_bad_settings_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        CapacityEstimator(**kwargs)


def test_weight_is_the_rate_over_the_reference_within_range() -> None:
    low, high = WEIGHT_RANGE
    assert weight_for(2000.0) == 2.0
    assert weight_for(150.0, reference=100.0) == 1.5
    assert weight_for(1e-9) == low
    assert weight_for(1e12) == high


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        (("fast",), TypeError, "rate"),
        ((True,), TypeError, "rate"),
        ((-1.0,), ValueError, "rate"),
        ((float("nan"),), ValueError, "rate"),
        ((100.0, 0), ValueError, "reference"),
        ((100.0, -5.0), ValueError, "reference"),
        ((100.0, float("inf")), ValueError, "reference"),
        ((100.0, float("nan")), ValueError, "reference"),
        ((100.0, "1000"), TypeError, "reference"),
        ((100.0, False), TypeError, "reference"),
        ((10**400,), ValueError, "rate"),
        ((100.0, 10**400), ValueError, "reference"),
    ],
)
def test_weight_for_refuses_bad_arguments_naming_them(
    args: tuple[Any, ...], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        weight_for(*args)
