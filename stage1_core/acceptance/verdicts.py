"""Deciding and recording verdicts: run a criterion's reader for a phase, keep the verdict on disk.

Every verdict is also written to ``gates/<phase>/<criterion>.json`` with the lineage id of the
asset it judged, so ``stage1 summary`` can name failing criteria without the Dagster instance.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from stage1_core.artifacts import jsonable, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.gates import GateVerdict
from stage1_core.locking import default_timeout, lock_scope, path_lock
from stage1_core.phases import PHASES, phase_number
from stage1_core.steps.context import Layout, StepContext
from stage1_core.store import current_id

from .registry import CRITERIA, READERS


def not_applicable(name: str, partition: str) -> GateVerdict:
    return GateVerdict(name, True, f"not applicable: not a criterion of {partition}", {"applicable": False})


def evaluate_criterion(name: str, config: Stage1ProConfig, layout: Layout, partition: str) -> GateVerdict:
    """Decide one criterion for ``partition``; any error becomes a failed verdict naming it."""
    recipe = PHASES[phase_number(partition)]
    if name not in {c.name for c in recipe.criteria}:
        return not_applicable(name, partition)
    with lock_scope():  # the inputs the criterion reads stay locked until its verdict is written
        try:
            ctx = StepContext(config, layout, partition)
            verdict = READERS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - a check always yields a verdict
            verdict = GateVerdict(name, False, f"could not be evaluated: {type(exc).__name__}: {exc}", {"error": True})
        record_verdict(layout, partition, verdict)
    return verdict


def record_verdict(layout: Layout, partition: str, verdict: GateVerdict) -> None:
    """Keep the verdict next to the artifacts, with the lineage id of the asset it judged."""
    asset = CRITERIA[verdict.criterion].asset if verdict.criterion in CRITERIA else None
    judged = current_id(layout, asset, partition) if asset is not None else None
    doc = {**asdict(verdict), "figures": jsonable(verdict.figures), "judged_id": judged, "asset": asset}
    path = layout.dir("gates", partition) / f"{verdict.criterion}.json"
    with path_lock(gate_lock_path(path), f"gate verdict {verdict.criterion}", partition, timeout=default_timeout()):
        write_json(path, doc)


def gate_lock_path(verdict_file: Path) -> Path:
    """The lock of one gate verdict file: ``gates/<phase>/.<criterion>.lock``."""
    return verdict_file.parent / f".{verdict_file.stem}.lock"
