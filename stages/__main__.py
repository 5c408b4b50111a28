"""Command line: ``python -m stages <command>``, the entry point ``dvc.yaml`` calls.

Each pipeline command reads ``params.yaml`` once and calls the stage's ``run``
with the sections it needs; Luigi (``pipeline/``) calls the same functions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.core import layout
from stages.core.config import PARAMS_FILE, Config, load_config
from stages.core.errors import PipelineError


def _synthetic(cfg: Config, args: argparse.Namespace) -> None:
    from stages import synthetic

    synthetic.run(cfg.synthetic, layout.SYNTHETIC)


def _index(cfg: Config, args: argparse.Namespace) -> None:
    from stages import index

    index.run(cfg.data, layout.INDEX, cfg.runtime.num_workers)


def _proposals(cfg: Config, args: argparse.Namespace) -> None:
    from stages import proposals

    proposals.run(
        cfg.proposals,
        cfg.data.on_error,
        args.split,
        args.shard,
        cfg.sharding.num_shards,
        layout.proposals_shard(args.split, args.shard),
        cfg.runtime.num_workers,
    )


def _recall(cfg: Config, args: argparse.Namespace) -> None:
    from stages import recall

    recall.run(cfg.data.splits, cfg.sharding.num_shards, layout.PROPOSAL_METRICS)


def _finetune(cfg: Config, args: argparse.Namespace) -> None:
    from stages import finetune

    finetune.run(
        cfg.finetune,
        cfg.data.train_split,
        cfg.sharding.num_shards,
        layout.FINETUNED_MODEL,
        layout.FINETUNE_CURVE,
        cfg.runtime.num_workers,
    )


def _features(cfg: Config, args: argparse.Namespace) -> None:
    from stages import features

    features.run(cfg.features, cfg.finetune, args.split, args.shard, cfg.sharding.num_shards, cfg.data.train_split,
                 layout.features_shard("rcnn", args.split, args.shard), cfg.runtime.num_workers)


def _spp_features(cfg: Config, args: argparse.Namespace) -> None:
    from stages import spp_features

    spp_features.run(cfg.sppnet, cfg.features, cfg.finetune, args.split, args.shard, cfg.sharding.num_shards,
                     cfg.data.train_split, layout.spp_shard(args.split, args.shard), cfg.runtime.num_workers)


def _spp_finetune(cfg: Config, args: argparse.Namespace) -> None:
    from stages import spp_finetune

    spp_finetune.run(cfg.sppnet, cfg.data.train_split, cfg.sharding.num_shards, layout.SPP_HEAD,
                     layout.SPP_FINETUNE_CURVE, cfg.runtime.num_workers)


def _spp_recache(cfg: Config, args: argparse.Namespace) -> None:
    from stages import spp_recache

    spp_recache.run(cfg.features, args.split, args.shard, cfg.sharding.num_shards, layout.SPP_HEAD,
                    layout.features_shard("sppnet", args.split, args.shard))


def _svm(cfg: Config, args: argparse.Namespace) -> None:
    from stages import svm

    svm.run(cfg.svm, args.recipe, cfg.data.train_split, cfg.sharding.num_shards, layout.svm_model(args.recipe),
            layout.svm_report(args.recipe), cfg.runtime.num_workers)


def _bbox(cfg: Config, args: argparse.Namespace) -> None:
    from stages import bbox

    bbox.run(cfg.bbox, args.recipe, cfg.data.train_split, cfg.sharding.num_shards, layout.bbox_model(args.recipe))


def _detect(cfg: Config, args: argparse.Namespace) -> None:
    from stages import detect

    detect.run(cfg.detect, args.recipe, cfg.data.test_split, cfg.sharding.num_shards, layout.svm_model(args.recipe),
               layout.bbox_model(args.recipe), layout.detections_file(args.recipe), layout.coco_detections(args.recipe))


def _evaluate(cfg: Config, args: argparse.Namespace) -> None:
    from stages import evaluate

    evaluate.run(cfg.evaluate, args.recipe, cfg.data.test_split, layout.detections_file(args.recipe),
                 layout.map_metrics(args.recipe), layout.pr_curve(args.recipe), layout.figures_dir(args.recipe))


def _inspect(cfg: Config | None, args: argparse.Namespace) -> None:
    from stages.tools import describe

    print(describe.describe(Path(args.path)))


def _show(cfg: Config, args: argparse.Namespace) -> None:
    from stages.tools import show

    out = show.run(cfg.data.splits, cfg.sharding.num_shards, args.image, args.out, args.proposals, args.recipe,
                   cfg.evaluate.gallery_score if args.min_score is None else args.min_score)
    print(f"wrote {out}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages", description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("synthetic", help="generate the default synthetic VOC dataset").set_defaults(func=_synthetic)
    commands.add_parser("index", help="read and validate the VOC dataset").set_defaults(func=_index)
    p = commands.add_parser("proposals", help="selective-search proposals of one shard of one split")
    p.add_argument("--split", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.set_defaults(func=_proposals)
    commands.add_parser("recall", help="proposal recall report (DVC metrics and plots)").set_defaults(func=_recall)
    commands.add_parser("finetune", help="fine-tune the backbone on warped regions (R-CNN step 2)").set_defaults(
        func=_finetune
    )
    for name, func, text in (
        ("features", _features, "R-CNN features of one shard of one split (R-CNN step 3)"),
        ("spp_features", _spp_features, "SPP-net pyramids of the pre-trained conv layers, one shard of one split"),
        ("spp_recache", _spp_recache, "fine-tuned SPP-net fc features of one shard of one split"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("--split", required=True)
        p.add_argument("--shard", type=int, required=True)
        p.set_defaults(func=func)
    commands.add_parser("spp_finetune", help="train the SPP-net fc layers on cached pyramids").set_defaults(
        func=_spp_finetune
    )
    for name, func, text in (
        ("svm", _svm, "per-class linear SVMs with hard-negative mining (R-CNN step 4)"),
        ("bbox", _bbox, "per-class ridge box regressors (R-CNN step 5)"),
        ("detect", _detect, "detections on the test split: scores, box regression, NMS"),
        ("evaluate", _evaluate, "PASCAL VOC AP and mAP, precision-recall curves, gallery"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("--recipe", required=True, choices=("rcnn", "sppnet"), help="feature branch")
        p.set_defaults(func=func)

    p = commands.add_parser("inspect", help="print a readable summary of any artifact")
    p.add_argument("path", type=Path)
    p.set_defaults(func=_inspect, needs_config=False)
    p = commands.add_parser("show", help="draw an image with its ground truth and proposals to a PNG")
    p.add_argument("--image", required=True, help="image id")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: features_cache/show/<id>.png)")
    p.add_argument("--proposals", type=int, default=50, help="how many top-ranked proposals to draw")
    p.add_argument("--recipe", choices=("rcnn", "sppnet"), help="draw this recipe's detections instead of proposals")
    p.add_argument("--min-score", type=float, help="with --recipe: lowest score drawn (default: evaluate.gallery_score)")
    p.set_defaults(func=_show)
    return parser


def execute(cfg: Config, argv: list[str]) -> None:
    """Run one pipeline command (``argv`` as after ``python -m stages``) with ``cfg``; errors propagate.

    The Luigi tasks call this with the same ``argv`` that ``dvc.yaml`` passes on
    the command line, so both orchestrators run literally the same command.
    """
    args = _parser().parse_args(argv)
    args.func(cfg, args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.params) if getattr(args, "needs_config", True) else None
        args.func(cfg, args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
