"""Command line: ``python -m stages <command>``, the entry point ``dvc.yaml`` calls.

Each pipeline command reads ``params.yaml`` once and calls the stage's ``run``
with the sections it needs; Luigi (``pipeline/``) calls the same functions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages import layout
from stages.config import PARAMS_FILE, Config, load_config
from stages.errors import PipelineError


def _synthetic(cfg: Config, args: argparse.Namespace) -> None:
    from stages import synth

    synth.run(cfg.synthetic, layout.SYNTHETIC)


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


def _inspect(cfg: Config | None, args: argparse.Namespace) -> None:
    from stages import inspect

    print(inspect.describe(Path(args.path)))


def _show(cfg: Config, args: argparse.Namespace) -> None:
    from stages import show

    out = show.run(cfg.data.splits, cfg.sharding.num_shards, args.image, args.out, args.proposals)
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

    p = commands.add_parser("inspect", help="print a readable summary of any artifact")
    p.add_argument("path", type=Path)
    p.set_defaults(func=_inspect, needs_config=False)
    p = commands.add_parser("show", help="draw an image with its ground truth and proposals to a PNG")
    p.add_argument("--image", required=True, help="image id")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: features_cache/show/<id>.png)")
    p.add_argument("--proposals", type=int, default=50, help="how many top-ranked proposals to draw")
    p.set_defaults(func=_show)
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
