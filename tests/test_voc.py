"""VOC layout: 1-based inclusive XML <-> continuous boxes, validation, and problem reporting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from stages.data.voc import (
    Annotation,
    DataError,
    Entry,
    Problems,
    VocObject,
    build_record,
    discover_classes,
    find_image,
    parse_annotation,
    read_annotations,
    read_split_ids,
    voc_entries,
    write_annotation,
)

CLASSES = ("cat", "dog")
WIDTH, HEIGHT = 20, 10


def _object_xml(name: str, xmin, ymin, xmax, ymax, difficult: str | None = None) -> str:
    flag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return (
        f"<object><name>{name}</name>{flag}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _write_xml(path: Path, objects: str, filename: str = "a.jpg", size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    path.write_text(
        f"<annotation><filename> {filename} </filename>"
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"{objects}</annotation>"
    )
    return path


# ---------------------------------------------------------------- parse_annotation


def test_parse_converts_one_based_inclusive_to_continuous(tmp_path: Path) -> None:
    path = _write_xml(tmp_path / "a.xml", _object_xml("cat", 1, 2, 10, 5))
    ann = parse_annotation(path)
    assert ann.filename == "a.jpg"  # whitespace stripped
    assert (ann.width, ann.height) == (WIDTH, HEIGHT)
    (obj,) = ann.objects
    assert obj.name == "cat"
    # x1 = xmin - 1 = 0, y1 = ymin - 1 = 1, x2 = xmax = 10, y2 = ymax = 5
    assert obj.box == (0.0, 1.0, 10.0, 5.0)
    # width x2 - x1 = 10 equals the devkit's xmax - xmin + 1 = 10 - 1 + 1
    assert obj.box[2] - obj.box[0] == 10 - 1 + 1
    assert obj.box[3] - obj.box[1] == 5 - 2 + 1


def test_parse_float_coordinates(tmp_path: Path) -> None:
    path = _write_xml(tmp_path / "a.xml", _object_xml("cat", "1.5", "2.0", "10.25", "5"))
    assert parse_annotation(path).objects[0].box == (0.5, 1.0, 10.25, 5.0)


@pytest.mark.parametrize("flag, expected", [("1", True), ("0", False), (None, False), ("", False), ("1.0", True)])
def test_parse_difficult_flag(tmp_path: Path, flag: str | None, expected: bool) -> None:
    path = _write_xml(tmp_path / "a.xml", _object_xml("cat", 1, 1, 5, 5, difficult=flag))
    assert parse_annotation(path).objects[0].difficult is expected


def test_parse_several_objects_in_order(tmp_path: Path) -> None:
    path = _write_xml(tmp_path / "a.xml", _object_xml("dog", 3, 3, 4, 4, "1") + _object_xml("cat", 1, 1, 2, 2))
    objects = parse_annotation(path).objects
    assert [o.name for o in objects] == ["dog", "cat"]
    assert [o.difficult for o in objects] == [True, False]


def test_parse_without_size_gives_zero_size(tmp_path: Path) -> None:
    path = tmp_path / "a.xml"
    path.write_text("<annotation><filename>a.jpg</filename></annotation>")
    ann = parse_annotation(path)
    assert (ann.width, ann.height, ann.objects) == (0, 0, ())


def test_parse_malformed_xml(tmp_path: Path) -> None:
    path = tmp_path / "bad.xml"
    path.write_text("<annotation><filename>a.jpg</filename>")
    with pytest.raises(DataError) as info:
        parse_annotation(path)
    assert str(info.value).startswith(f"{path}: malformed XML")
    assert isinstance(info.value, PipelineError)


@pytest.mark.parametrize(
    "objects, reason",
    [
        ("<object><name>cat</name></object>", "object without <bndbox>"),
        (_object_xml("", 1, 1, 5, 5), "object without <name>"),
        (_object_xml("cat", "one", 1, 5, 5), "could not convert string to float"),
        ("<object><name>cat</name><bndbox><xmin>1</xmin></bndbox></object>", "malformed annotation"),
    ],
)
def test_parse_malformed_annotation(tmp_path: Path, objects: str, reason: str) -> None:
    path = _write_xml(tmp_path / "bad.xml", objects)
    with pytest.raises(DataError) as info:
        parse_annotation(path)
    assert str(info.value).startswith(f"{path}: malformed annotation")
    assert reason in str(info.value)


def test_parse_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.xml"
    with pytest.raises(DataError) as info:
        parse_annotation(path)
    assert str(info.value) == f"{path}: annotation file not found"


def test_write_then_parse_round_trip(tmp_path: Path) -> None:
    objects = [VocObject("cat", (0.0, 1.0, 10.0, 5.0), False), VocObject("dog", (4.0, 2.0, 19.0, 10.0), True)]
    path = tmp_path / "a.xml"
    write_annotation(path, "a.jpg", WIDTH, HEIGHT, objects)
    text = path.read_text()
    # back to 1-based inclusive integers
    assert "<xmin>1</xmin>" in text and "<ymin>2</ymin>" in text and "<xmax>10</xmax>" in text
    assert "<difficult>1</difficult>" in text
    assert parse_annotation(path) == Annotation("a.jpg", WIDTH, HEIGHT, tuple(objects))


# ---------------------------------------------------------------- splits, images, classes


def _split_file(root: Path, split: str, text: str) -> Path:
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_read_split_ids_reports_duplicates(tmp_path: Path) -> None:
    path = _split_file(tmp_path, "train", "a\nb\n\na\nc  1\r\nb\n")
    problems = Problems("raise")
    assert read_split_ids(tmp_path, "train", problems) == ["a", "b", "c"]
    assert problems.messages == [
        f"{path}: line 4: duplicate image id 'a'",
        f"{path}: line 6: duplicate image id 'b'",
    ]


def test_read_split_ids_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_split_ids(tmp_path, "test", Problems("skip"))
    assert str(info.value).startswith(f"{tmp_path / 'ImageSets' / 'Main' / 'test.txt'}: split file not found")


def _image(path: Path, size: tuple[int, int] = (WIDTH, HEIGHT), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (50, 100, 150)).save(path, fmt)
    return path


def test_find_image_by_id(tmp_path: Path) -> None:
    jpg = _image(tmp_path / "JPEGImages" / "a.jpg", fmt="JPEG")
    png = _image(tmp_path / "JPEGImages" / "b.png")
    assert find_image(tmp_path, "a", "") == jpg
    assert find_image(tmp_path, "b", "other.jpg") == png


def test_find_image_prefers_jpg(tmp_path: Path) -> None:
    jpg = _image(tmp_path / "JPEGImages" / "a.jpg", fmt="JPEG")
    _image(tmp_path / "JPEGImages" / "a.png")
    assert find_image(tmp_path, "a", "a.png") == jpg


def test_find_image_falls_back_to_xml_filename(tmp_path: Path) -> None:
    photo = _image(tmp_path / "JPEGImages" / "photo_001.png")
    assert find_image(tmp_path, "a", "photo_001.png") == photo
    assert find_image(tmp_path, "a", "nothing.png") is None
    assert find_image(tmp_path, "a", "") is None


def test_read_annotations_reports_and_skips_bad_files(tmp_path: Path) -> None:
    (tmp_path / "Annotations").mkdir()
    _write_xml(tmp_path / "Annotations" / "good.xml", _object_xml("cat", 1, 1, 5, 5))
    (tmp_path / "Annotations" / "bad.xml").write_text("<annotation>")
    problems = Problems("skip")
    annotations = read_annotations(tmp_path, ["good", "bad", "missing"], problems)
    assert list(annotations) == ["good"]
    assert len(problems.messages) == 2
    assert problems.messages[0].startswith(f"{tmp_path / 'Annotations' / 'bad.xml'}: malformed XML")
    assert problems.messages[1] == f"{tmp_path / 'Annotations' / 'missing.xml'}: annotation file not found"


def test_discover_classes_sorted_unique() -> None:
    anns = [
        Annotation("a", 1, 1, (VocObject("zebra", (0, 0, 1, 1), False), VocObject("cat", (0, 0, 1, 1), False))),
        Annotation("b", 1, 1, (VocObject("cat", (0, 0, 1, 1), True),)),
        Annotation("c", 1, 1, ()),
    ]
    assert discover_classes(anns) == ("cat", "zebra")
    assert discover_classes([]) == ()


# ---------------------------------------------------------------- build_record


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    _image(tmp_path / "JPEGImages" / "img.png")  # 20 wide, 10 high
    return tmp_path


def _record(root: Path, *objects: VocObject, size: tuple[int, int] = (WIDTH, HEIGHT), on_error: str = "skip"):
    problems = Problems(on_error)
    annotation = Annotation("img.png", size[0], size[1], objects)
    entry = Entry("img", annotation, root / "JPEGImages" / "img.png", _xml_path(root))
    return build_record(root, entry, CLASSES, problems), problems


def _xml_path(root: Path) -> Path:
    return root / "Annotations" / "img.xml"


def test_build_record_good(root: Path) -> None:
    record, problems = _record(
        root,
        VocObject("dog", (2.0, 3.0, 8.0, 9.0), True),
        VocObject("cat", (0.0, 0.0, 20.0, 10.0), False),  # the whole image: not clipped
    )
    assert problems.messages == [] and problems.clipped_boxes == 0
    assert record.image_id == "img"
    assert record.path == "JPEGImages/img.png"
    assert (record.width, record.height) == (WIDTH, HEIGHT)
    assert record.boxes.dtype == np.float32 and record.labels.dtype == np.int32 and record.difficult.dtype == bool
    np.testing.assert_array_equal(record.boxes, [[2, 3, 8, 9], [0, 0, 20, 10]])
    np.testing.assert_array_equal(record.labels, [1, 0])  # index into ("cat", "dog")
    np.testing.assert_array_equal(record.difficult, [True, False])


def test_build_record_no_objects(root: Path) -> None:
    record, problems = _record(root)
    assert problems.messages == []
    assert record.boxes.shape == (0, 4) and record.boxes.dtype == np.float32
    assert record.labels.shape == (0,) and record.labels.dtype == np.int32
    assert record.difficult.shape == (0,) and record.difficult.dtype == bool


def test_build_record_unknown_class(root: Path) -> None:
    record, problems = _record(root, VocObject("bird", (0, 0, 5, 5), False), VocObject("dog", (1, 1, 5, 5), False))
    assert problems.messages == [f"{_xml_path(root)}: unknown class 'bird' (classes: ['cat', 'dog'])"]
    np.testing.assert_array_equal(record.boxes, [[1, 1, 5, 5]])
    np.testing.assert_array_equal(record.labels, [1])


@pytest.mark.parametrize(
    "box, described",
    [
        # VOC xmin == xmax == 5: x1 = 4, x2 = 5, one pixel wide: zero area by design
        ((4.0, 0.0, 5.0, 5.0), "box (xmin=5, ymin=1, xmax=5, ymax=5)"),
        # ymin == ymax
        ((0.0, 2.0, 5.0, 3.0), "box (xmin=1, ymin=3, xmax=5, ymax=3)"),
        # inverted: x2 < x1
        ((10.0, 0.0, 5.0, 5.0), "box (xmin=11, ymin=1, xmax=5, ymax=5)"),
    ],
)
def test_build_record_zero_area_or_inverted(root: Path, box: tuple, described: str) -> None:
    record, problems = _record(root, VocObject("cat", box, False))
    assert problems.messages == [f"{_xml_path(root)}: zero-area or inverted {described}"]
    assert record.boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "box, described",
    [
        ((0.0, 0.0, 22.0, 5.0), "box (xmin=1, ymin=1, xmax=22, ymax=5)"),  # 2 px past the right edge
        ((-2.0, 0.0, 5.0, 5.0), "box (xmin=-1, ymin=1, xmax=5, ymax=5)"),  # 2 px past the left edge
        ((0.0, 0.0, 5.0, 11.5), "box (xmin=1, ymin=1, xmax=5, ymax=11.5)"),  # 1.5 px past the bottom
        ((30.0, 0.0, 40.0, 5.0), "box (xmin=31, ymin=1, xmax=40, ymax=5)"),  # entirely outside
    ],
)
def test_build_record_box_outside_image(root: Path, box: tuple, described: str) -> None:
    record, problems = _record(root, VocObject("cat", box, False), VocObject("dog", (1, 1, 4, 4), False))
    assert problems.messages == [f"{_xml_path(root)}: {described} lies outside the 20x10 image"]
    assert problems.clipped_boxes == 0
    np.testing.assert_array_equal(record.boxes, [[1, 1, 4, 4]])


def test_build_record_clips_boxes_overshooting_by_one_pixel(root: Path) -> None:
    record, problems = _record(
        root,
        # VOC xmin = 0, ymin = 0 (one past the left/top edge), xmax = 21, ymax = 11 (one past right/bottom)
        VocObject("cat", (-1.0, -1.0, 21.0, 11.0), False),
        VocObject("dog", (5.0, 5.0, 20.5, 9.0), False),  # half a pixel past the right edge
        VocObject("dog", (5.0, 5.0, 20.0, 10.0), False),  # exactly at the border: not clipped
    )
    assert problems.messages == []
    assert problems.clipped_boxes == 2
    np.testing.assert_array_equal(record.boxes, [[0, 0, 20, 10], [5, 5, 20, 9], [5, 5, 20, 10]])


def test_build_record_rejects_non_finite_box(root: Path) -> None:
    record, problems = _record(root, VocObject("cat", (float("nan"), 0.0, 5.0, 5.0), False))
    # NaN fails every comparison, so without an explicit check it passed as a "clipped" box
    assert problems.messages == [f"{_xml_path(root)}: non-finite box (xmin=nan, ymin=1, xmax=5, ymax=5)"]
    assert problems.clipped_boxes == 0
    assert record.boxes.shape == (0, 4)


def test_build_record_size_disagrees_with_image(root: Path) -> None:
    record, problems = _record(root, VocObject("cat", (0, 0, 5, 5), False), size=(10, 20))
    assert record is None
    assert problems.messages == [f"{_xml_path(root)}: size 10x20 disagrees with the image's 20x10"]


def test_build_record_accepts_missing_xml_size(root: Path) -> None:
    record, problems = _record(root, VocObject("cat", (0, 0, 5, 5), False), size=(0, 0))
    assert problems.messages == []
    assert (record.width, record.height) == (WIDTH, HEIGHT)


def test_voc_entries_report_a_missing_image(root: Path) -> None:
    problems = Problems("skip")
    annotations = {"img": Annotation("", WIDTH, HEIGHT, ()), "gone": Annotation("gone.jpg", WIDTH, HEIGHT, ())}
    (entry,) = voc_entries(root, ["gone", "img", "unparsed"], annotations, problems)
    assert entry == Entry("img", annotations["img"], root / "JPEGImages" / "img.png", _xml_path(root),
                          ("Annotations/img.xml",))
    missing = f"{root / 'Annotations' / 'gone.xml'}: no image file for 'gone' in {root / 'JPEGImages'}"
    assert problems.messages == [missing]


def test_build_record_undecodable_image(tmp_path: Path) -> None:
    path = tmp_path / "JPEGImages" / "img.jpg"
    path.parent.mkdir()
    path.write_bytes(b"")
    problems = Problems("skip")
    entry = Entry("img", Annotation("img.jpg", WIDTH, HEIGHT, ()), path, _xml_path(tmp_path))
    record = build_record(tmp_path, entry, CLASSES, problems)
    assert record is None
    assert len(problems.messages) == 1
    assert problems.messages[0].startswith(f"{path}: cannot decode image")


# ---------------------------------------------------------------- Problems


def test_problems_raise_mode_lists_messages() -> None:
    problems = Problems("raise")
    problems.add("b.xml", "second")
    problems.add(Path("a.xml"), "first")
    with pytest.raises(DataError) as info:
        problems.raise_if_strict()
    message = str(info.value)
    assert message.startswith("2 problem(s) in the dataset; nothing was written.\n  a.xml: first\n  b.xml: second\n")
    assert "data.on_error: skip" in message


def test_problems_raise_mode_truncates_long_lists() -> None:
    problems = Problems("raise")
    for i in range(60):
        problems.add(f"{i:02d}.xml", "bad")
    with pytest.raises(DataError) as info:
        problems.raise_if_strict()
    message = str(info.value)
    assert message.startswith("60 problem(s)")
    assert "49.xml: bad" in message and "50.xml" not in message
    assert "... and 10 more" in message


def test_problems_raise_mode_without_messages_is_silent() -> None:
    problems = Problems("raise")
    problems.count_clipped()  # clipping alone is not an error
    problems.raise_if_strict()
    assert problems.clipped_boxes == 1


def test_problems_skip_mode_never_raises() -> None:
    problems = Problems("skip")
    problems.add("a.xml", "bad")
    problems.raise_if_strict()
    assert problems.messages == ["a.xml: bad"]
