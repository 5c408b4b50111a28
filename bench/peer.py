"""The peer: torchvision's own Faster R-CNN on the same backbone, trained for a given wall time, scored by our
``evaluate`` stage: ``python -m bench.peer --seconds S`` in a project whose ``index`` and ``coco_gt`` ran.

What a user would pick instead of this pipeline: ``torchvision.models.detection.FasterRCNN`` around the
registry backbone's stride-16 conv trunk (``finetune.arch`` with ``finetune.weights``, batch norms frozen
and the first ``fast_rcnn.learn_from`` modules fixed, as ours), with our anchors (``faster_rcnn.anchor_sizes``
and ``aspect_ratios``: torchvision's default generator is for five FPN levels), RoI align to 7 x 7 and
torchvision's defaults for the rest (its transform resizes the shorter side to ``fast_rcnn.scales[0]``, the
longer at most ``fast_rcnn.max_side``; RPN and box-head settings; score threshold 0.05, NMS 0.5, 100
detections per image). It trains by approximate joint training, two images per mini-batch drawn with
``fast_rcnn.seed``, flipped with probability 1/2, SGD at ``--lr`` (torchvision's reference: 0.02 for 16
images, so 0.0025 for 2) with momentum 0.9, weight decay 1e-4 and a linear warm-up, until ``--seconds``
have passed. It runs where our stages do (:func:`stages.core.device.pick_device`, under the same
autocast). Its detections go through the project's evaluate stage as recipe ``torchvision_peer``:
``features_cache/peer/`` holds them and ``map_torchvision_peer.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from tqdm import tqdm

from stages import evaluate
from stages.core import layout
from stages.core.config import Config, load_config
from stages.core.device import autocast, needs_grad_scaler, pick_device
from stages.core.store import PerImageReader
from stages.data.detections import DetectionWriter
from stages.data.images import load_image
from stages.models.backbones import build_backbone
from stages.models.batch_norms import freeze_batch_norms

RECIPE = "torchvision_peer"
PEER = layout.CACHE / "peer"
WARMUP = 50  # iterations of linear learning-rate warm-up


def peer_model(cfg: Config, num_classes: int) -> FasterRCNN:
    """torchvision's Faster R-CNN on the registry backbone's conv trunk (see the module docstring)."""
    backbone = build_backbone(cfg.finetune.arch, cfg.finetune.weights)
    trunk = freeze_batch_norms(backbone.features)
    for module in list(trunk.children())[:cfg.fast_rcnn.learn_from]:
        module.requires_grad_(False)
    trunk.out_channels = backbone.feature_channels
    anchors = AnchorGenerator((tuple(cfg.faster_rcnn.anchor_sizes),), (tuple(cfg.faster_rcnn.aspect_ratios),))
    return FasterRCNN(trunk, num_classes + 1, min_size=cfg.fast_rcnn.scales[0], max_size=cfg.fast_rcnn.max_side,
                      image_mean=list(backbone.mean), image_std=list(backbone.std), rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2))


def image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)


def training_batch(rng: np.random.Generator, paths: list[str], boxes: list[np.ndarray], labels: list[np.ndarray],
                   per_batch: int, device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``per_batch`` images drawn without replacement, each flipped with probability 1/2, and their targets,
    on ``device``."""
    images, targets = [], []
    for i in rng.choice(len(paths), min(per_batch, len(paths)), replace=False):
        image, box = load_image(paths[i]), boxes[i].copy()
        if rng.random() < 0.5:
            image, box[:, [0, 2]] = image[:, ::-1], image.shape[1] - box[:, [2, 0]]
        images.append(image_tensor(image).to(device))
        targets.append({"boxes": torch.from_numpy(box).to(device),
                        "labels": torch.from_numpy(labels[i] + 1).long().to(device)})
    return images, targets


def train(model: FasterRCNN, cfg: Config, seconds: float, lr: float, device: torch.device) -> int:
    """Train on the training split until ``seconds`` have passed; the iterations done."""
    with PerImageReader([layout.index_file(cfg.data.train_split)]) as index:
        root = Path(index.attrs["data_root"])
        paths = [str(root / index.value("paths", i)) for i in range(len(index))]
        boxes = [index.rows("gt_boxes", i).astype(np.float32) for i in range(len(index))]
        labels = [index.rows("gt_labels", i).astype(np.int64) for i in range(len(index))]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device))
    rng, start, iteration = np.random.default_rng(cfg.fast_rcnn.seed), time.perf_counter(), 0
    model.train()
    with tqdm(desc="torchvision peer", unit="it") as progress:
        while time.perf_counter() - start < seconds:
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (iteration + 1) / WARMUP)
            batch = training_batch(rng, paths, boxes, labels, cfg.fast_rcnn.images_per_batch, device)
            with autocast(device):
                loss = sum(model(*batch).values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return iteration


def detect(model: FasterRCNN, cfg: Config, out_path: Path, coco_path: Path, device: torch.device) -> float:
    """The peer's detections of the test split in the detections format; the seconds per image."""
    split = cfg.data.test_split
    with PerImageReader([layout.index_file(split)]) as index:
        root, classes = Path(index.attrs["data_root"]), [str(c) for c in index.json_attr("classes")]
        attrs = {"stage": "bench.peer", "recipe": RECIPE, "classes": classes, "split": split, "scores": "probability"}
        model.eval()
        start = time.perf_counter()
        with DetectionWriter(out_path, coco_path, attrs, classes) as writer, torch.inference_mode():
            for i in tqdm(range(len(index)), desc="torchvision peer, test", unit="img"):
                with autocast(device):
                    (found,) = model([image_tensor(load_image(root / index.value("paths", i))).to(device)])
                found = {key: value.cpu().numpy() for key, value in found.items()}
                writer.append(index.image_ids[i], {"boxes": found["boxes"].astype(np.float32),
                                                   "scores": found["scores"].astype(np.float32),
                                                   "labels": (found["labels"] - 1).astype(np.int32)})
        return (time.perf_counter() - start) / max(1, len(index))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, required=True, help="training wall time")
    parser.add_argument("--lr", type=float, default=0.0025, help="SGD learning rate (default 0.0025)")
    args = parser.parse_args(argv)
    cfg = load_config()
    with PerImageReader([layout.index_file(cfg.data.train_split)]) as index:
        num_classes = len(index.json_attr("classes"))
    torch.manual_seed(cfg.fast_rcnn.seed)
    device = pick_device()
    model = peer_model(cfg, num_classes).to(device)
    iterations = train(model, cfg, args.seconds, args.lr, device)
    out, coco = PEER / f"{RECIPE}.h5", PEER / f"{RECIPE}.json"
    per_image = detect(model, cfg, out, coco, device)
    metrics = PEER / f"map_{RECIPE}.json"
    evaluate.run(cfg.evaluate, RECIPE, cfg.data.test_split, out, coco, layout.coco_ground_truth(cfg.data.test_split),
                 metrics, PEER / f"pr_{RECIPE}.csv", PEER / f"figures_{RECIPE}")
    summary = {"training_seconds": args.seconds, "iterations": iterations, "test_seconds_per_image": per_image,
               **{k: v for k, v in json.loads(metrics.read_text()).items() if k.startswith("mAP")}}
    (PEER / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
