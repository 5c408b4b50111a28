"""The ablation runner's table rows (bench.ablation): Fast R-CNN rows read their run records, have no SVM."""
from __future__ import annotations

import json

from bench.ablation import TRAIN_TASKS, VARIANTS, markdown, row
from stages.core import layout, runs


def test_a_fast_rcnn_row_takes_its_test_time_from_the_detection_run_record(tmp_path):
    reports = tmp_path / layout.REPORTS
    reports.mkdir(parents=True)
    (reports / "map_fast_rcnn_svd.json").write_text(json.dumps({"mAP_voc07": 0.5, "mAP_voc2010": 0.25}))
    (reports / "proposals.json").write_text(json.dumps({"test": {"images": 4}}))
    record = tmp_path / runs.run_file(layout.detections_file("fast_rcnn_svd"))
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"seconds_per_image": 0.125}))
    result = row("SVD", tmp_path, "fast_rcnn_svd", {"FastRcnnTrain:fast_rcnn": 30.0}, {"Finetune": 99.0}, "test")
    assert result == {"variant": "SVD", "mAP (VOC07 11-pt)": 50.0, "mAP (VOC2010+)": 25.0, "train s": 30.0,
                      "SVM stage s": None, "SVM fitting s": None, "test s/img": 0.125}
    assert markdown([result]).splitlines()[2] == "| SVD | 50.0 | 25.0 | 30.00 | - | - | 0.12 |"


def test_every_variant_recipe_has_its_training_tasks():
    assert {recipe for recipe, _ in VARIANTS.values()} <= set(TRAIN_TASKS)
