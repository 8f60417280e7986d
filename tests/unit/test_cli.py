"""The `stage1` CLI: baseline flag parity, new flags, refusals, import-baseline-log, a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1_core.baselines import read_baseline_log
from stage1_core.cli import BASELINE_FLAGS, SUBCOMMANDS, build_parser, config_from_args, main

#: Every flag of train_stage1_head.py (issue 3), which must keep working.
ISSUE_BASELINE_FLAGS = (
    "--mode --model_path --train_image_dir --train_labels_file --val_image_dir --val_labels_file "
    "--cached_features_dir --output_dir --epochs --max_batch_size --fallback_batch_size --grad_accum_steps "
    "--lr_head --lr_backbone --weight_decay --label_smoothing --dropout --max_grad_norm --warmup_epochs "
    "--use_amp --no_amp --use_ema --no_ema --ema_decay --early_stop_patience --exit_threshold "
    "--use_extra_roadwork --roadwork_iccv_dir --roadwork_extra_dir --resume_checkpoint --log_file "
    "--use_kaggle_data --kaggle_construction_dir --kaggle_road_issues_dir"
).split()


def parse(*argv: str):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_subcommands_are_registered_in_one_table():
    assert {"train", "import-baseline-log"} <= set(SUBCOMMANDS)
    assert set(ISSUE_BASELINE_FLAGS) <= set(BASELINE_FLAGS)


def test_every_baseline_flag_parses_into_the_config():
    config = parse(
        "--mode", "train_cached", "--model_path", "/models/dinov3", "--train_image_dir", "tr",
        "--train_labels_file", "tr.csv", "--val_image_dir", "va", "--val_labels_file", "va.csv",
        "--cached_features_dir", "cache", "--output_dir", "out", "--epochs", "15", "--max_batch_size", "48",
        "--fallback_batch_size", "24", "--grad_accum_steps", "4", "--lr_head", "8e-5", "--lr_backbone", "2e-5",
        "--weight_decay", "0.05", "--label_smoothing", "0.15", "--dropout", "0.45", "--max_grad_norm", "0.5",
        "--warmup_epochs", "2", "--no_amp", "--no_ema", "--ema_decay", "0.999", "--early_stop_patience", "5",
        "--exit_threshold", "0.9", "--use_extra_roadwork", "--roadwork_iccv_dir", "rw", "--roadwork_extra_dir", "rx",
        "--resume_checkpoint", "ck.pth", "--log_file", "log.csv", "--use_kaggle_data",
        "--kaggle_construction_dir", "kc", "--kaggle_road_issues_dir", "kr",
    )
    expected = dict(
        mode="train_cached", model_path="/models/dinov3", train_image_dir="tr", train_labels_file="tr.csv",
        val_image_dir="va", val_labels_file="va.csv", cached_features_dir="cache", output_dir="out", epochs=15,
        max_batch_size=48, fallback_batch_size=24, grad_accum_steps=4, lr_head=8e-5, lr_backbone=2e-5,
        weight_decay=0.05, label_smoothing=0.15, dropout=0.45, max_grad_norm=0.5, warmup_epochs=2, use_amp=False,
        use_ema=False, ema_decay=0.999, early_stop_patience=5, legacy_exit_threshold_for_logging=0.9,
        use_extra_roadwork=True, roadwork_iccv_dir="rw", roadwork_extra_dir="rx", resume_checkpoint="ck.pth",
        log_file="log.csv", use_kaggle_data=True, kaggle_construction_dir="kc", kaggle_road_issues_dir="kr",
    )
    assert {k: getattr(config, k) for k in expected} == expected
    on = parse("--use_amp", "--use_ema")
    assert on.use_amp is True and on.use_ema is True


def test_unset_flags_keep_the_config_defaults():
    from stage1_core.config import Stage1ProConfig

    assert parse().model_dump() == Stage1ProConfig().model_dump()


def test_new_flags_and_config_file_precedence(tmp_path):
    config = parse("--phase", "2", "--exit_policy", "softmax", "--target_fnr_exit", "0.03", "--seed", "5",
                   "--selection_metric", "augrc", "--no_ema_warmup", "--compile_head", "--num_workers", "0")
    assert (config.phase, config.exit_policy, config.target_fnr_exit, config.seed) == (2, "softmax", 0.03, 5)
    assert config.selection_metric == "augrc" and config.ema_warmup is False and config.compile_head is True
    assert config.num_workers == 0
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nlr_head: 0.01\nseed: 3\n")
    config = parse("--config", str(path), "--epochs", "3")
    assert (config.epochs, config.lr_head, config.seed) == (3, 0.01, 3)


def test_target_coverage_is_refused_with_the_reason(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "--target_coverage", "0.6"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--target_coverage" in err and "target_fnr_exit" in err and "coverage is maximised" in err


def test_invalid_values_exit_2_with_the_field_named(capsys):
    assert main(["train", "--dropout", "1.5"]) == 2
    assert "dropout=1.5" in capsys.readouterr().err


def test_exit_threshold_prints_the_monitoring_note(tmp_path, capsys):
    code = main(["train", "--mode", "train_cached", "--exit_threshold", "0.9", "--cached_features_dir",
                 str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "monitoring" in err and "legacy_exit_threshold_for_logging" in err
    assert "manifest.json: file not found" in err


BASELINE_LOG = """Epoch,Train_Loss,Train_Acc,Val_Loss,Val_Acc,ECE,Exit_Coverage,Exit_Acc,Best_Val_Acc,LR
1,0.6000,70.00,0.5500,80.10,0.0500,40.0,95.00,0.00,1.00e-04
2,0.5000,80.00,0.5000,85.25,0.0400,50.0,96.00,80.10,9.00e-05
3,0.4500,85.00,0.4800,84.00,0.0300,55.0,97.00,85.25,5.00e-05
4,0.4000,88.00,0.4700,86.50,0.0300,60.0,97.50,85.25,1.00e-05
"""


def test_import_baseline_log_reads_the_best_accuracy(tmp_path, capsys):
    log = tmp_path / "training.log"
    log.write_text(BASELINE_LOG)
    info = read_baseline_log(log)
    # The old script wrote Best_Val_Acc before updating it: the last epoch's 86.50 is the best.
    assert info["best_val_acc_percent"] == 86.5 and info["best_epoch"] == 4 and info["epochs"] == 4
    assert info["last_best_val_acc_column"] == 85.25 and info["baseline_val_accuracy"] == 0.865
    assert main(["import-baseline-log", str(log), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["baseline_val_accuracy"] == 0.865
    assert main(["import-baseline-log", str(log)]) == 0
    assert "86.50%" in capsys.readouterr().out


def test_import_baseline_log_errors_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.log"
    bad.write_text(BASELINE_LOG.replace("84.00,", "eighty,"))
    assert main(["import-baseline-log", str(bad)]) == 2
    assert "bad.log:4: Epoch/Val_Acc/Best_Val_Acc are not numbers" in capsys.readouterr().err
    headless = tmp_path / "headless.log"
    headless.write_text("1,2,3\n")
    assert main(["import-baseline-log", str(headless)]) == 2
    assert "headless.log:1: expected the header" in capsys.readouterr().err
    assert main(["import-baseline-log", str(tmp_path / "missing.log")]) == 2


def _write_images(root: Path, name: str, n: int) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    lines = ["image,label"]
    for i in range(n):
        label = int(i % 3 != 0)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        pixels[..., 0] = 200 if label else 30
        Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.jpg")
        lines.append(f"{name}_{i:03d}.jpg,{label}")
    (root / f"{name}_labels.csv").write_text("\n".join(lines) + "\n")


def test_standalone_modes_end_to_end(tmp_path, capsys):
    _write_images(tmp_path, "train", 8)
    _write_images(tmp_path, "val", 15)
    common = [
        "--train_image_dir", str(tmp_path / "train"), "--train_labels_file", str(tmp_path / "train_labels.csv"),
        "--val_image_dir", str(tmp_path / "val"), "--val_labels_file", str(tmp_path / "val_labels.csv"),
        "--artifacts_root", str(tmp_path / "artifacts"), "--output_dir", str(tmp_path / "out"),
        "--max_batch_size", "8", "--fallback_batch_size", "8", "--num_workers", "0", "--no_progress",
        "--epochs", "2", "--warmup_epochs", "0",
    ]
    assert main(["train", "--mode", "extract_features", *common]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["forward_passes"] == 1 + 2
    assert main(["train", "--mode", "extract_features", *common]) == 0
    assert json.loads(capsys.readouterr().out)["forward_passes"] == 0
    out = tmp_path / "out"
    (out / "cached_features" / "manifest.json").unlink()  # now it looks like a cache of the old script
    assert main(["train", "--mode", "train_cached", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    imported = json.loads((out / "cached_features" / "manifest.json").read_text())
    assert imported["source"] == "legacy-import" and imported["backbone_fingerprint"] == first["backbone_fingerprint"]
    for name in ("model_best.pth", "checkpoint_last.pth", "training.log", "splits.json", "config.json",
                 "predictions/val_select.pt", "predictions/val_calib.pt", "predictions/val_test.pt"):
        assert (out / name).is_file(), name
    assert summary["backbone_fingerprint"] == first["backbone_fingerprint"] and summary["epochs_run"] == 2
    assert main(["train", "--mode", "train", *common, "--epochs", "1", "--output_dir", str(tmp_path / "out2")]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["epochs_run"] == 1 and trained["feature_cache_key"]
