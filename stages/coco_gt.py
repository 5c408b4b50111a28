"""Stage ``coco_gt``: the test split's ground truth as a COCO annotation file.

Output ``features_cache/coco/ground_truth_<split>.json``: ``images`` (``id``,
``file_name`` relative to the dataset root, ``image_name`` the VOC id,
``width``, ``height``), ``annotations`` (``id``, ``image_id``,
``category_id``, ``bbox`` ``[x, y, w, h]``, ``area``, ``iscrowd`` and
``ignore``: 1 for VOC ``difficult``) and ``categories`` (``id``, ``name``),
one entry a line; ids and box convention as :mod:`stages.data.coco`. The
detect stage's COCO results use the same ids, so
``COCO(this).loadRes(features_cache/detections/<recipe>.json)`` works as is.
"""
from __future__ import annotations

from pathlib import Path

from stages.core.atomic import write_text
from stages.core.store import PerImageReader
from stages.data import coco


def run(index: Path, out_path: Path) -> None:
    """Write the COCO ground truth of the split whose index file is ``index``."""
    with PerImageReader([index]) as reader:
        document = coco.ground_truth(reader)
    write_text(out_path, coco.dumps(document))
    difficult = sum(a["iscrowd"] for a in document["annotations"])
    print(f"coco_gt: {len(document['images'])} images, {len(document['annotations'])} boxes "
          f"({difficult} difficult, as iscrowd) -> {out_path}")
