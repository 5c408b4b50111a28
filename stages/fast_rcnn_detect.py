"""Stage ``fast_rcnn_detect``: Fast R-CNN test time, with the trained fc layers and with their truncated SVD.

For every image of the test split, in index order: one conv pass of the whole
image, resized so its shorter side is ``fast_rcnn.scales[0]`` and its longer
at most ``fast_rcnn.max_side``; every selective-search proposal of the image
(all shards) through the RoI head, ``fast_rcnn.roi_chunk`` at a time; for each
class its softmax probability and its own regressed box
(:func:`stages.ops.boxes.decode_boxes` of that class's deltas); then the
project's last step for every recipe (:func:`stages.data.detections.suppress`: the
``detect`` score threshold, clipping, per-class NMS and cap).

The same conv map also goes through a copy of the head whose fc6 and fc7 are
replaced by their truncated SVDs of ``fast_rcnn.svd_ranks``
(:meth:`stages.models.fast_rcnn.FastRcnn.compressed`; ``[]`` = no
compression), written as recipe ``<model>_svd``: the two heads are timed
side by side on the same maps.

Outputs: the detections of both heads in the ``detect`` stage's format
(:class:`stages.data.detections.DetectionWriter`: per-image HDF5 and COCO results
JSON), with provenance; the run records (:mod:`stages.core.runs`) hold the
seconds per image of the conv pass, of each head and of the whole detection.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core import runs
from stages.core.config import SVD_SUFFIX, DetectParams, FastRcnnParams, as_dict
from stages.core.device import autocast, pick_device
from stages.core.layout import index_file, proposals_dir
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError, PerImageReader
from stages.data.detections import DetectionWriter, suppress
from stages.models.fast_rcnn import FastRcnn, conv_pass, image_rois, load_fast_rcnn, resized_images
from stages.ops.boxes import as_boxes, decode_boxes


def class_boxes(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """``(M, 4)`` proposals, ``(M, K + 1, 4)`` deltas -> ``(M, K, 4)`` each class's regressed box (background dropped)."""
    m, classes = len(proposals), deltas.shape[1] - 1
    repeated = np.repeat(as_boxes(proposals), classes, axis=0)
    return decode_boxes(repeated, deltas[:, 1:].reshape(-1, 4)).reshape(m, classes, 4)


def head_outputs(model: FastRcnn, conv: torch.Tensor, rois: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(M, K + 1)`` probabilities and ``(M, K + 1, 4)`` deltas of ``(M, 5)`` RoIs, ``chunk`` RoIs at a time."""
    probs, deltas = [], []
    for s in range(0, len(rois), chunk):
        with autocast(conv.device):
            p, d = model.detect(conv, rois[s:s + chunk])
        probs.append(p.cpu().numpy())
        deltas.append(d.cpu().numpy())
    if not probs:
        return np.zeros((0, model.num_classes + 1), np.float32), np.zeros((0, model.num_classes + 1, 4), np.float32)
    return np.concatenate(probs), np.concatenate(deltas)


def detections(
    probs: np.ndarray, deltas: np.ndarray, proposals: np.ndarray, size: tuple[int, int], params: DetectParams
) -> dict[str, np.ndarray]:
    """One image's detections from its head outputs (the detect stage's format)."""
    scores = probs[:, 1:]
    rows, labels = np.nonzero(scores >= params.score_threshold)
    candidates = class_boxes(proposals[rows], deltas[rows])[np.arange(len(rows)), labels]
    return suppress(candidates, scores[rows, labels], labels, size, params)


def svd_attrs(attrs: dict, recipe: str, ranks: tuple[int, ...]) -> dict:
    """The ``_svd`` detections' provenance: the full head's plus the ranks, which only the ``_svd`` file records,
    so that a change of ranks leaves the full head's detections byte-identical and their evaluation not rerun."""
    params = {**attrs["params"], "fast_rcnn": {**attrs["params"]["fast_rcnn"], "svd_ranks": list(ranks)}}
    return {**attrs, "recipe": recipe + SVD_SUFFIX, "params": params}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    params: DetectParams,
    fast_rcnn: FastRcnnParams,
    recipe: str,
    test_split: str,
    num_shards: int,
    model_path: Path,
    out_path: Path,
    coco_path: Path,
    svd_path: Path,
    svd_coco_path: Path,
    num_workers: int = 0,
) -> None:
    """Detect with Fast R-CNN model ``recipe`` on ``test_split``: detections of the full and the SVD head."""
    model, device = load_fast_rcnn(model_path, baked=True), pick_device()
    # svd_ranks [] compresses nothing: the _svd recipe is then the same head, run once per image
    compressed = model.compressed(fast_rcnn.svd_ranks) if fast_rcnn.svd_ranks else model
    heads = {recipe: model, recipe + SVD_SUFFIX: compressed}
    for head in set(heads.values()):
        head.to(device)
    index_path = index_file(test_split)
    with PerImageReader([index_path]) as index, PerImageReader.sharded(proposals_dir(test_split), num_shards) as proposals:
        proposals.require_images_of(index)
        classes = [str(c) for c in index.json_attr("classes")]
        if classes != model.classes:
            raise ArtifactError(f"{model_path}: trained for classes {model.classes}, but the {test_split} index has "
                                f"{classes} (stale model; rerun fast_rcnn_train)")
        attrs = {
            "stage": "fast_rcnn_detect", "classes": classes, "split": test_split, "scores": params.score_kind(recipe),
            "params": {"detect": {k: v for k, v in as_dict(params).items() if k != "recipes"},
                       "fast_rcnn": {k: getattr(fast_rcnn, k) for k in ("scales", "max_side", "roi_chunk")}},
            "code_version": code_version("fast_rcnn_detect"),
            "inputs": {"index": file_digest(index_path), "model": file_digest(model_path),
                       **{str(p): file_digest(p) for p in proposals.paths}},
        }
        root = Path(index.attrs["data_root"])
        loader = resized_images([str(root / index.value("paths", i)) for i in range(len(index))], fast_rcnn.scales[0],
                                fast_rcnn.max_side, device, num_workers)
        seconds = {"conv": 0.0, **{name: 0.0 for name in heads}}
        start = time.perf_counter()
        with DetectionWriter(out_path, coco_path, {**attrs, "recipe": recipe}, classes) as full, \
                DetectionWriter(svd_path, svd_coco_path, svd_attrs(attrs, recipe, fast_rcnn.svd_ranks), classes) as svd, \
                torch.inference_mode():
            writers = {recipe: full, recipe + SVD_SUFFIX: svd}
            for i, (image, factor) in enumerate(tqdm(loader, total=len(index), desc=f"fast_rcnn_detect {recipe}",
                                                     unit="img")):
                boxes = as_boxes(proposals.rows("boxes", i))
                size = (int(index.value("widths", i)), int(index.value("heights", i)))
                tic = time.perf_counter()
                conv = conv_pass(model, image, device)
                synchronize(device)
                seconds["conv"] += time.perf_counter() - tic
                rois = image_rois(boxes, factor).to(device)
                done: dict[FastRcnn, tuple[dict[str, np.ndarray], float]] = {}
                for name, head in heads.items():
                    if head not in done:
                        tic = time.perf_counter()
                        probs, deltas = head_outputs(head, conv, rois, fast_rcnn.roi_chunk)
                        done[head] = detections(probs, deltas, boxes, size, params), time.perf_counter() - tic
                    found, spent = done[head]
                    writers[name].append(index.image_ids[i], found)
                    seconds[name] += spent
        wall, count = time.perf_counter() - start, len(index)
    images = max(1, count)
    for name, path in ((recipe, out_path), (recipe + SVD_SUFFIX, svd_path)):
        per_image = (seconds["conv"] + seconds[name]) / images
        runs.record(path, {"images": count, "conv_seconds_per_image": round(seconds["conv"] / images, 6),
                           "head_seconds_per_image": round(seconds[name] / images, 6),
                           "seconds_per_image": round(per_image, 6), "stage_wall_seconds": round(wall, 3)})
        print(f"fast_rcnn_detect {name} {test_split}: {writers[name].total} detections, {per_image:.4f} s/image "
              f"(conv {seconds['conv'] / images:.4f}, head and NMS {seconds[name] / images:.4f})", flush=True)
