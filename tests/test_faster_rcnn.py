"""Faster R-CNN's network (stages.models.fast_rcnn.FasterRcnn): anchors, their labels, proposals, frozen parts,
model files."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from stages.core.config import load_config
from stages.core.engine import write_torch
from stages.models.fast_rcnn import (FasterRcnn, PrefixNmsRpn, load_fast_rcnn, model_file, pad_to_stride, propose_image,
                                     set_learning)
from helpers import REPO


@pytest.fixture(scope="module")
def params():
    return load_config(REPO / "params.yaml").faster_rcnn


def _model(anchor_sizes=(16, 32), aspect_ratios=(1.0,)) -> FasterRcnn:
    torch.manual_seed(0)
    return FasterRcnn("efficientnet_lite0", 2, "roi_pool", 3, 16, 0.5, 3, [0.0] * 4, [0.1, 0.1, 0.2, 0.2],
                      anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios)


def test_anchors_sit_at_every_cell_of_the_stride_16_map_in_each_size_and_ratio():
    model = _model(anchor_sizes=(16,), aspect_ratios=(1.0, 4.0))
    images = torch.zeros((1, 32, 48, 3), dtype=torch.uint8)
    conv = torch.zeros((1, model.channels, 2, 3))
    network = model.proposal_network(load_config(REPO / "params.yaml").faster_rcnn, training=False)
    from torchvision.models.detection.image_list import ImageList

    (anchors,) = network.anchor_generator(ImageList(images.permute(0, 3, 1, 2), [(32, 48)]), [conv])
    assert anchors.shape == (2 * 3 * 2, 4)  # cells x (sizes x ratios), row by row
    # a 16 x 16 square and an 8 x 32 box (height / width 4, same area) centred on each cell's corner
    assert anchors[0].tolist() == [-8, -8, 8, 8] and anchors[1].tolist() == [-4, -16, 4, 16]
    assert anchors[2].tolist() == [8, -8, 24, 8]  # the next cell to the right, 16 pixels on
    assert anchors[6].tolist() == [-8, 8, 8, 24]  # the next row


def test_anchor_labels_follow_the_two_thresholds_and_each_ground_truths_best_anchor_is_foreground(params):
    network = _model().proposal_network(params, training=True)
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9],  # IoU 1 and 0.9 with the first ground truth
                            [0, 0, 10, 5],                  # IoU 0.5: ignored
                            [0, 0, 10, 2],                  # IoU 0.2: background
                            [100, 100, 120, 112],           # IoU 0.6 with the second: its best, so foreground
                            [50, 50, 60, 60]], dtype=torch.float32)
    gt = {"boxes": torch.tensor([[0, 0, 10, 10], [100, 100, 120, 120]], dtype=torch.float32)}
    (labels,), (matched,) = network.assign_targets_to_anchors([anchors], [gt])
    assert labels.tolist() == [1, 1, -1, 0, 1, 0]  # 1 foreground, 0 background, -1 ignored
    assert matched[4].tolist() == [100, 100, 120, 120]


@pytest.mark.parametrize("overlapping, nms_sizes", [(False, [6]), (True, [6, 12])])
def test_proposal_nms_over_a_prefix_of_the_ranking_keeps_what_nms_over_all_keeps(params, monkeypatch, overlapping,
                                                                                   nms_sizes):
    """2 proposals after NMS from the best 12 boxes: the best 3 x 2 suffice, unless NMS keeps fewer than 2 of them."""
    from torchvision.models.detection import rpn as torchvision_rpn

    few = dataclasses.replace(params, test_pre_nms=12, test_proposals=2, min_size=1.0)
    network = _model().proposal_network(few, training=False)
    assert isinstance(network, PrefixNmsRpn) and PrefixNmsRpn.PREFIX_FACTOR == 3
    boxes = torch.tensor([[10.0 * k, 0, 10.0 * k + 8, 8] for k in range(20)])  # disjoint, the best first
    if overlapping:
        boxes[:6] = boxes[0]  # the best six are one box: NMS keeps one of them, and the full NMS is needed
    objectness = torch.linspace(5, -5, 20)[:, None]
    sizes = []
    nms = torchvision_rpn.box_ops.batched_nms
    monkeypatch.setattr(torchvision_rpn.box_ops, "batched_nms",
                        lambda b, s, i, t: sizes.append(len(b)) or nms(b, s, i, t))
    (kept,), _ = network.filter_proposals(boxes[None], objectness, [(100, 300)], [20])
    assert sizes == nms_sizes
    (everything,), _ = torchvision_rpn.RegionProposalNetwork.filter_proposals(network, boxes[None], objectness,
                                                                              [(100, 300)], [20])
    assert sizes[-1] == 12 and torch.equal(kept, everything)
    assert torch.equal(kept, boxes[[0, 6 if overlapping else 1]])


def test_pad_to_stride_pads_bottom_and_right_with_the_colour():
    images = torch.full((2, 20, 33, 3), 9, dtype=torch.uint8)
    padded = pad_to_stride(images, 16, (1, 2, 3))
    assert padded.shape == (2, 32, 48, 3)
    assert (padded[:, :20, :33] == 9).all() and padded[0, 31, 47].tolist() == [1, 2, 3]
    assert pad_to_stride(padded, 16, (0, 0, 0)) is padded


def test_proposals_carry_no_gradient_the_losses_do_and_unpadded_batches_are_refused(params):
    model = _model().train()
    images = pad_to_stride(torch.randint(0, 255, (2, 70, 90, 3), dtype=torch.uint8), 16, model.pad_value)
    conv = model.conv(images)
    gt = [torch.tensor([[5.0, 5.0, 40.0, 50.0]]), torch.zeros((0, 4))]  # the second image has no object
    proposals, losses = model.propose(images, conv, [(70, 90), (64, 80)], params, True, gt)
    assert all(not p.requires_grad for p in proposals)
    assert proposals[1][:, 2].max() <= 80 and proposals[1][:, 3].max() <= 64  # clipped to each image's own size
    total = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
    total.backward()
    assert model.rpn_head.cls_logits.weight.grad.abs().sum() > 0
    assert list(model.trunk.children())[-1].parameters().__next__().grad is not None  # the trunk learns through it
    with pytest.raises(ValueError, match="multiples of 16"):
        model.propose(images[:, :70], conv, [(70, 90)] * 2, params, True, gt)


def test_one_image_gives_its_conv_map_and_at_most_the_test_count_of_proposals(params):
    model = _model().eval()
    image = torch.randint(0, 255, (100, 130, 3), dtype=torch.uint8)
    few = dataclasses.replace(params, test_proposals=7)
    with torch.inference_mode():
        conv, boxes = propose_image(model, image, few, False, torch.device("cpu"))
    assert conv.shape == (1, model.channels, 7, 9) and boxes.shape == (7, 4)
    assert boxes[:, 2].max() <= 130 and boxes[:, 3].max() <= 100


def test_set_learning_freezes_exactly_the_named_parts():
    model = _model()
    set_learning(model, None, detector=False, rpn=True)
    assert not any(p.requires_grad for p in [*model.trunk.parameters(), *model.fc.parameters(),
                                             *model.cls_score.parameters(), *model.bbox_pred.parameters()])
    assert all(p.requires_grad for p in model.rpn_head.parameters())
    set_learning(model, 3, detector=True, rpn=False)
    trunk = list(model.trunk.children())
    assert not any(p.requires_grad for m in trunk[:3] for p in m.parameters())
    assert all(p.requires_grad for m in trunk[3:] for p in m.parameters())
    assert all(p.requires_grad for p in model.fc.parameters()) and not model.rpn_head.conv[0][0].weight.requires_grad


def test_a_faster_rcnn_model_file_rebuilds_the_same_network(tmp_path):
    model = _model(anchor_sizes=(24, 48), aspect_ratios=(0.5, 2.0)).eval()
    write_torch(tmp_path / "m.pt", {**model_file(model, ["a", "b"], 3), "state_dict": model.state_dict()})
    loaded = load_fast_rcnn(tmp_path / "m.pt")
    assert isinstance(loaded, FasterRcnn) and loaded.classes == ["a", "b"]
    assert (loaded.anchor_sizes, loaded.aspect_ratios) == ((24, 48), (0.5, 2.0))
    conv = torch.randn(1, model.channels, 4, 4)
    torch.testing.assert_close(loaded.rpn_head([conv]), model.rpn_head([conv]))


def _training_batch(model: FasterRcnn):
    images = pad_to_stride(torch.randint(0, 255, (2, 60, 90, 3), dtype=torch.uint8), model.stride, model.pad_value)
    gt = [torch.tensor([[10, 10, 40, 30], [50, 5, 80, 50]], dtype=torch.float32),
          torch.tensor([[0, 0, 20, 20]], dtype=torch.float32)]
    return images, model.conv(images), [(60, 90), (60, 90)], gt


def test_rpn_losses_are_the_full_rpns_without_its_proposals(params):
    model = _model().train()
    images, conv, sizes, gt = _training_batch(model)
    torch.manual_seed(1)  # the anchor sample draws from torch's generator: the same draws for both
    _, full = model.propose(images, conv, sizes, params, True, gt)
    torch.manual_seed(1)
    losses, _ = model.rpn_losses(images, conv, sizes, params, gt)
    assert set(losses) == set(full) == {"loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.equal(losses[k], full[k]) for k in full) and losses["loss_objectness"].requires_grad


def test_an_rpn_that_calls_every_anchor_an_object_has_balanced_accuracy_one_half(params):
    model = _model().train()
    images, conv, sizes, gt = _training_batch(model)
    for sign in (1.0, -1.0):  # every anchor foreground, then every anchor background
        with torch.no_grad():
            model.rpn_head.cls_logits.weight.zero_()
            model.rpn_head.cls_logits.bias.fill_(sign * 10)
        _, accuracy = model.rpn_losses(images, conv, sizes, params, gt)
        assert accuracy.item() == 0.5  # one side's recall 1, the other's 0
