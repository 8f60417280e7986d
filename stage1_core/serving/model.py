"""The bundle a service answers with: one verified, id-pinned load, and an atomic switch on reload.

:func:`load_served` is the only way the service loads a bundle, at start and on every reload:
verify (schema, checksums, file set, weights) through :meth:`Stage1Bundle.load`, refuse another
id than the pinned one, load the backbone eagerly (its fingerprint checked) so the first request
is not the one that pays for it. :class:`ModelHolder` keeps the current :class:`ServedModel`; a
reload builds the new one completely while the old one keeps answering, then swaps one reference.
Each batch reads that reference once, so every answer comes from exactly one bundle.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stage1_core.bundle.load import BundleError, Stage1Bundle, eval_transform_from_description
from stage1_core.model.backbone import BackboneError, DINOv3Backbone

__all__ = ["ModelHolder", "ReloadRefused", "ServedModel", "default_device", "load_served"]

logger = logging.getLogger(__name__)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ServedModel:
    """A loaded bundle ready to decide images, with what ``/health`` reports about it."""

    bundle: Stage1Bundle
    bundle_id: str
    directory: Path
    device: str
    backbone_source: str
    loaded_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def phase(self) -> int:
        return int(self.bundle.manifest["phase"])

    @property
    def policy(self) -> str:
        return str(self.bundle.manifest["active_exit_policy"])

    def describe(self) -> dict[str, Any]:
        backbone = self.bundle.manifest["backbone"]
        return {
            "bundle_id": self.bundle_id,
            "bundle": str(self.directory),
            "phase": self.phase,
            "policy": self.policy,
            "policy_file": self.bundle.manifest["policy_file"],
            "device": self.device,
            "backbone": {"model_path": backbone["model_path"], "fingerprint": backbone["fingerprint"],
                         "loaded_from": self.backbone_source},
            "loaded_at": self.loaded_at,
        }


def _attach_backbone(bundle: Stage1Bundle, directory: Path, device: str) -> DINOv3Backbone:
    """Use the backbone at ``directory`` (a submission's ``backbone/``) if it is the recorded one."""
    info = bundle.manifest["backbone"]
    try:
        backbone = DINOv3Backbone.load(directory, device=device)
    except BackboneError as exc:
        raise BundleError([f"--backbone {directory}: {exc}"], bundle.directory) from exc
    found = backbone.fingerprint()
    if found != info["fingerprint"] or backbone.hidden_size != info["hidden_size"]:
        raise BundleError(
            [f"--backbone {directory} has fingerprint {found} (hidden size {backbone.hidden_size}), but the head in "
             f"this bundle was trained on {info['fingerprint']} (hidden size {info['hidden_size']}): pass the backbone "
             f"the bundle was exported with"],
            bundle.directory,
        )
    bundle.predictor.transform = eval_transform_from_description(info["transform"])
    bundle.predictor.backbone = backbone
    return backbone


def load_served(
    directory: str | Path,
    expected_id: str | None = None,
    artifacts_root: str | Path | None = None,
    backbone_dir: str | Path | None = None,
    device: str | None = None,
) -> ServedModel:
    """Verify, pin and load the bundle at ``directory`` with its backbone; raise :class:`BundleError`.

    A bundle whose policy recomputes its thresholds from the batch (SCRC-T) is refused: a service
    decides each image on its own, and a batch of other clients' images must not change an answer.
    """
    root = Path(directory)
    device = device or default_device()
    # One pinned load: the id check and every read happen on the one resolved version it holds.
    bundle = Stage1Bundle.load(root, artifacts_root=artifacts_root, device=device, expected_id=expected_id)
    loaded_id = bundle.bundle_id
    if bundle.transductive:
        raise BundleError(
            ["this bundle's policy is SCRC-T, which recomputes its thresholds from each batch; a prediction service "
             "decides every image on its own, so it cannot serve it (use stage1 predict --transductive on a batch)"],
            root,
        )
    if backbone_dir is not None and not bundle.manifest["backbone"].get("directory"):
        backbone = _attach_backbone(bundle, Path(backbone_dir), device)
    else:
        backbone = bundle.load_backbone()
    return ServedModel(bundle, loaded_id, root, device, str(backbone.source))


class ReloadRefused(RuntimeError):
    """A reload did not happen; the bundle that was serving still serves. ``problems`` says why."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("reload refused, still serving the previous bundle:\n  " + "\n  ".join(problems))


class ModelHolder:
    """The current :class:`ServedModel` and how to replace it (one reload at a time)."""

    def __init__(
        self,
        served: ServedModel,
        expected_id: str | None,
        artifacts_root: str | Path | None = None,
        backbone_dir: str | Path | None = None,
    ) -> None:
        self._current = served
        self.expected_id = expected_id
        self.artifacts_root = artifacts_root
        self.backbone_dir = backbone_dir
        self._reload_lock = threading.Lock()

    @property
    def current(self) -> ServedModel:
        """The bundle serving now (read once per batch)."""
        return self._current

    def reload(self, directory: str | Path | None = None, expected_id: str | None = None) -> ServedModel:
        """Load ``directory`` (default: the one serving) pinned to ``expected_id`` (default: the current pin).

        The new bundle is loaded completely before it replaces the old one; any problem raises
        :class:`ReloadRefused` and leaves the old one serving. On success the pin becomes the new id
        when the service is pinned.
        """
        with self._reload_lock:
            old = self._current
            target = Path(directory) if directory is not None else old.directory
            pin = expected_id if expected_id is not None else self.expected_id
            try:
                new = load_served(target, pin, self.artifacts_root, self.backbone_dir, old.device)
            except (BundleError, OSError, ValueError) as exc:
                problems = exc.problems if isinstance(exc, BundleError) else [f"{type(exc).__name__}: {exc}"]
                raise ReloadRefused(problems) from exc
            self._current = new
            if self.expected_id is not None or expected_id is not None:
                self.expected_id = new.bundle_id
            logger.info("reloaded: bundle %s replaces %s", new.bundle_id, old.bundle_id)
            return new
