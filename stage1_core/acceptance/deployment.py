"""The published bundle verifies and reproduces the evaluation's decisions.

Each criterion sits here whole: its declaration (name, judged asset, text), its reader (which
artifacts it reads, through :mod:`stage1_core.acceptance.readers`) and its pure rule
(``check_*``: figures in, :class:`~stage1_core.gates.GateVerdict` out, unit-tested alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from stage1_core.gates import GateVerdict
from stage1_core.store import bundle_dir

from .registry import declare, reader

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


# ----- declarations ------------------------------------------------------------------------

declare("bundle_verified", "bundle",
        "the published bundle verifies (schema, checksums, file set, load) and its predictor reproduces "
        "the evaluation's val_test decisions exactly")


# ----- rules (pure) ---------------------------------------------------------------------


def check_bundle_verified(problems: Sequence[str], n_compared: int, n_mismatched: int) -> GateVerdict:
    """The staged bundle verified (checksums, schema, load) and reproduced every decision."""
    passed = not problems and n_compared > 0 and n_mismatched == 0
    if passed:
        message = f"bundle verified; its predictor reproduced all {n_compared} val_test decisions"
    elif problems:
        message = "bundle verification failed: " + "; ".join(problems)
    else:
        message = f"{n_mismatched} of {n_compared} val_test decisions differ from the evaluation"
    return GateVerdict(
        "bundle_verified", passed, message,
        {"problems": len(problems), "n_compared": n_compared, "n_mismatched": n_mismatched},
    )


# ----- readers ---------------------------------------------------------------------------


@reader("bundle_verified")
def _bundle_verified(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.bundle import compare_bundle_decisions

    record = ctx.current(f"bundle[{ctx.partition}]")
    expected = record.extra.get("bundle_id") if record else None
    problems, compared, mismatched = compare_bundle_decisions(
        bundle_dir(ctx.layout, ctx.partition), ctx.layout, ctx.partition, expected_id=expected
    )
    return check_bundle_verified(problems, compared, mismatched)
