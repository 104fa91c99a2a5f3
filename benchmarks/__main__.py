"""Run the benchmarks: ``python -m benchmarks [--quick] [--save] [name ...]``."""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path
from typing import Any

from ._harness import RESULTS_DIR, machine_info, save_json

NAMES = (
    "pool",
    "contention",
    "roundtrip",
    "detect",
    "scale",
    "fill",
    "watcher",
    "balance",
    "restart",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="name", help=" ".join(NAMES))
    parser.add_argument("--quick", action="store_true", help="few-second smoke run")
    parser.add_argument(
        "--save", action="store_true", help="with --quick, still write into benchmarks/results/"
    )
    args = parser.parse_args(argv)
    names = args.names or list(NAMES)
    unknown = set(names) - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmark(s): {' '.join(sorted(unknown))}")
    info = machine_info()
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()))
    out_dir = RESULTS_DIR if args.save or not args.quick else Path(tempfile.mkdtemp())
    missed = 0
    for name in names:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.{name}":
                raise
            print(f"\n[{name}] skipped: benchmarks/{name}.py is missing")
            continue
        print(f"\n=== {name}{' (quick)' if args.quick else ''} ===")
        started = time.perf_counter()
        result: dict[str, Any] = module.run(args.quick)
        seconds = time.perf_counter() - started
        missed += sum(not t["met"] for t in result.get("targets", []))
        record = {"name": name, "quick": args.quick, "seconds": seconds, "machine": info, **result}
        print(f"[{name}] {seconds:.1f} s, written to {save_json(name, record, out_dir)}")
    note = " (quick: a smoke run, too short for the figures to mean much)" if args.quick else ""
    print(f"\n{missed} target(s) missed{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
