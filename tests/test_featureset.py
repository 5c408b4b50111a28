"""Feature caches: the seeded norm sample and the feature scale, on tiny hand-computed cases."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.core.store import ArtifactError, PerImageReader, RowSpec, create_per_image
from stages.data.featureset import FeatureScale, feature_scale, norm_sample_rows

# three images: rows of norm 5 and 12, none, one row of norm 1 (mean norm 6)
POOL = {"a": [[3, 4], [0, 12]], "empty": np.zeros((0, 2)), "b": [[0, 1]]}


def _reader(path: Path, pool: dict) -> PerImageReader:
    with create_per_image(path, {"pool": RowSpec((2,), np.float16)}, {"stage": "test"}) as writer:
        for image_id, rows in pool.items():
            writer.append(image_id, {"pool": np.asarray(rows, np.float16)})
    return PerImageReader([path])


def _as_lists(sample: dict[int, np.ndarray]) -> dict[int, list[int]]:
    return {i: rows.tolist() for i, rows in sample.items()}


def test_norm_sample_without_limits_is_every_row_of_every_image_with_rows():
    counts = np.array([2, 0, 3])
    assert _as_lists(norm_sample_rows(counts, 0)) == {0: [0, 1], 2: [0, 1, 2]}
    assert _as_lists(norm_sample_rows(counts, 0, max_rows=100, max_images=100)) == {0: [0, 1], 2: [0, 1, 2]}
    assert norm_sample_rows(np.zeros(3, np.int64), 0, max_rows=5) == {}


def test_norm_sample_rows_are_seeded_uniform_rows_of_the_whole_split():
    counts = np.array([5, 0, 7, 3])
    sample = norm_sample_rows(counts, 4, max_rows=6)
    # global row numbers 0-4 are image 0's, 5-11 image 2's, 12-14 image 3's
    starts = {0: 0, 2: 5, 3: 12}
    as_global = np.concatenate([rows + starts[i] for i, rows in sorted(sample.items())])
    np.testing.assert_array_equal(as_global, np.sort(np.random.default_rng(4).choice(15, 6, replace=False)))
    assert all(len(rows) and (rows < counts[i]).all() for i, rows in sample.items())
    assert _as_lists(sample) == _as_lists(norm_sample_rows(counts, 4, max_rows=6))
    assert _as_lists(sample) != _as_lists(norm_sample_rows(counts, 5, max_rows=6))


def test_norm_sample_draws_the_images_first_among_those_with_rows():
    counts = np.full(10, 4)
    sample = norm_sample_rows(counts, 3, max_images=2)
    images = np.sort(np.random.default_rng(3).permutation(10)[:2])  # rcnn_feature_stats.m: images, then rows
    assert _as_lists(sample) == {int(i): [0, 1, 2, 3] for i in images}
    drawn = {i for seed in range(20) for i in norm_sample_rows(np.array([2, 0, 3]), seed, max_images=1)}
    assert drawn == {0, 2}  # never the image without rows
    rows = norm_sample_rows(counts, 3, max_rows=5, max_images=2)
    assert set(rows) == set(sample) and sum(len(r) for r in rows.values()) == 5


def test_feature_scale_of_known_norms(tmp_path):
    with _reader(tmp_path / "f.h5", POOL) as reader:
        assert feature_scale(reader, "pool", 18.0, 0) == FeatureScale(scale=3.0, mean_norm=6.0, rows=3)
        assert feature_scale(reader, "pool", 18.0, 0, max_rows=100) == FeatureScale(3.0, 6.0, 3)
        one_row = {feature_scale(reader, "pool", 18.0, seed, max_rows=1) for seed in range(20)}
        assert one_row == {FeatureScale(18 / 5, 5.0, 1), FeatureScale(1.5, 12.0, 1), FeatureScale(18.0, 1.0, 1)}
        one_image = {feature_scale(reader, "pool", 18.0, seed, max_images=1) for seed in range(20)}
        assert one_image == {FeatureScale(18 / 8.5, 8.5, 2), FeatureScale(18.0, 1.0, 1)}


def test_feature_scale_needs_a_positive_norm(tmp_path):
    with _reader(tmp_path / "zero.h5", {"a": np.zeros((3, 2))}) as reader, \
            pytest.raises(ArtifactError, match=r"no pool features with a positive norm to scale \(3 rows sampled\)"):
        feature_scale(reader, "pool", 20.0, 0)
    with _reader(tmp_path / "none.h5", {"empty": np.zeros((0, 2))}) as reader, \
            pytest.raises(ArtifactError, match=r"\(0 rows sampled\)"):
        feature_scale(reader, "pool", 20.0, 0)
