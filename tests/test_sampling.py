"""Mini-batch sampling and training curves shared by the fine-tuning stages."""
from __future__ import annotations

import numpy as np
import pytest

from stages.ops.sampling import SamplingError, curve_rows, sample_batch


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
