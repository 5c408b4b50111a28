"""COCO files and metrics (stages.data.coco, stage coco_gt): ids, boxes, difficult as crowd, pycocotools' AP."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from stages import coco_gt
from stages.core import layout
from stages.core.store import ArtifactError, PerImageReader
from stages.data import coco

CLASSES = ["a", "b"]


def detections(boxes, scores, labels) -> dict[str, np.ndarray]:
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
            "labels": np.asarray(labels, np.int32)}


def test_ids_are_one_based_positions_and_class_indices():
    assert (coco.image_id(0), coco.image_id(4), coco.category_id(0), coco.category_id(1)) == (1, 5, 1, 2)
    assert coco.numbering(["x", "y"]) == {1: "x", 2: "y"}


def test_result_entries_round_boxes_to_xywh_and_keep_the_voc_id():
    found = detections([[1.234, 2.0, 5.5, 10.126]], [0.5], [1])
    (entry,) = coco.result_entries(3, "img_7", found, CLASSES)
    assert entry == {"image_id": 4, "image_name": "img_7", "category_id": 2, "category": "b",
                     "bbox": [1.23, 2.0, 4.27, 8.13], "score": 0.5}


def test_ground_truth_file_round_trips_through_pycocotools(workspace, capsys):
    path = workspace / "gt.json"
    coco_gt.run(layout.index_file("test"), path)
    assert "difficult, as iscrowd" in capsys.readouterr().out
    assert len(path.read_text().splitlines()) > 10  # one entry a line
    loaded = COCO(str(path))
    with PerImageReader([layout.index_file("test")]) as index:
        classes = index.json_attr("classes")
        assert [(c["id"], c["name"]) for c in loaded.loadCats(loaded.getCatIds())] == list(enumerate(classes, 1))
        assert loaded.getImgIds() == list(range(1, len(index) + 1))
        difficult_seen = 0
        for position, name in enumerate(index.image_ids):
            (image,) = loaded.loadImgs(position + 1)
            assert (image["image_name"], image["file_name"]) == (name, index.value("paths", position))
            assert (image["width"], image["height"]) == (index.value("widths", position), index.value("heights", position))
            annotations = loaded.loadAnns(loaded.getAnnIds(imgIds=position + 1))
            boxes = np.array([a["bbox"] for a in annotations]).reshape(-1, 4)
            gt = index.rows("gt_boxes", position)
            np.testing.assert_allclose(boxes, np.c_[gt[:, :2], gt[:, 2:] - gt[:, :2]], atol=0.005)
            np.testing.assert_allclose([a["area"] for a in annotations], boxes[:, 2] * boxes[:, 3], atol=0.01)
            assert [a["category_id"] - 1 for a in annotations] == index.rows("gt_labels", position).tolist()
            hard = index.rows("gt_difficult", position).astype(int).tolist()
            assert [a["iscrowd"] for a in annotations] == [a["ignore"] for a in annotations] == hard
            difficult_seen += sum(hard)
    assert difficult_seen > 0  # the generated dataset has difficult boxes
    assert sorted(a["id"] for a in loaded.dataset["annotations"]) == list(range(1, len(loaded.dataset["annotations"]) + 1))


# --- metrics on hand-made cases ------------------------------------------------------------------

# Two 100 x 100 images; image 1: a medium "a" box, a small difficult "a" box and a large "b" box; image 2: nothing.
GROUND_TRUTH = {
    "images": [{"id": 1, "file_name": "JPEGImages/p.jpg", "image_name": "p", "width": 100, "height": 100},
               {"id": 2, "file_name": "JPEGImages/q.jpg", "image_name": "q", "width": 100, "height": 100}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0, "ignore": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [70, 70, 10, 10], "area": 100, "iscrowd": 1, "ignore": 1},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 99], "area": 9900, "iscrowd": 0, "ignore": 0},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
}


def results(boxes, scores, labels, position: int = 0) -> list[dict]:
    return list(coco.result_entries(position, "pq"[position], detections(boxes, scores, labels), CLASSES))


def test_every_detection_on_its_ground_truth_scores_one():
    found = results([[10, 10, 50, 50], [0, 0, 100, 99]], [0.9, 0.8], [0, 1])
    metrics = coco.bbox_metrics(GROUND_TRUTH, found)
    assert metrics["APs"] is None  # no small box but the difficult one: pycocotools' -1
    assert metrics == {**{name: pytest.approx(1.0) for name in coco.METRICS}, "APs": None}


def test_a_detection_of_a_difficult_box_is_neither_true_nor_false(capsys):
    found = results([[70, 70, 80, 80], [10, 10, 50, 50], [0, 0, 100, 99]], [0.95, 0.9, 0.8], [0, 0, 1])
    assert coco.bbox_metrics(GROUND_TRUTH, found)["AP"] == pytest.approx(1.0)  # the top-scoring one is ignored
    assert capsys.readouterr().out == ""  # pycocotools' output is swallowed


def test_a_false_positive_first_lowers_ap():
    found = results([[60, 0, 70, 10], [10, 10, 50, 50], [0, 0, 100, 99]], [0.95, 0.9, 0.8], [0, 0, 1])
    assert coco.bbox_metrics(GROUND_TRUTH, found)["AP"] < 1.0


def test_no_detections_at_all_give_zero_where_there_is_ground_truth():
    metrics = coco.bbox_metrics(GROUND_TRUTH, [])
    assert metrics == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": None, "APm": 0.0, "APl": 0.0, "AR100": 0.0}


def test_dumps_writes_one_entry_a_line_and_loads_back():
    text = coco.dumps({**GROUND_TRUTH, "annotations": []})
    assert json.loads(text) == {**GROUND_TRUTH, "annotations": []}
    assert text.splitlines()[1] == json.dumps(GROUND_TRUTH["images"][0]) + ","


def test_checks_name_the_stale_file():
    coco.check_results(results([[0, 0, 1, 1]], [1], [0], position=1), ["p", "q"], "r.json")
    with pytest.raises(ArtifactError, match="r.json: a result for image 'q' has image_id 2, the index's number of 'x'"):
        coco.check_results(results([[0, 0, 1, 1]], [1], [0], position=1), ["p", "x"], "r.json")
    coco.check_ground_truth(GROUND_TRUTH, ["p", "q"], "g.json")
    with pytest.raises(ArtifactError, match="g.json: its images differ"):
        coco.check_ground_truth(GROUND_TRUTH, ["q", "p"], "g.json")
