"""Check that the synthetic data set is learnable by the builtin tiny backbone (random-init DINOv3).

Features: CLS token of a randomly initialised, frozen tiny DINOv3 (seed 0) on eval-transformed
images (Resize 256 bicubic, CenterCrop 224, ImageNet normalisation). Classifiers: class-weighted
logistic regression on standardised train features (the acceptance probe) and a one-hidden-layer
MLP (closer to the real head). Reported on val: accuracy, AUROC, and the
fraction of val positives with p(roadwork) < 0.1 (confidently missed roadwork), which is what
limits the coverage of a certified-FNR exit policy. With ``--generate`` the same figures are also
given on the val images whose label was not flipped by the generator's label noise ("clean").

    python benchmarks/check_synthetic_learnability.py --data DIR [--generate] [--n-train N] [--n-val N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from stage1_core.data.datasets import NATIXDataset
from stage1_core.data.synthetic import generate_synthetic_dataset


def tiny_dinov3() -> torch.nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
        patch_size=16, num_register_tokens=4, image_size=224,
    )
    return DINOv3ViTModel(config).eval()


@torch.no_grad()
def extract(model: torch.nn.Module, dataset: NATIXDataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=2)
    feats, labels = [], []
    for x, y in loader:
        feats.append(model(pixel_values=x).last_hidden_state[:, 0].numpy())
        labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def _scores(p: np.ndarray, y: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    pos = y == 1
    return {
        "val_accuracy": float(np.mean((p >= 0.5) == pos)),
        "val_auroc": float(roc_auc_score(y, p)),
        "val_pos_p_below_0.1": float(np.mean(p[pos] < 0.1)),
        "val_pos_p_below_0.5": float(np.mean(p[pos] < 0.5)),
        "val_neg_p_above_0.5": float(np.mean(p[~pos] >= 0.5)),
        "val_clean_accuracy": float(np.mean((p[clean] >= 0.5) == pos[clean])),
        "val_clean_auroc": float(roc_auc_score(y[clean], p[clean])),
        "val_clean_pos_p_below_0.1": float(np.mean(p[clean & pos] < 0.1)),
    }


def probe_learnability(data_dir: Path, val_flipped: frozenset[str] = frozenset()) -> dict[str, object]:
    """Fit the probes on train, score val; ``val_flipped`` names val images with flipped labels.

    ``logreg`` is the acceptance probe (class-weighted logistic regression, C=1, standardised
    features); ``mlp`` (one hidden layer of 256, early stopping) is closer to the real head.
    """
    model = tiny_dinov3()
    train = NATIXDataset(data_dir / "train", data_dir / "train_labels.csv")
    val = NATIXDataset(data_dir / "val", data_dir / "val_labels.csv")
    start = time.perf_counter()
    x_train, y_train = extract(model, train)
    x_val, y_val = extract(model, val)
    seconds = time.perf_counter() - start
    clean = np.array([s.path.name not in val_flipped for s in val.samples])
    logreg = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000, C=1.0))
    logreg.fit(x_train, y_train)
    mlp = make_pipeline(
        StandardScaler(), MLPClassifier((256,), alpha=1e-3, max_iter=500, early_stopping=True, random_state=0)
    )
    mlp.fit(x_train, y_train)
    return {
        "n_train": int(len(y_train)),
        "n_val": int(len(y_val)),
        "extract_seconds": round(seconds, 1),
        "logreg": {"train_accuracy": float(logreg.score(x_train, y_train)), **_scores(logreg.predict_proba(x_val)[:, 1], y_val, clean)},
        "mlp": {"train_accuracy": float(mlp.score(x_train, y_train)), **_scores(mlp.predict_proba(x_val)[:, 1], y_val, clean)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--generate", action="store_true", help="generate the data set first")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-val", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    flipped: frozenset[str] = frozenset()
    if args.generate:
        kwargs = {k: v for k, v in (("n_train", args.n_train), ("n_val", args.n_val)) if v is not None}
        summary = generate_synthetic_dataset(args.data, seed=args.seed, progress=False, **kwargs)
        flipped = frozenset(summary.val_flipped)
        print(json.dumps(summary.to_dict(), indent=2))
    print(json.dumps(probe_learnability(args.data, flipped), indent=2))


if __name__ == "__main__":
    main()
