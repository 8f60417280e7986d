"""Fuzzing the bundle loader: ``verify_bundle``, ``Stage1Bundle.load`` and ``stage1 bundle verify``.

Every example mutates a copy of one small real bundle (its manifest, policy file, weights, other
files, or its file set and names) and must end in one of two ways:

* refused: ``verify_bundle`` lists problems (non-empty strings), ``Stage1Bundle.load`` raises
  :class:`BundleError` with the same problems and ``stage1 bundle verify`` exits 1;
* accepted: the bundle loads and ``stage1 bundle verify`` exits 0, and its decisions on fixed
  features are byte-identical to the original's - or, when a tamperer re-sealed an edit so that
  the checksums match again, ``verify_bundle(dir, expected_id=<original id>)`` refuses it.

Any other exception is a bug. Each test asserts how many examples ran and prints its counts
(``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage1_core import cli
from stage1_core.artifacts import sha256_file, write_json
from stage1_core.bundle import BundleError, Stage1Bundle, export_bundle, verify_bundle
from stage1_core.bundle.load import bundle_id, state_dict_digest
from stage1_core.config import Stage1ProConfig

from tests.unit.test_bundle_export import HEADLINE, fake_backbone_info, splits_doc
from tests.unit.test_predictor import HIDDEN, make_features, make_head, median_threshold, thresholds_doc

pytestmark = pytest.mark.timeout(300)

CHECKPOINT_ID = "c" * 64
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

#: Examples per strategy; the total is asserted to be at least 2000.
EXAMPLES = {
    "manifest_values": 450,
    "manifest_bytes": 150,
    "policy_values": 400,
    "other_files": 300,
    "weights": 300,
    "file_set": 400,
}
OUTCOMES = ("refused", "accepted_identical", "changed_refused_by_id")


# ----- the original bundle ------------------------------------------------------------------


class Original:
    """One exported bundle, the fixed features and the decisions it must keep making."""

    def __init__(self, root: Path) -> None:
        head = make_head()
        self.features = make_features()
        src = root / "src"
        src.mkdir()
        torch.save(head.state_dict(), src / "head.pth")
        doc = thresholds_doc(median_threshold(head, self.features))
        doc["checkpoint_id"] = CHECKPOINT_ID
        # A short sweep table keeps schema validation (run several times per example) cheap.
        doc["sweep_results"], doc["grid_results"] = doc["sweep_results"][:3], doc["grid_results"][:2]
        write_json(src / "thresholds.json", doc, schema="thresholds")
        write_json(src / "splits.json", splits_doc(), schema="splits")
        (src / "metrics.csv").write_text("metric,value,n\naccuracy,0.931,400\n")
        info = fake_backbone_info()
        self.bundle = export_bundle(
            root / "bundle",
            phase=1,
            head_state_dict_path=src / "head.pth",
            policy_name="softmax",
            policy_file_path=src / "thresholds.json",
            config=Stage1ProConfig(data_source="synthetic", model_path=info["model_path"]),
            splits_path=src / "splits.json",
            metrics_csv_path=src / "metrics.csv",
            backbone_info=info,
            head_info={"hidden_size": HIDDEN, "dropout": 0.3, "with_gate": False},
            headline=HEADLINE,
            dagster_run_id="run-fuzz",
            lineage={
                "chain": {"checkpoint": "a" * 24},
                "checkpoint_id": CHECKPOINT_ID,
                "backbone_fingerprint": info["fingerprint"],
                "policy_id": "b" * 24,
                "evaluation_id": "d" * 24,
            },
        )
        self.outside = root / "outside.txt"
        self.outside.write_text("not part of the bundle\n")
        assert verify_bundle(self.bundle) == []
        self.id = bundle_id(self.bundle)
        self.manifest = json.loads((self.bundle / "bundle.json").read_text())
        self.files = sorted(self.manifest["sha256"])
        self.decisions = self.decide(Stage1Bundle.load(self.bundle))
        self.state = torch.load(self.bundle / "model_best.pth", weights_only=True)
        self.state_digest = state_dict_digest(self.state)

    def decide(self, bundle: Stage1Bundle) -> tuple[bytes, bytes, bytes, str]:
        d = bundle.decide_features(self.features)
        return (
            np.asarray(d.exit).tobytes(),
            np.asarray(d.label).tobytes(),
            np.asarray(d.p_roadwork).tobytes(),
            json.dumps(d.prediction_sets),
        )


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    return Original(tmp_path_factory.mktemp("fuzz"))


@contextlib.contextmanager
def working_copy(original: Original):
    """A fresh copy of the bundle in its own temporary directory (removed afterwards)."""
    root = Path(tempfile.mkdtemp(prefix="bundle-fuzz-"))
    try:
        copy = root / "bundle"
        shutil.copytree(original.bundle, copy, symlinks=True)
        yield copy
    finally:
        shutil.rmtree(root, ignore_errors=True)


def reseal(bundle: Path) -> None:
    """Recompute the sha256 of every listed file that is a regular file (what a tamperer does)."""
    path = bundle / "bundle.json"
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), dict):
        return
    for name in list(manifest["sha256"]):
        target = bundle / name
        with contextlib.suppress(OSError, ValueError):
            if (target.is_file() and target.resolve().is_relative_to(bundle.resolve())
                    and target.stat().st_size < 1 << 30):  # a sparse 64 GiB file keeps its old checksum
                manifest["sha256"][name] = sha256_file(target)
    path.write_text(json.dumps(manifest, indent=2))


#: ``stage1 bundle verify`` runs on every CLI_EVERY-th example (it repeats the verification).
CLI_EVERY = 4


def check(original: Original, bundle: Path, with_cli: bool) -> str:
    """Apply the invariant to a mutated bundle; return the outcome's name.

    ``Stage1Bundle.load`` runs ``verify_bundle`` and raises :class:`BundleError` with its
    problems; with ``with_cli`` the command line verifies the same copy and must agree.
    """
    code, stdout, stderr = None, io.StringIO(), io.StringIO()
    if with_cli:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = cli.main(["bundle", "verify", str(bundle)])
    try:
        loaded = Stage1Bundle.load(bundle)
    except BundleError as exc:
        problems = exc.problems
        assert problems and all(isinstance(p, str) and p.strip() for p in problems), problems
        if with_cli:
            assert code == 1 and "INVALID bundle" in stderr.getvalue(), (code, stderr.getvalue())
            assert all(p in stderr.getvalue() for p in problems), (problems, stderr.getvalue())
        return "refused"
    assert verify_bundle(bundle) == []
    if with_cli:
        assert code == 0 and "valid bundle" in stdout.getvalue(), (code, stderr.getvalue())
    if original.decide(loaded) == original.decisions:
        return "accepted_identical"
    pinned = verify_bundle(bundle, expected_id=original.id)
    assert pinned, "a bundle whose decisions changed was accepted even with the original bundle id"
    assert any("bundle id" in p for p in pinned), pinned
    return "changed_refused_by_id"


def run_and_count(name: str, original: Original, mutate: Callable[..., None], strategy: st.SearchStrategy) -> Counter[str]:
    counts: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES[name], **FUZZ)
    @given(strategy)
    def fuzz(case: Any) -> None:
        with working_copy(original) as bundle:
            mutate(original, bundle, case)
            with_cli = sum(counts[k] for k in OUTCOMES) % CLI_EVERY == 0
            counts[check(original, bundle, with_cli)] += 1
            counts["cli"] += with_cli

    fuzz()
    print(f"\nbundle fuzz {name}: {dict(counts)} ({counts['cli']} also through stage1 bundle verify)")
    assert sum(counts[k] for k in OUTCOMES) >= 0.9 * EXAMPLES[name], counts
    assert counts["refused"] > 0, counts
    return counts


# ----- hostile values -----------------------------------------------------------------------

HOSTILE_STRINGS = [
    "", ".", "..", "../outside.txt", "../../etc/passwd", "/etc/passwd", "/tmp", "C:\\x", "a\\b", "a//b", "./config.json",
    "config.json/..", "sub/../config.json", "\x00", "\u202e", "thresholds.json", "gateparams.json", "model_best.pth",
    "bundle.json", "config.json", "builtin:tiny-dinov3", "builtin:other", "0" * 64, "f" * 64, "NaN", "1e309",
]
HOSTILE_NUMBERS = [
    0, -1, 1, 2, 6, 7, 2**31, 2**63, 10**30, 10**400, -(10**400), 0.5, 1.0, -0.0, 1e-320, 1e308,
    math.nan, math.inf, -math.inf,
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HOSTILE_NUMBERS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
huge_digits = st.just("1" + "0" * 5000)  # more digits than Python's int(str) limit


def json_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indices) in a JSON document, the root excluded."""
    out: list[tuple] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.append(prefix + (key,))
            out.extend(json_paths(value, prefix + (key,)))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out.append(prefix + (i,))
            out.extend(json_paths(value, prefix + (i,)))
    return out


edit = st.tuples(st.integers(min_value=0), st.sampled_from(["replace", "delete", "add_key", "wrap"]), values, st.text(max_size=8))
edits = st.lists(edit, min_size=1, max_size=3)


def apply_edits(doc: Any, chosen: list[tuple[int, str, Any, str]]) -> Any:
    """Apply JSON edits: replace a value, delete a key or item, add an extra key, wrap in a list."""
    for index, op, value, extra_key in chosen:
        paths = json_paths(doc)
        if not paths:
            return value
        path = paths[index % len(paths)]
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if op == "replace":
            parent[last] = value
        elif op == "delete":
            del parent[last]
        elif op == "wrap":
            parent[last] = [parent[last]]
        elif isinstance(parent, dict):
            parent[extra_key or "extra"] = value
        else:
            parent.append(value)
    return doc


def write_raw_json(path: Path, doc: Any, huge: str | None) -> None:
    text = json.dumps(doc, indent=2, allow_nan=True)
    if huge is not None:
        # Swap the first number for one with more digits than int() accepts.
        import re

        text = re.sub(r"(?<=: )-?\d+(\.\d+)?", huge, text, count=1)
    path.write_text(text)


# ----- mutations ----------------------------------------------------------------------------


def mutate_manifest_values(original: Original, bundle: Path, case: tuple) -> None:
    chosen, huge = case
    doc = json.loads((bundle / "bundle.json").read_text())
    write_raw_json(bundle / "bundle.json", apply_edits(doc, chosen), huge)


def mutate_bytes(path: Path, ops: list[tuple[str, int, int]]) -> None:
    data = bytearray(path.read_bytes())
    for op, pos, byte in ops:
        at = pos % max(len(data), 1)
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= 1 << (byte % 8)
        elif op == "set" and data:
            data[at] = byte
        elif op == "insert":
            data[at:at] = bytes([byte])
        elif op == "empty":
            data = bytearray()
        elif op == "deep":
            data = bytearray(b"[" * 100_000 + b"]" * 100_000)
    path.write_bytes(bytes(data))


byte_ops = st.lists(
    st.tuples(st.sampled_from(["truncate", "flip", "set", "insert", "empty", "deep"]), st.integers(min_value=0), st.integers(0, 255)),
    min_size=1,
    max_size=3,
)


def mutate_manifest_bytes(original: Original, bundle: Path, ops: list) -> None:
    mutate_bytes(bundle / "bundle.json", ops)


def mutate_policy(original: Original, bundle: Path, case: tuple) -> None:
    chosen, huge, threshold, sealed = case
    doc = json.loads((bundle / "thresholds.json").read_text())
    if threshold is not None:
        doc["exit_threshold"] = threshold
    else:
        doc = apply_edits(doc, chosen)
    write_raw_json(bundle / "thresholds.json", doc, huge)
    if sealed:
        reseal(bundle)


def mutate_other_file(original: Original, bundle: Path, case: tuple) -> None:
    name, chosen, raw, sealed = case
    path = bundle / name
    if name.endswith(".json") and raw is None:
        write_raw_json(path, apply_edits(json.loads(path.read_text()), chosen), None)
    else:
        mutate_bytes(path, raw or [("flip", 0, 1)])
    if sealed:
        reseal(bundle)


def hostile_state(original: Original, kind: str, value: Any) -> Any:
    state = {k: v.clone() for k, v in original.state.items()}
    first = sorted(state)[0]
    if kind == "nan":
        state[first].view(-1)[0] = float("nan")
    elif kind == "inf":
        state[first].view(-1)[0] = float("inf")
    elif kind == "scale":
        state[first].mul_(1.0001)
    elif kind == "wrong_shape":
        state[first] = torch.zeros(3, 3)
    elif kind == "extra_key":
        state["extra.weight"] = torch.zeros(1)
    elif kind == "missing_key":
        del state[first]
    elif kind == "non_tensor":
        state[first] = value
    elif kind == "not_a_dict":
        return [v for v in state.values()]
    elif kind == "double":
        state = {k: v.double() for k, v in state.items()}
    elif kind == "int_key":
        state[7] = torch.zeros(1)
    return state


def mutate_weights(original: Original, bundle: Path, case: tuple) -> None:
    kind, raw, value, sealed = case
    path = bundle / "model_best.pth"
    if kind == "bytes":
        mutate_bytes(path, raw)
    else:
        with contextlib.suppress(Exception):  # torch.save refusing a value is not the loader's business
            buffer = io.BytesIO()
            torch.save(hostile_state(original, kind, value), buffer)
            path.write_bytes(buffer.getvalue())
    if sealed:
        reseal(bundle)


HOSTILE_NAMES = [
    "extra.txt", ".hidden", "sub/extra.txt", "sub/thresholds.json", "gateparams.json", "scrcparams.json",
    "../outside-new.txt", "bundle.json.bak", "model_best.pth.tmp", "name with space.json", "\u00e9.json", "a" * 200,
]


def mutate_file_set(original: Original, bundle: Path, case: tuple) -> None:
    op, target, name, declare, sealed = case
    victim = bundle / original.files[target % len(original.files)]
    new = bundle / name
    manifest_path = bundle / "bundle.json"
    if op == "delete":
        victim.unlink()
    elif op == "add" and new.resolve().is_relative_to(bundle.parent.resolve()):
        new.parent.mkdir(parents=True, exist_ok=True)
        new.write_text(victim.read_text(errors="replace"))
    elif op == "rename":
        victim.rename(bundle / (victim.name + ".renamed"))
        name = victim.name + ".renamed"
    elif op == "symlink_outside":
        victim.unlink()
        victim.symlink_to(original.outside)
    elif op == "symlink_absolute":
        victim.unlink()
        victim.symlink_to("/etc/passwd")
    elif op == "symlink_inside":
        # The same bytes behind a link to a hidden file inside the bundle.
        copy = victim.read_bytes()
        victim.unlink()
        (bundle / ".real").write_bytes(copy)
        victim.symlink_to(".real")
    elif op == "symlink_to_copy":
        # The same bytes behind a link: the checksum still matches.
        copy = victim.read_bytes()
        victim.unlink()
        outside = bundle.parent / ("outside-" + victim.name)
        outside.write_bytes(copy)
        victim.symlink_to(outside)
    elif op == "dir_symlink":
        (bundle / "linked").symlink_to(bundle.parent, target_is_directory=True)
        name = "linked"
    elif op == "replace_with_dir":
        victim.unlink()
        victim.mkdir()
        (victim / "inner").write_text("x")
    elif op == "manifest_symlink":
        shutil.copy(manifest_path, bundle.parent / "manifest-copy.json")
        manifest_path.unlink()
        manifest_path.symlink_to(bundle.parent / "manifest-copy.json")
        return
    elif op == "remove_manifest":
        manifest_path.unlink()
        return
    if declare:
        manifest = json.loads(manifest_path.read_text())
        manifest["sha256"][name] = "0" * 64
        manifest_path.write_text(json.dumps(manifest, indent=2))
    if sealed:
        reseal(bundle)


# ----- tests --------------------------------------------------------------------------------


def test_manifest_value_mutations(original):
    run_and_count(
        "manifest_values", original, mutate_manifest_values, st.tuples(edits, st.one_of(st.none(), huge_digits))
    )


def test_manifest_byte_mutations(original):
    run_and_count("manifest_bytes", original, mutate_manifest_bytes, byte_ops)


def test_policy_file_mutations(original):
    counts = run_and_count(
        "policy_values",
        original,
        mutate_policy,
        st.tuples(
            edits,
            st.one_of(st.none(), huge_digits),
            st.one_of(st.none(), st.floats(0.5, 1.0)),
            st.booleans(),
        ),
    )
    assert counts["changed_refused_by_id"] > 0, "resealed threshold edits must change decisions (else the oracle is blind)"


def test_other_file_mutations(original):
    run_and_count(
        "other_files",
        original,
        mutate_other_file,
        st.tuples(
            st.sampled_from(["config.json", "splits.json", "metrics.csv", "README.md"]),
            edits,
            st.one_of(st.none(), byte_ops),
            st.booleans(),
        ),
    )


def test_weight_file_mutations(original):
    kinds = ["bytes", "nan", "inf", "scale", "wrong_shape", "extra_key", "missing_key", "non_tensor", "not_a_dict", "double", "int_key"]
    run_and_count(
        "weights",
        original,
        mutate_weights,
        st.tuples(st.sampled_from(kinds), byte_ops, scalars, st.booleans()),
    )


def test_file_set_and_name_mutations(original):
    ops = [
        "delete", "add", "rename", "symlink_outside", "symlink_absolute", "symlink_inside", "symlink_to_copy",
        "dir_symlink", "replace_with_dir", "manifest_symlink", "remove_manifest",
    ]
    run_and_count(
        "file_set",
        original,
        mutate_file_set,
        st.tuples(
            st.sampled_from(ops),
            st.integers(min_value=0, max_value=100),
            st.sampled_from(HOSTILE_NAMES),
            st.booleans(),
            st.booleans(),
        ),
    )


def test_examples_total_at_least_2000():
    assert sum(EXAMPLES.values()) >= 2000


# ----- hostile kinds: non-regular files, loops, oversized fields and files -------------------

#: Seconds one hostile example may take (verify, load and the CLI together) before it counts as a hang.
HOSTILE_DEADLINE_S = 20


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (interrupts a blocking open or read)."""
    import signal

    def expire(signum, frame):
        raise TimeoutError(f"hostile bundle example still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _replace(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _bind_socket(path: Path) -> None:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    finally:
        sock.close()


def _set_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    edit(manifest)
    (bundle / "bundle.json").write_text(json.dumps(manifest, indent=2))


def _huge_head(value: int) -> Callable[[Original, Path], None]:
    def mutate(original: Original, bundle: Path) -> None:
        def edit(manifest: dict) -> None:
            manifest["head"]["hidden_size"] = value
            manifest["backbone"]["hidden_size"] = value
        _set_manifest(bundle, edit)
    return mutate


def _file_kind(kind: str, rel: str) -> Callable[[Original, Path], None]:
    def mutate(original: Original, bundle: Path) -> None:
        path = bundle / rel
        if kind != "extra_fifo":
            _replace(path)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "extra_fifo":
            os.mkfifo(bundle / "extra.pipe")
        elif kind == "socket":
            _bind_socket(path)
        elif kind == "char_device":
            os.mknod(path, 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 5))  # /dev/zero
        elif kind == "link_dev_zero":
            path.symlink_to("/dev/zero")
        elif kind == "link_dev_urandom":
            path.symlink_to("/dev/urandom")
        elif kind == "directory":
            path.mkdir()
        elif kind == "symlink_loop":
            path.symlink_to(path.name + ".loop")
            (bundle / (rel + ".loop")).symlink_to(path.name)
        elif kind == "self_loop":
            path.symlink_to(path.name)
        elif kind == "sparse_huge":
            with open(path, "wb") as handle:
                handle.truncate(64 * 1024**3)  # a sparse 64 GiB file: no disk used, no byte to read
    return mutate


def _loop_dir(original: Original, bundle: Path) -> None:
    (bundle / "sub").symlink_to("sub")


def _manifest_padded(original: Original, bundle: Path) -> None:
    text = (bundle / "bundle.json").read_text()
    (bundle / "bundle.json").write_text(text + " " * (16 * 1024**2))


def _manifest_fifo(original: Original, bundle: Path) -> None:
    (bundle / "bundle.json").unlink()
    os.mkfifo(bundle / "bundle.json")


HOSTILE_FILE_KINDS = ("fifo", "socket", "char_device", "link_dev_zero", "link_dev_urandom", "directory",
                      "symlink_loop", "self_loop", "sparse_huge")
HOSTILE_FILES = ("model_best.pth", "thresholds.json", "config.json", "splits.json", "metrics.csv", "README.md")


def hostile_cases() -> list[tuple[str, Callable[[Original, Path], None]]]:
    cases = [(f"{kind}:{rel}", _file_kind(kind, rel)) for kind in HOSTILE_FILE_KINDS for rel in HOSTILE_FILES]
    cases += [("extra_fifo", _file_kind("extra_fifo", "")), ("dir_loop", _loop_dir),
              ("manifest_padded_16MiB", _manifest_padded), ("manifest_fifo", _manifest_fifo)]
    cases += [(f"hidden_size={v}", _huge_head(v)) for v in (0, 10**5, 10**7, 10**13, 2**63)]
    return cases


def test_hostile_kinds_refused_quickly_without_traceback(original):
    """Every hostile kind, plain and resealed, is refused within the deadline by verify, load and the CLIs."""
    counts: Counter[str] = Counter()
    for name, mutate in hostile_cases():
        for sealed in (False, True):
            with working_copy(original) as bundle, deadline(HOSTILE_DEADLINE_S):
                if sealed and name.startswith("manifest_"):
                    reseal(bundle)  # resealing rewrites bundle.json: it comes first for the manifest's own kinds
                mutate(original, bundle)
                if sealed and not name.startswith("manifest_"):
                    reseal(bundle)
                outcome = check(original, bundle, with_cli=True)
                assert outcome == "refused", (name, sealed, outcome)
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                    code = cli.main(["predict", "--bundle", str(bundle), "--no_progress", str(original.outside)])
                assert code == 2 and "invalid deploy bundle" in stderr.getvalue(), (name, code, stderr.getvalue())
                counts[outcome] += 1
    print(f"\nbundle hostile kinds: {len(hostile_cases())} kinds x 2 (plain, resealed): {dict(counts)}")
    assert counts["refused"] == 2 * len(hostile_cases())
