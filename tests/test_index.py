"""Stage ``index`` on a tiny hand-made VOC dataset: contents, strict and lenient error handling."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import index
from stages.core.config import DataParams
from stages.core.store import PerImageReader
from stages.data.voc import DataError, in_test_split

# image id -> (width, height, [(name, xmin, ymin, xmax, ymax, difficult)]) in VOC 1-based inclusive pixels
IMAGES = {
    "img1": (20, 10, [("dog", 1, 1, 10, 5, 0), ("cat", 5, 3, 20, 10, 0)]),
    "img2": (16, 12, [("dog", 2, 2, 8, 8, 1)]),
    "img3": (12, 16, [("cat", 0, 1, 12, 17, 0)]),  # overshoots left and bottom by one pixel: clipped
    "img4": (8, 8, []),
}
SPLITS = {"trainval": ["img1", "img2"], "test": ["img3", "img4"]}


def _xml(width: int, height: int, objects: list) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2, d in objects
    )
    return f"<annotation><size><width>{width}</width><height>{height}</height></size>{body}</annotation>"


def _dataset(root: Path, images: dict = IMAGES, splits: dict = SPLITS) -> Path:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (width, height, objects) in images.items():
        Image.new("RGB", (width, height), (30, 60, 90)).save(root / "JPEGImages" / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(width, height, objects))
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _params(root: Path, classes: tuple[str, ...] = (), on_error: str = "raise", **changes) -> DataParams:
    """The defaults of params.yaml (a VOC folder, split files) for the dataset at ``root``."""
    return DataParams(**{**DEFAULTS, "root": str(root), "classes": classes, "on_error": on_error, **changes})


DEFAULTS = {"format": "voc", "train_split": "trainval", "test_split": "test", "split": "files", "test_fraction": 0.25,
            "split_seed": 0, "coco_train_annotations": "", "coco_train_images": "", "coco_test_annotations": "",
            "coco_test_images": ""}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return _dataset(tmp_path / "voc")


def test_index_contents(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    index.run(_params(root), out, num_workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["test.h5", "trainval.h5"]

    with PerImageReader([out / "trainval.h5"]) as r:
        assert r.image_ids == ["img1", "img2"]
        assert r.json_attr("classes") == ["cat", "dog"]  # discovered, sorted by name
        assert r.attrs["split"] == "trainval"
        assert r.attrs["data_root"] == str(root)
        assert r.attrs["stage"] == "index"
        assert r.json_attr("problems") == []
        assert r.attrs["clipped_boxes"] == 1  # counted over the whole dataset (img3)
        assert r.json_attr("params") == {"data": {**DEFAULTS, "classes": [], "on_error": "raise", "root": str(root)}}
        assert re.fullmatch(r"[0-9a-f]{64}", r.attrs["code_version"])
        assert re.fullmatch(r"[0-9a-f]{64}", r.json_attr("inputs")["dataset"])
        assert [r.value("paths", i) for i in range(2)] == ["JPEGImages/img1.png", "JPEGImages/img2.png"]
        assert [r.value("widths", i) for i in range(2)] == [20, 16]
        assert [r.value("heights", i) for i in range(2)] == [10, 12]
        np.testing.assert_array_equal(r.counts(), [2, 1])
        # img1: dog (1,1,10,5) -> (0,0,10,5); cat (5,3,20,10) -> (4,2,20,10)
        boxes = r.rows("gt_boxes", 0)
        assert boxes.dtype == np.float32
        np.testing.assert_array_equal(boxes, [[0, 0, 10, 5], [4, 2, 20, 10]])
        np.testing.assert_array_equal(r.rows("gt_labels", 0), [1, 0])  # dog = 1, cat = 0
        np.testing.assert_array_equal(r.rows("gt_difficult", 0), [False, False])
        np.testing.assert_array_equal(r.rows("gt_boxes", 1), [[1, 1, 8, 8]])
        np.testing.assert_array_equal(r.rows("gt_labels", 1), [1])
        np.testing.assert_array_equal(r.rows("gt_difficult", 1), [True])

    with PerImageReader([out / "test.h5"]) as r:
        assert r.image_ids == ["img3", "img4"]
        assert r.attrs["split"] == "test"
        np.testing.assert_array_equal(r.counts(), [1, 0])
        # img3: (0,1,12,17) -> (-1,0,12,17), one pixel past the left and bottom edge -> clipped to (0,0,12,16)
        np.testing.assert_array_equal(r.rows("gt_boxes", 0), [[0, 0, 12, 16]])
        np.testing.assert_array_equal(r.rows("gt_labels", 0), [0])
        assert r.rows("gt_boxes", 1).shape == (0, 4)
        assert [r.value("widths", i) for i in range(2)] == [12, 8]
        assert [r.value("heights", i) for i in range(2)] == [16, 8]


def test_explicit_classes_set_label_order(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    index.run(_params(root, classes=("dog", "cat")), out, num_workers=1)
    with PerImageReader([out / "trainval.h5"]) as r:
        assert r.json_attr("classes") == ["dog", "cat"]
        np.testing.assert_array_equal(r.rows("gt_labels", 0), [0, 1])  # dog = 0, cat = 1


def test_second_run_is_byte_identical(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    index.run(_params(root), out, num_workers=1)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    index.run(_params(root), out, num_workers=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_raise_on_unknown_class_writes_nothing(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    with pytest.raises(DataError) as info:
        index.run(_params(root, classes=("cat",)), out, num_workers=1)
    message = str(info.value)
    assert message.startswith("2 problem(s) in the dataset; nothing was written.")
    assert f"{root / 'Annotations' / 'img1.xml'}: unknown class 'dog' (classes: ['cat'])" in message
    assert f"{root / 'Annotations' / 'img2.xml'}: unknown class 'dog' (classes: ['cat'])" in message
    assert not out.exists()


def test_raise_on_missing_image_writes_nothing(root: Path, tmp_path: Path) -> None:
    (root / "JPEGImages" / "img4.png").unlink()
    out = tmp_path / "index"
    out.mkdir()
    with pytest.raises(DataError, match=r"1 problem\(s\)") as info:
        index.run(_params(root), out, num_workers=1)
    assert f"no image file for 'img4'" in str(info.value)
    assert list(out.iterdir()) == []


def test_skip_drops_bad_items_and_records_them(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (root / "JPEGImages" / "img2.png").unlink()  # the whole image is dropped
    xml = root / "Annotations" / "img3.xml"
    xml.write_text(_xml(12, 16, [("cat", 1, 1, 12, 30, 0), ("dog", 2, 2, 6, 6, 0)]))  # first box far outside
    out = tmp_path / "index"
    index.run(_params(root, on_error="skip"), out, num_workers=1)
    expected = sorted(
        [
            f"{root / 'Annotations' / 'img2.xml'}: no image file for 'img2' in {root / 'JPEGImages'}",
            f"{xml}: box (xmin=1, ymin=1, xmax=12, ymax=30) lies outside the 12x16 image",
        ]
    )
    with PerImageReader([out / "trainval.h5"]) as r:
        assert r.image_ids == ["img1"]
        assert r.json_attr("problems") == expected
        assert r.attrs["clipped_boxes"] == 0
    with PerImageReader([out / "test.h5"]) as r:
        assert r.image_ids == ["img3", "img4"]
        assert r.json_attr("problems") == expected
        np.testing.assert_array_equal(r.rows("gt_boxes", 0), [[1, 1, 6, 6]])  # only the dog is left
        np.testing.assert_array_equal(r.rows("gt_labels", 0), [1])
    err = capsys.readouterr().err
    assert "warning: 2 item(s) skipped (data.on_error: skip)" in err
    assert f"warning: skipped: {expected[0]}" in err


def test_image_in_both_splits(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "voc", splits={"trainval": ["img1", "img2"], "test": ["img2", "img3"]})
    where = root / "ImageSets" / "Main"
    with pytest.raises(DataError) as info:
        index.run(_params(root), tmp_path / "strict", num_workers=1)
    assert f"{where}: image 'img2' is in both trainval and test" in str(info.value)
    assert not (tmp_path / "strict").exists()

    out = tmp_path / "lenient"
    index.run(_params(root, on_error="skip"), out, num_workers=1)
    with PerImageReader([out / "trainval.h5"]) as r:
        assert r.image_ids == ["img1", "img2"]
        assert r.json_attr("problems") == [f"{where}: image 'img2' is in both trainval and test"]
    with PerImageReader([out / "test.h5"]) as r:
        assert r.image_ids == ["img3"]  # removed from the test split


def test_duplicate_split_line_is_a_problem(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "voc", splits={"trainval": ["img1", "img1"], "test": ["img3"]})
    with pytest.raises(DataError, match="line 2: duplicate image id 'img1'"):
        index.run(_params(root), tmp_path / "out", num_workers=1)


def test_missing_split_file(root: Path, tmp_path: Path) -> None:
    (root / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt: split file not found") as info:
        index.run(_params(root), tmp_path / "out", num_workers=1)
    assert "set data.split: auto to split the images by a hash of their id" in str(info.value)
    assert not (tmp_path / "out").exists()


# --- data.split: auto ---------------------------------------------------------------------------------

AUTO = {"split": "auto", "test_fraction": 0.5, "split_seed": 5}  # puts img1 and img3 in the test split


@pytest.fixture()
def unsplit(tmp_path: Path) -> Path:
    """The dataset as annotation tools export it: Annotations/ and JPEGImages/, no ImageSets/."""
    root = _dataset(tmp_path / "unsplit", splits={})
    (root / "ImageSets" / "Main").rmdir()
    (root / "ImageSets").rmdir()
    return root


def test_auto_split_writes_the_split_as_imagesets_files(unsplit: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    index.run(_params(unsplit, **AUTO), out, num_workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["test.h5", "test.txt", "trainval.h5", "trainval.txt"]
    assert (out / "trainval.txt").read_text() == "img2\nimg4\n"
    assert (out / "test.txt").read_text() == "img1\nimg3\n"
    with PerImageReader([out / "trainval.h5"]) as r:
        assert r.image_ids == ["img2", "img4"]
        assert r.json_attr("params")["data"]["split"] == "auto"
    with PerImageReader([out / "test.h5"]) as r:
        assert r.image_ids == ["img1", "img3"]


def test_an_auto_split_pinned_into_imagesets_gives_the_same_index(unsplit: Path, tmp_path: Path) -> None:
    index.run(_params(unsplit, **AUTO), tmp_path / "auto", num_workers=1)
    (unsplit / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("trainval", "test"):
        (unsplit / "ImageSets" / "Main" / f"{split}.txt").write_bytes((tmp_path / "auto" / f"{split}.txt").read_bytes())
    index.run(_params(unsplit), tmp_path / "pinned", num_workers=1)
    for split in ("trainval", "test"):
        with PerImageReader([tmp_path / "auto" / f"{split}.h5"]) as auto, PerImageReader(
            [tmp_path / "pinned" / f"{split}.h5"]
        ) as pinned:
            assert auto.image_ids == pinned.image_ids
            for i in range(len(auto)):
                np.testing.assert_array_equal(auto.rows("gt_boxes", i), pinned.rows("gt_boxes", i))


def test_auto_split_lists_ids_that_fail_validation_too(unsplit: Path, tmp_path: Path) -> None:
    (unsplit / "JPEGImages" / "img3.png").unlink()
    out = tmp_path / "index"
    index.run(_params(unsplit, on_error="skip", **AUTO), out, num_workers=1)
    assert (out / "test.txt").read_text() == "img1\nimg3\n"  # the drawn split, so that pinning it changes nothing
    with PerImageReader([out / "test.h5"]) as r:
        assert r.image_ids == ["img1"]


def test_auto_split_is_deterministic_and_about_the_fraction() -> None:
    # sha256, never hash(): the same on every machine and Python; these values pin it
    assert [in_test_split(f"{i:06d}", 0.5, 0) for i in range(8)] == [False, True, False, True, True, False, True, True]
    ids = [f"image_{i}" for i in range(4000)]
    drawn = [in_test_split(i, 0.3, 0) for i in ids]
    assert drawn == [in_test_split(i, 0.3, 0) for i in ids]
    assert abs(np.mean(drawn) - 0.3) < 0.02
    assert drawn != [in_test_split(i, 0.3, 1) for i in ids]  # another seed, another split
    # an image's split depends on its own id only, and a larger fraction only adds test images
    assert all(in_test_split(i, 0.5, 0) for i, test in zip(ids, drawn) if test)


def test_auto_split_without_images_in_a_split(unsplit: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        index.run(_params(unsplit, **{**AUTO, "split_seed": 0}), tmp_path / "out", num_workers=1)
    assert str(info.value) == (f"{unsplit}: data.split: auto put none of the 4 images in the test split "
                               "(test_fraction 0.5); change data.test_fraction or data.split_seed")
    assert not (tmp_path / "out").exists()


def test_auto_split_without_annotations(tmp_path: Path) -> None:
    (tmp_path / "empty" / "Annotations").mkdir(parents=True)
    with pytest.raises(DataError, match=r"Annotations: no \.xml annotation files to split \(data.split: auto\)"):
        index.run(_params(tmp_path / "empty", **AUTO), tmp_path / "out", num_workers=1)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        index.run(_params(tmp_path / "nowhere"), tmp_path / "out", num_workers=1)
    assert str(info.value) == f"{tmp_path / 'nowhere'}: dataset folder not found (data.root in params.yaml)"


def test_no_classes_at_all(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "voc", images={"a": (4, 4, [])}, splits={"trainval": ["a"], "test": []})
    with pytest.raises(DataError, match="no object classes found"):
        index.run(_params(root), tmp_path / "out", num_workers=1)


def test_problems_attribute_is_json_list(root: Path, tmp_path: Path) -> None:
    (root / "Annotations" / "img4.xml").write_text("<annotation>")
    out = tmp_path / "index"
    index.run(_params(root, on_error="skip"), out, num_workers=1)
    with PerImageReader([out / "test.h5"]) as r:
        (problem,) = json.loads(r.attrs["problems"])
        assert problem.startswith(f"{root / 'Annotations' / 'img4.xml'}: malformed XML")
        assert r.image_ids == ["img3"]


# --- a real dataset: BCCD (developers' and CI's machines only) ------------------------------------

from helpers import BCCD  # noqa: E402


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD dataset not present at {BCCD}")
def test_bccd_is_read_by_changing_params_only(tmp_path):
    data = _params(BCCD)
    with pytest.raises(DataError, match="2 problem") as error:
        index.run(data, tmp_path / "strict")
    assert "BloodImage_00338.xml" in str(error.value) and "BloodImage_00343.xml" in str(error.value)
    index.run(_params(BCCD, on_error="skip"), tmp_path / "index")
    with PerImageReader([tmp_path / "index" / "trainval.h5"]) as trainval, PerImageReader(
        [tmp_path / "index" / "test.h5"]
    ) as test:
        assert (len(trainval), len(test)) == (292, 72)
        assert trainval.json_attr("classes") == ["Platelets", "RBC", "WBC"]
        assert len(trainval.json_attr("problems")) == 2
        assert int(trainval.counts().sum() + test.counts().sum()) > 4000
        first = trainval.rows("gt_boxes", trainval.position("BloodImage_00000"))
        assert first[0].tolist() == [259.0, 176.0, 491.0, 376.0]  # WBC xmin 260 ymin 177 xmax 491 ymax 376
