"""Stage ``synthetic``: a small, deterministic PASCAL VOC-layout dataset.

Five object classes, each with its own shape, texture and colour family; the
families overlap and some objects take any hue, so colour alone does not
classify. Images have textured backgrounds, unlabelled clutter (scribbles and
irregular blobs), objects from tiny to large and objects occluding each other,
so a detector has to learn shape and does not trivially reach 100% mAP.

Image ``i`` is drawn from its own random stream seeded by ``(seed, i)``: it does
not depend on the other images, nor on how many there are. The same parameters
give byte-identical files.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw

from stages.core.atomic import atomic_dir
from stages.core.config import ConfigError, SyntheticParams
from stages.data.voc import VocObject, write_annotation
from stages.ops.boxes import intersection_over_smaller

CLASSES = ("cross", "disc", "rectangle", "ring", "triangle")

JPEG_QUALITY = 90
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: anti-aliased edges
OCCLUDED_DIFFICULT = 0.6  # more than this fraction hidden: difficult
MIN_VISIBLE = 0.1  # less than this fraction visible: not annotated, as no annotator would see it
MAX_OVERLAP = 0.8  # objects overlap, but are re-placed if one box would (nearly) contain another
PLACEMENT_TRIES = 20
HUE_SPREAD = 40.0  # degrees either side of a class's hue; neighbouring families overlap
OFF_FAMILY = 0.15  # probability that an object takes any hue at all

Rng = np.random.Generator
MaskDrawer = Callable[[ImageDraw.ImageDraw, int, int, Rng], None]
Texturer = Callable[[Rng, np.ndarray, int, int], np.ndarray]


@dataclass(frozen=True)
class Sprite:
    """One thing drawn on an image: an object (``name`` is its class) or clutter (``name`` is None)."""

    name: str | None
    alpha: np.ndarray  # (h, w) float32 coverage in [0, 1]
    texture: np.ndarray  # (h, w, 3) float32 RGB
    x: int
    y: int

    def window(self) -> tuple[slice, slice]:
        h, w = self.alpha.shape
        return np.s_[self.y : self.y + h, self.x : self.x + w]


def validate(params: SyntheticParams) -> None:
    """Raise :class:`ConfigError` naming the first ``synthetic.*`` key whose value cannot work."""
    p = params
    rules = (
        ("seed", p.seed >= 0, "must be >= 0"),
        ("num_trainval", p.num_trainval >= 1, "must be >= 1"),
        ("num_test", p.num_test >= 1, "must be >= 1"),
        ("min_side", 1 <= p.min_side <= p.max_side, f"must be between 1 and max_side ({p.max_side})"),
        ("min_objects", 1 <= p.min_objects <= p.max_objects, f"must be between 1 and max_objects ({p.max_objects})"),
        ("min_object_size", p.min_object_size >= 4, "must be >= 4: smaller shapes are unrecognisable"),
        (
            "max_object_size",
            p.min_object_size <= p.max_object_size <= p.min_side,
            f"must be between min_object_size ({p.min_object_size}) and min_side ({p.min_side})"
            " so that every object fits in every image",
        ),
        ("difficult_below", p.difficult_below >= 0, "must be >= 0"),
        ("distractors", p.distractors >= 0, "must be >= 0"),
    )
    for key, ok, rule in rules:
        if not ok:
            raise ConfigError(f"synthetic.{key} = {getattr(p, key)} {rule}")


def run(params: SyntheticParams, out_dir: Path) -> None:
    """Write the dataset to ``out_dir`` (replaced as a whole, atomically)."""
    validate(params)
    ids = [f"syn_{i:06d}" for i in range(params.num_trainval + params.num_test)]
    with atomic_dir(out_dir) as tmp:
        for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (tmp / folder).mkdir(parents=True)
        for index, image_id in enumerate(ids):
            pixels, objects = render_image(params, index)
            Image.fromarray(pixels).save(tmp / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=JPEG_QUALITY)
            height, width = pixels.shape[:2]
            write_annotation(tmp / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", width, height, objects)
        for split, split_ids in (("trainval", ids[: params.num_trainval]), ("test", ids[params.num_trainval :])):
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))


def render_image(params: SyntheticParams, index: int) -> tuple[np.ndarray, list[VocObject]]:
    """Image ``index`` as ``(H, W, 3)`` uint8 RGB and its annotated objects."""
    rng = np.random.default_rng([params.seed, index])
    width, height = (int(v) for v in rng.integers(params.min_side, params.max_side, endpoint=True, size=2))
    image = _background(rng, width, height)
    sprites = _objects(rng, params, width, height) + _clutter(rng, params, width, height)
    # owner[y, x] = index in ``sprites`` of what is seen at that pixel (-1: background).
    owner = np.full((height, width), -1, dtype=np.int32)
    for k in rng.permutation(len(sprites)):  # later sprites occlude earlier ones
        _paste(image, owner, sprites[k], int(k))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(3.0, 9.0))
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    annotated = (_annotate(s, k, owner, params.difficult_below) for k, s in enumerate(sprites) if s.name)
    return pixels, [obj for obj in annotated if obj is not None]


def _background(rng: Rng, width: int, height: int) -> np.ndarray:
    """Smooth colour gradients, mid-frequency mottling and soft blotches, as float32 RGB."""
    coarse = rng.uniform(30, 225, (int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    mottle = rng.normal(0, rng.uniform(5, 20), (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    image += cv2.resize(mottle, (width, height), interpolation=cv2.INTER_LINEAR)
    # Blotches are painted premultiplied (colour * opacity) and blurred together with
    # their opacity: one blur and one blend for all of them, with soft edges.
    paint = np.zeros((height, width, 3), dtype=np.float32)
    opacity = np.zeros((height, width), dtype=np.float32)
    for _ in range(int(rng.integers(3, 10))):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        axes = tuple(int(v) + 1 for v in rng.uniform(0.03, 0.33, 2) * (width, height))
        angle, alpha = float(rng.uniform(0, 180)), float(rng.uniform(0.2, 0.6))
        colour = rng.uniform(0, 255, 3) * alpha
        cv2.ellipse(paint, centre, axes, angle, 0, 360, colour.tolist(), -1)
        cv2.ellipse(opacity, centre, axes, angle, 0, 360, alpha, -1)
    sigma = float(rng.uniform(2, 8))
    paint, opacity = cv2.GaussianBlur(paint, (0, 0), sigma), cv2.GaussianBlur(opacity, (0, 0), sigma)
    return image * (1 - opacity[..., None]) + paint


def _objects(rng: Rng, params: SyntheticParams, width: int, height: int) -> list[Sprite]:
    sprites: list[Sprite] = []
    for _ in range(int(rng.integers(params.min_objects, params.max_objects, endpoint=True))):
        name = CLASSES[int(rng.integers(len(CLASSES)))]
        drawer, texturer, hue, max_aspect = _STYLES[name]
        w, h = _size(rng, params, max_aspect)
        alpha = _mask(drawer, w, h, rng)
        texture = texturer(rng, _colour(rng, hue), h, w)
        x, y = _free_position(rng, w, h, sprites, width, height)
        sprites.append(Sprite(name, alpha, texture, x, y))
    return sprites


def _clutter(rng: Rng, params: SyntheticParams, width: int, height: int) -> list[Sprite]:
    """Up to ``params.distractors`` unlabelled scribbles and irregular blobs, of any colour."""
    sprites = []
    for _ in range(int(rng.integers(params.distractors, endpoint=True))):
        w, h = _size(rng, params, max_aspect=3.0)
        alpha = _mask(_scribble if rng.random() < 0.5 else _blob, w, h, rng)
        texture = _speckled(rng, _colour(rng, rng.uniform(0, 360)), h, w)
        x, y = int(rng.integers(width - w, endpoint=True)), int(rng.integers(height - h, endpoint=True))
        sprites.append(Sprite(None, alpha, texture, x, y))
    return sprites


def _size(rng: Rng, params: SyntheticParams, max_aspect: float) -> tuple[int, int]:
    """Width and height: log-uniform scale (many small objects) and log-uniform aspect ratio."""
    scale = np.exp(rng.uniform(np.log(params.min_object_size), np.log(params.max_object_size)))
    stretch = np.sqrt(np.exp(rng.uniform(-np.log(max_aspect), np.log(max_aspect))))
    low, high = params.min_object_size, params.max_object_size
    return int(np.clip(round(scale * stretch), low, high)), int(np.clip(round(scale / stretch), low, high))


def _free_position(rng: Rng, w: int, h: int, placed: list[Sprite], width: int, height: int) -> tuple[int, int]:
    """A random top-left corner whose box covers at most ``MAX_OVERLAP`` of any placed object's, or vice versa."""
    boxes = np.array([[s.x, s.y, s.x + s.alpha.shape[1], s.y + s.alpha.shape[0]] for s in placed]).reshape(-1, 4)
    for _ in range(PLACEMENT_TRIES):
        x, y = int(rng.integers(width - w, endpoint=True)), int(rng.integers(height - h, endpoint=True))
        if (intersection_over_smaller(np.array([[x, y, x + w, y + h]]), boxes) <= MAX_OVERLAP).all():
            break
    return x, y


def _colour(rng: Rng, hue: float) -> np.ndarray:
    """An RGB colour (0-255) near ``hue`` degrees, or of any hue with probability ``OFF_FAMILY``."""
    if rng.random() < OFF_FAMILY:
        hue = rng.uniform(0, 360)
    else:
        hue += rng.uniform(-HUE_SPREAD, HUE_SPREAD)
    rgb = colorsys.hsv_to_rgb((hue % 360) / 360, rng.uniform(0.35, 0.95), rng.uniform(0.45, 0.95))
    return np.array(rgb, dtype=np.float32) * 255


def _mask(drawer: MaskDrawer, w: int, h: int, rng: Rng) -> np.ndarray:
    """``(h, w)`` float32 coverage of the shape ``drawer`` paints on a supersampled canvas."""
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    drawer(ImageDraw.Draw(canvas), w * SUPERSAMPLE, h * SUPERSAMPLE, rng)
    big = np.asarray(canvas, dtype=np.float32) / 255
    return big.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))


def _paste(image: np.ndarray, owner: np.ndarray, sprite: Sprite, tag: int) -> None:
    window = sprite.window()
    alpha = sprite.alpha[..., None]
    image[window] = image[window] * (1 - alpha) + sprite.texture * alpha
    owner[window][sprite.alpha >= 0.5] = tag


def _annotate(sprite: Sprite, tag: int, owner: np.ndarray, difficult_below: int) -> VocObject | None:
    """The object's full extent, difficult if small or mostly hidden; None if nearly invisible.

    The extent is every pixel the shape touches. The visible fraction weighs
    pixels by coverage, so it is defined even for a shape no pixel is half covered by.
    """
    touched = sprite.alpha > 0
    rows, cols = np.flatnonzero(touched.any(axis=1)), np.flatnonzero(touched.any(axis=0))
    seen = owner[sprite.window()] == tag
    visible = float((sprite.alpha * seen).sum() / sprite.alpha.sum())
    if visible < MIN_VISIBLE:
        return None
    x1, x2 = sprite.x + int(cols[0]), sprite.x + int(cols[-1]) + 1
    y1, y2 = sprite.y + int(rows[0]), sprite.y + int(rows[-1]) + 1
    difficult = min(x2 - x1, y2 - y1) < difficult_below or visible < 1 - OCCLUDED_DIFFICULT
    return VocObject(sprite.name, (float(x1), float(y1), float(x2), float(y2)), difficult)


# Shapes, drawn in white on a black canvas of size (w, h).


def _disc(draw: ImageDraw.ImageDraw, w: int, h: int, rng: Rng) -> None:
    draw.ellipse((0, 0, w - 1, h - 1), fill=255)


def _ring(draw: ImageDraw.ImageDraw, w: int, h: int, rng: Rng) -> None:
    draw.ellipse((0, 0, w - 1, h - 1), fill=255)
    t = rng.uniform(0.14, 0.28) * min(w, h)
    draw.ellipse((t, t, w - 1 - t, h - 1 - t), fill=0)


def _rectangle(draw: ImageDraw.ImageDraw, w: int, h: int, rng: Rng) -> None:
    draw.rectangle((0, 0, w - 1, h - 1), fill=255)


def _triangle(draw: ImageDraw.ImageDraw, w: int, h: int, rng: Rng) -> None:
    """Apex anywhere along one edge, base along the opposite one; pointing up or down."""
    points = [(rng.uniform(0, w - 1), 0.0), (0.0, h - 1.0), (w - 1.0, h - 1.0)]
    if rng.random() < 0.5:
        points = [(x, h - 1 - y) for x, y in points]
    draw.polygon(points, fill=255)


def _cross(draw: ImageDraw.ImageDraw, w: int, h: int, rng: Rng) -> None:
    half = rng.uniform(0.12, 0.2)
    draw.rectangle((w * (0.5 - half), 0, w * (0.5 + half), h - 1), fill=255)
    draw.rectangle((0, h * (0.5 - half), w - 1, h * (0.5 + half)), fill=255)


def _scribble(draw: ImageDraw.ImageDraw, w: int, h: int, rng: Rng) -> None:
    points = [(rng.uniform(0, w - 1), rng.uniform(0, h - 1)) for _ in range(int(rng.integers(2, 5)))]
    draw.line(points, fill=255, width=int(rng.uniform(1, 4) * SUPERSAMPLE), joint="curve")


def _blob(draw: ImageDraw.ImageDraw, w: int, h: int, rng: Rng) -> None:
    """An irregular polygon: random radii at sorted random angles."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(7, 13))))
    radii = rng.uniform(0.45, 1.0, len(angles))
    xs = (w - 1) / 2 * (1 + radii * np.cos(angles))
    ys = (h - 1) / 2 * (1 + radii * np.sin(angles))
    draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)


# Textures: the colour modulated by a per-class brightness pattern, as (h, w, 3) float32.


def _unit_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates scaled to [-1, 1] over the sprite."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return ys / h * 2 - 1, xs / w * 2 - 1


def _shaded(rng: Rng, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    """Lit like a sphere from a random direction."""
    ys, xs = _unit_grid(h, w)
    ly, lx = rng.uniform(-0.5, 0.5, 2)
    return colour * (1.25 - 0.45 * ((xs - lx) ** 2 + (ys - ly) ** 2))[..., None]


def _speckled(rng: Rng, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    return colour * (1 + rng.normal(0, 0.12, (h, w)).astype(np.float32))[..., None]


def _striped(rng: Rng, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / period)
    return colour * (1 + 0.25 * np.sin(phase))[..., None]


def _graded(rng: Rng, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    ys, xs = _unit_grid(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    return colour * (0.95 + 0.3 * (xs * np.cos(angle) + ys * np.sin(angle)))[..., None]


def _checkered(rng: Rng, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    cell = int(rng.integers(2, 5))
    return colour * np.where((xs // cell + ys // cell) % 2 == 0, 1.15, 0.8).astype(np.float32)[..., None]


# class -> (shape, texture, centre hue in degrees, largest aspect ratio)
_STYLES: dict[str, tuple[MaskDrawer, Texturer, float, float]] = {
    "cross": (_cross, _checkered, 290.0, 1.5),
    "disc": (_disc, _shaded, 15.0, 1.6),
    "rectangle": (_rectangle, _striped, 120.0, 2.5),
    "ring": (_ring, _speckled, 215.0, 1.6),
    "triangle": (_triangle, _graded, 60.0, 1.8),
}
