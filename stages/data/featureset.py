"""Feature caches: the rows every feature stage writes, and the one reader every later stage uses.

A feature shard (stages ``features``, ``spp_features``, ``spp_recache``, ``fast_rcnn_recache``) is a
per-image artifact (:mod:`stages.core.store`) covering exactly the images of the
proposal shard with the same number, with these row datasets:

=============  ===================  ===============================================================
``boxes``      ``(M, 4) float32``   the image's proposals in proposal order, then (training split
                                    only) its ground-truth boxes, difficult ones included
``gt_label``   ``(M,) int32``       class number of a ground-truth row, -1 for a proposal
``iou``        ``(M, C) float32``   each box's best IoU with the image's ground truth of each of
                                    the ``C`` classes (0 where the image has none of that class)
``pool``       ``(M, Dp)``          pool-level feature (R-CNN pool5 analogue, the SPP pyramid, or
                                    Fast R-CNN's RoI-pooled conv features)
``fc``         ``(M, Df)``          fc-level feature (R-CNN fc7 analogue), read by the SVMs
``scores``     ``(M, C + 1) f32``   the network's softmax probabilities, column 0 = background
=============  ===================  ===============================================================

and per-image datasets ``widths``, ``heights`` ``(n,) int32``. Features are
stored as ``float16`` (or ``float32``, ``features.precision``), gzip-compressed in
chunks of :data:`CHUNK_ROWS` rows, so reading one image decompresses only its
own chunks. Attributes: ``classes`` (JSON), ``split``, ``shard_index``,
``num_shards``, ``recipe`` and the provenance (``params``, ``code_version``,
``inputs``).

Each recipe's cache is one self-contained folder, ``features/<recipe>/<split>/``,
so every post-hoc stage depends on exactly one folder per split. For
``sppnet`` that folder is written by the re-caching stage: its ``pool`` is a copy
of the pyramid of ``spp/<split>/`` and its ``fc`` and ``scores`` come from the
fine-tuned fully connected layers. For ``fast_rcnn_svm`` it is written by
``fast_rcnn_recache`` from one conv pass of the trained ``fast_rcnn`` model per
image: ``pool`` its RoI pooling, ``fc`` its fc7, ``scores`` its softmax.

Every stage that multiplies cached features by one constant, so that their
mean L2 norm is a target (the SVMs' fc, the box regressors' pool, SPP-net's
fc layers on the pyramids), estimates that constant with
:func:`feature_scale`: the regularisers and learning rates that follow are
absolute, so they must not depend on the backbone's feature magnitude.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from stages.core.config import FEATURE_RECIPES
from stages.core.layout import features_dir
from stages.core.store import ArtifactError, PerImageReader, RowSpec, shard_path
from stages.ops.boxes import as_boxes
from stages.ops.sampling import class_iou

CHUNK_ROWS = 64  # rows per compressed chunk: one image's read touches only a few chunks


def region_rows(num_classes: int) -> dict[str, RowSpec]:
    """Row datasets every feature shard has besides its features."""
    return {
        "boxes": RowSpec((4,), np.float32),
        "gt_label": RowSpec((), np.int32),
        "iou": RowSpec((num_classes,), np.float32),
    }


IMAGE_DATASETS = {"widths": np.int32, "heights": np.int32}


def feature_row(dim: int, precision: str, compression: int) -> RowSpec:
    """A compressed, chunked feature dataset of ``dim`` columns (``compression`` 0 = none)."""
    return RowSpec((dim,), np.dtype(precision), "gzip" if compression else None, CHUNK_ROWS, compression or None)


def image_regions(
    proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, num_classes: int, with_gt: bool
) -> dict[str, np.ndarray]:
    """The ``boxes``, ``gt_label`` and ``iou`` rows of one image (ground-truth rows last, if ``with_gt``)."""
    proposals, gt_boxes = as_boxes(proposals), as_boxes(gt_boxes)
    gt_labels = np.asarray(gt_labels, dtype=np.int32)
    boxes = np.concatenate([proposals, gt_boxes]) if with_gt else proposals
    label = np.concatenate([np.full(len(proposals), -1, np.int32), gt_labels]) if with_gt else np.full(len(proposals), -1, np.int32)
    return {"boxes": boxes, "gt_label": label, "iou": class_iou(boxes, gt_boxes, gt_labels, num_classes)}


class FeatureSet(PerImageReader):
    """All shards of one recipe's feature cache of one split, read image by image (only that image's chunks)."""

    def __init__(self, recipe: str, split: str, num_shards: int) -> None:
        if recipe not in FEATURE_RECIPES:
            raise ArtifactError(f"unknown recipe {recipe!r}; choose one of {', '.join(FEATURE_RECIPES)}")
        self.recipe = recipe
        folder = features_dir(recipe, split)
        super().__init__([shard_path(folder, k) for k in range(num_shards)])
        self.check_shards(num_shards)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.json_attr("classes")]

    def dim(self, name: str) -> int:
        """Number of columns of feature dataset ``name``."""
        return int(self._files[0][name].shape[1])


# --- feature scale -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureScale:
    """``scale`` brings ``mean_norm``, the mean L2 norm of the ``rows`` sampled feature rows, to the target norm."""

    scale: float
    mean_norm: float
    rows: int


def norm_sample_rows(
    counts: np.ndarray, seed: int, max_rows: int | None = None, max_images: int | None = None
) -> dict[int, np.ndarray]:
    """``{image: sorted row numbers}``: the seeded sample of rows whose norms estimate the mean norm.

    ``counts (n,)`` are the rows per image. With ``max_images``, that many of the images
    that have rows are drawn first (all if there are fewer), so that only they are read
    (R-CNN's ``rcnn_feature_stats.m``); without it every image takes part. Then
    ``max_rows`` of their rows are drawn uniformly without replacement (all of them if
    they hold fewer or without ``max_rows``). One generator seeded by ``seed`` makes both draws.
    """
    rng = np.random.default_rng(seed)
    images = np.flatnonzero(np.asarray(counts) > 0)
    if max_images is not None:
        images = np.sort(images[rng.permutation(len(images))[:max_images]])
    starts = np.concatenate([[0], np.cumsum(counts[images])]).astype(np.int64)
    total = int(starts[-1])
    chosen = np.arange(total) if max_rows is None else np.sort(rng.choice(total, min(max_rows, total), replace=False))
    owner = np.searchsorted(starts, chosen, side="right") - 1
    return {int(images[k]): chosen[owner == k] - starts[k] for k in np.unique(owner)}


def feature_scale(
    reader: PerImageReader, name: str, target_norm: float, seed: int,
    max_rows: int | None = None, max_images: int | None = None,
) -> FeatureScale:
    """The factor that brings the mean L2 norm of the rows of feature dataset ``name`` to ``target_norm``.

    The mean is estimated on the sample of :func:`norm_sample_rows` (``seed``,
    ``max_rows``, ``max_images``), read image by image, norms in float64.
    :class:`ArtifactError` if the sampled rows have no positive mean norm.
    """
    sample = norm_sample_rows(reader.counts(), seed, max_rows, max_images)
    norms = [
        np.linalg.norm(reader.rows(name, i)[rows].astype(np.float64), axis=1)
        for i, rows in tqdm(sorted(sample.items()), desc=f"{name} feature norms", unit="image")
    ]
    norms_all = np.concatenate(norms) if norms else np.zeros(0)
    mean_norm = float(norms_all.mean()) if len(norms_all) else 0.0
    if not mean_norm > 0:
        raise ArtifactError(f"{reader.paths[0].parent}: no {name} features with a positive norm to scale "
                            f"({len(norms_all)} rows sampled)")
    return FeatureScale(target_norm / mean_norm, mean_norm, len(norms_all))
