"""Where each asset's files live under an artifacts root (``<root>/<asset>[/<partition>]``).

A leaf module: the steps, the stores and the phase state all address files through it.
"""

from __future__ import annotations

from pathlib import Path


class Layout:
    """Where each asset's files live: ``<root>/<asset>[/<partition>]``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, asset: str, partition: str | None = None) -> Path:
        """The asset's directory (not created)."""
        return self.root / asset / partition if partition else self.root / asset

    def dir(self, asset: str, partition: str | None = None) -> Path:
        """The asset's directory, created when missing."""
        path = self.path(asset, partition)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def feature_store(self) -> Path:
        return self.root / "feature_store"

    @property
    def synthetic_dir(self) -> Path:
        return self.root / "data" / "synthetic"
