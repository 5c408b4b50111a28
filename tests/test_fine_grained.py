"""The generated fine-grained dataset (``bench.fine_grained``): a valid VOC folder, the same bytes every time."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from bench.fine_grained import CLASSES, render, write_dataset
from stages.data.voc import Problems, read_annotations, read_split_ids


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_is_valid_voc_and_reproducible(tmp_path):
    write_dataset(tmp_path / "a", num_trainval=4, num_test=2, seed=3)
    write_dataset(tmp_path / "b", num_trainval=4, num_test=2, seed=3)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    problems = Problems("raise")
    ids = {split: read_split_ids(tmp_path / "a", split, problems) for split in ("trainval", "test")}
    assert [len(ids["trainval"]), len(ids["test"])] == [4, 2] and not set(ids["trainval"]) & set(ids["test"])
    annotations = read_annotations(tmp_path / "a", ids["trainval"] + ids["test"], problems)
    assert all(1 <= len(a.objects) <= 3 for a in annotations.values())
    assert {o.name for a in annotations.values() for o in a.objects} <= set(CLASSES)


def test_cards_differ_only_in_their_pips():
    """Every card is the same off-white paper: the class shows only inside it, in the pips."""
    for seed in range(5):
        image, objects = render(np.random.default_rng([0, seed]))
        for obj in objects[-1:]:  # the last card drawn is never covered
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            card = image[y1:y2, x1:x2].astype(float)
            paper = card.mean(axis=2) > 180
            assert 0.6 < paper.mean() < 0.97, (seed, obj.name)
