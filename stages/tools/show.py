"""``python -m stages show --image ID``: draw an image with its ground truth and proposals or detections."""
from __future__ import annotations

from pathlib import Path

from stages.core.config import EvaluateParams
from stages.core.errors import PipelineError
from stages.core.layout import CACHE, detections_file, index_file, proposals_dir
from stages.core.store import PerImageReader
from stages.data.detections import read_score_kind
from stages.data.images import load_image
from stages.tools.drawing import draw_box, draw_detections, draw_ground_truth, image_axes, save


def _find(splits: tuple[str, ...], image_id: str) -> tuple[str, PerImageReader, int]:
    for split in dict.fromkeys(splits):
        index = PerImageReader([index_file(split)])
        if image_id in index.image_ids:
            return split, index, index.position(image_id)
        index.close()
    raise PipelineError(f"image {image_id!r} is in none of the splits {list(splits)} (run the index stage?)")


def run(splits: tuple[str, ...], num_shards: int, image_id: str, out: Path | None, num_proposals: int,
        recipe: str | None = None, min_score: float | None = None,
        drawing: EvaluateParams | None = None) -> Path:
    """Draw ``image_id``: ground truth in green (difficult dashed), and either its first
    ``num_proposals`` proposals in yellow or, with ``recipe``, that recipe's detections
    scoring at least ``min_score`` in red (``None``: ``drawing``'s lowest score for the kind of scores the
    detections have, :meth:`EvaluateParams.lowest_drawn`)."""
    split, index, i = _find(splits, image_id)
    with index:
        image = load_image(Path(index.attrs["data_root"]) / index.value("paths", i))
        classes = index.json_attr("classes")
        gt_boxes, gt_labels, difficult = (index.rows(n, i) for n in ("gt_boxes", "gt_labels", "gt_difficult"))
    fig, ax = image_axes(image)
    title = f"{image_id} ({split}): {len(gt_boxes)} ground-truth boxes"
    if recipe is not None:
        title += _draw_detections(ax, recipe, image_id, classes, min_score, drawing)
    elif proposals_dir(split).is_dir():
        with PerImageReader.sharded(proposals_dir(split), num_shards) as proposals:
            boxes = proposals.rows("boxes", proposals.position(image_id))
        for box in boxes[:num_proposals]:
            draw_box(ax, box, "yellow", linewidth=0.6, alpha=0.7)
        title += f", first {min(num_proposals, len(boxes))} of {len(boxes)} proposals"
    draw_ground_truth(ax, gt_boxes, gt_labels, difficult, classes)
    out = out or CACHE / "show" / f"{image_id}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save(fig, out, title)
    return out


def _draw_detections(ax, recipe: str, image_id: str, classes: list[str], min_score: float | None,
                     drawing: EvaluateParams | None) -> str:
    path = detections_file(recipe)
    if not path.is_file():
        raise PipelineError(f"{path}: no detections of recipe {recipe!r} (run its detection stage first: detect, fast_rcnn_detect or faster_rcnn_detect)")
    with PerImageReader([path]) as detections:
        if image_id not in detections.image_ids:
            raise PipelineError(f"image {image_id!r} is not in {path} (detections cover the test split)")
        k = detections.position(image_id)
        boxes, scores, labels = (detections.rows(n, k) for n in ("boxes", "scores", "labels"))
        if min_score is None:
            min_score = drawing.lowest_drawn(read_score_kind(detections))
    keep = scores >= min_score
    draw_detections(ax, boxes[keep], scores[keep], labels[keep], classes)
    return f", {int(keep.sum())} {recipe} detections scoring >= {min_score:g}"
