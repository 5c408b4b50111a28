"""Region matching, label assignment, mini-batch sampling and training curves shared by the training stages."""
from __future__ import annotations

import numpy as np
import pytest

from stages.ops.boxes import box_iou
from stages.ops.sampling import SamplingError, assign_labels, class_iou, curve_rows, sample_batch

GT = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
GT_LABELS = np.array([3, 1], np.int32)


def test_labels_by_hand():
    boxes = np.array(
        [
            [0, 0, 10, 5],  # IoU 50/100 = 0.5 exactly with GT[0] -> foreground, class 3 -> label 4
            [0, 0, 10, 4.9],  # IoU 0.49 with GT[0] -> background
            [20, 0, 30, 8],  # IoU 0.8 with GT[1] (class 1) -> label 2
            [5, 0, 25, 10],  # IoU 1/3 with both -> background
            [2, 0, 30, 10],  # IoU 80/300 with GT[0], 100/280 with GT[1]: both below 0.5 -> background
            [0, 0, 10, 10],  # GT[0] itself -> label 4
            [40, 40, 50, 50],  # no overlap -> background
        ],
        np.float32,
    )
    assert assign_labels(box_iou(boxes, GT), GT_LABELS, 0.5).tolist() == [4, 0, 2, 0, 0, 4, 0]


def test_labels_take_the_best_ground_truth_of_another_class():
    # Both boxes pass fg_iou for both overlapping ground-truth boxes; the larger IoU decides the class.
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10]], np.float32)  # classes 0 and 2
    boxes = np.array([[3, 0, 13, 10], [1, 0, 11, 10]], np.float32)
    # [3,0,13,10]: IoU 7/13 = 0.54 with gt0, 9/11 = 0.82 with gt1 -> class 2 -> 3
    # [1,0,11,10]: IoU 9/11 = 0.82 with gt0, 7/13 = 0.54 with gt1 -> class 0 -> 1
    assert assign_labels(box_iou(boxes, gt), np.array([0, 2]), 0.5).tolist() == [3, 1]
    no_gt = np.zeros((0, 4), np.float32)
    assert assign_labels(box_iou(boxes, no_gt), np.zeros(0), 0.5).tolist() == [0, 0]
    assert assign_labels(box_iou(no_gt, gt), np.array([0, 2]), 0.5).tolist() == []


def test_labels_over_class_columns_tie_to_the_lower_class():
    iou = np.array([[0.2, 0.7, 0.1], [0.5, 0.5, 0.0], [0.49, 0.3, 0.1]], np.float32)
    assert assign_labels(iou, np.arange(3), 0.5).tolist() == [2, 1, 0]


def test_class_iou_by_hand():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 10, 5]], np.float32)  # classes 1, 1, 0 of 3
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 5]], np.float32)
    iou = class_iou(boxes, gt, np.array([1, 1, 0]), 3)
    # box 0: class 0 via gt2 (50/100), class 1 via gt0 (1.0); box 1: class 1 via gt1 (50/100), nothing of class 0
    np.testing.assert_allclose(iou, [[0.5, 1.0, 0.0], [0.0, 0.5, 0.0]])
    assert iou.dtype == np.float32 and class_iou(boxes, gt[:0], np.zeros(0), 3).shape == (2, 3)


def test_sampler_proportions():
    rng = np.random.default_rng(0)
    fg, bg = np.arange(100), np.arange(100, 1000)
    batch = sample_batch(rng, fg, bg, 32, 0.25)
    assert len(batch) == 32 and np.isin(batch[:8], fg).all() and np.isin(batch[8:], bg).all()
    assert len(set(batch.tolist())) == 32  # without replacement when there are enough


def test_sampler_with_replacement_when_few_foreground():
    batch = sample_batch(np.random.default_rng(0), np.array([5, 7]), np.arange(100, 1000), 32, 0.25)
    assert len(batch) == 32 and set(batch[:8].tolist()) <= {5, 7} and np.isin(batch[8:], np.arange(100, 1000)).all()


def test_sampler_without_foreground_is_a_clear_error():
    with pytest.raises(SamplingError, match="no foreground windows"):
        sample_batch(np.random.default_rng(0), np.zeros(0, np.int64), np.arange(10), 32, 0.25)
    # positive_fraction 0 needs none
    assert len(sample_batch(np.random.default_rng(0), np.zeros(0, np.int64), np.arange(10), 4, 0.0)) == 4


def test_curve_rows_are_running_means_every_k_iterations_and_at_the_end():
    rows = curve_rows([1.0, 3.0, 5.0], [0.0, 1.0, 1.0], every=2)
    assert rows == ["iteration,loss,accuracy", "2,2.000000,0.500000", "3,3.000000,0.666667"]
