"""Mini-batch sampling and training curves shared by the two fine-tuning stages (R-CNN and SPP-net)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from stages.core.errors import PipelineError

CURVE_WINDOW = 10  # iterations averaged into each curve row


class SamplingError(PipelineError, ValueError):
    """The training windows cannot make the requested mini-batches."""


def sample_batch(
    rng: np.random.Generator, foreground: np.ndarray, background: np.ndarray, batch_size: int, positive_fraction: float
) -> np.ndarray:
    """``(batch_size,)`` window numbers: ``round(batch_size * positive_fraction)`` foreground first, then background.

    Each part is drawn uniformly without replacement, or with replacement when
    there are fewer windows of that kind than the part needs.
    """
    num_fg = int(round(batch_size * positive_fraction))
    parts = []
    for pool, count, kind in ((foreground, num_fg, "foreground"), (background, batch_size - num_fg, "background")):
        if count == 0:
            continue
        if len(pool) == 0:
            raise SamplingError(
                f"no {kind} windows to fill {count} of each mini-batch of {batch_size} "
                f"(fg_iou / positive_fraction, or the proposals and ground truth of the split)"
            )
        parts.append(rng.choice(pool, size=count, replace=len(pool) < count))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def curve_rows(losses: Sequence[float], correct: Sequence[float], every: int) -> list[str]:
    """CSV rows ``iteration,loss,accuracy`` (1-based iteration, means over the last CURVE_WINDOW)."""
    rows = ["iteration,loss,accuracy"]
    n = len(losses)
    for i in range(n):
        if (i + 1) % every and i != n - 1:
            continue
        start = max(0, i + 1 - CURVE_WINDOW)
        rows.append(f"{i + 1},{np.mean(losses[start:i + 1]):.6f},{np.mean(correct[start:i + 1]):.6f}")
    return rows
