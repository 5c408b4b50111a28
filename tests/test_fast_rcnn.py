"""Fast R-CNN's network (stages.models.fast_rcnn): RoI pooling, frozen layers, SVD copy, model files."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize
from torchvision.ops import FrozenBatchNorm2d, roi_pool

from stages.core.engine import write_torch
from stages.core.store import ArtifactError
from stages.models.backbones import build_backbone
from stages.models.batch_norms import fold_batch_norms, freeze_batch_norms
from stages.models.fast_rcnn import FastRcnn, load_fast_rcnn, model_file
from stages.ops.spp import pyramid_pool


def _model(**changes) -> FastRcnn:
    torch.manual_seed(0)
    options = {"arch": "efficientnet_lite0", "num_classes": 3, "pooling": "roi_pool", "pool_size": 3, "hidden": 32,
               "dropout": 0.5, "learn_from": 3, "target_means": [0.0] * 4, "target_stds": [0.1, 0.1, 0.2, 0.2]}
    return FastRcnn(**{**options, **changes}).eval()


@pytest.mark.parametrize("level", [1, 2, 3])
def test_roi_pool_equals_the_spp_single_level_pooling_where_their_bins_coincide(level):
    """roi_pool of inclusive corners (16 s, 16 (e - 1)) covers cells [s, e), as a cell range of pyramid_pool does;
    both split a range of h cells into bins [floor(i h / l), ceil((i + 1) h / l))."""
    torch.manual_seed(0)
    conv = torch.randn(5, 9, 11)
    cells = np.array([[0, 0, 11, 9], [2, 1, 8, 7], [3, 4, 4, 5], [1, 2, 6, 9]])  # x1, y1, x2, y2, end exclusive
    rois = torch.tensor([[0, 16 * x1, 16 * y1, 16 * (x2 - 1), 16 * (y2 - 1)] for x1, y1, x2, y2 in cells],
                        dtype=torch.float32)
    pooled = roi_pool(conv[None], rois, level, 1 / 16).flatten(1)
    torch.testing.assert_close(pooled, pyramid_pool(conv, cells, [level]))


def test_the_model_pools_continuous_boxes_as_their_inclusive_corners():
    model = _model()
    conv = torch.randn(1, 112, 6, 6)
    box = torch.tensor([[0, 16.0, 16.0, 64.0, 48.0]])  # continuous corners: pixels 16..63 x 16..47
    expected = roi_pool(conv, torch.tensor([[0, 16.0, 16.0, 63.0, 47.0]]), 3, 1 / 16).flatten(1)
    torch.testing.assert_close(model.pool(conv, box), expected)


def test_batch_norms_are_folded_and_the_first_modules_do_not_learn():
    model = _model(learn_from=3)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    convs = [m for m in model.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert all("bias" in dict(c.named_buffers(recurse=False)) for c in convs)  # the shift: a constant
    trunk = list(model.trunk.children())
    assert not any(p.requires_grad for m in trunk[:3] for p in m.parameters())
    assert all(p.requires_grad for m in trunk[3:] for p in m.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())


def test_heads_and_detect_shapes_and_un_normalised_deltas():
    model = _model()
    images = torch.full((1, 64, 80, 3), 128, dtype=torch.uint8)
    conv = model.conv(images)
    assert conv.shape == (1, 112, 4, 5)
    rois = torch.tensor([[0, 0, 0, 40, 40], [0, 10, 20, 70, 60]], dtype=torch.float32)
    logits, deltas = model.heads(conv, rois)
    assert logits.shape == (2, 4) and deltas.shape == (2, 4, 4)
    probs, raw = model.detect(conv, rois)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    torch.testing.assert_close(raw, deltas * torch.tensor([0.1, 0.1, 0.2, 0.2]))


def test_full_rank_svd_copy_detects_as_the_original():
    model = _model(hidden=16)
    conv = model.conv(torch.randint(0, 255, (1, 48, 48, 3), dtype=torch.uint8))
    rois = torch.tensor([[0, 0, 0, 30, 30], [0, 5, 5, 45, 40]], dtype=torch.float32)
    full_rank = model.compressed([16, 16])
    for a, b in zip(model.detect(conv, rois), full_rank.detect(conv, rois)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    small = model.compressed([4, 2])
    assert small.fc[0][0].out_features == 4 and small.fc[3][0].out_features == 2
    assert isinstance(model.fc[0], torch.nn.Linear)  # the original is untouched
    assert model.compressed([]).fc[0].weight.equal(model.fc[0].weight)


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet50"])
def test_folded_trunk_computes_and_learns_as_the_backbone_with_frozen_norms(arch):
    torch.manual_seed(0)
    features = build_backbone(arch, "random").features
    for norm in features.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):  # statistics far from the identity, so a wrong fold shows
            for tensor in (norm.weight.data, norm.bias.data, norm.running_mean):
                tensor.copy_(torch.randn_like(tensor))
            norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    frozen, folded = freeze_batch_norms(copy.deepcopy(features)), fold_batch_norms(copy.deepcopy(features))
    images, maps = torch.randn(2, 3, 48, 64), {}
    for name, trunk in (("frozen", frozen), ("folded", folded)):
        out = trunk.train()(images)  # frozen norms ignore the mode
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        maps[name] = out.detach()
    torch.testing.assert_close(maps["folded"], maps["frozen"], rtol=1e-4, atol=1e-4 * maps["frozen"].abs().max().item())
    expected = dict(frozen.named_parameters())
    learned = {name.replace(".parametrizations.weight.original", ".weight"): p for name, p in folded.named_parameters()}
    assert learned.keys() == expected.keys()  # the convs' weights, nothing of the norms
    for name, param in learned.items():
        grad = expected[name].grad
        torch.testing.assert_close(param.grad, grad, rtol=1e-3, atol=1e-3 * grad.abs().max().item(), msg=name)


def test_model_file_round_trip_and_bad_files(tmp_path):
    model = _model()
    path = tmp_path / "m.pt"
    write_torch(path, {**model_file(model, ["a", "b", "c"], 3), "state_dict": model.state_dict()})
    loaded = load_fast_rcnn(path)
    assert loaded.classes == ["a", "b", "c"] and not loaded.training
    for name, value in model.state_dict().items():
        assert loaded.state_dict()[name].equal(value), name
    baked = load_fast_rcnn(path, baked=True)
    assert not any(parametrize.is_parametrized(m) for m in baked.trunk.modules())
    images = torch.randint(0, 256, (1, 48, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert baked.conv(images).equal(loaded.conv(images))  # the same weights, computed once
    with pytest.raises(ArtifactError, match="not found"):
        load_fast_rcnn(tmp_path / "missing.pt")
    torch.save({"arch": "efficientnet_lite0"}, tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="not a Fast R-CNN model"):
        load_fast_rcnn(tmp_path / "bad.pt")
