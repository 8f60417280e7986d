"""Deterministic synthetic road scenes in the NATIX layout (the embedded default data set).

Layout written under ``out_dir``::

    train/train_000000.jpg ...   train_labels.csv   (header ``image,label``, paths relative to train/)
    val/val_000000.jpg ...       val_labels.csv

Each image is a road in perspective (sky, horizon, road with lane marks, verges, buildings, trees,
cars, ordinary traffic signs). Roadwork scenes (label 1) add traffic cones, barrels, striped
barriers, striped beacon boards and roadwork signs at varied depth, so their size follows the
perspective. Negative scenes include hard negatives: orange vehicles, red and orange signs,
plain (unstriped) obstacles. Lighting, colour casts, blur, sensor noise, occluders and JPEG
quality vary, and a small fraction of labels is flipped (label noise). Class balance follows
NATIX (train ~80%, val ~90% roadwork) and image sizes vary (256-400 px wide, landscape), so the
evaluation resize is exercised.

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so the output is
byte-identical for a given seed whatever the number of worker processes.

Why work zones are large and saturated: the builtin backbone is a randomly initialised, frozen
tiny DINOv3 whose CLS token mostly carries colour and texture statistics, not object shape. For
the task to be learnable by it (and for confidently missed roadwork to stay rare, which the
certified exit policy needs), a work zone always covers at least ``MIN_ROADWORK_COVERAGE`` of the
evaluation crop with saturated orange/red-and-white items, while hard negatives stay a minority
of the negatives. ``benchmarks/check_synthetic_learnability.py`` measures this.

Default size: ``n_val = 2400`` at 90% roadwork gives ~2160 positives; with the .33/.33/.34
hash split val_calib and val_test each hold ~713 and ~735 positives (standard deviation ~22),
comfortably above the 600 needed to certify a 2% FNR. ``n_train = 5000`` (~4000 positives,
~1000 negatives). Hard negatives are 10% of the negatives and the label-noise rate is 0.5%: with
the 2% FNR target certified on ~700 exited positives, each confidently missed positive (a
negative image labelled 1 is one) costs a visible share of the budget.
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
from PIL import Image, ImageDraw, ImageFilter, ImageStat

from stage1_core.artifacts import atomic_write_text

DEFAULT_N_TRAIN = 5000
DEFAULT_N_VAL = 2400
TRAIN_POSITIVE_RATE = 0.80
VAL_POSITIVE_RATE = 0.90
DEFAULT_LABEL_NOISE = 0.005
HARD_NEGATIVE_RATE = 0.10
MIN_ROADWORK_COVERAGE = 0.30
OCCLUSION_RATE = 0.15
WIDTH_RANGE = (256, 400)
ASPECT_RANGE = (1.2, 1.6)
_SPLIT_CODES = {"train": 0, "val": 1}
_LUMA = np.array([0.299, 0.587, 0.114])

Color = tuple[int, int, int]


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
    draw = ImageDraw.Draw(img)
    h = max(1, int(scene.horizon))
    for y in range(h + 1):
        draw.line([(0, y), (scene.width, y)], fill=_mix(top, bottom, y / h))


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


def _draw_tree(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> None:
    depth = rng.uniform(0.05, 0.6)
    side = rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 3.5)
    x, y = scene.ground(depth, side)
    size = scene.height * (0.15 + 0.5 * depth)
    draw.rectangle([x - size * 0.05, y - size * 0.6, x + size * 0.05, y], fill=_jitter(rng, (90, 65, 45), 10))
    green = _jitter(rng, (50, 110, 50), 25)
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
    """The region kept by Resize(256) + CenterCrop(224), in original pixels."""
    short = min(scene.width, scene.height)
    half = short * 224 / 256 / 2
    cx, cy = scene.width / 2, scene.height / 2
    return int(cx - half), int(cy - half), int(math.ceil(cx + half)), int(math.ceil(cy + half))


def _draw_roadwork(
    img: Image.Image, scene: _Scene, rng: np.random.Generator, occluder: tuple[float, float, float, float] | None
) -> float:
    """Composite a work zone onto ``img``; return the fraction of the evaluation crop it covers.

    A receding row of cones, barrels or striped beacons plus barriers and signs, kept inside the
    central crop the evaluation transform sees. Items are drawn on a transparent layer so their
    coverage can be measured; a zone covering less than ``MIN_ROADWORK_COVERAGE`` of the crop gets
    more items near the camera (a roadwork label always comes with clearly visible roadwork).
    """
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    box = _eval_crop_box(scene)
    row_kind = str(rng.choice(["cone", "barrel", "beacon"], p=[0.4, 0.3, 0.3]))
    lateral = rng.uniform(-0.6, 0.6)
    drift = rng.uniform(-0.3, 0.3)
    near = rng.uniform(0.75, 0.95)
    count = int(rng.integers(3, 8))
    depths = near * np.geomspace(1.0, rng.uniform(0.35, 0.55), count)
    size_scale = scene.height * rng.uniform(0.4, 0.55)
    items: list[tuple[float, str, float]] = [(float(d), row_kind, lateral + drift * (near - d)) for d in depths]
    for _ in range(int(rng.integers(0, 3))):
        items.append((rng.uniform(0.45, 0.9), str(rng.choice(["barrier", "sign", "cone", "barrel"])), rng.uniform(-0.8, 0.8)))
    if rng.random() < 0.3:
        items.append((rng.uniform(0.5, 0.85), "sign", rng.choice([-0.85, 0.85])))
    coverage = 0.0
    for _ in range(4):
        for depth, kind, lat in sorted(items):
            x, y = scene.ground(depth, lat)
            _ROADWORK_ITEMS[kind](draw, x, y, size_scale * depth, rng)
        if occluder is not None:
            draw.rectangle(occluder, fill=(0, 0, 0, 0))
        alpha = np.asarray(layer.getchannel("A").crop(box))
        coverage = float(np.count_nonzero(alpha)) / alpha.size
        if coverage >= MIN_ROADWORK_COVERAGE:
            break
        items = [(rng.uniform(0.8, 0.95), str(rng.choice(["barrier", "barrel", "cone"])), rng.uniform(-0.5, 0.5))]
    img.paste(layer, (0, 0), layer)
    return coverage


def _draw_hard_negative(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator) -> None:
    kind = rng.choice(["orange_car", "red_sign", "orange_sign", "obstacles"], p=[0.3, 0.3, 0.15, 0.25])
    if kind == "orange_car":
        _draw_car(draw, scene, rng, color=_roadwork_orange(rng))
    elif kind == "red_sign":
        _draw_pole_sign(draw, scene, rng, str(rng.choice(["stop", "speed", "give_way"])))
    elif kind == "orange_sign":
        _draw_pole_sign(draw, scene, rng, "orange_plain")
    else:
        for _ in range(int(rng.integers(1, 4))):
            _draw_plain_obstacle(draw, scene, rng)


def _photometric(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lighting, colour cast, optional blur and luminance noise.

    Brightness, contrast, saturation and cast form one affine colour map (as ImageEnhance's
    Brightness, Contrast and Color applied in turn would), applied in a single pass.
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
    if rng.random() < 0.35:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.6))))
    sigma = float(rng.uniform(0.0, 8.0))
    # Luminance noise (one value per pixel, all channels), as after a camera's processing.
    noise = rng.standard_normal(size=(img.height, img.width, 1), dtype=np.float32)
    noise *= np.float32(sigma)
    array = np.asarray(img, dtype=np.int16) + np.rint(noise).astype(np.int16)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="RGB")


def _occluder_box(scene: _Scene, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A foreground occluder (post, passing van, wiper) as a box in image coordinates."""
    w, h = scene.width, scene.height
    ow, oh = rng.uniform(0.06, 0.2) * w, rng.uniform(0.1, 0.35) * h
    x0 = rng.uniform(0, w - ow)
    y0 = rng.uniform(0.3 * h, h - oh)
    return x0, y0, x0 + ow, y0 + oh


def render_scene(rng: np.random.Generator, roadwork: bool) -> Image.Image:
    """Draw one road scene (with a work zone when ``roadwork``)."""
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
    occluder = _occluder_box(scene, rng) if rng.random() < OCCLUSION_RATE else None
    if roadwork:
        _draw_roadwork(img, scene, rng, occluder)
    elif rng.random() < HARD_NEGATIVE_RATE:
        _draw_hard_negative(draw, scene, rng)
    if occluder is not None:
        draw.rectangle(occluder, fill=_jitter(rng, (int(rng.integers(20, 120)),) * 3, 10))
    return _photometric(img, rng)


def _image_plan(
    seed: int, split: str, index: int, positive_rate: float, label_noise: float
) -> tuple[np.random.Generator, bool, bool, int]:
    """The generator of one image and its draws: roadwork or not, label flipped or not, JPEG quality."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    roadwork = bool(rng.random() < positive_rate)
    flip = bool(rng.random() < label_noise)
    quality = int(rng.integers(70, 96))
    return rng, roadwork, flip, quality


def _render_one(task: tuple[int, str, int, float, float, str]) -> tuple[int, int, bool]:
    seed, split, index, positive_rate, label_noise, path = task
    rng, roadwork, flip, quality = _image_plan(seed, split, index, positive_rate, label_noise)
    img = render_scene(rng, roadwork)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    Path(path).write_bytes(buffer.getvalue())
    label = int(roadwork) ^ int(flip)
    return index, label, flip


def _generate_split(
    out_dir: Path, split: str, n: int, positive_rate: float, seed: int, label_noise: float, pool: Any, progress: bool
) -> tuple[int, tuple[str, ...]]:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{split}_{i:06d}.jpg" for i in range(n)]
    tasks = [(seed, split, i, positive_rate, label_noise, str(image_dir / names[i])) for i in range(n)]
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
        train_pos, train_flips = _generate_split(out_dir, "train", n_train, TRAIN_POSITIVE_RATE, seed, label_noise, pool, progress)
        val_pos, val_flips = _generate_split(out_dir, "val", n_val, VAL_POSITIVE_RATE, seed, label_noise, pool, progress)
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
    )
