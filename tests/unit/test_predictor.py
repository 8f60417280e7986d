"""Stage1Predictor: the same head + policy path for cached features and for images.

The helpers and fixtures here (a tiny Hugging Face DINOv3 directory, small images, a seeded head,
a schema-valid thresholds document) are reused by the bundle tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stage1_core.bundle.predictor import Stage1Predictor
from stage1_core.calibration.threshold_sweep import certify_softmax_threshold, thresholds_document
from stage1_core.data.transforms import build_eval_transform
from stage1_core.model.head import Stage1Head
from stage1_core.policies import Decisions, ExitPolicy, SoftmaxExitPolicy

HIDDEN = 32
IMAGE_SIZE = 32
TINY_CONFIG = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=8,
    num_register_tokens=4,
    image_size=IMAGE_SIZE,
)


def make_head(hidden: int = HIDDEN, seed: int = 0, scale: float = 40.0, with_gate: bool = False, dropout: float = 0.3) -> Stage1Head:
    """A seeded head whose class logits are spread out (so some samples exit and some defer)."""
    torch.manual_seed(seed)
    head = Stage1Head(hidden, dropout=dropout, with_gate=with_gate)
    with torch.no_grad():
        head.cls.weight.mul_(scale)
    return head.eval()


def make_features(n: int = 64, hidden: int = HIDDEN, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, hidden)).astype(np.float32)


def max_probs(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """Reference computation, independent of the predictor: eval-mode head, float64 softmax, max."""
    head.eval()
    with torch.no_grad():
        logits = head(torch.as_tensor(features)).double()
    return torch.softmax(logits, dim=1).max(dim=1).values.numpy()


def median_threshold(head: torch.nn.Module, features: np.ndarray) -> float:
    """A threshold splitting these features' max probabilities in half (test data, not a default)."""
    return float(np.median(max_probs(head, features)))


def thresholds_doc(exit_threshold: float, seed: int = 0) -> dict[str, Any]:
    """A schema-valid, certified thresholds.json built by the real certification code, with the
    threshold then set to ``exit_threshold`` (what a policy decides with)."""
    rng = np.random.default_rng(seed)
    n = 800
    y = (rng.random(n) < 0.8).astype(int)
    # Rounded to 2 decimals: few distinct values keep the sweep (and schema validation) short.
    conf = np.round(np.where(rng.random(n) < 0.85, rng.uniform(0.9, 1.0, n), rng.uniform(0.5, 0.9, n)), 2)
    p1 = np.where(y == 1, conf, 1 - conf)
    result = certify_softmax_threshold(np.stack([1 - p1, p1], axis=1), y, target_fnr=0.02, delta=0.05)
    assert result.certified, "fixture calibration data must certify"
    doc = thresholds_document(result, {"n": n}, checkpoint_id="ckpt-test", deploy_prior=0.5, coverage_at_deploy_prior=result.coverage)
    doc["exit_threshold"] = float(exit_threshold)
    return doc


def save_tiny_backbone(directory) -> None:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DINOv3ViTModel(DINOv3ViTConfig(**TINY_CONFIG))
    model.save_pretrained(directory)


def draw_images(directory) -> list:
    """Two small real image files: a road with an orange cone (JPEG) and an empty road (PNG)."""
    directory.mkdir(parents=True, exist_ok=True)
    cone = Image.new("RGB", (48, 40), (120, 160, 210))
    draw = ImageDraw.Draw(cone)
    draw.rectangle((0, 22, 48, 40), fill=(70, 70, 75))
    draw.polygon([(20, 36), (28, 36), (24, 18)], fill=(250, 120, 20))
    road = Image.new("RGB", (40, 48), (130, 170, 220))
    ImageDraw.Draw(road).rectangle((0, 26, 40, 48), fill=(80, 80, 80))
    paths = [directory / "cone.jpg", directory / "road.png"]
    cone.save(paths[0], quality=90)
    road.save(paths[1])
    return paths


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-dinov3")
    save_tiny_backbone(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_backbone(tiny_backbone_dir):
    from stage1_core.model.backbone import DINOv3Backbone

    return DINOv3Backbone.load(tiny_backbone_dir)


@pytest.fixture(scope="session")
def image_paths(tmp_path_factory):
    return draw_images(tmp_path_factory.mktemp("images"))


def eval_transform():
    return build_eval_transform(image_size=IMAGE_SIZE, resize=IMAGE_SIZE + 4)


# ----- features ----------------------------------------------------------------------------


def test_decide_features_is_softmax_then_policy_threshold():
    head, features = make_head(), make_features()
    t = median_threshold(head, features)
    predictor = Stage1Predictor(head, SoftmaxExitPolicy(t))
    decisions = predictor.decide_features(features)

    assert isinstance(decisions, Decisions)
    np.testing.assert_array_equal(decisions.exit, max_probs(head, features) >= t)
    assert 0 < decisions.exit.sum() < len(features)
    with torch.no_grad():
        expected_p1 = torch.softmax(head(torch.as_tensor(features)).double(), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(decisions.p_roadwork, expected_p1, rtol=1e-6, atol=1e-7)
    for exited, label, pset in zip(decisions.exit, decisions.label, decisions.prediction_sets):
        assert tuple(pset) == ((int(label),) if exited else (0, 1))


def test_threshold_comes_only_from_the_policy():
    head, features = make_head(), make_features()
    probs = max_probs(head, features)
    low, high = np.quantile(probs, [0.25, 0.75])
    exits_low = Stage1Predictor(head, SoftmaxExitPolicy(float(low))).decide_features(features).exit
    exits_high = Stage1Predictor(head, SoftmaxExitPolicy(float(high))).decide_features(features).exit
    assert exits_low.sum() > exits_high.sum()
    assert not Stage1Predictor(head, SoftmaxExitPolicy(None)).decide_features(features).exit.any()


def test_head_runs_in_eval_mode_and_mode_is_restored():
    head, features = make_head(dropout=0.9), make_features()
    reference = max_probs(head, features)
    head.train()
    predictor = Stage1Predictor(head, SoftmaxExitPolicy(None))
    first = predictor.predict_proba_from_features(features)
    second = predictor.predict_proba_from_features(features)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first.max(axis=1), reference, rtol=1e-6)
    assert head.training


def test_logits_match_head_and_accept_tensors():
    head, features = make_head(), make_features(n=5)
    predictor = Stage1Predictor(head, SoftmaxExitPolicy(None))
    with torch.no_grad():
        expected = head(torch.as_tensor(features)).numpy()
    np.testing.assert_allclose(predictor.predict_logits_from_features(features), expected, rtol=1e-6)
    np.testing.assert_allclose(predictor.predict_logits_from_features(torch.as_tensor(features)), expected, rtol=1e-6)
    assert predictor.predict_logits_from_features(np.zeros((0, HIDDEN), np.float32)).shape == (0, 2)


def test_wrong_feature_shape_is_refused_with_the_dimensions():
    predictor = Stage1Predictor(make_head(), SoftmaxExitPolicy(None))
    with pytest.raises(ValueError, match="48 dimensions but the head expects 32"):
        predictor.decide_features(np.zeros((3, 48), np.float32))
    with pytest.raises(ValueError, match=r"shape \[N, hidden\]"):
        predictor.decide_features(np.zeros(HIDDEN, np.float32))


class _RecordingPolicy(ExitPolicy):
    """Exits where the gate score is positive; records what it was given."""

    name = "recording"
    policy_file = "recording.json"
    schema = "thresholds"

    def __init__(self):
        self.seen: list[Any] = []

    @classmethod
    def from_dict(cls, data):
        return cls()

    def to_dict(self):
        return {"policy": self.name}

    def exit_mask(self, probs, gate_scores=None):
        self.seen.append(gate_scores)
        if gate_scores is None:
            return np.zeros(len(probs), dtype=bool)
        return np.asarray(gate_scores) > 0


def test_gate_logits_reach_the_policy():
    head, features = make_head(with_gate=True), make_features()
    policy = _RecordingPolicy()
    decisions = Stage1Predictor(head, policy).decide_features(features)
    with torch.no_grad():
        gate = head(torch.as_tensor(features)).gate.numpy()
    np.testing.assert_allclose(policy.seen[0], gate, rtol=1e-6)
    np.testing.assert_array_equal(decisions.exit, gate > 0)


def test_gate_free_head_gives_policy_no_gate_scores():
    policy = _RecordingPolicy()
    Stage1Predictor(make_head(), policy).decide_features(make_features(n=4))
    assert policy.seen == [None]


# ----- images ------------------------------------------------------------------------------


def test_predict_on_images_returns_documented_records(tiny_backbone, image_paths):
    head = make_head()
    transform = eval_transform()
    features = tiny_backbone.extract(torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths]))
    # Threshold between the two images' max probabilities: one exits, one defers.
    t = float(max_probs(head, features.numpy()).mean())
    predictor = Stage1Predictor(head, SoftmaxExitPolicy(t), backbone=tiny_backbone, transform=transform)

    records = predictor.predict([image_paths[0], Image.open(image_paths[1])], batch_size=1)

    assert len(records) == 2
    expected = predictor.decide_features(features)
    for record, exited, label, p1 in zip(records, expected.exit, expected.label, expected.p_roadwork):
        assert set(record) == {"exit", "label", "p_roadwork", "prediction_set"}
        assert isinstance(record["exit"], bool) and isinstance(record["p_roadwork"], float)
        assert record["exit"] == bool(exited)
        assert record["p_roadwork"] == pytest.approx(float(p1), rel=1e-5)
        if record["exit"]:
            assert record["label"] == int(label) and record["prediction_set"] == [int(label)]
        else:
            assert record["label"] is None and record["prediction_set"] == [0, 1]
    assert sorted(r["exit"] for r in records) == [False, True]


def test_predict_needs_backbone_and_names_bad_files(tiny_backbone, tmp_path):
    head = make_head()
    with pytest.raises(ValueError, match="no backbone/transform"):
        Stage1Predictor(head, SoftmaxExitPolicy(None)).predict([Image.new("RGB", (8, 8))])
    predictor = Stage1Predictor(head, SoftmaxExitPolicy(None), backbone=tiny_backbone, transform=eval_transform())
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        predictor.predict([tmp_path / "missing.jpg"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg: cannot read the image"):
        predictor.predict([broken])
    assert predictor.predict([]) == []


def _many_images(directory, n: int = 7) -> list:
    rng = np.random.default_rng(3)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        path = directory / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=85)
        paths.append(path)
    return paths


def test_batched_parallel_path_equals_the_per_image_transform(tiny_backbone, tmp_path):
    paths = _many_images(tmp_path)
    transform = eval_transform()
    reference = tiny_backbone.extract(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    predictor = Stage1Predictor(make_head(), SoftmaxExitPolicy(None), backbone=tiny_backbone, transform=transform)
    for batch_size, workers in ((3, 0), (3, 2), (64, 4)):
        features = predictor.extract_features(paths, batch_size=batch_size, num_workers=workers)
        assert torch.allclose(features, reference, atol=1e-5), (batch_size, workers)
    # A transform without the split path (any callable) still works image by image.
    generic = Stage1Predictor(make_head(), SoftmaxExitPolicy(None), backbone=tiny_backbone,
                              transform=lambda image: transform(image))
    assert torch.allclose(generic.extract_features(paths, batch_size=4), reference, atol=1e-5)


def test_iter_predict_streams_in_order_and_reports_unreadable_images(tiny_backbone, tmp_path):
    paths = _many_images(tmp_path, n=5)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    inputs = [paths[0], broken, paths[1], tmp_path / "missing.png", *paths[2:]]
    predictor = Stage1Predictor(make_head(), SoftmaxExitPolicy(None), backbone=tiny_backbone, transform=eval_transform())
    expected = predictor.predict(paths, batch_size=2)
    streamed = list(predictor.iter_predict(iter(inputs), batch_size=2, num_workers=2))
    assert [position for position, _ in streamed] == list(range(len(inputs)))
    assert isinstance(streamed[1][1], ValueError) and "broken.jpg" in str(streamed[1][1])
    assert isinstance(streamed[3][1], FileNotFoundError) and "missing.png" in str(streamed[3][1])
    decided = [record for _, record in streamed if isinstance(record, dict)]
    assert len(decided) == len(expected)
    for got, want in zip(decided, expected):
        assert got["exit"] == want["exit"] and got["p_roadwork"] == pytest.approx(want["p_roadwork"], abs=1e-6)
