"""The one resource every asset uses: where the run config lives and where artifacts go."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from stage1_core.config import ConfigError, Stage1ProConfig
from stage1_core.pipeline import Layout

DEFAULT_CONFIG = "configs/default.yaml"
DEFAULT_ARTIFACTS = "artifacts"


class Stage1Resource(dg.ConfigurableResource):
    """Config source (a YAML/JSON file under ``configs/``) and the artifacts root.

    Defaults come from ``STAGE1_CONFIG`` / ``STAGE1_ARTIFACTS`` so the CLI, the UI and tests can
    point one code location at another config without editing code.
    """

    config_path: str = DEFAULT_CONFIG
    artifacts_root: str = DEFAULT_ARTIFACTS

    def load_config(self) -> Stage1ProConfig:
        try:
            return Stage1ProConfig.from_file(self.config_path)
        except ConfigError as exc:
            raise dg.Failure(description=str(exc)) from exc

    @property
    def root(self) -> Path:
        return Path(self.artifacts_root).resolve()

    def layout(self) -> Layout:
        """Where each asset's files live under the artifacts root."""
        return Layout(self.root)


def default_resource() -> Stage1Resource:
    return Stage1Resource(
        config_path=os.environ.get("STAGE1_CONFIG", DEFAULT_CONFIG),
        artifacts_root=os.environ.get("STAGE1_ARTIFACTS", DEFAULT_ARTIFACTS),
    )
