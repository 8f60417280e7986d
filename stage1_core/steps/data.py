"""Data steps shared by every phase: the validated dataset index and the splits.

The index holds, per sample, its id, path, label, source, split of origin, CSV line and the
sha256 of the image bytes. Its lineage id therefore changes when a label or an image changes,
and the feature store is keyed by image content, so relabelling reuses every feature.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from stage1_core.artifacts import atomic_write_text, read_json, sha256_file, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.datasets import Sample, find_corrupt_images, read_sources
from stage1_core.data.duplicates import REPORT_COLUMNS, VAL_IN_TRAIN, VAL_IN_UNLABELED, resolve_duplicates
from stage1_core.data.splits import SPLIT_NAMES, load_splits, make_splits, save_splits
from stage1_core.steps.context import Layout, StepContext, StepResult

TRAIN_SOURCE = "natix_train"
VAL_SOURCE = "natix"
INDEX_FILE = "dataset_index.csv"
INDEX_COLUMNS = ("id", "path", "label", "source", "origin", "line", "sha256")
DUPLICATES_FILE = "duplicates.csv"

logger = logging.getLogger(__name__)
def ensure_synthetic_data(config: Stage1ProConfig, out_dir: Path) -> dict[str, Any]:
    """Generate the embedded synthetic data set once per (size, seed, generator version); reuse it afterwards.

    The marker ``synthetic.json`` records what the data was made with; a data set made by another
    generator version (the same seed then draws other images) is deleted and generated again.
    """
    from stage1_core.data.synthetic import GENERATOR_VERSION, generate_synthetic_dataset

    params = {"n_train": config.synthetic_n_train, "n_val": config.synthetic_n_val, "seed": config.synthetic_seed,
              "generator_version": GENERATOR_VERSION}
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


def extra_sources(config: Stage1ProConfig) -> list[tuple[str, str, str]]:
    """The optional extra training sources, in the same layout the ``stage1 train`` CLI reads."""
    from stage1_core.training.standalone import train_source_configs

    return train_source_configs(config)[1:]


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
    if config.skip_missing_sources:
        from stage1_core.data.sources import missing_extra_sources

        info["skipped_sources"] = [f"{name} ({why})" for name, why in missing_extra_sources(config).items()]
    train = [(TRAIN_SOURCE, config.train_image_dir, config.train_labels_file), *extra_sources(config)]
    val = [(VAL_SOURCE, config.val_image_dir, config.val_labels_file)]
    return train, val, info


def hash_images(samples: list[Sample]) -> dict[str, str]:
    """sha256 of every image file, by sample id (threads: hashing is I/O and C code)."""
    threads = min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(lambda s: sha256_file(s.path), samples))
    return {s.sample_id: d for s, d in zip(samples, digests)}


def hash_unlabeled_images(directory: str | None) -> dict[str, Path]:
    """sha256 -> path of every image in the ExPLoRA unlabeled folder (empty when none is configured)."""
    if not directory:
        return {}
    from stage1_core.domain_adaptation.data import IMAGE_SUFFIXES

    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"unlabeled_image_dir {root} is not a directory - fix the path or unset it")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    threads = min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(sha256_file, paths))
    found: dict[str, Path] = {}
    for path, digest in zip(paths, digests):
        found.setdefault(digest, path)
    return found


def build_dataset_index(config: Stage1ProConfig, layout: Layout) -> StepResult:
    """Validate every labels file (all problems at once) and write ``dataset_index.csv``."""
    ctx = StepContext(config, layout)
    ctx.require("dataset_index", [])  # no inputs: takes the write lock of dataset_index
    train_cfg, val_cfg, info = data_sources(config, layout)
    labels_file_of = {source: labels for source, _, labels in [*train_cfg, *val_cfg]}
    train, val = read_sources(train_cfg), read_sources(val_cfg)
    corrupt = find_corrupt_images(train + val)
    by_id = {s.sample_id: s for s in train + val}
    if corrupt and not config.skip_corrupt:
        listed = "\n  ".join(
            f"{labels_file_of.get(by_id[sid].source, by_id[sid].source)}:{by_id[sid].line}: {by_id[sid].path}: {why}"
            for sid, why in sorted(corrupt.items())
        )
        raise ValueError(
            f"{len(corrupt)} image(s) cannot be decoded (fix or remove them, or set skip_corrupt: true):\n  {listed}"
        )
    train = [s for s in train if s.sample_id not in corrupt]
    val = [s for s in val if s.sample_id not in corrupt]
    digests = hash_images(train + val)
    duplicates = resolve_duplicates(train, val, digests, hash_unlabeled_images(config.unlabeled_image_dir),
                                    labels_file_of)
    train, val = duplicates.train, duplicates.val
    if duplicates.dropped:
        logger.warning("%d duplicate image(s) left out of the index (see %s):\n  %s", len(duplicates.dropped),
                       DUPLICATES_FILE, "\n  ".join(f"{d.sample.path} (line {d.sample.line}): {d.reason}; copy of "
                                                      f"{d.kept_path}" for d in duplicates.dropped[:20]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    identity = hashlib.sha256()
    for origin, samples in (("train", train), ("val", val)):
        for s in samples:
            writer.writerow([s.sample_id, str(s.path), s.label, s.source, origin, s.line, digests[s.sample_id]])
            identity.update(f"{s.sample_id},{s.label},{s.source},{origin},{s.line},{digests[s.sample_id]}\n".encode())
    directory = layout.dir("dataset_index")
    report = io.StringIO()
    report_writer = csv.DictWriter(report, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    report_writer.writeheader()
    report_writer.writerows(d.row() for d in duplicates.dropped)
    atomic_write_text(directory / DUPLICATES_FILE, report.getvalue())
    path = atomic_write_text(directory / INDEX_FILE, buffer.getvalue())
    # The index's identity is what the images are (ids, labels, hashes), not where they lie: a
    # project moved to another directory keeps its lineage.
    record = ctx.finish("dataset_index", [INDEX_FILE, DUPLICATES_FILE], [], id_parts={"rows": identity.hexdigest()})
    per_source = []
    for origin, samples in (("train", train), ("val", val)):
        for source in sorted({s.source for s in samples}):
            labels = [s.label for s in samples if s.source == source]
            per_source.append({"origin": origin, "source": source, "total": len(labels),
                               "roadwork": sum(labels), "no_roadwork": len(labels) - sum(labels)})
    metadata = {"path": path, "lineage_id": record.id, "n_train": len(train), "n_val": len(val),
                "skipped_corrupt": len(corrupt), "dropped_duplicates": len(duplicates.dropped),
                "dropped_val_leaks": duplicates.count(VAL_IN_TRAIN) + duplicates.count(VAL_IN_UNLABELED),
                "train_positive_rate": float(np.mean([s.label for s in train])) if train else 0.0,
                "val_positive_rate": float(np.mean([s.label for s in val])) if val else 0.0, **info}
    tables = {"per_source": per_source}
    if duplicates.dropped:
        tables["duplicates"] = [d.row() for d in duplicates.dropped]
    return StepResult(path, metadata, tables=tables, record=record)


class DatasetIndex:
    """The rows of ``dataset_index.csv``: samples by origin, labels and image hashes by id."""

    def __init__(self, samples: dict[str, list[Sample]], sha256: dict[str, str]):
        self.samples = samples
        self.sha256 = sha256
        self.by_id = {s.sample_id: s for group in samples.values() for s in group}

    def labels(self, ids: list[str] | tuple[str, ...]) -> np.ndarray:
        return np.array([self.by_id[i].label for i in ids], dtype=np.int64)


def read_dataset_index(layout: Layout) -> DatasetIndex:
    """The dataset index as written by :func:`build_dataset_index`."""
    path = layout.path("dataset_index") / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialise dataset_index first")
    samples: dict[str, list[Sample]] = {"train": [], "val": []}
    digests: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            samples[row["origin"]].append(
                Sample(row["id"], Path(row["path"]), int(row["label"]), row["source"], int(row["line"]),
                       sha256=row["sha256"])
            )
            digests[row["id"]] = row["sha256"]
    return DatasetIndex(samples, digests)


def build_splits(config: Stage1ProConfig, layout: Layout) -> StepResult:
    """Write ``splits.json`` (train / val_select / val_calib / val_test), shared by all phases.

    The assignment uses ``split_seed``, never the training ``seed``.
    """
    ctx = StepContext(config, layout)
    inputs = ctx.require("splits", [("dataset_index", None)])
    index = read_dataset_index(layout)
    ratios = (config.val_select_ratio, config.val_calib_ratio, config.val_test_ratio)
    splits = make_splits(index.samples["train"], index.samples["val"], config.split_seed, ratios)
    path = save_splits(splits, layout.dir("splits") / "splits.json")
    record = ctx.finish("splits", ["splits.json"], inputs)
    rows = [
        {"split": name, "n": len(splits.ids[name]), "roadwork": splits.class_counts[name]["1"],
         "no_roadwork": splits.class_counts[name]["0"]}
        for name in SPLIT_NAMES
    ]
    metadata = {"path": path, "lineage_id": record.id, "split_seed": config.split_seed,
                **{f"n_{r['split']}": r["n"] for r in rows},
                **{f"positives_{r['split']}": r["roadwork"] for r in rows}}
    return StepResult(path, metadata, tables={"per_split": rows}, record=record)


def read_splits(layout: Layout):
    """``(Splits, DatasetIndex)``: the split ids, checked against the index."""
    index = read_dataset_index(layout)
    return load_splits(layout.path("splits") / "splits.json", known_ids=list(index.by_id)), index


def load_store_split(layout: Layout, store: str | Path, split: str):
    """Rows ``split`` of a feature store, tagged by content: sample ids and labels from the rows' images.

    A store keys its rows by the sha256 of their images (:func:`split_content`). Each
    row is mapped back to the sample of the splits holding that image, and every one must be in
    ``split`` (:func:`~stage1_core.data.splits.require_stored_as`): a store whose rows under that
    name are another split's images, or a mixture, is refused, and every later role check reads
    what the rows are, not what they were called.
    """
    import torch

    from stage1_core.data.splits import SplitError, require_stored_as
    from stage1_core.features import TensorSplit, load_cached_features, read_manifest

    splits, index = read_splits(layout)
    sample_of = {index.sha256[sid]: sid for name in SPLIT_NAMES for sid in splits.ids[name]}
    hashes = read_manifest(store).sample_ids(split)
    strangers = [h for h in hashes if h not in sample_of]
    if strangers:
        raise SplitError(f"feature store {store}, rows {split!r}: {len(strangers)} of {len(hashes)} rows are images "
                         f"in no split (first sha256 {strangers[0][:16]}...); re-materialise cached_features")
    ids = tuple(sample_of[h] for h in hashes)
    require_stored_as(ids, split, splits, f"feature store {store}",
                      "re-materialise cached_features on the current splits")
    labels = torch.as_tensor(index.labels(list(ids)))
    data = load_cached_features(store, splits=[split], labels={split: labels})[split]
    return TensorSplit(data.features, data.labels, ids, split)


def split_content(layout: Layout, split_names: tuple[str, ...]) -> dict[str, list[str]]:
    """sha256 of every image of each split, in split order (the feature store's content key)."""
    splits, index = read_splits(layout)
    return {name: [index.sha256[i] for i in splits.ids[name]] for name in split_names}
