"""Bundle step: stage, verify, then publish the deploy bundle with one atomic rename.

Each bundle is staged under ``bundle/<phase>/versions/``, verified (schema, checksums, lineage,
and its predictor reproduces every val_test decision of the evaluation), renamed to
``versions/<bundle id>``, and only then made current by atomically replacing the symbolic link
``bundle/<phase>/bundle``. A reader therefore sees the previous complete bundle or the new one,
never a half-written directory. The bundle id is the sha256 of its ``bundle.json``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from stage1_core.artifacts import fault_point, fsync_dir, load_tensors, read_json
from stage1_core.config import Stage1ProConfig
from stage1_core.phases import phase_number
from stage1_core.policies import policy_class
from stage1_core.steps.backbone import eval_transform, model_features
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.training import runtime_environment
from stage1_core.store import CURRENT_LINK, DECISIONS_FILE, EVALUATION_FILE, METRICS_FILE, bundle_dir, policy_path, read_backbone, read_policy_document, read_training

VERSIONS_DIR = "versions"
BUNDLE_INPUTS = ("evaluation", "exit_policy", "predictions", "checkpoint", "cached_features", "backbone")


def compare_bundle_decisions(
    directory: Path, layout: Layout, partition: str, expected_id: str | None = None
) -> tuple[list[str], int, int]:
    """Verify a bundle and replay val_test through its predictor: (problems, compared, mismatched)."""
    from stage1_core.bundle.load import BundleError, Stage1Bundle, verify_bundle

    problems = verify_bundle(directory, expected_id=expected_id)
    if problems:
        return problems, 0, 0
    try:
        loaded = Stage1Bundle.load(directory, artifacts_root=layout.root)
    except BundleError as exc:
        return [str(exc)], 0, 0
    feats = model_features(layout, partition, "val_test").features
    decisions = loaded.decide_features(feats)
    expected = load_tensors(layout.path("evaluation", partition) / DECISIONS_FILE)
    exit_now = np.asarray(decisions.exit, dtype=bool)
    label_now = np.asarray(decisions.label, dtype=np.int64)
    exit_then = expected["exit"].numpy()
    label_then = expected["label"].numpy()
    mismatched = int(((exit_now != exit_then) | (exit_then & (label_now != label_then))).sum())
    return [], int(len(exit_then)), mismatched


def _headline(policy_name: str, policy_doc: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    return {
        "certified": bool(policy_doc["certified"]),
        **policy_class(policy_name).headline(policy_doc),
        **{k: v for k, v in evaluation.items() if isinstance(v, (int, float, bool, str)) or v is None},
    }


def _model_backbone(layout: Layout, partition: str, backbone_info: dict[str, Any],
                    training: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The backbone the deployed head reads features from, and the files the bundle must carry.

    The source weights (``model_path``) stay outside the bundle, checked by fingerprint. A
    backbone this project made - ExPLoRA-adapted, or fine-tuned with merged adapters - only
    exists in the artifacts, so the bundle carries it (safetensors) under ``backbone/``.
    """
    from stage1_core.bundle.load import BUNDLED_BACKBONE_FILES

    tuned = training.get("finetuned_backbone")
    if tuned:
        directory, fingerprint = layout.path("checkpoint", partition) / tuned["directory"], tuned["fingerprint"]
    elif backbone_info.get("backbone_kind", "source") != "source":
        directory, fingerprint = Path(backbone_info["directory"]), backbone_info["fingerprint"]
    else:
        return {"model_path": backbone_info["model_path"], "fingerprint": backbone_info["fingerprint"]}, {}
    files = {f"{BUNDLED_DIR}/{name}": directory / name for name in BUNDLED_BACKBONE_FILES}
    return {"model_path": backbone_info["model_path"], "fingerprint": fingerprint, "directory": BUNDLED_DIR}, files


BUNDLED_DIR = "backbone"


def publish(staged: Path, parent: Path, bundle_id: str, keep: int = 3) -> Path:
    """Rename the verified ``staged`` directory to ``versions/<id>`` and point ``bundle`` at it atomically.

    Then the versions beyond the ``keep`` newest (the current one always kept) are removed, each
    only when no reader holds it (:func:`stage1_core.locking.version_hold`, taken by
    :meth:`Stage1Bundle.load`); a held one stays until a later publish finds it free.
    """
    from stage1_core.locking import remove_unheld

    versions = parent / VERSIONS_DIR
    final = versions / bundle_id
    fault_point(final, "before-rename")
    if final.exists():
        shutil.rmtree(staged)
    else:
        os.rename(staged, final)
    fsync_dir(versions)
    fault_point(final, "after-rename")
    link = parent / CURRENT_LINK
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link)  # a directory left by an older release
    tmp_link = parent / f".{CURRENT_LINK}.{bundle_id}.link"
    tmp_link.unlink(missing_ok=True)
    os.symlink(Path(VERSIONS_DIR) / bundle_id, tmp_link)
    fault_point(link, "before-rename")
    os.replace(tmp_link, link)
    fsync_dir(parent)
    fault_point(link, "after-rename")
    old = sorted((p for p in versions.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != bundle_id),
                 key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for version in old[max(keep - 1, 0):]:
        remove_unheld(version)
    for lock in versions.glob(".*.lock"):  # locks left by readers of versions already removed
        if not (versions / lock.name[1:-len(".lock")]).exists():
            remove_unheld(versions / lock.name[1:-len(".lock")])
    return link


def export_phase_bundle(config: Stage1ProConfig, layout: Layout, partition: str, run_id: str | None = None) -> StepResult:
    """Write a staged bundle, verify it, and only then publish it under ``bundle/<phase>/bundle``."""
    from stage1_core.bundle.export import export_bundle
    from stage1_core.bundle.load import bundle_id as compute_bundle_id

    ctx = StepContext(config, layout, partition)
    inputs = ctx.require("bundle", [(name, partition) for name in BUNDLE_INPUTS] + [("splits", None), ("dataset_index", None)])
    cfg = ctx.cfg
    backbone_info = read_backbone(layout, partition)
    evaluation = read_json(layout.path("evaluation", partition) / EVALUATION_FILE, schema="evaluation")
    policy_doc = read_policy_document(layout, partition, cfg.exit_policy)
    if str(policy_doc.get("guarantee", "pac")).lower() != "pac":
        raise ValueError(
            f"exit_policy[{partition}] holds its FNR guarantee in {policy_doc['guarantee']}, not with probability "
            f"1 - delta: it cannot be deployed (SCRC-T recomputes its thresholds from each test batch, which a "
            f"one-image predictor never has). Set scrc_variant: I and re-materialise exit_policy; SCRC-T stays "
            f"available as an analysis in the evaluation."
        )
    training = read_training(layout, partition)
    _, transform_desc = eval_transform()
    # Deployment pipeline: the bundle's own preprocessing and served-probability calibrator.
    from stage1_core.steps.deployment import bundle_deployment_parts

    transform_desc, deployment_files = bundle_deployment_parts(cfg, layout, partition, transform_desc)
    headline = _headline(cfg.exit_policy, policy_doc, evaluation)
    chain = {name: record.id for name, record in inputs.items()}
    for record in inputs.values():
        chain.update(record.chain)
    lineage = {
        "chain": dict(sorted(chain.items())),
        "checkpoint_id": training["checkpoint_id"],
        "backbone_fingerprint": backbone_info["fingerprint"],
        "policy_id": inputs[f"exit_policy[{partition}]"].id,
        "evaluation_id": inputs[f"evaluation[{partition}]"].id,
        "environment": runtime_environment(),
    }
    parent = layout.dir("bundle", partition)
    (parent / VERSIONS_DIR).mkdir(exist_ok=True)
    staging = parent / VERSIONS_DIR / f".staging-{run_id or 'local'}"
    if staging.exists():
        shutil.rmtree(staging)
    backbone_ref, backbone_files = _model_backbone(layout, partition, backbone_info, training)
    lineage["backbone_fingerprint"] = backbone_ref["fingerprint"]
    export_bundle(
        staging,
        phase=phase_number(partition),
        head_state_dict_path=layout.path("checkpoint", partition) / training["best_checkpoint"],
        policy_name=cfg.exit_policy,
        policy_file_path=policy_path(layout, partition, cfg.exit_policy),
        config=cfg,
        splits_path=layout.path("splits") / "splits.json",
        metrics_csv_path=layout.path("evaluation", partition) / METRICS_FILE,
        backbone_info={**backbone_ref, "hidden_size": backbone_info["hidden_size"], "transform": transform_desc},
        extra_files={**backbone_files, **deployment_files},
        head_info={"hidden_size": backbone_info["hidden_size"], "dropout": cfg.dropout,
                   "with_gate": training.get("head_kind") == "gated"},
        headline=headline,
        dagster_run_id=run_id,
        lineage=lineage,
    )
    problems, compared, mismatched = compare_bundle_decisions(staging, layout, partition)
    if problems or mismatched or not compared:
        shutil.rmtree(staging, ignore_errors=True)
        detail = "; ".join(problems) if problems else f"{mismatched} of {compared} val_test decisions differ"
        raise ValueError(f"staged bundle failed verification, not published: {detail}")
    the_id = compute_bundle_id(staging)
    final = publish(staging, parent, the_id, keep=cfg.bundle_keep_versions)
    record = ctx.finish("bundle", [final / "bundle.json"], inputs, id_parts={"bundle_id": the_id},
                        extra={"bundle_id": the_id})
    metadata = {"path": final, "bundle_id": the_id, "lineage_id": record.id, "n_compared": compared,
                "n_mismatched": mismatched, **{k: v for k, v in headline.items() if v is not None}}
    return StepResult(final, metadata, record=record)


def current_bundle_problems(config: Stage1ProConfig, layout: Layout, partition: str) -> list[str]:
    """Why the published bundle of ``partition`` is not current (empty: it is current)."""
    from stage1_core.lineage import StaleInputError

    ctx = StepContext(config, layout, partition, writes=False)
    record = ctx.current(f"bundle[{partition}]")
    directory = bundle_dir(layout, partition)
    if record is None or not (directory / "bundle.json").is_file():
        return [f"{partition} has no published bundle"]
    from stage1_core.bundle.load import bundle_id

    problems = []
    if bundle_id(directory) != record.extra.get("bundle_id"):
        problems.append(f"{directory}/bundle.json is not the bundle the last export published")
    try:
        with ctx:
            ctx.require("bundle", [(name, partition) for name in BUNDLE_INPUTS])
    except (StaleInputError, FileNotFoundError) as exc:
        problems.append(str(exc))
    recorded = {name: rid for name, rid in record.chain.items()}
    for name, rid in recorded.items():
        now = ctx.current(name)
        if now is None or now.id != rid:
            problems.append(f"the bundle was made from {name} {rid}, which is now {now.id if now else 'gone'}")
    return problems
