"""verify_bundle / Stage1Bundle.load: round trip, edits with and without checksums, refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_core.artifacts import sha256_file
from stage1_core.bundle import BundleError, Stage1Bundle, Stage1Predictor, format_prediction, verify_bundle
from stage1_core.bundle.load import eval_transform_from_description
from stage1_core.data.transforms import build_eval_transform, describe_transform
from stage1_core.model.backbone import DINOv3Backbone, resolve_backbone
from stage1_core.policies import SoftmaxExitPolicy

from tests.unit.test_bundle_export import export_test_bundle
from tests.unit.test_predictor import (  # noqa: F401  (fixtures)
    HIDDEN,
    eval_transform,
    image_paths,
    make_features,
    make_head,
    max_probs,
    median_threshold,
    tiny_backbone,
    tiny_backbone_dir,
)


def read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


def reseal(bundle: Path, manifest: dict | None = None) -> None:
    """Rewrite bundle.json with fresh sha256 values for the files it lists (what a tamperer would do)."""
    manifest = manifest or read_manifest(bundle)
    manifest["sha256"] = {
        name: sha256_file(bundle / name) if (bundle / name).is_file() else digest
        for name, digest in manifest["sha256"].items()
    }
    (bundle / "bundle.json").write_text(json.dumps(manifest, indent=2))


def assert_refused(bundle: Path, *fragments: str) -> list[str]:
    """``verify_bundle`` and ``Stage1Bundle.load`` both name the problem."""
    problems = verify_bundle(bundle)
    text = "\n".join(problems)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    with pytest.raises(BundleError) as info:
        Stage1Bundle.load(bundle)
    assert info.value.problems == problems
    for fragment in fragments:
        assert fragment in str(info.value)
    return problems


@pytest.fixture
def head():
    return make_head()


@pytest.fixture
def features():
    return make_features()


@pytest.fixture
def bundle(tmp_path, head, features):
    return export_test_bundle(tmp_path, head, median_threshold(head, features))


class _Opaque:
    """A custom class: pickling an instance into the weight file must be refused on load."""


def _a_function():
    return 0


# ----- round trip --------------------------------------------------------------------------


def test_round_trip_gives_the_same_decisions_as_the_predictor_before_export(tmp_path, bundle, head, features):
    before = Stage1Predictor(head, SoftmaxExitPolicy.from_file(tmp_path / "src" / "thresholds.json"))
    expected = before.decide_features(features)

    loaded = Stage1Bundle.load(bundle)
    got = loaded.decide_features(features)

    np.testing.assert_array_equal(got.exit, expected.exit)
    np.testing.assert_array_equal(got.label, expected.label)
    np.testing.assert_array_equal(got.p_roadwork, expected.p_roadwork)
    assert got.prediction_sets == expected.prediction_sets
    assert 0 < got.exit.sum() < len(features)
    assert loaded.manifest["phase"] == 1 and loaded.policy.exit_threshold == before.policy.exit_threshold
    assert loaded.config.data_source == "synthetic"
    assert not loaded.backbone_loaded, "deciding on features must not load the backbone"


def test_editing_the_threshold_in_a_resealed_copy_changes_decisions(tmp_path, bundle, head, features):
    copy = tmp_path / "edited"
    shutil.copytree(bundle, copy)
    new_t = float(np.quantile(max_probs(head, features), 0.9))
    doc = json.loads((copy / "thresholds.json").read_text())
    assert new_t > doc["exit_threshold"]
    doc["exit_threshold"] = new_t
    (copy / "thresholds.json").write_text(json.dumps(doc))
    reseal(copy)

    original = Stage1Bundle.load(bundle).decide_features(features).exit
    edited = Stage1Bundle.load(copy).decide_features(features).exit

    np.testing.assert_array_equal(edited, max_probs(head, features) >= new_t)
    assert edited.sum() < original.sum()
    assert not np.any(edited & ~original)


def test_predict_on_images_through_the_bundle(tmp_path, head, tiny_backbone, tiny_backbone_dir, image_paths):
    transform = eval_transform()
    feats = tiny_backbone.extract(torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths]))
    t = float(max_probs(head, feats.numpy()).mean())
    info = {
        "model_path": str(tiny_backbone_dir),
        "fingerprint": tiny_backbone.fingerprint(),
        "hidden_size": HIDDEN,
        "transform": describe_transform(transform),
    }
    out = export_test_bundle(tmp_path, head, t, backbone_info=info)
    before = Stage1Predictor(head, SoftmaxExitPolicy(t), backbone=tiny_backbone, transform=transform)

    loaded = Stage1Bundle.load(out)
    records = loaded.predict(image_paths)

    assert records == before.predict(image_paths)
    assert loaded.backbone_loaded
    assert sorted(r["exit"] for r in records) == [False, True]
    for r in records:
        assert set(r) == {"exit", "label", "p_roadwork", "prediction_set"}
        assert (r["label"] is None) == (not r["exit"])
        assert r["prediction_set"] == ([r["label"]] if r["exit"] else [0, 1])


def test_builtin_backbone_is_rebuilt_with_the_recorded_fingerprint(tmp_path, image_paths):
    built = DINOv3Backbone.load(resolve_backbone("builtin:tiny-dinov3", tmp_path / "artifacts_a"))
    transform = build_eval_transform(image_size=64, resize=72)
    info = {
        "model_path": "builtin:tiny-dinov3",
        "fingerprint": built.fingerprint(),
        "hidden_size": built.hidden_size,
        "transform": describe_transform(transform),
    }
    head = make_head(hidden=built.hidden_size)
    out = export_test_bundle(
        tmp_path, head, 0.75, backbone_info=info,
        head_info={"hidden_size": built.hidden_size, "dropout": 0.3, "with_gate": False},
    )
    loaded = Stage1Bundle.load(out, artifacts_root=tmp_path / "artifacts_b")
    records = loaded.predict(image_paths)
    before = Stage1Predictor(head, SoftmaxExitPolicy(0.75), backbone=built, transform=transform)
    assert records == before.predict(image_paths)


def test_backbone_with_another_fingerprint_is_refused(tmp_path, head, tiny_backbone_dir, image_paths, features):
    info = {"model_path": str(tiny_backbone_dir), "fingerprint": "cd" * 32, "hidden_size": HIDDEN,
            "transform": describe_transform(eval_transform())}
    loaded = Stage1Bundle.load(export_test_bundle(tmp_path, head, 0.8, backbone_info=info))
    assert len(loaded.decide_features(features)) == len(features)
    with pytest.raises(BundleError, match=r"fingerprint [0-9a-f]{64}, but the head in this bundle was trained on features of cdcd"):
        loaded.predict(image_paths)
    assert not loaded.backbone_loaded


def test_missing_backbone_directory_is_reported(tmp_path, head, image_paths):
    info = {"model_path": str(tmp_path / "nowhere"), "fingerprint": "cd" * 32, "hidden_size": HIDDEN,
            "transform": describe_transform(eval_transform())}
    loaded = Stage1Bundle.load(export_test_bundle(tmp_path, head, 0.8, backbone_info=info))
    with pytest.raises(BundleError, match="nowhere.*not a local model directory"):
        loaded.predict(image_paths)


# ----- refusals ----------------------------------------------------------------------------


def test_a_changed_byte_without_new_checksums_is_refused(bundle):
    data = bytearray((bundle / "metrics.csv").read_bytes())
    data[-3] = ord("7") if data[-3] != ord("7") else ord("8")
    (bundle / "metrics.csv").write_bytes(bytes(data))
    problems = assert_refused(bundle, "metrics.csv: sha256", "does not match", "changed after export")
    assert len(problems) == 1


def test_edited_threshold_without_new_checksums_is_refused(bundle):
    doc = json.loads((bundle / "thresholds.json").read_text())
    doc["exit_threshold"] = 0.99
    (bundle / "thresholds.json").write_text(json.dumps(doc))
    assert_refused(bundle, "thresholds.json: sha256")


def test_a_second_policy_file_is_refused(tmp_path, bundle):
    shutil.copyfile(bundle / "thresholds.json", bundle / "gateparams.json")
    assert_refused(bundle, "gateparams.json: unexpected file", "2 policy files (gateparams.json, thresholds.json)")
    manifest = read_manifest(bundle)
    manifest["sha256"]["gateparams.json"] = ""
    reseal(bundle, manifest)
    problems = assert_refused(bundle, "exactly one is allowed")
    assert not any("unexpected file" in p for p in problems)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m["sha256"].__setitem__("../x", "0" * 64), "$.sha256['../x']: '../x' leaves the bundle directory"),
        (lambda m: m["sha256"].__setitem__("calibrators/../../x", "0" * 64), "leaves the bundle directory"),
        (lambda m: m["backbone"].__setitem__("adapter_file", "/etc/hosts"), "$.backbone.adapter_file: '/etc/hosts' is an absolute path"),
        (lambda m: m["backbone"].__setitem__("adapter_file", "../adapter.safetensors"), "$.backbone.adapter_file: '../adapter.safetensors' leaves"),
        (lambda m: m.__setitem__("model_file", "../model_best.pth"), "$.model_file: '../model_best.pth' leaves"),
    ],
)
def test_pointers_leaving_the_directory_are_refused(bundle, edit, fragment):
    manifest = read_manifest(bundle)
    edit(manifest)
    reseal(bundle, manifest)
    assert_refused(bundle, fragment)


def test_symlink_to_a_file_outside_is_refused(tmp_path, bundle):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.symlink(outside, bundle / "calib.json")
    manifest = read_manifest(bundle)
    manifest["sha256"]["calib.json"] = sha256_file(outside)
    reseal(bundle, manifest)
    assert_refused(bundle, "calib.json", "outside the bundle directory")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"meta": _Opaque()}, "model_best.pth: refused: it holds pickled Python objects"),
        ({"hook": _a_function}, "model_best.pth: refused: it holds pickled Python objects"),
        ({"epoch": 3}, "model_best.pth: must hold only tensors keyed by name; offending entries: 'epoch' (int)"),
    ],
)
def test_pickled_objects_in_the_weight_file_are_refused(bundle, head, extra, fragment):
    torch.save({**head.state_dict(), **extra}, bundle / "model_best.pth")
    reseal(bundle)
    assert_refused(bundle, fragment)


def test_weights_for_another_head_are_refused(bundle):
    torch.save(make_head(hidden=HIDDEN + 1).state_dict(), bundle / "model_best.pth")
    reseal(bundle)
    assert_refused(bundle, "model_best.pth: does not fit the head recorded in bundle.json", "shape mismatches")


def test_every_problem_is_listed_at_once(bundle):
    (bundle / "splits.json").unlink()
    (bundle / "stray.txt").write_text("x")
    manifest = read_manifest(bundle)
    manifest["created_at"] = ""
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    problems = assert_refused(
        bundle,
        "bundle.json: $.created_at",
        "splits.json: listed in bundle.json ($.sha256) but missing",
        "stray.txt: unexpected file",
    )
    assert len(problems) == 3


def test_policy_file_must_match_its_schema_and_the_active_policy(bundle):
    doc = json.loads((bundle / "thresholds.json").read_text())
    del doc["delta"]
    (bundle / "thresholds.json").write_text(json.dumps(doc))
    manifest = read_manifest(bundle)
    manifest["policy_file"] = "gateparams.json"
    os.replace(bundle / "thresholds.json", bundle / "gateparams.json")
    manifest["sha256"]["gateparams.json"] = manifest["sha256"].pop("thresholds.json")
    reseal(bundle, manifest)
    assert_refused(bundle, "$.policy_file is 'gateparams.json' but policy 'softmax' is stored in 'thresholds.json'")
    manifest["policy_file"] = "thresholds.json"
    os.replace(bundle / "gateparams.json", bundle / "thresholds.json")
    manifest["sha256"]["thresholds.json"] = manifest["sha256"].pop("gateparams.json")
    reseal(bundle, manifest)
    assert_refused(bundle, "thresholds.json:", "'delta' is a required property")


def test_phase_must_match_config_and_allow_the_policy(bundle):
    manifest = read_manifest(bundle)
    manifest["phase"] = 3
    reseal(bundle, manifest)
    assert_refused(bundle, "bundle.json: the bundle is for phase 3 but its config.json says phase=1")


def test_unreproducible_transform_is_refused(bundle):
    manifest = read_manifest(bundle)
    manifest["backbone"]["transform"] = manifest["backbone"]["transform"].replace("antialias=True", "antialias=False", 1)
    reseal(bundle, manifest)
    assert_refused(bundle, "$.backbone.transform: recorded transform cannot be reproduced")


def test_not_a_bundle(tmp_path):
    assert verify_bundle(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a directory"]
    (tmp_path / "bundle.json").write_text("{broken")
    assert "not valid JSON" in verify_bundle(tmp_path)[0]


# ----- helpers -----------------------------------------------------------------------------


def test_transform_description_round_trips():
    from stage1_core.data.transforms import ResizedCenterCrop, build_reference_eval_transform

    for transform in (build_eval_transform(), build_eval_transform(image_size=32, resize=36, mean=(0.5,) * 3, std=(0.25,) * 3),
                      build_reference_eval_transform()):
        text = describe_transform(transform)
        rebuilt = eval_transform_from_description(text)
        assert describe_transform(rebuilt) == text
        assert type(rebuilt.transforms[0]) is type(transform.transforms[0])
    # A bundle exported before ResizedCenterCrop decides on the pixels it was evaluated on.
    legacy = eval_transform_from_description(describe_transform(build_reference_eval_transform()))
    assert not any(isinstance(step, ResizedCenterCrop) for step in legacy.transforms)
    with pytest.raises(ValueError, match="not an evaluation transform"):
        eval_transform_from_description("Compose[ToImage()]")


def test_format_prediction():
    exited = {"exit": True, "label": 1, "p_roadwork": 0.97312, "prediction_set": [1]}
    deferred = {"exit": False, "label": None, "p_roadwork": 0.5, "prediction_set": [0, 1]}
    assert format_prediction("a.jpg", exited) == "a.jpg: exit   label=1 (roadwork)  p_roadwork=0.9731  prediction_set={1}"
    assert format_prediction("b.jpg", deferred) == "b.jpg: defer  to Stage 2  p_roadwork=0.5000  prediction_set={0, 1}"
    assert json.loads(format_prediction("b.jpg", deferred, as_json=True)) == {"image": "b.jpg", **deferred}


def _bundled_backbone(tmp_path, head, tiny_backbone, tiny_backbone_dir, image_paths):
    """A bundle that carries its (adapted) backbone under backbone/, as phases 4-6 export it."""
    transform = eval_transform()
    feats = tiny_backbone.extract(torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths]))
    t = float(max_probs(head, feats.numpy()).mean())
    info = {"model_path": "builtin:tiny-dinov3", "fingerprint": tiny_backbone.fingerprint(), "hidden_size": HIDDEN,
            "transform": describe_transform(transform), "directory": "backbone"}
    files = {f"backbone/{name}": tiny_backbone_dir / name for name in ("config.json", "model.safetensors")}
    out = export_test_bundle(tmp_path, head, t, backbone_info=info, extra_files=files)
    return out, Stage1Predictor(head, SoftmaxExitPolicy(t), backbone=tiny_backbone, transform=transform)


def test_a_bundled_backbone_is_loaded_from_the_bundle_and_gives_the_same_decisions(
    tmp_path, head, tiny_backbone, tiny_backbone_dir, image_paths
):
    out, before = _bundled_backbone(tmp_path, head, tiny_backbone, tiny_backbone_dir, image_paths)
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(out, moved.parent / "bundle")  # the bundle alone, far from the artifacts it came from
    loaded = Stage1Bundle.load(moved)
    assert loaded.predict(image_paths) == before.predict(image_paths)
    assert Path(loaded.predictor.backbone.source).resolve() == (moved / "backbone").resolve()
    assert "Backbone (included" in (moved / "README.md").read_text()


def test_a_bundled_backbone_holds_only_config_and_safetensors(tmp_path, head, tiny_backbone, tiny_backbone_dir,
                                                              image_paths):
    out, _ = _bundled_backbone(tmp_path, head, tiny_backbone, tiny_backbone_dir, image_paths)
    torch.save({"w": torch.zeros(1)}, out / "backbone" / "pytorch_model.bin")
    manifest = read_manifest(out)
    manifest["sha256"]["backbone/pytorch_model.bin"] = sha256_file(out / "backbone" / "pytorch_model.bin")
    reseal(out, manifest)
    assert_refused(out, "backbone/pytorch_model.bin", "safetensors weights only")


def test_a_bundled_backbone_with_changed_weights_is_refused(tmp_path, head, tiny_backbone, tiny_backbone_dir,
                                                            image_paths):
    out, _ = _bundled_backbone(tmp_path, head, tiny_backbone, tiny_backbone_dir, image_paths)
    weights = out / "backbone" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert_refused(out, "backbone/model.safetensors", "does not match")


# ----- hostile files: what is refused, and that it is said plainly -------------------------------


def test_fifo_declared_as_weights_is_named_not_opened(bundle):
    (bundle / "model_best.pth").unlink()
    os.mkfifo(bundle / "model_best.pth")  # an ordinary open() of it blocks for ever
    assert_refused(bundle, "model_best.pth: is a FIFO (named pipe), not a regular file")


def test_symlink_loop_is_a_listed_problem(bundle):
    (bundle / "metrics.csv").unlink()
    (bundle / "metrics.csv").symlink_to("metrics.csv")
    assert_refused(bundle, "metrics.csv: symbolic link", "must be regular files")


def test_directory_where_a_file_is_declared(bundle):
    (bundle / "splits.json").unlink()
    (bundle / "splits.json").mkdir()
    assert_refused(bundle, "splits.json: is a directory where bundle.json ($.sha256) declares a file")


@pytest.mark.parametrize("hidden", [10**7, 10**13])
def test_absurd_hidden_size_is_refused_by_the_schema_without_building_a_layer(bundle, hidden):
    manifest = read_manifest(bundle)
    manifest["head"]["hidden_size"] = manifest["backbone"]["hidden_size"] = hidden
    reseal(bundle, manifest)
    assert_refused(bundle, "$.head.hidden_size", "16384", "not checked against $.head")


def test_oversized_manifest_is_refused_before_parsing(bundle):
    (bundle / "bundle.json").write_text((bundle / "bundle.json").read_text() + " " * (2 << 20))
    assert_refused(bundle, "bundle.json", "over the 1048576-byte limit")


def test_load_with_expected_id_pins_the_bundle(bundle):
    from stage1_core.bundle.load import bundle_id

    the_id = bundle_id(bundle)
    loaded = Stage1Bundle.load(bundle, expected_id=the_id)
    assert loaded.bundle_id == the_id and loaded.directory == bundle.resolve()
    with pytest.raises(BundleError, match="is not the expected"):
        Stage1Bundle.load(bundle, expected_id="0" * 64)


def test_load_resolves_a_link_once_and_reads_that_version(tmp_path, bundle):
    """A consumer loading through a link gets the version the link named when it was resolved."""
    link = tmp_path / "current"
    link.symlink_to(bundle)
    loaded = Stage1Bundle.load(link)
    assert loaded.directory == bundle.resolve()
    assert loaded.bundle_id == sha256_file(bundle / "bundle.json")
