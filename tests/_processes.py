"""Run this checkout's command line and examples as child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """Return an environment in which a child process imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("BACKENDS", None)
    env.update(extra)
    return env


def run_python(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` from the checkout to the end and return what it did."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stop(
    process: subprocess.Popen[str], signum: int = signal.SIGTERM, timeout: float = 10
) -> tuple[str, str]:
    """Send *signum*, wait for the exit and return (stdout, stderr)."""
    if process.poll() is None:
        process.send_signal(signum)
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


@contextmanager
def line_server(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``callosum-gevent serve --port 0 *args``; yield it and its ``host:port``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "callosum_gevent", "serve", "--port", "0", *args],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # "serving ID on HOST:PORT"
        if not first.startswith("serving "):
            raise RuntimeError(f"serve did not start: {first!r} {stop(process)[1]!r}")
        yield process, first.split()[-1]
    finally:
        if process.poll() is None:
            stop(process)
