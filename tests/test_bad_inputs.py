"""Bad-input corpus: broken or awkward VOC datasets, built at test time, run through ``index`` and ``proposals``.

Every case starts from the same small VOC folder: two classes given explicitly
(``cat``, ``dog``), ``good1`` and the *subject* image in ``trainval``, ``good2``
in ``test``, all 64x48 JPEGs with one cat and one dog. A builder then breaks
the subject (or a split file) in one way. ``CASES`` is the asserted outcome:

``raise mode``  the file or folder the ``DataError`` must name, with ``n``
                problems and nothing written; ``None``: the input is accepted
                and ``index`` writes both splits with no problems.
``n``           exact number of problems, in the error and in the ``problems``
                attribute of the index files (skip mode).
``skip mode``   KEPT: the subject is in the index with ``gt`` ground-truth boxes
                (bad boxes dropped and reported); DROPPED: it is left out and
                reported; FATAL: the dataset cannot be read at all, so skip
                mode raises the same ``DataError`` and writes nothing either.
``problem``     the start of the reported problem, with ``{xml}`` / ``{img}`` the
                subject's annotation and image, ``{root}`` the dataset folder.

In skip mode every id listed in a split file must be in that split's index or
named in ``problems``: nothing is dropped silently. Where the subject survives
the ``proposals`` stage then runs (``on_error: raise``, so any failure fails
the test) and every image must get boxes inside it, in original coordinates.
For the cases about image content (formats, colour modes, sizes, names) the
R-CNN ``features`` stage then caches finite features for every region.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
from helpers import REPO, tiny_params, write_params
from PIL import Image, ImageDraw

from stages import features, index, proposals
from stages.core import layout, runs
from stages.core.config import Config, load_config
from stages.core.store import PerImageReader
from stages.data.voc import DataError

KEPT, DROPPED, FATAL = "kept", "dropped", "fatal"
NON_ASCII = "café_ü_日本"


class Case(NamedTuple):
    name: str
    raise_names: str | None  # raise mode: what the DataError names; None = accepted
    problems: int  # exact count, both modes
    skip: str  # KEPT | DROPPED | FATAL: the subject in skip mode
    gt: int | None = None  # ground-truth boxes of the subject when KEPT
    problem: str = ""  # start of the reported problem
    subject: str = "subject"  # the subject's image id
    folder: str = "voc"  # the dataset folder's name
    min_proposals: int = 1  # proposals the subject must get
    proposal_split: str = "trainval"


CASES = [
    # name                         raise mode: DataError naming  n  skip mode gt  problem
    Case("malformed_xml",            "subject.xml",    1, DROPPED, None, "{xml}: malformed XML ("),
    Case("missing_annotation",       "subject.xml",    1, DROPPED, None, "{xml}: annotation file not found"),
    Case("unreadable_annotation",    "subject.xml",    1, DROPPED, None, "{xml}: cannot read the annotation ("),
    Case("object_without_bndbox",    "subject.xml",    1, DROPPED, None, "{xml}: malformed annotation (object without <bndbox>)"),
    Case("non_numeric_coordinate",   "subject.xml",    1, DROPPED, None, "{xml}: malformed annotation (could not convert string to float: 'ten')"),
    Case("size_disagrees_with_image", "subject.xml",   1, DROPPED, None, "{xml}: size 100x80 disagrees with the image's 64x48"),
    Case("missing_image",            "subject.xml",    1, DROPPED, None, "{xml}: no image file for 'subject' in {root}/JPEGImages"),
    Case("truncated_jpeg",           "subject.jpg",    1, DROPPED, None, "{img}: cannot decode image ("),
    Case("zero_byte_image",          "subject.jpg",    1, DROPPED, None, "{img}: cannot decode image (cannot identify image file"),
    Case("non_ascii_truncated",      f"{NON_ASCII}.jpg", 1, DROPPED, None, "{img}: cannot decode image (", subject=NON_ASCII),
    Case("colon_in_dataset_path",    "subject.jpg",    1, DROPPED, None, "{img}: cannot decode image (", folder="my data: v2"),
    Case("zero_area_box",            "subject.xml",    1, KEPT, 1, "{xml}: zero-area or inverted box (xmin=20, ymin=10, xmax=20, ymax=30)"),
    Case("inverted_box",             "subject.xml",    1, KEPT, 1, "{xml}: zero-area or inverted box (xmin=30, ymin=10, xmax=20, ymax=30)"),
    Case("box_outside_image",        "subject.xml",    1, KEPT, 1, "{xml}: box (xmin=50, ymin=10, xmax=90, ymax=30) lies outside the 64x48 image"),
    Case("nan_coordinate",           "subject.xml",    1, KEPT, 1, "{xml}: non-finite box (xmin=6, ymin=6, xmax=nan, ymax=30)"),
    Case("unknown_class",            "subject.xml",    1, KEPT, 1, "{xml}: unknown class 'horse' (classes: ['cat', 'dog'])"),
    Case("duplicate_id_in_split",    "trainval.txt",   1, KEPT, 2, "{root}/ImageSets/Main/trainval.txt: line 3: duplicate image id 'subject'"),
    Case("image_in_both_splits",     "ImageSets/Main", 1, KEPT, 2, "{root}/ImageSets/Main: image 'subject' is in both trainval and test"),
    Case("split_lists_file_names",   "subject.jpg.xml", 1, DROPPED, None, "{root}/Annotations/subject.jpg.xml: annotation file not found"),
    Case("split_file_not_utf8",      "trainval.txt",   1, FATAL, None, "{root}/ImageSets/Main/trainval.txt: not UTF-8 text ("),
    Case("missing_split_file",       "test.txt",       1, FATAL, None, "{root}/ImageSets/Main/test.txt: split file not found"),
    Case("split_file_bom_crlf",      None, 0, KEPT, 2),
    Case("empty_split_file",         None, 0, KEPT, 2, proposal_split="test"),
    Case("png_content_named_jpg",    None, 0, KEPT, 2),
    Case("xml_says_jpg_file_is_png", None, 0, KEPT, 2),
    Case("uppercase_extension",      None, 0, KEPT, 2),
    Case("image_named_by_xml_only",  None, 0, KEPT, 2),
    Case("grayscale_jpeg",           None, 0, KEPT, 2),
    Case("cmyk_jpeg",                None, 0, KEPT, 2),
    Case("huge_image_8000x6000",     None, 0, KEPT, 2),
    Case("tiny_image_8x8",           None, 0, KEPT, 1, min_proposals=0),
    Case("no_objects",               None, 0, KEPT, 0),
    Case("non_ascii_id",             None, 0, KEPT, 2, subject=NON_ASCII),
]  # fmt: skip
CASE = {case.name: case for case in CASES}
# Cases whose subject image is awkward to read or warp: the features stage runs on them too.
FEATURE_CASES = {"png_content_named_jpg", "xml_says_jpg_file_is_png", "uppercase_extension", "grayscale_jpeg",
                 "cmyk_jpeg", "huge_image_8000x6000", "tiny_image_8x8", "no_objects", "non_ascii_id"}
CLASSES = ("cat", "dog")

# ---------------------------------------------------------------------------------------------------------------
# Building a case

WIDTH, HEIGHT = 64, 48
# (name, xmin, ymin, xmax, ymax) in VOC 1-based inclusive pixels; values are written verbatim
OBJECTS = [("cat", 6, 6, 30, 30), ("dog", 36, 10, 60, 44)]
BUILDERS: dict[str, Callable[[Path, str], None]] = {}


def builds(name: str) -> Callable:
    def register(fn: Callable[[Path, str], None]) -> Callable[[Path, str], None]:
        BUILDERS[name] = fn
        return fn

    return register


def _picture(width: int = WIDTH, height: int = HEIGHT, objects: list = OBJECTS) -> Image.Image:
    """A flat background with one flat rectangle per object (compresses to little, segments cleanly)."""
    image = Image.new("RGB", (width, height), (30, 60, 90))
    draw = ImageDraw.Draw(image)
    for (_, x1, y1, x2, y2), colour in zip(objects, [(220, 40, 40), (40, 200, 60)]):
        draw.rectangle((x1 - 1, y1 - 1, x2 - 1, y2 - 1), fill=colour)
    return image


def _xml(path: Path, filename: str, width: object = WIDTH, height: object = HEIGHT, objects: list = OBJECTS) -> None:
    parts = [f"<annotation><filename>{filename}</filename>"]
    parts.append(f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    for name, *box in objects:
        parts.append(f"<object><name>{name}</name><difficult>0</difficult>")
        if box:
            parts.append("<bndbox>" + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box)))
            parts.append("</bndbox>")
        parts.append("</object>")
    path.write_text("".join(parts) + "</annotation>", encoding="utf-8")


def _split(root: Path, split: str, ids: list[str]) -> None:
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def _dataset(root: Path, subject: str) -> None:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    for image_id in ("good1", "good2", subject):
        _picture().save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        _xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg")
    _split(root, "trainval", ["good1", subject])
    _split(root, "test", ["good2"])


def _img(root: Path, subject: str) -> Path:
    return root / "JPEGImages" / f"{subject}.jpg"


def _ann(root: Path, subject: str) -> Path:
    return root / "Annotations" / f"{subject}.xml"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _boxes(root: Path, subject: str, objects: list) -> None:
    _xml(_ann(root, subject), f"{subject}.jpg", objects=objects)


@builds("malformed_xml")
def _(root: Path, subject: str) -> None:
    _ann(root, subject).write_text("<annotation><size><width>64</width>", encoding="utf-8")


@builds("missing_annotation")
def _(root: Path, subject: str) -> None:
    _ann(root, subject).unlink()


@builds("unreadable_annotation")
def _(root: Path, subject: str) -> None:
    # A folder where the file should be: open() fails with an OSError other than "not found",
    # as for a file without read permission (which a test running as root could not make).
    _ann(root, subject).unlink()
    _ann(root, subject).mkdir()


@builds("object_without_bndbox")
def _(root: Path, subject: str) -> None:
    _boxes(root, subject, [OBJECTS[0], ("dog",)])


@builds("non_numeric_coordinate")
def _(root: Path, subject: str) -> None:
    _boxes(root, subject, [("cat", "ten", 6, 30, 30), OBJECTS[1]])


@builds("size_disagrees_with_image")
def _(root: Path, subject: str) -> None:
    _xml(_ann(root, subject), f"{subject}.jpg", width=100, height=80)


@builds("missing_image")
def _(root: Path, subject: str) -> None:
    _img(root, subject).unlink()


@builds("truncated_jpeg")
@builds("non_ascii_truncated")
@builds("colon_in_dataset_path")
def _(root: Path, subject: str) -> None:
    _truncate(_img(root, subject))


@builds("zero_byte_image")
def _(root: Path, subject: str) -> None:
    _img(root, subject).write_bytes(b"")


@builds("zero_area_box")
def _(root: Path, subject: str) -> None:
    _boxes(root, subject, [("cat", 20, 10, 20, 30), OBJECTS[1]])


@builds("inverted_box")
def _(root: Path, subject: str) -> None:
    _boxes(root, subject, [("cat", 30, 10, 20, 30), OBJECTS[1]])


@builds("box_outside_image")
def _(root: Path, subject: str) -> None:
    _boxes(root, subject, [("cat", 50, 10, 90, 30), OBJECTS[1]])


@builds("nan_coordinate")
def _(root: Path, subject: str) -> None:
    _boxes(root, subject, [("cat", 6, 6, "nan", 30), OBJECTS[1]])


@builds("unknown_class")
def _(root: Path, subject: str) -> None:
    _boxes(root, subject, [("horse", 6, 6, 30, 30), OBJECTS[1]])


@builds("duplicate_id_in_split")
def _(root: Path, subject: str) -> None:
    _split(root, "trainval", ["good1", subject, subject])


@builds("image_in_both_splits")
def _(root: Path, subject: str) -> None:
    _split(root, "test", ["good2", subject])


@builds("split_lists_file_names")
def _(root: Path, subject: str) -> None:
    _split(root, "trainval", ["good1", f"{subject}.jpg"])


@builds("split_file_not_utf8")
def _(root: Path, subject: str) -> None:
    (root / "ImageSets" / "Main" / "trainval.txt").write_bytes(f"good1\n{subject}\ncafé\n".encode("latin-1"))


@builds("missing_split_file")
def _(root: Path, subject: str) -> None:
    (root / "ImageSets" / "Main" / "test.txt").unlink()


@builds("split_file_bom_crlf")
def _(root: Path, subject: str) -> None:
    # What Windows Notepad saves: a byte-order mark, then CRLF line ends.
    (root / "ImageSets" / "Main" / "trainval.txt").write_bytes(f"\ufeffgood1\r\n{subject}\r\n".encode("utf-8"))


@builds("empty_split_file")
def _(root: Path, subject: str) -> None:
    _split(root, "test", [])


@builds("png_content_named_jpg")
def _(root: Path, subject: str) -> None:
    _picture().save(_img(root, subject), "PNG")


@builds("xml_says_jpg_file_is_png")
def _(root: Path, subject: str) -> None:
    _img(root, subject).unlink()
    _picture().save(root / "JPEGImages" / f"{subject}.png")  # the XML still says <filename>subject.jpg


@builds("uppercase_extension")
def _(root: Path, subject: str) -> None:
    _img(root, subject).rename(root / "JPEGImages" / f"{subject}.JPG")


@builds("image_named_by_xml_only")
def _(root: Path, subject: str) -> None:
    _img(root, subject).rename(root / "JPEGImages" / "photo 001.jpeg")
    _xml(_ann(root, subject), "photo 001.jpeg")


@builds("grayscale_jpeg")
def _(root: Path, subject: str) -> None:
    _picture().convert("L").save(_img(root, subject), quality=90)


@builds("cmyk_jpeg")
def _(root: Path, subject: str) -> None:
    _picture().convert("CMYK").save(_img(root, subject), quality=90)


HUGE = [("cat", 1001, 1001, 3000, 3500), ("dog", 4501, 1251, 7500, 5500)]


@functools.cache
def _huge_jpeg() -> bytes:
    """8000 x 6000 flat-colour JPEG, made once: it compresses to well under 1 MB."""
    buffer = io.BytesIO()
    _picture(8000, 6000, HUGE).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


@builds("huge_image_8000x6000")
def _(root: Path, subject: str) -> None:
    _img(root, subject).write_bytes(_huge_jpeg())
    _xml(_ann(root, subject), f"{subject}.jpg", 8000, 6000, HUGE)


@builds("tiny_image_8x8")
def _(root: Path, subject: str) -> None:
    objects = [("cat", 2, 2, 7, 7)]
    _picture(8, 8, objects).save(_img(root, subject), quality=90)
    _xml(_ann(root, subject), f"{subject}.jpg", 8, 8, objects)


@builds("no_objects")
def _(root: Path, subject: str) -> None:
    _boxes(root, subject, [])


@builds("non_ascii_id")
def _(root: Path, subject: str) -> None:
    pass  # the base dataset, with the subject named NON_ASCII


def build(case: Case, folder: Path) -> Path:
    root = folder / case.folder
    _dataset(root, case.subject)
    BUILDERS[case.name](root, case.subject)
    return root


def expected_problem(case: Case, root: Path) -> str:
    return case.problem.format(root=root, xml=_ann(root, case.subject), img=_img(root, case.subject))


# ---------------------------------------------------------------------------------------------------------------
# Running the stages


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The tiny parameters, from a params.yaml in ``tmp_path``, which is made the working directory."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, tiny_params())
    return load_config()


def run_index(cfg: Config, root: Path, on_error: str, out: Path) -> None:
    data = dataclasses.replace(cfg.data, root=str(root), classes=CLASSES, on_error=on_error)
    index.run(data, out, num_workers=1)


def listed_ids(root: Path, split: str) -> list[str]:
    text = (root / "ImageSets" / "Main" / f"{split}.txt").read_text(encoding="utf-8-sig")
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def test_every_case_has_a_builder() -> None:
    assert len(CASES) >= 15 and len(CASE) == len(CASES)
    assert set(BUILDERS) == set(CASE)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_raise_mode(case: Case, cfg: Config, tmp_path: Path) -> None:
    root = build(case, tmp_path)
    out = tmp_path / "strict"
    if case.raise_names is None:
        run_index(cfg, root, "raise", out)
        for split in cfg.data.splits:
            with PerImageReader([out / f"{split}.h5"]) as r:
                assert r.json_attr("problems") == []
        return
    with pytest.raises(DataError) as info:
        run_index(cfg, root, "raise", out)
    message = str(info.value)
    assert case.raise_names in message
    assert expected_problem(case, root) in message
    if case.skip != FATAL:
        assert message.startswith(f"{case.problems} problem(s) in the dataset; nothing was written.")
    assert_nothing_written(out)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_skip_mode_then_proposals(case: Case, cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = build(case, tmp_path)
    out = layout.INDEX  # where the proposals stage reads it, relative to tmp_path
    if case.skip == FATAL:
        with pytest.raises(DataError, match=case.raise_names) as info:
            run_index(cfg, root, "skip", out)
        assert expected_problem(case, root) in str(info.value)
        assert_nothing_written(out)
        return
    run_index(cfg, root, "skip", out)

    err = capsys.readouterr().err
    assert err.count("warning: skipped: ") == case.problems
    problems, indexed = None, {}
    for split in cfg.data.splits:
        with PerImageReader([out / f"{split}.h5"]) as r:
            ids = indexed[split] = r.image_ids
            if problems is None:
                problems = r.json_attr("problems")
            assert r.json_attr("problems") == problems  # the same list, whole dataset, in every split
            assert r.json_attr("classes") == list(CLASSES)
            # Nothing silently dropped, nothing invented.
            listed = listed_ids(root, split)
            assert set(ids) <= set(listed)
            for image_id in listed:
                assert image_id in ids or any(image_id in m.replace(str(root), "") for m in problems), image_id
            for i, image_id in enumerate(ids):
                width, height = r.value("widths", i), r.value("heights", i)
                with Image.open(root / r.value("paths", i)) as image:
                    assert image.size == (width, height)
                gt = r.rows("gt_boxes", i)
                assert ((gt >= 0) & (gt <= [width, height, width, height])).all()
                assert (gt[:, 2:] > gt[:, :2]).all()
                if image_id == case.subject and split == "trainval":
                    assert len(gt) == case.gt
            if split == "trainval":
                assert (case.subject in ids) == (case.skip == KEPT)
                assert "good1" in ids
    assert not set(indexed["trainval"]) & set(indexed["test"])
    assert len(problems) == case.problems
    if case.problem:
        assert any(m.startswith(expected_problem(case, root)) for m in problems), problems
        assert f"warning: skipped: {expected_problem(case, root)}" in err

    if case.skip == KEPT:
        check_proposals(case, cfg)
    if case.name in FEATURE_CASES:
        monkeypatch.setattr(features, "default_workers", lambda num_workers: 0)  # warp in this process
        check_features(case, cfg)


def check_proposals(case: Case, cfg: Config) -> None:
    split = case.proposal_split
    out = layout.proposals_shard(split, 0)
    proposals.run(cfg.proposals, "raise", split, 0, 1, out, num_workers=1)
    with PerImageReader([layout.index_file(split)]) as idx, PerImageReader([out]) as result:
        assert result.image_ids == idx.image_ids
        assert result.json_attr("failed") == []
        for i, image_id in enumerate(idx.image_ids):
            width, height = idx.value("widths", i), idx.value("heights", i)
            boxes = result.rows("boxes", i)
            assert len(boxes) >= (case.min_proposals if image_id == case.subject else 1), image_id
            assert ((boxes >= 0) & (boxes <= [width, height, width, height])).all(), image_id
            assert (boxes[:, 2:] > boxes[:, :2]).all(), image_id
            if len(boxes):  # in original coordinates, not those of the image resized to max_side
                assert boxes[:, 2].max() >= width / 2 and boxes[:, 3].max() >= height / 2, image_id
    timing = runs.read(out)
    assert timing["images"] == len(idx.image_ids)
    assert timing["cpu_seconds"] < 20  # the huge image is resized to max_side first: seconds, not minutes


def check_features(case: Case, cfg: Config) -> None:
    """ImageNet features of every proposal (and ground truth) of the proposal split: finite, none missing."""
    split = case.proposal_split
    out = layout.features_shard("rcnn", split, 0)
    params = dataclasses.replace(cfg.features, model="imagenet")
    features.run(params, cfg.finetune, split, 0, 1, cfg.data.train_split, out, num_workers=1)
    with PerImageReader([layout.proposals_shard(split, 0)]) as boxes, PerImageReader([out]) as cached, \
            PerImageReader([layout.index_file(split)]) as idx:
        assert cached.image_ids == boxes.image_ids
        for i, image_id in enumerate(cached.image_ids):
            j = idx.image_ids.index(image_id)
            gt = len(idx.rows("gt_boxes", j)) if split == cfg.data.train_split else 0
            assert len(cached.rows("fc", i)) == len(boxes.rows("boxes", i)) + gt, image_id
            assert np.isfinite(cached.rows("fc", i).astype(np.float32)).all(), image_id


@pytest.mark.parametrize("name", ["truncated_jpeg", "split_file_not_utf8", "unreadable_annotation"])
def test_cli_reports_bad_input_without_traceback(name: str, tmp_path: Path) -> None:
    case = CASE[name]
    build(case, tmp_path)
    params = tiny_params()
    params["data"].update(root=case.folder, classes=list(CLASSES), on_error="raise")
    params["runtime"]["num_workers"] = 1
    write_params(tmp_path, params)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "stages", "index"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # tqdm bars aside
    assert case.raise_names in result.stderr.partition("error: ")[2]
    assert expected_problem(case, Path(case.folder)) in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path / layout.INDEX)
