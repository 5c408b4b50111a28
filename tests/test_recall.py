from __future__ import annotations

import json

import numpy as np
import pytest

from stages import recall
from stages.core import layout
from stages.core.store import PerImageReader, RowSpec, create_per_image
from stages.recall import best_overlaps, split_report

GT = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
# IoU with GT[0] / GT[1], by hand:
PROPOSALS = np.array(
    [
        [0, 0, 10, 5],  # 50/100 = 0.5 with GT[0]
        [20, 20, 30, 30],  # exactly GT[1]: 1.0
        [0, 0, 10, 8],  # 80/100 = 0.8 with GT[0]
    ],
    np.float32,
)


def test_best_overlaps_among_the_first_k_proposals():
    got = best_overlaps(GT, PROPOSALS, (1, 2, 3, 10))
    np.testing.assert_allclose(got, [[0.5, 0.5, 0.8, 0.8], [0.0, 1.0, 1.0, 1.0]], rtol=1e-6)


def test_best_overlaps_without_proposals_or_ground_truth():
    assert best_overlaps(GT, np.zeros((0, 4), np.float32), (1, 5)).tolist() == [[0, 0], [0, 0]]
    assert best_overlaps(np.zeros((0, 4), np.float32), PROPOSALS, (1, 5)).shape == (0, 2)


def write(path, rows: dict, per_image: dict | None = None, **attrs) -> None:
    specs = {name: RowSpec(np.asarray(values[0]).shape[1:], np.asarray(values[0]).dtype) for name, values in rows.items()}
    with create_per_image(path, specs, attrs) as writer:
        for i, image_id in enumerate(["a", "b"]):
            writer.append(image_id, {name: values[i] for name, values in rows.items()})


@pytest.fixture
def readers(tmp_path):
    """Two images: 'a' holds GT and the proposals above (plus a difficult box), 'b' one unmatched box."""
    write(
        tmp_path / "index.h5",
        {
            "gt_boxes": [np.vstack([GT, [[40, 40, 50, 50]]]), np.array([[0, 0, 4, 4]], np.float32)],
            "gt_labels": [np.array([0, 1, 1], np.int32), np.array([0], np.int32)],
            "gt_difficult": [np.array([False, False, True]), np.array([False])],
        },
        classes=["x", "y"],
    )
    write(tmp_path / "props.h5", {"boxes": [PROPOSALS, np.array([[50, 50, 60, 60]], np.float32)]})
    with PerImageReader([tmp_path / "index.h5"]) as index, PerImageReader([tmp_path / "props.h5"]) as props:
        yield index, props


def test_split_report_by_hand(readers):
    metrics, curve = split_report(*readers)
    # Non-difficult GT: a/0 best 0.8, a/1 best 1.0, b/0 best 0.0 -> recall@0.5 = 2/3, recall@0.7 = 2/3.
    assert metrics["gt_boxes"] == 3 and metrics["images"] == 2
    assert metrics["recall@0.5"] == pytest.approx(2 / 3) and metrics["recall@0.7"] == pytest.approx(2 / 3)
    # MABO: class x = mean(0.8, 0.0) = 0.4, class y = 1.0 -> 0.7.
    assert metrics["mabo"] == pytest.approx(0.7)
    assert metrics["boxes_per_image"] == 2.0
    assert [row["proposals"] for row in curve] == [1, 2, 3]
    # k=1: a/0 0.5, a/1 0.0, b/0 0.0 -> recall@0.5 1/3, recall@0.7 0.
    assert curve[0]["recall@0.5"] == pytest.approx(1 / 3) and curve[0]["recall@0.7"] == 0.0


def test_split_report_rejects_proposals_of_other_images(tmp_path, readers):
    index, _ = readers
    with create_per_image(tmp_path / "other.h5", {"boxes": RowSpec((4,), np.float32)}, {}) as writer:
        writer.append("z", {"boxes": PROPOSALS})
    with PerImageReader([tmp_path / "other.h5"]) as other, pytest.raises(ValueError, match="stale"):
        split_report(index, other)


def test_run_writes_metrics_and_curves(workspace, tiny_config):
    from stages import proposals

    for split in tiny_config.data.splits:
        proposals.run(tiny_config.proposals, "raise", split, 0, 1, layout.proposals_shard(split, 0), num_workers=1)
    recall.run(tiny_config.data.splits, 1, layout.PROPOSAL_METRICS)
    metrics = json.loads(layout.PROPOSAL_METRICS.read_text())
    assert set(metrics) == {"trainval", "test"}
    assert metrics["test"]["images"] == 4 and "seconds_per_image" not in metrics["test"]  # a run-to-run fact
    lines = layout.recall_curve("test").read_text().splitlines()
    assert lines[0] == "proposals,recall@0.5,recall@0.7"
    recalls = [float(line.split(",")[1]) for line in lines[1:]]
    assert recalls == sorted(recalls) and recalls[-1] == pytest.approx(metrics["test"]["recall@0.5"])
