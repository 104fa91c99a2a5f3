"""The demo's slowdown: a fast server turns slow part way, and the table shows where
the requests went before and after."""

from __future__ import annotations

import io
import math
import re

import pytest

from callosum_gevent.__main__ import main
from callosum_gevent._demo import (
    SLOW_AT,
    CallosumPools,
    DemoOptions,
    Fleet,
    Progress,
    RandomPools,
    RunResult,
    run_once,
)


@pytest.mark.parametrize(("servers", "turner"), [(2, "s3"), (3, "s2"), (4, "s2"), (6, "s2")])
def test_the_server_that_turns_slow_is_fast_and_lives_to_the_end(servers: int, turner: str) -> None:
    options = DemoOptions(servers=servers)
    assert options.turner_id == turner
    # Neither the killed one nor the one slow from the start (with two
    # servers, those are both: the joiner turns slow instead).
    assert options.turner_id not in (options.victim_id, options.slow_id)


@pytest.mark.parametrize("factor", [0.5, 0.0, -1.0, math.nan])
def test_turns_slow_below_one_is_refused_naming_it(factor: float) -> None:
    with pytest.raises(ValueError, match="turns_slow"):
        DemoOptions(turns_slow=factor)


def test_turns_slow_below_one_exits_2_with_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--turns-slow", "0.5"])
    assert exit_.value.code == 2
    assert "turns_slow must be >= 1" in capsys.readouterr().err


@pytest.mark.timeout(10)
def test_fleet_slows_a_running_server_and_one_that_starts_later() -> None:
    options = DemoOptions(servers=2, service_time=0.01)
    fleet = Fleet(options)
    try:
        fleet.start("s1")
        fleet.slow_down("s1", 3.0)
        assert fleet.services["s1"].service_time == pytest.approx(0.03)
        # The joiner turns slow before it has joined: it starts slow.
        fleet.slow_down(options.joiner_id, 4.0)
        fleet.start(options.joiner_id)
        assert fleet.services[options.joiner_id].service_time == pytest.approx(0.04)
    finally:
        fleet.stop()


def shares(result: RunResult, sid: str) -> tuple[float, float]:
    """The server's share of the requests sent before and after the slowdown."""
    return (
        result.before[sid] / sum(result.before.values()),
        result.after[sid] / sum(result.after.values()),
    )


@pytest.mark.timeout(60)
def test_callosum_moves_requests_off_the_server_that_turns_slow() -> None:
    options = DemoOptions(requests=2000, duration=2, seed=2)
    runs = {
        pools: run_once(options, pools, Progress(io.StringIO(), "test", options.requests))
        for pools in (CallosumPools, RandomPools)
    }
    for result in runs.values():
        answered = sum(map(len, result.latencies.values()))
        assert sum(result.before.values()) + sum(result.after.values()) == answered
        # The slowdown came after about SLOW_AT of the requests.
        assert sum(result.after.values()) > (1 - SLOW_AT) * answered / 2
    turner, peer = options.turner_id, "s3"  # s3: as fast, alive all along, never slowed
    callosum = {sid: shares(runs[CallosumPools], sid) for sid in (turner, peer)}
    randomly = {sid: shares(runs[RandomPools], sid) for sid in (turner, peer)}
    # Random choice keeps sending it as much as its peer; Callosum's
    # connections to it stay busy longer, so they are idle, and lent, less
    # often (about 0.4x its peer's share; without the slowdown about 1x).
    assert randomly[turner][1] > 0.6 * randomly[peer][1]
    assert callosum[turner][1] < 0.7 * callosum[peer][1]
    assert callosum[turner][1] < callosum[turner][0]


SMALL_DEMO = ["demo", "--requests", "400", "--duration", "1", "--users", "40", "--clients", "2"]


@pytest.mark.timeout(40)
def test_demo_table_shows_where_requests_went_before_and_after_the_slowdown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([*SMALL_DEMO, "--turns-slow", "4", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert f"s2 turns 4x slower after {SLOW_AT:.0%}" in out
    rows = {
        line.split()[0]: [cell.split() for cell in line.split("|")[1:]]
        for line in out.splitlines()
        if line.count("|") == 2 and line.split()
    }
    assert rows["server"][0][-2:] == ["before", "after"]
    assert "4x slower at 60%" in next(ln for ln in out.splitlines() if ln.startswith("s2 "))
    servers = ["s1", "s2", "s3", "s4", "s5"]
    for pool in (0, 1):
        percent = {sid: [int(cell.rstrip("%")) for cell in rows[sid][pool][-2:]] for sid in servers}
        assert percent["s1"][1] == 0  # killed before the slowdown
        for phase in (0, 1):  # each column sums to 100, give or take rounding
            assert abs(sum(p[phase] for p in percent.values()) - 100) <= 3
        assert rows["all"][pool][-2:] == ["100%", "100%"]
        summary = re.search(
            r"it got (\d+)% of Callosum's requests \((\d+)% before\) and (\d+)% of random "
            r"choice's \((\d+)% before\)",
            out,
        )
        assert summary is not None
        after, before = int(summary[1 + 2 * pool]), int(summary[2 + 2 * pool])
        assert [before, after] == percent["s2"]
