"""Verify and load a deploy bundle; the loaded bundle predicts through :class:`Stage1Predictor`.

:func:`verify_bundle` lists every problem of a bundle directory (manifest and policy schemas, the
exact file set, exactly one policy file, sha256 of each file, no pointer that is absolute or
leaves the directory, weights that are plain tensors). :meth:`Stage1Bundle.load` refuses a bundle
with any problem, and resolves the backbone only when images are first predicted, checking that
its fingerprint is the one recorded at export.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import re
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch

from stage1_core.artifacts import ArtifactError, load_schema, schema_errors, sha256_file
from stage1_core.artifacts import read_json as _read_json_unguarded
from stage1_core.bundle.files import MAX_BACKBONE_FILE_BYTES, MAX_FILE_BYTES, MAX_MANIFEST_BYTES, BundleFileError, BundleFiles
from stage1_core.bundle.predictor import ImageInput, Stage1Predictor
from stage1_core.config import POLICIES_BY_PHASE, ConfigError, Stage1ProConfig
from stage1_core.locking import VersionGoneError, version_hold
from stage1_core.data.transforms import build_eval_transform, build_reference_eval_transform, describe_transform
from stage1_core.model.backbone import BUILTIN_PREFIX, BackboneError, DINOv3Backbone
from stage1_core.model.head import HeadStateError, Stage1Head, load_head_state_dict
from stage1_core.policies import Decisions, ExitPolicy, load_policy, policy_class

__all__ = [
    "MANIFEST_NAME",
    "POLICY_FILE_NAMES",
    "BundleError",
    "BundleInspection",
    "Stage1Bundle",
    "default_artifacts_root",
    "eval_transform_from_description",
    "format_prediction",
    "inspect_bundle",
    "manifest_pointers",
    "verify_bundle",
]

MANIFEST_NAME = "bundle.json"
#: A backbone carried in the bundle (phases that adapt it): exactly these files, safetensors only,
#: so loading it never unpickles anything.
BUNDLED_BACKBONE_FILES = ("config.json", "model.safetensors")
#: Every policy file a bundle may hold (exactly one of them), as the bundle schema lists them.
POLICY_FILE_NAMES: tuple[str, ...] = tuple(load_schema("bundle")["properties"]["policy_file"]["enum"])
#: Widest backbone a bundle may name (the schema's bound on ``hidden_size``; DINOv3 7B is 4096).
MAX_HIDDEN_SIZE: int = load_schema("bundle")["properties"]["head"]["properties"]["hidden_size"]["maximum"]


class BundleError(ValueError):
    """A bundle is invalid or cannot serve; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[str], directory: str | Path | None = None) -> None:
        self.problems = list(problems)
        self.directory = None if directory is None else Path(directory)
        where = f"{directory}: " if directory is not None else ""
        super().__init__(where + "invalid deploy bundle:\n  " + "\n  ".join(self.problems))


def read_json(path: str | Path, schema: str | None = None) -> Any:
    """:func:`stage1_core.artifacts.read_json`, with every unreadable document an :class:`ArtifactError`.

    ``json.loads`` raises a plain ``ValueError`` for an integer with more digits than Python's
    ``int`` accepts and ``RecursionError`` for too deeply nested arrays; a bundle file must be
    refused with a message, not crash the loader.
    """
    try:
        return _read_json_unguarded(path, schema=schema)
    except ArtifactError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from None


# ----- manifest pointers -----------------------------------------------------------------


def manifest_pointers(manifest: Any) -> list[tuple[str, Any]]:
    """Every ``(json path, value)`` in the manifest that names a file inside the bundle.

    ``backbone.model_path`` is not one: it names the backbone outside the bundle (a model
    directory or ``builtin:<name>``) and is checked by fingerprint when the backbone is loaded.
    """
    if not isinstance(manifest, Mapping):
        return []
    pointers: list[tuple[str, Any]] = []
    for key in ("policy_file", "model_file"):
        if key in manifest:
            pointers.append((f"$.{key}", manifest[key]))
    files = manifest.get("files")
    if isinstance(files, Mapping):
        pointers.extend((f"$.files.{k}", v) for k, v in files.items())
    backbone = manifest.get("backbone")
    if isinstance(backbone, Mapping) and backbone.get("adapter_file") is not None:
        pointers.append(("$.backbone.adapter_file", backbone["adapter_file"]))
    if isinstance(backbone, Mapping) and backbone.get("directory") is not None:
        directory = backbone["directory"]
        for name in BUNDLED_BACKBONE_FILES:
            value = f"{directory}/{name}" if isinstance(directory, str) else directory
            pointers.append((f"$.backbone.directory ({name})", value))
    sha = manifest.get("sha256")
    if isinstance(sha, Mapping):
        pointers.extend((f"$.sha256[{k!r}]", k) for k in sha)
    return pointers


def pointer_problem(root: Path, value: Any) -> str | None:
    """Why ``value`` is not a safe relative path inside ``root`` (None when it is)."""
    if not isinstance(value, str) or not value:
        return f"{value!r} is not a relative file path"
    if "\\" in value or PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or PureWindowsPath(value).drive:
        return f"{value!r} is an absolute path; bundle pointers must be relative to the bundle directory"
    parts = PurePosixPath(value).parts
    if ".." in parts:
        return f"{value!r} leaves the bundle directory ('..'); bundle pointers must stay inside it"
    if any(part in ("", ".") for part in value.split("/")):
        return f"{value!r} is not a normalised relative path (empty or '.' component)"
    try:
        resolved = (root / value).resolve()
    except (RuntimeError, OSError) as exc:  # a symbolic link loop
        return f"{value!r} cannot be resolved ({type(exc).__name__}: {exc}); symbolic link loop?"
    if not resolved.is_relative_to(root.resolve()):
        return f"{value!r} resolves to {resolved}, outside the bundle directory (symbolic link?)"
    return None


def _bundle_files(files: BundleFiles) -> tuple[set[str], set[str], list[str]]:
    """Every entry under the bundle except the manifest, those that are not regular files, and problems.

    Listed with ``lstat`` semantics: a link, FIFO, socket or device is a problem by itself and is
    never followed or opened.
    """
    entries, problems = files.listing()
    present, irregular = set(), set()
    for rel, mode in sorted(entries.items()):
        if rel == MANIFEST_NAME:
            continue
        present.add(rel)
        if stat.S_ISLNK(mode):
            irregular.add(rel)
            try:
                target = os.readlink(files.root / rel)
            except OSError:
                target = "?"
            problems.append(f"{rel}: symbolic link to {target!r}; bundle files must be regular files, not links")
        elif not stat.S_ISREG(mode):
            irregular.add(rel)
            problems.append(f"{rel}: is {files.kind(rel) or 'not a regular file'}, not a regular file; refusing it")
    return present, irregular, problems


def phase_problems(phase: Any, policy_name: Any, config_phase: Any) -> list[str]:
    """Inconsistencies between the bundle's phase, its active policy and the saved config's phase."""
    problems = []
    allowed = POLICIES_BY_PHASE.get(phase) if isinstance(phase, int) else None
    if allowed is not None and policy_name not in allowed:
        problems.append(f"exit policy {policy_name!r} is not allowed in phase {phase} (allowed: {list(allowed)})")
    if config_phase is not None and config_phase != phase:
        problems.append(f"the bundle is for phase {phase} but its config.json says phase={config_phase}")
    return problems


# ----- served probability ----------------------------------------------------------------

#: The served-probability calibrator inside a bundle (stage1_core.calibration.served); absent in
#: bundles of the clean path and in bundles made before it, which serve the policy's probability.
SERVED_CALIBRATOR_FILE = "calibrators/served_probability.json"


def _served_spec(directory: Path, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    if SERVED_CALIBRATOR_FILE not in manifest.get("sha256", {}):
        return None
    return read_json(Path(directory) / SERVED_CALIBRATOR_FILE)


# ----- transform -------------------------------------------------------------------------

_NUMBERS = r"\(([^()]*)\)"


def _int_param(step: str, name: str) -> list[int]:
    """The integers of parameter ``name=(...)`` in one step's text (``[]`` when absent)."""
    match = re.search(r"[(\s]" + name + "=" + _NUMBERS, step)
    return [int(v) for v in match.group(1).split(",") if v.strip()] if match else []


def eval_transform_from_description(text: str):
    """Rebuild the evaluation transform recorded in a manifest (``describe_transform`` text).

    The parameters (resize, crop size, mean, std) are read from the text and the transform is
    rebuilt with :func:`build_eval_transform` (``ResizedCenterCrop``) or, for a bundle exported
    before it, :func:`build_reference_eval_transform` (``Resize`` + ``CenterCrop``), so a bundle
    always decides on the pixels it was evaluated on. The rebuilt description must equal ``text``
    exactly; otherwise a ``ValueError`` says the recorded preprocessing cannot be reproduced.
    """
    composed = re.fullmatch(r"Compose\[(.*)\]", text)
    steps = composed.group(1).split("; ") if composed else []
    names = [step.split("(", 1)[0] for step in steps]
    norm = re.search(r"Normalize\([^()]*mean=" + _NUMBERS + r"[^()]*std=" + _NUMBERS, text)
    if names[:1] == ["SquareCropResize"] and norm:
        from stage1_core.data.transforms import build_deploy_transform

        size = _int_param(steps[0], "size")
        build = lambda image_size, resize, mean, std: build_deploy_transform(image_size, mean=mean, std=std)  # noqa: E731
        resize, crop = size, size * 2
    elif names[:1] == ["ResizedCenterCrop"] and norm:
        build = build_eval_transform
        resize, crop = _int_param(steps[0], "size"), _int_param(steps[0], "crop_size")
    elif names[:2] == ["Resize", "CenterCrop"] and norm:
        build = build_reference_eval_transform
        resize, crop = _int_param(steps[0], "size"), _int_param(steps[1], "size")
    else:
        raise ValueError(
            "recorded transform is not an evaluation transform (ResizedCenterCrop, or Resize + CenterCrop, "
            f"then Normalize): {text!r}"
        )
    try:
        mean = [float(v) for v in norm.group(1).split(",") if v.strip()]
        std = [float(v) for v in norm.group(2).split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"recorded transform has unreadable parameters ({exc}): {text!r}") from None
    if len(resize) != 1 or len(crop) != 2 or crop[0] != crop[1]:
        raise ValueError(f"recorded transform needs one resize size and a square crop: {text!r}")
    try:
        transform = build(image_size=crop[0], resize=resize[0], mean=mean, std=std)
    except ValueError as exc:
        raise ValueError(f"recorded transform has impossible parameters ({exc}): {text!r}") from None
    rebuilt = describe_transform(transform)
    if rebuilt != text:
        raise ValueError(
            "recorded transform cannot be reproduced by this version of stage1_core:\n"
            f"    recorded: {text}\n    rebuilt:  {rebuilt}"
        )
    return transform


# ----- verification ----------------------------------------------------------------------


def _load_weights(data: bytes, rel: str) -> tuple[Any, list[str]]:
    """The state dict held by ``data`` (a weight file's verified bytes), or the problems refusing it."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, [
            f"{rel}: refused: it holds pickled Python objects other than tensors, and loading them "
            f"could execute code (torch.load weights_only=True: {first}). Re-export the bundle "
            f"from a plain state_dict."
        ]
    except Exception as exc:  # noqa: BLE001 - weights_only=True runs no code; corrupt bytes raise anything
        return None, [f"{rel}: unreadable or truncated weight file ({type(exc).__name__}: {exc})"]
    if not isinstance(state, Mapping):
        return None, [f"{rel}: holds a {type(state).__name__}, expected a state_dict (mapping of names to tensors)"]
    bad = sorted(f"{k!r} ({type(v).__name__})" for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    if bad:
        return None, [f"{rel}: must hold only tensors keyed by name; offending entries: {', '.join(bad)}"]
    return state, []


def _head_fits(state: Mapping[str, torch.Tensor], rel: str, head_info: Any) -> list[str]:
    """Whether ``state`` fits the head recorded in ``$.head``, compared on shapes only.

    The head is built on the ``meta`` device (no memory), so a manifest naming an absurd hidden
    size costs nothing; the real head is built only after this check passed.
    """
    if not isinstance(head_info, Mapping):
        return []
    hidden = head_info.get("hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= MAX_HIDDEN_SIZE:
        return [f"{rel}: not checked against $.head: hidden_size {hidden!r} is outside 1..{MAX_HIDDEN_SIZE}"]
    try:
        with torch.device("meta"):
            head = Stage1Head(hidden, float(head_info["dropout"]), bool(head_info["with_gate"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta tensors is a no-op, by design here
            load_head_state_dict(head, state, source=rel)
    except (HeadStateError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        return [f"{rel}: does not fit the head recorded in bundle.json ($.head): {exc}"]
    return []


def _metrics_problems(path: Path, rel: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [f"{rel}: unreadable CSV ({exc})"]
    if not header or "metric" not in header:
        return [f"{rel}: line 1: expected a CSV header with a 'metric' column, got {header!r}"]
    return []


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (independent of file format)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def bundle_id(directory: str | Path) -> str:
    """The bundle's id: the sha256 of its bundle.json (which holds every other file's checksum)."""
    with BundleFiles(directory) as files:
        return hashlib.sha256(files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)).hexdigest()


def _lineage_problems(root: Path, manifest: Mapping[str, Any], readable: set[str], state: Any) -> list[str]:
    """The head, policy, metrics and backbone named by $.lineage belong together."""
    lineage = manifest.get("lineage")
    if not isinstance(lineage, Mapping):
        return []
    problems = []
    backbone = manifest.get("backbone") if isinstance(manifest.get("backbone"), Mapping) else {}
    if lineage.get("backbone_fingerprint") != backbone.get("fingerprint"):
        problems.append(
            f"{MANIFEST_NAME}: $.backbone.fingerprint {backbone.get('fingerprint')!r} is not the backbone the head "
            f"was trained on ($.lineage.backbone_fingerprint {lineage.get('backbone_fingerprint')!r})"
        )
    policy_file = manifest.get("policy_file")
    if isinstance(policy_file, str) and policy_file in readable:
        try:
            policy_checkpoint = read_json(root / policy_file).get("checkpoint_id")
        except (ArtifactError, AttributeError):
            policy_checkpoint = None
        if policy_checkpoint != lineage.get("checkpoint_id"):
            problems.append(
                f"{policy_file}: certified for checkpoint {policy_checkpoint!r}, but the bundle's head is "
                f"checkpoint {lineage.get('checkpoint_id')!r}"
            )
    model_file = manifest.get("model_file")
    if state is not None and state_dict_digest(state) != lineage.get("head_digest"):
        problems.append(f"{model_file}: its weights are not the head recorded in $.lineage.head_digest")
    return problems


def _parse_json(data: bytes, source: str) -> Any:
    """JSON from a file's bytes; every unreadable document an :class:`ArtifactError` naming ``source``."""
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{source}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{source}: not UTF-8 text ({exc})") from None
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{source}: not readable JSON ({type(exc).__name__}: {exc})") from None


@dataclass
class BundleInspection:
    """What one verification pass found: problems, and the verified content it read (one reading).

    ``root`` is the bundle directory resolved once (a ``bundle`` link is followed once, so every
    read and the id refer to the same version); ``policy``, ``config`` and ``state`` are parsed
    from the very bytes whose checksums were compared.
    """

    root: Path
    problems: list[str]
    manifest: dict[str, Any] | None = None
    bundle_id: str | None = None
    policy: ExitPolicy | None = None
    config: Stage1ProConfig | None = None
    state: Mapping[str, torch.Tensor] | None = None


def inspect_bundle(directory: str | Path, expected_id: str | None = None) -> BundleInspection:
    """Verify the bundle at ``directory`` in one pass over its files; never raises for a bad bundle.

    Every file is opened once, without following links, and must be a regular file within its
    size cap (:mod:`stage1_core.bundle.files`); what is parsed is what was checksummed.
    """
    if not os.path.isdir(directory):
        return BundleInspection(Path(directory), [f"{directory}: not a directory"])
    try:
        files = BundleFiles(directory)
    except BundleFileError as exc:
        return BundleInspection(Path(directory), [str(exc)])
    with files:
        return _inspect(files, expected_id)


def _inspect(files: BundleFiles, expected_id: str | None) -> BundleInspection:
    root = files.root
    result = BundleInspection(root, [])
    try:
        raw = files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except BundleFileError as exc:
        result.problems.append(f"{MANIFEST_NAME}: {exc}" if not str(exc).startswith(MANIFEST_NAME) else str(exc))
        return result
    result.bundle_id = hashlib.sha256(raw).hexdigest()
    try:
        manifest = _parse_json(raw, str(root / MANIFEST_NAME))
    except ArtifactError as exc:
        result.problems.append(f"{MANIFEST_NAME}: {exc}")
        return result
    if not isinstance(manifest, dict):
        result.problems.append(f"{MANIFEST_NAME}: top level must be a JSON object, got {type(manifest).__name__}")
        return result
    result.manifest = manifest
    problems = result.problems
    problems.extend(f"{MANIFEST_NAME}: {p}" for p in schema_errors(manifest, "bundle"))

    # Pointers: relative, inside the directory.
    unsafe: set[str] = set()
    for json_path, value in manifest_pointers(manifest):
        why = pointer_problem(root, value)
        if why:
            problems.append(f"{MANIFEST_NAME}: {json_path}: {why}")
            if isinstance(value, str):
                unsafe.add(value)

    # File set: exactly the declared files, each a regular file, exactly one policy file.
    sha = manifest.get("sha256") if isinstance(manifest.get("sha256"), Mapping) else {}
    declared = {k for k in sha if isinstance(k, str)}
    present, irregular, listing_problems = _bundle_files(files)
    problems.extend(listing_problems)
    for rel in sorted(declared - present - unsafe):
        if files.kind(rel) == "a directory":
            problems.append(f"{rel}: is a directory where {MANIFEST_NAME} ($.sha256) declares a file")
        else:
            problems.append(f"{rel}: listed in {MANIFEST_NAME} ($.sha256) but missing from the bundle")
    for rel in sorted(present - declared):
        problems.append(f"{rel}: unexpected file, not listed in {MANIFEST_NAME} ($.sha256); remove it or re-export")
    for json_path, value in manifest_pointers(manifest):
        if not json_path.startswith("$.sha256") and isinstance(value, str) and value not in unsafe and value not in declared:
            problems.append(f"{MANIFEST_NAME}: {json_path} names {value!r}, which has no entry in $.sha256")
    backbone_info = manifest.get("backbone") if isinstance(manifest.get("backbone"), Mapping) else {}
    carried = backbone_info.get("directory")
    streamed: set[str] = set()
    if isinstance(carried, str) and carried:
        inside = sorted(p for p in present | declared if p.startswith(carried.rstrip("/") + "/"))
        allowed = {f"{carried}/{name}" for name in BUNDLED_BACKBONE_FILES}
        streamed = allowed
        for rel in inside:
            if rel not in allowed:
                problems.append(f"{rel}: a bundled backbone holds exactly {list(BUNDLED_BACKBONE_FILES)} "
                                f"(safetensors weights only); refusing other files")
    policy_files = sorted(p for p in present | declared if PurePosixPath(p).name in POLICY_FILE_NAMES)
    if len(policy_files) > 1:
        problems.append(
            f"bundle holds {len(policy_files)} policy files ({', '.join(policy_files)}): exactly one is "
            f"allowed, the one named by $.policy_file"
        )
    active, policy_name = manifest.get("active_exit_policy"), manifest.get("policy_file")
    if isinstance(active, str) and isinstance(policy_name, str):
        try:
            expected = policy_class(active).policy_file
        except ValueError as exc:
            problems.append(f"{MANIFEST_NAME}: $.active_exit_policy: {exc}")
        else:
            if expected != policy_name:
                problems.append(
                    f"{MANIFEST_NAME}: $.policy_file is {policy_name!r} but policy {active!r} is stored in {expected!r}"
                )

    # Checksums, each file read once through the bundle's descriptor.
    readable: set[str] = set()
    contents: dict[str, bytes] = {}
    for rel in sorted(declared & present - unsafe - irregular):
        try:
            if rel in streamed:
                digest = files.sha256(rel, MAX_BACKBONE_FILE_BYTES)
            else:
                contents[rel] = files.read(rel, MAX_FILE_BYTES)
                digest = hashlib.sha256(contents[rel]).hexdigest()
        except BundleFileError as exc:
            problems.append(str(exc))
            continue
        if digest != sha[rel]:
            problems.append(
                f"{rel}: sha256 {digest} does not match {sha[rel]!r} recorded in {MANIFEST_NAME}: "
                f"the file was changed after export"
            )
        readable.add(rel)

    # Content of the files the manifest points at, parsed from the bytes just read.
    with BundleFiles.snapshot({rel: contents[rel] for rel in readable if rel in contents}) as snap:
        problems.extend(_content_problems(result, snap, manifest, readable & set(contents)))
        problems.extend(_lineage_problems(snap, manifest, readable & set(contents), result.state))
    if expected_id is not None and result.bundle_id != expected_id:
        problems.append(
            f"{MANIFEST_NAME}: bundle id {result.bundle_id} is not the expected {expected_id}: bundle.json was edited "
            f"or this is another bundle"
        )
    return result


def _content_problems(result: BundleInspection, snap: Path, manifest: Mapping[str, Any], readable: set[str]) -> list[str]:
    """Problems of the policy, config, splits, metrics and weights, read from the snapshot ``snap``."""
    problems: list[str] = []

    def here(text: str) -> str:  # messages name the bundle, not the private snapshot
        return text.replace(str(snap), str(result.root))

    def target(value: Any) -> Path | None:
        return snap / value if isinstance(value, str) and value in readable else None

    active, policy_name = manifest.get("active_exit_policy"), manifest.get("policy_file")
    if (path := target(policy_name)) is not None and isinstance(active, str):
        try:
            result.policy = load_policy(active, path)
        except (ArtifactError, ValueError, TypeError, KeyError, RecursionError, OSError) as exc:
            problems.append(here(f"{policy_name}: {exc}"))
        else:
            if hasattr(result.policy, "source_dir"):
                result.policy.source_dir = result.root
    files = manifest.get("files") if isinstance(manifest.get("files"), Mapping) else {}
    config_phase = None
    if (path := target(files.get("config"))) is not None:
        try:
            result.config = Stage1ProConfig.load(path)
            config_phase = result.config.phase
        except (ArtifactError, ConfigError, ValueError, RecursionError) as exc:
            problems.append(here(f"{files['config']}: {exc}"))
    problems.extend(f"{MANIFEST_NAME}: {p}" for p in phase_problems(manifest.get("phase"), active, config_phase))
    if (path := target(files.get("splits"))) is not None:
        try:
            read_json(path, schema="splits")
        except ArtifactError as exc:
            problems.append(here(f"{files['splits']}: {exc}"))
    if (path := target(files.get("metrics"))) is not None:
        problems.extend(_metrics_problems(path, files["metrics"]))
    if (path := target(manifest.get("model_file"))) is not None:
        rel = manifest["model_file"]
        state, weight_problems = _load_weights(path.read_bytes(), rel)
        weight_problems += _head_fits(state, rel, manifest.get("head")) if state is not None else []
        problems.extend(weight_problems)
        result.state = state if not weight_problems else None

    backbone, head = manifest.get("backbone"), manifest.get("head")
    if isinstance(backbone, Mapping) and isinstance(head, Mapping):
        if backbone.get("hidden_size") != head.get("hidden_size"):
            problems.append(
                f"{MANIFEST_NAME}: $.head.hidden_size={head.get('hidden_size')!r} differs from "
                f"$.backbone.hidden_size={backbone.get('hidden_size')!r}"
            )
    if isinstance(backbone, Mapping) and isinstance(backbone.get("transform"), str):
        try:
            eval_transform_from_description(backbone["transform"])
        except ValueError as exc:
            problems.append(f"{MANIFEST_NAME}: $.backbone.transform: {exc}")
    return problems


def verify_bundle(directory: str | Path, expected_id: str | None = None) -> list[str]:
    """Every problem of the bundle at ``directory`` (an empty list when it is valid)."""
    return inspect_bundle(directory, expected_id).problems


def _is_published_version(root: Path) -> bool:
    """Whether ``root`` is ``.../versions/<bundle id>``, a version ``publish()`` may later remove."""
    return root.parent.name == "versions" and re.fullmatch(r"[0-9a-f]{64}", root.name) is not None


# ----- loading ---------------------------------------------------------------------------


def default_artifacts_root() -> Path:
    """Where a builtin backbone is written when no artifacts root is given (a per-user cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stage1-pro"


class Stage1Bundle:
    """A verified deploy bundle: its manifest, policy, config and predictor.

    The backbone is loaded on the first image prediction (deciding on cached features does not
    need it); it must have the fingerprint recorded in ``bundle.json``.
    """

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        policy: ExitPolicy,
        config: Stage1ProConfig,
        head: Stage1Head,
        artifacts_root: Path | None,
        device: str | torch.device,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.policy = policy
        self.config = config
        self.head = head
        self.artifacts_root = artifacts_root
        self.predictor = Stage1Predictor(head, policy, device=device, served=_served_spec(directory, manifest))
        #: sha256 of the bundle.json that was verified and loaded (set by :meth:`load`).
        self.bundle_id: str | None = None
        #: The shared lock on a published version, held while the version may still be read.
        self._hold = contextlib.ExitStack()

    @classmethod
    def load(
        cls, directory: str | Path, artifacts_root: str | Path | None = None, device: str | torch.device = "cpu",
        expected_id: str | None = None,
    ) -> "Stage1Bundle":
        """Verify the bundle at ``directory`` and load it; raise :class:`BundleError` listing every problem.

        ``directory`` is resolved once (a ``bundle`` link is followed once): the id check
        (``expected_id``: refuse any bundle but this one), the checks and the loading all read that
        one version, from the same bytes.
        """
        for _ in range(3):
            root = Path(os.path.realpath(directory))
            hold = contextlib.ExitStack()
            try:
                if _is_published_version(root):
                    hold.enter_context(version_hold(root))
                found = inspect_bundle(root, expected_id)
            except VersionGoneError:
                hold.close()
                continue  # a newer publish removed the version between resolving and holding: resolve again
            except BaseException:
                hold.close()
                raise
            break
        else:
            raise BundleError([f"{directory}: the bundle it names kept being replaced; try again"], directory)
        try:
            if found.problems:
                raise BundleError(found.problems, directory)
            manifest, info = found.manifest, found.manifest["head"]
            head = Stage1Head(info["hidden_size"], info["dropout"], info["with_gate"])
            load_head_state_dict(head, found.state, source=found.root / manifest["model_file"])
            head.eval()
        except BaseException:
            hold.close()
            raise
        bundle = cls(found.root, manifest, found.policy, found.config, head,
                     None if artifacts_root is None else Path(artifacts_root), device)
        bundle.bundle_id = found.bundle_id
        if manifest["backbone"].get("directory"):
            bundle._hold = hold  # the carried backbone is read later, from this version: keep it
        else:
            hold.close()  # everything this bundle needs is in memory now
        return bundle

    def close(self) -> None:
        """Release the hold on the bundle's version (a newer publish may then remove it)."""
        self._hold.close()

    def __enter__(self) -> "Stage1Bundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backbone_loaded(self) -> bool:
        return self.predictor.backbone is not None

    def load_backbone(self) -> DINOv3Backbone:
        """Resolve and load the recorded backbone (once); refuse one with another fingerprint."""
        if self.predictor.backbone is not None:
            return self.predictor.backbone
        info = self.manifest["backbone"]
        model_path = info["model_path"]
        root = self.artifacts_root
        if info.get("directory"):
            # The adapted backbone travels with the bundle (its files are checksummed above).
            model_path = str(self.directory / info["directory"])
        elif root is None and model_path.startswith(BUILTIN_PREFIX):
            root = default_artifacts_root()
        try:
            backbone = DINOv3Backbone.load(model_path, artifacts_root=root, device=self.predictor.device)
        except BackboneError as exc:
            raise BundleError([f"backbone {model_path!r} recorded in {MANIFEST_NAME}: {exc}"], self.directory) from exc
        finally:
            self.close()  # nothing more is read from the bundle directory
        problems = []
        if backbone.hidden_size != info["hidden_size"]:
            problems.append(
                f"backbone {model_path!r} has hidden size {backbone.hidden_size}, bundle.json records {info['hidden_size']}"
            )
        found = backbone.fingerprint()
        if found != info["fingerprint"]:
            problems.append(
                f"backbone {model_path!r} (loaded from {backbone.source}) has fingerprint {found}, but the "
                f"head in this bundle was trained on features of {info['fingerprint']}: its decisions would be "
                f"meaningless. Point the bundle at the backbone it was exported with."
            )
        if problems:
            raise BundleError(problems, self.directory)
        self.predictor.transform = eval_transform_from_description(info["transform"])
        self.predictor.backbone = backbone
        return backbone

    def decide_features(self, features: Any) -> Decisions:
        """Decisions for CLS features ``[N, hidden]`` (no backbone needed)."""
        return self.predictor.decide_features(features)

    def predict_proba_from_features(self, features: Any) -> np.ndarray:
        """Softmax probabilities ``[N, 2]`` for CLS features."""
        return self.predictor.predict_proba_from_features(features)

    @property
    def transductive(self) -> bool:
        """True when the policy recomputes its thresholds from each batch (SCRC-T): predict with transductive=True."""
        return getattr(self.policy, "variant", None) == "SCRC-T"

    def check_transductive(self, n_images: int, transductive: bool) -> None:
        """Refuse a call that does not match the policy: SCRC-T needs ``transductive=True`` and a large enough batch."""
        if self.transductive and not transductive:
            raise ValueError(
                f"{self.directory}: this bundle's policy is SCRC-T, whose thresholds are recomputed from the batch it "
                f"decides; predict the images together with transductive=True (stage1 predict --transductive), at "
                f"least {self.policy.min_batch} at once"
            )
        if transductive and not self.transductive:
            raise ValueError(
                f"{self.directory}: transductive prediction needs an SCRC-T policy; this bundle's policy "
                f"({self.manifest['active_exit_policy']}) decides each image on its own - drop transductive"
            )
        if transductive and n_images < self.policy.min_batch:
            raise ValueError(
                f"{self.directory}: SCRC-T recomputes its thresholds from the batch and needs at least "
                f"{self.policy.min_batch} images together, got {n_images}; predict a larger batch at once"
            )

    def predict(self, images: Sequence[ImageInput], batch_size: int | None = None,
                transductive: bool = False) -> list[dict[str, Any]]:
        """Per image: ``{"exit", "label" (None when deferred), "p_roadwork", "prediction_set"}``.

        ``transductive=True`` (required by, and only allowed for, an SCRC-T policy) decides all
        ``images`` as one batch, from which the policy recomputes its thresholds; a batch smaller
        than the policy's minimum is refused. ``batch_size`` only bounds the backbone's forward passes.
        """
        images = list(images)
        self.check_transductive(len(images), transductive)
        self.load_backbone()
        size = batch_size if batch_size is not None else self.config.max_batch_size
        return self.predictor.predict(images, batch_size=size)

    def __repr__(self) -> str:
        return (
            f"Stage1Bundle({str(self.directory)!r}, phase={self.manifest['phase']}, "
            f"policy={self.policy!r})"
        )


def format_prediction(path: str | Path, result: Mapping[str, Any], as_json: bool = False) -> str:
    """One line for ``stage1 predict``: human-readable, or one JSON object with the image path."""
    if as_json:
        return json.dumps({"image": str(path), **dict(result)}, sort_keys=False)
    prediction_set = "{" + ", ".join(str(v) for v in result["prediction_set"]) + "}"
    p = float(result["p_roadwork"])
    if result["exit"]:
        name = "roadwork" if result["label"] == 1 else "no roadwork"
        verdict = f"exit   label={result['label']} ({name})"
    else:
        verdict = "defer  to Stage 2"
    return f"{path}: {verdict}  p_roadwork={p:.4f}  prediction_set={prediction_set}"
