"""Selective-search settings on BCCD's test split: recall, MABO, boxes and CPU seconds per image.

Not a speed ratio but a quality trade-off, measured side by side on the same
images: OpenCV's fast mode at the default ``max_side`` 500, at full resolution,
and quality mode. Skipped when ``../shared/datasets/BCCD`` is absent.
"""
from __future__ import annotations

import dataclasses
import json

from bench.common import BCCD, Workspace, print_table
from stages import proposals, recall
from stages.core import layout
from stages.core.store import PerImageReader

SETTINGS = {
    "fast, max_side 500 (default)": {},
    "fast, max_side 640 (full size)": {"max_side": 640},
    "quality, max_side 500": {"mode": "quality"},
}


def main() -> list[dict]:
    if not BCCD.is_dir():
        print(f"BCCD not found at {BCCD}: skipped")
        return []
    rows = []
    with Workspace() as ws:
        cfg = ws.config()
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(BCCD), on_error="skip"))
        ws.index(cfg)
        split = cfg.data.test_split
        for name, changes in SETTINGS.items():
            out = layout.proposals_shard(split, 0)
            proposals.run(dataclasses.replace(cfg.proposals, **changes), "skip", split, 0, 1, out, num_workers=0)
            with PerImageReader([layout.index_file(split)]) as index, PerImageReader([out]) as result:
                metrics, _ = recall.split_report(index, result)
            timing = json.loads(layout.timing_file(out).read_text())
            rows.append({"setting": name, **{k: metrics[k] for k in ("recall@0.5", "recall@0.7", "mabo", "boxes_per_image")},
                         "cpu s/img": timing["cpu_seconds"] / timing["images"]})
    print("\nSelective search settings, BCCD test split:")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
