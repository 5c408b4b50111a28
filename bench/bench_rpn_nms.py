"""What NMS over a prefix of the ranking saves when an RPN proposes training regions
(:class:`stages.models.fast_rcnn.PrefixNmsRpn`).

Faster R-CNN's detector trains on the RPN's best ``faster_rcnn.train_proposals`` (2000) boxes after NMS of its
best ``train_pre_nms`` (12000, the paper's): at every joint-training step and for every training image of the
alternating steps 2 and 4. Greedy NMS over 12000 boxes costs about the square of that; when NMS over the best
3 x 2000 already keeps 2000, those are the same proposals. This times torchvision's proposal filtering (top-N,
clipping, NMS) of one image's anchors at the default settings both ways, side by side in one process, on boxes
and scores drawn at random over a 600 x 800 image (one map cell per 16 pixels, 9 anchors a cell), and checks
that both keep the same boxes (boxes of equal score may come in another order). Printed: the median seconds
each way and the ratio.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from torchvision.models.detection.rpn import RegionProposalNetwork

from bench.common import REPO, print_table
from stages.core.config import load_config
from stages.models.fast_rcnn import FasterRcnn

ROUNDS, HEIGHT, WIDTH, ANCHORS_PER_CELL = 5, 600, 800, 9


def random_ranking(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, A, 4)`` boxes 16 to 300 pixels wide and high anywhere in the image, and ``(A, 1)`` logits."""
    count = (HEIGHT // 16) * (WIDTH // 16) * ANCHORS_PER_CELL
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([WIDTH, HEIGHT])
    size = 16 + torch.rand(count, 2, generator=generator) * 284
    return torch.cat([corner, corner + size], 1)[None], torch.randn(count, 1, generator=generator)


def main() -> list[dict]:
    params = load_config(REPO / "params.yaml").faster_rcnn
    model = FasterRcnn("efficientnet_lite0", 1, "roi_align", 7, 16, 0.0, 0, [0.0] * 4, [0.1, 0.1, 0.2, 0.2],
                       anchor_sizes=params.anchor_sizes, aspect_ratios=params.aspect_ratios)
    network = model.proposal_network(params, training=True)
    ways = {"NMS over all": lambda *a: RegionProposalNetwork.filter_proposals(network, *a),
            "over a prefix first": network.filter_proposals}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    generator = torch.Generator().manual_seed(0)
    for _ in range(ROUNDS):
        boxes, logits = random_ranking(generator)
        kept = []
        for name, filter_proposals in ways.items():
            start = time.perf_counter()
            (proposals,), (scores,) = filter_proposals(boxes, logits, [(HEIGHT, WIDTH)], [len(logits)])
            seconds[name].append(time.perf_counter() - start)
            kept.append((proposals.unique(dim=0), scores))
        (full_boxes, full_scores), (prefix_boxes, prefix_scores) = kept
        if not (torch.equal(full_boxes, prefix_boxes) and torch.equal(full_scores, prefix_scores)):
            raise AssertionError("the prefix NMS kept other boxes than the full NMS")
    full, prefix = (statistics.median(seconds[name]) for name in ways)
    rows = [{"boxes": f"{len(logits)} anchors, best {params.train_pre_nms}, {params.train_proposals} kept",
             "NMS over all s": full, "prefix first s": prefix, "speed-up": f"{full / prefix:.2f}x"}]
    print(f"\nRPN training proposals of one image, NMS over all the best boxes against a prefix first "
          f"(CPU, {os.cpu_count()} cores, median of {ROUNDS}):")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
