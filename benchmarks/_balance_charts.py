"""PNG charts of the balance benchmark (needs matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SMOOTH = 4  # samples per plotted rate point, at least
MARKS = {
    "m0": ":",
    "m1": ":",
    "slow": "--",
    "stall": "--",
    "unstall": "-.",
    "kill": "--",
    "add": "-.",
}


def _marks(ax: Any, marks: dict[str, float]) -> None:
    for key, style in MARKS.items():
        if key in marks:
            ax.axvline(marks[key], color="grey", linestyle=style, linewidth=0.8)


def _per_server(
    ax: Any, t: Sequence[float], values: Sequence[Sequence[float]], smooth: int
) -> None:
    """Plot one line per server, each point the mean of ``smooth`` samples."""
    ends = range(smooth, len(values) + 1, smooth)
    for i in range(len(values[0])):
        means = [sum(row[i] for row in values[k - smooth : k]) / smooth for k in ends]
        ax.plot([t[k - 1] for k in ends], means, label=f"s{i}")


def _grid(runs: dict[str, Any], key: str, ylabel: str, smooth: int, path: Path) -> Path:
    cols = 2
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.6 * rows), squeeze=False)
    for ax, (name, run) in zip(axes.flat, runs.items(), strict=False):
        # About 150 points a line, however long the run.
        _per_server(ax, run["t"], run[key], max(smooth, len(run[key]) // 150))
        _marks(ax, run["marks"])
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes.flat[len(runs) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, ncol=5)
    fig.supxlabel(
        "seconds (dotted: steady window; slowdown: dashed at the change; "
        "churn: dashed at the kill of s0, dash-dot at the add of s4)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _cdf(cdfs: dict[str, dict[str, list[float]]], path: Path) -> Path:
    cols = min(3, len(cdfs))
    rows = math.ceil(len(cdfs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, (title, per_balancer) in zip(axes.flat, cdfs.items(), strict=False):
        for name, values in per_balancer.items():
            finite = [v * 1000 for v in values if math.isfinite(v)]
            n = max(1, len(values))
            ax.plot(finite, [(k + 1) / n for k in range(len(finite))], label=name)
        ax.set_xscale("log")
        ax.set_title(f"latency CDF: {title} (failures never reach 1)", fontsize=9)
        ax.set_xlabel("ms from scheduled arrival")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(cdfs) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _rolling(slowdown: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, row in slowdown.items():
        length, step = row["roll_s"]
        values = row["rolling_p99_ms"]
        ax.plot([k * step + length for k in range(len(values))], values, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("seconds after a fast server turned 3x slower (end of each rolling window)")
    ax.set_ylabel("p99 ms in the window")
    ax.set_title("slowdown at 70% load: rolling p99", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw(
    directory: Path, cdfs: dict[str, dict[str, list[float]]], results: dict[str, Any]
) -> list[Path]:
    """Draw the charts into ``directory`` and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    if cdfs:
        paths.append(_cdf(cdfs, directory / "balance-cdf.png"))
    if results["slowdown"]:
        paths.append(_rolling(results["slowdown"], directory / "balance-slowdown.png"))
    runs = results["series"]
    if runs:
        paths.append(_grid(runs, "rate", "req/s", SMOOTH, directory / "balance-load.png"))
        callosum = {k: v for k, v in runs.items() if "callosum" in k}
        if callosum:
            paths.append(
                _grid(callosum, "conns", "connections", 1, directory / "balance-conns.png")
            )
    return paths
