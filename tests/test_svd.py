"""Truncated SVD of a fully connected layer (stages.ops.svd)."""
from __future__ import annotations

import torch
from torch import nn

from stages.ops.svd import truncated_svd


def _layer(out_features: int = 6, in_features: int = 9) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features)


def test_full_rank_computes_the_same_map():
    layer = _layer()
    compressed = truncated_svd(layer, rank=6)
    x = torch.randn(5, 9)
    torch.testing.assert_close(compressed(x), layer(x), rtol=1e-5, atol=1e-5)
    assert compressed[0].bias is None and compressed[0].out_features == 6
    assert truncated_svd(layer, rank=100)[0].out_features == 6  # capped at min(u, v)


def test_rank_t_keeps_the_top_t_singular_values():
    layer = _layer()
    singular = torch.linalg.svdvals(layer.weight.detach().double())
    compressed = truncated_svd(layer, rank=2)
    product = (compressed[1].weight @ compressed[0].weight).detach().double()
    kept = torch.linalg.svdvals(product)
    torch.testing.assert_close(kept[:2], singular[:2], rtol=1e-5, atol=1e-6)
    assert (kept[2:] < 1e-5).all()
    # the best rank-2 approximation: its error is exactly the dropped singular values (Eckart-Young)
    error = torch.linalg.matrix_norm(layer.weight.detach().double() - product)
    torch.testing.assert_close(error, singular[2:].square().sum().sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compressed[1].bias, layer.bias)


def test_parameters_shrink():
    layer = _layer(1024, 5488)
    compressed = truncated_svd(layer, rank=256)
    assert sum(p.numel() for p in compressed.parameters()) == 5488 * 256 + 256 * 1024 + 1024
