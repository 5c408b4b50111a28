"""SPP-net maths: the scale of each box, projecting boxes onto the conv map, spatial pyramid pooling.

SPP-net (He et al., ECCV 2014) runs the convolutional layers once per image and
max-pools each proposal's window of the last conv map into a fixed pyramid of
``l x l`` grids (levels 6, 3, 2, 1: 50 bins), whatever the window's size.

Conventions (:mod:`stages.ops.boxes`): boxes are ``(N, 4)`` ``x1, y1, x2, y2`` in
continuous pixels of the image they are given in; a conv map of stride ``S``
has cell ``j`` covering pixels ``[j * S, (j + 1) * S)``, so its receptive-field
centre is at ``(j + 0.5) * S``. Cell ranges are ``(N, 4)`` int64
``x1, y1, x2, y2`` with the end exclusive (``[x1, x2)`` columns, ``[y1, y2)`` rows).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from stages.ops.boxes import as_boxes, box_area

SPP_AREA = 224 * 224  # multi-scale rule: a box is pooled at the scale where its area is closest to this
BOX_CHUNK = 256  # boxes pooled at once: bounds the gathered bins to BOX_CHUNK * l * l * C values per level


def choose_scale(boxes: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """``(N, 4)`` boxes in image pixels -> ``(N,)`` int64 index of the factor whose scaled box area is closest to 224^2.

    SPP-net's multi-scale testing rule; ties go to the first factor, so one scale gives all zeros.
    """
    areas = box_area(as_boxes(boxes)).astype(np.float64)
    scaled = areas[:, None] * np.square(np.asarray(factors, dtype=np.float64))[None, :]
    return np.abs(scaled - SPP_AREA).argmin(axis=1).astype(np.int64)


def project_boxes(boxes: np.ndarray, factor: float, stride: int, map_h: int, map_w: int) -> np.ndarray:
    """``(N, 4)`` boxes in image pixels -> ``(N, 4)`` int64 cell ranges ``[x1, y1, x2, y2)`` on the conv map.

    SPP-net (appendix) keeps the cells whose receptive-field centres lie
    strictly inside the window: with 1-based cells centred at ``S * x'`` it
    takes ``floor(x / S) + 1`` for the left/top corner and ``ceil(x / S) - 1``
    for the right/bottom one (inclusive). Here cell ``j`` (0-based) is centred at
    ``(j + 0.5) * S``, so the same rule in the coordinate ``u = x * factor / S - 0.5``,
    where cell centres are the integers, reads::

        start = floor(u1) + 1        end = ceil(u2)        (end exclusive)

    A window holding no cell centre (smaller than a cell, or between two
    centres) gets the one cell that contains its centre. Ranges are then
    clipped to the map, keeping at least one cell.
    """
    scaled = as_boxes(boxes).astype(np.float64) * factor / stride - 0.5
    start = np.floor(scaled[:, :2]).astype(np.int64) + 1
    end = np.ceil(scaled[:, 2:]).astype(np.int64)
    centre = np.floor((scaled[:, :2] + scaled[:, 2:]) / 2 + 0.5).astype(np.int64)
    empty = end <= start
    start = np.where(empty, centre, start)
    end = np.where(empty, centre + 1, end)
    upper = np.array([map_w, map_h], dtype=np.int64)
    start = np.clip(start, 0, upper - 1)
    end = np.clip(end, start + 1, upper)
    return np.concatenate([start, end], axis=1)


def pyramid_dim(channels: int, levels: Sequence[int]) -> int:
    """Length of one pyramid: ``channels * sum(l * l)``."""
    return channels * sum(level * level for level in levels)


def pyramid_pool(conv_map: Tensor, cells: np.ndarray | Tensor, levels: Sequence[int]) -> Tensor:
    """``(C, H, W)`` conv map, ``(N, 4)`` cell ranges -> ``(N, C * sum(l * l))`` max-pooled pyramids, map's dtype.

    For each level ``l`` the range of ``h`` rows and ``w`` columns is split into
    ``l x l`` bins; bin ``i`` spans rows ``floor(i * h / l)`` to
    ``ceil((i + 1) * h / l)`` (exclusive) from the range's first row, likewise
    for columns, so every bin holds at least one cell (bins overlap when the
    range is smaller than ``l``). Each bin is max-pooled. Levels are
    concatenated in the order given, each flattened channel-major ``(C, l, l)``.

    Every bin maximum is four look-ups in a 2-D sparse table of the map
    (maxima over all ``2^a x 2^b`` blocks), built once per call: exact SPP bins
    at a cost independent of their size. The table holds
    ``C * H * W * (floor(log2 H) + 1) * (floor(log2 W) + 1)`` values; look-ups
    go :data:`BOX_CHUNK` boxes at a time. Rounding is monotonic, so pooling a
    map already cast to a lower precision gives exactly the cast of the pooled map.
    """
    channels, height, width = conv_map.shape
    cells = torch.as_tensor(cells, dtype=torch.int64, device=conv_map.device).reshape(-1, 4)
    if len(cells) and ((cells[:, :2] < 0).any() or (cells[:, 2:] <= cells[:, :2]).any()
                       or (cells[:, 2] > width).any() or (cells[:, 3] > height).any()):
        raise ValueError(f"cell ranges must be non-empty and inside the {height}x{width} map")
    table = _sparse_table(conv_map)
    log2 = torch.tensor([max(n.bit_length() - 1, 0) for n in range(max(height, width) + 1)], device=conv_map.device)
    out = conv_map.new_empty((len(cells), pyramid_dim(channels, levels)))
    for first in range(0, len(cells), BOX_CHUNK):
        part = cells[first:first + BOX_CHUNK]
        column = 0
        for level in levels:
            bins = level * level
            target = out[first:first + len(part), column:column + channels * bins]
            target.view(len(part), channels, bins).copy_(_pool_level(table, log2, part, level).transpose(1, 2))
            column += channels * bins
    return out


def _sparse_table(conv_map: Tensor) -> Tensor:
    """``(C, H, W)`` -> ``(A, B, H, W, C)``: ``[a, b, y, x]`` is the maximum over rows ``y .. y + 2^a - 1`` and
    columns ``x .. x + 2^b - 1``, where that block fits in the map (the rest is zero and never read)."""
    channels, height, width = conv_map.shape
    levels_y, levels_x = height.bit_length(), width.bit_length()
    table = conv_map.new_zeros((levels_y, levels_x, height, width, channels))
    table[0, 0] = conv_map.permute(1, 2, 0)
    for a in range(1, levels_y):
        half, rows = 1 << (a - 1), height - (1 << a) + 1
        torch.maximum(table[a - 1, 0, :rows], table[a - 1, 0, half:half + rows], out=table[a, 0, :rows])
    for b in range(1, levels_x):
        half, cols = 1 << (b - 1), width - (1 << b) + 1
        torch.maximum(table[:, b - 1, :, :cols], table[:, b - 1, :, half:half + cols], out=table[:, b, :, :cols])
    return table


def _pool_level(table: Tensor, log2: Tensor, cells: Tensor, level: int) -> Tensor:
    """``(N, 4)`` cell ranges -> ``(N, level * level, C)`` bin maxima, bins row-major."""
    _, levels_x, height, width, channels = table.shape
    (x0, x1), (y0, y1) = _bins(cells[:, 0], cells[:, 2], level), _bins(cells[:, 1], cells[:, 3], level)
    # bin (n, i, j) covers rows [y0[n, i], y1[n, i]) and columns [x0[n, j], x1[n, j])
    y0, y1, x0, x1 = y0[:, :, None], y1[:, :, None], x0[:, None, :], x1[:, None, :]
    a, b = log2[y1 - y0], log2[x1 - x0]
    ya, xb = y1 - (1 << a), x1 - (1 << b)  # start of the last 2^a rows (2^b columns) of the bin
    block = (a * levels_x + b) * height
    index = torch.stack([(block + y) * width + x for y in (y0, ya) for x in (x0, xb)])  # (4, N, l, l)
    corners = table.reshape(-1, channels).index_select(0, index.reshape(-1)).view(4, len(cells), level * level, channels)
    torch.maximum(corners[0], corners[1], out=corners[0])
    torch.maximum(corners[2], corners[3], out=corners[2])
    return torch.maximum(corners[0], corners[2], out=corners[0])


def _bins(start: Tensor, end: Tensor, level: int) -> tuple[Tensor, Tensor]:
    """``(N,)`` ranges ``[start, end)`` -> ``(N, level)`` bin starts and ends (exclusive), at least one cell each."""
    size = (end - start)[:, None]
    i = torch.arange(level, device=start.device)[None, :]
    return start[:, None] + (i * size) // level, start[:, None] + ((i + 1) * size + level - 1) // level
