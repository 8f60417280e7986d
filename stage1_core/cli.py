"""The ``stage1`` command.

Subcommands are registered in :data:`SUBCOMMANDS` with :func:`subcommand`: each is one function
taking the parsed arguments and returning an exit code, plus a function that adds its arguments.

``stage1 train --mode {extract_features,train_cached,train}`` accepts every flag of the baseline
script ``train_stage1_head.py`` (same names, same meaning) and one ``--<field>`` flag per other
:class:`~stage1_core.config.Stage1ProConfig` field (``--phase``, ``--exit_policy``,
``--target_fnr_exit``, ``--seed``, ...; booleans as ``--x`` / ``--no_x``). Values come from the
config defaults, then ``--config FILE`` (YAML or JSON), then the flags given. Differences from
the baseline: ``--exit_threshold`` sets ``legacy_exit_threshold_for_logging`` (monitoring
columns of the log only; the deployed exit threshold is certified on val_calib), and
``--target_coverage`` is refused (the only constraint is ``target_fnr_exit``).

``stage1 train --phase N`` runs phase N's recipe instead (:mod:`stage1_core.training.phase_run`):
the Dagster steps, gate and bundle, with ``--output_dir`` as the artifacts root; phases that
adapt the backbone (4, 5) are refused with the Dagster job to run.

``stage1 import-baseline-log training.log`` reads the best validation accuracy of a log written
by the old script, to use as ``baseline_val_accuracy``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1_core.cli_errors import CliError
from stage1_core.serving import commands as _serving

PROG = "stage1"
DEFAULT_ARTIFACTS_ROOT = "artifacts"


@dataclass(frozen=True)
class Subcommand:
    """One ``stage1`` subcommand: its help, argument builder and runner."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as ``stage1 <name>``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is registered twice")
        SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)
        return run

    return register


#: Baseline flags -> (config field, type, help). Booleans are handled separately.
BASELINE_VALUE_FLAGS: dict[str, tuple[str, type, str]] = {
    "--model_path": ("model_path", str, "Hugging Face model directory, or builtin:tiny-dinov3"),
    "--train_image_dir": ("train_image_dir", str, "training image folder"),
    "--train_labels_file": ("train_labels_file", str, "training labels CSV (image,label)"),
    "--val_image_dir": ("val_image_dir", str, "validation image folder"),
    "--val_labels_file": ("val_labels_file", str, "validation labels CSV (image,label)"),
    "--cached_features_dir": ("cached_features_dir", str, "feature cache directory"),
    "--output_dir": ("output_dir", str, "where checkpoints, logs and predictions go"),
    "--epochs": ("epochs", int, "training epochs"),
    "--max_batch_size": ("max_batch_size", int, "batch size to try first"),
    "--fallback_batch_size": ("fallback_batch_size", int, "batch size when the maximum does not fit"),
    "--grad_accum_steps": ("grad_accum_steps", int, "batches per optimiser step"),
    "--lr_head": ("lr_head", float, "learning rate of the head"),
    "--lr_backbone": ("lr_backbone", float, "learning rate of trainable backbone parameters"),
    "--weight_decay": ("weight_decay", float, "AdamW weight decay"),
    "--label_smoothing": ("label_smoothing", float, "cross-entropy label smoothing"),
    "--dropout": ("dropout", float, "head dropout"),
    "--max_grad_norm": ("max_grad_norm", float, "gradient clipping norm"),
    "--warmup_epochs": ("warmup_epochs", int, "linear warm-up epochs"),
    "--ema_decay": ("ema_decay", float, "EMA decay"),
    "--early_stop_patience": ("early_stop_patience", int, "epochs without improvement before stopping"),
    "--roadwork_iccv_dir": ("roadwork_iccv_dir", str, "ROADWork (ICCV) data folder"),
    "--roadwork_extra_dir": ("roadwork_extra_dir", str, "extra roadwork data folder"),
    "--kaggle_construction_dir": ("kaggle_construction_dir", str, "Kaggle construction data folder"),
    "--kaggle_road_issues_dir": ("kaggle_road_issues_dir", str, "Kaggle road issues data folder"),
    "--resume_checkpoint": ("resume_checkpoint", str, "full checkpoint to resume from"),
    "--log_file": ("log_file", str, "CSV log file (relative to output_dir unless absolute)"),
}
#: Baseline on/off flags: flag -> (config field, value, help).
BASELINE_SWITCHES: dict[str, tuple[str, bool, str]] = {
    "--use_amp": ("use_amp", True, "mixed precision on CUDA (default)"),
    "--no_amp": ("use_amp", False, "disable mixed precision"),
    "--use_ema": ("use_ema", True, "evaluate and save EMA weights (default)"),
    "--no_ema": ("use_ema", False, "disable EMA"),
    "--use_extra_roadwork": ("use_extra_roadwork", True, "add ROADWork and extra roadwork training sources"),
    "--use_kaggle_data": ("use_kaggle_data", True, "add the Kaggle construction / road issues training sources"),
}
BASELINE_FLAGS = ("--mode", *BASELINE_VALUE_FLAGS, *BASELINE_SWITCHES, "--exit_threshold")
#: Config fields without a flag (provenance written by the program).
UNFLAGGED_FIELDS = ("created_at", "git_commit")
EXIT_THRESHOLD_NOTE = (
    "--exit_threshold sets legacy_exit_threshold_for_logging: it only fills the Exit_Coverage / "
    "Exit_Acc monitoring columns of the training log. The deployed exit threshold is chosen and "
    "certified on val_calib so that FNR on exited samples <= target_fnr_exit."
)


class _RefuseTargetCoverage(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        from stage1_core.config import TARGET_COVERAGE_REFUSAL

        parser.error(f"{option_string}: {TARGET_COVERAGE_REFUSAL}")


def _field_kind(annotation: Any) -> tuple[str, Any]:
    """('bool' | 'choice' | 'value', type or choices) for a pydantic field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _field_kind(args[0])
    if annotation is bool:
        return "bool", bool
    if origin is typing.Literal:
        return "choice", list(typing.get_args(annotation))
    if annotation in (int, float, str):
        return "value", annotation
    if origin in (typing.Union, types.UnionType) and bool in args:
        return "bool", bool
    return "value", str


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every baseline flag, then one flag per remaining Stage1ProConfig field."""
    from stage1_core.config import Stage1ProConfig

    suppress = argparse.SUPPRESS
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON config file (flags override it)")
    parser.add_argument(
        "--artifacts_root", type=Path, default=Path(DEFAULT_ARTIFACTS_ROOT),
        help=f"where the builtin backbone and synthetic data are kept (default: ./{DEFAULT_ARTIFACTS_ROOT})",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    base = parser.add_argument_group("baseline flags (train_stage1_head.py)")
    base.add_argument("--mode", choices=["extract_features", "train_cached", "train"], default=suppress,
                      help="extract_features | train_cached | train (default: train)")
    for flag, (dest, kind, text) in BASELINE_VALUE_FLAGS.items():
        base.add_argument(flag, dest=dest, type=kind, default=suppress, help=text)
    for flag, (dest, value, text) in BASELINE_SWITCHES.items():
        base.add_argument(flag, dest=dest, action="store_const", const=value, default=suppress, help=text)
    base.add_argument("--exit_threshold", dest="legacy_exit_threshold_for_logging", type=float, default=suppress,
                      help="monitoring only: " + EXIT_THRESHOLD_NOTE)
    base.add_argument("--target_coverage", action=_RefuseTargetCoverage, nargs="?", help=argparse.SUPPRESS)

    taken = {"mode", *(d for d, _, _ in BASELINE_VALUE_FLAGS.values()), *(d for d, _, _ in BASELINE_SWITCHES.values()),
             *UNFLAGGED_FIELDS}
    extra = parser.add_argument_group("Stage-1 Pro settings (one flag per config field)")
    for name, info in Stage1ProConfig.model_fields.items():
        if name in taken:
            continue
        kind, detail = _field_kind(info.annotation)
        text = f"default: {info.default!r}"
        if kind == "bool":
            extra.add_argument(f"--{name}", dest=name, action="store_const", const=True, default=suppress, help=text)
            extra.add_argument(f"--no_{name}", dest=name, action="store_const", const=False, default=suppress,
                               help=f"turn {name} off")
        elif kind == "choice":
            extra.add_argument(f"--{name}", dest=name, choices=detail, default=suppress, help=text)
        else:
            extra.add_argument(f"--{name}", dest=name, type=detail, default=suppress, help=text)


def config_from_args(args: argparse.Namespace) -> Any:
    """Stage1ProConfig from defaults, ``--config`` and the flags given (in that order)."""
    from stage1_core.config import Stage1ProConfig

    values = {k: v for k, v in vars(args).items() if k in Stage1ProConfig.model_fields}
    if args.config is not None:
        base = Stage1ProConfig.from_file(args.config).model_dump()
        base.update(values)
        values = base
    return Stage1ProConfig.from_dict(values, source=args.config)


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("stage1_core").setLevel(logging.INFO)


@subcommand("train", "train the Stage-1 head (baseline-compatible modes), or one phase with --phase N", add_train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    from stage1_core.training.standalone import MODES

    config = config_from_args(args)
    if "legacy_exit_threshold_for_logging" in vars(args):
        print(f"note: {EXIT_THRESHOLD_NOTE}", file=sys.stderr)
    _configure_logging()
    if _runs_phase_recipe(args, config):
        from stage1_core.phases import PHASES
        from stage1_core.training.phase_run import GateFailedError, run_phase

        if Path(args.artifacts_root) != Path(DEFAULT_ARTIFACTS_ROOT):
            raise CliError(f"--artifacts_root {args.artifacts_root}: with --phase the run's --output_dir "
                           f"({config.output_dir}) is its artifacts root (data, backbone, features, gates, bundle); "
                           f"leave --artifacts_root out")
        deployed = PHASES[config.phase].overrides.get("exit_policy")
        if "exit_policy" in vars(args) and deployed not in (None, config.exit_policy):
            print(f"note: phase {config.phase} certifies and bundles its row's exit policy {deployed!r}, as its "
                  f"Dagster job does; {config.exit_policy!r} is reported beside it in the evaluation", file=sys.stderr)
        try:
            result = run_phase(config, progress=not args.no_progress, device=args.device)
        except GateFailedError as exc:
            print(f"{PROG} train: {exc}", file=sys.stderr)
            return 1
    else:
        result = MODES[config.mode](config, Path(args.artifacts_root), progress=not args.no_progress, device=args.device)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _runs_phase_recipe(args: argparse.Namespace, config: Any) -> bool:
    """Whether ``stage1 train`` runs a phase recipe (:mod:`stage1_core.training.phase_run`): when
    ``--phase`` is given or the config's phase is not 1. Otherwise it is the baseline's phase-1
    trainer (:mod:`stage1_core.training.standalone`), its three modes and output files unchanged."""
    return "phase" in vars(args) or config.phase != 1




def add_import_log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log_file", type=Path, help="CSV log written by train_stage1_head.py (training.log)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@subcommand(
    "import-baseline-log",
    "read the best val accuracy of the old script's training log (for baseline_val_accuracy)",
    add_import_log_arguments,
)
def cmd_import_baseline_log(args: argparse.Namespace) -> int:
    from stage1_core.baselines import read_baseline_log

    info = read_baseline_log(args.log_file)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        where = f"epoch {info['best_epoch']}" if info["best_epoch"] else "Best_Val_Acc column"
        print(
            f"{info['log_file']}: best validation accuracy {info['best_val_acc_percent']:.2f}% ({where}, "
            f"{info['epochs']} epochs) -> baseline_val_accuracy: {info['baseline_val_accuracy']}"
        )
    return 0




def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_core.data.synthetic import DEFAULT_N_TRAIN, DEFAULT_N_VAL

    parser.add_argument("--out", type=Path, required=True, help="output folder (NATIX layout)")
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help=f"training images (default {DEFAULT_N_TRAIN})")
    parser.add_argument("--n-val", type=int, default=DEFAULT_N_VAL, help=f"validation images (default {DEFAULT_N_VAL})")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")


@subcommand("synth", "generate the deterministic synthetic roadwork data set (NATIX layout)", add_synth_arguments)
def cmd_synth(args: argparse.Namespace) -> int:
    from stage1_core.data.synthetic import generate_synthetic_dataset

    summary = generate_synthetic_dataset(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    print(json.dumps(summary.to_dict(), indent=2, default=str))
    return 0


#: File name endings ``stage1 predict`` takes from a directory (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="deploy bundle directory")
    parser.add_argument("--id", dest="expected_id", default=None,
                        help="refuse the bundle unless its id (sha256 of bundle.json) is this one; checked on the "
                             "same files that are loaded")
    parser.add_argument("images", nargs="*", type=Path,
                        help=f"image files, or directories (their {'/'.join(IMAGE_SUFFIXES)} files, recursively, sorted)")
    parser.add_argument("--list", dest="list_file", default=None,
                        help="a text file with one image path per line (relative to the file's folder; '#' "
                             "comments and blank lines skipped); '-' reads the list from stdin")
    parser.add_argument("--json", action="store_true", help="one JSON object per image (JSON lines)")
    parser.add_argument("--artifacts_root", "--artifacts-root", default=DEFAULT_ARTIFACTS_ROOT,
                        help="where a builtin backbone is (re)built (default ./artifacts)")
    parser.add_argument("--batch_size", type=int, default=None, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="image decoding threads (default min(8, CPUs))")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--transductive", action="store_true",
                        help="decide all images as one batch (required by, and only for, an SCRC-T bundle, which "
                             "recomputes its thresholds from the batch; too small a batch is refused)")


def predict_inputs(images: Sequence[Path], list_file: str | None) -> list[Path]:
    """The images ``stage1 predict`` decides, in order: files as given, directories expanded, then the list."""
    paths: list[Path] = []
    for path in images:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"{path}: directory holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(path)
    if list_file is not None:
        if list_file == "-":
            text, base = sys.stdin.read(), Path.cwd()
        else:
            try:
                text, base = Path(list_file).read_text(encoding="utf-8-sig"), Path(list_file).parent
            except (OSError, UnicodeDecodeError) as exc:
                raise CliError(f"{list_file}: cannot read the image list ({exc})") from None
        for line in text.splitlines():
            entry = line.strip()
            if entry and not entry.startswith("#"):
                path = Path(entry)
                paths.append(path if path.is_absolute() else base / path)
    if not paths:
        raise CliError("no images given: pass image files, directories, or --list FILE")
    return paths


@subcommand("predict", "decide images with a deploy bundle (exit or defer, label, p_roadwork)", add_predict_arguments)
def cmd_predict(args: argparse.Namespace) -> int:
    """Decide every readable image, streaming one line per image as its batch is decided.

    Images are decoded ahead in threads and batched through the backbone
    (:meth:`~stage1_core.bundle.predictor.Stage1Predictor.iter_predict`); a progress bar goes to
    stderr. One error line per unreadable image; exit 1 if any failed.
    """
    from stage1_core.bundle.load import BundleError, Stage1Bundle, format_prediction
    from stage1_core.progress import progress

    try:
        bundle = Stage1Bundle.load(args.bundle, artifacts_root=args.artifacts_root, expected_id=args.expected_id)
    except (BundleError, OSError) as exc:
        raise CliError(str(exc)) from None
    size = args.batch_size if args.batch_size is not None else bundle.config.max_batch_size
    if size < 1:
        raise CliError(f"--batch_size must be >= 1, got {size}")
    paths = predict_inputs(args.images, args.list_file)
    try:
        bundle.check_transductive(len(paths), args.transductive)
        bundle.load_backbone()
    except (ValueError, BundleError, OSError) as exc:
        raise CliError(str(exc)) from None
    predictor = bundle.predictor
    bar = progress(total=len(paths), desc="predict", unit="img", disable=args.no_progress)
    failed = 0

    def report(position: int, error: Exception) -> None:
        nonlocal failed
        failed += 1
        bar.write(f"{PROG} predict: error: {error}", file=sys.stderr)

    try:
        if args.transductive:
            # SCRC-T recomputes its thresholds from the batch: decide every readable image at once.
            kept, features = [], []
            for batch in predictor.iter_features(paths, batch_size=size, num_workers=args.num_workers):
                for position, error in batch.failures:
                    report(position, error)
                kept.extend(batch.indices)
                features.append(batch.features)
                bar.update(len(batch.indices) + len(batch.failures))
            if kept:
                import torch

                try:
                    bundle.check_transductive(len(kept), True)
                except ValueError as exc:
                    raise CliError(f"{exc} ({failed} image(s) could not be read)") from None
                records = predictor.decide_features(torch.cat(features)).to_records()
                for position, record in zip(kept, records):
                    print(format_prediction(paths[position], record, as_json=args.json))
        else:
            for position, result in predictor.iter_predict(paths, batch_size=size, num_workers=args.num_workers):
                if isinstance(result, Exception):
                    report(position, result)
                else:
                    print(format_prediction(paths[position], result, as_json=args.json), flush=True)
                bar.update(1)
    finally:
        bar.close()
    if failed:
        print(
            f"{PROG} predict: {failed} of {len(paths)} image(s) could not be read and were not decided; "
            f"the other {len(paths) - failed} were",
            file=sys.stderr,
        )
        return 1
    return 0


def add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["verify", "export-miner"],
                        help="verify: schema, checksums, file set, pointers, weights, lineage; "
                             "export-miner: write a StreetVision miner submission folder")
    parser.add_argument("directory", type=Path, help="deploy bundle directory")
    parser.add_argument("--id", dest="expected_id", default=None,
                        help="refuse the bundle unless its id (sha256 of bundle.json) is this one")
    _serving.add_export_miner_arguments(parser)


@subcommand("bundle", "work with deploy bundles (stage1 bundle verify DIR [--id ID]; "
            "stage1 bundle export-miner DIR OUT --model-name --version --submitted-by)", add_bundle_arguments)
def cmd_bundle(args: argparse.Namespace) -> int:
    from stage1_core.bundle.load import inspect_bundle

    if args.action == "export-miner":
        return _serving.cmd_export_miner(args)
    if args.out is not None:
        raise CliError(f"unexpected argument {args.out} for 'bundle verify' (OUT belongs to export-miner)")

    found = inspect_bundle(args.directory, expected_id=args.expected_id)
    if found.problems:
        print(f"{args.directory}: INVALID bundle, {len(found.problems)} problem(s):", file=sys.stderr)
        for problem in found.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    manifest = found.manifest  # the very bytes that were verified, not a second reading
    print(
        f"{args.directory}: valid bundle {found.bundle_id} (phase {manifest['phase']}, policy "
        f"{manifest['active_exit_policy']} from {manifest['policy_file']}, {len(manifest['sha256'])} files checksummed)"
    )
    return 0


subcommand("serve", "serve a bundle over HTTP (POST /predict, GET /health, GET /metrics, POST /reload)",
           _serving.add_serve_arguments)(_serving.cmd_serve)


def add_summary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phase", default="phase1", help="phase partition (default phase1)")
    parser.add_argument("--all", action="store_true", help="one table of every phase: state (passed / failed / not run / skipped / not available), "
                             "headline figures, current bundle")
    parser.add_argument("--artifacts_root", "--artifacts-root", default=None,
                        help="artifacts root (default $STAGE1_ARTIFACTS or ./artifacts)")
    parser.add_argument("--config", default=None, help="run config (default $STAGE1_CONFIG or configs/default.yaml)")


@subcommand("summary", "the gate verdicts of a phase, its current bundle and headline figures", add_summary_arguments)
def cmd_summary(args: argparse.Namespace) -> int:
    """Exit 0 only when the phase (every phase with --all that ran) has a current bundle."""
    import os

    from stage1_core.config import Stage1ProConfig
    from stage1_core.steps.context import Layout
    from stage1_core.steps.summary import format_table, phase_status, phase_summary_lines, summary_table

    root = args.artifacts_root or os.environ.get("STAGE1_ARTIFACTS", DEFAULT_ARTIFACTS_ROOT)
    config_path = args.config or os.environ.get("STAGE1_CONFIG", "configs/default.yaml")
    config = Stage1ProConfig.from_file(config_path) if Path(config_path).is_file() else Stage1ProConfig()
    layout = Layout(root)
    if args.all:
        rows = summary_table(config, layout)
        print(format_table(rows))
        ran = [r for r in rows if r["state"] in ("passed", "failed")]
        return 0 if ran and all(r["bundle_id"] for r in ran) else 1
    status = phase_status(config, layout, args.phase)
    for line in phase_summary_lines(status):
        print(line)
    log = os.environ.get("STAGE1_EVENT_LOG")
    if log:
        print(f"  full Dagster event log: {log}")
    return 0 if status["bundle_current"] else 1


def add_phase_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["skip", "unskip"], help="skip: record that an optional phase is skipped; "
                        "unskip: remove that record")
    parser.add_argument("phase", help="the optional phase, e.g. phase5")
    parser.add_argument("--reason", default=None, help="why it is skipped (required for skip; shown in the UI and summary)")
    parser.add_argument("--artifacts_root", "--artifacts-root", default=None,
                        help="artifacts root (default $STAGE1_ARTIFACTS or ./artifacts)")


@subcommand("phase", "skip an optional phase (stage1 phase skip phase5 --reason TEXT) or undo it", add_phase_arguments)
def cmd_phase(args: argparse.Namespace) -> int:
    """Later phases build on a skipped phase's predecessor and no longer wait for its gate."""
    import os

    from stage1_core.phase_state import skip_phase, unskip_phase

    root = Path(args.artifacts_root or os.environ.get("STAGE1_ARTIFACTS", DEFAULT_ARTIFACTS_ROOT))
    if args.action == "skip":
        record = skip_phase(root, args.phase, args.reason or "")
        print(f"{record['phase']} skipped by {record['by']} at {record['at']}: {record['reason']}\n"
              f"later phases no longer wait for its gate; undo with `{PROG} phase unskip {record['phase']}`")
        return 0
    existed = unskip_phase(root, args.phase)
    print(f"{args.phase}: skip record removed" if existed else f"{args.phase} was not skipped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Stage-1 Pro: train, calibrate and ship the Stage-1 head.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stage1`` console script."""
    from stage1_core.artifacts import ArtifactError
    from stage1_core.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except (CliError, ConfigError, ArtifactError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
