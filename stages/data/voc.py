"""PASCAL VOC layout: reading, validating and writing annotations; the validation every format shares.

VOC XML stores 1-based inclusive pixel coordinates; the project uses continuous
``x1, y1, x2, y2`` (see :mod:`stages.ops.boxes`). The conversion happens here and
nowhere else: ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax``, so a box's
width ``x2 - x1`` equals the devkit's ``xmax - xmin + 1``.

A reader (VOC here, COCO in :mod:`stages.data.coco_in`) turns each image into
an :class:`Entry`; :func:`build_record` validates any entry the same way.
"""
from __future__ import annotations

import hashlib
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.core.errors import PipelineError
from stages.data.images import ImageError, load_image
from stages.ops.boxes import as_boxes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")
# Many annotation tools write a box edge one pixel past the image border; such
# boxes are clipped and counted rather than treated as errors.
EDGE_TOLERANCE = 1.0


class DataError(PipelineError, ValueError):
    """The dataset has problems and ``data.on_error`` is ``raise``."""


@dataclass(frozen=True)
class VocObject:
    name: str
    box: tuple[float, float, float, float]  # continuous x1, y1, x2, y2
    difficult: bool
    ref: str = ""  # how messages name the object in its file ("annotation id 7 (bbox [...])"); "" = by its VOC box


@dataclass(frozen=True)
class Annotation:
    filename: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


@dataclass(frozen=True)
class ImageRecord:
    """One validated image: everything later stages need to know about it."""

    image_id: str
    path: str  # relative to the dataset root
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32, continuous x1, y1, x2, y2
    labels: np.ndarray  # (K,) int32 index into the class list
    difficult: np.ndarray  # (K,) bool


@dataclass(frozen=True)
class Entry:
    """One image as its reader found it, still to be validated by :func:`build_record`."""

    image_id: str
    annotation: Annotation
    image_path: Path  # an existing file: readers report a missing image themselves
    where: Path | str  # what messages about the image name: its XML file, or a COCO file and image id
    files: tuple[str, ...] = ()  # the image's own annotation files, relative to the root (provenance)


@dataclass
class Problems:
    """Every problem found in a dataset, each naming its file; safe to fill from several threads."""

    on_error: str
    messages: list[str] = field(default_factory=list)
    clipped_boxes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, path: Path | str, message: str) -> None:
        with self._lock:
            self.messages.append(f"{path}: {message}")

    def count_clipped(self) -> None:
        with self._lock:
            self.clipped_boxes += 1

    def raise_if_strict(self) -> None:
        if self.messages and self.on_error == "raise":
            shown = "\n  ".join(sorted(self.messages)[:50])
            more = f"\n  ... and {len(self.messages) - 50} more" if len(self.messages) > 50 else ""
            raise DataError(
                f"{len(self.messages)} problem(s) in the dataset; nothing was written.\n  {shown}{more}\n"
                "Fix them, or set data.on_error: skip in params.yaml to skip the bad items."
            )


def parse_annotation(path: Path) -> Annotation:
    """Read one VOC XML file; raise :class:`DataError` naming the file if it is malformed."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except OSError as exc:  # a folder in its place, no read permission...
        raise DataError(f"{path}: cannot read the annotation ({exc.strerror or exc})") from None
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc})") from None
    try:
        size = root.find("size")
        width = int(float(size.findtext("width", "0"))) if size is not None else 0
        height = int(float(size.findtext("height", "0"))) if size is not None else 0
        objects = tuple(_parse_object(obj) for obj in root.iter("object"))
    except (TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: malformed annotation ({exc})") from None
    return Annotation(root.findtext("filename", "").strip(), width, height, objects)


def _parse_object(obj: ET.Element) -> VocObject:
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise ValueError("object without <bndbox>")
    xmin, ymin, xmax, ymax = (float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise ValueError("object without <name>")
    difficult = int(float(obj.findtext("difficult", "0") or 0)) == 1
    return VocObject(name, (xmin - 1.0, ymin - 1.0, xmax, ymax), difficult)


def write_annotation(path: Path, filename: str, width: int, height: int, objects: list[VocObject]) -> None:
    """Write a VOC XML file; boxes are converted back to 1-based inclusive integers."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "difficult").text = str(int(obj.difficult))
        bndbox = ET.SubElement(node, "bndbox")
        x1, y1, x2, y2 = obj.box
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, key).text = str(int(round(value)))
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)


def read_split_ids(root: Path, split: str, problems: Problems) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<split>.txt``, duplicates reported and dropped."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DataError(
            f"{path}: split file not found (is data.root a VOC folder? Without ImageSets/Main/, "
            "set data.split: auto to split the images by a hash of their id)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # Windows editors may start the file with a byte-order mark
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the split file ({exc.strerror})") from None
    ids: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if image_id in seen:
            problems.add(path, f"line {number}: duplicate image id {image_id!r}")
            continue
        seen.add(image_id)
        ids.append(image_id)
    return ids


def find_image(root: Path, image_id: str, filename: str) -> Path | None:
    """The image file of ``image_id``: ``JPEGImages/<id>.<ext>``, else the XML's ``<filename>``."""
    for ext in IMAGE_EXTENSIONS:
        candidate = root / "JPEGImages" / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    if filename and (root / "JPEGImages" / filename).is_file():
        return root / "JPEGImages" / filename
    return None


def read_annotations(root: Path, ids: list[str], problems: Problems) -> dict[str, Annotation]:
    """Parse the annotations of ``ids``; unreadable ones are reported and left out."""
    annotations = {}
    for image_id in ids:
        try:
            annotations[image_id] = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        except DataError as exc:
            problems.add(*str(exc).split(": ", 1))
    return annotations


def discover_classes(annotations: list[Annotation]) -> tuple[str, ...]:
    """All object names in ``annotations``, sorted: a stable order independent of file order."""
    return tuple(sorted({obj.name for ann in annotations for obj in ann.objects}))


def voc_entries(root: Path, ids: list[str], annotations: dict[str, Annotation], problems: Problems) -> list[Entry]:
    """The entries of ``ids`` that have a readable annotation and an image file; a missing image is reported."""
    entries = []
    for image_id in (i for i in ids if i in annotations):
        xml = f"Annotations/{image_id}.xml"
        image_path = find_image(root, image_id, annotations[image_id].filename)
        if image_path is None:
            problems.add(root / xml, f"no image file for {image_id!r} in {root / 'JPEGImages'}")
        else:
            entries.append(Entry(image_id, annotations[image_id], image_path, root / xml, (xml,)))
    return entries


def auto_split(root: Path, splits: tuple[str, str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """``data.split: auto``: every ``Annotations/<id>.xml``, each put in the test split by :func:`in_test_split`."""
    ids = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    if not ids:
        raise DataError(f"{root / 'Annotations'}: no .xml annotation files to split (data.split: auto)")
    test = {i for i in ids if in_test_split(i, test_fraction, seed)}
    assigned = {splits[0]: [i for i in ids if i not in test], splits[1]: [i for i in ids if i in test]}
    for split, split_ids in assigned.items():
        if not split_ids:
            raise DataError(
                f"{root}: data.split: auto put none of the {len(ids)} images in the {split} split "
                f"(test_fraction {test_fraction}); change data.test_fraction or data.split_seed"
            )
    return assigned


def in_test_split(image_id: str, test_fraction: float, seed: int) -> bool:
    """Whether ``image_id`` is a test image: sha256 of the seed and id, read as a number in [0, 1).

    It depends on the image's own id only, so adding or removing images never moves another one
    between the splits, and sha256 is the same on every machine and Python (unlike ``hash()``).
    The test split's size is therefore about, not exactly, ``test_fraction`` of the images.
    """
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def build_record(root: Path, entry: Entry, classes: tuple[str, ...], problems: Problems) -> ImageRecord | None:
    """Validate one image and its objects; ``None`` if the image itself is unusable."""
    image_path, ann, where = entry.image_path, entry.annotation, entry.where
    try:
        height, width = load_image(image_path).shape[:2]
    except ImageError as exc:
        problems.add(image_path, str(exc).removeprefix(f"{image_path}: "))  # the path itself may contain ": "
        return None
    if (ann.width, ann.height) not in ((0, 0), (width, height)):
        problems.add(where, f"size {ann.width}x{ann.height} disagrees with the image's {width}x{height}")
        return None
    boxes, labels, difficult = [], [], []
    for obj in ann.objects:
        box = _validate_box(obj, width, height, problems, where)
        if obj.name not in classes:
            named = f"{obj.ref}: " if obj.ref else ""
            problems.add(where, f"{named}unknown class {obj.name!r} (classes: {list(classes)})")
        elif box is not None:
            boxes.append(box)
            labels.append(classes.index(obj.name))
            difficult.append(obj.difficult)
    return ImageRecord(
        image_id=entry.image_id,
        path=image_path.relative_to(root).as_posix(),
        width=width,
        height=height,
        boxes=as_boxes(boxes),
        labels=np.array(labels, dtype=np.int32),
        difficult=np.array(difficult, dtype=bool),
    )


def _validate_box(obj: VocObject, width: int, height: int, problems: Problems, where: Path | str) -> np.ndarray | None:
    box = np.array(obj.box, dtype=np.float32)
    x1, y1, x2, y2 = box
    described = obj.ref or f"box (xmin={x1 + 1:g}, ymin={y1 + 1:g}, xmax={x2:g}, ymax={y2:g})"
    if not np.isfinite(box).all():  # NaN fails every comparison below and would slip through
        problems.add(where, f"non-finite {described}")
        return None
    # xmax == xmin is one pixel wide in the devkit's convention, but in practice it is
    # an annotation slip (a click without a drag): treated as zero area, like inverted boxes.
    if x2 - x1 <= 1 or y2 - y1 <= 1:
        problems.add(where, f"zero-area or inverted {described}")
        return None
    low, high = -EDGE_TOLERANCE, np.array([width, height]) + EDGE_TOLERANCE
    if (box[:2] < low).any() or (box[2:] > high).any():
        problems.add(where, f"{described} lies outside the {width}x{height} image")
        return None
    clipped = np.clip(box, 0, [width, height, width, height]).astype(np.float32)
    if (clipped != box).any():
        problems.count_clipped()
    return clipped
