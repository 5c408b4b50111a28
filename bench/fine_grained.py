"""A generated fine-grained VOC dataset: ``python -m bench.fine_grained OUT [--trainval N --test N --seed S]``.

Six classes of playing-card-like objects that look alike as a whole (an
off-white card with a dark border, the same size range and aspect) and differ
only in the shape of their pips: circle, square, diamond, plus, up and down
triangle, in red or black whatever the class. Cards are large (70 to 300 px on
640 x 480 photos-like images) on a cluttered table; some overlap. It is the
kind of data on which SPP-net's head, trained on ImageNet conv features that
are never fine-tuned, separates cards from the background but not one card
from another (README, "Why SPP-net collapses on fine-grained data"); the
ablation runner takes it with ``--data-root``.

Image ``i`` is drawn from its own random stream seeded by ``(seed, i)``; the
same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from stages.core.atomic import atomic_dir
from stages.data.voc import VocObject, write_annotation

CLASSES = ("circle", "square", "diamond", "plus", "up", "down")
CARD_ASPECT = 1.4  # height / width
PIP_GRID = ((0.3, 0.25), (0.7, 0.25), (0.5, 0.5), (0.3, 0.75), (0.7, 0.75))  # pip centres, fractions of the card
PIP_SIZE = 0.07  # pip half-width as a fraction of the card width
INK = ((200, 30, 30), (25, 25, 25))  # red and black, drawn at random whatever the class


def draw_pip(image: np.ndarray, kind: str, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    """Draw one pip of shape ``kind`` centred at ``(cx, cy)`` with half-width ``r`` (pixels) on ``image``."""
    if kind == "circle":
        cv2.circle(image, (round(cx), round(cy)), max(1, round(r)), colour, -1, cv2.LINE_AA)
        return
    shapes = {
        "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
        "diamond": [(0, -1.25), (1.25, 0), (0, 1.25), (-1.25, 0)],
        "up": [(0, -1.2), (1.2, 1), (-1.2, 1)],
        "down": [(0, 1.2), (1.2, -1), (-1.2, -1)],
        "plus": [(-0.35, -1.2), (0.35, -1.2), (0.35, -0.35), (1.2, -0.35), (1.2, 0.35), (0.35, 0.35),
                 (0.35, 1.2), (-0.35, 1.2), (-0.35, 0.35), (-1.2, 0.35), (-1.2, -0.35), (-0.35, -0.35)],
    }
    points = np.array([(cx + dx * r, cy + dy * r) for dx, dy in shapes[kind]], dtype=np.float64)
    cv2.fillPoly(image, [np.round(points * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)


def render(rng: np.random.Generator) -> tuple[np.ndarray, list[VocObject]]:
    """One image ``(H, W, 3)`` uint8 RGB and its cards."""
    width, height = int(rng.integers(560, 721)), int(rng.integers(420, 541))
    table = cv2.resize(rng.uniform(40, 200, (3, 4, 3)).astype(np.float32), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(4, 12))):  # clutter: bars and blobs in any colour
        colour = rng.uniform(0, 255, 3).tolist()
        if rng.random() < 0.5:
            p, q = rng.integers(0, (width, height), size=(2, 2))
            cv2.line(table, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, int(rng.integers(2, 12)))
        else:
            centre = tuple(int(v) for v in rng.integers(0, (width, height)))
            axes = tuple(int(v) for v in rng.integers(8, 60, size=2))
            cv2.ellipse(table, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    image = np.clip(table, 0, 255).astype(np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        card_w = int(rng.integers(70, 301))
        card_h = min(int(card_w * CARD_ASPECT), height - 2)
        x1, y1 = int(rng.integers(0, width - card_w)), int(rng.integers(0, height - card_h))
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        paper = int(rng.integers(205, 250))
        cv2.rectangle(image, (x1, y1), (x1 + card_w - 1, y1 + card_h - 1), (paper, paper, paper - 8), -1)
        cv2.rectangle(image, (x1, y1), (x1 + card_w - 1, y1 + card_h - 1), (60, 60, 60), max(1, card_w // 60))
        ink = INK[int(rng.integers(len(INK)))]
        for fx, fy in PIP_GRID:
            draw_pip(image, kind, x1 + fx * card_w, y1 + fy * card_h, PIP_SIZE * card_w, ink)
        objects.append(VocObject(kind, (float(x1), float(y1), float(x1 + card_w), float(y1 + card_h)), False))
    noisy = image + rng.normal(0, rng.uniform(2, 7), image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), objects


def write_dataset(out_dir: Path, num_trainval: int, num_test: int, seed: int) -> None:
    """Write the VOC folder ``out_dir`` (replaced as a whole, atomically)."""
    ids = [f"card_{i:05d}" for i in range(num_trainval + num_test)]
    with atomic_dir(out_dir) as tmp:
        for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (tmp / folder).mkdir(parents=True)
        for index, image_id in enumerate(ids):
            pixels, objects = render(np.random.default_rng([seed, index]))
            Image.fromarray(pixels).save(tmp / "JPEGImages" / f"{image_id}.jpg", quality=92)
            write_annotation(tmp / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", pixels.shape[1],
                             pixels.shape[0], objects)
        for split, split_ids in (("trainval", ids[:num_trainval]), ("test", ids[num_trainval:])):
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="VOC folder to write (replaced)")
    parser.add_argument("--trainval", type=int, default=100)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_dataset(args.out, args.trainval, args.test, args.seed)
    print(f"{args.out}: {args.trainval} trainval and {args.test} test images, classes {', '.join(CLASSES)}")


if __name__ == "__main__":
    main()
