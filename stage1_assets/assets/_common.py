"""Small helpers shared by the asset modules: metadata conversion and error translation."""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from stage1_core.lineage import StaleInputError
from stage1_core.phases import PhaseUnavailableError

#: Bumped when a step's code changes what it produces; Dagster then marks the asset stale.
CODE_VERSION = "2"


#: Settings that are the same in every materialisation of a run config: shown once, in the
#: asset's definition metadata (:func:`constants_metadata`), not in every event.
CONSTANT_KEYS = frozenset({
    "fnr_target", "target_fnr", "delta", "n_bootstrap", "deploy_prior", "bootstrap_confidence",
    "val_test_alpha", "val_test_check", "alpha",
})

#: The figures a person compares across phases come first, in this order.
HEADLINE_KEYS = (
    "certified", "calib_coverage", "coverage", "coverage_at_deploy_prior", "fnr_on_exited",
    "fnr_on_exited_cp_upper", "fnr_upper_bound", "fnr_on_exited_ci_lower", "fnr_on_exited_ci_upper",
    "accuracy", "mcc",
)

#: Significant digits of a float shown in the UI (the files keep full precision).
DISPLAY_DIGITS = 4

#: Where figure copies are kept inside the instance's compute-log directory, which the Dagster
#: webserver serves at ``/logs/<namespace>/<name>/<extension>``: a same-origin URL, so a
#: Markdown image renders inline on any port.
FIGURE_NAMESPACE = "stage1_figures"


def display_float(value: float) -> float:
    """``value`` rounded to :data:`DISPLAY_DIGITS` significant digits (still a float)."""
    if not math.isfinite(value) or value == 0.0:
        return value
    return float(f"{value:.{DISPLAY_DIGITS}g}")


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def metadata_value(value: Any) -> Any:
    """A plain value as Dagster metadata; floats rounded for display but still floats (plottable)."""
    value = _plain(value)
    if value is None:
        return dg.MetadataValue.text("none")
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(display_float(value)) if math.isfinite(value) else dg.MetadataValue.text(str(value))
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, Path):
        return dg.MetadataValue.path(str(value))
    if isinstance(value, (list, tuple, dict)):
        return dg.MetadataValue.json(value)
    return dg.MetadataValue.text(str(value))


def _is_interval(key: str, value: Any) -> bool:
    return (
        key.endswith("_ci")
        and isinstance(value, (list, tuple))
        and len(value) == 2
        and all(v is None or isinstance(_plain(v), (int, float)) for v in value)
    )


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of ``values`` with intervals split and nested dicts flattened; constants dropped.

    ``x_ci: [lo, hi]`` becomes ``x_ci_lower`` and ``x_ci_upper``; a nested dict ``d`` becomes
    ``d.key`` entries, leaving out keys whose value the top level already shows.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in CONSTANT_KEYS:
            continue
        name = f"{prefix}{key}"
        if _is_interval(key, value):
            flat[f"{name}_lower"], flat[f"{name}_upper"] = value
        elif isinstance(value, Mapping):
            for sub_key, sub_value in flatten(value, prefix=f"{name}.").items():
                short = sub_key[len(name) + 1:]
                if short in values and values[short] == value.get(short):
                    continue
                flat[sub_key] = sub_value
        else:
            flat[name] = value
    return flat


def ordered(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with :data:`HEADLINE_KEYS` first (in that order), the rest as they came."""
    first = {key: values[key] for key in HEADLINE_KEYS if key in values}
    return {**first, **{key: value for key, value in values.items() if key not in first}}


def to_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    """A step's metadata dict as Dagster metadata: headline first, rounded, flat, no constants."""
    return {key: metadata_value(value) for key, value in ordered(flatten(values)).items()}


def _cell(value: Any) -> str | int | float | bool | None:
    value = _plain(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return display_float(value) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(_cell(v)) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def _column_type(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "string"


def table(rows: list[Mapping[str, Any]]) -> dg.TableMetadataValue:
    """A list of flat dicts as a Dagster table (rendered inline), floats rounded for display."""
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    cells = [{c: _cell(row.get(c)) for c in columns} for row in rows]
    schema = dg.TableSchema(
        columns=[dg.TableColumn(c, _column_type([r[c] for r in cells])) for c in columns]
    )
    return dg.MetadataValue.table(records=[dg.TableRecord(r) for r in cells], schema=schema)


def figure_store(instance: Any) -> Path | None:
    """The directory the webserver serves figures from, or None when its log storage cannot."""
    manager = getattr(instance, "compute_log_manager", None)
    if manager is None or not hasattr(manager, "get_captured_local_path"):
        return None
    try:
        return Path(manager.get_captured_local_path([FIGURE_NAMESPACE, "x"], "png")).parent
    except (ValueError, TypeError, AttributeError):
        return None


def figure_metadata(title: str, path: Path, store: Path | None) -> dg.MetadataValue:
    """One figure as its own metadata entry.

    With a ``store`` the PNG is copied there under its content hash and shown inline as a short
    Markdown image (the UI renders Markdown under 1000 characters inline); without one, the path.
    """
    path = Path(path)
    if store is None:
        return dg.MetadataValue.path(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    store.mkdir(parents=True, exist_ok=True)
    target = store / f"{digest}.png"
    if not target.is_file():
        shutil.copyfile(path, target)
    return dg.MetadataValue.md(f"![{title}](/logs/{FIGURE_NAMESPACE}/{digest}/png)\n\n`{path}`")


def constants_metadata(config: Any) -> dict[str, Any]:
    """The run config's fixed promises and settings, for an asset's definition metadata."""
    if config is None:
        return {}
    values = {
        "fnr_target": config.target_fnr_exit, "delta": config.delta, "n_bootstrap": config.bootstrap_samples,
        "bootstrap_confidence": config.bootstrap_confidence, "deploy_prior": config.deploy_prior,
        "val_test_check": config.val_test_check, "val_test_alpha": config.val_test_alpha,
    }
    return {f"config/{key}": metadata_value(value) for key, value in values.items()}


def load_default_config() -> Any:
    """The config the code location points at (``STAGE1_CONFIG``), or None if it cannot be read."""
    from stage1_assets.resources import default_resource

    try:
        return default_resource().load_config()
    except Exception:  # noqa: BLE001 - definition metadata is optional, loading must not fail
        return None


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


def step_result(result: Any, store: Path | None = None) -> dg.MaterializeResult:
    """A step's result as a MaterializeResult: metadata, one entry per table and per figure, data version."""
    metadata = to_metadata(result.metadata)
    for name, rows in result.tables.items():
        metadata[name] = table(rows) if rows else dg.MetadataValue.text("(no rows)")
    for title, path in result.figures.items():
        metadata[f"figure: {title}"] = figure_metadata(title, path, store)
    version = dg.DataVersion(result.data_version) if result.data_version else None
    return dg.MaterializeResult(metadata=metadata, data_version=version)


def run_step(context: Any, stage1: Any, asset: str, step: Any, *args: Any, reads: tuple[str, ...] = (),
             **kwargs: Any) -> dg.MaterializeResult:
    """Run a library step with the resource's config and layout, recording failures for the summary.

    The step holds the write lock of its asset partition and read locks of its inputs
    (:func:`stage1_core.locking.step_locks`), so a second run cannot interleave its writes.
    ``reads`` names inputs the step reads beyond its Dagster deps (the bundle reads the whole chain
    but depends in the graph only on what it packages).
    """
    from stage1_assets.recovery import tag_host
    from stage1_core.locking import AssetLockedError, step_locks
    from stage1_core.steps.context import UNPARTITIONED

    tag_host(context.instance, context.run_id)  # so crash recovery on another host leaves this run alone
    layout = stage1.layout()
    partition = None if asset in UNPARTITIONED else context.partition_key
    inputs = [(key.path[-1], None if key.path[-1] in UNPARTITIONED else partition)
              for key in context.assets_def.dependency_keys]
    inputs += [(name, None if name in UNPARTITIONED else partition) for name in reads]
    try:
        with step_locks(layout.root, asset, partition, inputs), as_failure(layout, asset, partition):
            config = stage1.load_config()
            call_args = (config, layout) + ((partition,) if partition else ()) + args
            return step_result(step(*call_args, **kwargs), figure_store(context.instance))
    except AssetLockedError as exc:
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}") from exc
