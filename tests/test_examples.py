"""Each example runs to completion as its own process and says what it did."""

from __future__ import annotations

import pytest
from _processes import ROOT, run_python

EXAMPLES = ROOT / "examples"


@pytest.mark.timeout(40)
def test_quickstart_prints_the_echoed_request() -> None:
    done = run_python(str(EXAMPLES / "quickstart.py"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello, callosum\n"
    assert done.stderr == ""


@pytest.mark.timeout(40)
def test_legacy_example_feeds_stdlib_sockets_and_serves_every_thread() -> None:
    done = run_python(str(EXAMPLES / "legacy_monkeypatched.py"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    offers = [line for line in lines if line.startswith("offered slot")]
    assert len(offers) == 6
    assert sum(line.endswith(": kept") for line in offers) == 3
    assert "8 replies, from ports" in done.stdout
    assert lines[-1] == "client holds 3 connections"
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(40)
def test_wsgi_app_self_test_answers_every_request() -> None:
    done = run_python(str(EXAMPLES / "wsgi_app.py"), "--self-test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "self-test: 20/20 requests answered 200 by" in done.stdout
    assert "Traceback" not in done.stderr
