"""The phase table: what each of the six risk-ordered phases trains and what its gate demands.

One place to read them. The Dagster layer builds its partitions, training recipes and blocking
asset checks from this table; a row names its parts by key: exit policies registered in
:mod:`stage1_core.policies`, criteria declared in :mod:`stage1_core.acceptance` (with their
readers and pure rules).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, Self, TypeVar

from stage1_core import acceptance
from stage1_core.acceptance import Criterion


class _PhaseConfigurable(Protocol):
    """What :func:`config_for_phase` needs of a run config (``config.Stage1ProConfig``), named here
    so that this table does not import the config module, which reads it."""

    optimizer: str

    def with_updates(self, **changes: object) -> Self: ...


ConfigT = TypeVar("ConfigT", bound=_PhaseConfigurable)


class PhaseUnavailableError(RuntimeError):
    """A phase whose training recipe is not part of this release was requested."""


@dataclass(frozen=True)
class PhaseRecipe:
    """How a phase trains, selects, calibrates and what its gate checks."""

    phase: int
    title: str
    head: str
    loss: str
    optimizer: str
    backbone: str
    exit_policies: tuple[str, ...]
    selection_metric: str
    criteria: tuple[Criterion, ...]
    requires: tuple[int, ...]
    head_kind: str = "mlp"
    loss_kind: str = "ce"
    #: Where the phase's backbone weights come from: ``source`` (``model_path``), ``explora``
    #: (ExPLoRA continued pre-training of the source) or ``previous`` (the fine-tuned, merged
    #: backbone of the phase it builds on: phase 5 when attempted and passed, else phase 4).
    backbone_kind: str = "source"
    #: ``cached``: the head trains on cached CLS features; ``finetune``: PEFT adapters on the
    #: backbone and the heads train together on images.
    train_mode: str = "cached"
    #: Start the heads from the best head of the phase whose backbone this one builds on
    #: (``backbone_kind == "previous"``): same features, so the head is a valid starting point.
    warm_start: bool = False
    #: Optimisers the row allows; the first is its own. A run config's ``optimizer`` is used only
    #: when the row allows it (phase 5: ``sam`` instead of ``fsam``); every other phase trains with
    #: the row's own, and a config whose ``phase`` row does not allow its ``optimizer`` is refused
    #: (``config.OPTIMIZERS_BY_PHASE``, kept equal to these rows by a test).
    optimizers: tuple[str, ...] = ("adamw",)
    optional: bool = False
    available: bool = True
    missing: str = ""
    overrides: dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"phase{self.phase}"


#: Every gate criterion, declared beside its reader and rule in :mod:`stage1_core.acceptance`;
#: a phase row names the ones its gate holds.
CRITERIA = acceptance.CRITERIA

#: Criteria of every phase gate, then each family's (the module of ``acceptance`` that declares them).
STANDING_CRITERIA = (
    "training_completed", "val_accuracy_vs_baseline", "selected_checkpoint_is_best", "thresholds_certified",
    "val_test_fnr_bound", "selective_metrics_recomputed", "metrics_in_range", "no_regression_vs_previous_phase",
    "bundle_verified",
)
GATED_HEAD_CRITERIA = ("gate_trains", "gate_beats_softmax", "no_classification_regression", "gate_calibration_works")
ADAPTATION_CRITERIA = ("explora_pretraining_completed", "peft_applied_correctly", "performance_maintained",
                       "no_memory_issues")
SHARPNESS_CRITERIA = ("training_stable", "improves_over_adamw", "no_memory_issues")
CONFORMAL_CRITERIA = ("risk_training_works", "coverage_maximised", "prediction_sets_valid")


def _criteria(*names: str) -> tuple[Criterion, ...]:
    """The named criteria, in declaration order."""
    unknown = set(names) - set(CRITERIA)
    if unknown:
        raise ValueError(f"phase table names undeclared criteria {sorted(unknown)}; declared: {list(CRITERIA)}")
    return tuple(CRITERIA[name] for name in CRITERIA if name in names)


PHASE1_CRITERIA = _criteria(*(n for n in STANDING_CRITERIA if n != "no_regression_vs_previous_phase"))
PHASE2_CRITERIA = _criteria(*STANDING_CRITERIA)
PHASE3_CRITERIA = _criteria(*STANDING_CRITERIA, *GATED_HEAD_CRITERIA)
PHASE4_CRITERIA = _criteria(*STANDING_CRITERIA, *ADAPTATION_CRITERIA)
PHASE5_CRITERIA = _criteria(*STANDING_CRITERIA, *SHARPNESS_CRITERIA)
PHASE6_CRITERIA = _criteria(*STANDING_CRITERIA, *CONFORMAL_CRITERIA)

PHASES: dict[int, PhaseRecipe] = {
    1: PhaseRecipe(
        phase=1,
        title="Baseline head with a certified softmax exit policy",
        head="Linear(h,768)-ReLU-Dropout-Linear(768,2)",
        loss="class-weighted cross-entropy with label smoothing",
        optimizer="adamw",
        backbone="frozen pretrained",
        exit_policies=("softmax",),
        selection_metric="accuracy",
        criteria=PHASE1_CRITERIA,
        requires=(),
        overrides={"selection_metric": "accuracy", "exit_policy": "softmax"},
    ),
    2: PhaseRecipe(
        phase=2,
        title="Selective metrics every epoch; checkpoint chosen by AUGRC on val_select",
        head="Linear(h,768)-ReLU-Dropout-Linear(768,2)",
        loss="class-weighted cross-entropy with label smoothing",
        optimizer="adamw",
        backbone="frozen pretrained (features shared with phase 1)",
        exit_policies=("softmax",),
        selection_metric="augrc",
        criteria=PHASE2_CRITERIA,
        requires=(1,),
        overrides={"selection_metric": "augrc", "exit_policy": "softmax"},
    ),
    3: PhaseRecipe(
        phase=3,
        title="Learned gate head (selective loss + aux head), gate calibrated and certified on val_calib",
        head="shared trunk + cls / gate / aux heads",
        loss="CE + soft-acceptance selective loss (coverage reward, soft-FNR penalty) + aux CE",
        optimizer="adamw",
        backbone="frozen pretrained (features shared with phases 1-2)",
        exit_policies=("softmax", "gate"),
        selection_metric="augrc",
        criteria=PHASE3_CRITERIA,
        requires=(2,),
        head_kind="gated",
        loss_kind="selective",
        overrides={"selection_metric": "augrc", "exit_policy": "gate"},
    ),
    4: PhaseRecipe(
        phase=4,
        title="ExPLoRA domain pre-training of the backbone, then PEFT (DoRA) fine-tuning with the gated heads",
        head="shared trunk + cls / gate / aux heads",
        loss="as phase 3 (CE + selective + aux), adapters and heads trained together on images",
        optimizer="adamw",
        backbone="ExPLoRA-adapted (LoRA on q/v + last block unfrozen, masked-image pre-training, merged)",
        exit_policies=("softmax", "gate"),
        selection_metric="augrc",
        criteria=PHASE4_CRITERIA,
        requires=(3,),
        head_kind="gated",
        loss_kind="selective",
        backbone_kind="explora",
        train_mode="finetune",
        overrides={"selection_metric": "augrc", "exit_policy": "gate"},
    ),
    5: PhaseRecipe(
        phase=5,
        title="Phase 4's recipe trained with Friendly-SAM instead of AdamW (optional)",
        head="shared trunk + cls / gate / aux heads",
        loss="as phase 4",
        optimizer="fsam",
        backbone="as phase 4 (the same ExPLoRA-adapted backbone)",
        exit_policies=("softmax", "gate"),
        selection_metric="augrc",
        criteria=PHASE5_CRITERIA,
        requires=(4,),
        head_kind="gated",
        loss_kind="selective",
        backbone_kind="explora",
        train_mode="finetune",
        optimizers=("fsam", "sam"),
        optional=True,
        overrides={"selection_metric": "augrc", "exit_policy": "gate"},
    ),
    6: PhaseRecipe(
        phase=6,
        title="Conformal risk training, Dirichlet calibration and the SCRC exit policy with prediction sets",
        head="shared trunk + cls / gate / aux heads",
        loss="CE + aux + conformal risk training (smoothed in-batch FNR calibration)",
        optimizer="adamw",
        backbone="the fine-tuned backbone of phase 5 when it passed, else phase 4's (merged adapters)",
        exit_policies=("softmax", "gate", "scrc"),
        selection_metric="augrc",
        criteria=PHASE6_CRITERIA,
        requires=(4, 5),
        head_kind="gated",
        loss_kind="crt",
        backbone_kind="previous",
        warm_start=True,
        overrides={"selection_metric": "augrc", "exit_policy": "scrc", "use_dirichlet": True},
    ),
}

PHASE_KEYS = [recipe.key for recipe in PHASES.values()]


class _PoliciesByPhase(Mapping):
    """Phase number -> the exit policies it may deploy, read live from :data:`PHASES`."""

    def __getitem__(self, phase: int) -> tuple[str, ...]:
        return PHASES[phase].exit_policies

    def __iter__(self) -> Iterator[int]:
        return iter(PHASES)

    def __len__(self) -> int:
        return len(PHASES)


#: Exit policies each phase may deploy (a view of the table's ``exit_policies``).
POLICIES_BY_PHASE: Mapping[int, tuple[str, ...]] = _PoliciesByPhase()


def exit_policy_names() -> tuple[str, ...]:
    """Every exit policy some phase may deploy, in table order (the config's choices)."""
    return tuple(dict.fromkeys(name for recipe in PHASES.values() for name in recipe.exit_policies))


def phase_number(key: str | int) -> int:
    """``"phase2"`` or ``2`` -> 2, with a clear error for anything else."""
    if isinstance(key, int):
        number = key
    else:
        text = str(key)
        if not text.startswith("phase") or not text[5:].isdigit():
            raise ValueError(f"unknown phase {key!r}: expected one of {PHASE_KEYS}")
        number = int(text[5:])
    if number not in PHASES:
        raise ValueError(f"unknown phase {key!r}: expected one of {PHASE_KEYS}")
    return number


def phase_job_name(key: str) -> str:
    """``phase1`` -> ``phase1_train_gate_bundle``: the Dagster job that runs that phase, and the run name the UI shows."""
    return f"{key}_train_gate_bundle"


def get_recipe(key: str | int) -> PhaseRecipe:
    """The recipe of a phase; raises PhaseUnavailableError for phases not built yet."""
    recipe = PHASES[phase_number(key)]
    if not recipe.available:
        raise PhaseUnavailableError(
            f"{recipe.key} ({recipe.title}) cannot run: {recipe.missing} is not part of this release. "
            f"Available phases: {[r.key for r in PHASES.values() if r.available]}."
        )
    return recipe


def config_for_phase(config: ConfigT, key: str | int) -> ConfigT:
    """The run config with the phase's recipe applied (phase number, selection metric, exit policy,
    optimizer).

    The recipe decides what a phase deploys (phase 3 the gate policy, ...), so the gate criteria
    always judge the policy they were written for, and how it trains: the config's ``optimizer``
    only where the row allows it (``optimizer: fsam`` never reaches phases 1-4 and 6).
    """
    recipe = get_recipe(key)
    optimizer = config.optimizer if config.optimizer in recipe.optimizers else recipe.optimizers[0]
    changes: dict[str, object] = {"phase": recipe.phase, "optimizer": optimizer, **recipe.overrides}
    return config.with_updates(**changes)


def previous_phases(key: str | int, attempted: set[int] | None = None) -> list[int]:
    """Phases whose gates must have passed before ``key`` may train.

    Phase 5 is optional: phase 6 needs phase 4, and phase 5 too only if it was attempted.
    """
    recipe = PHASES[phase_number(key)]
    attempted = attempted or set()
    needed = []
    for number in recipe.requires:
        if PHASES[number].optional and number not in attempted:
            continue
        needed.append(number)
    return needed
