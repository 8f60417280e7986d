"""One blocking, phase-partitioned asset check per gate criterion (``stage1_core.phases.CRITERIA``).

Each check only calls :func:`stage1_core.pipeline.evaluate_criterion` (a pure library function)
and turns its verdict into an ``AssetCheckResult``; a failed ERROR-severity result stops every
downstream asset of the run and shows red on the dashboard for that phase.
"""

import dagster as dg

from stage1_assets.assets._common import to_metadata
from stage1_assets.partitions import phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline
from stage1_core.phases import CRITERIA, PHASES, Criterion


def criterion_phases(name: str) -> list[str]:
    """The phases whose gate includes criterion ``name``."""
    return [recipe.key for recipe in PHASES.values() if name in {c.name for c in recipe.criteria}]


def check_description(criterion: Criterion) -> str:
    """Plain-text description of a gate check: what it demands and in which phases it applies."""
    where = criterion_phases(criterion.name)
    scope = f"Part of the gate of {', '.join(where)}." if where else "Not part of any phase gate yet."
    return (
        f"{criterion.description[0].upper()}{criterion.description[1:]}. {scope} In other phases it reports "
        "NOT APPLICABLE and does not block. A failure stops the run: later assets of the phase, its bundle "
        "and the next phase wait until it passes."
    )


def not_applicable_result(criterion: Criterion, partition: str) -> dg.AssetCheckResult:
    """The result of a criterion that is not part of ``partition``'s gate: says so, blocks nothing."""
    where = criterion_phases(criterion.name)
    return dg.AssetCheckResult(
        passed=True,
        description=f"NOT APPLICABLE to {partition}: not part of its gate (applies to {', '.join(where) or 'no phase'}); "
                    "not evaluated.",
        metadata={"applicable": False, "verdict": "not applicable"},
        severity=dg.AssetCheckSeverity.ERROR,
    )


def _make_check(criterion: Criterion) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=criterion.asset,
        name=criterion.name,
        description=check_description(criterion),
        blocking=True,
        partitions_def=phases,
    )
    def _check(context: dg.AssetCheckExecutionContext, stage1: Stage1Resource) -> dg.AssetCheckResult:
        # A check always yields a verdict: any exception is a failed ERROR-severity evaluation.
        try:
            verdict = pipeline.evaluate_criterion(
                criterion.name, stage1.load_config(), stage1.layout(), context.partition_key
            )
        except Exception as exc:  # noqa: BLE001
            return dg.AssetCheckResult(
                passed=False,
                description=f"{criterion.name} could not be evaluated: {type(exc).__name__}: {exc}",
                severity=dg.AssetCheckSeverity.ERROR,
            )
        if verdict.figures.get("applicable") is False:
            return not_applicable_result(criterion, context.partition_key)
        return dg.AssetCheckResult(
            passed=bool(verdict.passed),
            description=verdict.message,
            metadata={"verdict": "passed" if verdict.passed else "failed", **to_metadata(verdict.figures)},
            severity=dg.AssetCheckSeverity.ERROR,
        )

    return _check


phase_gate_checks = [_make_check(criterion) for criterion in CRITERIA.values()]

#: Check keys per phase: the per-phase jobs run only the criteria of that phase's gate.
CHECKS_BY_PHASE: dict[str, list[dg.AssetCheckKey]] = {
    recipe.key: [dg.AssetCheckKey(dg.AssetKey(c.asset), c.name) for c in recipe.criteria]
    for recipe in PHASES.values()
}
