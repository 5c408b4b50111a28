"""Detection (stage detect) on hand-built feature caches: thresholds, box regression, clipping, NMS, outputs."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from helpers import write_features
from pycocotools.coco import COCO

from stages import coco_gt, detect, index
from stages.core import layout, runs
from stages.core.config import DetectParams
from stages.core.store import ArtifactError, PerImageReader, create_per_image
from stages.data.detections import DetectionWriter
from stages.models.box_regressor import BoxRegressor
from stages.models.svm import SvmModel

CLASSES = ["a", "b"]
PARAMS = DetectParams(recipes=("rcnn",), scorer="softmax", box_regression=False, nms_iou=0.3, max_per_class=100,
                      score_threshold=-1.5)
# Image "one" (100 x 80): proposals and their class scores (a, b), exact in float16 (the cached fc dtype).
BOXES = np.array([
    [10, 10, 50, 50],  # p0  a 0.875            b -2 (dropped)
    [12, 10, 52, 50],  # p1  a 0.75: IoU 1520/1680 = 0.90 with p0 -> suppressed in a;  b 0.5 kept
    [35, 10, 75, 50],  # p2  a 0.625: IoU 600/2600 = 0.23 with p0 -> kept;             b -2
    [60, 40, 120, 100],  # p3  a -3;  b 0.375, clipped to [60, 40, 100, 80]
    [0, 0, 10, 10],  # p4  a -1.625 (below -1.5);  b -1.0
    [200, 200, 250, 250],  # p5  a 5: outside the image, empty once clipped -> dropped
    [10, 10, 50, 50],  # ground-truth row (gt_label 0), a 9: never a detection
], np.float32)
SCORES = np.array([[0.875, -2], [0.75, 0.5], [0.625, -2], [-3, 0.375], [-1.625, -1.0], [5, -2], [9, 9]], np.float32)
EXPECTED = {  # (label, score, box) in output order: by class, then decreasing score
    "boxes": [[10, 10, 50, 50], [35, 10, 75, 50], [12, 10, 52, 50], [60, 40, 100, 80], [0, 0, 10, 10]],
    "scores": [0.875, 0.625, 0.5, 0.375, -1.0],
    "labels": [0, 0, 1, 1, 1],
}


def image(image_id: str, boxes: np.ndarray, scores: np.ndarray, labels: list[int], size=(100, 80)) -> dict:
    """A test-split image whose fc features are its class scores and whose pool features are constant."""
    n = len(boxes)
    softmax = np.concatenate([np.zeros((n, 1), np.float32), scores], axis=1)  # column 0: background
    return {"id": image_id, "boxes": boxes, "gt_label": np.array(labels, np.int32), "pool": np.ones((n, 3), np.float32),
            "fc": scores, "scores": softmax, "size": size, "iou": np.zeros((n, len(CLASSES)), np.float32)}


IMAGES = [
    image("one", BOXES, SCORES, [-1] * 6 + [0]),
    image("quiet", BOXES[:3], np.full((3, 2), -5, np.float32), [-1] * 3),  # nothing above the threshold
    image("empty", np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32), []),  # no proposals at all
]


@pytest.fixture
def cache(workspace):
    """The test split's rcnn features (2 shards), an SVM file whose scores equal the fc features, a box regressor."""
    write_features("test", IMAGES, CLASSES, num_shards=2, model="finetuned")
    SvmModel(np.eye(2, dtype=np.float32), np.zeros(2, np.float32), 1.0, CLASSES).save(layout.svm_model("rcnn"), {})
    # class a moves every box right by a tenth of its width; class b is untrained
    regressor = BoxRegressor(
        weights=np.zeros((2, 3, 4), np.float32), biases=np.zeros((2, 4), np.float32),
        target_mean=np.array([[0.1, 0, 0, 0], [0.5, 0.5, 0, 0]], np.float32), target_std=np.ones((2, 4), np.float32),
        feature_scale=1.0, classes=CLASSES, trained=np.array([True, False]),
    )
    regressor.save(layout.bbox_model("rcnn"), {})
    return workspace


def detect_run(params: DetectParams = PARAMS, **changes) -> dict[str, dict[str, np.ndarray]]:
    """Run the stage; return ``{image_id: {boxes, scores, labels}}`` from its output file."""
    detect.run(dataclasses.replace(params, **changes), "rcnn", "test", 2, layout.svm_model("rcnn"),
               layout.bbox_model("rcnn"), layout.detections_file("rcnn"), layout.coco_detections("rcnn"))
    with PerImageReader([layout.detections_file("rcnn")]) as reader:
        return {image_id: {name: reader.rows(name, i) for name in ("boxes", "scores", "labels")}
                for i, image_id in enumerate(reader.image_ids)}


def assert_detections(got: dict[str, np.ndarray], expected: dict[str, list]) -> None:
    np.testing.assert_allclose(got["boxes"], np.array(expected["boxes"], np.float32).reshape(-1, 4), rtol=1e-6)
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-6)
    np.testing.assert_array_equal(got["labels"], expected["labels"])


def test_threshold_clip_nms_and_every_image(cache):
    result = detect_run()
    assert list(result) == ["one", "quiet", "empty"]  # every image, in index order, across both shards
    assert_detections(result["one"], EXPECTED)
    for quiet in ("quiet", "empty"):
        assert result[quiet]["boxes"].shape == (0, 4) and len(result[quiet]["scores"]) == 0
    got = result["one"]
    assert (got["boxes"].dtype, got["scores"].dtype, got["labels"].dtype) == (np.float32, np.float32, np.int32)


def test_svm_scorer_scores_the_fc_features(cache):
    assert_detections(detect_run(scorer="svm")["one"], EXPECTED)  # the SVM file is the identity on fc


def test_nms_threshold_and_max_per_class(cache):
    # NMS at 0.95: p1 (IoU 0.90 with p0) survives in class a
    assert detect_run(nms_iou=0.95)["one"]["scores"].tolist() == [0.875, 0.75, 0.625, 0.5, 0.375, -1.0]
    assert_detections(detect_run(max_per_class=1)["one"], {
        "boxes": [EXPECTED["boxes"][0], EXPECTED["boxes"][2]], "scores": [0.875, 0.5], "labels": [0, 1]})


def test_score_threshold(cache):
    assert detect_run(score_threshold=0.6)["one"]["scores"].tolist() == [0.875, 0.625]  # b's best is 0.5


def test_box_regression_moves_boxes_before_clipping_and_nms(cache):
    got = detect_run(box_regression=True)["one"]
    # class a: +0.1 width -> p0 [14, 10, 54, 50], p2 [39, 10, 79, 50]; class b untrained: unchanged
    assert_detections(got, {**EXPECTED, "boxes": [[14, 10, 54, 50], [39, 10, 79, 50]] + EXPECTED["boxes"][2:]})


def test_outputs_coco_json_timing_provenance_and_byte_identical_rerun(cache):
    detect_run(box_regression=True)
    out, coco = layout.detections_file("rcnn"), layout.coco_detections("rcnn")
    first = out.read_bytes(), coco.read_bytes()
    detect_run(box_regression=True)
    assert (out.read_bytes(), coco.read_bytes()) == first
    entries = json.loads(coco.read_text())
    assert len(entries) == 5 and {(e["image_id"], e["image_name"]) for e in entries} == {(1, "one")}
    assert entries[0] == {"image_id": 1, "image_name": "one", "category_id": 1, "category": "a",
                          "bbox": [14.0, 10.0, 40.0, 40.0], "score": 0.875}
    assert entries[3]["bbox"] == [60.0, 40.0, 40.0, 40.0] and entries[3]["category_id"] == 2
    timing = runs.read(out)
    assert timing["images"] == 3 and timing["seconds_per_image"] >= 0
    with PerImageReader([out]) as reader:
        assert reader.json_attr("classes") == CLASSES
        assert (reader.attrs["stage"], reader.attrs["recipe"], reader.attrs["split"]) == ("detect", "rcnn", "test")
        assert "recipes" not in reader.json_attr("params")["detect"]
        assert reader.attrs["scores"] == "probability"  # the softmax scorer
        inputs = reader.json_attr("inputs")
        assert str(layout.bbox_model("rcnn")) in inputs and str(layout.svm_model("rcnn")) not in inputs  # softmax


def write_index(split: str) -> None:
    """An index of the feature cache's images (no ground truth boxes): what the coco_gt stage numbers."""
    with create_per_image(layout.index_file(split), index.ROWS, {"classes": CLASSES, "split": split},
                          index.IMAGES) as writer:
        for item in IMAGES:
            writer.append(item["id"], {"gt_boxes": np.zeros((0, 4), np.float32), "gt_labels": np.zeros(0, np.int32),
                                       "gt_difficult": np.zeros(0, bool)},
                          paths=f"JPEGImages/{item['id']}.jpg", widths=item["size"][0], heights=item["size"][1])


def test_coco_results_use_the_ground_truth_files_image_ids(cache):
    detect_run(score_threshold=-10)  # "quiet" (second image, first shard) has detections too
    write_index("test")
    coco_gt.run(layout.index_file("test"), layout.coco_ground_truth("test"))
    results = json.loads(layout.coco_detections("rcnn").read_text())
    truth = COCO(str(layout.coco_ground_truth("test")))
    names = {image["id"]: image["image_name"] for image in truth.dataset["images"]}
    assert names == {1: "one", 2: "quiet", 3: "empty"}
    assert {(r["image_id"], r["image_name"]) for r in results} == {(1, "one"), (2, "quiet")}
    assert all(names[r["image_id"]] == r["image_name"] for r in results)
    assert len(truth.loadRes(results).getAnnIds()) == len(results)  # pycocotools takes them, extra keys and all


def test_softmax_of_an_imagenet_network_is_an_error(workspace):
    write_features("test", IMAGES, CLASSES, num_shards=2, model="imagenet")
    with pytest.raises(ArtifactError, match="no detection softmax"):
        detect_run()


def test_models_for_other_classes_are_an_error(cache):
    SvmModel(np.eye(2, dtype=np.float32), np.zeros(2, np.float32), 1.0, ["x", "y"]).save(layout.svm_model("rcnn"), {})
    with pytest.raises(ArtifactError, match="trained for classes"):
        detect_run(scorer="svm")


def test_regressors_of_another_pool_dimension_are_an_error(cache):
    BoxRegressor(np.zeros((2, 5, 4), np.float32), np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32),
                 np.ones((2, 4), np.float32), 1.0, CLASSES, np.ones(2, bool)).save(layout.bbox_model("rcnn"), {})
    with pytest.raises(ArtifactError, match="pool dimension 5"):
        detect_run(box_regression=True)


def test_detection_writer_needs_the_kind_of_its_scores(tmp_path):
    with pytest.raises(ValueError, match="attrs need 'scores'"):
        DetectionWriter(tmp_path / "d.h5", tmp_path / "d.json", {"recipe": "rcnn"}, ["a"])
