"""What folding the frozen batch norms into the convs saves in training
(:func:`stages.models.batch_norms.fold_batch_norms`).

One training step of the conv trunk that Fast R-CNN and Faster R-CNN train (forward, a loss on the conv map,
backward), on a mini-batch shaped as ``fast_rcnn``'s default one (``images_per_batch`` images, the shorter side
``scales[0]``, 4:3), two ways side by side in one process, alternating :data:`ROUNDS` times after a warm-up:

* frozen: each batch norm a :class:`torchvision.ops.FrozenBatchNorm2d` after its conv (torchvision's detectors);
* folded: the norm folded into the conv before it, what the pipeline trains.

Printed: the median seconds of a step each way, the ratio, and how far the two conv maps differ (float rounding).
"""
from __future__ import annotations

import copy
import os
import statistics
import time

import torch

from bench.common import REPO, print_table
from stages.core.config import load_config
from stages.models.backbones import build_backbone
from stages.models.batch_norms import fold_batch_norms, freeze_batch_norms

ROUNDS = 5


def step_seconds(trunk: torch.nn.Module, images: torch.Tensor) -> tuple[float, torch.Tensor]:
    trunk.zero_grad()
    start = time.perf_counter()
    out = trunk(images)
    out.square().mean().backward()
    return time.perf_counter() - start, out.detach()


def main() -> list[dict]:
    cfg = load_config(REPO / "params.yaml")
    torch.manual_seed(0)
    features = build_backbone(cfg.finetune.arch, cfg.finetune.weights).features
    trunks = {"frozen": freeze_batch_norms(copy.deepcopy(features)).train(),
              "folded": fold_batch_norms(copy.deepcopy(features)).train()}
    side = cfg.fast_rcnn.scales[0]
    images = torch.randn(cfg.fast_rcnn.images_per_batch, 3, side, side * 4 // 3)
    seconds: dict[str, list[float]] = {name: [] for name in trunks}
    maps = {}
    for round_ in range(ROUNDS + 1):
        for name, trunk in trunks.items():
            spent, maps[name] = step_seconds(trunk, images)
            if round_:  # the first round warms up
                seconds[name].append(spent)
    frozen, folded = (statistics.median(seconds[name]) for name in trunks)
    difference = ((maps["folded"] - maps["frozen"]).abs().max() / maps["frozen"].abs().max()).item()
    rows = [{"trunk": cfg.finetune.arch, "batch": f"{tuple(images.shape)}", "frozen s/step": f"{frozen:.3f}",
             "folded s/step": f"{folded:.3f}", "speed-up": f"{frozen / folded:.2f}x",
             "max map difference / max": f"{difference:.1e}"}]
    device = f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"\nOne training step of the conv trunk, frozen batch norms against folded ones ({device}, median of "
          f"{ROUNDS}):")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
