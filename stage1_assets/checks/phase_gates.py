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
from stage1_core.phases import CRITERIA, Criterion

def _make_check(criterion: Criterion) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=criterion.asset,
        name=criterion.name,
        description=criterion.description,
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
        return dg.AssetCheckResult(
            passed=bool(verdict.passed),
            description=verdict.message,
            metadata=to_metadata(verdict.figures),
            severity=dg.AssetCheckSeverity.ERROR,
        )

    return _check

phase_gate_checks = [_make_check(criterion) for criterion in CRITERIA.values()]
