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

import json
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

from stage1_assets.assets._common import HEADLINE_KEYS
from stage1_assets.partitions import GROUPS
from stage1_core.config import Stage1ProConfig
from stage1_core.phases import CRITERIA, PHASES
from stage1_core.steps.context import Layout
from stage1_core.steps.summary import summary_table
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
    """End ``dagster dev`` and its children (webserver, daemon, code servers): its whole process group.

    SIGTERM first; then SIGKILL for whatever is left (``dagster dev`` ignores SIGTERM when it was
    started with SIGINT ignored, as background jobs of a non-interactive shell are).
    """
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


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
            [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            cwd=ui_project.home, env=ui_project.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
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
            args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1200},
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
    """Open an asset's page (its Overview tab, or ``view``: checks, partitions, ...) once it has loaded."""
    page.goto(f"{base}/assets/{asset}" + (f"?view={view}" if view else ""))
    if view == "checks":
        page.get_by_text("Checks (").first.wait_for()
    else:
        page.locator("thead td:text-is('Key')").first.wait_for()
    page.wait_for_load_state("networkidle")


def shoot(page: Any, name: str, height: int = 1000) -> Path:
    """Screenshot of the window, ``height`` pixels tall (the UI scrolls inside panes, not the page)."""
    path = SCREENSHOTS / f"{name}.png"
    page.set_viewport_size({"width": 1600, "height": height})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1600, "height": 1200})
    return path


def latest_metadata(project: Project, asset: str, partition: str) -> dict[str, Any]:
    """The metadata of the latest materialisation of ``asset[partition]``, read from the instance."""
    import dagster as dg

    with project.instance() as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
        assert records, f"{asset}[{partition}] was never materialised in {project.home}"
        return dict(records[0].asset_materialization.metadata)


#: Right edge of each inline table and figure against the right edge of the metadata pane: what
#: sticks out is cut off on screen.
OVERFLOW_JS = """() => {
    const outer = [...document.querySelectorAll('table')].find(t => t.rows[0] && t.rows[0].innerText.startsWith('Key'));
    const pane = outer.parentElement.getBoundingClientRect();
    const inner = [...outer.querySelectorAll('table, img')];
    return inner.filter(e => e.getBoundingClientRect().right > pane.right + 1)
                .map(e => (e.alt || e.rows[0].innerText).slice(0, 60));
}"""


def metadata_keys(page: Any) -> list[str]:
    """The keys of the asset page's metadata table, top to bottom."""
    return page.evaluate("""() => {
        const outer = [...document.querySelectorAll('table')]
            .find(t => t.rows[0] && t.rows[0].innerText.startsWith('Key'));
        return [...outer.tBodies[0].rows].map(r => r.cells[0].innerText.trim());
    }""")


def significant_digits(text: str) -> int:
    """Significant digits of a decimal number as the UI shows it (``0.004219`` -> 4)."""
    mantissa = text.lower().split("e")[0].lstrip("-").replace(".", "")
    return len(mantissa.lstrip("0")) or 1


def test_dagster_dev_starts_without_a_misleading_warning(dagster_ui):
    _, log = dagster_ui
    text = log.read_text()
    assert "will not be used" not in text, text[-3000:]
    assert "Error loading repository location" not in text, text[-3000:]


def test_evaluation_page_shows_headline_metrics_table_and_figures_inline(page, dagster_ui, ui_project):
    base, _ = dagster_ui
    metadata = latest_metadata(ui_project, "evaluation", "phase1")
    figures = [key.removeprefix("figure: ") for key in metadata if key.startswith("figure: ")]
    assert figures, f"the evaluation recorded no figure: {sorted(metadata)}"
    open_asset(page, base, "evaluation")
    metrics = page.locator("table:has(th:text-is('ci_upper'))").filter(has=page.locator("td:text-is('accuracy')")).last
    metrics.wait_for()
    assert metrics.locator("th").all_inner_texts() == ["metric", "value", "ci_lower", "ci_upper"]
    for title in figures:
        image = page.locator(f'img[alt="{title}"]')
        image.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert page.get_by_text("[Show Markdown]").count() == 0, "no figure or table may hide behind a link"
    keys = metadata_keys(page)
    headline = [k for k in HEADLINE_KEYS if k in metadata]
    assert {"coverage", "fnr_on_exited", "fnr_on_exited_cp_upper", "accuracy", "mcc"} <= set(headline), headline
    assert keys[:len(headline)] == headline, f"the figures compared across phases come first: {keys}"
    assert not {"delta", "n_bootstrap", "deploy_prior", "target_fnr_exit", "fnr_on_exited_ci"} & set(keys), keys
    assert {"config/target_fnr_exit", "config/delta"} <= set(keys), "the run's constants are definition metadata"
    row = page.locator("tr").filter(has=page.locator("td:text-is('fnr_on_exited')")).first
    shown = row.locator("td").last.inner_text().strip()
    assert significant_digits(shown) <= 4, f"fnr_on_exited shown as {shown!r}: not rounded for display"
    assert page.evaluate(OVERFLOW_JS) == [], "a table or figure is cut off at the right edge"
    shoot(page, "evaluation_overview", height=4200)


def check_rows(page: Any) -> dict[str, str]:
    """Every row of the Checks tab's list: check name -> the status under it."""
    rows = page.locator("[class*='checkRow']")
    rows.first.wait_for()
    found = {}
    for index in range(rows.count()):
        row = rows.nth(index)
        name = row.locator("[title]").first.get_attribute("title")
        found[name] = row.inner_text().strip().splitlines()[-1].strip()
    return found


@pytest.mark.parametrize("asset", sorted({c.asset for c in PHASES[1].criteria}))
def test_checks_tab_lists_every_phase1_criterion_with_its_verdict(asset, page, dagster_ui, ui_project):
    base, _ = dagster_ui
    open_asset(page, base, asset, view="checks")
    rows = check_rows(page)
    phase1 = [c.name for c in PHASES[1].criteria if c.asset == asset]
    others = [c.name for c in CRITERIA.values() if c.asset == asset and c.name not in phase1]
    assert set(rows) == set(phase1) | set(others), rows
    for name in phase1:
        assert rows[name] == "Succeeded", (name, rows)
    for name in others:
        assert rows[name] == "Skipped", f"{name} does not apply to phase1, yet reads {rows[name]!r}"
    for name in phase1:
        page.locator("[class*='checkRow']").filter(has=page.locator(f'[title="{name}"]')).click()
        detail = page.get_by_text("Evaluation result").first
        detail.wait_for()
        message = json.loads((ui_project.artifacts / "gates" / "phase1" / f"{name}.json").read_text())["message"]
        page.get_by_text(message[:40]).first.wait_for()
        assert page.get_by_text("Passed", exact=True).count() >= 1, name
        assert page.get_by_text("phase1", exact=True).count() >= 1, name
    shoot(page, f"checks_{asset}", height=1200)


def test_bundle_page_answers_which_phases_passed_and_which_bundle_is_current(page, dagster_ui, ui_project):
    base, _ = dagster_ui
    config = Stage1ProConfig.from_file(ui_project.config_path)
    expected = {row["phase"]: row for row in summary_table(config, Layout(ui_project.artifacts))}
    assert expected["phase1"]["state"] == "passed" and expected["phase1"]["bundle_id"], expected["phase1"]
    open_asset(page, base, "bundle")
    overview = page.locator("table:has(th:text-is('detail'))").last
    overview.wait_for()
    for key, row in expected.items():
        cells = overview.locator("tr").filter(has=page.locator(f"td:text-is('{key}')")).locator("td")
        state, bundle = (cells.nth(i).inner_text().strip() for i in (1, 2))
        assert " ".join(state.split()) == row["state"], (key, state, row)
        assert bundle == (row["bundle_id"] or "-"), (key, bundle, row)
    assert page.evaluate(OVERFLOW_JS) == [], "a table is cut off at the right edge"
    shoot(page, "bundle_overview", height=2400)


def test_lineage_shows_the_flow_in_order(page, dagster_ui):
    base, _ = dagster_ui
    page.goto(f"{base}/assets/bundle?view=lineage&lineageScope=upstream&lineageDepth=10")
    for name in [GROUPS[k] for k in ("data", "features", "training", "certify", "deploy")]:
        page.get_by_text(name, exact=True).first.wait_for()
    for asset in ("dataset_index", "splits", "backbone", "cached_features", "checkpoint", "predictions", "exit_policy",
                  "evaluation"):
        page.get_by_text(asset, exact=True).first.wait_for()
    page.wait_for_load_state("networkidle")
    shoot(page, "lineage")
