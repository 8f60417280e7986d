"""Reading the pipeline's artifacts: one place for every file name and reader.

Steps, acceptance criteria, the summary and the CLI read artifacts through these functions (each
validates the file against its schema), so a file name or a schema is written once. Reading is
separate from producing: this module imports no step, so anything may import it. Readers that
need torch (predictions, heads, features) stay with their step modules.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage1_core.artifacts import read_json
from stage1_core.lineage import read_record, record_path

if TYPE_CHECKING:
    from stage1_core.layout import Layout

__all__ = [
    "TRAINING_FILE", "PREDICTIONS_FILE", "BACKBONE_FILE", "CACHE_POINTER", "EVALUATION_FILE", "METRICS_FILE",
    "DECISIONS_FILE", "SERVED_FILE", "CURRENT_LINK", "read_training", "read_backbone", "read_evaluation", "read_metrics_csv",
    "policy_path", "read_policy_document", "bundle_dir", "current_id", "read_verdicts",
]

TRAINING_FILE = "training.json"
PREDICTIONS_FILE = "predictions.pt"
BACKBONE_FILE = "backbone.json"
CACHE_POINTER = "cache.json"
EVALUATION_FILE = "evaluation.json"
METRICS_FILE = "metrics.csv"
DECISIONS_FILE = "decisions.pt"
#: The served-probability calibrator (deployment pipeline on), fit on val_select beside the policy.
SERVED_FILE = "served_calibrator.json"
#: The current bundle of a phase: a symbolic link to its version directory.
CURRENT_LINK = "bundle"


def read_training(layout: Layout, partition: str) -> dict[str, Any]:
    """``checkpoint/<phase>/training.json``: the training record (history, best checkpoint, ids)."""
    return read_json(layout.path("checkpoint", partition) / TRAINING_FILE, schema="training")


def read_backbone(layout: Layout, partition: str) -> dict[str, Any]:
    """``backbone/<phase>/backbone.json``: which backbone weights the phase uses."""
    return read_json(layout.path("backbone", partition) / BACKBONE_FILE, schema="backbone")


def read_evaluation(layout: Layout, partition: str) -> dict[str, Any]:
    """``evaluation/<phase>/evaluation.json``: the val_test evaluation's figures."""
    return read_json(layout.path("evaluation", partition) / EVALUATION_FILE, schema="evaluation")


def read_metrics_csv(layout: Layout, partition: str) -> list[dict[str, Any]]:
    """``evaluation/<phase>/metrics.csv`` as rows (numbers parsed, empty cells None)."""
    path = layout.path("evaluation", partition) / METRICS_FILE
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


def policy_path(layout: Layout, partition: str, name: str) -> Path:
    """Where exit policy ``name`` keeps its certificate for ``partition``."""
    from stage1_core.policies import policy_class  # scipy: this module is imported by the code location

    return layout.path("exit_policy", partition) / policy_class(name).policy_file


def read_policy_document(layout: Layout, partition: str, name: str) -> dict[str, Any]:
    """The certificate of exit policy ``name`` for ``partition``, validated against its schema."""
    from stage1_core.policies import policy_class  # scipy, as above

    return read_json(policy_path(layout, partition, name), schema=policy_class(name).schema)


def bundle_dir(layout: Layout, partition: str) -> Path:
    """The current bundle of a phase (a symbolic link to its version directory)."""
    return layout.path("bundle", partition) / CURRENT_LINK


def current_id(layout: Layout, asset: str, partition: str) -> str | None:
    """Lineage id of the asset partition's current materialisation (None when it has no valid record)."""
    directory = layout.path(asset, partition)
    if not record_path(directory).is_file():
        return None
    try:
        return read_record(directory, asset, partition).id
    except (ValueError, KeyError):
        return None


def read_verdicts(layout: Layout, partition: str, current_only: bool = True) -> dict[str, dict[str, Any]]:
    """The recorded verdicts of ``partition``'s criteria, by name.

    With ``current_only`` a verdict on an asset that has since been re-materialised (its lineage
    id is no longer the one judged), or removed, is left out: it judged something that is gone,
    so a run that stopped before re-judging it must not show its old verdict. (A verdict recorded
    when its asset had no record, and the asset still has none, is kept.)
    """
    directory = layout.path("gates", partition)
    if not directory.is_dir():
        return {}
    verdicts = {p.stem: read_json(p) for p in sorted(directory.glob("*.json"))}
    if not current_only:
        return verdicts
    assets = {v["asset"] for v in verdicts.values() if v.get("asset") is not None}
    current = {asset: current_id(layout, asset, partition) for asset in assets}
    return {name: v for name, v in verdicts.items()
            if v.get("asset") is None or v.get("judged_id") == current[v["asset"]]}
