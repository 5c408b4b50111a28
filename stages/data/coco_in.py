"""COCO in: a split given as a COCO annotation file and its image folder (``data.format: coco``).

A split is one ``instances_*.json`` (``images``, ``annotations``, ``categories``)
and the folder its images' ``file_name`` are relative to, both inside
``data.root``. The file is parsed with :mod:`json` (a syntax error then names
its line) and indexed by pycocotools' ``COCO`` (``imgs``, ``cats``,
``imgToAnns``), the COCO API the evaluation stage uses too.

The conventions, the inverse of :mod:`stages.data.coco` (which writes such files):

* the index's image id is the stem of ``file_name`` (``000000397133.jpg`` ->
  ``000000397133``; the ``coco_gt`` stage's ``JPEGImages/<VOC id>.jpg`` -> the
  VOC id). COCO's numeric ids only link annotations to images and name the
  entries in messages;
* ``bbox`` ``[x, y, w, h]`` in continuous pixels -> ``x1, y1, x2, y2 = x, y,
  x + w, y + h`` (:func:`stages.ops.boxes.xywh_to_xyxy`), here and nowhere else;
* ``iscrowd: 1`` is VOC's ``difficult`` (the ``coco_gt`` stage writes a
  difficult box as ``iscrowd: 1``);
* a category is a class by its ``name``; the classes a file declares are its
  categories' names in the order of their ids.

Every problem names the file and the entry: an entry without its keys or with
values of the wrong type, an id used by several entries of a section (all of
them are dropped: which one is meant is unknown), an annotation of an image id
or category id the file does not declare, a ``file_name`` outside the image
folder, two images with the same name (file-name stem), a missing image file.
The boxes are then checked as VOC's are (:func:`stages.data.voc.build_record`).
"""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pycocotools.coco import COCO

from stages.data.voc import Annotation, DataError, Entry, Problems, VocObject
from stages.ops.boxes import xywh_to_xyxy


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_bbox(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


# section -> the keys each of its entries needs, with their checks; optional keys are checked when present
REQUIRED: dict[str, dict[str, Callable[[Any], bool]]] = {
    "images": {"id": _is_int, "file_name": _is_name},
    "annotations": {"id": _is_int, "image_id": _is_int, "category_id": _is_int, "bbox": _is_bbox},
    "categories": {"id": _is_int, "name": _is_name},
}
OPTIONAL: dict[str, dict[str, Callable[[Any], bool]]] = {
    "images": {"width": _is_int, "height": _is_int},
    "annotations": {"iscrowd": lambda v: v in (0, 1)},
    "categories": {},
}
NOUN = {"images": "image", "annotations": "annotation", "categories": "category"}


def read_split(
    root: Path, annotation_file: str, images_dir: str, problems: Problems
) -> tuple[list[Entry], tuple[str, ...]]:
    """The images of one split (in the file's order) and the class names its categories declare (in id order)."""
    path = root / annotation_file
    sections = _usable_entries(path, _load(path), problems)
    coco = COCO()
    coco.dataset = sections
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    categories = {cid: coco.cats[cid]["name"].strip() for cid in sorted(coco.cats)}
    entries: list[Entry] = []
    named: dict[str, int] = {}  # image name -> the COCO id of the image that has it
    for image in coco.imgs.values():
        entry = _entry(root / images_dir, path, image, coco.imgToAnns[image["id"]], categories, problems)
        if entry is not None and entry.image_id in named:
            problems.add(entry.where, f"file_name {image['file_name']!r} gives it the name {entry.image_id!r} "
                                      f"of image id {named[entry.image_id]} (images are named by file-name stem)")
        elif entry is not None:
            named[entry.image_id] = image["id"]
            entries.append(entry)
    return entries, tuple(dict.fromkeys(categories.values()))


def _load(path: Path) -> dict[str, Any]:
    """The JSON document of ``path``; raise :class:`DataError` naming the file if it is not a COCO file."""
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: annotation file not found (data.coco_* in params.yaml are relative to data.root)"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:  # a folder in its place, no read permission...
        raise DataError(f"{path}: cannot read the annotation file ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(document, dict):
        raise DataError(f"{path}: not a COCO annotation file (a JSON {type(document).__name__}, not an object)")
    for section in REQUIRED:
        if not isinstance(document.get(section), list):
            raise DataError(f"{path}: not a COCO instances file (no {section!r} list)")
    return document


def _usable_entries(path: Path, document: dict[str, Any], problems: Problems) -> dict[str, list[dict]]:
    """Each section's well-formed entries whose id no other entry uses; an annotation only if its image is kept.

    An annotation of a dropped image goes with it unreported (the image's problem is); an
    annotation of an image id the file never declares is a problem of its own.
    """
    usable = {}
    for section in REQUIRED:
        entries = [e for k, e in enumerate(document[section]) if _well_formed(path, section, k, e, problems)]
        uses = Counter(e["id"] for e in entries)
        for duplicate in sorted(i for i, n in uses.items() if n > 1):
            problems.add(path, f"{NOUN[section]} id {duplicate} is used by {uses[duplicate]} entries (all dropped)")
        usable[section] = [e for e in entries if uses[e["id"]] == 1]
    declared = {e.get("id") for e in document["images"] if isinstance(e, dict)}
    kept = {e["id"] for e in usable["images"]}
    for ann in usable["annotations"]:
        if ann["image_id"] not in declared:
            problems.add(path, f"annotation id {ann['id']}: unknown image id {ann['image_id']}")
    usable["annotations"] = [a for a in usable["annotations"] if a["image_id"] in kept]
    return usable


def _well_formed(path: Path, section: str, position: int, entry: Any, problems: Problems) -> bool:
    """Whether ``entry`` has the keys of its section with values of the right types; if not, reported."""
    if not isinstance(entry, dict):
        problems.add(path, f"{section}[{position}]: not a JSON object")
        return False
    name = f"{NOUN[section]} id {entry['id']}" if _is_int(entry.get("id")) else f"{section}[{position}]"
    bad = [key for key, ok in REQUIRED[section].items() if key not in entry or not ok(entry[key])]
    bad += [key for key, ok in OPTIONAL[section].items() if key in entry and not ok(entry[key])]
    if bad:
        problems.add(path, f"{name}: missing or malformed {', '.join(map(repr, bad))}")
    return not bad


def _entry(
    folder: Path, path: Path, image: dict, anns: list[dict], categories: dict[int, str], problems: Problems
) -> Entry | None:
    """The image and its objects; ``None`` (reported) if its file name or its file is unusable."""
    where = f"{path}: image id {image['id']}"
    name = PurePosixPath(image["file_name"])
    if name.is_absolute() or ".." in name.parts:
        problems.add(where, f"file_name {image['file_name']!r} is not a path inside the image folder {folder}")
        return None
    image_path = folder / name
    if not image_path.is_file():
        problems.add(where, f"no image file {image_path}")
        return None
    objects = tuple(obj for ann in anns if (obj := _object(ann, categories, where, problems)))
    annotation = Annotation(image["file_name"], image.get("width", 0), image.get("height", 0), objects)
    return Entry(name.stem, annotation, image_path, where)


def _object(ann: dict, categories: dict[int, str], where: str, problems: Problems) -> VocObject | None:
    """One annotation as an object in the project's box convention; ``None`` (reported) if its category is unknown."""
    if ann["category_id"] not in categories:
        problems.add(where, f"annotation id {ann['id']}: unknown category id {ann['category_id']} "
                            f"(categories: {list(categories)})")
        return None
    x1, y1, x2, y2 = xywh_to_xyxy([ann["bbox"]])[0].tolist()
    ref = f"annotation id {ann['id']} (bbox {json.dumps(ann['bbox'])})"
    return VocObject(categories[ann["category_id"]], (x1, y1, x2, y2), ann.get("iscrowd", 0) == 1, ref)

