"""The pipeline's steps as plain functions over an artifacts directory.

Each step reads what earlier steps wrote under ``Layout.root`` and writes its own files there
(atomically, schema-validated). The Dagster assets in ``stage1_assets`` are thin wrappers around
these functions, and :func:`evaluate_criterion` decides every phase-gate criterion from the files,
so the whole pipeline and its gates run (and are tested) without Dagster.

Split usage is enforced here: ``train`` fits weights, ``val_select`` selects checkpoints,
``val_calib`` fits the exit policy, ``val_test`` only evaluates (``require_split``).
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stage1_core.artifacts import (
    ArtifactError,
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
    schema_errors,
    sha256_file,
    write_json,
)
from stage1_core.config import Stage1ProConfig
from stage1_core.data.datasets import Sample, find_corrupt_images, read_sources
from stage1_core.data.splits import SPLIT_NAMES, VAL_SPLITS, load_splits, make_splits, require_split, save_splits
from stage1_core.gates import GateVerdict
from stage1_core.phases import PHASES, config_for_phase, get_recipe, phase_number

TRAIN_SOURCE = "natix_train"
VAL_SOURCE = "natix"


class Layout:
    """Where each asset's files live: ``<root>/<asset>[/<partition>]``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def dir(self, asset: str, partition: str | None = None) -> Path:
        path = self.root / asset / partition if partition else self.root / asset
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def feature_store(self) -> Path:
        return self.root / "feature_store"

    @property
    def synthetic_dir(self) -> Path:
        return self.root / "data" / "synthetic"


@dataclass
class StepResult:
    """What a step produced: its main path, headline figures, tables and figures for the UI."""

    path: Path
    metadata: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)


# ----- data -------------------------------------------------------------------------------


def ensure_synthetic_data(config: Stage1ProConfig, out_dir: Path) -> dict[str, Any]:
    """Generate the embedded synthetic data set once per (size, seed); reuse it afterwards."""
    from stage1_core.data.synthetic import generate_synthetic_dataset

    params = {"n_train": config.synthetic_n_train, "n_val": config.synthetic_n_val, "seed": config.synthetic_seed}
    marker = out_dir / "synthetic.json"
    if marker.is_file():
        recorded = read_json(marker)
        if recorded.get("params") == params and all(
            (out_dir / f).is_file() for f in ("train_labels.csv", "val_labels.csv")
        ):
            return {**recorded["summary"], "generated": False}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    summary = generate_synthetic_dataset(out_dir, params["n_train"], params["n_val"], params["seed"], progress=True)
    info = {key: value for key, value in summary.to_dict().items() if key != "out_dir"}
    write_json(marker, {"params": params, "summary": info})
    return {**info, "generated": True}


def data_sources(config: Stage1ProConfig, layout: Layout) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]], dict[str, Any]]:
    """``(train_sources, val_sources, info)`` as ``(source, image_dir, labels_file)`` triples."""
    info: dict[str, Any] = {"data_source": config.data_source}
    if config.data_source == "synthetic":
        root = layout.synthetic_dir
        info.update(ensure_synthetic_data(config, root))
        train = [(TRAIN_SOURCE, str(root / "train"), str(root / "train_labels.csv"))]
        val = [(VAL_SOURCE, str(root / "val"), str(root / "val_labels.csv"))]
        return train, val, info
    config.validate_for_run()
    train = [(TRAIN_SOURCE, config.train_image_dir, config.train_labels_file)]
    extras = []
    if config.use_extra_roadwork:
        extras += [("roadwork_iccv", config.roadwork_iccv_dir), ("roadwork_extra", config.roadwork_extra_dir)]
    if config.use_kaggle_data:
        extras += [("kaggle_construction", config.kaggle_construction_dir), ("kaggle_road_issues", config.kaggle_road_issues_dir)]
    for source, directory in extras:
        train.append((source, str(directory), str(Path(directory) / "labels.csv")))
    val = [(VAL_SOURCE, config.val_image_dir, config.val_labels_file)]
    return train, val, info


INDEX_COLUMNS = ("id", "path", "label", "source", "origin", "line")


def build_dataset_index(config: Stage1ProConfig, layout: Layout) -> StepResult:
    """Validate every labels file (all problems at once) and write ``dataset_index.csv``."""
    train_cfg, val_cfg, info = data_sources(config, layout)
    train, val = read_sources(train_cfg), read_sources(val_cfg)
    corrupt = find_corrupt_images(train + val)
    if corrupt and not config.skip_corrupt:
        listed = "\n  ".join(f"{sid}: {why}" for sid, why in sorted(corrupt.items()))
        raise ValueError(
            f"{len(corrupt)} image(s) cannot be decoded (fix or remove them, or set skip_corrupt: true):\n  {listed}"
        )
    train = [s for s in train if s.sample_id not in corrupt]
    val = [s for s in val if s.sample_id not in corrupt]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for origin, samples in (("train", train), ("val", val)):
        for s in samples:
            writer.writerow([s.sample_id, str(s.path), s.label, s.source, origin, s.line])
    path = atomic_write_text(layout.dir("dataset_index") / "dataset_index.csv", buffer.getvalue())
    per_source = []
    for origin, samples in (("train", train), ("val", val)):
        for source in sorted({s.source for s in samples}):
            labels = [s.label for s in samples if s.source == source]
            per_source.append({"origin": origin, "source": source, "total": len(labels),
                               "roadwork": sum(labels), "no_roadwork": len(labels) - sum(labels)})
    metadata = {"path": path, "n_train": len(train), "n_val": len(val), "skipped_corrupt": len(corrupt),
                "train_positive_rate": float(np.mean([s.label for s in train])) if train else 0.0,
                "val_positive_rate": float(np.mean([s.label for s in val])) if val else 0.0, **info}
    return StepResult(path, metadata, tables={"per_source": per_source})


def read_dataset_index(layout: Layout) -> dict[str, list[Sample]]:
    """Samples by origin (``train`` / ``val``) from ``dataset_index.csv``."""
    path = layout.root / "dataset_index" / "dataset_index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialise dataset_index first")
    out: dict[str, list[Sample]] = {"train": [], "val": []}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            out[row["origin"]].append(
                Sample(row["id"], Path(row["path"]), int(row["label"]), row["source"], int(row["line"]))
            )
    return out


def build_splits(config: Stage1ProConfig, layout: Layout) -> StepResult:
    """Write ``splits.json`` (train / val_select / val_calib / val_test), shared by all phases."""
    index = read_dataset_index(layout)
    ratios = (config.val_select_ratio, config.val_calib_ratio, config.val_test_ratio)
    splits = make_splits(index["train"], index["val"], config.seed, ratios)
    path = save_splits(splits, layout.dir("splits") / "splits.json")
    rows = [
        {"split": name, "n": len(splits.ids[name]), "roadwork": splits.class_counts[name]["1"],
         "no_roadwork": splits.class_counts[name]["0"]}
        for name in SPLIT_NAMES
    ]
    metadata = {"path": path, "seed": config.seed, **{f"n_{r['split']}": r["n"] for r in rows},
                **{f"positives_{r['split']}": r["roadwork"] for r in rows}}
    return StepResult(path, metadata, tables={"per_split": rows})


def read_splits(layout: Layout):
    index = read_dataset_index(layout)
    known = [s.sample_id for samples in index.values() for s in samples]
    return load_splits(layout.root / "splits" / "splits.json", known_ids=known), index


# ----- backbone and features ----------------------------------------------------------------


def prepare_backbone(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Resolve the phase's backbone (builtin or a local directory), fingerprint it, write backbone.json."""
    from stage1_core.model.backbone import DINOv3Backbone, resolve_backbone

    cfg = config_for_phase(config, partition)
    directory = resolve_backbone(cfg.model_path, layout.root)
    model = DINOv3Backbone.load(directory)
    info = {
        "phase": partition,
        "model_path": cfg.model_path,
        "directory": str(directory),
        "fingerprint": model.fingerprint(),
        "hidden_size": int(model.hidden_size),
        "adaptation": get_recipe(partition).backbone,
        "frozen_parameters": int(model.frozen_parameters),
    }
    path = write_json(layout.dir("backbone", partition) / "backbone.json", info)
    return StepResult(path, info)


def _eval_transform():
    from stage1_core.data.transforms import build_eval_transform, describe_transform

    transform = build_eval_transform()
    return transform, describe_transform(transform)


def cache_features(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """CLS features of every split in a content-addressed store; reused when already there."""
    from stage1_core import features
    from stage1_core.data.datasets import LabelledImageDataset
    from stage1_core.model.backbone import DINOv3Backbone

    cfg = config_for_phase(config, partition)
    info = read_json(layout.root / "backbone" / partition / "backbone.json")
    splits, index = read_splits(layout)
    transform, transform_desc = _eval_transform()
    ids = {name: list(splits.ids[name]) for name in SPLIT_NAMES}
    key = features.cache_key(info["fingerprint"], transform_desc, ids)
    store = layout.feature_store / key
    reused = features.cache_is_valid(store, info["fingerprint"], ids, transform_desc)
    forward_passes = 0
    if not reused:
        by_id = {s.sample_id: s for samples in index.values() for s in samples}
        datasets = {
            name: LabelledImageDataset([by_id[i] for i in ids[name]], transform=transform) for name in SPLIT_NAMES
        }
        backbone = DINOv3Backbone.load(info["directory"])
        manifest = features.extract_split_features(
            backbone, datasets, store, transform_desc=transform_desc, sample_ids=ids,
            max_batch_size=cfg.max_batch_size, fallback_batch_size=cfg.fallback_batch_size,
            num_workers=cfg.num_workers, progress=True,
        )
        forward_passes = int(manifest.forward_passes)
    pointer = {"store": str(store), "key": key, "fingerprint": info["fingerprint"], "reused": reused,
               "forward_passes": forward_passes, "transform": transform_desc,
               **{f"n_{name}": len(ids[name]) for name in SPLIT_NAMES}}
    path = write_json(layout.dir("cached_features", partition) / "cache.json", pointer)
    return StepResult(path, {**pointer, "store": Path(store)})


def load_split(layout: Layout, partition: str, split: str):
    """One split of the phase's feature store as a :class:`~stage1_core.features.TensorSplit`."""
    from stage1_core.features import load_cached_features

    pointer = read_json(layout.root / "cached_features" / partition / "cache.json")
    return load_cached_features(pointer["store"], splits=[split])[split]


def load_split_features(layout: Layout, partition: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of one split from the phase's feature store."""
    data = load_split(layout, partition, split)
    return data.features, data.labels


# ----- training and predictions -----------------------------------------------------------------


def train_phase(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Train the phase's head on cached train features; select on val_select only."""
    from stage1_core.training.trainer import train_head

    cfg = config_for_phase(config, partition)
    require_split("train", "fit")
    require_split("val_select", "select")
    train = load_split(layout, partition, "train")
    val_select = load_split(layout, partition, "val_select")
    out_dir = layout.dir("checkpoint", partition)
    result = train_head(cfg, train, val_select, out_dir, selection_metric=cfg.selection_metric, progress=True)
    if result.best_checkpoint is None:
        raise ValueError(f"training of {partition} produced no best checkpoint (no epoch improved on val_select)")
    checkpoint_id = sha256_file(result.best_checkpoint)
    history = [log_row(record) for record in result.history]
    best_row = next(row for row in history if row["Epoch"] == int(result.best_epoch))
    summary = {
        "phase": partition,
        "selection_metric": cfg.selection_metric,
        "best_epoch": int(result.best_epoch),
        "best_metric": float(result.best_metric),
        "best_val_accuracy": float(best_row["Val_Acc"]),
        "epochs_run": int(result.epochs_run),
        "stopped_early": bool(result.stopped_early),
        "losses_finite": bool(result.losses_finite),
        "checkpoint_id": checkpoint_id,
        "best_checkpoint": Path(result.best_checkpoint).name,
        "log_csv": Path(result.log_csv).name,
        "history": history,
    }
    cfg.save(out_dir / "config.json")
    path = write_json(out_dir / "training.json", summary)
    figures = {"training curves": _plot_training(summary["history"], out_dir / "training_curves.png")}
    metadata = {k: v for k, v in summary.items() if k != "history"}
    metadata["path"] = Path(result.best_checkpoint)
    return StepResult(path, metadata, tables={"history": summary["history"]}, figures=figures)


def log_row(record: dict[str, Any]) -> dict[str, Any]:
    """A trainer history record under the training-log column names, as fractions (not percent)."""
    from stage1_core.training.logging_csv import BASELINE_FORMATS, SELECTIVE_PREFIX, selective_column

    row: dict[str, Any] = {column: record.get(key) for column, (key, _, _) in BASELINE_FORMATS.items()}
    row["Epoch"] = int(row["Epoch"])
    for key, value in record.items():
        if key.startswith(SELECTIVE_PREFIX):
            row[selective_column(key[len(SELECTIVE_PREFIX):])] = value
    return _plain(row)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        if isinstance(value, float) and not np.isfinite(value):
            value = None
        out[key] = value
    return out


def _plot_training(history: list[dict[str, Any]], out_path: Path) -> Path:
    from stage1_core.reporting.training import plot_training_curves

    return plot_training_curves(history, out_path)


def read_training(layout: Layout, partition: str) -> dict[str, Any]:
    return read_json(layout.root / "checkpoint" / partition / "training.json")


def load_head(config: Stage1ProConfig, layout: Layout, partition: str) -> torch.nn.Module:
    """The phase's best head (plain state_dict, loaded with weights_only=True)."""
    from stage1_core.model.head import Stage1Head, load_head_state_dict

    backbone_info = read_json(layout.root / "backbone" / partition / "backbone.json")
    head = Stage1Head(backbone_info["hidden_size"], dropout=config.dropout)
    state = load_tensors(layout.root / "checkpoint" / partition / read_training(layout, partition)["best_checkpoint"])
    load_head_state_dict(head, state)
    return head.eval()


def predict_splits(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Logits of the best checkpoint on val_select, val_calib and val_test."""
    cfg = config_for_phase(config, partition)
    head = load_head(cfg, layout, partition)
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    with torch.inference_mode():
        for split in VAL_SPLITS:
            feats, labels = load_split_features(layout, partition, split)
            logits = head(feats.float())
            tensors[f"{split}_logits"] = logits.cpu()
            tensors[f"{split}_labels"] = labels.cpu()
            accuracy = float((logits.argmax(1) == labels).float().mean())
            rows.append({"split": split, "n": int(len(labels)), "accuracy": accuracy})
    out_dir = layout.dir("predictions", partition)
    path = save_tensors(out_dir / "predictions.pt", tensors)
    checkpoint_id = read_training(layout, partition)["checkpoint_id"]
    write_json(out_dir / "predictions.json", {"checkpoint_id": checkpoint_id, "splits": rows})
    metadata = {"path": path, "checkpoint_id": checkpoint_id,
                **{f"accuracy_{r['split']}": r["accuracy"] for r in rows}}
    return StepResult(path, metadata, tables={"per_split": rows})


def load_predictions(layout: Layout, partition: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(probs [N,2], labels [N])`` of the best checkpoint on ``split``."""
    tensors = load_tensors(layout.root / "predictions" / partition / "predictions.pt")
    probs = torch.softmax(tensors[f"{split}_logits"].double(), dim=1).numpy()
    return probs, tensors[f"{split}_labels"].numpy().astype(int)


# ----- exit policy and evaluation ---------------------------------------------------------------


def fit_exit_policy(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Certify the softmax exit threshold on val_calib (never a default threshold)."""
    from stage1_core.calibration.threshold_sweep import certify_softmax_threshold, thresholds_document
    from stage1_core.metrics.calibration import compute_ece
    from stage1_core.metrics.classification import accuracy, mcc
    from stage1_core.metrics.exit import coverage_at_prior
    from stage1_core.policies import SoftmaxExitPolicy
    from stage1_core.reporting.figures import plot_threshold_sweep

    cfg = config_for_phase(config, partition)
    require_split("val_calib", "calibrate")
    probs, labels = load_predictions(layout, partition, "val_calib")
    result = certify_softmax_threshold(probs, labels, cfg.target_fnr_exit, cfg.delta)
    decisions = SoftmaxExitPolicy(result.exit_threshold).decide(probs)
    preds = probs.argmax(1)
    calib_metrics = {"accuracy": accuracy(labels, preds), "mcc": mcc(labels, preds),
                     "ece": compute_ece(probs, labels), "n": int(len(labels)),
                     "positive_rate": float(labels.mean())}
    doc = thresholds_document(
        result,
        val_calib_metrics=calib_metrics,
        checkpoint_id=read_training(layout, partition)["checkpoint_id"],
        deploy_prior=cfg.deploy_prior,
        coverage_at_deploy_prior=float(coverage_at_prior(decisions.exit, labels, cfg.deploy_prior)),
    )
    out_dir = layout.dir("exit_policy", partition)
    path = write_json(out_dir / "thresholds.json", doc, schema="thresholds")
    figure = plot_threshold_sweep(result, cfg.target_fnr_exit, out_dir / "threshold_sweep.png")
    metadata = {
        "path": path, "certified": bool(result.certified), "exit_threshold": result.exit_threshold,
        "coverage": float(result.coverage), "fnr_upper_bound": float(result.fnr_upper_bound),
        "n_exited_positives": int(result.n_exited_positives), "method": result.method,
        "reason": result.reason, "coverage_at_deploy_prior": doc["coverage_at_deploy_prior"],
    }
    return StepResult(path, metadata, tables={"seed_grid": list(doc["grid_results"])},
                      figures={"threshold sweep (val_calib)": figure})


def build_predictor(config: Stage1ProConfig, layout: Layout, partition: str):
    """The same predictor object the bundle uses: head + policy file (+ backbone lazily)."""
    from stage1_core.bundle.predictor import Stage1Predictor
    from stage1_core.policies import load_policy

    head = load_head(config, layout, partition)
    policy = load_policy(config.exit_policy, layout.root / "exit_policy" / partition / "thresholds.json")
    return Stage1Predictor(head, policy)


def evaluate_phase(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Evaluate the deployed decisions on val_test only, with bootstrap and Clopper-Pearson intervals."""
    from stage1_core.evaluation import evaluate_decisions
    from stage1_core.reporting.figures import plot_reliability, plot_risk_coverage

    cfg = config_for_phase(config, partition)
    require_split("val_test", "evaluate")
    feats, labels_t = load_split_features(layout, partition, "val_test")
    predictor = build_predictor(cfg, layout, partition)
    decisions = predictor.decide_features(feats)
    probs = _softmax(predictor.predict_logits_from_features(feats))
    labels = labels_t.numpy().astype(int)
    report = evaluate_decisions(
        probs, labels, decisions, deploy_prior=cfg.deploy_prior, n_bootstrap=cfg.bootstrap_samples,
        confidence=cfg.bootstrap_confidence, seed=cfg.seed, target_fnr=cfg.target_fnr_exit, delta=cfg.delta,
    )
    out_dir = layout.dir("evaluation", partition)
    report.to_csv(out_dir / "metrics.csv")
    save_tensors(out_dir / "decisions.pt", {
        "exit": torch.as_tensor(np.asarray(decisions.exit, dtype=bool)),
        "label": torch.as_tensor(np.asarray(decisions.label, dtype=np.int64)),
        "p_roadwork": torch.as_tensor(np.asarray(decisions.p_roadwork, dtype=np.float64)),
    })
    exited = np.asarray(decisions.exit, dtype=bool)
    positives = exited & (labels == 1)
    summary = {
        "phase": partition,
        "checkpoint_id": read_training(layout, partition)["checkpoint_id"],
        "n_test": int(len(labels)),
        "n_exited_positives": int(positives.sum()),
        "n_false_negatives": int((positives & (np.asarray(decisions.label) == 0)).sum()),
        **{k: _finite_or_none(v) for k, v in report.headline.items()},
    }
    path = write_json(out_dir / "evaluation.json", summary)
    confidence = probs.max(1)
    residuals = (probs.argmax(1) != labels).astype(float)
    figures = {
        "risk-coverage (val_test)": plot_risk_coverage(confidence, residuals, out_dir / "risk_coverage.png",
                                                       n_bootstrap=min(cfg.bootstrap_samples, 200), seed=cfg.seed),
        "reliability (val_test)": plot_reliability(probs, labels, out_dir / "reliability.png"),
    }
    sweep = layout.root / "exit_policy" / partition / "threshold_sweep.png"
    if sweep.is_file():
        figures["threshold sweep (val_calib)"] = sweep
    rows = [_plain(r) for r in report.table.to_dict(orient="records")]
    return StepResult(path, dict(summary, path=out_dir / "metrics.csv"), tables={"metrics": rows}, figures=figures)


def _softmax(logits: Any) -> np.ndarray:
    return torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1).numpy()


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def read_metrics_csv(layout: Layout, partition: str) -> list[dict[str, Any]]:
    path = layout.root / "evaluation" / partition / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialise evaluation first")
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {"metric": row["metric"]}
            for key, value in row.items():
                if key != "metric":
                    parsed[key] = float(value) if value not in ("", None) else None
            rows.append(parsed)
    return rows


# ----- bundle -------------------------------------------------------------------------------------


def bundle_dir(layout: Layout, partition: str) -> Path:
    return layout.root / "bundle" / partition / "bundle"


def compare_bundle_decisions(directory: Path, layout: Layout, partition: str) -> tuple[list[str], int, int]:
    """Verify a bundle and replay val_test through its predictor: (problems, compared, mismatched)."""
    from stage1_core.bundle.load import BundleError, Stage1Bundle, verify_bundle

    problems = verify_bundle(directory)
    if problems:
        return problems, 0, 0
    try:
        loaded = Stage1Bundle.load(directory, artifacts_root=layout.root)
    except BundleError as exc:
        return [str(exc)], 0, 0
    feats, _ = load_split_features(layout, partition, "val_test")
    decisions = loaded.decide_features(feats)
    expected = load_tensors(layout.root / "evaluation" / partition / "decisions.pt")
    exit_now = np.asarray(decisions.exit, dtype=bool)
    label_now = np.asarray(decisions.label, dtype=np.int64)
    exit_then = expected["exit"].numpy()
    label_then = expected["label"].numpy()
    mismatched = int(((exit_now != exit_then) | (exit_then & (label_now != label_then))).sum())
    return [], int(len(exit_then)), mismatched


def export_phase_bundle(config: Stage1ProConfig, layout: Layout, partition: str, run_id: str | None = None) -> StepResult:
    """Write a staged bundle, verify it, and only then publish it under ``bundle/<phase>/bundle``."""
    from stage1_core.bundle.export import export_bundle

    cfg = config_for_phase(config, partition)
    backbone_info = read_json(layout.root / "backbone" / partition / "backbone.json")
    evaluation = read_json(layout.root / "evaluation" / partition / "evaluation.json")
    thresholds = read_json(layout.root / "exit_policy" / partition / "thresholds.json", schema="thresholds")
    training = read_training(layout, partition)
    _, transform_desc = _eval_transform()
    headline = {
        "certified": bool(thresholds["certified"]),
        "exit_threshold": thresholds["exit_threshold"],
        "calib_coverage": thresholds["coverage"],
        "calib_fnr_upper_bound": thresholds["fnr_upper_bound"],
        **{k: v for k, v in evaluation.items() if isinstance(v, (int, float, bool)) or v is None},
    }
    parent = layout.dir("bundle", partition)
    staging = parent / f".staging-{run_id or 'local'}"
    if staging.exists():
        shutil.rmtree(staging)
    export_bundle(
        staging,
        phase=phase_number(partition),
        head_state_dict_path=layout.root / "checkpoint" / partition / training["best_checkpoint"],
        policy_name=cfg.exit_policy,
        policy_file_path=layout.root / "exit_policy" / partition / "thresholds.json",
        config=cfg,
        splits_path=layout.root / "splits" / "splits.json",
        metrics_csv_path=layout.root / "evaluation" / partition / "metrics.csv",
        backbone_info={"model_path": backbone_info["model_path"], "fingerprint": backbone_info["fingerprint"],
                       "hidden_size": backbone_info["hidden_size"], "transform": transform_desc},
        head_info={"hidden_size": backbone_info["hidden_size"], "dropout": cfg.dropout, "with_gate": False},
        headline=headline,
        dagster_run_id=run_id,
    )
    problems, compared, mismatched = compare_bundle_decisions(staging, layout, partition)
    if problems or mismatched or not compared:
        shutil.rmtree(staging, ignore_errors=True)
        detail = "; ".join(problems) if problems else f"{mismatched} of {compared} val_test decisions differ"
        raise ValueError(f"staged bundle failed verification, not published: {detail}")
    final = bundle_dir(layout, partition)
    previous = parent / f".previous-{run_id or 'local'}"
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    metadata = {"path": final, "n_compared": compared, "n_mismatched": mismatched,
                **{k: v for k, v in headline.items() if v is not None}}
    return StepResult(final, metadata)


def read_phase_summary(layout: Layout, partition: str) -> list[str]:
    """Headline lines of a phase: certified coverage, val_test FNR and its bound, accuracy, MCC."""
    directory = bundle_dir(layout, partition)
    if (directory / "bundle.json").is_file():
        h = read_json(directory / "bundle.json", schema="bundle")["headline"]
        lines = []
    else:
        lines = [f"NO BUNDLE: {partition} did not pass its gate (the failing checks are listed above and in the UI)"]
        h = {}
        policy = layout.root / "exit_policy" / partition / "thresholds.json"
        evaluation = layout.root / "evaluation" / partition / "evaluation.json"
        if policy.is_file():
            doc = read_json(policy)
            h.update(certified=doc["certified"], exit_threshold=doc["exit_threshold"], calib_coverage=doc["coverage"],
                     calib_fnr_upper_bound=doc["fnr_upper_bound"], fnr_target=doc["target_fnr"])
        if evaluation.is_file():
            h.update({k: v for k, v in read_json(evaluation).items() if not isinstance(v, (list, dict))})
        if not h:
            return lines

    def pct(value: Any) -> str:
        return "n/a" if value is None else f"{100 * float(value):.2f}%"

    fnr = "undefined (no exited positive)" if h.get("fnr_on_exited") is None else pct(h["fnr_on_exited"])
    return lines + [
        f"exit threshold (certified on val_calib): {h.get('exit_threshold')}",
        (f"certified coverage on val_calib: {pct(h.get('calib_coverage'))} "
         f"(FNR bound {pct(h.get('calib_fnr_upper_bound'))} <= target {pct(h.get('fnr_target'))})")
        if h.get("certified") else "NOT certified on val_calib: the policy exits nothing",
        f"val_test coverage: {pct(h.get('coverage'))} at the calibration prior, "
        f"{pct(h.get('coverage_at_deploy_prior'))} at deploy prior {h.get('deploy_prior')}",
        f"val_test FNR on exits: {fnr} ({h.get('n_false_negatives')}/{h.get('n_exited_positives')}), "
        f"Clopper-Pearson upper bound {pct(h.get('fnr_on_exited_cp_upper'))}",
        f"val_test accuracy {pct(h.get('accuracy'))}, balanced accuracy {pct(h.get('balanced_accuracy'))}, "
        f"MCC {float(h['mcc']):.4f}" if h.get("mcc") is not None else "val_test MCC n/a",
    ]


# ----- gate criteria --------------------------------------------------------------------------------


def evaluate_criterion(name: str, config: Stage1ProConfig, layout: Layout, partition: str) -> GateVerdict:
    """Decide one gate criterion for ``partition`` from the artifacts (see ``phases.CRITERIA``)."""
    from stage1_core import gates

    number = phase_number(partition)
    recipe = PHASES[number]
    if name not in {c.name for c in recipe.criteria}:
        return GateVerdict(name, True, f"not a criterion of {partition}", {"applicable": False})
    cfg = config_for_phase(config, partition)

    if name == "training_completed":
        training = read_training(layout, partition)
        exists = (layout.root / "checkpoint" / partition / training["best_checkpoint"]).is_file()
        return gates.check_training_completed(training["history"], exists)
    if name == "val_accuracy_vs_baseline":
        training = read_training(layout, partition)
        baseline, source = baseline_accuracy(cfg, layout, partition)
        labels = load_split(layout, partition, "val_select").labels.numpy()
        majority = float(max(labels.mean(), 1.0 - labels.mean()))
        return gates.check_val_accuracy_vs_baseline(training["best_val_accuracy"], baseline, source, majority)
    if name == "selected_checkpoint_is_best":
        training = read_training(layout, partition)
        return gates.check_selected_checkpoint_is_best(training["history"], training["best_epoch"], cfg.selection_metric)
    if name == "thresholds_certified":
        path = layout.root / "exit_policy" / partition / "thresholds.json"
        try:
            doc = read_json(path)
        except ArtifactError as exc:
            return gates.check_thresholds_certified(None, [str(exc)])
        return gates.check_thresholds_certified(doc, schema_errors(doc, "thresholds"))
    if name == "val_test_fnr_bound":
        evaluation = read_json(layout.root / "evaluation" / partition / "evaluation.json")
        return gates.check_test_fnr_bound(evaluation["n_exited_positives"], evaluation["n_false_negatives"],
                                          cfg.target_fnr_exit, cfg.delta)
    if name == "selective_metrics_recomputed":
        rows = {r["metric"]: r["value"] for r in read_metrics_csv(layout, partition)}
        probs, labels = load_predictions(layout, partition, "val_test")
        residuals = (probs.argmax(1) != labels).astype(float)
        return gates.check_selective_metrics_recomputed(rows, probs.max(1), residuals)
    if name == "metrics_in_range":
        return gates.check_metrics_in_range(read_metrics_csv(layout, partition))
    if name == "no_regression_vs_previous_phase":
        previous = PHASES[number - 1].key
        prev_path = layout.root / "evaluation" / previous / "evaluation.json"
        if not prev_path.is_file():
            return GateVerdict(name, False, f"{previous} has no evaluation to compare with ({prev_path} missing)", {})
        prev, cur = read_json(prev_path), read_json(layout.root / "evaluation" / partition / "evaluation.json")
        prev_cov = read_json(layout.root / "exit_policy" / previous / "thresholds.json")["coverage"]
        cur_cov = read_json(layout.root / "exit_policy" / partition / "thresholds.json")["coverage"]
        return gates.check_no_regression({"accuracy": prev["accuracy"], "coverage": prev_cov},
                                         {"accuracy": cur["accuracy"], "coverage": cur_cov})
    if name == "bundle_verified":
        problems, compared, mismatched = compare_bundle_decisions(bundle_dir(layout, partition), layout, partition)
        return gates.check_bundle_verified(problems, compared, mismatched)
    raise ValueError(f"unknown gate criterion {name!r}")


def baseline_accuracy(config: Stage1ProConfig, layout: Layout, partition: str) -> tuple[float, str]:
    """The phase-1 accuracy baseline: config's baseline_val_accuracy, else a logistic probe."""
    from stage1_core.baselines import logistic_probe_accuracy

    if config.baseline_val_accuracy is not None:
        return float(config.baseline_val_accuracy), "baseline_val_accuracy from config"
    train_x, train_y = load_split_features(layout, partition, "train")
    val_x, val_y = load_split_features(layout, partition, "val_select")
    accuracy = logistic_probe_accuracy(
        train_x.numpy(), train_y.numpy(), val_x.numpy(), val_y.numpy(), seed=config.seed,
        class_weighting=config.class_weighting,
    )
    weighting = "class-weighted " if config.class_weighting == "balanced" else ""
    return accuracy, f"{weighting}logistic-regression probe on the cached features"
