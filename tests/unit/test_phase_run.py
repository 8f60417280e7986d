"""``stage1 train --phase N``: each cached-feature phase runs its recipe through the library steps,
gates and bundles in the run's output directory; phases 4-5 and unmet prerequisites are refused.

Phases 1-3 and 6 train on synthetic features (no images, no backbone: ``write_feature_phase``);
the command line's own data, backbone and feature steps run once on a tiny synthetic image set.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from stage1_core import pipeline
from stage1_core.artifacts import read_json
from stage1_core.cli import main
from stage1_core.config import Stage1ProConfig
from stage1_core.phases import PHASE1_CRITERIA, PHASES
from stage1_core.store import read_verdicts
from stage1_core.training.phase_run import GateFailedError, PhaseRefusedError, check_can_run, train_and_certify
from tests.unit.test_pipeline import CONFIG, write_feature_phase


def phase_config(root, phase: int, **changes) -> Stage1ProConfig:
    return Stage1ProConfig.from_dict({**CONFIG, "output_dir": str(root), "phase": phase, **changes})


def run(config: Stage1ProConfig, layout: pipeline.Layout) -> dict:
    check_can_run(config, layout)
    return train_and_certify(config, layout, f"phase{config.phase}", run_id="test")


def assert_bundled(layout: pipeline.Layout, partition: str, result: dict, policy: str) -> None:
    manifest = read_json(pipeline.bundle_dir(layout, partition) / "bundle.json", schema="bundle")
    assert manifest["active_exit_policy"] == policy and result["bundle_dir"].endswith(f"bundle/{partition}/bundle")
    expected = {c.name for c in PHASES[int(partition[5:])].criteria}
    assert set(result["gate"]) == expected and all(v["passed"] for v in result["gate"].values()), result["gate"]
    assert {n for n, v in read_verdicts(layout, partition).items() if v["passed"]} == expected


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Phases 1, 2 and 3 run one after the other in one artifacts root, as `stage1 train --phase N` does."""
    root = tmp_path_factory.mktemp("chain")
    layout = write_feature_phase(root, phase_config(root, 1), np.random.default_rng(0), ("phase1", "phase2", "phase3"))
    results = {}
    for phase in (1, 2, 3):
        try:
            results[phase] = run(phase_config(root, phase), layout)
        except GateFailedError as exc:
            results[phase] = exc
    return layout, results


def test_phase1_and_phase2_train_their_recipes_and_export_bundles(chain):
    layout, results = chain
    assert_bundled(layout, "phase1", results[1], "softmax")
    assert_bundled(layout, "phase2", results[2], "softmax")
    assert pipeline.read_training(layout, "phase1")["selection_metric"] == "accuracy"
    assert pipeline.read_training(layout, "phase2")["selection_metric"] == "augrc"
    assert (layout.root / "exit_policy" / "phase2" / "thresholds.json").is_file()


def test_phase3_trains_the_gated_head_fits_the_gate_policy_and_bundles_only_a_passing_gate(chain):
    layout, results = chain
    training = pipeline.read_training(layout, "phase3")
    assert training["head_kind"] == "gated" and training["loss_kind"] == "selective"
    gateparams = read_json(layout.root / "exit_policy" / "phase3" / "gateparams.json", schema="gateparams")
    assert gateparams["certified"]
    verdicts = read_verdicts(layout, "phase3")
    failed = sorted(n for n, v in verdicts.items() if not v["passed"])
    if failed:  # at this size the gate need not beat softmax: then the refusal lists exactly what failed
        assert isinstance(results[3], GateFailedError)
        assert [line.split()[0] for line in str(results[3]).splitlines()[1:]] == failed
        assert not pipeline.bundle_dir(layout, "phase3").exists()
    else:
        assert_bundled(layout, "phase3", results[3], "gate")


def test_a_phase_whose_prerequisite_gate_failed_is_refused(chain, tmp_path):
    layout, results = chain
    if isinstance(results[3], GateFailedError):
        with pytest.raises(PhaseRefusedError, match=r"phase4 adapts the backbone"):
            check_can_run(phase_config(layout.root, 4), layout)
    fresh = pipeline.Layout(tmp_path)
    with pytest.raises(PhaseRefusedError, match=r"phase3 refused: an earlier phase's gate has not passed") as info:
        check_can_run(phase_config(tmp_path, 3), fresh)
    assert "phase2.training_completed: never evaluated" in str(info.value)


def test_phase6_trains_with_conformal_risk_and_bundles_scrc(tmp_path, monkeypatch):
    # Phase 4 adapts the backbone, so the command line cannot make it: a stand-in with phase 3's
    # recipe on the same features and phase 1's criteria (it has no earlier phase here) gives
    # phase 6 its passed prerequisite.
    monkeypatch.setitem(PHASES, 4, dataclasses.replace(PHASES[3], phase=4, requires=(), criteria=PHASE1_CRITERIA,
                                                       available=True))
    settings = {"epochs": 12, "early_stop_patience": 12}
    layout = write_feature_phase(tmp_path, phase_config(tmp_path, 4, **settings), np.random.default_rng(1),
                                 ("phase4", "phase6"))
    with pytest.raises(PhaseRefusedError, match=r"phase4\.training_completed: never evaluated"):
        check_can_run(phase_config(tmp_path, 6, **settings), layout)
    run(phase_config(tmp_path, 4, **settings), layout)
    result = run(phase_config(tmp_path, 6, **settings), layout)
    assert_bundled(layout, "phase6", result, "scrc")
    training = pipeline.read_training(layout, "phase6")
    assert training["loss_kind"] == "crt" and training["head_kind"] == "gated"
    assert read_json(layout.root / "exit_policy" / "phase6" / "scrcparams.json", schema="scrcparams")["certified"]


@pytest.mark.parametrize(("phase", "optimizer"), [(4, "adamw"), (5, "fsam")])
def test_phases_that_adapt_the_backbone_are_refused_with_the_dagster_job(tmp_path, capsys, phase, optimizer):
    flags = ["--phase", str(phase), "--optimizer", optimizer, "--output_dir", str(tmp_path), "--no_progress"]
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert f"phase{phase} adapts the backbone" in err and f"make demo PHASE=phase{phase}" in err
    assert f"phase{phase}_train_gate_bundle" in err
    assert not any(tmp_path.iterdir())


def test_the_command_line_refuses_a_phase_before_its_prerequisite_passed(tmp_path, capsys):
    assert main(["train", "--phase", "2", "--output_dir", str(tmp_path), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "phase2 refused: an earlier phase's gate has not passed" in err
    assert "phase1.thresholds_certified: never evaluated" in err
    assert not any(tmp_path.iterdir())


def test_the_command_line_runs_the_phase_steps_into_the_output_directory(tmp_path, capsys):
    """Real data, backbone and feature steps on 152 synthetic images; a gate that cannot pass at this
    size (too few val_calib samples to certify) refuses the bundle and exits 1, naming the criteria."""
    out = tmp_path / "run"
    flags = ["--phase", "1", "--data_source", "synthetic", "--synthetic_n_train", "32", "--synthetic_n_val", "120",
             "--model_path", "builtin:tiny-dinov3", "--output_dir", str(out), "--no_progress", "--epochs", "2",
             "--warmup_epochs", "0", "--bootstrap_samples", "100", "--max_batch_size", "8", "--fallback_batch_size",
             "8", "--num_workers", "0"]
    assert main(["train", "--mode", "extract_features", *flags]) == 0
    extracted = capsys.readouterr()
    assert set(json.loads(extracted.out)["steps"]) == {"dataset_index", "splits", "backbone", "cached_features"}
    assert not (out / "checkpoint").exists()
    assert main(["train", "--mode", "train_cached", *flags]) == 1
    err = capsys.readouterr().err
    assert "no bundle was exported" in err and "thresholds_certified FAILED" in err
    for rel in ("dataset_index", "splits", "backbone/phase1", "cached_features/phase1", "checkpoint/phase1",
                "predictions/phase1", "exit_policy/phase1", "evaluation/phase1"):
        assert (out / rel / "lineage.json").is_file(), rel
    assert not pipeline.bundle_dir(pipeline.Layout(out), "phase1").exists()
    assert main(["train", "--phase", "1", "--device", "cpu", "--output_dir", str(out)]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_with_a_phase_the_output_directory_is_the_artifacts_root_and_the_row_picks_the_policy(tmp_path, capsys):
    flags = ["--phase", "2", "--output_dir", str(tmp_path / "out"), "--no_progress"]
    assert main(["train", *flags, "--artifacts_root", str(tmp_path / "elsewhere")]) == 2
    assert "with --phase the run's --output_dir" in capsys.readouterr().err
    assert main(["train", "--phase", "3", "--exit_policy", "softmax", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "certifies and bundles its row's exit policy 'gate'" in err and "phase3 refused" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()
