"""export_bundle: file set, manifest, checksums, README, plain weights, atomic replace, refusals.

``export_test_bundle`` is reused by the load tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from stage1_core.artifacts import read_json, sha256_file, write_json
from stage1_core.bundle import BundleError, export_bundle, verify_bundle
from stage1_core.bundle.export import code_version
from stage1_core.config import Stage1ProConfig
from stage1_core.data.transforms import describe_transform

from tests.unit.test_predictor import HIDDEN, eval_transform, make_features, make_head, median_threshold, thresholds_doc

HEADLINE = {"accuracy": 0.931, "coverage": 0.62, "fnr_on_exits": 0.004, "certified": True}


def splits_doc() -> dict[str, Any]:
    def split(role: str, ids: list[str]) -> dict[str, Any]:
        return {
            "role": role,
            "usage": f"{role} only",
            "n": len(ids),
            "class_counts": {"0": 1, "1": len(ids) - 1},
            "source_counts": {"synthetic": len(ids)},
            "sample_ids": ids,
        }

    return {
        "schema_version": 1,
        "seed": 42,
        "assignment": "sha256(seed, sample id) bucket",
        "ratios": {"val_select": 0.33, "val_calib": 0.33, "val_test": 0.34},
        "splits": {
            "train": split("fit", ["t1", "t2"]),
            "val_select": split("select", ["s1", "s2"]),
            "val_calib": split("calibrate", ["c1", "c2"]),
            "val_test": split("evaluate", ["e1", "e2"]),
        },
    }


def fake_backbone_info(**changes: Any) -> dict[str, Any]:
    info = {
        "model_path": "builtin:tiny-dinov3",
        "fingerprint": "ab" * 32,
        "hidden_size": HIDDEN,
        "transform": describe_transform(eval_transform()),
    }
    info.update(changes)
    return info


def export_test_bundle(
    tmp_path: Path,
    head: torch.nn.Module,
    exit_threshold: float,
    backbone_info: dict[str, Any] | None = None,
    out_name: str = "bundle",
    **overrides: Any,
) -> Path:
    """Write the inputs of a bundle under ``tmp_path/src`` and export it to ``tmp_path/out_name``."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    torch.save(head.state_dict(), src / "head.pth")
    write_json(src / "thresholds.json", thresholds_doc(exit_threshold), schema="thresholds")
    write_json(src / "splits.json", splits_doc(), schema="splits")
    (src / "metrics.csv").write_text("metric,value,mean,std,ci_lower,ci_upper,n\naccuracy,0.931,0.93,0.01,0.91,0.95,400\n")
    info = backbone_info or fake_backbone_info()
    kwargs: dict[str, Any] = dict(
        phase=1,
        head_state_dict_path=src / "head.pth",
        policy_name="softmax",
        policy_file_path=src / "thresholds.json",
        config=Stage1ProConfig(data_source="synthetic", model_path=info["model_path"]),
        splits_path=src / "splits.json",
        metrics_csv_path=src / "metrics.csv",
        backbone_info=info,
        head_info={"hidden_size": HIDDEN, "dropout": 0.3, "with_gate": False},
        headline=HEADLINE,
        dagster_run_id="run-123",
    )
    kwargs.update(overrides)
    return export_bundle(tmp_path / out_name, **kwargs)


@pytest.fixture
def head():
    return make_head()


@pytest.fixture
def threshold(head):
    return median_threshold(head, make_features())


def test_export_writes_the_declared_files_with_checksums(tmp_path, head, threshold):
    out = export_test_bundle(tmp_path, head, threshold)

    manifest = read_json(out / "bundle.json", schema="bundle")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "bundle.json", "config.json", "metrics.csv", "model_best.pth", "splits.json", "thresholds.json"]
    assert sorted(manifest["sha256"]) == [f for f in files if f != "bundle.json"]
    for name, digest in manifest["sha256"].items():
        assert sha256_file(out / name) == digest
    assert manifest["active_exit_policy"] == "softmax" and manifest["policy_file"] == "thresholds.json"
    assert manifest["phase"] == 1 and manifest["dagster_run_id"] == "run-123"
    assert manifest["headline"] == HEADLINE
    assert manifest["code_version"] == code_version() and "stage1-pro 0.1.0" in manifest["code_version"]
    assert manifest["head"] == {"hidden_size": HIDDEN, "dropout": 0.3, "with_gate": False}
    assert read_json(out / "thresholds.json")["exit_threshold"] == pytest.approx(threshold)
    assert Stage1ProConfig.load(out / "config.json").data_source == "synthetic"
    assert verify_bundle(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "src"], "no temporary directory left behind"


def test_weights_are_a_plain_canonical_state_dict(tmp_path, head, threshold):
    # Source saved with torch.compile's prefix: the bundle stores canonical keys, tensors only.
    src = tmp_path / "prefixed.pth"
    torch.save({f"_orig_mod.{k}": v for k, v in head.state_dict().items()}, src)
    out = export_test_bundle(tmp_path, head, threshold, head_state_dict_path=src)
    state = torch.load(out / "model_best.pth", weights_only=True)
    assert sorted(state) == sorted(head.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    for key, value in head.state_dict().items():
        torch.testing.assert_close(state[key], value)


def test_readme_explains_contents_loading_policy_and_headline(tmp_path, head, threshold):
    out = export_test_bundle(tmp_path, head, threshold)
    text = (out / "README.md").read_text()
    doc = read_json(out / "thresholds.json")
    for needle in (
        "## What is inside",
        "model_best.pth",
        "## How to load",
        "Stage1Bundle.load",
        "stage1 predict --bundle",
        "## Exit policy",
        f"t = {threshold:.6g}",
        f"at most {doc['target_fnr']:.4g}",
        f"{doc['fnr_upper_bound']:.4g}",
        f"{100 * doc['coverage']:.2f}%",
        "## Headline figures",
        "| accuracy | 0.931 |",
        "run-123",
    ):
        assert needle in text, needle


def test_uncertified_policy_is_described_as_exiting_nothing(tmp_path, head):
    doc = thresholds_doc(0.9)
    doc.update(exit_threshold=None, certified=False, coverage=0, reason="only 40 exited positives; 149 needed")
    write_json(tmp_path / "none.json", doc, schema="thresholds")
    out = export_test_bundle(tmp_path, head, 0.9, policy_file_path=tmp_path / "none.json")
    text = (out / "README.md").read_text()
    assert "exits no image" in text and "only 40 exited positives; 149 needed" in text


def test_existing_bundle_is_replaced_whole(tmp_path, head, threshold):
    first = export_test_bundle(tmp_path, head, threshold)
    (first / "thresholds.json").write_text("stale")  # a damaged old bundle must not survive
    second = export_test_bundle(tmp_path, head, threshold, dagster_run_id="run-456")
    assert second == first
    assert read_json(second / "bundle.json")["dagster_run_id"] == "run-456"
    assert verify_bundle(second) == []
    # Replaced by one atomic link flip (never an empty name): bundle -> its one hidden version.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", "src", os.readlink(second)])


def test_extra_files_are_checksummed(tmp_path, head, threshold):
    extra = tmp_path / "platt.json"
    extra.write_text(json.dumps({"a": 1.0, "b": 0.0}))
    out = export_test_bundle(tmp_path, head, threshold, extra_files={"calibrators/platt.json": extra})
    manifest = read_json(out / "bundle.json")
    assert manifest["sha256"]["calibrators/platt.json"] == sha256_file(extra)
    assert verify_bundle(out) == []


def test_second_policy_file_is_refused_and_nothing_written(tmp_path, head, threshold):
    other = tmp_path / "gateparams.json"
    other.write_text("{}")
    with pytest.raises(BundleError, match="policy file.*exactly one policy file"):
        export_test_bundle(tmp_path, head, threshold, extra_files={"gateparams.json": other})
    with pytest.raises(BundleError, match="exactly one policy file"):
        export_test_bundle(tmp_path, head, threshold, extra_files={"old/thresholds.json": other})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateparams.json", "src"]


def test_unsafe_extra_names_are_refused(tmp_path, head, threshold):
    extra = tmp_path / "x.json"
    extra.write_text("{}")
    for name in ("../x.json", "/tmp/x.json", "a/../../x.json"):
        with pytest.raises(BundleError, match="relative path inside the bundle"):
            export_test_bundle(tmp_path, head, threshold, extra_files={name: extra})
    with pytest.raises(BundleError, match="collides"):
        export_test_bundle(tmp_path, head, threshold, extra_files={"config.json": extra})


def test_head_weights_that_do_not_fit_are_refused(tmp_path, threshold):
    wrong = make_head(hidden=HIDDEN + 8)
    with pytest.raises(BundleError, match=r"head weights: .*shape mismatches"):
        export_test_bundle(tmp_path, wrong, threshold)
    assert not (tmp_path / "bundle").exists()


def test_invalid_policy_file_is_refused(tmp_path, head, threshold):
    doc = thresholds_doc(threshold)
    doc["exit_threshold"] = 1.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"exit_threshold"):
        export_test_bundle(tmp_path, head, threshold, policy_file_path=bad)


def test_a_directory_that_is_not_a_bundle_is_not_replaced(tmp_path, head, threshold):
    precious = tmp_path / "bundle"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        export_test_bundle(tmp_path, head, threshold)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_adapter_file_must_be_shipped_in_the_bundle(tmp_path, head, threshold):
    with pytest.raises(BundleError, match=r"adapter_file names 'adapter.safetensors', which has no entry"):
        export_test_bundle(tmp_path, head, threshold, backbone_info=fake_backbone_info(adapter_file="adapter.safetensors"))
    assert not (tmp_path / "bundle").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_inconsistent_inputs_are_all_listed(tmp_path, head, threshold):
    with pytest.raises(BundleError, match="unknown exit policy 'nonexistent'"):
        export_test_bundle(tmp_path, head, threshold, policy_name="nonexistent")
    with pytest.raises(BundleError) as info:
        export_test_bundle(
            tmp_path, head, threshold, phase=2,
            backbone_info={k: v for k, v in fake_backbone_info().items() if k != "fingerprint"},
        )
    assert info.value.problems == [
        "backbone_info lacks 'fingerprint'",
        "the bundle is for phase 2 but its config.json says phase=1",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
