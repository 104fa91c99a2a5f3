"""Shared benchmark plumbing: interleaved timing, medians, ratios, tables, JSON.

Every benchmark measures its variants inside one repeat in rotating order, so
slow drift of a shared, noisy machine hits all variants alike; ratios to the
reference are taken repeat by repeat (pair by pair) before their median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Samples",
    "fmt_stat",
    "interleave",
    "machine_info",
    "print_table",
    "ratio_stat",
    "save_json",
    "stat",
    "target",
]

Samples = dict[str, list[float]]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """Return the versions and machine facts every result file records."""
    import gevent
    import greenlet

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "gevent": gevent.__version__,
        "greenlet": greenlet.__version__,
        "gevent_loop": type(gevent.get_hub().loop).__module__,
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "loadavg_1m": os.getloadavg()[0],
    }


def interleave(variants: Mapping[str, Callable[[], float]], repeats: int) -> Samples:
    """Run each variant once per repeat, rotating the order, and collect its figures."""
    names = list(variants)
    samples: Samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(variants[name]())
    return samples


def stat(values: Sequence[float]) -> dict[str, float]:
    """Median with min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_stat(values: Sequence[float], ref: Sequence[float]) -> dict[str, float]:
    """Ratios to the reference taken repeat by repeat, then summarised."""
    return stat([v / r for v, r in zip(values, ref, strict=True)])


def fmt_stat(s: Mapping[str, float], digits: int = 0) -> str:
    """Format a stat as ``median (min-max)``."""
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain, aligned text table (Markdown pipes so it pastes anywhere)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(f"\n{title}")
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def target(description: str, met: bool, figure: str) -> dict[str, Any]:
    """Print and return one MET/MISSED line."""
    print(f"  {'MET' if met else 'MISSED'}: {description} -- measured {figure}")
    return {"target": description, "met": met, "figure": figure}


def save_json(name: str, result: Mapping[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Write ``<timestamp>-<name>.json`` and ``latest-<name>.json``; return the first."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = directory / f"{stamp}-{name}.json"
    path.write_text(text)
    (directory / f"latest-{name}.json").write_text(text)
    return path
