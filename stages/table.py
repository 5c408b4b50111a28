"""The stage table: the one place a stage is declared.

Each entry names the stage (and its module ``stages.<module>``, whose
``run(...)`` it calls), what it fans out over, the ``params.yaml`` keys its
outputs depend on, and its input and output artifacts. From this table come
the generated ``dvc.yaml`` (``python -m pipeline dvc-yaml``), the Luigi tasks
(``pipeline``) and the ``python -m stages <name>`` commands; how ``run``'s
parameters are bound is :func:`stages.core.stage.arguments`.

A stage that serves only some recipes names them (``needed_by``): it has no
instance unless ``detect.recipes`` holds one of them, so a run of Fast R-CNN
alone never fine-tunes R-CNN's network nor pools SPP-net's pyramids, and one
of Faster R-CNN alone runs no selective search. (The per-recipe stages fan out
over the recipes that need them instead.)

Faster R-CNN's alternating training is six entries of three modules, one per
step, each with its own model or proposals: ``rpn_train_1`` (step 1, RPN
``m1``), ``rpn_proposals_2`` (step 2, its proposals, and ``rpn_recall_2``
their recall), ``fast_rcnn_train_3`` (step 3, detector ``m2`` on them),
``rpn_train_4`` (step 4, RPN ``m3`` on ``m2``'s frozen trunk) with
``rpn_proposals_4`` and ``rpn_recall_4``, and ``fast_rcnn_train_5`` (step 5,
the final model ``faster_rcnn``: ``m3``'s trunk and RPN, fc layers retrained).
An entry's ``constants`` tell its module which step it runs.

Adding a stage: write ``stages/<name>.py`` with a typed ``run(...)``, add one
entry below, then ``make dvc.yaml``.
"""
from __future__ import annotations

from stages.core import layout
from stages.core.config import (FASTER_DETECT_KEYS, FASTER_RCNN_RECIPES, RECIPES, RPN_FAST_RCNN_KEYS, RPN_KEYS,
                                RPN_PROPOSAL_KEYS, SPP_PYRAMID_KEYS, SVD_SUFFIX, SVM_SUFFIX, FastRcnnParams)
from stages.core.stage import Output, Refs, Stage, metrics, plot

SELECTIVE_SEARCH_RECIPES = tuple(r for r in RECIPES if r not in FASTER_RCNN_RECIPES)  # Faster R-CNN proposes its own
FAST_RCNN_TRAINING = tuple(f"fast_rcnn.{k}" for k in FastRcnnParams.training_keys())


def _recall_outputs(r: Refs, rpn: str = "") -> dict[str, Output]:
    title = f"RPN {rpn} proposal recall" if rpn else "proposal recall"
    curves = {f"curve_{i}": plot(layout.recall_curve(split, rpn), "proposals", ("recall@0.5", "recall@0.7"),
                                 f"{title}, {split}") for i, split in enumerate(r.splits)}
    return {"metrics_path": metrics(layout.rpn_recall_metrics(rpn) if rpn else layout.PROPOSAL_METRICS), **curves}


def _split_shard_of_proposals(r: Refs) -> dict[str, str]:
    return {"images": r.data_root, "index": layout.index_file(r.split),
            "proposals": layout.proposals_shard(r.split, r.shard)}


def _rpn_train(step: int, model: str, init: str | None) -> Stage:
    """Alternating step ``step`` (1 or 4): train RPN ``model``, from ImageNet or from the detector ``init``."""
    return Stage(
        name=f"rpn_train_{step}", module="rpn_train", needed_by=("faster_rcnn",),
        help=f"Faster R-CNN step {step}: train the region proposal network {model}"
             + (f" on {init}'s frozen conv layers" if init else " and the conv layers from ImageNet"),
        constants=(("step", step),),
        params=("data.train_split", *(f"faster_rcnn.{k}" for k in RPN_KEYS), f"faster_rcnn.step{step}",
                *(f"fast_rcnn.{k}" for k in RPN_FAST_RCNN_KEYS), "finetune.arch", "finetune.weights"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.train_split),
                          **({"init_path": layout.faster_rcnn_model(init)} if init else {})},
        outputs=lambda r: {"model_path": Output(layout.faster_rcnn_model(model)),
                           "curve_path": plot(layout.faster_rcnn_curve(model), "iteration")},
    )


def _rpn_proposals(step: int, model: str) -> tuple[Stage, Stage]:
    """Step ``step``'s proposals of RPN ``model`` (one shard of one split) and their recall report."""
    proposals = Stage(
        name=f"rpn_proposals_{step}", module="rpn_proposals", needed_by=("faster_rcnn",),
        help=f"Faster R-CNN step {step}: the proposals of RPN {model}, one shard of one split",
        fan_out=("split", "shard"),
        params=("data.train_split", *(f"faster_rcnn.{k}" for k in RPN_PROPOSAL_KEYS), "fast_rcnn.max_side",
                "fast_rcnn.scales", "sharding"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.split),
                          "model_path": layout.faster_rcnn_model(model)},
        outputs=lambda r: {"out_path": Output(layout.rpn_proposals_shard(model, r.split, r.shard))},
    )
    recall = Stage(
        name=f"rpn_recall_{step}", module="recall", needed_by=("faster_rcnn",),
        help=f"recall report of RPN {model}'s proposals (DVC metrics and plots)",
        constants=(("rpn", model),),
        params=("data.train_split", "data.test_split", "sharding"),
        inputs=lambda r: {**{f"index_{s}": layout.index_file(s) for s in r.splits},
                          **{f"proposals_{s}": layout.rpn_proposals_dir(model, s) for s in r.splits}},
        outputs=lambda r: _recall_outputs(r, model),
    )
    return proposals, recall


def _detector_training(step: int, model: str, proposals: str, init: str | None) -> Stage:
    """Alternating step ``step`` (3 or 5): ``fast_rcnn_train`` of detector ``model`` on RPN ``proposals``."""
    return Stage(
        name=f"fast_rcnn_train_{step}", module="fast_rcnn_train", needed_by=("faster_rcnn",),
        help=f"Faster R-CNN step {step}: train the detector {model} on RPN {proposals}'s proposals"
             + (f", from {init} with its conv layers frozen" if init else ", from ImageNet"),
        constants=(("recipe", model),),
        params=("data.train_split", *FAST_RCNN_TRAINING, "finetune.arch", "finetune.weights", "sharding"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.train_split),
                          "proposals": layout.rpn_proposals_dir(proposals, r.train_split),
                          **({"init_path": layout.faster_rcnn_model(init)} if init else {})},
        outputs=lambda r: {"model_path": Output(layout.faster_rcnn_model(model)),
                           "curve_path": plot(layout.faster_rcnn_curve(model), "iteration")},
    )


TABLE: tuple[Stage, ...] = (
    Stage(
        name="synthetic", help="generate the default synthetic VOC dataset",
        params=("synthetic",),
        outputs=lambda r: {"out_dir": Output(layout.SYNTHETIC)},
    ),
    Stage(
        name="index", help="read and validate the VOC dataset",
        params=("data",),
        inputs=lambda r: {"images": r.data_root},
        outputs=lambda r: {"out_dir": Output(layout.INDEX)},
    ),
    Stage(
        name="proposals", help="selective-search proposals of one shard of one split",
        needed_by=SELECTIVE_SEARCH_RECIPES, fan_out=("split", "shard"),
        params=("data.on_error", "proposals", "sharding"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.split)},
        outputs=lambda r: {"out_path": Output(layout.proposals_shard(r.split, r.shard))},
    ),
    Stage(
        name="recall", help="proposal recall report (DVC metrics and plots)",
        needed_by=SELECTIVE_SEARCH_RECIPES,
        params=("data.train_split", "data.test_split", "sharding"),
        inputs=lambda r: {**{f"index_{s}": layout.index_file(s) for s in r.splits},
                          **{f"proposals_{s}": layout.proposals_dir(s) for s in r.splits}},
        outputs=_recall_outputs,
    ),
    Stage(
        name="finetune", help="fine-tune the backbone on warped regions (R-CNN step 2)",
        needed_by=("rcnn",),
        params=("data.train_split", "finetune", "sharding"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.train_split),
                          "proposals": layout.proposals_dir(r.train_split)},
        outputs=lambda r: {"model_path": Output(layout.FINETUNED_MODEL),
                           "curve_path": plot(layout.FINETUNE_CURVE, "iteration", ("loss", "accuracy"), "fine-tuning")},
    ),
    Stage(
        name="features", help="R-CNN features of one shard of one split (R-CNN step 3)",
        needed_by=("rcnn",),
        fan_out=("split", "shard"), params=("data.train_split", "features", "finetune", "sharding"),
        inputs=lambda r: {**_split_shard_of_proposals(r), "model": layout.FINETUNED_MODEL},
        outputs=lambda r: {"out_path": Output(layout.features_shard("rcnn", r.split, r.shard))},
    ),
    Stage(
        name="spp_features", help="SPP-net pyramids of the pre-trained conv layers, one shard of one split",
        needed_by=("sppnet",),
        fan_out=("split", "shard"),
        params=("data.train_split", "features.compression", "features.precision", "finetune.arch",
                "finetune.weights", "sharding", *(f"sppnet.{k}" for k in SPP_PYRAMID_KEYS)),
        inputs=_split_shard_of_proposals,
        outputs=lambda r: {"out_path": Output(layout.spp_shard(r.split, r.shard))},
    ),
    Stage(
        name="spp_finetune", help="train the SPP-net fc layers on cached pyramids",
        needed_by=("sppnet",),
        params=("data.train_split", "sharding", "sppnet"),
        inputs=lambda r: {"pyramids": layout.spp_dir(r.train_split)},
        outputs=lambda r: {"head_path": Output(layout.SPP_HEAD),
                           "curve_path": plot(layout.SPP_FINETUNE_CURVE, "iteration", ("loss", "accuracy"),
                                              "SPP-net fc fine-tuning")},
    ),
    Stage(
        name="spp_recache", help="fine-tuned SPP-net fc features of one shard of one split",
        needed_by=("sppnet",),
        fan_out=("split", "shard"), params=("features.compression", "features.precision", "sharding"),
        inputs=lambda r: {"pyramids": layout.spp_shard(r.split, r.shard), "head_path": layout.SPP_HEAD},
        outputs=lambda r: {"out_path": Output(layout.features_shard("sppnet", r.split, r.shard))},
    ),
    Stage(
        name="svm", help="per-class linear SVMs with hard-negative mining (R-CNN step 4)",
        fan_out=("recipe",), recipes="detect.feature_recipes", params=("data.train_split", "sharding", "svm"),
        inputs=lambda r: {"features": layout.features_dir(r.recipe, r.train_split)},
        outputs=lambda r: {"out_path": Output(layout.svm_model(r.recipe)),
                           "report_path": metrics(layout.svm_report(r.recipe))},
    ),
    Stage(
        name="bbox", help="per-class ridge box regressors (R-CNN step 5)",
        fan_out=("recipe",), recipes="detect.feature_recipes", params=("bbox", "data.train_split", "sharding"),
        inputs=lambda r: {"features": layout.features_dir(r.recipe, r.train_split)},
        outputs=lambda r: {"out_path": Output(layout.bbox_model(r.recipe))},
    ),
    Stage(
        name="detect", help="detections on the test split: scores, box regression, NMS",
        fan_out=("recipe",), recipes="detect.feature_recipes",
        params=("data.test_split", "detect.box_regression", "detect.max_per_class", "detect.nms_iou",
                "detect.score_threshold", "detect.scorer", "sharding"),
        inputs=lambda r: {"features": layout.features_dir(r.recipe, r.test_split),
                          "svm_path": layout.svm_model(r.recipe), "bbox_path": layout.bbox_model(r.recipe)},
        outputs=lambda r: {"out_path": Output(layout.detections_file(r.recipe)),
                           "coco_path": Output(layout.coco_detections(r.recipe))},
    ),
    Stage(
        name="fast_rcnn_train", help="train Fast R-CNN (RoI pooling, multi-task loss) on the training proposals",
        fan_out=("recipe",), recipes="detect.fast_rcnn_models",
        params=("data.train_split", *(f"fast_rcnn.{k}" for k in FastRcnnParams.training_keys()), "finetune.arch",
                "finetune.weights", "sharding"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.train_split),
                          "proposals": layout.proposals_dir(r.train_split)},
        outputs=lambda r: {"model_path": Output(layout.fast_rcnn_model(r.recipe)),
                           "curve_path": plot(layout.fast_rcnn_curve(r.recipe), "iteration")},
    ),
    Stage(
        name="fast_rcnn_recache", help="a trained Fast R-CNN model's pool, fc7 and softmax of one shard of one split",
        fan_out=("recipe", "split", "shard"), recipes="detect.fast_rcnn_feature_models",
        params=("data.train_split", "fast_rcnn.max_side", "fast_rcnn.roi_chunk", "fast_rcnn.scales",
                "features.compression", "features.precision", "sharding"),
        inputs=lambda r: {**_split_shard_of_proposals(r), "model_path": layout.fast_rcnn_model(r.recipe)},
        outputs=lambda r: {"out_path": Output(layout.features_shard(f"{r.recipe}{SVM_SUFFIX}", r.split, r.shard))},
    ),
    Stage(
        name="fast_rcnn_detect", help="Fast R-CNN detections on the test split, full and SVD-compressed fc layers",
        fan_out=("recipe",), recipes="detect.fast_rcnn_detectors",
        params=("data.test_split", "detect.max_per_class", "detect.nms_iou", "detect.score_threshold",
                "fast_rcnn.max_side", "fast_rcnn.roi_chunk", "fast_rcnn.scales", "fast_rcnn.svd_ranks", "sharding"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.test_split),
                          "proposals": layout.proposals_dir(r.test_split),
                          "model_path": layout.fast_rcnn_model(r.recipe)},
        outputs=lambda r: {"out_path": Output(layout.detections_file(r.recipe)),
                           "coco_path": Output(layout.coco_detections(r.recipe)),
                           "svd_path": Output(layout.detections_file(f"{r.recipe}{SVD_SUFFIX}")),
                           "svd_coco_path": Output(layout.coco_detections(f"{r.recipe}{SVD_SUFFIX}"))},
    ),
    _rpn_train(1, "m1", None),
    *_rpn_proposals(2, "m1"),
    _detector_training(3, "m2", "m1", None),
    _rpn_train(4, "m3", "m2"),
    *_rpn_proposals(4, "m3"),
    _detector_training(5, "faster_rcnn", "m3", "m3"),
    Stage(
        name="faster_rcnn_joint", help="Faster R-CNN by approximate joint training (RPN and detector losses summed)",
        needed_by=("faster_rcnn_joint",),
        params=("data.train_split", *(f"faster_rcnn.{k}" for k in RPN_KEYS), *FAST_RCNN_TRAINING,
                "finetune.arch", "finetune.weights"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.train_split)},
        outputs=lambda r: {"model_path": Output(layout.faster_rcnn_model("faster_rcnn_joint")),
                           "curve_path": plot(layout.faster_rcnn_curve("faster_rcnn_joint"), "iteration")},
    ),
    Stage(
        name="faster_rcnn_detect", help="Faster R-CNN detections on the test split: RPN and detector, one conv pass",
        fan_out=("recipe",), recipes="detect.faster_rcnn_recipes",
        params=("data.test_split", *(f"{section}.{k}" for section, keys in FASTER_DETECT_KEYS.items() for k in keys)),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.test_split),
                          "model_path": layout.faster_rcnn_model(r.recipe)},
        outputs=lambda r: {"out_path": Output(layout.detections_file(r.recipe)),
                           "coco_path": Output(layout.coco_detections(r.recipe))},
    ),
    Stage(
        name="coco_gt", help="the test split's ground truth as a COCO annotation file",
        params=("data.test_split",),
        inputs=lambda r: {"index": layout.index_file(r.test_split)},
        outputs=lambda r: {"out_path": Output(layout.coco_ground_truth(r.test_split))},
    ),
    Stage(
        name="evaluate", help="PASCAL VOC AP and mAP, COCO metrics (pycocotools), precision-recall curves, gallery",
        fan_out=("recipe",), params=("data.test_split", "evaluate"),
        inputs=lambda r: {"images": r.data_root, "index": layout.index_file(r.test_split),
                          "detections_path": layout.detections_file(r.recipe),
                          "coco_results_path": layout.coco_detections(r.recipe),
                          "coco_gt_path": layout.coco_ground_truth(r.test_split)},
        outputs=lambda r: {"metrics_path": metrics(layout.map_metrics(r.recipe)),
                           "pr_path": plot(layout.pr_curve(r.recipe), "recall"),
                           "figures_dir": Output(layout.figures_dir(r.recipe))},
    ),
)

STAGES = {stage.name: stage for stage in TABLE}
