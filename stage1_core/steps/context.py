"""What every step shares: where artifacts live, what a step returns, and lineage bookkeeping.

A step is a plain function ``step(config, layout, partition) -> StepResult``. It opens a
:class:`StepContext`, asks it for its inputs (``ctx.require``: refuses stale ones, see
:mod:`stage1_core.lineage`), writes its files atomically and ends with ``ctx.finish``, which
writes the lineage record last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stage1_core.config import Stage1ProConfig
from stage1_core.layout import Layout
from stage1_core.lineage import Record, asset_name, check_inputs, make_record, parse_name, read_record, record_path
from stage1_core.phase_state import reference_phase
from stage1_core.phases import config_for_phase, phase_number
from stage1_core.steps.params import PARAMS, expected_params, params_for


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
    """One step's view of the artifacts: the phase config, its inputs' records, its own record.

    :meth:`require` also takes the step's locks, all at once in one global order: shared locks
    on exactly the inputs it names and the exclusive lock of the asset partition the step writes
    (a consumer that is not an asset - a gate check, an audit - or a context made with
    ``writes=False`` writes none). They are released by :meth:`finish`, by :meth:`close` (``with StepContext(...)``)
    or, when the step raises, by the enclosing :func:`stage1_core.locking.lock_scope`.
    """

    def __init__(self, config: Stage1ProConfig, layout: Layout, partition: str | None = None, writes: bool = True):
        self.config = config
        self.layout = layout
        self.partition = partition
        self.cfg = config_for_phase(config, partition) if partition else config
        self.writes = writes
        self._locks: contextlib.ExitStack | None = None

    def close(self) -> None:
        """Release the step's locks (idempotent)."""
        if self._locks is not None:
            self._locks.close()
            self._locks = None

    def __enter__(self) -> "StepContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        from stage1_core.dirswap import clean_leftovers
        from stage1_core.locking import hold_locks, in_scope, lock_plan

        from stage1_core.distributed import env

        inputs = list(inputs)
        # The one place a step's locks are taken: what it reads, what it writes. Under torchrun rank 0
        # holds them for the whole job (every rank runs the step; a second holder would wait forever).
        if self._locks is None and env.is_main():
            writes = [(consumer, None if consumer in UNPARTITIONED else self.partition)] if (
                self.writes and consumer in PARAMS) else []  # a gate check or an audit writes no asset
            self._locks = in_scope(hold_locks(lock_plan(self.layout.root, writes, inputs)))
            for asset, partition in writes:  # ours alone now: remove what a killed writer left in it
                clean_leftovers(self.layout.path(asset, partition))
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
        try:
            return make_record(
                self.layout.dir(asset, partition), asset, partition, records,
                params_for(asset, self.cfg), files, id_parts=id_parts,
                extra={"environment": environment(), **(extra or {})},
            )
        finally:
            self.close()


#: Assets shared by every phase (no partition).
UNPARTITIONED = ("dataset_index", "splits")
