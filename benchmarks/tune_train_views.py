"""Choose ``train_views`` (challenge views per training image) on val_select, never on val_test.

Reads a finished phase-1 run's artifacts (``--artifacts``: its dataset index, splits and feature
stores; the pipeline must be ``streetvision``), extracts the missing training views of the
source backbone for the largest K asked (content-addressed: views already there cost nothing),
then for each K trains phase 1's head (the phase-1 recipe, the run's config) on the clean
features plus K views and reports on the deployment draw of val_select: accuracy, the softmax
policy's coverage certified *on val_select* (the selection proxy: the same binomial test the
certificate runs on val_calib) and its FNR bound. val_calib's certificate is printed for the
record only; val_test is never read.

    python benchmarks/tune_train_views.py --artifacts /tmp/wd/artifacts --views 0 1 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--views", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    args = parser.parse_args()

    import torch

    from stage1_core.calibration.threshold_sweep import certify_softmax_threshold
    from stage1_core.bundle.predictor import Stage1Predictor
    from stage1_core.config import Stage1ProConfig
    from stage1_core.data.views import MultiViewSplit
    from stage1_core.phases import config_for_phase
    from stage1_core.steps.backbone import load_split
    from stage1_core.store import read_backbone
    from stage1_core.steps.context import Layout
    from stage1_core.features import load_cached_features
    from stage1_core.phases import get_recipe
    from stage1_core.steps.deployment import ensure_deployment_features, view_store
    from stage1_core.training.recipes import build_loss
    from stage1_core.training.trainer import load_head, train_head

    layout = Layout(args.artifacts)
    base = Stage1ProConfig.from_file(args.config)
    cfg = config_for_phase(base.with_updates(train_views=max(args.views)), "phase1")
    info = read_backbone(layout, "phase1")
    ensure_deployment_features(cfg, layout, info["directory"], info["fingerprint"], with_train=True)
    train = load_split(layout, "phase1", "train")
    val_select = load_split(layout, "phase1", "val_select")
    val_calib = load_split(layout, "phase1", "val_calib")
    views = []
    for v in range(1, max(args.views) + 1):
        store, _, _, _ = view_store(layout, info["fingerprint"], cfg.deploy_seed, f"train_view{v}", max(args.views))
        views.append(load_cached_features(store, splits=["train"], labels={"train": train.labels})["train"].features)
    target, delta = cfg.target_fnr_exit, cfg.delta
    print(f"{'K':>2} {'val_select acc':>15} {'cert. cov. val_select':>22} {'bound':>7} {'cert. cov. val_calib':>21} {'bound':>7}")
    for k in args.views:
        data = MultiViewSplit.of(train, views[:k]) if k else train
        with tempfile.TemporaryDirectory() as out:
            result = train_head(cfg, data, val_select, out, progress=False,
                                loss_fn=build_loss(get_recipe("phase1").loss_kind, cfg, train.labels))
            head = load_head(result.best_checkpoint, train.hidden_size)
        predictor = Stage1Predictor(head, _softmax_policy())
        row = [k]
        for split in (val_select, val_calib):
            probs = predictor.predict_proba_from_features(split.features)
            labels = split.labels.numpy()
            if split is val_select:
                row.append(float((probs.argmax(1) == labels).mean()))
            cert = certify_softmax_threshold(probs, labels, target, delta)
            row += [float(cert.coverage), float(cert.fnr_upper_bound)]
        print(f"{row[0]:>2} {row[1]:>15.4f} {row[2]:>22.4f} {row[3]:>7.4f} {row[4]:>21.4f} {row[5]:>7.4f}", flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def _softmax_policy():
    from stage1_core.policies import SoftmaxExitPolicy

    return SoftmaxExitPolicy(None)


if __name__ == "__main__":
    main()
