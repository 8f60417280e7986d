"""The root dagster.yaml is the instance the `dagster` CLI and `dagster dev` (make ui) use, and
nothing but .dagster_home/ is written beside it.

A copy of the project root (its dagster.yaml, nothing else) in a temporary folder is DAGSTER_HOME
and the working directory, as the Makefile sets them; a trivial asset (printing, so compute logs
are written) is materialised through the CLI and `dagster dev` serves the UI for it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, REPO

pytestmark = pytest.mark.slow

ASSET = '''
import dagster as dg


@dg.asset
def hello():
    print("hello from a step")
    return 1


defs = dg.Definitions(assets=[hello])
'''


@pytest.fixture()
def root(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dagster.yaml", project / "dagster.yaml")
    code = tmp_path / "hello_defs.py"
    code.write_text(ASSET)
    env = {**os.environ, "DAGSTER_HOME": str(project), "DAGSTER_DISABLE_TELEMETRY": "1"}
    return project, code, env


def test_the_cli_and_dagster_dev_read_the_root_file_and_write_only_dot_dagster_home(root):
    project, code, env = root
    run = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-f", str(code), "--select", "hello"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    data = project / ".dagster_home"
    assert (data / "storage" / "history" / "runs.db").is_file()
    assert (data / "storage" / "schedules" / "schedules.db").is_file()
    assert any((data / "compute_logs").iterdir()), "compute logs are in .dagster_home/compute_logs"
    assert (data / "local_artifacts").is_dir()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = project.parent / "dev.log"
    with open(log, "w") as out:
        dev = subprocess.Popen([str(BIN / "dagster"), "dev", "-f", str(code), "-h", "127.0.0.1", "-p", str(port)],
                               cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert dev.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(2)
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:  # dagster dev can miss a SIGTERM that lands while it starts
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(timeout=60)
    text = log.read_text()
    assert "dagster.yaml" not in text, text[-4000:]  # no warning about another instance file
    assert sorted(p.name for p in project.iterdir()) == [".dagster_home", "dagster.yaml"]
