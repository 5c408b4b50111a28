"""The R-CNN region warp: each proposal, with context, resampled to the network's square input.

R-CNN (Girshick et al. 2014, appendix A) dilates every box so that, at the warped
size, there are ``padding`` pixels of context around it (16 at 227), then warps
the dilated box anisotropically to ``input_size x input_size``; pixels outside
the image take the mean colour. Here each region is a single
:func:`cv2.warpAffine` from the image to the output square, with the mean as
the constant border, so no padded copy of the image is ever made.

Boxes follow :mod:`stages.ops.boxes`: ``(N, 4)`` ``x1, y1, x2, y2`` in continuous
pixel coordinates, pixel ``i`` covering ``[i, i + 1)`` (its centre at ``i + 0.5``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from stages.ops.boxes import as_boxes

if TYPE_CHECKING:
    import torch


def context_boxes(boxes: np.ndarray, input_size: int, padding: float) -> np.ndarray:
    """``(N, 4)`` boxes -> ``(N, 4)`` float32 boxes dilated to include ``padding`` pixels of context.

    Each box is scaled about its centre by ``input_size / (input_size - 2 * padding)``
    in x and y independently, so that once the result is warped to
    ``input_size x input_size`` the original box fills the central
    ``input_size - 2 * padding`` pixels. A width or height below one pixel
    (empty or inverted box) counts as one pixel about the same centre.
    """
    if input_size < 1 or not 0 <= padding < input_size / 2:
        raise ValueError(f"need input_size >= 1 and 0 <= padding < input_size / 2, got {input_size}, {padding}")
    boxes = as_boxes(boxes).astype(np.float64)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0) * (input_size / (input_size - 2 * padding)) / 2
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def warp_regions(
    image: np.ndarray,
    boxes: np.ndarray,
    input_size: int,
    padding: float,
    fill: Sequence[float],
    mirror: np.ndarray | None = None,
) -> np.ndarray:
    """Warp each box of ``image`` with context to an ``(N, input_size, input_size, 3)`` uint8 batch.

    ``image`` is ``(H, W, 3)`` uint8 RGB; ``boxes`` ``(N, 4)`` (finite; degenerate
    ones as in :func:`context_boxes`); ``fill`` the RGB colour, 0..255, of pixels
    outside the image (R-CNN: the mean; rounded to uint8). The context box is
    resampled bilinearly: output pixel ``(u, v)``, centred at ``(u + 0.5, v + 0.5)``
    in the output square, takes the image at continuous
    ``(x1 + (u + 0.5) * w / S, y1 + (v + 0.5) * h / S)`` where ``x1, y1, w, h``
    describe the context box and ``S = input_size``. ``mirror``, optional ``(N,)``
    bool, flips the selected regions horizontally after warping. Memory is the
    output plus at most one contiguous copy of ``image``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if len(fill) != 3:
        raise ValueError(f"fill must be an RGB colour, got {fill!r}")
    image = np.ascontiguousarray(image)
    context = context_boxes(boxes, input_size, padding).astype(np.float64)
    regions = np.empty((len(context), input_size, input_size, 3), dtype=np.uint8)
    border = tuple(float(c) for c in fill)
    for i, (x1, y1, x2, y2) in enumerate(context):
        sx, sy = (x2 - x1) / input_size, (y2 - y1) / input_size
        # Output pixel u (OpenCV coordinate u, continuous u + 0.5) -> continuous
        # x1 + (u + 0.5) * sx -> OpenCV source coordinate (pixel centres at integers) minus 0.5.
        dst_to_src = np.array([[sx, 0.0, x1 + 0.5 * sx - 0.5], [0.0, sy, y1 + 0.5 * sy - 0.5]])
        regions[i] = cv2.warpAffine(
            image,
            dst_to_src,
            (input_size, input_size),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=border,
        )
    if mirror is not None:
        mirror = np.asarray(mirror, dtype=bool)
        if mirror.shape != (len(regions),):
            raise ValueError(f"mirror must have shape ({len(regions)},), got {mirror.shape}")
        regions[mirror] = regions[mirror][:, :, ::-1]
    return regions


def to_tensor_batch(
    regions: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``(N, S, S, 3)`` uint8 RGB -> ``(N, 3, S, S)`` float32 ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` are per-channel RGB in the 0..1 scale (:class:`stages.models.backbones.Backbone`).
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(regions)).permute(0, 3, 1, 2)
    x = x.to(torch.float32, memory_format=torch.contiguous_format)
    # (x / 255 - mean) / std == (x - 255 mean) / (255 std), in place: no batch-sized temporaries
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return x.sub_(mean_t).div_(std_t)
