"""Each example runs to completion as its own process and says what it did."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

import pytest
from _processes import ROOT, child_env, line_server, run_python, stop

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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("preload", [False, True])
def test_wsgi_app_serves_under_gunicorn_gevent_workers(preload: bool) -> None:
    pytest.importorskip("gunicorn")
    with line_server("--id", "backend") as (_server, backend):
        command = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "2", "-b", "127.0.0.1:0"]
        # A gevent worker now and then misses a SIGTERM that lands just after it
        # booted (a bare WSGI app does it too); the master kills it after this.
        command += ["--graceful-timeout", "3"]
        gunicorn = subprocess.Popen(
            [*command, *(["--preload"] if preload else []), "examples.wsgi_app:app"],
            cwd=ROOT,
            env=child_env(BACKENDS=backend),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert gunicorn.stderr is not None
            url = None
            while url is None and (line := gunicorn.stderr.readline()):
                if match := re.search(r"Listening at: (http://\S+)", line):
                    url = match.group(1)
            assert url is not None, "gunicorn did not start"
            bodies = []
            for number in range(10):
                with urllib.request.urlopen(f"{url}/?q=hi{number}", timeout=10) as response:
                    assert response.status == 200
                    bodies.append(response.read().decode())
            assert bodies == [f"backend hi{number}\n" for number in range(10)]
        finally:
            err = stop(gunicorn)[1]
        assert gunicorn.returncode == 0, err
        assert "Traceback" not in err
