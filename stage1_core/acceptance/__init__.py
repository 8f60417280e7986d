"""Acceptance criteria of the phase gates, one module per family.

Each family module holds its criteria whole: the declaration (name, judged asset, text), the
reader (which artifacts it reads) and the pure rule (``check_*``, figures in, verdict out).
:mod:`~stage1_core.acceptance.compare` is the one comparison helper the rules share (difference,
margin, direction). Deciding and recording verdicts for a phase is
:mod:`stage1_core.acceptance.verdicts`, which this package does not import (it needs the steps),
so the phase table can read the declarations cheaply.

A new criterion: ``declare(...)`` it, write its rule and decorate its reader with
``@reader(name)`` in a family module (or a module of its own that is imported), then name it in
a phase row.
"""

from __future__ import annotations

# Import order is declaration order, the order in which checks and summaries list the criteria:
# the standing ones, then phase 3's, 4's, 5's, 6's, and bundle_verified (the last asset) last.
from . import standing  # noqa: I001
from . import gated_head, adaptation, sharpness, conformal, deployment  # noqa: I001
from .adaptation import (
    check_explora_pretraining,
    check_no_memory_issues,
    check_peft_applied,
    check_performance_maintained,
)
from .compare import Comparison, compare
from .conformal import (
    check_coverage_maximised,
    check_prediction_sets_valid,
    check_risk_training_works,
    lambda2_grid,
    recompute_scrc_inductive,
    recompute_scrc_transductive,
    scrc_exits_plain,
)
from .deployment import check_bundle_verified
from .gated_head import (
    check_gate_beats_softmax,
    check_gate_calibration_works,
    check_gate_trains,
    check_no_classification_regression,
)
from .registry import CRITERIA, READERS, Criterion, declare, reader
from .sharpness import check_improves_over_adamw, check_training_stable, loss_spikes
from .standing import (
    augrc_closed_form,
    accuracy_baseline,
    check_metrics_in_range,
    check_no_regression,
    check_selected_checkpoint_is_best,
    check_selective_metrics_recomputed,
    check_test_fnr,
    check_thresholds_certified,
    check_training_completed,
    check_val_accuracy_vs_baseline,
    risk_at_coverage_naive,
    val_test_fnr_figures,
)

__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations",)]
