"""The one parameter source: ``params.yaml`` read once into frozen dataclasses.

Every section of ``params.yaml`` maps to one dataclass below. Loading rejects
unknown keys, missing keys and values of the wrong type, naming the offending
key, so a typo can never silently fall back to a default. Stage code receives
the sections it needs as arguments; nothing reads the YAML file deep inside.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml

from stages.core.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
# Every recipe the evaluate stage can score. Feature recipes go through the post-hoc stages (svm, bbox,
# detect); Fast R-CNN recipes through fast_rcnn_train and fast_rcnn_detect, one trained model per sampler
# (fast_rcnn: hierarchical sampling, fast_rcnn_ohem: OHEM) and the "_svd" recipes are the same model with
# its fc layers compressed by truncated SVD at test time. fast_rcnn_svm is a feature recipe whose cache
# holds the trained fast_rcnn model's own features (stage fast_rcnn_recache): post-hoc SVMs on its fc7.
# Faster R-CNN recipes propose their own regions (a region proposal network on the shared conv map):
# faster_rcnn is trained in the paper's four alternating steps, faster_rcnn_joint by approximate joint training.
Recipe = Literal["rcnn", "sppnet", "fast_rcnn", "fast_rcnn_ohem", "fast_rcnn_svd", "fast_rcnn_ohem_svd",
                 "fast_rcnn_svm", "faster_rcnn", "faster_rcnn_joint"]
RECIPES: tuple[str, ...] = typing.get_args(Recipe)
FEATURE_RECIPES = ("rcnn", "sppnet", "fast_rcnn_svm")
FAST_RCNN_MODELS = {"fast_rcnn": "heuristic", "fast_rcnn_ohem": "ohem"}  # trained model -> its sampler
FASTER_RCNN_RECIPES = ("faster_rcnn", "faster_rcnn_joint")
# the detectors of Faster R-CNN's alternating steps 3 (m2) and 5 (the final faster_rcnn), by fast_rcnn_train's
# hierarchical sampling on RPN proposals
SAMPLERS = {**FAST_RCNN_MODELS, "m2": "heuristic", "faster_rcnn": "heuristic"}
SVD_SUFFIX = "_svd"
SVM_SUFFIX = "_svm"  # a feature recipe cached from a trained Fast R-CNN model: "<model>_svm"


def trained_model(recipe: str) -> str:
    """The trained Fast R-CNN model a recipe detects with or is cached from: ``fast_rcnn_svd``, ``fast_rcnn_svm``
    -> ``fast_rcnn``; any other recipe is returned unchanged."""
    return recipe.removesuffix(SVD_SUFFIX).removesuffix(SVM_SUFFIX)


class ConfigError(PipelineError, ValueError):
    """``params.yaml`` is missing, malformed, or has a key of the wrong name or type."""


@dataclass(frozen=True)
class SyntheticParams:
    """The generated default dataset (stage ``synthetic``)."""

    seed: int
    num_trainval: int
    num_test: int
    min_side: int
    max_side: int
    min_objects: int
    max_objects: int
    min_object_size: int
    max_object_size: int
    difficult_below: int
    distractors: int


@dataclass(frozen=True)
class DataParams:
    """Where the dataset is and how to read it (stage ``index``).

    ``format: voc`` reads a VOC folder whose splits are ``ImageSets/Main/<split>.txt``
    (``split: files``) or drawn by a hash of each image id (``split: auto``, about
    ``test_fraction`` of the images in the test split). ``format: coco`` reads one
    COCO annotation file and image folder per split, the ``coco_*`` paths, relative
    to ``root`` (an image folder ``""`` is ``root`` itself); its files define the split.
    """

    format: Literal["voc", "coco"]
    root: str
    train_split: str
    test_split: str
    split: Literal["files", "auto"]
    test_fraction: float
    split_seed: int
    coco_train_annotations: str
    coco_train_images: str
    coco_test_annotations: str
    coco_test_images: str
    classes: tuple[str, ...]
    on_error: Literal["raise", "skip"]

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be between 0 and 1 (exclusive), got {self.test_fraction}")
        if self.split == "auto" and (self.format != "voc" or self.train_split == self.test_split):
            raise ConfigError("split: auto needs format: voc (a COCO dataset's files define its split) "
                              "and distinct train_split and test_split")
        if self.format == "coco" and not (self.coco_train_annotations and self.coco_test_annotations):
            raise ConfigError("format: coco needs coco_train_annotations and coco_test_annotations")
        for key in ("coco_train_annotations", "coco_train_images", "coco_test_annotations", "coco_test_images"):
            path = PurePosixPath(getattr(self, key))
            if path.is_absolute() or ".." in path.parts:
                raise ConfigError(f"{key} must be a path inside root (relative, without '..'), got {str(path)!r}")

    @property
    def splits(self) -> tuple[str, str]:
        return (self.train_split, self.test_split)

    @property
    def coco_files(self) -> dict[str, tuple[str, str]]:
        """``{split: (annotation file, image folder)}`` of ``format: coco``, relative to ``root``, train first.

        Two splits of one name (train on the test split, a smoke test) are one entry, the train files.
        """
        files = {self.train_split: (self.coco_train_annotations, self.coco_train_images)}
        files.setdefault(self.test_split, (self.coco_test_annotations, self.coco_test_images))
        return files


@dataclass(frozen=True)
class ShardingParams:
    """How per-image stages are split; ``shards`` must be ``[0, 1, ..., N-1]``.

    It is a list rather than a count because DVC expands one stage instance
    per list entry (``matrix``), and DVC templates cannot compute ``range(N)``.
    """

    shards: tuple[int, ...]

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def __post_init__(self) -> None:
        if not self.shards or list(self.shards) != list(range(len(self.shards))):
            raise ConfigError(f"sharding.shards must be [0, 1, ..., N-1], got {list(self.shards)}")


@dataclass(frozen=True)
class ProposalParams:
    """Selective search (stage ``proposals``)."""

    mode: Literal["fast", "quality"]
    max_side: int
    base_k: int
    inc_k: int
    sigma: float
    min_size: float
    max_boxes: int
    seed: int


def check_schedule(section: Any) -> None:
    """Validate a section's training length and learning rate (:meth:`stages.core.engine.Schedule.of` reads them):
    ``epochs`` passes over the training data, at most ``max_iterations`` SGD steps, the learning rate times
    ``lr_gamma`` every ``lr_drop`` of them, a linear ``warmup`` and the weights averaged over the last
    ``average_last`` of the steps (where the section has them)."""
    if section.epochs <= 0 or section.max_iterations < 1 or section.learning_rate <= 0:
        raise ConfigError(f"need epochs > 0, max_iterations >= 1 and learning_rate > 0, got {section.epochs}, "
                          f"{section.max_iterations}, {section.learning_rate}")
    if not 0 < section.lr_drop <= 1 or section.momentum < 0 or section.weight_decay < 0:
        raise ConfigError(f"need 0 < lr_drop <= 1, momentum >= 0 and weight_decay >= 0, got {section.lr_drop}, "
                          f"{section.momentum}, {section.weight_decay}")
    if getattr(section, "warmup", 0) < 0:
        raise ConfigError(f"warmup must be at least 0, got {section.warmup}")
    if not 0 <= getattr(section, "average_last", 0) <= 1:
        raise ConfigError(f"average_last must be between 0 and 1, got {section.average_last}")


def check_sampling(section: Any) -> None:
    """Validate a section's mini-batch make-up: at most ``positive_fraction`` of it foreground, a region being
    foreground at IoU >= ``fg_iou`` with a ground truth."""
    if not 0 <= section.positive_fraction <= 1 or not 0 < section.fg_iou <= 1:
        raise ConfigError(f"need 0 <= positive_fraction <= 1 and 0 < fg_iou <= 1, got {section.positive_fraction}, "
                          f"{section.fg_iou}")


@dataclass(frozen=True)
class FinetuneParams:
    """Fine-tuning the ImageNet backbone on warped regions (stage ``finetune``, R-CNN step 2)."""

    arch: str
    weights: str
    input_size: int
    padding: int
    batch_size: int
    positive_fraction: float
    fg_iou: float
    epochs: float
    max_iterations: int
    learning_rate: float
    momentum: float
    weight_decay: float
    lr_drop: float
    lr_gamma: float
    average_last: float
    mirror: bool
    seed: int

    def __post_init__(self) -> None:
        check_schedule(self)
        if self.input_size < 1 or not 0 <= self.padding < self.input_size / 2:
            raise ConfigError(f"need input_size >= 1 and 0 <= padding < input_size / 2, got {self.input_size}, "
                              f"{self.padding}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        check_sampling(self)


@dataclass(frozen=True)
class FeatureParams:
    """The R-CNN feature cache (stage ``features``, R-CNN step 3).

    Which network: ``finetuned`` is the finetune stage's model; ``imagenet`` is
    ``finetune.arch`` with ``finetune.weights`` as pre-trained (the "no
    fine-tuning" ablation). Either way regions are warped with
    ``finetune.input_size`` and ``finetune.padding``.
    """

    model: Literal["finetuned", "imagenet"]
    batch_size: int
    precision: Literal["float16", "float32"]
    compression: int

    def __post_init__(self) -> None:
        if self.batch_size < 1 or not 0 <= self.compression <= 9:
            raise ConfigError(f"need batch_size >= 1 and 0 <= compression <= 9, got {self.batch_size}, "
                              f"{self.compression}")


SPP_PYRAMID_KEYS = ("scales", "max_side", "levels")  # what spp_features reads: the rest only trains the fc layers


@dataclass(frozen=True)
class SppParams:
    """The SPP-net branch: pyramid features of the pre-trained conv layers, fc layers trained on them, re-cached.

    Stages ``spp_features``, ``spp_finetune`` and ``spp_recache``. The conv layers
    are ``finetune.arch`` with ``finetune.weights``.
    """

    scales: tuple[int, ...]
    max_side: int
    levels: tuple[int, ...]
    hidden: int
    dropout: float
    images_per_batch: int
    batch_size: int
    positive_fraction: float
    fg_iou: float
    epochs: float
    max_iterations: int
    learning_rate: float
    momentum: float
    weight_decay: float
    lr_drop: float
    lr_gamma: float
    seed: int

    def __post_init__(self) -> None:
        check_schedule(self)
        if self.images_per_batch < 1:
            raise ConfigError(f"images_per_batch must be at least 1, got {self.images_per_batch}")
        if not self.scales or min(self.scales) < 1 or self.max_side < max(self.scales):
            raise ConfigError(f"need scales >= 1 and max_side >= every scale, got {list(self.scales)}, {self.max_side}")
        if not self.levels or min(self.levels) < 1 or len(set(self.levels)) != len(self.levels):
            raise ConfigError(f"levels must be distinct positive grid sizes, got {list(self.levels)}")
        if min(self.hidden, self.batch_size) < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("hidden and batch_size must be at least 1, and 0 <= dropout < 1")
        check_sampling(self)


@dataclass(frozen=True)
class SvmParams:
    """Per-class linear SVMs with hard-negative mining (stage ``svm``, R-CNN step 4).

    A class of ``P`` positives trains at ``C * C_positives / P`` (``C`` alone
    where ``C_positives`` is 0): see :mod:`stages.svm`.
    """

    C: float
    C_positives: int
    positive_weight: float
    intercept_scaling: float
    target_norm: float
    norm_sample: int
    neg_iou: float
    hard_threshold: float
    easy_threshold: float
    retrain_every: int
    passes: int
    mining: bool
    seed: int

    def __post_init__(self) -> None:
        if min(self.C, self.positive_weight, self.intercept_scaling, self.target_norm) <= 0:
            raise ConfigError("C, positive_weight, intercept_scaling and target_norm must be positive")
        if self.C_positives < 0:
            raise ConfigError(f"C_positives must be 0 (one C for every class) or positive, not {self.C_positives}")
        if min(self.norm_sample, self.retrain_every, self.passes) < 1 or not 0 <= self.neg_iou < 1:
            raise ConfigError("norm_sample, retrain_every and passes must be at least 1, and 0 <= neg_iou < 1")
        if self.easy_threshold >= self.hard_threshold:
            raise ConfigError(f"easy_threshold ({self.easy_threshold}) must be below hard_threshold "
                              f"({self.hard_threshold})")


@dataclass(frozen=True)
class BboxParams:
    """Class-specific ridge box regressors on pool features (stage ``bbox``, R-CNN step 5).

    The pool features are rescaled to mean L2 norm ``target_norm``, estimated on
    ``norm_sample`` rows drawn with ``seed``: ``ridge_lambda`` is absolute.
    """

    min_iou: float
    ridge_lambda: float
    target_norm: float
    norm_sample: int
    seed: int

    def __post_init__(self) -> None:
        if not 0 < self.min_iou <= 1 or self.ridge_lambda < 0:
            raise ConfigError(f"need 0 < min_iou <= 1 and ridge_lambda >= 0, got {self.min_iou}, {self.ridge_lambda}")
        if self.target_norm <= 0 or self.norm_sample < 1:
            raise ConfigError(f"need target_norm > 0 and norm_sample >= 1, got {self.target_norm}, {self.norm_sample}")


@dataclass(frozen=True)
class DetectParams:
    """Test-time detection (stages ``detect``, ``fast_rcnn_detect``) and which recipes one run compares.

    ``recipes`` lists the recipes that get detections and an evaluation each
    (:data:`RECIPES`); ``scorer`` picks, for the feature recipes, the SVM
    scores or the cached network's softmax probabilities, and
    ``box_regression`` their ridge box regressors (for ``fast_rcnn_svm`` too:
    the regressors trained on its cached pool features, never the model's own
    ``bbox_pred``). The cap and the score threshold apply to every recipe, NMS
    to every recipe but Faster R-CNN's (:meth:`FasterRcnnParams.detection_params`).
    """

    recipes: tuple[Recipe, ...]
    scorer: Literal["svm", "softmax"]
    box_regression: bool
    nms_iou: float
    max_per_class: int
    score_threshold: float

    def __post_init__(self) -> None:
        if not self.recipes or len(set(self.recipes)) != len(self.recipes):
            raise ConfigError(f"recipes must be a non-empty list of distinct recipes, got {list(self.recipes)}")
        if not 0 < self.nms_iou <= 1 or self.max_per_class < 1:
            raise ConfigError(f"need 0 < nms_iou <= 1 and max_per_class >= 1, got {self.nms_iou}, {self.max_per_class}")

    def score_kind(self, recipe: str) -> Literal["svm", "probability"]:
        """What ``recipe``'s detection scores are: SVM margins (a feature recipe with the SVM scorer) or class
        probabilities (every other recipe), so a drawing can pick a lowest score that means something."""
        return "svm" if recipe in FEATURE_RECIPES and self.scorer == "svm" else "probability"

    @property
    def feature_recipes(self) -> tuple[str, ...]:
        """The recipes of ``recipes`` that go through svm, bbox and detect."""
        return tuple(r for r in self.recipes if r in FEATURE_RECIPES)

    @property
    def fast_rcnn_models(self) -> tuple[str, ...]:
        """The Fast R-CNN models the recipes need trained (an ``_svd`` or ``_svm`` recipe needs its model)."""
        return _models_of(self.recipes)

    @property
    def fast_rcnn_detectors(self) -> tuple[str, ...]:
        """The Fast R-CNN models that detect (``fast_rcnn_detect``): those of the recipes that are no feature recipe."""
        return _models_of(r for r in self.recipes if r not in FEATURE_RECIPES)

    @property
    def fast_rcnn_feature_models(self) -> tuple[str, ...]:
        """The Fast R-CNN models whose features a feature recipe caches (``fast_rcnn_recache``): ``fast_rcnn_svm``
        -> ``fast_rcnn``."""
        return _models_of(self.feature_recipes)

    @property
    def faster_rcnn_recipes(self) -> tuple[str, ...]:
        """The Faster R-CNN recipes of ``recipes`` (``faster_rcnn_detect``)."""
        return tuple(r for r in self.recipes if r in FASTER_RCNN_RECIPES)


def _models_of(recipes: typing.Iterable[str]) -> tuple[str, ...]:
    """The distinct trained Fast R-CNN models of ``recipes``, in order of first use."""
    return tuple(dict.fromkeys(trained_model(r) for r in recipes if trained_model(r) in FAST_RCNN_MODELS))


FAST_RCNN_TEST_KEYS = ("svd_ranks",)  # read at test time only: changing them never retrains a Fast R-CNN model


@dataclass(frozen=True)
class FastRcnnParams:
    """Fast R-CNN (stages ``fast_rcnn_train`` and ``fast_rcnn_detect``); the conv layers are
    ``finetune.arch``/``weights``.

    The sampler is the recipe's: ``fast_rcnn`` samples hierarchically
    (``rois_per_image`` RoIs per image, ``positive_fraction`` of them with IoU
    at least ``fg_iou``, background in ``[bg_iou_low, fg_iou)``);
    ``fast_rcnn_ohem`` keeps the ``ohem_rois`` highest-loss RoIs per image after
    NMS at ``ohem_nms`` (background from IoU 0).
    """

    scales: tuple[int, ...]
    max_side: int
    pooling: Literal["roi_pool", "roi_align"]
    pool_size: int
    hidden: int
    dropout: float
    learn_from: int
    images_per_batch: int
    rois_per_image: int
    positive_fraction: float
    fg_iou: float
    bg_iou_low: float
    ohem_rois: int
    ohem_nms: float
    roi_chunk: int
    loss_lambda: float
    target_means: tuple[float, ...]
    target_stds: tuple[float, ...]
    mirror: bool
    epochs: float
    max_iterations: int
    learning_rate: float
    momentum: float
    weight_decay: float
    lr_drop: float
    lr_gamma: float
    warmup: int
    svd_ranks: tuple[int, ...]
    seed: int

    def __post_init__(self) -> None:
        check_schedule(self)
        if not self.scales or min(self.scales) < 1 or self.max_side < max(self.scales):
            raise ConfigError(f"need scales >= 1 and max_side >= every scale, got {list(self.scales)}, {self.max_side}")
        if min(self.pool_size, self.hidden, self.images_per_batch, self.rois_per_image, self.ohem_rois,
               self.roi_chunk) < 1:
            raise ConfigError("pool_size, hidden, images_per_batch, rois_per_image, ohem_rois and roi_chunk must be "
                              "at least 1")
        if not 0 <= self.dropout < 1 or self.learn_from < 0 or self.loss_lambda < 0:
            raise ConfigError("need 0 <= dropout < 1, learn_from >= 0 and loss_lambda >= 0")
        if not 0 <= self.positive_fraction <= 1 or not 0 <= self.bg_iou_low < self.fg_iou <= 1:
            raise ConfigError(f"need 0 <= positive_fraction <= 1 and 0 <= bg_iou_low < fg_iou <= 1, got "
                              f"{self.positive_fraction}, {self.bg_iou_low}, {self.fg_iou}")
        if not 0 < self.ohem_nms <= 1:
            raise ConfigError(f"need 0 < ohem_nms <= 1, got {self.ohem_nms}")
        if len(self.target_means) != 4 or len(self.target_stds) != 4 or min(self.target_stds) <= 0:
            raise ConfigError("target_means and target_stds need 4 values each, the stds positive")
        if self.svd_ranks and (len(self.svd_ranks) != 2 or min(self.svd_ranks) < 1):
            raise ConfigError(f"svd_ranks must be [] or [fc6 rank, fc7 rank], both at least 1, got "
                              f"{list(self.svd_ranks)}")

    @classmethod
    def training_keys(cls) -> tuple[str, ...]:
        """The keys training reads: every key but :data:`FAST_RCNN_TEST_KEYS`."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in FAST_RCNN_TEST_KEYS)


@dataclass(frozen=True)
class RpnSchedule:
    """The SGD schedule of one region proposal network training step (``faster_rcnn.step1``, ``faster_rcnn.step4``)."""

    epochs: float
    max_iterations: int
    learning_rate: float
    momentum: float
    weight_decay: float
    lr_drop: float
    lr_gamma: float
    warmup: int

    def __post_init__(self) -> None:
        check_schedule(self)


# What each Faster R-CNN stage reads (the stage table lists them as its dependencies): every RPN training the
# first keys of faster_rcnn and these of fast_rcnn (the images, their batches, the network's layers), proposal
# generation and test time the proposal keys.
RPN_KEYS = ("anchor_sizes", "aspect_ratios", "fg_iou", "bg_iou", "anchors_per_image", "positive_fraction", "nms_iou",
            "min_size", "train_pre_nms", "train_proposals")
RPN_FAST_RCNN_KEYS = ("scales", "max_side", "mirror", "images_per_batch", "seed", "fg_iou", "pooling", "pool_size",
                      "hidden", "dropout", "learn_from", "target_means", "target_stds")
RPN_PROPOSAL_KEYS = ("nms_iou", "min_size", "train_pre_nms", "train_proposals", "test_pre_nms", "test_proposals")
# What Faster R-CNN's test stage reads of each section: its stage-table dependencies and its detections' record.
FASTER_DETECT_KEYS = {"detect": ("max_per_class", "score_threshold"), "fast_rcnn": ("scales", "max_side", "roi_chunk"),
                      "faster_rcnn": (*RPN_PROPOSAL_KEYS, "detection_nms_iou")}


@dataclass(frozen=True)
class FasterRcnnParams:
    """Faster R-CNN's region proposal network (stages ``rpn_train_*``, ``rpn_proposals_*``, ``faster_rcnn_joint``,
    ``faster_rcnn_detect``); the detector half is the ``fast_rcnn`` section's.

    Anchors of every ``anchor_sizes`` x ``aspect_ratios`` (height / width) at each
    cell of the stride-16 map, in pixels of the resized image. Training labels an
    anchor foreground at IoU >= ``fg_iou`` with a ground truth (and each ground
    truth's best anchor), background below ``bg_iou``, and samples
    ``anchors_per_image`` with at most ``positive_fraction`` foreground. Proposals:
    the ``*_pre_nms`` best-scoring boxes, those with a side under ``min_size``
    removed, NMS at ``nms_iou``, the ``*_proposals`` best kept. The detections of
    both Faster R-CNN recipes go through per-class NMS at ``detection_nms_iou``
    (:meth:`detection_params`) instead of ``detect.nms_iou``.
    """

    anchor_sizes: tuple[int, ...]
    aspect_ratios: tuple[float, ...]
    fg_iou: float
    bg_iou: float
    anchors_per_image: int
    positive_fraction: float
    nms_iou: float
    min_size: float
    train_pre_nms: int
    train_proposals: int
    test_pre_nms: int
    test_proposals: int
    detection_nms_iou: float
    step1: RpnSchedule
    step4: RpnSchedule

    def __post_init__(self) -> None:
        if (not self.anchor_sizes or min(self.anchor_sizes) < 1
                or not self.aspect_ratios or min(self.aspect_ratios) <= 0):
            raise ConfigError("anchor_sizes must be positive pixel sizes and aspect_ratios positive, both non-empty")
        if not 0 <= self.bg_iou <= self.fg_iou <= 1 or not 0 < self.positive_fraction <= 1:
            raise ConfigError(f"need 0 <= bg_iou <= fg_iou <= 1 and 0 < positive_fraction <= 1, got {self.bg_iou}, "
                              f"{self.fg_iou}, {self.positive_fraction}")
        if min(self.anchors_per_image, self.train_pre_nms, self.train_proposals, self.test_pre_nms,
               self.test_proposals) < 1 or not 0 < self.nms_iou <= 1 or self.min_size < 0:
            raise ConfigError("anchors_per_image and the proposal counts must be at least 1, 0 < nms_iou <= 1 "
                              "and min_size >= 0")
        if not 0 < self.detection_nms_iou <= 1:
            raise ConfigError(f"need 0 < detection_nms_iou <= 1, got {self.detection_nms_iou}")

    def proposal_counts(self, training: bool) -> tuple[int, int]:
        """``(pre-NMS, post-NMS)`` proposals per image: the training counts (the proposals a detector trains on)
        or the test counts."""
        return (self.train_pre_nms, self.train_proposals) if training else (self.test_pre_nms, self.test_proposals)

    def detection_params(self, detect: DetectParams) -> DetectParams:
        """``detect`` with this branch's per-class NMS, ``detection_nms_iou``, in place of ``detect.nms_iou``."""
        return dataclasses.replace(detect, nms_iou=self.detection_nms_iou)


@dataclass(frozen=True)
class EvaluateParams:
    """PASCAL VOC evaluation (stage ``evaluate``)."""

    iou: float
    gallery: int
    gallery_score: float
    gallery_probability: float

    def __post_init__(self) -> None:
        if not 0 < self.iou <= 1 or self.gallery < 0:
            raise ConfigError(f"need 0 < iou <= 1 and gallery >= 0, got {self.iou}, {self.gallery}")
        if not 0 <= self.gallery_probability <= 1:
            raise ConfigError(f"gallery_probability must be in [0, 1], got {self.gallery_probability}")

    def lowest_drawn(self, score_kind: str) -> float:
        """The lowest detection score a drawing shows: ``gallery_score`` for SVM margins, ``gallery_probability``
        for probabilities (:meth:`DetectParams.score_kind`)."""
        return self.gallery_score if score_kind == "svm" else self.gallery_probability


@dataclass(frozen=True)
class RuntimeParams:
    """How to run, never what to compute: no stage output depends on these.

    ``checkpoint_every``: training stages write a checkpoint every this many
    iterations (0 = never), from which a rerun after a crash resumes.
    """

    num_workers: int
    checkpoint_every: int

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be at least 0, got {self.checkpoint_every}")


@dataclass(frozen=True)
class Config:
    synthetic: SyntheticParams
    data: DataParams
    sharding: ShardingParams
    proposals: ProposalParams
    finetune: FinetuneParams
    features: FeatureParams
    sppnet: SppParams
    svm: SvmParams
    bbox: BboxParams
    fast_rcnn: FastRcnnParams
    faster_rcnn: FasterRcnnParams
    detect: DetectParams
    evaluate: EvaluateParams
    runtime: RuntimeParams

    def __post_init__(self) -> None:
        svd = [r for r in self.detect.recipes if r.endswith(SVD_SUFFIX)]
        if svd and not self.fast_rcnn.svd_ranks:
            raise ConfigError(f"detect.recipes lists {svd} but fast_rcnn.svd_ranks is [] (no compression)")


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate ``params.yaml``; raise :class:`ConfigError` naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameter file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the parameter file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return _build(Config, raw, str(path))


def as_dict(section: Any) -> dict[str, Any]:
    """One params section as plain data: what artifacts record and signatures hash."""
    return json.loads(json.dumps(dataclasses.asdict(section), sort_keys=True))


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    missing = [n for n in names if n not in raw]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {names}")
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    values = {n: _coerce(hints[n], raw[n], f"{where}:{n}") for n in names}
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{where}: unions are not supported in params dataclasses")
    return _scalar(hint, value, where)


def _scalar(hint: type, value: Any, where: str) -> Any:
    # bool is a subclass of int in Python: never accept True where a number is meant.
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
