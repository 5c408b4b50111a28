"""Stage ``proposals``: selective-search region proposals (R-CNN step 1).

Uses OpenCV contrib's ``cv2.ximgproc.segmentation`` selective search, in fast
or quality mode. Each image is resized so its longer side is at most
``max_side`` before segmentation; boxes are scaled back to the original image,
clipped, filtered by ``min_size``, de-duplicated and capped at ``max_boxes`` in
selective-search rank order.

Determinism: OpenCV ranks its regions with the C library's ``rand()``, which it
never seeds. We seed it (``srand``) right before each image's segmentation
with a seed derived from ``proposals.seed`` and the image id, so the output of
an image depends on nothing else: not on worker, shard or processing order.

Output per shard: ``features_cache/proposals/<split>/shard-K.h5`` with rows
``boxes (M, 4) float32`` per image (see :mod:`stages.core.store`), attributes
``split``, ``shard_index``, ``num_shards``, ``failed`` and the provenance; and
``shard-K.timing.json`` with the seconds spent (kept out of the HDF5 file so
that file stays byte-identical between runs).
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from stages.core import faults, runs
from stages.core.config import ProposalParams, as_dict
from stages.core.errors import PipelineError
from stages.core.layout import index_file
from stages.core.provenance import code_version, file_digest
from stages.core.store import PerImageReader, RowSpec, create_per_image
from stages.data.images import ImageError, load_image
from stages.ops.boxes import as_boxes, clip_boxes, min_side, unique_boxes, xywh_to_xyxy

ROWS = {"boxes": RowSpec((4,), np.float32)}
_LIBC = ctypes.CDLL(None)


class ProposalError(PipelineError, RuntimeError):
    """Selective search failed on an image and ``data.on_error`` is ``raise``."""


@dataclass(frozen=True)
class ImageProposals:
    boxes: np.ndarray  # (M, 4) float32
    seconds: float
    error: str | None = None


def image_seed(seed: int, image_id: str) -> int:
    """A per-image seed for ``srand``; glibc treats 0 as 1, so 0 is never returned."""
    return zlib.crc32(f"{seed}:{image_id}".encode()) or 1


def selective_search(image_rgb: np.ndarray, params: ProposalParams, seed: int) -> np.ndarray:
    """``(H, W, 3)`` RGB image -> ``(M, 4)`` boxes in original pixel coordinates, rank order."""
    height, width = image_rgb.shape[:2]
    scale = min(1.0, params.max_side / max(height, width))
    small = image_rgb
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV wants BGR
    switch = search.switchToSelectiveSearchFast if params.mode == "fast" else search.switchToSelectiveSearchQuality
    switch(params.base_k, params.inc_k, params.sigma)
    _LIBC.srand(ctypes.c_uint(seed))
    rects = search.process()
    boxes = xywh_to_xyxy(rects)
    factors = np.array([width, height, width, height], np.float32) / np.array(
        [small.shape[1], small.shape[0]] * 2, np.float32
    )
    return filter_boxes(boxes * factors, width, height, params)


def filter_boxes(boxes: np.ndarray, width: int, height: int, params: ProposalParams) -> np.ndarray:
    """Clip to the image, drop boxes thinner than ``min_size``, de-duplicate, keep the first ``max_boxes``."""
    boxes = clip_boxes(as_boxes(boxes), width, height)
    boxes = boxes[min_side(boxes) >= params.min_size]
    boxes = boxes[unique_boxes(boxes)]
    return boxes[: params.max_boxes]


def propose_image(task: tuple[str, str], params: ProposalParams) -> ImageProposals:
    """Worker entry: proposals for one image; a failure is returned, not raised, to name the image."""
    image_id, path = task
    start = time.process_time()
    try:
        boxes = selective_search(load_image(path), params, image_seed(params.seed, image_id))
    except (ImageError, cv2.error) as exc:
        return ImageProposals(as_boxes([]), time.process_time() - start, f"{path}: {exc}")
    return ImageProposals(boxes, time.process_time() - start)


def shard_slice(num_images: int, shard: int, num_shards: int) -> slice:
    """Contiguous block of images of ``shard``; shards in order concatenate to the whole split."""
    bounds = np.linspace(0, num_images, num_shards + 1).round().astype(int)
    return slice(int(bounds[shard]), int(bounds[shard + 1]))


def _init_worker() -> None:
    cv2.setNumThreads(1)  # parallelism comes from processes, one image each


def run(
    params: ProposalParams,
    on_error: str,
    split: str,
    shard: int,
    num_shards: int,
    out_path: Path,
    num_workers: int = 0,
) -> None:
    """Compute proposals for shard ``shard`` of ``num_shards`` of ``split``, written to ``out_path``."""
    faults.reached("start")
    index_path = index_file(split)
    with PerImageReader([index_path]) as index:
        root = Path(index.attrs["data_root"])
        part = range(len(index))[shard_slice(len(index), shard, num_shards)]
        tasks = [(index.image_ids[i], str(root / index.value("paths", i))) for i in part]
    attrs = {
        "stage": "proposals",
        "params": {"proposals": as_dict(params), "data.on_error": on_error},
        "code_version": code_version("proposals"),
        "inputs": {"index": file_digest(index_path)},
        "split": split,
        "shard_index": shard,
        "num_shards": num_shards,
    }
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(tasks)))
    wall = time.perf_counter()
    failed, seconds = [], 0.0
    # Spawned, not forked: a fork of a process whose OpenCV or torch thread pools are
    # already running can deadlock in the child.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker) as pool:
        results = pool.map(propose_image, tasks, [params] * len(tasks))
        with create_per_image(out_path, ROWS, attrs) as writer:
            for (image_id, _), result in tqdm(
                zip(tasks, results), total=len(tasks), desc=f"proposals {split} shard {shard}", unit="img"
            ):
                if result.error:
                    if on_error == "raise":
                        raise ProposalError(f"selective search failed: {result.error} (data.on_error: skip to skip)")
                    failed.append(result.error)
                writer.append(image_id, {"boxes": result.boxes})
                seconds += result.seconds
            writer.file.attrs["failed"] = json.dumps(failed)
    for message in failed:
        print(f"warning: no proposals for {message}", flush=True)
    timing = {"images": len(tasks), "cpu_seconds": seconds, "wall_seconds": time.perf_counter() - wall}
    runs.record(out_path, timing)
