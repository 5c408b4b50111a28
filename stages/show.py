"""``python -m stages show --image ID``: draw an image with its ground truth and proposals."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from stages.errors import PipelineError  # noqa: E402
from stages.images import load_image  # noqa: E402
from stages.layout import CACHE, index_file, proposals_dir  # noqa: E402
from stages.store import PerImageReader  # noqa: E402


def _find(splits: tuple[str, ...], image_id: str) -> tuple[str, PerImageReader, int]:
    for split in dict.fromkeys(splits):
        index = PerImageReader([index_file(split)])
        if image_id in index.image_ids:
            return split, index, index.position(image_id)
        index.close()
    raise PipelineError(f"image {image_id!r} is in none of the splits {list(splits)} (run the index stage?)")


def run(splits: tuple[str, ...], num_shards: int, image_id: str, out: Path | None, num_proposals: int) -> Path:
    """Draw ``image_id``: ground truth in green (difficult dashed), its first proposals in yellow."""
    split, index, i = _find(splits, image_id)
    with index:
        image = load_image(Path(index.attrs["data_root"]) / index.value("paths", i))
        classes = index.json_attr("classes")
        gt_boxes, gt_labels, difficult = (index.rows(n, i) for n in ("gt_boxes", "gt_labels", "gt_difficult"))
    inches = max(image.shape[:2]) / 100
    scale = max(1.0, 8 / inches)  # small images are enlarged so the labels stay readable
    fig, ax = plt.subplots(figsize=(image.shape[1] / 100 * scale, image.shape[0] / 100 * scale), dpi=100)
    ax.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))  # continuous pixel coordinates
    title = f"{image_id} ({split}): {len(gt_boxes)} ground-truth boxes"
    if proposals_dir(split).is_dir():
        with PerImageReader.sharded(proposals_dir(split), num_shards) as proposals:
            boxes = proposals.rows("boxes", proposals.position(image_id))
        for box in boxes[:num_proposals]:
            _draw(ax, box, "yellow", linewidth=0.6, alpha=0.7)
        title += f", first {min(num_proposals, len(boxes))} of {len(boxes)} proposals"
    for box, label, hard in zip(gt_boxes, gt_labels, difficult):
        _draw(ax, box, "lime", linewidth=1.8, linestyle="--" if hard else "-")
        ax.text(box[0], box[1], classes[label] + (" (difficult)" if hard else ""), color="black",
                fontsize=7, backgroundcolor="lime", va="bottom")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    out = out or CACHE / "show" / f"{image_id}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def _draw(ax: plt.Axes, box, color: str, **style) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, **style))
