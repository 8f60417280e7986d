"""Skipping an optional phase from Dagster: the same record ``stage1 phase skip`` writes, shown in the UI.

The job ``skip_phase5`` takes ``reason`` as run config, writes the skip record and logs an
observation on ``bundle[phase5]`` whose metadata says "skipped: <reason>", so the phase's
asset page shows why it has no bundle and phase 6 no longer waits for its gate.
"""

import dagster as dg

from stage1_assets.resources import Stage1Resource
from stage1_core.phase_state import skip_phase
from stage1_core.phases import PHASES


def skip_job(key: str) -> dg.JobDefinition:
    """An op job that records ``key`` as skipped (run config: ``ops.record_skip_<key>.config.reason``).

    The op is not named like the job: Dagster refuses an op and a job (graph) of the same name.
    """

    @dg.op(name=f"record_skip_{key}", config_schema={"reason": dg.Field(str, description=f"why {key} is skipped")})
    def record_skip(context: dg.OpExecutionContext, stage1: Stage1Resource) -> None:
        record = skip_phase(stage1.layout(), key, context.op_config["reason"], by=f"dagster run {context.run_id}")
        context.log_event(dg.AssetObservation(
            asset_key="bundle", partition=key,
            description=f"{key} skipped: {record['reason']}",
            metadata={"state": "skipped", "reason": record["reason"], "by": record["by"], "at": record["at"]},
        ))

    @dg.job(name=f"skip_{key}", description=f"Skip the optional {key}: later phases build on the phase before it "
                                             f"and stop waiting for its gate. Undo with `stage1 phase unskip {key}`.")
    def the_job() -> None:
        record_skip()

    return the_job


skip_jobs = [skip_job(recipe.key) for recipe in PHASES.values() if recipe.optional]
