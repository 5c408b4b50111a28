"""Fast R-CNN's region maths (stages.ops.roi): candidates, hierarchical sampling, the multi-task loss, OHEM."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.ops.boxes import decode_boxes
from stages.ops.roi import image_rois, ohem_select, regression_targets, roi_losses, sample_rois

GT = np.array([[0, 0, 10, 10]], np.float32)


def _rois_with_ious():
    """Proposals at known IoU with the 10 x 10 ground truth: widths 10 * iou from its left edge, then a
    10 x 10 box overlapping it by one column (IoU 10 / 190) and one far away."""
    ious = [0.9, 0.8, 0.6, 0.5, 0.45, 0.3, 0.1]
    proposals = [[0, 0, 10 * iou, 10] for iou in ious] + [[9, 0, 19, 10], [50, 50, 60, 60]]
    return image_rois(np.array(proposals, np.float32), GT, np.array([2]), fg_iou=0.5), [*ious, 10 / 190, 0.0]


def test_candidates_are_proposals_and_ground_truth_labelled_by_best_overlap():
    rois, ious = _rois_with_ious()
    assert len(rois.boxes) == len(ious) + 1  # the ground-truth box is a candidate
    np.testing.assert_allclose(rois.max_iou, [*ious, 1.0], atol=1e-6)
    assert rois.labels.tolist() == [3, 3, 3, 3, 0, 0, 0, 0, 0, 3]  # class 2 -> label 3 at IoU >= 0.5
    assert (rois.gt == GT).all()


def test_degenerate_boxes_are_dropped_and_images_without_objects_are_all_background():
    rois = image_rois(np.array([[5, 5, 5.5, 30], [0, 0, 20, 20]], np.float32), np.zeros((0, 4)), np.zeros(0), 0.5)
    assert rois.boxes.tolist() == [[0, 0, 20, 20]]
    assert rois.labels.tolist() == [0] and rois.max_iou.tolist() == [0.0]
    np.testing.assert_array_equal(regression_targets(rois, [0] * 4, [1] * 4), np.zeros((1, 4)))


def test_sampling_takes_the_foreground_fraction_and_the_background_band():
    rois, _ = _rois_with_ious()
    rng = np.random.default_rng(0)
    rows = sample_rois(rng, rois, 4, 0.5, bg_iou_low=0.1)
    assert len(rows) == 4 and (rois.labels[rows[:2]] > 0).all()
    background = rows[2:]
    assert (rois.labels[background] == 0).all() and (rois.max_iou[background] >= 0.1).all()
    assert set(sample_rois(rng, rois, 100, 0.25, 0.1)) == set(range(len(rois.boxes))) - {7, 8}  # all in band
    short = sample_rois(rng, rois, 7, 1.0, 0.1)  # only 5 foreground: background fills the rest
    assert sorted(short[:5]) == [0, 1, 2, 3, 9] and set(short[5:]) <= {4, 5, 6} and len(short) == 7


def test_an_image_with_no_background_in_the_band_takes_it_from_iou_zero():
    rois = image_rois(np.array([[50, 50, 60, 60]], np.float32), GT, np.array([0]), 0.5)
    rows = sample_rois(np.random.default_rng(0), rois, 4, 0.25, bg_iou_low=0.1)
    assert sorted(rows) == [0, 1]  # the far proposal (IoU 0) and the ground truth


def test_targets_are_normalised_and_invert_to_the_ground_truth():
    rois = image_rois(np.array([[1, 2, 9, 12]], np.float32), GT, np.array([0]), 0.5)
    stds = [0.1, 0.1, 0.2, 0.2]
    targets = regression_targets(rois, [0, 0, 0, 0], stds)
    np.testing.assert_allclose(decode_boxes(rois.boxes, targets * np.array(stds)), np.repeat(GT, 2, 0), atol=1e-4)


def test_loss_is_log_loss_plus_smooth_l1_of_the_true_class_on_foreground_only():
    logits = torch.zeros(3, 3)  # uniform over 3 outputs: log loss log(3) each
    deltas = torch.zeros(3, 3, 4)
    deltas[0, 1] = torch.tensor([1.0, 0.5, 2.0, 0.0])  # foreground RoI of label 1
    deltas[1, 0] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # background: its deltas never count
    deltas[2, 1] = torch.tensor([9.0, 9.0, 9.0, 9.0])  # another class's deltas never count
    labels = torch.tensor([1, 0, 2])
    targets = torch.zeros(3, 4)
    losses = roi_losses(logits, deltas, labels, targets, loss_lambda=2.0)
    # smooth L1 at beta 1: 0.5 x^2 below 1, |x| - 0.5 above; at the transition x = 1 both give 0.5
    box = 0.5 + 0.5 * 0.25 + (2.0 - 0.5) + 0.0
    np.testing.assert_allclose(losses.numpy(), [np.log(3) + 2 * box, np.log(3), np.log(3)], rtol=1e-6)


def test_ohem_keeps_the_hardest_after_nms_in_loss_order_per_image():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [40, 40, 50, 50],
                          [0, 0, 10, 10], [60, 60, 70, 70]], dtype=torch.float32)
    losses = torch.tensor([1.0, 3.0, 2.0, 0.5, 9.0, 0.1])
    images = torch.tensor([0, 0, 0, 0, 1, 1])
    # image 0: loss order 1 (3.0), 2 (2.0), 0 (1.0, IoU 0.82 with box 1: suppressed), 3 (0.5); keep 2 per image
    assert ohem_select(losses, boxes, images, per_image=2, nms_iou=0.7).tolist() == [1, 2, 4, 5]
    assert ohem_select(losses, boxes, images, per_image=10, nms_iou=0.7).tolist() == [1, 2, 3, 4, 5]
    assert ohem_select(losses, boxes, images, per_image=10, nms_iou=0.9).tolist() == [1, 2, 0, 3, 4, 5]


@pytest.mark.parametrize("count", [0, 1])
def test_sampling_small_counts(count):
    rois, _ = _rois_with_ious()
    assert len(sample_rois(np.random.default_rng(0), rois, count, 0.25, 0.1)) == count
