"""Truncated SVD of a fully connected layer (Fast R-CNN, section 3.1): one big layer becomes two small ones."""
from __future__ import annotations

import torch
from torch import nn


def truncated_svd(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``W x + b`` (``W`` is ``u x v``) -> ``U_t (Sigma_t V_t^T x) + b``, keeping the top ``rank`` singular values.

    The first layer (``v -> t``, no bias) holds ``Sigma_t V_t^T``, the second
    (``t -> u``) ``U_t`` and the original bias. At ``rank >= min(u, v)`` the
    pair computes the same map as ``layer`` up to rounding. The decomposition
    is computed in float64 and stored in the layer's dtype.
    """
    weight = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    t = min(rank, len(s))
    first = nn.Linear(layer.in_features, t, bias=False)
    second = nn.Linear(t, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_((s[:t, None] * vh[:t]).to(layer.weight.dtype))
        second.weight.copy_(u[:, :t].to(layer.weight.dtype))
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)
