"""Stage ``index`` with ``data.format: coco``: contents, every bad input, and the same index as the VOC route."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import BCCD, tiny_params, voc_to_coco
from stages import index, synthetic
from stages.core.config import DataParams, SyntheticParams
from stages.core.store import PerImageReader
from stages.data.voc import DataError

# image file -> (width, height)
FILES = {"a.png": (20, 10), "b.png": (16, 12), "c.png": (12, 16), "d.png": (8, 8)}
# category ids out of name order and out of position order: classes are ordered by id, so dog (2) before cat (5)
CATEGORIES = [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}]
TRAIN = {
    "images": [{"id": 7, "file_name": "a.png", "width": 20, "height": 10},
               {"id": 3, "file_name": "b.png", "width": 16, "height": 12}],
    "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [0, 0, 10, 5], "iscrowd": 0},
                    {"id": 2, "image_id": 7, "category_id": 5, "bbox": [4.5, 2, 15.5, 8]},
                    {"id": 3, "image_id": 3, "category_id": 2, "bbox": [1, 1, 7, 7], "iscrowd": 1}],
    "categories": CATEGORIES,
}
TEST = {
    "images": [{"id": 1, "file_name": "c.png", "width": 12, "height": 16},
               {"id": 2, "file_name": "d.png", "width": 8, "height": 8}],
    # one pixel past the left and bottom edges: clipped to (0, 0, 12, 16), as the VOC route clips
    "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [-1, 0, 13, 17], "iscrowd": 0}],
    "categories": CATEGORIES,
}


def _coco_root(root: Path, train: dict = TRAIN, test: dict = TEST) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, size in FILES.items():
        Image.new("RGB", size, (30, 60, 90)).save(root / "images" / name)
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "train.json").write_text(json.dumps(train))
    (root / "annotations" / "test.json").write_text(json.dumps(test))
    return root


def _params(root: Path, **changes) -> DataParams:
    values = {"format": "coco", "root": str(root), "train_split": "trainval", "test_split": "test", "split": "files",
              "test_fraction": 0.25, "split_seed": 0, "coco_train_annotations": "annotations/train.json",
              "coco_train_images": "images", "coco_test_annotations": "annotations/test.json",
              "coco_test_images": "images", "classes": (), "on_error": "raise"}
    return DataParams(**{**values, **changes})


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return _coco_root(tmp_path / "coco")


def test_coco_index_contents(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    index.run(_params(root), out, num_workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["test.h5", "trainval.h5"]
    with PerImageReader([out / "trainval.h5"]) as r:
        assert r.image_ids == ["a", "b"]  # file-name stems, in the file's order
        assert r.json_attr("classes") == ["dog", "cat"]  # by category id
        assert [r.value("paths", i) for i in range(2)] == ["images/a.png", "images/b.png"]  # relative to data.root
        assert [r.value("widths", i) for i in range(2)] == [20, 16]
        assert r.json_attr("problems") == [] and r.attrs["clipped_boxes"] == 1
        # [x, y, w, h] -> x1, y1, x1 + w, y1 + h
        np.testing.assert_array_equal(r.rows("gt_boxes", 0), [[0, 0, 10, 5], [4.5, 2, 20, 10]])
        np.testing.assert_array_equal(r.rows("gt_labels", 0), [0, 1])
        np.testing.assert_array_equal(r.rows("gt_difficult", 0), [False, False])
        np.testing.assert_array_equal(r.rows("gt_boxes", 1), [[1, 1, 8, 8]])
        np.testing.assert_array_equal(r.rows("gt_difficult", 1), [True])  # iscrowd
    with PerImageReader([out / "test.h5"]) as r:
        assert r.image_ids == ["c", "d"]
        np.testing.assert_array_equal(r.rows("gt_boxes", 0), [[0, 0, 12, 16]])
        np.testing.assert_array_equal(r.rows("gt_labels", 0), [1])
        assert r.rows("gt_boxes", 1).shape == (0, 4)


def test_explicit_classes_set_label_order(root: Path, tmp_path: Path) -> None:
    index.run(_params(root, classes=("cat", "dog")), tmp_path / "index", num_workers=1)
    with PerImageReader([tmp_path / "index" / "trainval.h5"]) as r:
        assert r.json_attr("classes") == ["cat", "dog"]
        np.testing.assert_array_equal(r.rows("gt_labels", 0), [1, 0])


def test_a_category_outside_data_classes_is_a_problem(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        index.run(_params(root, classes=("cat",)), tmp_path / "index", num_workers=1)
    train = root / "annotations" / "train.json"
    assert (f"{train}: image id 7: annotation id 1 (bbox [0, 0, 10, 5]): unknown class 'dog' (classes: ['cat'])"
            in str(info.value))
    assert not (tmp_path / "index").exists()


def test_the_digest_covers_the_annotation_files(root: Path, tmp_path: Path) -> None:
    def digest(out: Path) -> str:
        index.run(_params(root), out, num_workers=1)
        with PerImageReader([out / "test.h5"]) as r:
            return r.json_attr("inputs")["dataset"]

    first = digest(tmp_path / "first")
    (root / "annotations" / "test.json").write_text(json.dumps({**TEST, "info": {"year": 2024}}))
    assert digest(tmp_path / "second") != first


# --- bad input: each a change to the train file, its problem, and what skip mode keeps -----------------


def _changed(edit) -> dict:
    doc = copy.deepcopy(TRAIN)
    edit(doc)
    return doc


TRAIN_FILE = "{root}/annotations/train.json"
BAD = {
    # name: (the changed train file, a problem it causes, the images skip mode keeps, their box counts)
    "missing_image": (_changed(lambda d: d["images"][1].update(file_name="gone.png")),
                      TRAIN_FILE + ": image id 3: no image file {root}/images/gone.png", ["a"], [2]),
    "box_outside_image": (_changed(lambda d: d["annotations"][0].update(bbox=[15, 0, 10, 5])),
                          TRAIN_FILE + ": image id 7: annotation id 1 (bbox [15, 0, 10, 5]) lies outside the 20x10 image",
                          ["a", "b"], [1, 1]),
    "zero_area_box": (_changed(lambda d: d["annotations"][0].update(bbox=[3, 3, 0, 4])),
                      TRAIN_FILE + ": image id 7: zero-area or inverted annotation id 1 (bbox [3, 3, 0, 4])",
                      ["a", "b"], [1, 1]),
    "unknown_category_id": (_changed(lambda d: d["annotations"][0].update(category_id=9)),
                            TRAIN_FILE + ": image id 7: annotation id 1: unknown category id 9 (categories: [2, 5])",
                            ["a", "b"], [1, 1]),
    "duplicate_annotation_id": (_changed(lambda d: d["annotations"][1].update(id=1)),
                                TRAIN_FILE + ": annotation id 1 is used by 2 entries (all dropped)", ["a", "b"], [0, 1]),
    "duplicate_image_id": (_changed(lambda d: d["images"][1].update(id=7)),
                           TRAIN_FILE + ": image id 7 is used by 2 entries (all dropped)", [], []),
    "duplicate_category_id": (_changed(lambda d: d.update(categories=CATEGORIES + [{"id": 2, "name": "cow"}])),
                              TRAIN_FILE + ": category id 2 is used by 2 entries (all dropped)", ["a", "b"], [1, 0]),
    "unknown_image_id": (_changed(lambda d: d["annotations"][2].update(image_id=99)),
                         TRAIN_FILE + ": annotation id 3: unknown image id 99", ["a", "b"], [2, 0]),
    "malformed_bbox": (_changed(lambda d: d["annotations"][2].update(bbox=[1, 1, 7])),
                       TRAIN_FILE + ": annotation id 3: missing or malformed 'bbox'", ["a", "b"], [2, 0]),
    "entry_without_id": (_changed(lambda d: d["annotations"][2].pop("id")),
                         TRAIN_FILE + ": annotations[2]: missing or malformed 'id'", ["a", "b"], [2, 0]),
    "file_name_outside_folder": (_changed(lambda d: d["images"][1].update(file_name="../b.png")),
                                 TRAIN_FILE + ": image id 3: file_name '../b.png' is not a path inside the image "
                                 "folder {root}/images", ["a"], [2]),
    "two_images_one_name": (_changed(lambda d: d["images"][1].update(file_name="./a.png")),
                            TRAIN_FILE + ": image id 3: file_name './a.png' gives it the name 'a' of image id 7 "
                            "(images are named by file-name stem)", ["a"], [2]),
    "image_in_both_splits": (_changed(lambda d: d["images"][1].update(file_name="c.png", width=12, height=16)),
                             "{root}/annotations/test.json: image 'c' is in both trainval and test", ["a", "c"], [2, 1]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_naming_file_and_entry(case: str, tmp_path: Path) -> None:
    train, problem, _, _ = BAD[case]
    root = _coco_root(tmp_path / "coco", train=train)
    with pytest.raises(DataError) as info:
        index.run(_params(root), tmp_path / "index", num_workers=1)
    assert problem.format(root=root) in str(info.value)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_counted_skip(case: str, tmp_path: Path) -> None:
    train, problem, kept, counts = BAD[case]
    root = _coco_root(tmp_path / "coco", train=train)
    index.run(_params(root, on_error="skip"), tmp_path / "index", num_workers=1)
    with PerImageReader([tmp_path / "index" / "trainval.h5"]) as r:
        assert problem.format(root=root) in r.json_attr("problems")
        assert r.image_ids == kept
        assert r.counts().tolist() == counts


@pytest.mark.parametrize("text, error", [
    (None, "annotation file not found (data.coco_* in params.yaml are relative to data.root)"),
    ('{"images": [', "malformed JSON (Expecting value: line 1 column 13"),
    ("[]", "not a COCO annotation file (a JSON list, not an object)"),
    ('{"images": [], "annotations": []}', "not a COCO instances file (no 'categories' list)"),
])
def test_unreadable_annotation_file_stops_in_both_modes(root: Path, tmp_path: Path, text: str | None, error: str
                                                         ) -> None:
    path = root / "annotations" / "train.json"
    path.unlink()
    if text is not None:
        path.write_text(text)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as info:
            index.run(_params(root, on_error=on_error), tmp_path / "index", num_workers=1)
        assert str(info.value).startswith(f"{path}: {error}")


# --- the same dataset through both routes ------------------------------------------------------------


def _contents(path: Path) -> dict:
    """Everything later stages read from an index file (not the problems' texts: they name other files)."""
    with PerImageReader([path]) as r:
        n = range(len(r))
        return {"ids": r.image_ids, "paths": [r.value("paths", i) for i in n],
                "sizes": [(int(r.value("widths", i)), int(r.value("heights", i))) for i in n],
                "boxes": [r.rows("gt_boxes", i).tolist() for i in n],
                "labels": [r.rows("gt_labels", i).tolist() for i in n],
                "difficult": [r.rows("gt_difficult", i).tolist() for i in n], "classes": r.json_attr("classes"),
                "clipped": int(r.attrs["clipped_boxes"]), "problems": len(r.json_attr("problems"))}


def _assert_both_routes_agree(voc: Path, coco_root: Path, tmp_path: Path) -> dict:
    """Index ``voc`` as VOC and, converted into ``coco_root``, as COCO: the same index; the VOC one's contents."""
    splits = ("trainval", "test")
    voc_to_coco(voc, {split: coco_root / "annotations" / f"{split}.json" for split in splits})
    voc_params = _params(voc, format="voc", on_error="skip")
    coco_params = _params(coco_root, coco_train_annotations="annotations/trainval.json", coco_train_images="JPEGImages",
                          coco_test_annotations="annotations/test.json", coco_test_images="JPEGImages", on_error="skip")
    index.run(voc_params, tmp_path / "voc_index", num_workers=2)
    index.run(coco_params, tmp_path / "coco_index", num_workers=2)
    for split in splits:
        expected = _contents(tmp_path / "voc_index" / f"{split}.h5")
        assert _contents(tmp_path / "coco_index" / f"{split}.h5") == expected
    return _contents(tmp_path / "voc_index" / "trainval.h5")


def test_a_generated_voc_dataset_converted_to_coco_gives_the_same_index(tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    synthetic.run(SyntheticParams(**tiny_params()["synthetic"]), voc)
    contents = _assert_both_routes_agree(voc, voc, tmp_path)  # COCO files inside the VOC folder
    assert len(contents["ids"]) == 6 and any(any(d) for d in contents["difficult"])


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD dataset not present at {BCCD}")
def test_bccd_converted_to_coco_gives_the_same_index(tmp_path: Path) -> None:
    coco_root = tmp_path / "bccd_coco"  # the shared dataset is read-only: its images are linked in
    coco_root.mkdir()
    (coco_root / "JPEGImages").symlink_to(BCCD / "JPEGImages", target_is_directory=True)
    contents = _assert_both_routes_agree(BCCD, coco_root, tmp_path)
    assert len(contents["ids"]) == 292 and contents["problems"] == 2  # the two zero-area boxes, in either format
