"""Drawing images with boxes (matplotlib, Agg backend): used by ``show`` and the evaluation gallery."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def image_axes(image: np.ndarray) -> tuple[plt.Figure, plt.Axes]:
    """A figure showing ``(H, W, 3)`` ``image`` in continuous pixel coordinates; small images are enlarged."""
    height, width = image.shape[:2]
    scale = max(1.0, 8 / (max(height, width) / 100))  # keeps the labels readable
    fig, ax = plt.subplots(figsize=(width / 100 * scale, height / 100 * scale), dpi=100)
    ax.imshow(image, extent=(0, width, height, 0))
    ax.axis("off")
    return fig, ax


def draw_box(ax: plt.Axes, box: Sequence[float], color: str, **style) -> None:
    """One ``x1, y1, x2, y2`` box outline."""
    x1, y1, x2, y2 = box
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, **style))


def draw_ground_truth(ax: plt.Axes, boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray,
                      classes: Sequence[str]) -> None:
    """Ground truth in green, difficult boxes dashed, class name above."""
    for box, label, hard in zip(boxes, labels, difficult):
        draw_box(ax, box, "lime", linewidth=1.8, linestyle="--" if hard else "-")
        name = classes[label] + (" (difficult)" if hard else "")
        ax.text(box[0], box[1], name, color="black", fontsize=7, backgroundcolor="lime", va="bottom")


def draw_detections(ax: plt.Axes, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    classes: Sequence[str]) -> None:
    """Detections in red, class name and score below the top-left corner."""
    for box, score, label in zip(boxes, scores, labels):
        draw_box(ax, box, "red", linewidth=1.2)
        ax.text(box[0], box[3], f"{classes[label]} {score:.2f}", color="white", fontsize=7,
                backgroundcolor="red", va="top")


def save(fig: plt.Figure, path: Path, title: str) -> None:
    fig.axes[0].set_title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
