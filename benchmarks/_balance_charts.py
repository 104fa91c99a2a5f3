"""PNG charts of the balance benchmark (needs matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SMOOTH = 4  # samples per plotted rate point


def _marks(ax: Any, marks: dict[str, float]) -> None:
    for key, style in (("m0", ":"), ("m1", ":"), ("kill", "--"), ("add", "-.")):
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
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.6 * rows), sharex=True, squeeze=False)
    for ax, (name, run) in zip(axes.flat, runs.items(), strict=False):
        _per_server(ax, run["t"], run[key], smooth)
        _marks(ax, run["marks"])
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes.flat[len(runs) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, ncol=5)
    fig.supxlabel("seconds (dotted: measured window, dashed: kill s0, dash-dot: add s4)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _cdf(cdfs: dict[float, dict[str, list[float]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(cdfs), figsize=(5 * len(cdfs), 4), squeeze=False)
    for ax, (load, per_balancer) in zip(axes.flat, cdfs.items(), strict=True):
        for name, values in per_balancer.items():
            finite = [v * 1000 for v in values if math.isfinite(v)]
            n = max(1, len(values))
            ax.plot(finite, [(k + 1) / n for k in range(len(finite))], label=name)
        ax.set_xscale("log")
        ax.set_title(f"latency CDF at {load:.0%} load (failures never reach 1)", fontsize=9)
        ax.set_xlabel("ms from scheduled arrival")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw(
    directory: Path, cdfs: dict[float, dict[str, list[float]]], runs: dict[str, Any]
) -> list[Path]:
    """Draw the charts into ``directory`` and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [_cdf(cdfs, directory / "balance-cdf.png")]
    if runs:
        paths.append(_grid(runs, "rate", "req/s", SMOOTH, directory / "balance-load.png"))
        callosum = {k: v for k, v in runs.items() if k.startswith("callosum")}
        if callosum:
            paths.append(
                _grid(callosum, "conns", "connections", 1, directory / "balance-conns.png")
            )
    return paths
