"""Command line: ``python -m stages <command>``, the entry point ``dvc.yaml`` calls.

One command per entry of the stage table (:mod:`stages.table`), with an option
per dimension the stage fans out over (``--split``, ``--shard``, ``--recipe``);
each reads ``params.yaml`` once and calls the stage's ``run`` as the Luigi
tasks do (:func:`stages.core.stage.call`). Plus three tools: ``inspect``,
``show`` and ``predict``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.core.config import PARAMS_FILE, RECIPES, Config, load_config
from stages.core.errors import PipelineError
from stages.core.layout import CACHE
from stages.core.stage import Stage, call
from stages.table import TABLE

FAN_OUT_OPTIONS = {
    "split": {"help": "split name (data.train_split or data.test_split)"},
    "shard": {"type": int, "help": "shard index (sharding.shards)"},
    "recipe": {"choices": RECIPES, "help": "recipe (detect.recipes)"},
}


def _run_stage(stage: Stage):
    def run(cfg: Config, args: argparse.Namespace) -> None:
        from pipeline.dvc_yaml import check_recipes

        check_recipes(cfg)  # DVC runs this command: a stale dvc.yaml must not run the wrong recipes
        call(stage, cfg, {dim: getattr(args, dim) for dim in stage.fan_out})

    return run


def _inspect(cfg: Config | None, args: argparse.Namespace) -> None:
    from stages.tools import describe

    print(describe.describe(Path(args.path)))


def _show(cfg: Config, args: argparse.Namespace) -> None:
    from stages.tools import show

    out = show.run(cfg.data.splits, cfg.sharding.num_shards, args.image, args.out, args.proposals, args.recipe,
                   args.min_score, cfg.evaluate)
    print(f"wrote {out}")


def _predict(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline import address, producers_of, stale_upstream
    from stages.tools import predict

    models = predict.model_files(cfg, args.recipe)
    try:
        stale = stale_upstream(models)
    except PipelineError as exc:
        raise PipelineError(f"recipe {args.recipe}: {exc}") from None
    if stale:
        stages = " ".join(dict.fromkeys(address(s, item) for s, item in producers_of(models)))
        raise PipelineError(f"recipe {args.recipe}: the models it needs are missing or out of date (stale stage "
                            f"instances: {', '.join(stale)}); run `dvc repro {stages}` (or the whole pipeline: "
                            "`make run`) first")
    out = args.out or CACHE / "predict" / args.recipe
    drawn = cfg.evaluate.lowest_drawn(cfg.detect.score_kind(args.recipe))
    min_score = drawn if args.min_score is None else args.min_score
    counts = predict.run(cfg, args.recipe, args.images, out, min_score)
    print(f"wrote {out}: {counts['detections']} detections in {counts['images']} images "
          f"({counts['without_proposals']} without proposals)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages", description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in TABLE:
        p = commands.add_parser(stage.name, help=stage.help)
        for dim in stage.fan_out:
            p.add_argument(f"--{dim}", required=True, **FAN_OUT_OPTIONS[dim])
        p.set_defaults(func=_run_stage(stage))

    p = commands.add_parser("inspect", help="print a readable summary of any artifact")
    p.add_argument("path", type=Path)
    p.set_defaults(func=_inspect, needs_config=False)
    p = commands.add_parser("show", help="draw an image with its ground truth and proposals to a PNG")
    p.add_argument("--image", required=True, help="image id")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: features_cache/show/<id>.png)")
    p.add_argument("--proposals", type=int, default=50, help="how many top-ranked proposals to draw")
    p.add_argument("--recipe", choices=RECIPES, help="draw this recipe's detections instead of proposals")
    p.add_argument("--min-score", type=float, help="with --recipe: lowest score drawn (default: "
                   "evaluate.gallery_score for SVM scores, evaluate.gallery_probability for probabilities)")
    p.set_defaults(func=_show)
    p = commands.add_parser("predict", help="detect objects in new images with a trained recipe")
    p.add_argument("--recipe", choices=RECIPES, required=True, help="a recipe the pipeline trained")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders searched recursively for images")
    p.add_argument("--out", type=Path, help="output folder (default: features_cache/predict/<recipe>/)")
    p.add_argument("--min-score", type=float, help="lowest score drawn in the PNGs (default: "
                   "evaluate.gallery_score for SVM scores, evaluate.gallery_probability for probabilities); the JSON "
                   "holds every detection")
    p.set_defaults(func=_predict)
    return parser


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
