"""Metadata conversion for the Dagster UI: rounding, intervals, constants, tables and figures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import numpy as np

from stage1_assets.assets._common import (
    DISPLAY_COLUMNS,
    FIGURE_NAMESPACE,
    INLINE_WIDTH_PX,
    SHOWN_ID_CHARS,
    constants_metadata,
    display_float,
    figure_metadata,
    metadata_value,
    step_result,
    table,
    to_metadata,
)
from stage1_assets.checks.phase_gates import applies_to, check_description, not_applicable_message, phase_gate_checks
from stage1_assets.partitions import PHASES_TEXT, phases
from stage1_assets.resources import Stage1Resource
from stage1_core.config import Stage1ProConfig
from stage1_core.phases import CRITERIA
from stage1_core.steps.context import StepResult

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def test_floats_are_rounded_for_display_but_stay_floats():
    value = metadata_value(0.91234567891234)
    assert isinstance(value, dg.FloatMetadataValue) and value.value == 0.9123
    assert metadata_value(np.float64(1.23456789e-6)).value == 1.235e-6
    assert display_float(0.0) == 0.0
    assert isinstance(metadata_value(float("nan")), dg.TextMetadataValue)
    assert isinstance(metadata_value(np.int64(7)), dg.IntMetadataValue)
    assert isinstance(metadata_value(True), dg.BoolMetadataValue)


def test_intervals_split_into_lower_and_upper_floats():
    metadata = to_metadata({"fnr_on_exited_ci": [0.0123456, 0.0456789], "accuracy_ci": (None, 0.9)})
    assert metadata["fnr_on_exited_ci_lower"].value == 0.01235
    assert metadata["fnr_on_exited_ci_upper"].value == 0.04568
    assert isinstance(metadata["accuracy_ci_lower"], dg.TextMetadataValue)
    assert "fnr_on_exited_ci" not in metadata
    assert not any(isinstance(v, dg.JsonMetadataValue) for v in metadata.values())


def test_constants_leave_the_materialisation_and_headline_comes_first():
    values = {"n_test": 900, "mcc": 0.8, "target_fnr_exit": 0.02, "delta": 0.05, "n_bootstrap": 200,
              "deploy_prior": 0.5, "accuracy": 0.9, "fnr_on_exited_cp_upper": 0.019, "fnr_on_exited": 0.01,
              "coverage_at_deploy_prior": 0.6, "coverage": 0.61, "policy": "softmax"}
    metadata = to_metadata(values)
    assert not {"target_fnr_exit", "delta", "n_bootstrap", "deploy_prior"} & set(metadata)
    assert list(metadata)[:6] == ["coverage", "coverage_at_deploy_prior", "fnr_on_exited",
                                  "fnr_on_exited_cp_upper", "accuracy", "mcc"]
    assert list(metadata)[6:] == ["n_test", "policy"]


def test_nested_dicts_are_flattened_with_short_names_without_repeating_the_top_level():
    metadata = to_metadata({"n_false_negatives": 1, "fnr_on_exited_cp_upper": 0.0108688, "val_test_fnr_check": {
        "n_false_negatives": 1, "p_value_fnr_above_target": 0.3333333, "target_fnr": 0.02, "alpha": 0.05,
        "fnr_upper_bound": 0.0108688}})
    # Same name and value, or the same float under another name: shown once, at the top level.
    assert set(metadata) == {"n_false_negatives", "fnr_on_exited_cp_upper", "p_value_fnr_above_target"}
    assert metadata["p_value_fnr_above_target"].value == 0.3333
    # A nested name that is taken keeps its parent's prefix.
    clash = to_metadata({"n": 5, "a": {"n": 4}, "b": {"m": 1, "k": 2}, "c": {"m": 3}})
    assert set(clash) == {"n", "a.n", "b.m", "c.m", "k"}


def test_long_hex_ids_are_shortened_for_display():
    full = "ab" * 32
    assert metadata_value(full).value == full[:SHOWN_ID_CHARS] + "\u2026"
    assert metadata_value("softmax").value == "softmax" and metadata_value("abc123").value == "abc123"
    assert table([{"id": full}]).records[0].data["id"] == full[:SHOWN_ID_CHARS] + "\u2026"


def test_constants_go_to_definition_metadata():
    metadata = constants_metadata(Stage1ProConfig())
    assert metadata["config/target_fnr_exit"].value == Stage1ProConfig().target_fnr_exit
    assert {"config/delta", "config/n_bootstrap", "config/deploy_prior"} <= set(metadata)
    assert constants_metadata(None) == {}


def test_table_has_a_typed_schema_and_rounded_cells():
    value = table([{"metric": "accuracy", "value": 0.912345678, "n": 900, "ok": True},
                   {"metric": "mcc", "value": None, "n": 900, "ok": False, "grid": [0.123456, 2]}])
    assert isinstance(value, dg.TableMetadataValue)
    types = {c.name: c.type for c in value.schema.columns}
    assert types == {"metric": "string", "value": "float", "n": "int", "ok": "bool", "grid": "string"}
    records = [r.data for r in value.records]
    assert records[0]["value"] == 0.9123 and records[0]["grid"] is None
    assert records[1]["grid"] == "0.1235, 2"
    json.dumps(records)


def test_known_tables_show_their_glance_columns_and_long_names_may_wrap():
    rows = [{"metric": "fnr_on_exited_undefined_resamples", "value": 0.0, "mean": 0.1, "std": 0.2, "ci_lower": None,
             "ci_upper": None, "n": 200}, {"metric": "accuracy", "value": 0.99, "ci_lower": 0.98, "ci_upper": 1.0}]
    value = table(rows, DISPLAY_COLUMNS["metrics"])
    assert [c.name for c in value.schema.columns] == ["metric", "value", "ci_lower", "ci_upper"]
    long_name = value.records[0].data["metric"]
    assert long_name.replace("\u200b", "") == "fnr_on_exited_undefined_resamples" and "_\u200b" in long_name
    assert value.records[1].data["metric"] == "accuracy", "short names stay as they are"
    renamed = table([{"threshold": 0.5, "n_false_negatives": 3, "extra": 1}], DISPLAY_COLUMNS["seed_grid"])
    assert [c.name for c in renamed.schema.columns] == ["threshold", "fn"]
    whole = table([{"a": 1, "b": 2}], DISPLAY_COLUMNS["metrics"])
    assert [c.name for c in whole.schema.columns] == ["a", "b"], "no known column: the table is shown whole"


def test_each_figure_is_its_own_short_inline_entry_narrowed_and_linked_to_full_size(tmp_path: Path):
    from PIL import Image

    figure = tmp_path / "risk_coverage.png"
    Image.new("RGB", (3 * INLINE_WIDTH_PX, 300), "white").save(figure)
    store = tmp_path / "store"
    value = figure_metadata("risk-coverage (val_test)", figure, store)
    assert isinstance(value, dg.MarkdownMetadataValue)
    assert len(value.md_str) < 1000, "the UI shows Markdown inline only under 1000 characters"
    full, small = sorted(store.glob("*.png"), key=lambda p: len(p.name))
    assert full.read_bytes() == figure.read_bytes()
    with Image.open(small) as image:
        assert image.size == (INLINE_WIDTH_PX, 100)
    assert f"[![risk-coverage (val_test)](/logs/{FIGURE_NAMESPACE}/{small.stem}/png)]" in value.md_str
    assert f"](/logs/{FIGURE_NAMESPACE}/{full.stem}/png)" in value.md_str
    assert str(tmp_path) not in value.md_str, "a long path would widen the page; the asset's path entry has it"
    narrow = tmp_path / "narrow.png"
    narrow.write_bytes(PNG)
    figure_metadata("x", narrow, store)
    assert (store / f"{hashlib.sha256(PNG).hexdigest()}_w{INLINE_WIDTH_PX}.png").read_bytes() == PNG
    assert isinstance(figure_metadata("x", figure, None), dg.PathMetadataValue)


def test_step_result_has_one_entry_per_table_and_figure(tmp_path: Path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(PNG)
    b.write_bytes(PNG + b"\0")
    result = StepResult(tmp_path, {"accuracy": 0.95, "delta": 0.05},
                        tables={"metrics": [{"metric": "x", "value": 1.0, "mean": 1.0}]},
                        figures={"first": a, "second": b})
    metadata = step_result(result, tmp_path / "store").metadata
    assert isinstance(metadata["metrics"], dg.TableMetadataValue)
    assert [c.name for c in metadata["metrics"].schema.columns] == ["metric", "value"]
    assert {"figure: first", "figure: second"} <= set(metadata) and "figures" not in metadata
    assert "delta" not in metadata
    assert len(list((tmp_path / "store").glob("*.png"))) == 4  # full size and inline copy of each


def _run_check(name: str, partition: str, root: Path) -> dg.ExecuteInProcessResult:
    """Run the real gate check ``name`` on a stand-in for its asset, for one phase partition."""
    criterion = CRITERIA[name]

    @dg.asset(name=criterion.asset, partitions_def=phases)
    def stand_in() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    check = next(c for c in phase_gate_checks if dg.AssetCheckKey(dg.AssetKey(criterion.asset), name) in c.check_keys)
    return dg.materialize([stand_in, check], partition_key=partition, raise_on_error=False,
                          resources={"stage1": Stage1Resource(artifacts_root=str(root))})


def test_not_applicable_check_emits_no_verdict_and_blocks_nothing(tmp_path: Path):
    # Not part of phase 1's gate: no evaluation at all (the UI shows "Skipped", not a green pass).
    result = _run_check("no_regression_vs_previous_phase", "phase1", tmp_path)
    assert result.success and result.get_asset_check_evaluations() == []
    assert not (tmp_path / "gates").exists()
    assert applies_to(CRITERIA["no_regression_vs_previous_phase"], "phase2")
    message = not_applicable_message(CRITERIA["no_regression_vs_previous_phase"], "phase1")
    assert "NOT APPLICABLE to phase1" in message and "phase2" in message
    # Part of phase 2's gate: judged, and with nothing to compare against it fails (red), not skipped.
    judged = _run_check("no_regression_vs_previous_phase", "phase2", tmp_path)
    [evaluation] = judged.get_asset_check_evaluations()
    assert evaluation.passed is False and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert "phase2" in (evaluation.description or "")


def test_descriptions_are_plain_text_and_name_the_phases():
    text = check_description(CRITERIA["no_regression_vs_previous_phase"])
    assert "``" not in text and "phase2" in text and "phase1" not in text.split("In other phases")[0]
    assert "phase2: " in PHASES_TEXT and "waits for the gate of phase1" in PHASES_TEXT
    assert "``" not in PHASES_TEXT


def test_inline_metrics_table_leaves_out_bookkeeping_rows_the_file_keeps(tmp_path: Path):
    rows = [{"metric": "accuracy", "value": 0.9, "ci_lower": 0.88, "ci_upper": 0.92},
            {"metric": "fnr_on_exited_undefined_resamples", "value": 0.0, "ci_lower": None, "ci_upper": None}]
    metadata = step_result(StepResult(tmp_path, {}, tables={"metrics": rows, "other": rows})).metadata
    shown = [r.data["metric"] for r in metadata["metrics"].value.records]
    assert shown == ["accuracy"]
    assert len(metadata["other"].value.records) == 2, "only the known table's bookkeeping rows are hidden"
