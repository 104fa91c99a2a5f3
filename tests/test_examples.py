"""Each example runs to completion as its own process and says what it did."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from _processes import ROOT, child_env, line_server, run_python, stop

from callosum_gevent.__main__ import _parser

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


def _python_block(heading: str) -> str:
    """Return the first ``python`` code block under the README's ``## heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


@pytest.mark.timeout(40)
def test_readme_quickstart_and_retry_example_run(tmp_path: Path) -> None:
    quickstart = _python_block("Quickstart")
    retry = _python_block("Timeouts and retries")
    setup, teardown, rest = quickstart.partition("rover.stop()")
    assert teardown, "the quickstart no longer ends with rover.stop()"
    script = tmp_path / "readme_example.py"
    script.write_text(f"{setup}{retry}\nprint(call_idempotent(b'again'))\n{teardown}{rest}")
    done = run_python(str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "b'echo hello\\n'\nb'echo again\\n'\n"
    assert done.stderr == ""


def test_kubernetes_manifest_puts_backends_behind_a_headless_service() -> None:
    yaml = pytest.importorskip("yaml")
    documents = yaml.safe_load_all((EXAMPLES / "kubernetes.yaml").read_text())
    by_name = {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in documents}
    service = by_name["Service/line-backend"]["spec"]
    backend = by_name["Deployment/line-backend"]["spec"]["template"]
    frontend = by_name["Deployment/frontend"]["spec"]["template"]["spec"]["containers"][0]

    # Headless: the name resolves to every pod, so the rover sees each as a server.
    assert service["clusterIP"] == "None"
    assert service["selector"].items() <= backend["metadata"]["labels"].items()
    (port,) = service["ports"]
    (container,) = backend["spec"]["containers"]
    assert {"name": port["targetPort"], "containerPort": port["port"]} in container["ports"]

    # The backend runs this package's server, with options its CLI accepts.
    command = container["command"]
    assert command[:2] == ["callosum-gevent", "serve"]
    options = _parser()[0].parse_args(command[1:])
    assert (options.host, options.port) == ("0.0.0.0", port["port"])
    # The drain must end before the kubelet's SIGKILL.
    assert options.drain_timeout < backend["spec"]["terminationGracePeriodSeconds"]

    # The front end points the example app's rover at the Service's name.
    env = {item["name"]: item["value"] for item in frontend["env"]}
    host, _, backends_port = env["BACKENDS"].rpartition(":")
    assert host.split(".")[0] == "line-backend" and int(backends_port) == port["port"]
    module, _, attribute = frontend["command"][-1].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file() and attribute == "app"
