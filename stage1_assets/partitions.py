"""Phase partitions: one partition per risk-ordered phase of ``stage1_core.phases``."""

import dagster as dg

from stage1_core.phases import PHASE_KEYS, PHASES, phase_job_name

phases = dg.StaticPartitionsDefinition(PHASE_KEYS)

#: Asset groups, named and numbered for the flow (the UI lists groups alphabetically):
#: data -> features -> training -> certify (exit policy on val_calib, evaluation on val_test) -> deploy.
GROUPS = {"data": "1_data", "features": "2_features", "training": "3_training", "certify": "4_certify",
          "deploy": "5_deploy"}


def phase_line(number: int) -> str:
    """One plain-text line naming a phase, what it trains and what it waits for."""
    recipe = PHASES[number]
    needed = [PHASES[n].key + (" if it ran" if PHASES[n].optional else "") for n in recipe.requires]
    waits = "starts first" if not needed else "waits for the gate of " + " and ".join(needed)
    extra = "; not part of this release" if not recipe.available else ""
    return f"{recipe.key}: {recipe.title} ({waits}{extra})."


#: Every phase in one paragraph, for asset and job descriptions.
PHASES_TEXT = "Partitions are the phases, run in order:\n" + "\n".join(
    "- " + phase_line(number) for number in PHASES
)
