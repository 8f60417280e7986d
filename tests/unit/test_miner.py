"""``stage1 bundle export-miner``: model card validated, bundle copied verified, client and README, backbone on request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stage1_core.artifacts import read_json
from stage1_core.bundle.load import BundleError, Stage1Bundle, bundle_id, verify_bundle
from stage1_core.cli import main
from stage1_core.data.transforms import describe_transform
from stage1_core.model.backbone import DINOv3Backbone
from stage1_core.serving import client as client_module
from stage1_core.serving.miner import CLIENT_FILE, MinerExportError, export_miner, model_card
from stage1_core.serving.model import load_served

from tests.unit.test_bundle_export import export_test_bundle
from tests.unit.test_predictor import (  # noqa: F401  (fixtures)
    HIDDEN,
    TINY_CONFIG,
    eval_transform,
    image_paths,
    make_head,
    max_probs,
    tiny_backbone,
    tiny_backbone_dir,
)

HOTKEY = "5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX"
CARD_ARGS = ["--model-name", "stage1-roadwork", "--version", "1.2.3", "--submitted-by", HOTKEY]


@pytest.fixture
def bundle(tmp_path, tiny_backbone, tiny_backbone_dir, image_paths):
    transform = eval_transform()
    head = make_head()
    feats = tiny_backbone.extract(torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths]))
    info = {"model_path": str(tiny_backbone_dir), "fingerprint": tiny_backbone.fingerprint(), "hidden_size": HIDDEN,
            "transform": describe_transform(transform)}
    return export_test_bundle(tmp_path, head, float(max_probs(head, feats.numpy()).mean()), backbone_info=info)


def test_export_writes_card_verified_bundle_client_and_readme(tmp_path, bundle, capsys):
    out = tmp_path / "submission"
    assert main(["bundle", "export-miner", str(bundle), str(out), *CARD_ARGS, "--id", bundle_id(bundle)]) == 0
    assert f"{out}: miner submission written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "bundle", "model_card.json", CLIENT_FILE]
    card = read_json(out / "model_card.json", schema="model_card")
    assert set(card) == {"model_name", "description", "version", "submitted_by", "submission_time"}
    assert card["model_name"] == "stage1-roadwork" and card["version"] == "1.2.3" and card["submitted_by"] == HOTKEY
    assert isinstance(card["submission_time"], int) and bundle_id(bundle)[:16] in card["description"]
    assert verify_bundle(out / "bundle", expected_id=bundle_id(bundle)) == []
    assert (out / CLIENT_FILE).read_bytes() == Path(client_module.__file__).read_bytes()
    readme = (out / "README.md").read_text()
    for fragment in (bundle_id(bundle), "stage1 serve --bundle bundle --id", "predict_p_roadwork", "fallback",
                     "p_roadwork", "exit", "not included in this folder", "fingerprint"):
        assert fragment in readme, fragment
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "src", "submission"], "no temporary folder left"


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--version", "1.2", "$.version"),
        ("--version", "v1.2.3", "$.version"),
        ("--submitted-by", "not a hotkey", "$.submitted_by"),
        ("--submitted-by", "5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYj0l", "$.submitted_by"),  # 0 and l: not base58
        ("--model-name", "my model/with slash", "$.model_name"),
    ],
)
def test_card_fields_are_validated_by_the_schema(tmp_path, bundle, capsys, flag, value, fragment):
    args = list(CARD_ARGS)
    args[args.index(flag) + 1] = value
    assert main(["bundle", "export-miner", str(bundle), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert "model_card.schema.json" in err and fragment in err
    assert not (tmp_path / "out").exists()


def test_refusals_invalid_bundle_wrong_id_existing_output_missing_fields(tmp_path, bundle, capsys):
    out = tmp_path / "out"
    assert main(["bundle", "export-miner", str(bundle), str(out), *CARD_ARGS, "--id", "0" * 64]) == 2
    assert "is not the expected" in capsys.readouterr().err
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(MinerExportError, match="already exists"):
        export_miner(bundle, out, model_name="m", version="1.0.0", submitted_by=HOTKEY)
    (bundle / "metrics.csv").write_text("metric,value\nedited,1\n")
    assert main(["bundle", "export-miner", str(bundle), str(tmp_path / "new"), *CARD_ARGS]) == 2
    assert "refusing to export an invalid bundle" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["bundle", "export-miner", str(bundle), *CARD_ARGS]) == 2
    assert "export-miner needs OUT" in capsys.readouterr().err
    with pytest.raises(MinerExportError, match=r"\$.submission_time"):
        model_card("m", "1.0.0", HOTKEY, "d", submission_time=5)


def _other_backbone(directory: Path) -> Path:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        DINOv3ViTModel(DINOv3ViTConfig(**TINY_CONFIG)).save_pretrained(directory)
    return directory


def test_with_backbone_copies_the_weights_and_serve_uses_them(tmp_path, bundle, tiny_backbone, image_paths):
    out = export_miner(bundle, tmp_path / "submission", model_name="m", version="0.1.0", submitted_by=HOTKEY,
                       with_backbone=True)
    assert sorted(p.name for p in (out / "backbone").iterdir()) == ["config.json", "model.safetensors"]
    assert DINOv3Backbone.load(out / "backbone").fingerprint() == tiny_backbone.fingerprint()
    readme = (out / "README.md").read_text()
    assert "--backbone backbone" in readme and "licence" in readme

    served = load_served(out / "bundle", bundle_id(bundle), backbone_dir=out / "backbone", device="cpu")
    assert Path(served.backbone_source).resolve() == (out / "backbone").resolve()
    assert served.bundle.predictor.predict(image_paths) == Stage1Bundle.load(bundle).predict(image_paths)

    with pytest.raises(BundleError, match="but the head in this bundle was trained on"):
        load_served(out / "bundle", backbone_dir=_other_backbone(tmp_path / "other"), device="cpu")
    with pytest.raises(BundleError, match="is not the expected"):
        load_served(out / "bundle", "a" * 64, device="cpu")


def test_a_bundle_that_carries_its_backbone_is_exported_with_it(tmp_path, tiny_backbone, tiny_backbone_dir, image_paths):
    info = {"model_path": "builtin:tiny-dinov3", "fingerprint": tiny_backbone.fingerprint(), "hidden_size": HIDDEN,
            "transform": describe_transform(eval_transform()), "directory": "backbone"}
    files = {f"backbone/{name}": tiny_backbone_dir / name for name in ("config.json", "model.safetensors")}
    bundle = export_test_bundle(tmp_path, make_head(), 0.8, backbone_info=info, extra_files=files)
    out = export_miner(bundle, tmp_path / "submission", model_name="m", version="2.0.0", submitted_by=HOTKEY,
                       with_backbone=True)
    assert not (out / "backbone").exists() and (out / "bundle" / "backbone" / "model.safetensors").is_file()
    assert "carries its adapted backbone" in (out / "README.md").read_text()
    assert json.loads((out / "model_card.json").read_text())["version"] == "2.0.0"
