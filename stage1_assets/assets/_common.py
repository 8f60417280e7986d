"""Small helpers shared by the asset modules: metadata conversion and error translation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from stage1_core.lineage import StaleInputError
from stage1_core.phases import PhaseUnavailableError

#: Bumped when a step's code changes what it produces; Dagster then marks the asset stale.
CODE_VERSION = "2"


def metadata_value(value: Any) -> Any:
    """Plain values as Dagster metadata: floats stay floats (so the UI plots them over time)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, bool) or value is None:
        return dg.MetadataValue.text(str(value)) if value is None else value
    if isinstance(value, float):
        return dg.MetadataValue.float(value) if math.isfinite(value) else dg.MetadataValue.text(str(value))
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, Path):
        return dg.MetadataValue.path(str(value))
    if isinstance(value, (list, tuple, dict)):
        return dg.MetadataValue.json(value)
    return dg.MetadataValue.text(str(value))


def to_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: metadata_value(value) for key, value in values.items()}


def table(rows: list[Mapping[str, Any]]) -> dg.MetadataValue:
    """A list of flat dicts as a Dagster table (the UI renders it)."""
    if not rows:
        return dg.MetadataValue.md("(empty)")
    columns = list(rows[0].keys())
    header = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    body = "".join(
        "| " + " | ".join(_cell(row.get(c)) for c in columns) + " |\n" for row in rows
    )
    return dg.MetadataValue.md(header + body)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def figure_markdown(paths: Mapping[str, Path]) -> dg.MetadataValue:
    """Figures embedded as Markdown images (base64 data URIs, so the UI shows them inline)."""
    import base64

    parts = []
    for title, path in paths.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"**{title}**\n\n![{title}](data:image/png;base64,{data})\n")
    return dg.MetadataValue.md("\n".join(parts))


@contextlib.contextmanager
def as_failure(layout: Any = None, asset: str | None = None, partition: str | None = None) -> Iterator[None]:
    """Turn the library's input errors into a ``dagster.Failure`` with the full message.

    With ``layout`` and ``asset`` the failure is also recorded for ``stage1 summary`` (and
    cleared when the step succeeds).
    """
    from stage1_core.steps.summary import clear_failure, record_failure

    try:
        yield
    except dg.Failure as exc:
        if layout is not None and asset is not None:
            record_failure(layout, asset, partition, exc.description or str(exc))
        raise
    except (PhaseUnavailableError, StaleInputError, ValueError, FileNotFoundError) as exc:
        if layout is not None and asset is not None:
            record_failure(layout, asset, partition, str(exc))
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}") from exc
    else:
        if layout is not None and asset is not None:
            clear_failure(layout, asset, partition)


def step_result(result: Any) -> dg.MaterializeResult:
    """A step's result as a MaterializeResult: metadata, tables, figures and its lineage data version."""
    metadata = to_metadata(result.metadata)
    for name, rows in result.tables.items():
        metadata[name] = table(rows)
    if result.figures:
        metadata["figures"] = figure_markdown(result.figures)
    version = dg.DataVersion(result.data_version) if result.data_version else None
    return dg.MaterializeResult(metadata=metadata, data_version=version)


def run_step(context: Any, stage1: Any, asset: str, step: Any, *args: Any, **kwargs: Any) -> dg.MaterializeResult:
    """Run a library step with the resource's config and layout, recording failures for the summary."""
    from stage1_core.steps.context import UNPARTITIONED

    layout = stage1.layout()
    partition = None if asset in UNPARTITIONED else context.partition_key
    with as_failure(layout, asset, partition):
        config = stage1.load_config()
        call_args = (config, layout) + ((partition,) if partition else ()) + args
        return step_result(step(*call_args, **kwargs))
