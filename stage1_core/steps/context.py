"""What every step shares: where artifacts live, what a step returns, and lineage bookkeeping.

A step is a plain function ``step(config, layout, partition) -> StepResult``. It opens a
:class:`StepContext`, asks it for its inputs (``ctx.require``: refuses stale ones, see
:mod:`stage1_core.lineage`), writes its files atomically and ends with ``ctx.finish``, which
writes the lineage record last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stage1_core.config import Stage1ProConfig
from stage1_core.lineage import Record, asset_name, check_inputs, make_record, parse_name, read_record, record_path
from stage1_core.phase_state import reference_phase
from stage1_core.phases import config_for_phase, phase_number
from stage1_core.steps.params import expected_params, params_for


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


@dataclass
class StepResult:
    """What a step produced: its main path, headline figures, tables and figures for the UI."""

    path: Path
    metadata: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    record: Record | None = None

    @property
    def data_version(self) -> str | None:
        """The lineage id, used as the asset's Dagster data version."""
        return self.record.id if self.record is not None else None



class StepContext:
    """One step's view of the artifacts: the phase config, its inputs' records, its own record."""

    def __init__(self, config: Stage1ProConfig, layout: Layout, partition: str | None = None):
        self.config = config
        self.layout = layout
        self.partition = partition
        self.cfg = config_for_phase(config, partition) if partition else config

    def reference_phase(self, asset: str = "evaluation") -> str | None:
        """The earlier phase this one is compared with: the latest one with ``asset`` that was not skipped."""
        return reference_phase(self.layout, phase_number(self.partition), asset)

    def current(self, name: str) -> Record | None:
        """The current lineage record of an asset by name, None when it has none."""
        asset, partition = parse_name(name)
        directory = self.layout.path(asset, partition)
        if not record_path(directory).is_file():
            return None
        return read_record(directory, asset, partition)

    def record(self, asset: str, partition: str | None = None) -> Record:
        """The current record of an input; FileNotFoundError naming what to materialise."""
        return read_record(self.layout.path(asset, partition), asset, partition)

    def require(self, consumer: str, inputs: Iterable[tuple[str, str | None]]) -> dict[str, Record]:
        """Read and check the inputs of ``consumer``; raise StaleInputError on any stale link."""
        records = [self.record(asset, partition) for asset, partition in inputs]
        name = asset_name(consumer, self.partition if consumer not in UNPARTITIONED else None)
        check_inputs(name, records, self.current, lambda n: expected_params(n, self.config))
        return {r.name: r for r in records}

    def finish(
        self,
        asset: str,
        files: Iterable[str | Path],
        inputs: Mapping[str, Record] | Iterable[Record],
        id_parts: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Record:
        """Write the step's lineage record (its last write) and return it."""
        partition = None if asset in UNPARTITIONED else self.partition
        records = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
        from stage1_core.distributed.env import environment

        # How it ran (ranks, threads) is recorded beside the id, never in it.
        return make_record(
            self.layout.dir(asset, partition), asset, partition, records,
            params_for(asset, self.cfg), files, id_parts=id_parts, extra={"environment": environment(), **(extra or {})},
        )


#: Assets shared by every phase (no partition).
UNPARTITIONED = ("dataset_index", "splits")
