"""Check the synthetic data set against the builtin tiny backbone, and certify a softmax exit policy on it.

Without Dagster, with the pipeline's own pieces: the builtin tiny DINOv3 (random weights, built
exactly as ``model_path: builtin:tiny-dinov3`` builds it), the evaluation transform, the
hash split into train / val_select / val_calib / val_test (``split_seed`` of the config), the
head trainer with the config's recipe (selection on val_select) and the certified softmax
threshold (``certify_softmax_threshold``) on val_calib. **val_test is never read**: tune the
generator and the head knobs with this script, on any synthetic seed.

Reported:

* probes fitted on train (the phase-1 gate's logistic-regression probe, weighted like the head,
  and a one-hidden-layer MLP), scored on val_select: accuracy, AUROC, share of positives with
  p(roadwork) < 0.1 (confidently missed roadwork, what limits a certified-FNR policy);
* the head: val_select accuracy against the gate's baseline (max(probe, majority)) - 1 point;
* the certified softmax policy on val_calib: threshold, coverage, exits and deferrals per class,
  FNR on exits and its bound, and, per generator condition (visibility tier, lighting, weather),
  how many exit and how many are wrong;
* an asymmetric reference on the same outputs: exit every predicted "roadwork" and predicted "no
  roadwork" above a certified threshold (how much a gate that is strict only on "no roadwork"
  could gain);
* ``--phase3``: the gated head of phase 3 trained on the same features; its raw gate score
  certified on val_calib next to the softmax policy of the same checkpoint (a strictly
  increasing calibration map leaves the certified exit set unchanged, so this is the coverage
  the gate policy would get on val_calib).

    python benchmarks/check_synthetic_learnability.py --data DIR [--generate] [--seed S]
        [--config configs/default.yaml] [--set key=value ...] [--phase3] [--json FILE]

Features are cached in ``DIR/../<DIR name>.features`` keyed by image content, so re-running
with other head knobs skips the extraction.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stage1_core.calibration.threshold_sweep import certify_score_threshold, certify_softmax_threshold
from stage1_core.config import Stage1ProConfig
from stage1_core.data.datasets import LabelledImageDataset, Sample, read_sources
from stage1_core.data.splits import make_splits
from stage1_core.data.synthetic import generate_synthetic_dataset, image_conditions
from stage1_core.features import TensorSplit, extract_split_features, load_cached_features
from stage1_core.phases import config_for_phase
from stage1_core.steps.backbone import eval_transform
from stage1_core.steps.data import TRAIN_SOURCE, VAL_SOURCE, hash_images

SPLITS = ("train", "val_select", "val_calib")  # val_test is never read here


def load_config(path: Path, overrides: list[str], seed: int | None) -> Stage1ProConfig:
    """The config file with ``key=value`` overrides (values parsed as YAML)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for item in overrides:
        key, _, value = item.partition("=")
        data[key.strip()] = yaml.safe_load(value)
    if seed is not None:
        data["synthetic_seed"] = seed
    return Stage1ProConfig.from_dict(data, source=path)


def split_samples(data_dir: Path, config: Stage1ProConfig) -> dict[str, list[Sample]]:
    """train / val_select / val_calib samples, with the pipeline's sample ids and hash split."""
    train = read_sources([(TRAIN_SOURCE, str(data_dir / "train"), str(data_dir / "train_labels.csv"))])
    val = read_sources([(VAL_SOURCE, str(data_dir / "val"), str(data_dir / "val_labels.csv"))])
    ratios = (config.val_select_ratio, config.val_calib_ratio, config.val_test_ratio)
    splits = make_splits(train, val, config.split_seed, ratios)
    by_id = {s.sample_id: s for s in train + val}
    return {name: [by_id[i] for i in splits.ids[name]] for name in SPLITS}


def extract_features(samples: dict[str, list[Sample]], cache_dir: Path) -> tuple[dict[str, TensorSplit], float]:
    """CLS features of the builtin tiny DINOv3, cached by image content (as the pipeline keys them)."""
    from stage1_core.model.backbone import TINY_DINOV3, DINOv3Backbone, ensure_builtin_backbone

    with tempfile.TemporaryDirectory() as root:
        backbone = DINOv3Backbone.load(ensure_builtin_backbone(TINY_DINOV3, root))
    transform, transform_desc = eval_transform()
    digests = hash_images([s for group in samples.values() for s in group])
    content = {name: [digests[s.sample_id] for s in group] for name, group in samples.items()}
    datasets = {name: LabelledImageDataset(group, transform=transform) for name, group in samples.items()}
    start = time.perf_counter()
    extract_split_features(backbone, datasets, cache_dir, transform_desc=transform_desc, sample_ids=content,
                           num_workers=2, progress=True, store_labels=False)
    seconds = time.perf_counter() - start
    labels = {name: torch.tensor([s.label for s in group]) for name, group in samples.items()}
    loaded = load_cached_features(cache_dir, splits=list(samples), labels=labels)
    return {name: TensorSplit(loaded[name].features, loaded[name].labels, tuple(s.sample_id for s in samples[name]), name)
            for name in samples}, seconds


def probe_scores(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pos = y == 1
    return {
        "accuracy": float(np.mean((p >= 0.5) == pos)),
        "auroc": float(roc_auc_score(y, p)),
        "pos_p_below_0.1": float(np.mean(p[pos] < 0.1)),
        "pos_p_below_0.5": float(np.mean(p[pos] < 0.5)),
        "neg_p_above_0.5": float(np.mean(p[~pos] >= 0.5)),
    }


def probes(train: TensorSplit, val: TensorSplit, class_weighting: str) -> dict[str, Any]:
    """The phase-1 gate's logistic probe (weighted like the head) and an MLP probe, scored on ``val``."""
    from stage1_core.baselines import class_weights

    x, y = train.features.numpy().astype(np.float64), train.labels.numpy()
    xv, yv = val.features.numpy().astype(np.float64), val.labels.numpy()
    weights = class_weights(y)
    logreg = make_pipeline(StandardScaler(), LogisticRegression(
        class_weight={0: weights[0], 1: weights[1]} if class_weighting == "balanced" else None, max_iter=5000))
    logreg.fit(x, y)
    mlp = make_pipeline(StandardScaler(), MLPClassifier((256,), alpha=1e-3, max_iter=500, early_stopping=True,
                                                        random_state=0))
    mlp.fit(x, y)
    return {name: {"train_accuracy": float(model.score(x, y)), **probe_scores(model.predict_proba(xv)[:, 1], yv)}
            for name, model in (("logreg", logreg), ("mlp", mlp))}


def train(config: Stage1ProConfig, phase: str, features: dict[str, TensorSplit], out_dir: Path) -> dict[str, Any]:
    """Train the phase's head with the pipeline's trainer; outputs of its best checkpoint on val_select/val_calib."""
    from stage1_core.phases import get_recipe
    from stage1_core.training.recipes import build_loss
    from stage1_core.training.trainer import predict_outputs, train_head

    cfg = config_for_phase(config, phase)
    recipe = get_recipe(phase)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only stall on a shared machine
    try:
        result = train_head(cfg, features["train"], features["val_select"], out_dir, progress=False,
                            loss_fn=build_loss(recipe.loss_kind, cfg, features["train"].labels),
                            with_gate=recipe.head_kind == "gated")
    finally:
        torch.set_num_threads(threads)
    outputs = {split: predict_outputs(result.best_checkpoint, features[split], cfg) for split in ("val_select", "val_calib")}
    return {"result": result, "outputs": outputs, "seconds": time.perf_counter() - start}


def softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1).numpy()


def policy_summary(exit_mask: np.ndarray, preds: np.ndarray, y: np.ndarray, cert: Any) -> dict[str, Any]:
    """Coverage and class mix of exits and deferrals of one certified policy."""
    deferred = ~exit_mask
    return {
        "certified": bool(cert.certified),
        "threshold": cert.exit_threshold,
        "coverage": float(exit_mask.mean()),
        "fnr_on_exits": cert.fnr_on_exits,
        "fnr_upper_bound": float(cert.fnr_upper_bound),
        "exited_positives": int((exit_mask & (y == 1)).sum()),
        "exited_negatives": int((exit_mask & (y == 0)).sum()),
        "deferred_positives": int((deferred & (y == 1)).sum()),
        "deferred_negatives": int((deferred & (y == 0)).sum()),
        "false_negatives_on_exits": int((exit_mask & (y == 1) & (preds == 0)).sum()),
        "exit_accuracy": float((preds[exit_mask] == y[exit_mask]).mean()) if exit_mask.any() else None,
        "reason": cert.reason,
    }


def asymmetric_reference(probs: np.ndarray, y: np.ndarray, config: Stage1ProConfig) -> dict[str, Any]:
    """Certified coverage of "exit every predicted roadwork, and predicted no-roadwork when p >= t".

    A label-free score (predicted positives first, then predicted negatives by confidence): FNR on
    exits only counts predicted negatives, so this shows how much coverage an exit rule that is
    lenient on "roadwork" and strict on "no roadwork" (what the phase-3 gate can learn) has to gain.
    """
    preds = probs.argmax(1)
    score = np.where(preds == 1, 1.0 + probs[:, 1], probs[:, 0])
    cert = certify_score_threshold(score, preds, y, config.target_fnr_exit, config.delta)
    mask = score >= cert.exit_threshold if cert.exit_threshold is not None else np.zeros(len(y), bool)
    return policy_summary(mask, preds, y, cert)


def by_condition(samples: list[Sample], seed: int, exit_mask: np.ndarray, preds: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per generator condition on val_calib: n, exit rate, error rate, errors among exits."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for k, sample in enumerate(samples):
        info = image_conditions(seed, "val", int(sample.path.stem.split("_")[-1]))
        keys = [f"tier={info['tier']}", f"light={info['light']}", f"weather={info['weather']}"]
        if info["occluded"]:
            keys.append("occluded")
        if info["flipped"]:
            keys.append("label_flipped")
        for key in keys:
            row = rows[key]
            row["n"] += 1
            row["exit"] += float(exit_mask[k])
            row["wrong"] += float(preds[k] != sample.label)
            row["wrong_exit"] += float(exit_mask[k] and preds[k] != sample.label)
    return {key: {"n": int(r["n"]), "exit_rate": round(r["exit"] / r["n"], 3), "error_rate": round(r["wrong"] / r["n"], 3),
                  "wrong_exits": int(r["wrong_exit"])} for key, r in sorted(rows.items())}


def certify_phase1(config: Stage1ProConfig, samples: dict[str, list[Sample]], features: dict[str, TensorSplit],
                   probe: dict[str, Any], work: Path) -> dict[str, Any]:
    trained = train(config, "phase1", features, work / "phase1")
    result = trained["result"]
    y_sel = features["val_select"].labels.numpy()
    y = features["val_calib"].labels.numpy()
    probs = softmax(trained["outputs"]["val_calib"]["logits"])
    preds = probs.argmax(1)
    sel_acc = float((softmax(trained["outputs"]["val_select"]["logits"]).argmax(1) == y_sel).mean())
    majority = float(max(y_sel.mean(), 1 - y_sel.mean()))
    baseline = max(probe["logreg"]["accuracy"], majority)
    cert = certify_softmax_threshold(probs, y, config.target_fnr_exit, config.delta)
    exit_mask = probs.max(1) >= cert.exit_threshold if cert.exit_threshold is not None else np.zeros(len(y), bool)
    return {
        "head": {"val_select_accuracy": sel_acc, "gate_baseline": baseline, "majority": majority,
                 "passes_accuracy_gate": sel_acc >= baseline - 0.01, "best_epoch": int(result.best_epoch),
                 "epochs_run": int(result.epochs_run), "train_seconds": round(trained["seconds"], 1),
                 "val_calib_accuracy": float((preds == y).mean()),
                 "val_calib_auroc": float(roc_auc_score(y, probs[:, 1]))},
        "softmax_val_calib": policy_summary(exit_mask, preds, y, cert),
        "asymmetric_reference_val_calib": asymmetric_reference(probs, y, config),
        "by_condition_val_calib": by_condition(samples["val_calib"], config.synthetic_seed, exit_mask, preds),
    }


def certify_phase3(config: Stage1ProConfig, features: dict[str, TensorSplit], work: Path) -> dict[str, Any]:
    trained = train(config, "phase3", features, work / "phase3")
    out = trained["outputs"]["val_calib"]
    y = features["val_calib"].labels.numpy()
    probs = softmax(out["logits"])
    preds = probs.argmax(1)
    gate = out["gate"].double().numpy()
    soft = certify_softmax_threshold(probs, y, config.target_fnr_exit, config.delta)
    soft_mask = probs.max(1) >= soft.exit_threshold if soft.exit_threshold is not None else np.zeros(len(y), bool)
    gated = certify_score_threshold(gate, preds, y, config.target_fnr_exit, config.delta)
    gate_mask = gate >= gated.exit_threshold if gated.exit_threshold is not None else np.zeros(len(y), bool)
    y_sel = features["val_select"].labels.numpy()
    sel_acc = float((trained["outputs"]["val_select"]["logits"].argmax(1).numpy() == y_sel).mean())
    return {"val_select_accuracy": sel_acc, "train_seconds": round(trained["seconds"], 1),
            "softmax_val_calib": policy_summary(soft_mask, preds, y, soft),
            "gate_val_calib": policy_summary(gate_mask, preds, y, gated),
            "asymmetric_reference_val_calib": asymmetric_reference(probs, y, config),
            "gate_gain": float(gate_mask.mean() - soft_mask.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--generate", action="store_true", help="generate the data set first")
    parser.add_argument("--seed", type=int, default=None, help="synthetic seed (default: the config's)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-val", type=int, default=None)
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--phase3", action="store_true", help="also train the phase-3 gated head and certify its gate")
    parser.add_argument("--no-conditions", action="store_true", help="skip the per-condition table")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_config(args.config, args.set, args.seed)
    report: dict[str, Any] = {"synthetic_seed": config.synthetic_seed, "seed": config.seed, "overrides": args.set}
    if args.generate:
        n_train = args.n_train or config.synthetic_n_train
        n_val = args.n_val or config.synthetic_n_val
        summary = generate_synthetic_dataset(args.data, n_train, n_val, seed=config.synthetic_seed, progress=False)
        report["generation"] = summary.to_dict()
        print(json.dumps(report["generation"]), flush=True)
    samples = split_samples(args.data, config)
    cache = args.data.parent / f"{args.data.name}.features"
    features, seconds = extract_features(samples, cache)
    report["extract_seconds"] = round(seconds, 1)
    report["sizes"] = {name: {"n": len(group), "positives": int(sum(s.label for s in group))} for name, group in samples.items()}
    report["probes_val_select"] = probes(features["train"], features["val_select"], config.class_weighting)
    print(json.dumps({k: report[k] for k in ("sizes", "probes_val_select")}), flush=True)
    with tempfile.TemporaryDirectory() as work:
        report["phase1"] = certify_phase1(config, samples, features, report["probes_val_select"], Path(work))
        if args.no_conditions:
            report["phase1"].pop("by_condition_val_calib")
        print(json.dumps({"phase1": {k: report["phase1"][k] for k in ("head", "softmax_val_calib",
                                                                     "asymmetric_reference_val_calib")}}), flush=True)
        if args.phase3:
            report["phase3"] = certify_phase3(config, features, Path(work))
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
