"""Stage ``rpn_proposals`` (entries ``rpn_proposals_2`` and ``rpn_proposals_4``): a trained RPN's proposals of one
shard of one split, in the selective-search shards' format.

Step 2 of the alternating training runs step 1's RPN (``m1``), step 4 also
writes the proposals of its RPN (``m3``): each image of the shard (the same
contiguous block as :func:`stages.proposals.shard_slice`), resized as the
detector's conv input (shorter side ``fast_rcnn.scales[0]``, longer at most
``fast_rcnn.max_side``), goes through one conv pass and the RPN
(:func:`stages.models.fast_rcnn.propose_image`): the ``train_pre_nms`` best
boxes, NMS at ``nms_iou``, the ``train_proposals`` best on the training split
(what the next detector trains on) and ``test_pre_nms`` / ``test_proposals`` on
the test split (what the detector sees at test time), best first, in image
pixels. The shards have the rows and attributes of the ``proposals`` stage's,
so ``fast_rcnn_train``, ``recall`` and ``show`` read them as they read
selective search's. An image for which the RPN proposes nothing gets no rows,
counted in the attribute ``without_proposals``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from stages.core import runs
from stages.core.config import RPN_PROPOSAL_KEYS, FasterRcnnParams, FastRcnnParams, as_dict
from stages.core.device import pick_device
from stages.core.layout import index_file
from stages.core.provenance import code_version, file_digest
from stages.core.store import ArtifactError, PerImageReader, create_per_image
from stages.models.fast_rcnn import FasterRcnn, load_fast_rcnn, propose_image, resized_images
from stages.proposals import ROWS, shard_slice


def load_rpn(path: Path) -> FasterRcnn:
    """The Faster R-CNN model of ``path`` for test time (eval mode, conv weights baked, on the CPU)."""
    model = load_fast_rcnn(path, baked=True)
    if not isinstance(model, FasterRcnn):
        raise ArtifactError(f"{path}: a Fast R-CNN model without a region proposal network")
    return model


def run(
    params: FasterRcnnParams,
    fast_rcnn: FastRcnnParams,
    split: str,
    shard: int,
    num_shards: int,
    train_split: str,
    model_path: Path,
    out_path: Path,
    num_workers: int = 0,
) -> None:
    """Write the proposals of the RPN of ``model_path`` for shard ``shard`` of ``num_shards`` of ``split``."""
    model, device = load_rpn(model_path), pick_device()
    model.to(device)
    training = split == train_split
    index_path = index_file(split)
    with PerImageReader([index_path]) as index:
        root = Path(index.attrs["data_root"])
        part = range(len(index))[shard_slice(len(index), shard, num_shards)]
        ids, paths = [index.image_ids[i] for i in part], [str(root / index.value("paths", i)) for i in part]
    attrs = {
        "stage": "rpn_proposals",
        "params": {"faster_rcnn": {k: v for k, v in as_dict(params).items() if k in RPN_PROPOSAL_KEYS},
                   "fast_rcnn": {"scales": list(fast_rcnn.scales), "max_side": fast_rcnn.max_side},
                   "data.train_split": train_split},
        "code_version": code_version("rpn_proposals"),
        "inputs": {"index": file_digest(index_path), "model": file_digest(model_path)},
        "split": split, "shard_index": shard, "num_shards": num_shards,
        "proposal_counts": list(params.proposal_counts(training)),
    }
    loader = resized_images(paths, fast_rcnn.scales[0], fast_rcnn.max_side, device, num_workers)
    without, start = 0, time.perf_counter()
    with create_per_image(out_path, ROWS, attrs) as writer, torch.inference_mode():
        for image_id, (image, factor) in tqdm(zip(ids, loader), total=len(ids), unit="img",
                                              desc=f"rpn_proposals {split} shard {shard}"):
            _, boxes = propose_image(model, image, params, training, device)
            without += len(boxes) == 0
            writer.append(image_id, {"boxes": (boxes / factor).cpu().numpy()})
        writer.file.attrs["without_proposals"] = without
    if without:
        print(f"warning: the RPN proposed nothing for {without} of {len(ids)} images", flush=True)
    seconds = time.perf_counter() - start
    runs.record(out_path, {"images": len(ids), "wall_seconds": round(seconds, 3),
                           "seconds_per_image": round(seconds / max(1, len(ids)), 6)})
