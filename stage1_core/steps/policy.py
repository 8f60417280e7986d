"""Exit-policy step: fit the recipe's policy on its splits, and build the deployable predictor.

The step is phase- and policy-agnostic: it loads the selected checkpoint's outputs on the splits
the policy class names (:meth:`~stage1_core.policies.ExitPolicy.fit_splits`; only val_select and
val_calib are allowed, val_test never), calls the class's ``fit`` and writes exactly one policy
file (the policy's ``policy_file``), removing any other policy file left in the directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stage1_core.artifacts import write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.policies import POLICIES, FitInputs, load_policy, policy_class
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.training import load_head, load_split_outputs
from stage1_core.store import SERVED_FILE, policy_path, read_training


#: The exit_policy step's own log: what calibration and certification reported (stage1_core.logfile).
POLICY_LOG_FILE = "exit_policy.log"


def fit_inputs(ctx: StepContext, splits: tuple[str, ...], out_dir: Path) -> FitInputs:
    """The checkpoint's outputs on ``splits``, each tagged with its split from its sample ids.

    :class:`FitInputs` refuses outputs whose tag is not val_select or val_calib, and the fit reads
    them by role (``inputs.take("calibrate")``), so the role check is on the rows' content.
    """
    if "val_calib" not in splits:
        raise ValueError(f"an exit policy is certified on val_calib; fit_splits named {list(splits)}")
    outputs = {split: load_split_outputs(ctx.layout, ctx.partition, split) for split in splits}
    return FitInputs(outputs, ctx.cfg, out_dir, read_training(ctx.layout, ctx.partition)["checkpoint_id"])


def fit_exit_policy(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Fit the recipe's exit policy on its splits and write its one policy file."""
    ctx = StepContext(config, layout, partition)
    inputs = ctx.require("exit_policy", [("predictions", partition), ("checkpoint", partition)])
    cls = policy_class(ctx.cfg.exit_policy)
    out_dir = layout.dir("exit_policy", partition)
    from stage1_core.logfile import artifact_log, log_figures

    with artifact_log(out_dir / POLICY_LOG_FILE) as log:  # calibration and certification, beside the policy
        log.info("fitting the %s exit policy of %s on val_calib (target FNR on exits %s, confidence %s)",
                 cls.name, partition, ctx.cfg.target_fnr_exit, ctx.cfg.fnr_confidence)
        fitted = cls.fit(fit_inputs(ctx, cls.fit_splits(ctx.cfg), out_dir))
        log_figures(log, f"{cls.name} policy", fitted.metadata)
    # Deployment pipeline: the probability served at the deployment prior (never fit on val_calib).
    from stage1_core.steps.deployment import deployment_enabled

    if deployment_enabled(ctx.cfg):
        fitted.files.append(SERVED_FILE)
        fitted.metadata.update(_fit_served(ctx, out_dir / SERVED_FILE))
    else:
        (out_dir / SERVED_FILE).unlink(missing_ok=True)
    for other in POLICIES.values():
        if other.policy_file != cls.policy_file:
            (out_dir / other.policy_file).unlink(missing_ok=True)
    companions = {name for other in POLICIES.values() for name in other.companion_file_names}
    for stale in companions - set(fitted.files):
        (out_dir / stale).unlink(missing_ok=True)
    path = write_json(out_dir / cls.policy_file, fitted.document, schema=cls.schema)
    record = ctx.finish("exit_policy", [cls.policy_file, *fitted.files], inputs,
                        extra={"policy": cls.name, "target_fnr": fitted.document["target_fnr"],
                               "delta": fitted.document["delta"]})
    metadata = {"path": path, "policy": cls.name, "lineage_id": record.id, **fitted.metadata}
    return StepResult(path, metadata, tables=fitted.tables, figures=fitted.figures, record=record)


def _fit_served(ctx: StepContext, path: Path) -> dict[str, Any]:
    """Fit the served-probability calibrator on val_select's (deployment-view) outputs and write it."""
    from stage1_core.calibration.served import fit_served_calibrator
    from stage1_core.data.splits import require_split

    outputs = load_split_outputs(ctx.layout, ctx.partition, "val_select")
    require_split(outputs.split, "select")  # the tag read from the rows' sample ids
    spec = fit_served_calibrator(outputs.probs, outputs.labels, prior=ctx.cfg.deploy_prior, fit_split=outputs.split)
    write_json(path, spec)
    return {"served_calibrator_slope": spec["a"], "served_calibrator_intercept": spec["b"]}


def read_served(layout: Layout, partition: str) -> dict[str, Any] | None:
    """The phase's served-probability calibrator, or None (clean path: the policy's p is served)."""
    from stage1_core.artifacts import read_json

    path = layout.path("exit_policy", partition) / SERVED_FILE
    return read_json(path) if path.is_file() else None


def build_predictor(config: Stage1ProConfig, layout: Layout, partition: str):
    """The same predictor object the bundle uses: head + policy file (+ backbone lazily)."""
    from stage1_core.bundle.predictor import Stage1Predictor

    ctx = StepContext(config, layout, partition)
    name = ctx.cfg.exit_policy
    return Stage1Predictor(load_head(layout, partition), load_policy(name, policy_path(layout, partition, name)),
                           served=read_served(layout, partition))
