"""Where every artifact lives, relative to the repository root.

The stage table (:mod:`stages.table`) declares each stage's inputs and outputs
with these functions; the generated ``dvc.yaml`` and the Luigi tasks follow.
A function called with DVC template strings (``"${item.split}"``) returns the
templated path, so path arguments are plain strings, never computed on.
"""
from __future__ import annotations

from pathlib import Path

from stages.core.store import shard_path

CACHE = Path("features_cache")
SYNTHETIC = CACHE / "synthetic"
INDEX = CACHE / "index"
PROPOSALS = CACHE / "proposals"
RPN_PROPOSALS = CACHE / "rpn_proposals"
REPORTS = CACHE / "reports"
PROPOSAL_METRICS = REPORTS / "proposals.json"
FINETUNED_MODEL = CACHE / "finetune" / "model.pt"
FINETUNE_CURVE = REPORTS / "finetune_curve.csv"
# run-to-run facts (timings) and resumable training state: never DVC outputs, never in git
RUNS = CACHE / "runs"
CHECKPOINTS = CACHE / "checkpoints"


def index_file(split: str) -> Path:
    return INDEX / f"{split}.h5"


def proposals_dir(split: str) -> Path:
    return PROPOSALS / split


def rpn_proposals_dir(model: str, split: str) -> Path:
    """Shards of region proposal network ``model``'s proposals (``m1``, ``m3``), in the selective-search shards'
    format."""
    return RPN_PROPOSALS / model / split


def rpn_proposals_shard(model: str, split: str, shard: int) -> Path:
    return shard_path(rpn_proposals_dir(model, split), shard)


def proposals_shard(split: str, shard: int) -> Path:
    return shard_path(proposals_dir(split), shard)


def checkpoint_file(stage: str) -> Path:
    """A training stage's last checkpoint (removed once its model is written)."""
    return CHECKPOINTS / f"{stage}.pt"


def recall_curve(split: str, source: str = "") -> Path:
    """The recall curve of selective search's proposals (``source`` ``""``) or of an RPN's (``m1``, ``m3``)."""
    return REPORTS / f"recall_curve_{f'rpn_{source}_' if source else ''}{split}.csv"


def rpn_recall_metrics(model: str) -> Path:
    return REPORTS / f"proposals_rpn_{model}.json"


# --- feature caches and the post-hoc stages --------------------------------------------------
# A feature recipe: rcnn (per-region forward passes), sppnet (pyramid pooling) or fast_rcnn_svm (a trained
# Fast R-CNN model's RoI-pooled and fc7 features).
FEATURES = CACHE / "features"
SPP = CACHE / "spp"
SPP_HEAD = SPP / "head.pt"
SPP_FINETUNE_CURVE = REPORTS / "spp_finetune_curve.csv"
SVM = CACHE / "svm"
BBOX = CACHE / "bbox"
DETECTIONS = CACHE / "detections"
COCO = CACHE / "coco"


def features_dir(recipe: str, split: str) -> Path:
    """Shards of a recipe's feature cache: rows boxes, gt_label, iou, pool, fc, scores."""
    return FEATURES / recipe / split


def features_shard(recipe: str, split: str, shard: int) -> Path:
    return shard_path(features_dir(recipe, split), shard)


def spp_dir(split: str) -> Path:
    """Shards of the SPP-net pyramids of the pre-trained conv layers (the sppnet recipe's pool features)."""
    return SPP / split


def spp_shard(split: str, shard: int) -> Path:
    return shard_path(spp_dir(split), shard)


def svm_model(recipe: str) -> Path:
    return SVM / f"{recipe}.h5"


def svm_report(recipe: str) -> Path:
    return REPORTS / f"svm_{recipe}.json"


def bbox_model(recipe: str) -> Path:
    return BBOX / f"{recipe}.h5"


def detections_file(recipe: str) -> Path:
    return DETECTIONS / f"{recipe}.h5"


def coco_detections(recipe: str) -> Path:
    """The same detections as a COCO results JSON (``image_id``, ``category_id``, ``bbox`` x, y, w, h, ``score``)."""
    return DETECTIONS / f"{recipe}.json"


def coco_ground_truth(split: str) -> Path:
    """A split's ground truth as a COCO annotation file, the one its COCO results are evaluated against."""
    return COCO / f"ground_truth_{split}.json"


# --- Fast R-CNN: one model file per trained model (fast_rcnn, fast_rcnn_ohem) -------------------
FAST_RCNN = CACHE / "fast_rcnn"


def fast_rcnn_model(model: str) -> Path:
    return FAST_RCNN / f"{model}.pt"


def fast_rcnn_curve(model: str) -> Path:
    return REPORTS / f"{model}_curve.csv"


# --- Faster R-CNN: the four alternating steps' models (m1 ... m3, then the final faster_rcnn) and the joint one ----
FASTER_RCNN = CACHE / "faster_rcnn"


def faster_rcnn_model(model: str) -> Path:
    """``m1`` (step 1's RPN), ``m2`` (step 3's detector), ``m3`` (step 4's RPN), ``faster_rcnn`` (step 5's detector
    with m3's RPN: the final model) or ``faster_rcnn_joint``."""
    return FASTER_RCNN / f"{model}.pt"


def faster_rcnn_curve(model: str) -> Path:
    return REPORTS / f"{model if model.startswith('faster_rcnn') else f'faster_rcnn_{model}'}_curve.csv"


def map_metrics(recipe: str) -> Path:
    return REPORTS / f"map_{recipe}.json"


def pr_curve(recipe: str) -> Path:
    return REPORTS / f"pr_{recipe}.csv"


def figures_dir(recipe: str) -> Path:
    """PNG precision-recall curves and the detection gallery of a recipe."""
    return REPORTS / f"figures_{recipe}"
