"""Arguments and runners of ``stage1 serve`` and ``stage1 bundle export-miner`` (registered in ``cli.py``).

Heavy imports (torch, FastAPI, uvicorn) happen inside the runners, so ``stage1 --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_export_miner_arguments", "add_serve_arguments", "cmd_export_miner", "cmd_serve"]

DEFAULT_ARTIFACTS_ROOT = "artifacts"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_core.serving.inputs import Limits

    limits = Limits()
    parser.add_argument("--bundle", type=Path, required=True, help="deploy bundle directory")
    parser.add_argument("--id", dest="expected_id", default=None,
                        help="serve only the bundle with this id (sha256 of bundle.json); reloads keep the pin "
                             "unless POST /reload names a new id")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: only this machine; /reload is not "
                             "authenticated, so do not expose it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    parser.add_argument("--artifacts_root", "--artifacts-root", default=DEFAULT_ARTIFACTS_ROOT,
                        help="where a builtin backbone is (re)built (default ./artifacts)")
    parser.add_argument("--backbone", type=Path, default=None,
                        help="backbone directory to use instead of the one the bundle names (a miner submission's "
                             "backbone/); its fingerprint must be the recorded one")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max-batch", type=int, default=32, help="most images per forward pass (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="longest a request waits for others to batch with (default 5 ms)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="threads that decode and resize a batch's images (default 0: the batch worker itself)")
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="requests waiting beyond this are answered 503 (default 1024)")
    parser.add_argument("--max-bytes", type=int, default=limits.max_bytes,
                        help=f"largest request body (default {limits.max_bytes})")
    parser.add_argument("--max-images", type=int, default=limits.max_images,
                        help=f"most images in one batch request (default {limits.max_images})")
    parser.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                        help=f"largest image, width x height (default {limits.max_pixels})")
    parser.add_argument("--timeout", type=float, default=30.0, help="answer 504 after this many seconds (default 30)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args: argparse.Namespace) -> int:
    from stage1_core.bundle.load import BundleError
    from stage1_core.cli_errors import CliError
    from stage1_core.serving.app import ServeSettings
    from stage1_core.serving.inputs import Limits
    from stage1_core.serving.server import serve

    if args.num_workers < 0:
        raise CliError(f"--num-workers must be >= 0, got {args.num_workers}")
    for name in ("max_batch", "max_queue", "max_bytes", "max_images", "max_pixels"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.max_wait_ms <= 10_000 or args.timeout <= 0:
        raise CliError("--max-wait-ms must be in [0, 10000] and --timeout > 0")
    settings = ServeSettings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        request_timeout_s=args.timeout, num_workers=args.num_workers,
        limits=Limits(max_bytes=args.max_bytes, max_images=args.max_images, max_pixels=args.max_pixels),
    )
    try:
        return serve(args.bundle, args.expected_id, args.host, args.port, args.artifacts_root, args.backbone,
                     args.device, settings, args.log_level)
    except (BundleError, OSError) as exc:
        raise CliError(str(exc)) from None


def add_export_miner_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export-miner`` options of ``stage1 bundle`` (``stage1 bundle export-miner BUNDLE OUT ...``)."""
    parser.add_argument("out", type=Path, nargs="?", default=None,
                        help="export-miner: the submission folder to write (must not exist)")
    group = parser.add_argument_group("export-miner (the files a StreetVision miner submits)")
    group.add_argument("--model-name", default=None, help="model_card.json model_name")
    group.add_argument("--version", default=None, help="model_card.json version, X.Y.Z")
    group.add_argument("--submitted-by", default=None, help="model_card.json submitted_by: the miner's hotkey (SS58)")
    group.add_argument("--description", default=None,
                       help="model_card.json description (default: one line naming the phase, policy and bundle id)")
    group.add_argument("--with-backbone", action="store_true",
                       help="copy the external backbone's weights into the folder (its licence is yours to check); "
                            "a bundle that carries its adapted backbone always has it")
    group.add_argument("--artifacts_root", "--artifacts-root", default=DEFAULT_ARTIFACTS_ROOT,
                       help="where a builtin backbone is (re)built for --with-backbone (default ./artifacts)")


def cmd_export_miner(args: argparse.Namespace) -> int:
    from stage1_core.cli_errors import CliError
    from stage1_core.serving.miner import MinerExportError, export_miner

    missing = [flag for flag, value in (("OUT", args.out), ("--model-name", args.model_name),
                                        ("--version", args.version), ("--submitted-by", args.submitted_by))
               if value is None]
    if missing:
        raise CliError(f"export-miner needs {', '.join(missing)}: stage1 bundle export-miner BUNDLE OUT "
                       f"--model-name NAME --version X.Y.Z --submitted-by HOTKEY")
    try:
        out = export_miner(args.directory, args.out, model_name=args.model_name, version=args.version,
                           submitted_by=args.submitted_by, description=args.description,
                           with_backbone=args.with_backbone, artifacts_root=args.artifacts_root,
                           expected_id=args.expected_id)
    except MinerExportError as exc:
        raise CliError(str(exc)) from None
    print(f"{out}: miner submission written ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0
