"""The Dagster UI as a person sees it: ``dagster dev`` on a phase-1 project, read in headless Chromium.

Starts ``dagster dev`` (the ``make ui`` command: ``-w workspace.yaml``) on a free local port
against a clone of the session's phase-1 project, drives Debian's Chromium through Playwright
(``executable_path``; never a downloaded browser build), dismisses the first-run dialog and
checks what the README promises: the evaluation asset shows its metrics table and its figures
inline, and each asset's Checks tab lists every phase-1 criterion with its verdict, while a
criterion that does not apply to phase 1 is not shown as passed. Screenshots are kept under
``$STAGE1_TEST_ARTIFACTS/ui`` (default ``test-artifacts/ui``) for a person to look at.

Marked slow. It fails (never skips) when Chromium or Playwright is missing: ``.ci/run`` installs
Chromium with apt-get, Playwright comes with the ``dev`` extra.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stage1_core.phases import CRITERIA, PHASES
from tests.integration.conftest import BIN, REPO, Project, clone_project

pytestmark = pytest.mark.slow

#: Debian's Chromium (``apt-get install chromium``); ``STAGE1_CHROMIUM`` points elsewhere.
CHROMIUM = os.environ.get("STAGE1_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: Headless, and quiet on a closed network (without the background-networking flags it is slow).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(os.environ.get("STAGE1_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
PHASE1_CRITERIA = [c.name for c in PHASES[1].criteria]
#: Seconds a page may take to show what is asserted (the UI loads data after the first paint).
PAGE_TIMEOUT_S = 60


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log when it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster dev exited with {process.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"dagster dev did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-6000:]}")


def stop(process: subprocess.Popen) -> None:
    """End ``dagster dev`` and its children (webserver, daemon, code server): its whole process group."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def ui_project(tmp_path_factory, phase1_project) -> Project:
    return clone_project(phase1_project, tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def dagster_ui(ui_project) -> Iterator[tuple[str, Path]]:
    """``dagster dev`` on a free port, as ``make ui`` starts it; yields (base URL, its log)."""
    port = free_port()
    log = ui_project.base / "dagster_dev.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=ui_project.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(base + "/server_info", process, log)
        yield base, log
    finally:
        stop(process)


@pytest.fixture(scope="module")
def page(dagster_ui, tmp_path_factory) -> Iterator[Any]:
    """One Chromium page (fresh profile) on the UI, first-run dialog dismissed."""
    assert Path(CHROMIUM).is_file(), (
        f"Chromium not found at {CHROMIUM}: install Debian's (`apt-get install chromium`, .ci/run does) "
        "or set STAGE1_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        pytest.fail(f"playwright is missing ({exc}): pip install -e '.[dev]' (never run `playwright install`)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    base, _ = dagster_ui
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1000},
        )
        context.set_default_timeout(PAGE_TIMEOUT_S * 1000)
        the_page = context.new_page()
        the_page.goto(base + "/assets")
        dismiss_first_run_dialog(the_page)
        yield the_page
        context.close()


def dismiss_first_run_dialog(page: Any) -> None:
    """Close Dagster's "Join the Dagster community" dialog (shown once per browser profile)."""
    dialog = page.get_by_role("dialog").filter(has_text="Join the Dagster community")
    try:
        dialog.wait_for(state="visible", timeout=20_000)
    except Exception:  # noqa: BLE001 - a release without the dialog is fine
        return
    dialog.get_by_role("button", name="Skip").click()
    dialog.wait_for(state="hidden")


def open_asset(page: Any, base: str, asset: str, view: str | None = None) -> None:
    """Open an asset's page (its Overview tab, or ``view``: checks, partitions, ...)."""
    page.goto(f"{base}/assets/{asset}" + (f"?view={view}" if view else ""))
    page.get_by_role("heading", name=asset).first.wait_for() if False else None
    page.wait_for_load_state("networkidle")


def shoot(page: Any, name: str) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
