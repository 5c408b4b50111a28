"""The synthetic dataset: deterministic, well-formed, and hard enough to be useful."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stages import synthetic
from stages.core.config import SyntheticParams, load_config
from stages.data.images import load_image
from stages.data.voc import Annotation, parse_annotation

DEFAULTS = load_config("params.yaml").synthetic
SMALL = dataclasses.replace(DEFAULTS, num_trainval=6, num_test=4)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _annotations(root: Path) -> list[Annotation]:
    return [parse_annotation(p) for p in sorted((root / "Annotations").glob("*.xml"))]


def _split(root: Path, name: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{name}.txt").read_text().split()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default") / "voc"
    synthetic.run(DEFAULTS, out)
    return out


def test_same_params_give_identical_bytes(tmp_path: Path) -> None:
    synthetic.run(SMALL, tmp_path / "a")
    synthetic.run(SMALL, tmp_path / "b")
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 2 * 10 + 2
    assert first == second


def test_different_seeds_give_different_data(tmp_path: Path) -> None:
    synthetic.run(SMALL, tmp_path / "a")
    synthetic.run(dataclasses.replace(SMALL, seed=SMALL.seed + 1), tmp_path / "b")
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first.keys() == second.keys()
    for folder in ("JPEGImages", "Annotations"):
        assert all(first[k] != second[k] for k in first if k.startswith(folder))


def test_splits_are_disjoint_and_cover_every_image(tmp_path: Path) -> None:
    synthetic.run(SMALL, tmp_path)
    trainval, test = _split(tmp_path, "trainval"), _split(tmp_path, "test")
    assert (len(trainval), len(test)) == (SMALL.num_trainval, SMALL.num_test)
    assert not set(trainval) & set(test)
    ids = set(trainval) | set(test)
    assert {p.stem for p in (tmp_path / "Annotations").iterdir()} == ids
    assert {p.stem for p in (tmp_path / "JPEGImages").iterdir()} == ids


def test_annotations_are_valid_voc(default_run: Path) -> None:
    for ann in _annotations(default_run):
        height, width = load_image(default_run / "JPEGImages" / ann.filename).shape[:2]
        assert (ann.width, ann.height) == (width, height)
        assert DEFAULTS.min_side <= min(width, height) and max(width, height) <= DEFAULTS.max_side
        assert DEFAULTS.min_objects - 1 <= len(ann.objects) <= DEFAULTS.max_objects  # one may be hidden
        for obj in ann.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (ann.filename, obj)
            assert obj.name in synthetic.CLASSES


def test_default_run_has_every_class_and_difficult_objects(default_run: Path) -> None:
    objects = [obj for ann in _annotations(default_run) for obj in ann.objects]
    assert {obj.name for obj in objects} == set(synthetic.CLASSES)
    difficult = sum(obj.difficult for obj in objects)
    assert 0 < difficult < len(objects) / 2


def test_image_does_not_depend_on_dataset_size() -> None:
    bigger = dataclasses.replace(SMALL, num_trainval=SMALL.num_trainval + 5)
    small_pixels, small_objects = synthetic.render_image(SMALL, 3)
    big_pixels, big_objects = synthetic.render_image(bigger, 3)
    assert (small_pixels == big_pixels).all() and small_objects == big_objects


def test_extreme_valid_params_work(tmp_path: Path) -> None:
    tiny = dataclasses.replace(
        SMALL, min_side=8, max_side=8, min_object_size=4, max_object_size=8, min_objects=1, max_objects=1, distractors=0
    )
    synthetic.run(tiny, tmp_path)
    assert all(len(ann.objects) == 1 for ann in _annotations(tmp_path))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"min_side": 400}, "min_side"),
        ({"min_objects": 7}, "min_objects"),
        ({"num_trainval": 0}, "num_trainval"),
        ({"num_test": 0}, "num_test"),
        ({"max_object_size": 500, "max_side": 600}, "max_object_size"),
        ({"min_object_size": 2}, "min_object_size"),
        ({"distractors": -1}, "distractors"),
    ],
)
def test_invalid_params_are_rejected_before_writing(tmp_path: Path, change: dict, key: str) -> None:
    params: SyntheticParams = dataclasses.replace(SMALL, **change)
    with pytest.raises(ValueError, match=rf"^synthetic\.{key}\b"):
        synthetic.run(params, tmp_path / "voc")
    assert not (tmp_path / "voc").exists()
