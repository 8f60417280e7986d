"""Small helpers shared by the asset modules: metadata conversion and error translation."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from stage1_core.artifacts import atomic_write_bytes
from stage1_core.lineage import StaleInputError
from stage1_core.phases import PhaseUnavailableError

#: Bumped when a step's code changes what it produces; Dagster then marks the asset stale.
CODE_VERSION = "2"


#: Settings that are the same in every materialisation of a run config: shown once, in the
#: asset's definition metadata (:func:`constants_metadata`), not in every event.
CONSTANT_KEYS = frozenset({
    "target_fnr_exit", "target_fnr", "delta", "n_bootstrap", "deploy_prior", "bootstrap_confidence",
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

#: Hex ids (sha256 and the like) are shown by their first characters: a full 64-character id
#: does not wrap and widens the page beyond the window; the files and `stage1 summary` keep it.
SHOWN_ID_CHARS = 16
_HEX_ID = re.compile(r"[0-9a-f]{40,}")

#: Widest a table or figure shown inline may be, in pixels: what the value column of an asset
#: page's metadata holds in a 1600 px wide window without scrolling sideways.
INLINE_WIDTH_PX = 440

#: Known step tables shown inline with the columns a person reads at a glance, renamed short
#: (source column -> shown name); the whole table is in the asset's files (its ``path`` entry).
#: Other tables are shown whole.
DISPLAY_COLUMNS: dict[str, dict[str, str]] = {
    "metrics": {"metric": "metric", "value": "value", "ci_lower": "ci_lower", "ci_upper": "ci_upper"},
    "history": {"Epoch": "epoch", "Train_Loss": "train_loss", "Val_Loss": "val_loss", "Val_Acc": "val_acc",
                "AUGRC": "augrc"},
    "seed_grid": {"threshold": "threshold", "coverage": "coverage", "n_exited_positives": "exited_pos",
                  "n_false_negatives": "fn", "p_value": "p_value"},
}

#: Rows of known step tables left out of the inline view (bookkeeping; the file keeps them): the
#: UI does not wrap a long first cell, and "fnr_on_exited_undefined_resamples" alone pushed the
#: metrics table past the page's right edge.
HIDDEN_ROWS: dict[str, frozenset[str]] = {"metrics": frozenset({"fnr_on_exited_undefined_resamples"})}

#: A string cell longer than this may wrap after its underscores (a zero-width space is added).
WRAP_AFTER_CHARS = 18

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
    return dg.MetadataValue.text(short_id(str(value)))


def short_id(text: str) -> str:
    """A long hex id cut to :data:`SHOWN_ID_CHARS` characters and an ellipsis; any other text as it is."""
    return f"{text[:SHOWN_ID_CHARS]}\u2026" if _HEX_ID.fullmatch(text) else text


def _is_interval(key: str, value: Any) -> bool:
    return (
        key.endswith("_ci")
        and isinstance(value, (list, tuple))
        and len(value) == 2
        and all(v is None or isinstance(_plain(v), (int, float)) for v in value)
    )


def _shown(key: str, value: Any, top: Mapping[str, Any]) -> bool:
    """Whether the top level already shows a nested entry: same name and value, or the same float."""
    if key in top and top[key] == value:
        return True
    value = _plain(value)
    return isinstance(value, float) and any(isinstance(_plain(v), float) and _plain(v) == value for v in top.values())


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of ``values`` with intervals split and nested dicts flattened; constants dropped.

    ``x_ci: [lo, hi]`` becomes ``x_ci_lower`` and ``x_ci_upper``; the entries of a nested dict
    ``d`` keep their own names (``d.key`` only where the name is taken: short keys fit the page),
    leaving out entries the top level already shows (same name and value, or the same float).
    """
    flat: dict[str, Any] = {}
    nested: list[tuple[str, str, Any]] = []
    for key, value in values.items():
        if key in CONSTANT_KEYS:
            continue
        name = f"{prefix}{key}"
        if _is_interval(key, value):
            flat[f"{name}_lower"], flat[f"{name}_upper"] = value
        elif isinstance(value, Mapping):
            for sub_key, sub_value in flatten(value).items():
                if _shown(sub_key, sub_value, values):
                    continue
                nested.append((name, sub_key, sub_value))
        else:
            flat[name] = value
    names = [sub_key for _, sub_key, _ in nested]
    for name, sub_key, sub_value in nested:
        unique = sub_key not in flat and names.count(sub_key) == 1
        flat[sub_key if unique else f"{name}.{sub_key}"] = sub_value
    return flat


def ordered(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with :data:`HEADLINE_KEYS` first (in that order), the rest as they came."""
    first = {key: values[key] for key in HEADLINE_KEYS if key in values}
    return {**first, **{key: value for key, value in values.items() if key not in first}}


def to_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    """A step's metadata dict as Dagster metadata: headline first, rounded, flat, no constants."""
    return {key: metadata_value(value) for key, value in ordered(flatten(values)).items()}


def wrappable(text: str) -> str:
    """``text`` with a zero-width space after each underscore when it is long, so a table cell can wrap."""
    return text.replace("_", "_\u200b") if len(text) > WRAP_AFTER_CHARS else text


def _cell(value: Any) -> str | int | float | bool | None:
    value = _plain(value)
    if isinstance(value, str):
        return wrappable(short_id(value))
    if value is None or isinstance(value, (bool, int)):
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


def table(rows: list[Mapping[str, Any]], columns: Mapping[str, str] | None = None) -> dg.TableMetadataValue:
    """A list of flat dicts as a Dagster table (rendered inline), floats rounded for display.

    ``columns`` (source name -> shown name) picks and renames columns; the ones missing from every
    row are left out, and when none is present the table is shown whole.
    """
    present: list[str] = []
    for row in rows:
        present.extend(c for c in row if c not in present)
    chosen = {c: shown for c, shown in (columns or {}).items() if c in present} or {c: c for c in present}
    cells = [{shown: _cell(row.get(c)) for c, shown in chosen.items()} for row in rows]
    columns = list(chosen.values())
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

    With a ``store`` the PNG is copied there under its content hash, with a copy at most
    :data:`INLINE_WIDTH_PX` wide, and shown inline as a short Markdown image (the UI renders
    Markdown under 1000 characters inline) that links to the full-size copy; without a store, the
    path.
    """
    path = Path(path)
    if store is None:
        return dg.MetadataValue.path(str(path))
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    full, small = store / f"{digest}.png", store / f"{digest}_w{INLINE_WIDTH_PX}.png"
    if not full.is_file():
        atomic_write_bytes(full, data)
    if not small.is_file():
        atomic_write_bytes(small, _narrow_png(data, INLINE_WIDTH_PX))
    url = f"/logs/{FIGURE_NAMESPACE}"
    return dg.MetadataValue.md(
        f"[![{title}]({url}/{small.stem}/png)]({url}/{digest}/png)\n\n{path.name} (click for full size)"
    )


def _narrow_png(data: bytes, width: int) -> bytes:
    """``data`` (a PNG) scaled down to at most ``width`` pixels wide, as PNG bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.width <= width:
            return data
        height = max(1, round(image.height * width / image.width))
        out = io.BytesIO()
        image.resize((width, height), Image.Resampling.LANCZOS).save(out, format="PNG", optimize=True)
        return out.getvalue()


def constants_metadata(config: Any) -> dict[str, Any]:
    """The run config's fixed promises and settings, for an asset's definition metadata."""
    if config is None:
        return {}
    values = {
        "target_fnr_exit": config.target_fnr_exit, "delta": config.delta, "n_bootstrap": config.bootstrap_samples,
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
        hidden = HIDDEN_ROWS.get(name, frozenset())
        rows = [row for row in rows if row.get("metric") not in hidden]
        metadata[name] = table(rows, DISPLAY_COLUMNS.get(name)) if rows else dg.MetadataValue.text("(no rows)")
    for title, path in result.figures.items():
        metadata[f"figure: {title}"] = figure_metadata(title, path, store)
    version = dg.DataVersion(result.data_version) if result.data_version else None
    return dg.MaterializeResult(metadata=metadata, data_version=version)


def run_step(context: Any, stage1: Any, asset: str, step: Any, *args: Any, **kwargs: Any) -> dg.MaterializeResult:
    """Run a library step with the resource's config and layout, recording failures for the summary.

    The step takes its own locks (:class:`stage1_core.steps.context.StepContext`: the write lock
    of its partition and read locks of exactly the inputs it requires); the
    :func:`~stage1_core.locking.lock_scope` here releases them at once if the step raises.
    """
    from stage1_assets.recovery import tag_host
    from stage1_core.distributed.steps import DISTRIBUTED_ASSETS
    from stage1_core.locking import AssetLockedError, lock_scope
    from stage1_core.steps.context import UNPARTITIONED

    tag_host(context.instance, context.run_id)  # so crash recovery on another host leaves this run alone
    layout = stage1.layout()
    partition = None if asset in UNPARTITIONED else context.partition_key
    try:
        with lock_scope(), as_failure(layout, asset, partition):
            config = stage1.load_config()
            if partition and config.world_size > 1 and asset in DISTRIBUTED_ASSETS:
                from stage1_assets.distributed import run_with_torchrun

                remote, reported = run_with_torchrun(context, config, layout, asset, partition)
                built = step_result(remote, figure_store(context.instance))
                return dg.MaterializeResult(metadata={**built.metadata, **(reported.metadata or {})},
                                            data_version=reported.data_version)
            call_args = (config, layout) + ((partition,) if partition else ()) + args
            return step_result(step(*call_args, **kwargs), figure_store(context.instance))
    except AssetLockedError as exc:
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}") from exc
