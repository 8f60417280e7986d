"""``stage1 predict``: files, directories and list files in; JSON lines out in input order; errors on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stage1_core.cli import CliError, main, predict_inputs
from stage1_core.data.transforms import describe_transform

from tests.unit.test_bundle_export import export_test_bundle
from tests.unit.test_predictor import (  # noqa: F401  (fixtures)
    HIDDEN,
    eval_transform,
    image_paths,
    make_head,
    max_probs,
    tiny_backbone,
    tiny_backbone_dir,
)


def test_inputs_expand_directories_and_list_files_in_order(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "notes.txt"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.jpg"
    listing = tmp_path / "lists" / "batch.txt"
    listing.parent.mkdir()
    listing.write_text("# images for tonight\n../single.jpg\n\n/abs/elsewhere.jpg\n")
    paths = predict_inputs([single, folder], str(listing))
    assert paths == [single, folder / "a.PNG", folder / "b.jpg", folder / "sub" / "c.webp",
                     listing.parent / "../single.jpg", Path("/abs/elsewhere.jpg")]
    with pytest.raises(CliError, match="holds no image files"):
        predict_inputs([tmp_path / "lists"], None)
    with pytest.raises(CliError, match="no images given"):
        predict_inputs([], None)
    with pytest.raises(CliError, match="cannot read the image list"):
        predict_inputs([], str(tmp_path / "missing.txt"))


def test_predict_streams_json_lines_for_a_directory_and_reports_bad_files(
    tmp_path, capsys, tiny_backbone, tiny_backbone_dir, image_paths
):
    transform = eval_transform()
    head = make_head()
    feats = tiny_backbone.extract(torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths]))
    threshold = float(max_probs(head, feats.numpy()).mean())
    info = {"model_path": str(tiny_backbone_dir), "fingerprint": tiny_backbone.fingerprint(), "hidden_size": HIDDEN,
            "transform": describe_transform(transform)}
    bundle = export_test_bundle(tmp_path, head, threshold, backbone_info=info)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in image_paths:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "zz_broken.jpg").write_bytes(b"not an image")
    listing = tmp_path / "more.txt"
    listing.write_text(f"{image_paths[0]}\n{tmp_path / 'gone.jpg'}\n")

    code = main(["predict", "--bundle", str(bundle), str(folder), "--list", str(listing), "--json",
                 "--batch_size", "2", "--num_workers", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    expected = sorted(folder.iterdir())
    decided = [p for p in expected if p.name != "zz_broken.jpg"] + [image_paths[0]]
    assert [row["image"] for row in rows] == [str(p) for p in decided]
    assert rows[0]["exit"] in (True, False) and 0.0 <= rows[0]["p_roadwork"] <= 1.0
    same_image = rows[[str(p) for p in decided].index(str(folder / image_paths[0].name))]
    assert rows[-1]["exit"] == same_image["exit"] and rows[-1]["label"] == same_image["label"]
    assert rows[-1]["p_roadwork"] == pytest.approx(same_image["p_roadwork"], abs=1e-5)  # other batch, same image
    assert "zz_broken.jpg: cannot read the image" in err and "gone.jpg" in err
    assert "2 of 5 image(s) could not be read" in err


def test_predict_with_id_refuses_another_bundle(tmp_path, capsys):
    """``stage1 predict --id`` checks the id on the files it then loads (exit 2, no traceback)."""
    from stage1_core import cli
    from tests.unit.test_bundle_export import export_test_bundle
    from tests.unit.test_predictor import make_features, make_head, median_threshold

    head = make_head()
    bundle = export_test_bundle(tmp_path, head, median_threshold(head, make_features()))
    image = tmp_path / "x.png"
    image.write_bytes(b"not an image")
    code = cli.main(["predict", "--bundle", str(bundle), "--id", "0" * 64, "--no_progress", str(image)])
    assert code == 2
    assert "is not the expected " + "0" * 64 in capsys.readouterr().err
