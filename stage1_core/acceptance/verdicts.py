"""Deciding and recording verdicts: run a criterion's reader for a phase, keep the verdict on disk.

Every verdict is also written to ``gates/<phase>/<criterion>.json`` with the lineage id of the
asset it judged, so ``stage1 summary`` can name failing criteria without the Dagster instance.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from stage1_core.artifacts import read_json, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.gates import GateVerdict
from stage1_core.lineage import read_record, record_path
from stage1_core.phases import PHASES, phase_number
from stage1_core.steps.context import Layout, StepContext

from .registry import CRITERIA, READERS


def not_applicable(name: str, partition: str) -> GateVerdict:
    return GateVerdict(name, True, f"not applicable: not a criterion of {partition}", {"applicable": False})


def evaluate_criterion(name: str, config: Stage1ProConfig, layout: Layout, partition: str) -> GateVerdict:
    """Decide one criterion for ``partition``; any error becomes a failed verdict naming it."""
    recipe = PHASES[phase_number(partition)]
    if name not in {c.name for c in recipe.criteria}:
        return not_applicable(name, partition)
    try:
        ctx = StepContext(config, layout, partition)
        verdict = READERS[name](ctx)
    except Exception as exc:  # noqa: BLE001 - a check always yields a verdict
        verdict = GateVerdict(name, False, f"could not be evaluated: {type(exc).__name__}: {exc}", {"error": True})
    record_verdict(layout, partition, verdict)
    return verdict


def _current_id(layout: Layout, asset: str, partition: str) -> str | None:
    """Lineage id of the asset partition's current materialisation (None when it has no valid record)."""
    directory = layout.path(asset, partition)
    if not record_path(directory).is_file():
        return None
    try:
        return read_record(directory, asset, partition).id
    except (ValueError, KeyError):
        return None


def record_verdict(layout: Layout, partition: str, verdict: GateVerdict) -> None:
    """Keep the verdict next to the artifacts, with the lineage id of the asset it judged."""
    asset = CRITERIA[verdict.criterion].asset if verdict.criterion in CRITERIA else None
    judged = _current_id(layout, asset, partition) if asset is not None else None
    doc = {**asdict(verdict), "figures": _jsonable(verdict.figures), "judged_id": judged, "asset": asset}
    write_json(layout.dir("gates", partition) / f"{verdict.criterion}.json", doc)


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
    current = {asset: _current_id(layout, asset, partition) for asset in assets}
    return {name: v for name, v in verdicts.items()
            if v.get("asset") is None or v.get("judged_id") == current[v["asset"]]}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
