"""What a person reads at the end of a run: per phase, the gate verdicts and the current bundle.

Reads files only (no Dagster): each check writes its verdict under ``gates/<phase>/`` and each
failed step writes ``failure.json`` in its asset directory, so the summary can say whether a
run stopped at data validation, at a step, or at a gate, name each failing criterion with its
figures, and never report a stale or missing bundle as current.
"""

from __future__ import annotations

from typing import Any

from stage1_core.artifacts import read_json, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.phases import PHASES, PhaseRecipe, phase_number
from stage1_core.steps.context import UNPARTITIONED, Layout
from stage1_core.store import bundle_dir, read_verdicts

FAILURE_FILE = "failure.json"
STEP_ORDER = ("dataset_index", "splits", "backbone", "cached_features", "checkpoint", "predictions",
              "exit_policy", "evaluation", "bundle")


def record_failure(layout: Layout, asset: str, partition: str | None, message: str) -> None:
    """Remember that a step failed (and why) for the summary; cleared when the step next succeeds."""

    part = None if asset in UNPARTITIONED else partition
    write_json(layout.dir(asset, part) / FAILURE_FILE, {"asset": asset, "partition": part, "message": message})


def clear_failure(layout: Layout, asset: str, partition: str | None) -> None:

    part = None if asset in UNPARTITIONED else partition
    (layout.path(asset, part) / FAILURE_FILE).unlink(missing_ok=True)


def step_failures(layout: Layout, partition: str) -> list[dict[str, Any]]:

    found = []
    for asset in STEP_ORDER:
        path = layout.path(asset, None if asset in UNPARTITIONED else partition) / FAILURE_FILE
        if path.is_file():
            found.append(read_json(path))
    return found


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.2f}%"


def phase_status(config: Stage1ProConfig, layout: Layout, partition: str) -> dict[str, Any]:
    """One phase's state: gate verdicts, failures, the current bundle and its headline figures."""
    from stage1_core.steps.bundle import current_bundle_problems  # torch

    recipe = PHASES[phase_number(partition)]
    verdicts = read_verdicts(layout, partition)
    expected = [c.name for c in recipe.criteria]
    failing = [verdicts[n] for n in expected if n in verdicts and not verdicts[n]["passed"]]
    missing = [n for n in expected if n not in verdicts]
    failures = step_failures(layout, partition)
    bundle_problems = current_bundle_problems(config, layout, partition) if recipe.available else ["not available"]
    directory = bundle_dir(layout, partition)
    headline: dict[str, Any] = {}
    bundle_id = None
    if not bundle_problems:
        manifest = read_json(directory / "bundle.json", schema="bundle")
        headline = manifest["headline"]
        from stage1_core.bundle.load import bundle_id as compute_id

        bundle_id = compute_id(directory)
    if not expected:
        verdict = "not available"
    elif failures and failures[0]["asset"] in ("dataset_index", "splits"):
        verdict = "DATA VALIDATION FAILED"
    elif failing:
        verdict = "GATE FAILED"
    elif failures:
        verdict = "STEP FAILED"
    elif missing:
        verdict = "not run" if len(missing) == len(expected) else "incomplete"
    else:
        verdict = "passed"
    return {"phase": partition, "title": recipe.title, "verdict": verdict, "failing": failing, "missing": missing,
            "failures": failures, "bundle_current": not bundle_problems, "bundle_problems": bundle_problems,
            "bundle_dir": str(directory), "bundle_id": bundle_id, "headline": headline}


def phase_summary_lines(status: dict[str, Any]) -> list[str]:
    """The human-readable lines of :func:`phase_status`: verdict first, figures, then how to fix."""
    lines = [f"{status['phase']}: {status['verdict']} - {status['title']}"]
    for failure in status["failures"]:
        lines.append(f"  step {failure['asset']} failed: {failure['message']}")
    for verdict in status["failing"]:
        lines.append(f"  criterion {verdict['criterion']} FAILED: {verdict['message']}")
    if status["bundle_current"]:
        h = status["headline"]
        fnr = "undefined (no exited positive)" if h.get("fnr_on_exited") is None else _pct(h["fnr_on_exited"])
        lines += [
            f"  bundle {status['bundle_dir']} (id {status['bundle_id']})",
            f"  policy {h.get('policy', 'softmax')}, {_thresholds(h)}"
            if h.get("certified") else "  NOT certified on val_calib: the policy exits nothing",
            f"  certified coverage on val_calib {_pct(h.get('calib_coverage'))} "
            f"(FNR bound {_pct(h.get('calib_fnr_upper_bound'))} <= target {_pct(h.get('target_fnr_exit', h.get('fnr_target')))})",
            f"  val_test coverage {_pct(h.get('coverage'))} at the calibration prior, "
            f"{_pct(h.get('coverage_at_deploy_prior'))} at deploy prior {h.get('deploy_prior')}",
            f"  val_test FNR on exits {fnr} ({h.get('n_false_negatives')}/{h.get('n_exited_positives')}), "
            f"Clopper-Pearson upper bound {_pct(h.get('fnr_on_exited_cp_upper'))}",
            f"  val_test accuracy {_pct(h.get('accuracy'))}, MCC "
            + (f"{float(h['mcc']):.4f}" if h.get("mcc") is not None else "n/a"),
        ]
        if h.get("deploy_pipeline"):
            lines.append(f"  deployment ({h['deploy_pipeline']}) above; clean val_test beside it: coverage "
                         f"{_pct(h.get('clean_coverage'))}, FNR on exits {_pct(h.get('clean_fnr_on_exits'))}, "
                         f"accuracy of round(p) {_pct(h.get('clean_accuracy_round_p'))} vs "
                         f"{_pct(h.get('mixture_accuracy_round_p'))} deployed; levels with FNR significantly "
                         f"above target: {h.get('levels_significantly_above_target')}")
    else:
        lines.append(f"  NO CURRENT BUNDLE: {status['bundle_problems'][0]}")
    return lines


#: The state of a phase in the overview: its gate passed, failed (a criterion, a step or data
#: validation), has not run (or not to the end), was skipped on purpose, or is not in this release.
STATES = ("passed", "failed", "failed, skipped", "not run", "skipped", "not available")


def phase_state(status: dict[str, Any], recipe: PhaseRecipe, skip: dict[str, Any] | None) -> tuple[str, str]:
    """``(state, detail)`` of one phase: one of :data:`STATES` and a short plain-text reason."""
    if not recipe.available or not recipe.criteria:
        return "not available", "not wired into the pipeline in this release"
    verdict = status["verdict"]
    if skip is not None and verdict == "GATE FAILED":
        return "failed, skipped", (f"gate failed: {', '.join(v['criterion'] for v in status['failing'])}; "
                                   f"skipped: {skip.get('reason') or 'no reason given'}")
    if skip is not None:
        return "skipped", f"skipped on purpose: {skip.get('reason') or 'no reason given'}"
    if verdict == "passed":
        tail = "" if status["bundle_current"] else "; " + status["bundle_problems"][0]
        return "passed", "gate passed" + tail
    if verdict == "GATE FAILED":
        return "failed", "gate failed: " + ", ".join(v["criterion"] for v in status["failing"])
    if verdict in ("STEP FAILED", "DATA VALIDATION FAILED"):
        return "failed", f"step {status['failures'][0]['asset']} failed"
    if verdict == "not run":
        after = " and ".join(PHASES[n].key for n in recipe.requires)
        return "not run", "gate not run" + (f"; starts after the gate of {after}" if after else "")
    return "not run", "gate incomplete, not evaluated: " + ", ".join(status["missing"])


def summary_table(config: Stage1ProConfig, layout: Layout) -> list[dict[str, Any]]:
    """One row per phase of :data:`PHASES`: state, why, policy, coverage, FNR on exits, accuracy, MCC, bundle."""
    from stage1_core.phase_state import read_skip

    rows = []
    for recipe in PHASES.values():
        status = phase_status(config, layout, recipe.key)
        state, detail = phase_state(status, recipe, read_skip(layout, recipe.key))
        h = status["headline"]
        rows.append({
            "phase": recipe.key, "state": state, "policy": h.get("policy"),
            "calib_coverage": h.get("calib_coverage"), "test_coverage": h.get("coverage"),
            "test_coverage_deploy": h.get("coverage_at_deploy_prior"), "test_fnr": h.get("fnr_on_exited"),
            "test_fnr_bound": h.get("fnr_on_exited_cp_upper"), "accuracy": h.get("accuracy"), "mcc": h.get("mcc"),
            "clean_coverage": h.get("clean_coverage"), "clean_fnr": h.get("clean_fnr_on_exits"),
            "bundle_id": (status["bundle_id"] or "")[:12] or None, "detail": detail,
        })
    return rows


#: Columns of :func:`format_table`, in order; ``detail`` last because it is the longest.
TABLE_COLUMNS = ("phase", "state", "policy", "calib_coverage", "test_coverage", "test_coverage_deploy", "test_fnr",
                 "test_fnr_bound", "accuracy", "mcc", "clean_coverage", "clean_fnr", "bundle_id", "detail")


#: Columns shown as percentages.
RATE_COLUMNS = frozenset({"calib_coverage", "test_coverage", "test_coverage_deploy", "test_fnr", "test_fnr_bound",
                          "accuracy", "clean_coverage", "clean_fnr"})


def format_cell(column: str, value: Any) -> str:
    """One cell of the overview as text: rates as percentages, MCC with 4 decimals, none as "-"."""
    if value is None:
        return "-"
    if column in RATE_COLUMNS:
        return f"{100 * float(value):.2f}%"
    if column == "mcc":
        return f"{float(value):.4f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a fixed-width text table (percentages for rates)."""
    columns = list(TABLE_COLUMNS)
    table = [[c for c in columns]] + [[format_cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table)


def read_phase_summary(layout: Layout, partition: str, config: Stage1ProConfig | None = None) -> list[str]:
    """The summary lines of one phase (back-compatible entry point)."""
    config = config or Stage1ProConfig()
    return phase_summary_lines(phase_status(config, layout, partition))


__all__ = ["STATES", "format_cell", "phase_state", "phase_status", "phase_summary_lines", "read_phase_summary",
           "record_failure", "clear_failure", "summary_table", "format_table"]


def _thresholds(headline: dict[str, Any]) -> str:
    """``threshold t`` (softmax, gate) or ``lambda1 a, lambda2 b`` (SCRC)."""
    if headline.get("lambda1") is not None or headline.get("lambda2") is not None:
        return f"lambda1 {headline.get('lambda1')}, lambda2 {headline.get('lambda2')}"
    return f"threshold {headline.get('exit_threshold')}"
