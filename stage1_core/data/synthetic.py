"""Deterministic synthetic road scenes in the NATIX layout (the embedded default data set).

Layout written under ``out_dir``::

    train/train_000000.jpg ...   train_labels.csv   (header ``image,label``, paths relative to train/)
    val/val_000000.jpg ...       val_labels.csv

Each image is a road in perspective (sky, horizon, road with lane marks, verges, buildings, trees,
cars, ordinary traffic signs). Roadwork scenes (label 1) add a work zone: traffic cones, barrels,
striped barriers, striped beacon boards and roadwork signs at varied depth, so their size follows
the perspective. Class balance follows NATIX (train ~80%, val ~90% roadwork) and image sizes vary
(256-400 px wide, landscape), so the evaluation resize is exercised.

Why it is hard, and in which ways (generator version 2). A frozen backbone meets roadwork photos
where the work zone is often small, far away, half hidden, at night or in bad weather, next to
things that share its colours. Each image draws :class:`Conditions` up front:

* visibility tier of a work zone (:data:`POSITIVE_TIERS`): ``clear`` (a large saturated zone near
  the camera, at least :data:`MIN_CLEAR_COVERAGE` of the evaluation crop), ``distant`` (a row of
  small items near the horizon), ``sparse`` (one sign, one barrier or a couple of cones),
  ``partial`` (a clear zone mostly hidden behind a lorry, hedge or wall) and ``tiny`` (a cone or
  two, or a sign, far down the road: at least :data:`MIN_TINY_COVERAGE` of the crop);
* lighting (:data:`LIGHTING`): day, dusk (warm cast) or night (dark scene, retroreflective items
  only dimly lit, sodium or LED street lamps, head- and tail-lights, amber warning lights on many
  work zones and on some service vehicles);
* weather (:data:`WEATHER`): rain (streaks, lower contrast, softer image) or fog (washes out
  whatever is far away - distant zones first);
* a foreground occluder (post, van, wiper) in :data:`OCCLUSION_RATE` of scenes.

No-roadwork scenes are ``plain`` or, for :data:`HARD_NEGATIVE_RATE` of them, ``hard``: orange
cars and service trucks, red and orange signs, plain obstacles (boxes, concrete barriers,
bollards), autumn trees, red-and-white chevron boards and barrier arms. :data:`DECOY_RATE` of
roadwork scenes hold one of those too, so an orange car is no shortcut. Lighting, weather and
occlusion are drawn with the same rates for both classes, so they never give the label away.
A small fraction of labels is flipped (:data:`DEFAULT_LABEL_NOISE`).

What this leaves for each phase: a frozen random backbone (its CLS token mostly carries colour
and texture statistics) separates clear zones from plain scenes with confidence, so those exit;
small, hidden, night and fog scenes and hard negatives land near the decision boundary, so they
are deferred. The ambiguity is structured - mostly roadwork that looks like a plain scene, and
hard negatives that look like roadwork - so a learned gate can be strict on "no roadwork" (the
FNR event) and lenient on "roadwork" where the symmetric max-softmax rule defers both; the small
items keep their shape and stripes, which a backbone adapted on the training images can learn.
``benchmarks/check_synthetic_learnability.py`` measures all of this on val_select and val_calib.

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so the output is
byte-identical for a given seed whatever the number of worker processes. :data:`GENERATOR_VERSION`
changes whenever the same seed draws different images; the pipeline regenerates a cached data
set made by another version.

Default size: ``n_val = 2400`` at 90% roadwork gives ~2160 positives; with the .33/.33/.34
hash split val_calib and val_test each hold ~713 and ~735 positives (standard deviation ~22),
comfortably above the 600 needed to certify a 2% FNR. ``n_train = 5000`` (~4000 positives,
~1000 negatives).
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

from stage1_core.artifacts import atomic_write_text

#: Bump whenever the same seed would draw different images (cached data sets are then regenerated).
GENERATOR_VERSION = 2
DEFAULT_N_TRAIN = 5000
DEFAULT_N_VAL = 2400
TRAIN_POSITIVE_RATE = 0.80
VAL_POSITIVE_RATE = 0.90
DEFAULT_LABEL_NOISE = 0.01
#: Visibility tier of a work zone and its share of roadwork scenes.
POSITIVE_TIERS: dict[str, float] = {"clear": 0.56, "distant": 0.14, "sparse": 0.14, "partial": 0.14, "tiny": 0.02}
#: Share of no-roadwork scenes holding a hard negative (the others are "plain").
HARD_NEGATIVE_RATE = 0.35
NEGATIVE_TIERS = ("plain", "hard")
#: Share of roadwork scenes that also hold a hard-negative object.
DECOY_RATE = 0.15
LIGHTING: dict[str, float] = {"day": 0.74, "dusk": 0.10, "night": 0.16}
WEATHER: dict[str, float] = {"clear": 0.76, "rain": 0.12, "fog": 0.12}
OCCLUSION_RATE = 0.15
#: A "clear" work zone covers at least this share of the evaluation crop.
MIN_CLEAR_COVERAGE = 0.25
#: Every other work zone keeps at least this share visible (small, never absent).
MIN_SMALL_COVERAGE = 0.10
#: A "tiny" zone (a cone or two, or a sign, far away) covers at least this share.
MIN_TINY_COVERAGE = 0.001
#: Visible share of a "partial" zone left beside its occluder.
PARTIAL_VISIBLE = (0.08, 0.16)
WIDTH_RANGE = (256, 400)
ASPECT_RANGE = (1.2, 1.6)
_SPLIT_CODES = {"train": 0, "val": 1}
_LUMA = np.array([0.299, 0.587, 0.114])

Color = tuple[int, int, int]
Box = tuple[float, float, float, float]
#: A light source to render at night: ``(x, y, radius, colour, strength)``.
Light = tuple[float, float, float, Color, float]


@dataclass(frozen=True)
class Conditions:
    """How one image is made hard: visibility tier, lighting, weather, foreground occluder.

    ``tier`` is one of :data:`POSITIVE_TIERS` for roadwork and ``"plain"`` or ``"hard"`` otherwise.
    """

    tier: str
    light: str
    weather: str
    occluded: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate_synthetic_dataset` wrote."""

    out_dir: Path
    seed: int
    n_train: int
    n_val: int
    train_positives: int
    val_positives: int
    train_flipped: tuple[str, ...]
    val_flipped: tuple[str, ...]
    seconds: float
    generator_version: int = GENERATOR_VERSION

    @property
    def train_dir(self) -> Path:
        return self.out_dir / "train"

    @property
    def val_dir(self) -> Path:
        return self.out_dir / "val"

    @property
    def train_labels_file(self) -> Path:
        return self.out_dir / "train_labels.csv"

    @property
    def val_labels_file(self) -> Path:
        return self.out_dir / "val_labels.csv"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (flipped labels as counts; the names are on the object)."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["train_flipped"] = len(self.train_flipped)
        data["val_flipped"] = len(self.val_flipped)
        return data


@dataclass(frozen=True)
class _Scene:
    width: int
    height: int
    horizon: float
    vanish_x: float
    road_half: float

    def ground(self, depth: float, lateral: float) -> tuple[float, float]:
        """Image position of a ground point: ``depth`` in (0, 1] (1 = bottom edge), ``lateral`` in road half-widths."""
        y = self.horizon + depth * (self.height - self.horizon)
        x = self.vanish_x + lateral * self.road_half * depth
        return x, y


def _jitter(rng: np.random.Generator, color: Color, amount: int) -> Color:
    offsets = rng.integers(-amount, amount + 1, size=len(color))
    return tuple(min(255, max(0, int(c) + int(o))) for c, o in zip(color, offsets))  # type: ignore[return-value]


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _roadwork_orange(rng: np.random.Generator) -> Color:
    return _jitter(rng, (255, int(rng.integers(90, 135)), 0), 12)


def _roadwork_red(rng: np.random.Generator) -> Color:
    return _jitter(rng, (225, 25, 30), 15)


def _white(rng: np.random.Generator) -> Color:
    return _jitter(rng, (245, 245, 245), 8)


def _draw_sky(img: Image.Image, scene: _Scene, rng: np.random.Generator) -> None:
    kind = rng.choice(["blue", "overcast", "haze", "dusk"], p=[0.5, 0.3, 0.17, 0.03])
    top, bottom = {
        "blue": ((60, 120, 200), (170, 200, 235)),
        "overcast": ((150, 155, 165), (200, 203, 208)),
        "haze": ((185, 190, 195), (225, 225, 220)),
        "dusk": ((70, 80, 130), (190, 175, 170)),
    }[str(kind)]
    top, bottom = _jitter(rng, top, 20), _jitter(rng, bottom, 20)
    # A vertical gradient, one rounded colour per row (as drawing row lines would give).
    h = max(1, int(scene.horizon))
    rows = min(h + 1, scene.height)
    t = (np.arange(rows) / h)[:, None]
    colors = np.rint(np.asarray(top, dtype=np.float64) + (np.asarray(bottom) - np.asarray(top)) * t).astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(colors[:, None, :], scene.width, axis=1), mode="RGB"), (0, 0))


def _draw_ground(img: Image.Image, scene: _Scene, rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(img)
    w, h, hz = scene.width, scene.height, scene.horizon
    verge = _jitter(rng, [(80, 120, 60), (110, 110, 100), (120, 118, 105), (95, 105, 70)][rng.integers(4)], 12)
    draw.rectangle([0, hz, w, h], fill=verge)
    asphalt = _jitter(rng, (int(rng.integers(60, 120)),) * 3, 6)
    left, right = scene.ground(1.0, -1.0), scene.ground(1.0, 1.0)
    far = scene.ground(0.0, 0.0)
    draw.polygon([(far[0] - 1, hz), (far[0] + 1, hz), (right[0], h), (left[0], h)], fill=asphalt)
    # Kerb / edge lines.
    edge = _jitter(rng, (215, 215, 210), 15)
    for side in (-1.0, 1.0):
        p0, p1 = scene.ground(0.02, side * 0.96), scene.ground(1.0, side * 0.96)
        draw.line([p0, p1], fill=edge, width=max(1, int(w * 0.006)))
    # Dashed centre / lane lines, dashes shrinking with depth.
    lane_color = _jitter(rng, (240, 240, 235), 10) if rng.random() < 0.85 else _jitter(rng, (235, 205, 60), 10)
    lanes = [0.0] if rng.random() < 0.6 else [-1 / 3, 1 / 3]
    phase = rng.random()
    for lateral in lanes:
        depth = 0.03 + 0.05 * phase
        while depth < 1.0:
            length = 0.09 * depth + 0.01
            d1 = min(1.0, depth + length)
            a, b = scene.ground(depth, lateral), scene.ground(d1, lateral)
            width = max(1, int(w * 0.012 * (depth + d1) / 2))
            draw.line([a, b], fill=lane_color, width=width)
            depth = d1 + length * 1.2


def _draw_building(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> None:
    w, hz = scene.width, scene.horizon
    x0 = rng.uniform(-0.1, 1.0) * w
    bw = rng.uniform(0.08, 0.3) * w
    bh = rng.uniform(0.1, 0.45) * hz
    palette = [(150, 140, 130), (180, 170, 150), (120, 110, 105), (200, 195, 185), (140, 90, 70), (170, 160, 190)]
    color = _jitter(rng, palette[rng.integers(len(palette))], 15)
    base = hz + rng.uniform(0, 0.03) * scene.height
    draw.rectangle([x0, base - bh, x0 + bw, base], fill=color)
    win = _jitter(rng, (70, 90, 110), 20)
    step = max(6.0, bw / rng.integers(3, 7))
    y = base - bh + step * 0.4
    while y < base - step * 0.6:
        x = x0 + step * 0.3
        while x < x0 + bw - step * 0.5:
            draw.rectangle([x, y, x + step * 0.45, y + step * 0.4], fill=win)
            x += step
        y += step * 0.9


def _draw_tree(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator, foliage: Color | None = None) -> None:
    depth = rng.uniform(0.05, 0.6)
    side = rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 3.5)
    x, y = scene.ground(depth, side)
    size = scene.height * (0.15 + 0.5 * depth)
    draw.rectangle([x - size * 0.05, y - size * 0.6, x + size * 0.05, y], fill=_jitter(rng, (90, 65, 45), 10))
    green = _jitter(rng, (50, 110, 50), 25) if foliage is None else foliage
    draw.ellipse([x - size * 0.3, y - size * 1.1, x + size * 0.3, y - size * 0.45], fill=green)


def _draw_car(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator, color: Color | None = None) -> None:
    depth = rng.uniform(0.15, 0.75)
    lateral = rng.choice([-0.55, 0.55, -1.5, 1.5]) + rng.uniform(-0.15, 0.15)
    x, y = scene.ground(depth, lateral)
    cw = scene.road_half * depth * rng.uniform(0.55, 0.8)
    ch = cw * rng.uniform(0.6, 0.85)
    if color is None:
        palette = [(30, 30, 35), (200, 200, 205), (150, 150, 155), (40, 60, 130), (130, 20, 25), (230, 230, 230), (60, 80, 60)]
        color = _jitter(rng, palette[rng.integers(len(palette))], 12)
    draw.rounded_rectangle([x - cw / 2, y - ch, x + cw / 2, y - ch * 0.15], radius=max(1, int(cw * 0.08)), fill=color)
    draw.rectangle([x - cw * 0.38, y - ch * 0.95, x + cw * 0.38, y - ch * 0.62], fill=_jitter(rng, (60, 70, 80), 15))
    wheel = (20, 20, 20)
    for wx in (x - cw * 0.3, x + cw * 0.3):
        draw.rectangle([wx - cw * 0.08, y - ch * 0.2, wx + cw * 0.08, y], fill=wheel)
    for lx in (x - cw * 0.38, x + cw * 0.38):
        draw.ellipse([lx - cw * 0.05, y - ch * 0.45, lx + cw * 0.05, y - ch * 0.35], fill=(230, 40, 30))


def _draw_pole_sign(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator, kind: str) -> None:
    depth = rng.uniform(0.25, 0.8)
    side = rng.choice([-1.0, 1.0]) * rng.uniform(1.1, 1.5)
    x, y = scene.ground(depth, side)
    size = scene.height * (0.05 + 0.15 * depth)
    top = y - size * 2.6
    draw.rectangle([x - size * 0.06, top, x + size * 0.06, y], fill=(120, 120, 125))
    cx, cy, r = x, top, size * 0.55
    if kind == "blue":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, (30, 80, 180), 15))
        draw.polygon([(cx - r * 0.4, cy + r * 0.3), (cx + r * 0.4, cy + r * 0.3), (cx, cy - r * 0.5)], fill=_white(rng))
    elif kind == "green":
        draw.rectangle([cx - r * 1.6, cy - r * 0.7, cx + r * 1.6, cy + r * 0.7], fill=_jitter(rng, (20, 110, 60), 15))
        draw.line([(cx - r * 1.2, cy), (cx + r * 1.2, cy)], fill=_white(rng), width=max(1, int(r * 0.2)))
    elif kind == "speed":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_roadwork_red(rng))
        draw.ellipse([cx - r * 0.75, cy - r * 0.75, cx + r * 0.75, cy + r * 0.75], fill=_white(rng))
        draw.text((cx - r * 0.4, cy - r * 0.35), str(int(rng.integers(3, 9)) * 10), fill=(20, 20, 20))
    elif kind == "stop":
        points = [(cx + r * math.cos(math.pi / 8 + k * math.pi / 4), cy + r * math.sin(math.pi / 8 + k * math.pi / 4)) for k in range(8)]
        draw.polygon(points, fill=_roadwork_red(rng))
        draw.line([(cx - r * 0.5, cy), (cx + r * 0.5, cy)], fill=_white(rng), width=max(1, int(r * 0.2)))
    elif kind == "orange_plain":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=_roadwork_orange(rng))
        draw.rectangle([cx - r * 0.6, cy - r * 0.1, cx + r * 0.6, cy + r * 0.1], fill=(25, 25, 25))
    elif kind == "give_way":
        draw.polygon([(cx - r, cy - r * 0.8), (cx + r, cy - r * 0.8), (cx, cy + r * 0.9)], fill=_roadwork_red(rng))
        draw.polygon([(cx - r * 0.6, cy - r * 0.55), (cx + r * 0.6, cy - r * 0.55), (cx, cy + r * 0.5)], fill=_white(rng))


def _draw_plain_obstacle(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> None:
    depth = rng.uniform(0.35, 0.9)
    lateral = rng.uniform(-1.2, 1.2)
    x, y = scene.ground(depth, lateral)
    size = scene.height * (0.05 + 0.18 * depth)
    palette = [(140, 140, 135), (110, 80, 50), (40, 100, 50), (90, 90, 100), (200, 120, 60)]
    color = _jitter(rng, palette[rng.integers(len(palette))], 12)
    if rng.random() < 0.5:
        draw.rectangle([x - size * 0.6, y - size * 0.7, x + size * 0.6, y], fill=color)
    else:
        draw.rounded_rectangle([x - size * 0.3, y - size, x + size * 0.3, y], radius=max(1, int(size * 0.1)), fill=color)


def _stripes(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], colors: tuple[Color, Color], n: int, diagonal: bool) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=colors[1])
    w = x1 - x0
    h = y1 - y0
    if not diagonal:
        step = h / n
        for k in range(0, n, 2):
            draw.rectangle([x0, y0 + k * step, x1, y0 + (k + 1) * step], fill=colors[0])
        return
    step = (w + h) / n
    for k in range(0, n + 2, 2):
        a = x0 + k * step - h
        poly = [(a, y1), (a + step, y1), (a + step + h, y0), (a + h, y0)]
        clipped = [(min(max(px, x0), x1), py) for px, py in poly]
        draw.polygon(clipped, fill=colors[0])


def _draw_cone(draw: ImageDraw.ImageDraw, x: float, y: float, size: float, rng: np.random.Generator) -> None:
    orange, white = _roadwork_orange(rng), _white(rng)
    base_w, top_w = size * 0.55, size * 0.1
    draw.rectangle([x - base_w * 0.7, y - size * 0.07, x + base_w * 0.7, y], fill=_mix(orange, (40, 20, 0), 0.3))
    draw.polygon([(x - base_w / 2, y - size * 0.07), (x + base_w / 2, y - size * 0.07), (x + top_w / 2, y - size), (x - top_w / 2, y - size)], fill=orange)
    for lo, hi in ((0.35, 0.5), (0.62, 0.74)):
        wl = base_w / 2 + (top_w / 2 - base_w / 2) * lo
        wh = base_w / 2 + (top_w / 2 - base_w / 2) * hi
        draw.polygon([(x - wl, y - size * lo), (x + wl, y - size * lo), (x + wh, y - size * hi), (x - wh, y - size * hi)], fill=white)


def _draw_barrel(draw: ImageDraw.ImageDraw, x: float, y: float, size: float, rng: np.random.Generator) -> None:
    w = size * 0.5
    _stripes(draw, (x - w / 2, y - size, x + w / 2, y), (_roadwork_orange(rng), _white(rng)), 5, diagonal=False)


def _draw_beacon(draw: ImageDraw.ImageDraw, x: float, y: float, size: float, rng: np.random.Generator) -> None:
    w = size * 0.36
    colors = (_roadwork_red(rng), _white(rng)) if rng.random() < 0.5 else (_roadwork_orange(rng), _white(rng))
    draw.rectangle([x - w * 0.6, y - size * 0.08, x + w * 0.6, y], fill=(30, 30, 30))
    _stripes(draw, (x - w / 2, y - size, x + w / 2, y - size * 0.08), colors, 6, diagonal=True)


def _draw_barrier(draw: ImageDraw.ImageDraw, x: float, y: float, size: float, rng: np.random.Generator) -> None:
    bw, bh = size * rng.uniform(1.1, 1.8), size * 0.28
    colors = (_roadwork_red(rng), _white(rng)) if rng.random() < 0.5 else (_roadwork_orange(rng), _white(rng))
    leg = _jitter(rng, (60, 60, 60), 10)
    for lx in (x - bw * 0.4, x + bw * 0.4):
        draw.rectangle([lx - size * 0.03, y - size * 0.75, lx + size * 0.03, y], fill=leg)
    _stripes(draw, (x - bw / 2, y - size * 0.8, x + bw / 2, y - size * 0.8 + bh), colors, 8, diagonal=True)
    if rng.random() < 0.5:
        _stripes(draw, (x - bw / 2, y - size * 0.4, x + bw / 2, y - size * 0.4 + bh * 0.8), colors, 8, diagonal=True)


def _draw_roadwork_sign(draw: ImageDraw.ImageDraw, x: float, y: float, size: float, rng: np.random.Generator) -> None:
    pole = (120, 120, 125)
    draw.rectangle([x - size * 0.03, y - size * 0.9, x + size * 0.03, y], fill=pole)
    cx, cy, r = x, y - size * 1.05, size * 0.42
    black = (20, 20, 20)
    if rng.random() < 0.5:  # European: red-bordered triangle, yellow or white field, worker glyph.
        draw.polygon([(cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8), (cx, cy - r)], fill=_roadwork_red(rng))
        field = _jitter(rng, (250, 205, 30), 10) if rng.random() < 0.5 else _white(rng)
        draw.polygon([(cx - r * 0.68, cy + r * 0.6), (cx + r * 0.68, cy + r * 0.6), (cx, cy - r * 0.55)], fill=field)
        glyph_y = cy + r * 0.2
    else:  # North-American: orange diamond with black border and worker glyph.
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=black)
        draw.polygon([(cx, cy - r * 0.88), (cx + r * 0.88, cy), (cx, cy + r * 0.88), (cx - r * 0.88, cy)], fill=_roadwork_orange(rng))
        glyph_y = cy + r * 0.1
    draw.ellipse([cx - r * 0.1, glyph_y - r * 0.42, cx + r * 0.06, glyph_y - r * 0.27], fill=black)
    draw.line([(cx - r * 0.02, glyph_y - r * 0.27), (cx - r * 0.1, glyph_y + r * 0.15)], fill=black, width=max(1, int(r * 0.1)))
    draw.line([(cx - r * 0.1, glyph_y + r * 0.15), (cx + r * 0.2, glyph_y + r * 0.3)], fill=black, width=max(1, int(r * 0.08)))
    draw.line([(cx - r * 0.05, glyph_y - r * 0.1), (cx + r * 0.3, glyph_y - r * 0.05)], fill=black, width=max(1, int(r * 0.08)))


_ROADWORK_ITEMS: dict[str, Callable[..., None]] = {
    "cone": _draw_cone,
    "barrel": _draw_barrel,
    "beacon": _draw_beacon,
    "barrier": _draw_barrier,
    "sign": _draw_roadwork_sign,
}


def _eval_crop_box(scene: _Scene) -> tuple[int, int, int, int]:
    """The region kept by the evaluation crop (shorter side to 256, central 224), in original pixels."""
    short = min(scene.width, scene.height)
    half = short * 224 / 256 / 2
    cx, cy = scene.width / 2, scene.height / 2
    return int(cx - half), int(cy - half), int(math.ceil(cx + half)), int(math.ceil(cy + half))



def _crop_coverage(layer: Image.Image, box: tuple[int, int, int, int]) -> float:
    """Share of the evaluation crop covered by the opaque pixels of ``layer``."""
    alpha = np.asarray(layer.getchannel("A").crop(box))
    return float(np.count_nonzero(alpha)) / alpha.size


def _zone_items(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[list[tuple[float, str, float]], float]:
    """``(depth, kind, lateral)`` of the items of a work zone of visibility ``tier``, and their size scale."""
    size_scale = scene.height * rng.uniform(0.4, 0.55)
    if tier in ("clear", "partial"):
        row_kind = str(rng.choice(["cone", "barrel", "beacon"], p=[0.4, 0.3, 0.3]))
        lateral, drift = rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.3)
        near = rng.uniform(0.75, 0.95)
        depths = near * np.geomspace(1.0, rng.uniform(0.35, 0.55), int(rng.integers(3, 8)))
        items = [(float(d), row_kind, lateral + drift * (near - d)) for d in depths]
        for _ in range(int(rng.integers(0, 3))):
            items.append((rng.uniform(0.45, 0.9), str(rng.choice(["barrier", "sign", "cone", "barrel"])), rng.uniform(-0.8, 0.8)))
        if rng.random() < 0.3:
            items.append((rng.uniform(0.5, 0.85), "sign", rng.choice([-0.85, 0.85])))
        return items, size_scale
    if tier == "tiny":  # a cone or two, or a sign, far down the road
        depth = rng.uniform(0.1, 0.22)
        kind = str(rng.choice(["cone", "sign", "barrel"]))
        return [(depth * rng.uniform(0.85, 1.0) ** k, kind, rng.uniform(-0.6, 0.6)) for k in range(int(rng.integers(1, 3)))], size_scale
    if tier == "distant":
        row_kind = str(rng.choice(["cone", "barrel", "beacon", "barrier"], p=[0.35, 0.25, 0.25, 0.15]))
        lateral, drift = rng.uniform(-0.7, 0.7), rng.uniform(-0.3, 0.3)
        near = rng.uniform(0.4, 0.6)
        depths = near * np.geomspace(1.0, rng.uniform(0.55, 0.8), int(rng.integers(6, 13)))
        items = [(float(d), row_kind, lateral + drift * (near - d) / near) for d in depths]
        if rng.random() < 0.4:
            items.append((near * rng.uniform(0.9, 1.05), str(rng.choice(["sign", "barrier"])), lateral + rng.uniform(-0.5, 0.5)))
        return items, size_scale
    if tier != "sparse":
        raise ValueError(f"unknown roadwork tier {tier!r}: use one of {sorted(POSITIVE_TIERS)}")
    depth = rng.uniform(0.6, 0.9)
    kind = str(rng.choice(["sign", "cones", "barrier", "barrel"], p=[0.3, 0.3, 0.25, 0.15]))
    lateral = rng.uniform(-0.8, 0.8)
    if kind == "sign":
        items = [(depth, "sign", float(rng.choice([-1.0, 1.0]) * rng.uniform(0.9, 1.2)))]
    elif kind == "cones":
        items = [(depth * rng.uniform(0.8, 1.0) ** k, "cone", lateral + rng.uniform(-0.1, 0.1)) for k in range(int(rng.integers(1, 4)))]
    else:
        items = [(depth, kind, lateral)]
    if rng.random() < 0.5:
        items.append((depth * rng.uniform(0.8, 1.0), str(rng.choice(["cone", "sign"])), lateral + rng.uniform(-0.3, 0.3)))
    return items, size_scale


def _draw_roadwork(layer: Image.Image, scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[float, list[tuple[float, float, float]]]:
    """Draw a work zone of visibility ``tier`` on the transparent ``layer``.

    Returns the share of the evaluation crop it covers and the ``(x, top, size)`` of every item
    (where warning lights sit at night). Items are drawn far to near. A clear (or, before its
    occluder, partial) zone covering less than :data:`MIN_CLEAR_COVERAGE` of the crop gets more
    items near the camera; a small zone is never absent from the crop (at least
    :data:`MIN_SMALL_COVERAGE`).
    """
    draw = ImageDraw.Draw(layer)
    box = _eval_crop_box(scene)
    large = tier in ("clear", "partial")
    minimum = MIN_CLEAR_COVERAGE if large else MIN_TINY_COVERAGE if tier == "tiny" else MIN_SMALL_COVERAGE
    items, size_scale = _zone_items(scene, rng, tier)
    anchors: list[tuple[float, float, float]] = []
    coverage = 0.0
    for _ in range(5):
        for depth, kind, lateral in sorted(items):
            x, y = scene.ground(depth, lateral)
            size = size_scale * depth
            _ROADWORK_ITEMS[kind](draw, x, y, size, rng)
            anchors.append((x, y - size * (1.45 if kind == "sign" else 1.0), size))
        coverage = _crop_coverage(layer, box)
        if coverage >= minimum:
            break
        if large:
            items = [(rng.uniform(0.8, 0.95), str(rng.choice(["barrier", "barrel", "cone"])), rng.uniform(-0.5, 0.5))]
        else:  # one more item just in front of the zone's nearest one, nearer the centre
            depth, _, lateral = max(items)
            items = [(min(0.95, depth * rng.uniform(1.0, 1.2)), str(rng.choice(["barrier", "barrel", "cone"])),
                      0.7 * lateral + rng.uniform(-0.2, 0.2))]
    return coverage, anchors


def _partial_occluder(layer: Image.Image, scene: _Scene, rng: np.random.Generator) -> Box:
    """A foreground box hiding most of the work zone on ``layer``: a strip of it stays visible.

    The box spans the zone's full height and, from one side, the largest share of its width that
    still leaves :data:`PARTIAL_VISIBLE` ``[0]`` of the evaluation crop visible.
    """
    alpha = np.asarray(layer.getchannel("A")) > 0
    ys, xs = np.nonzero(alpha)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max()) + 1, float(ys.min()), float(ys.max()) + 1
    bx0, by0, bx1, by1 = _eval_crop_box(scene)
    crop = alpha[by0:by1, bx0:bx1]
    columns = crop.sum(axis=0)
    from_left = bool(rng.random() < 0.5)
    target = rng.uniform(*PARTIAL_VISIBLE) * crop.size
    # Visible pixels left when the box covers the crop columns up to (from the left) column c.
    visible = np.cumsum(columns[::-1])[::-1] if from_left else np.cumsum(columns)
    # The most occluding cut whose visible remainder is still >= target.
    ok = np.nonzero(visible >= target)[0]
    if ok.size == 0:
        cut = bx0 + (int(np.argmax(columns > 0)) if from_left else int(len(columns) - np.argmax(columns[::-1] > 0)))
    else:
        cut = bx0 + (int(ok.max()) if from_left else int(ok.min()) + 1)
    top = y0 - rng.uniform(0.0, 0.1) * scene.height
    bottom = min(float(scene.height), y1 + rng.uniform(0.0, 0.2) * scene.height)
    return (min(x0, cut) - 2.0, top, cut, bottom) if from_left else (cut, top, max(x1, cut) + 2.0, bottom)


def _draw_occluder_body(draw: ImageDraw.ImageDraw, box: Box, rng: np.random.Generator) -> None:
    """A lorry, a hedge or a wall filling ``box``."""
    x0, y0, x1, y1 = box
    kind = rng.choice(["lorry", "hedge", "wall"], p=[0.5, 0.3, 0.2])
    if kind == "lorry":
        palette = [(235, 235, 235), (160, 165, 170), (40, 70, 140), (60, 110, 70), (120, 30, 35)]
        body = _jitter(rng, palette[rng.integers(len(palette))], 12)
        draw.rectangle(box, fill=body)
        draw.rectangle([x0, y0 + (y1 - y0) * 0.08, x1, y0 + (y1 - y0) * 0.12], fill=_mix(body, (0, 0, 0), 0.3))
        wheel = (y1 - y0) * 0.12
        for wx in np.linspace(x0 + wheel, x1 - wheel, max(2, int((x1 - x0) / (4 * wheel + 1)) + 1)):
            draw.ellipse([wx - wheel, y1 - 2 * wheel, wx + wheel, y1], fill=(20, 20, 20))
    elif kind == "hedge":
        green = _jitter(rng, (45, 90, 45), 15)
        draw.rectangle([x0, y0 + (y1 - y0) * 0.1, x1, y1], fill=green)
        step = max(4.0, (x1 - x0) / 6)
        for x in np.arange(x0, x1, step):
            draw.ellipse([x - step * 0.2, y0, x + step * 1.2, y0 + (y1 - y0) * 0.3], fill=_jitter(rng, green, 10))
    else:
        draw.rectangle(box, fill=_jitter(rng, (150, 140, 125), 20))
        for y in np.arange(y0, y1, max(3.0, (y1 - y0) / 8)):
            draw.line([(x0, y), (x1, y)], fill=(110, 105, 95), width=1)


def _draw_service_truck(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> list[Light]:
    """An orange municipal truck (a hard negative); returns its amber roof light."""
    depth = rng.uniform(0.3, 0.85)
    lateral = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.4))
    x, y = scene.ground(depth, lateral)
    tw = scene.road_half * depth * rng.uniform(0.7, 1.0)
    th = tw * rng.uniform(0.7, 0.9)
    orange = _roadwork_orange(rng)
    draw.rectangle([x - tw / 2, y - th, x + tw / 2, y - th * 0.12], fill=orange)
    draw.rectangle([x - tw * 0.4, y - th * 0.95, x + tw * 0.4, y - th * 0.7], fill=_jitter(rng, (60, 70, 80), 15))
    draw.rectangle([x - tw / 2, y - th * 0.45, x + tw / 2, y - th * 0.38], fill=_white(rng))
    for wx in (x - tw * 0.32, x + tw * 0.32):
        draw.rectangle([wx - tw * 0.09, y - th * 0.2, wx + tw * 0.09, y], fill=(20, 20, 20))
    return [(x, y - th * 1.02, max(1.2, tw * 0.05), (255, 170, 30), 1.0)]


def _draw_concrete_barrier(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> None:
    depth = rng.uniform(0.35, 0.9)
    x, y = scene.ground(depth, rng.uniform(-1.1, 1.1))
    size = scene.height * (0.05 + 0.18 * depth)
    bw, bh = size * rng.uniform(1.5, 3.0), size * 0.3
    grey = _jitter(rng, (175, 172, 165), 15)
    draw.polygon([(x - bw / 2, y), (x + bw / 2, y), (x + bw * 0.45, y - bh), (x - bw * 0.45, y - bh)], fill=grey)


def _draw_bollards(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> None:
    side = float(rng.choice([-1.0, 1.0]))
    color = _jitter(rng, [(230, 230, 225), (60, 60, 65), (150, 150, 150)][rng.integers(3)], 10)
    for depth in np.linspace(rng.uniform(0.3, 0.5), rng.uniform(0.7, 0.95), int(rng.integers(3, 7))):
        x, y = scene.ground(float(depth), side * rng.uniform(0.95, 1.1))
        size = scene.height * 0.2 * depth
        draw.rectangle([x - size * 0.06, y - size * 0.5, x + size * 0.06, y], fill=color)


def _draw_chevron_board(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> None:
    """A permanent red-and-white curve-warning board on a post."""
    depth = rng.uniform(0.3, 0.85)
    x, y = scene.ground(depth, float(rng.choice([-1.0, 1.0]) * rng.uniform(1.1, 1.5)))
    size = scene.height * (0.05 + 0.15 * depth)
    draw.rectangle([x - size * 0.05, y - size * 1.6, x + size * 0.05, y], fill=(120, 120, 125))
    w, h, top = size * 1.2, size * 0.5, y - size * 2.0
    draw.rectangle([x - w / 2, top, x + w / 2, top + h], fill=_roadwork_red(rng))
    white = _white(rng)
    direction = 1 if rng.random() < 0.5 else -1
    for k in (-1, 0, 1):
        cx = x + k * w * 0.28
        draw.line([(cx - direction * w * 0.08, top + h * 0.15), (cx + direction * w * 0.08, top + h * 0.5),
                   (cx - direction * w * 0.08, top + h * 0.85)], fill=white, width=max(1, int(w * 0.06)))


def _draw_barrier_arm(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> None:
    """A car-park or toll barrier arm: a thin red-and-white bar across the lane."""
    depth = rng.uniform(0.3, 0.8)
    side = float(rng.choice([-1.0, 1.0]))
    x, y = scene.ground(depth, side * 1.05)
    size = scene.height * (0.05 + 0.15 * depth)
    draw.rectangle([x - size * 0.15, y - size * 0.8, x + size * 0.15, y], fill=_jitter(rng, (200, 200, 195), 10))
    length = scene.road_half * depth * rng.uniform(0.8, 1.6)
    x_end = x - side * length
    bar = (min(x, x_end), y - size * 0.7, max(x, x_end), y - size * 0.62)
    _stripes(draw, bar, (_roadwork_red(rng), _white(rng)), 10, diagonal=True)


_AUTUMN = ((205, 110, 30), (185, 65, 30), (220, 150, 40), (170, 90, 40))
#: Kinds of hard negative and their shares.
HARD_NEGATIVES: dict[str, float] = {
    "orange_vehicle": 0.25, "red_sign": 0.2, "orange_sign": 0.1, "obstacles": 0.2, "autumn_trees": 0.15, "striped": 0.1,
}


def _draw_hard_negative(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> list[Light]:
    """One hard negative (see :data:`HARD_NEGATIVES`); returns any light it carries (for night)."""
    kind = str(rng.choice(list(HARD_NEGATIVES), p=list(HARD_NEGATIVES.values())))
    if kind == "orange_vehicle":
        if rng.random() < 0.5:
            _draw_car(draw, scene, rng, color=_roadwork_orange(rng))
            return []
        return _draw_service_truck(draw, scene, rng)
    if kind == "red_sign":
        _draw_pole_sign(draw, scene, rng, str(rng.choice(["stop", "speed", "give_way"])))
    elif kind == "orange_sign":
        _draw_pole_sign(draw, scene, rng, "orange_plain")
    elif kind == "obstacles":
        for _ in range(int(rng.integers(1, 4))):
            choice = rng.integers(3)
            if choice == 0:
                _draw_plain_obstacle(draw, scene, rng)
            elif choice == 1:
                _draw_concrete_barrier(draw, scene, rng)
            else:
                _draw_bollards(draw, scene, rng)
    elif kind == "autumn_trees":
        for _ in range(int(rng.integers(2, 5))):
            _draw_tree(draw, scene, rng, foliage=_jitter(rng, _AUTUMN[rng.integers(len(_AUTUMN))], 15))
    elif rng.random() < 0.5:
        _draw_chevron_board(draw, scene, rng)
    else:
        _draw_barrier_arm(draw, scene, rng)
    return []


def _occluder_box(scene: _Scene, rng: np.random.Generator) -> Box:
    """A foreground occluder (post, passing van, wiper) as a box in image coordinates."""
    w, h = scene.width, scene.height
    ow, oh = rng.uniform(0.06, 0.2) * w, rng.uniform(0.1, 0.35) * h
    x0 = rng.uniform(0, w - ow)
    y0 = rng.uniform(0.3 * h, h - oh)
    return x0, y0, x0 + ow, y0 + oh


def _inside(x: float, y: float, box: Box) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _add_glow(out: np.ndarray, x: float, y: float, radius: float, color: Color, strength: float) -> None:
    """Add a Gaussian light blob (core plus a faint halo) to the uint8 image ``out`` in place."""
    h, w = out.shape[:2]
    reach = int(6 * radius) + 1
    x0, x1 = max(0, int(x) - reach), min(w, int(x) + reach + 1)
    y0, y1 = max(0, int(y) - reach), min(h, int(y) + reach + 1)
    if x0 >= x1 or y0 >= y1:
        return
    dx2 = (np.arange(x0, x1, dtype=np.float32) - np.float32(x)) ** 2
    dy2 = (np.arange(y0, y1, dtype=np.float32) - np.float32(y)) ** 2
    d2 = dy2[:, None] + dx2[None, :]
    profile = np.exp(-d2 / np.float32(radius**2)) + np.float32(0.2) * np.exp(-d2 / np.float32((2.5 * radius) ** 2))
    window = out[y0:y1, x0:x1].astype(np.float32)
    window += (np.float32(strength) * profile)[..., None] * np.asarray(color, dtype=np.float32)
    out[y0:y1, x0:x1] = np.clip(window, 0, 255).astype(np.uint8)


def _scene_lights(scene: _Scene, rng: np.random.Generator, light: str) -> list[Light]:
    """Street lamps (sodium orange or LED white) and car head- and tail-lights of a dark scene."""
    lights: list[Light] = []
    strength = 1.0 if light == "night" else 0.5
    if rng.random() < (0.75 if light == "night" else 0.3):
        sodium = rng.random() < 0.6
        color = (255, 165, 70) if sodium else (230, 235, 255)
        for _ in range(int(rng.integers(2, 7))):
            depth = rng.uniform(0.08, 0.9)
            x, y = scene.ground(depth, float(rng.choice([-1.0, 1.0]) * rng.uniform(1.2, 1.7)))
            lights.append((x, y - scene.height * (0.08 + 0.5 * depth), 1.5 + 7 * depth, color, strength))
    for _ in range(int(rng.integers(0, 4))):
        depth = rng.uniform(0.15, 0.85)
        x, y = scene.ground(depth, float(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.7)))
        spacing = 0.25 * scene.road_half * depth
        head = rng.random() < 0.5
        color, radius = ((255, 245, 215), 1.0 + 5 * depth) if head else ((235, 35, 25), 0.8 + 3 * depth)
        for dx in (-spacing, spacing):
            lights.append((x + dx, y - 0.1 * scene.road_half * depth, radius, color, strength))
    return lights


def _gain_matrix(gain: float, cast: np.ndarray) -> tuple[float, ...]:
    """An RGB -> RGB colour matrix scaling every channel by ``gain`` and adding ``cast``."""
    return (gain, 0.0, 0.0, float(cast[0]), 0.0, gain, 0.0, float(cast[1]), 0.0, 0.0, gain, float(cast[2]))


def _compose_lit(base: Image.Image, layer: Image.Image, scene: _Scene, rng: np.random.Generator, light: str,
                 lights: list[Light]) -> Image.Image:
    """Put the object ``layer`` over ``base`` under ``light``; at dusk and night add ``lights`` and the scene's.

    At night the scene is dark and the objects (retroreflective roadwork items, signs, painted
    vehicles) keep a little more of their colour, as if lit by headlights.
    """
    if light == "day":
        base.paste(layer, (0, 0), layer)
        return base
    if light == "dusk":
        gain = rng.uniform(0.55, 0.8)
        item_gain = gain * rng.uniform(1.0, 1.25)
        cast = np.array([14.0, 4.0, -12.0]) * rng.uniform(0.5, 1.5)
    else:
        gain = rng.uniform(0.14, 0.3)
        item_gain = rng.uniform(0.35, 0.7)
        cast = np.array([-2.0, 3.0, 14.0]) * rng.uniform(0.5, 1.5)
    out = base.convert("RGB", _gain_matrix(gain, cast))
    out.paste(layer.convert("RGB").convert("RGB", _gain_matrix(item_gain, cast)), (0, 0), layer.getchannel("A"))
    array = np.array(out)
    for x, y, radius, color, strength in [*_scene_lights(scene, rng, light), *lights]:
        _add_glow(array, x, y, radius, color, strength)
    return Image.fromarray(array, mode="RGB")


def _weather(img: Image.Image, scene: _Scene, rng: np.random.Generator, weather: str, light: str) -> Image.Image:
    """Fog (washes out the far field, the sky most) or rain (streaks, lower contrast, softer image)."""
    if weather == "clear":
        return img
    dim = {"day": 1.0, "dusk": 0.7, "night": 0.3}[light]
    if weather == "fog":
        density = rng.uniform(0.35, 0.7)
        tone = int(round(rng.uniform(175, 215) * dim))
        rows = np.arange(scene.height, dtype=np.float64)
        depth = np.clip((rows - scene.horizon) / (scene.height - scene.horizon), 0.0, 1.0)
        alpha = density * (1.0 - depth) ** rng.uniform(0.6, 1.2)
        alpha[rows <= scene.horizon] = density
        mask = np.repeat(np.rint(alpha * 255).astype(np.uint8)[:, None], scene.width, axis=1)
        return Image.composite(Image.new("RGB", img.size, (tone, tone, tone)), img, Image.fromarray(mask, mode="L"))
    if weather != "rain":
        raise ValueError(f"unknown weather {weather!r}: use one of {sorted(WEATHER)}")
    contrast, darken = rng.uniform(0.7, 0.9), rng.uniform(0.8, 0.95)
    mean = float(np.dot(ImageStat.Stat(img).mean, _LUMA))
    img = img.convert("RGB", _gain_matrix(contrast * darken, np.full(3, mean * (1.0 - contrast) * darken)))
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    slant = rng.uniform(-0.3, 0.3)
    level = int(round(255 * rng.uniform(0.25, 0.45)))
    for _ in range(int(rng.integers(150, 400))):
        x, y = rng.uniform(-20, scene.width + 20), rng.uniform(0, scene.height)
        length = rng.uniform(6, 22)
        draw.line([(x, y), (x + slant * length, y + length)], fill=level, width=1)
    streak = int(round(215 * dim))
    img = Image.composite(Image.new("RGB", img.size, (streak, streak, streak)), img, mask)
    return img.filter(ImageFilter.BoxBlur(radius=float(rng.uniform(0.5, 1.2))))


def _soften(img: Image.Image, fx: float, fy: float) -> Image.Image:
    """Blur by shrinking ``fx`` x ``fy`` times and enlarging back (focus blur when equal, motion blur when fy = 1)."""
    small = img.resize((max(1, round(img.width / fx)), max(1, round(img.height / fy))), Image.Resampling.BILINEAR)
    return small.resize(img.size, Image.Resampling.BILINEAR)


def _photometric(img: Image.Image, rng: np.random.Generator, light: str = "day") -> Image.Image:
    """Lighting jitter, colour cast, optional blur (focus or horizontal motion) and luminance noise.

    Brightness, contrast, saturation and cast form one affine colour map (as ImageEnhance's
    Brightness, Contrast and Color applied in turn would), applied in a single pass. Sensor
    noise is stronger at night.
    """
    brightness = rng.uniform(0.75, 1.2)
    contrast = rng.uniform(0.8, 1.15)
    saturation = rng.uniform(0.9, 1.15)
    cast = rng.normal(0.0, 6.0, size=3)
    mean_luma = brightness * float(np.dot(ImageStat.Stat(img).mean, _LUMA))
    saturate = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), _LUMA)
    offset = (1.0 - contrast) * mean_luma + cast
    matrix = np.column_stack([contrast * brightness * saturate, offset])
    img = img.convert("RGB", tuple(float(v) for v in matrix.ravel()))
    blur = rng.random()
    if blur < 0.3:
        factor = rng.uniform(1.3, 2.8)
        img = _soften(img, factor, factor)
    elif blur < 0.42:
        img = _soften(img, rng.uniform(2.0, 4.0), 1.0)
    sigma = float(rng.uniform(4.0, 14.0) if light == "night" else rng.uniform(0.0, 8.0))
    # Luminance noise (one value per pixel, all channels), as after a camera's processing; added
    # as a uint8 image biased by 128 so Pillow adds and clips it in one pass.
    noise = rng.standard_normal(size=(img.height, img.width), dtype=np.float32)
    noise *= np.float32(sigma)
    noise += np.float32(128.5)
    np.clip(noise, 0, 255, out=noise)
    plane = Image.fromarray(noise.astype(np.uint8), mode="L")
    return ImageChops.add(img, Image.merge("RGB", (plane, plane, plane)), scale=1.0, offset=-128)


def _pick(rng: np.random.Generator, shares: dict[str, float]) -> str:
    return str(rng.choice(list(shares), p=list(shares.values())))


def draw_conditions(rng: np.random.Generator, roadwork: bool) -> Conditions:
    """Draw how hard one image is (the same lighting, weather and occlusion rates for both classes)."""
    tier = _pick(rng, POSITIVE_TIERS) if roadwork else ("hard" if rng.random() < HARD_NEGATIVE_RATE else "plain")
    return Conditions(tier=tier, light=_pick(rng, LIGHTING), weather=_pick(rng, WEATHER),
                      occluded=bool(rng.random() < OCCLUSION_RATE))


def render_scene(rng: np.random.Generator, roadwork: bool, conditions: Conditions | None = None) -> Image.Image:
    """Draw one road scene (with a work zone when ``roadwork``) under ``conditions`` (drawn when None)."""
    cond = conditions if conditions is not None else draw_conditions(rng, roadwork)
    if cond.tier not in (*POSITIVE_TIERS, *NEGATIVE_TIERS):
        raise ValueError(f"unknown tier {cond.tier!r}: roadwork tiers are {list(POSITIVE_TIERS)}, "
                         f"no-roadwork tiers {list(NEGATIVE_TIERS)}")
    if roadwork != (cond.tier in POSITIVE_TIERS):
        raise ValueError(f"tier {cond.tier!r} does not match roadwork={roadwork}")
    width = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    height = int(round(width / rng.uniform(*ASPECT_RANGE)))
    scene = _Scene(
        width=width,
        height=height,
        horizon=height * rng.uniform(0.35, 0.5),
        vanish_x=width * rng.uniform(0.46, 0.54),
        road_half=height * rng.uniform(0.38, 0.5),
    )
    img = Image.new("RGB", (width, height))
    _draw_sky(img, scene, rng)
    _draw_ground(img, scene, rng)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 5))):
        _draw_building(draw, scene, rng)
    for _ in range(int(rng.integers(0, 4))):
        _draw_tree(draw, scene, rng)
    for _ in range(int(rng.integers(0, 3))):
        _draw_pole_sign(draw, scene, rng, str(rng.choice(["blue", "green", "speed"], p=[0.45, 0.45, 0.1])))
    for _ in range(int(rng.integers(0, 3))):
        _draw_car(draw, scene, rng)
    # Work zones and hard negatives go on their own layer: at night they are lit differently,
    # and occluders are cut out of it.
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    layer_draw = ImageDraw.Draw(layer)
    lights: list[Light] = []
    anchors: list[tuple[float, float, float]] = []
    occluders: list[Box] = []
    if roadwork:
        _, anchors = _draw_roadwork(layer, scene, rng, cond.tier)
        if cond.tier == "partial":
            occluders.append(_partial_occluder(layer, scene, rng))
        if rng.random() < DECOY_RATE:
            lights += _draw_hard_negative(layer_draw, scene, rng)
    elif cond.tier == "hard":
        lights += _draw_hard_negative(layer_draw, scene, rng)
    if cond.occluded:
        occluders.append(_occluder_box(scene, rng))
    for k, box in enumerate(occluders):
        layer_draw.rectangle(box, fill=(0, 0, 0, 0))
        if k == 0 and cond.tier == "partial":
            _draw_occluder_body(draw, box, rng)
        else:
            draw.rectangle(box, fill=_jitter(rng, (int(rng.integers(20, 120)),) * 3, 10))
    if roadwork and cond.light != "day" and rng.random() < (0.8 if cond.light == "night" else 0.5):
        visible = [a for a in anchors if not any(_inside(a[0], a[1], box) for box in occluders)]
        for k in rng.permutation(len(visible))[:4]:
            x, top, size = visible[int(k)]
            lights.append((x, top, max(1.0, 0.07 * size), (255, 175, 40), 1.0 if cond.light == "night" else 0.6))
    img = _compose_lit(img, layer, scene, rng, cond.light, lights)
    img = _weather(img, scene, rng, cond.weather, cond.light)
    return _photometric(img, rng, cond.light)


@dataclass(frozen=True)
class _Plan:
    """The draws of one image made before rendering."""

    rng: np.random.Generator
    roadwork: bool
    flip: bool
    quality: int
    conditions: Conditions


def _image_plan(seed: int, split: str, index: int, positive_rate: float, label_noise: float) -> _Plan:
    """The generator of one image and its first draws: roadwork, label flip, JPEG quality, conditions."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    roadwork = bool(rng.random() < positive_rate)
    flip = bool(rng.random() < label_noise)
    quality = int(rng.integers(70, 96))
    return _Plan(rng, roadwork, flip, quality, draw_conditions(rng, roadwork))


def split_positive_rate(split: str) -> float:
    """Share of roadwork scenes the generator draws for ``split`` ("train" or "val")."""
    return {"train": TRAIN_POSITIVE_RATE, "val": VAL_POSITIVE_RATE}[split]


def image_conditions(seed: int, split: str, index: int, label_noise: float = DEFAULT_LABEL_NOISE) -> dict[str, Any]:
    """What the generator drew for image ``index`` of ``split`` (no rendering): for analysis by condition.

    ``{"roadwork", "flipped", "label", "tier", "light", "weather", "occluded"}``; ``label`` is
    what the labels file says.
    """
    plan = _image_plan(seed, split, index, split_positive_rate(split), label_noise)
    return {"roadwork": plan.roadwork, "flipped": plan.flip, "label": int(plan.roadwork) ^ int(plan.flip),
            **plan.conditions.to_dict()}


def _render_one(task: tuple[int, str, int, float, float, str]) -> tuple[int, int, bool]:
    seed, split, index, positive_rate, label_noise, path = task
    plan = _image_plan(seed, split, index, positive_rate, label_noise)
    img = render_scene(plan.rng, plan.roadwork, plan.conditions)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=plan.quality)
    Path(path).write_bytes(buffer.getvalue())
    label = int(plan.roadwork) ^ int(plan.flip)
    return index, label, plan.flip


def _generate_split(
    out_dir: Path, split: str, n: int, seed: int, label_noise: float, pool: Any, progress: bool
) -> tuple[int, tuple[str, ...]]:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{split}_{i:06d}.jpg" for i in range(n)]
    rate = split_positive_rate(split)
    tasks = [(seed, split, i, rate, label_noise, str(image_dir / names[i])) for i in range(n)]
    results = pool.imap(_render_one, tasks, chunksize=32) if pool is not None else map(_render_one, tasks)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=n, desc=f"synthetic {split}", unit="img")
    labels = [0] * n
    flipped = [False] * n
    for index, label, flip in results:
        labels[index] = label
        flipped[index] = flip
    lines = ["image,label"] + [f"{name},{label}" for name, label in zip(names, labels)]
    atomic_write_text(out_dir / f"{split}_labels.csv", "\n".join(lines) + "\n")
    return sum(labels), tuple(name for name, flip in zip(names, flipped) if flip)


def generate_synthetic_dataset(
    out_dir: str | Path,
    n_train: int = DEFAULT_N_TRAIN,
    n_val: int = DEFAULT_N_VAL,
    seed: int = 0,
    progress: bool = True,
    label_noise: float = DEFAULT_LABEL_NOISE,
    num_workers: int | None = None,
) -> SyntheticSummary:
    """Write the synthetic data set under ``out_dir`` (NATIX layout) and return a summary.

    ``num_workers`` processes draw the images (default: up to 2, bounded by the CPU count; forked
    where the platform allows, they only run NumPy and Pillow code); the bytes written do not
    depend on it. Label CSVs are written last, so an interrupted run leaves
    no labels file pointing at missing images.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train={n_train} and n_val={n_val} must both be >= 1")
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise={label_noise} must be in [0, 0.5)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in _SPLIT_CODES:
        (out_dir / f"{split}_labels.csv").unlink(missing_ok=True)
    workers = min(2, os.cpu_count() or 1) if num_workers is None else max(0, min(num_workers, os.cpu_count() or 1))
    start = time.perf_counter()
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = get_context(method).Pool(workers) if workers > 1 else None
    try:
        train_pos, train_flips = _generate_split(out_dir, "train", n_train, seed, label_noise, pool, progress)
        val_pos, val_flips = _generate_split(out_dir, "val", n_val, seed, label_noise, pool, progress)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return SyntheticSummary(
        out_dir=out_dir,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        train_positives=train_pos,
        val_positives=val_pos,
        train_flipped=train_flips,
        val_flipped=val_flips,
        seconds=time.perf_counter() - start,
        generator_version=GENERATOR_VERSION,
    )
