"""Validation of COCO-format detection annotations: cheap JSON checks and image-file checks.

Every problem is a one-line message that names the culprit (file, image id, annotation id or category id); a
:class:`DatasetError` carries all those found (``problems``), so the CLI can print them as they are.

Box convention: COCO ``bbox`` = ``[x, y, w, h]`` in pixels, ``(x, y)`` the top-left corner, the image spanning
``[0, width] x [0, height]``. A box that leaves the image by at most ``clip_tolerance`` pixels (rounding in
exporters) is clipped to the image; by more, it is an error.
"""

from __future__ import annotations

import copy
import json
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cls2det.errors import Cls2detError


class DatasetError(Cls2detError, ValueError):
    """A dataset that cannot be used as is. Each problem is one line naming the file / image id / annotation id.

    ``problems`` holds every problem found (at least one); ``str(err)`` is the first, one line, with the count of
    the others (``(and 2 more problems)``): what a fail-fast caller prints, while ``cls2det data check`` lists all.
    """

    def __init__(self, *problems: str) -> None:
        if not problems:
            raise TypeError("DatasetError needs at least one problem")
        self.problems = list(problems)
        more = len(problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(problems[0] + suffix)


IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply") from None


def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool; an int beyond float range (JSON allows any number of digits) is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_id(value: Any) -> bool:
    """An int that fits in int64 (the targets' tensors and pycocotools hold ids as such), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def is_usable_image_record(image: Any) -> bool:
    """Whether an image record is whole enough to check its file on its own: an object with an int64 id, finite
    positive width and height and a one-line ``file_name`` (the record checks of :func:`validate_coco`; a record that
    fails them is reported there, and not again through its file)."""
    if not isinstance(image, dict) or not _is_id(image.get("id")):
        return False
    width, height, name = image.get("width", 0), image.get("height", 0), image.get("file_name")
    sized = _is_number(width) and _is_number(height) and width > 0 and height > 0
    return sized and isinstance(name, str) and name.splitlines() == [name]


def _show(value: Any) -> str:
    """A short one-line repr of a JSON value, for messages (strings, lists and deep nesting are cut)."""
    return reprlib.repr(value)


@dataclass
class _Records:
    """The records of ``coco[key]`` that passed :func:`_records`, and what a reference to a failed one needs."""

    good: list[dict]  # dicts with every required key and a unique int64 id
    bad_ids: set[int]  # ids of records that failed (references to them are not reported again)
    complete: bool  # False when some record has no usable id (or the list itself is broken): unknown ids are unsure


def _records(coco: dict, key: str, required: tuple[str, ...], source: Path, problems: list[str]) -> _Records:
    """The list ``coco[key]``, each record a dict holding ``required`` keys and an int id; problems are appended."""
    if key not in coco:
        problems.append(f"{source}: missing key '{key}'")
        return _Records([], set(), False)
    records = coco[key]
    if not isinstance(records, list):
        problems.append(f"{source}: '{key}' must be a list, got {type(records).__name__}")
        return _Records([], set(), False)
    kind = {"images": "image", "annotations": "annotation", "categories": "category"}[key]
    result = _Records([], set(), True)
    seen: set[int] = set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            problems.append(f"{source}: {key}[{index}] must be an object, got {type(record).__name__}")
            result.complete = False
            continue
        has_id = _is_id(record.get("id"))
        name = f"{kind} id {record['id']}" if has_id else f"{key}[{index}]"
        missing = [field for field in required if field not in record]
        if missing:
            problems.append(f"{source}: {name} is missing key '{missing[0]}'")
        elif not has_id:
            problems.append(f"{source}: {key}[{index}] id must be an integer (int64), got {_show(record['id'])}")
        elif record["id"] in seen:
            problems.append(f"{source}: duplicate {kind} id {record['id']}")
            continue  # the first record of that id stands
        if has_id:
            seen.add(record["id"])
        if missing or not has_id:
            result.complete = result.complete and has_id
            if has_id:
                result.bad_ids.add(record["id"])
            continue
        result.good.append(record)
    return result


def validate_coco(
    coco: Any, *, source: str | Path, clip_tolerance: float = 1.0, inplace: bool = False
) -> tuple[dict, int]:
    """Check a parsed COCO detection dict and return ``(fixed copy, number of boxes clipped)``.

    The copy has every box clipped to its image (within ``clip_tolerance`` pixels), ``iscrowd`` defaulted to 0
    and ``area`` defaulted to ``w * h`` of the clipped box (pycocotools' evaluation needs both). The input is
    modified only with ``inplace`` (which saves a deep copy of COCO-size dicts). Image files are not touched
    here (see :func:`check_image_file`).

    Raises one :class:`DatasetError` holding every problem found (one per record at most; a reference to a record
    that is itself broken is not reported again).
    """
    source = Path(source)
    if not isinstance(coco, dict):
        raise DatasetError(f"{source}: top level must be a JSON object, got {type(coco).__name__}")
    if not clip_tolerance >= 0:  # NaN too
        raise ValueError(f"clip_tolerance must be >= 0, got {clip_tolerance}")
    if not inplace:
        coco = copy.deepcopy(coco)
    problems: list[str] = []
    images = _records(coco, "images", IMAGE_KEYS, source, problems)
    annotations = _records(coco, "annotations", ANNOTATION_KEYS, source, problems)
    categories = _records(coco, "categories", CATEGORY_KEYS, source, problems)
    if isinstance(coco.get("categories"), list) and not coco["categories"]:
        problems.append(f"{source}: 'categories' is empty")
        categories.complete = False  # every category id is unknown: not worth one line per annotation

    sizes: dict[int, tuple[float, float]] = {}
    for image in images.good:
        width, height = image["width"], image["height"]
        if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
            problems.append(f"{source}: image id {image['id']} has invalid width/height {_show(width)}/{_show(height)}")
            images.bad_ids.add(image["id"])
            continue
        # one non-empty line: the name goes into messages (and a line break in a file name is a bug upstream)
        if not isinstance(image["file_name"], str) or image["file_name"].splitlines() != [image["file_name"]]:
            problems.append(f"{source}: image id {image['id']} has invalid file_name {_show(image['file_name'])}")
        sizes[image["id"]] = (float(width), float(height))
    category_ids: set[int] = set()
    names: dict[str, int] = {}
    for category in categories.good:
        name = category["name"]
        if not isinstance(name, str):
            problems.append(f"{source}: category id {category['id']} name must be a string")
        elif name in names:
            problems.append(
                f"{source}: category ids {names[name]} and {category['id']} share the name {_show(name)} "
                "(their classes would merge in per-class reports)"
            )
        else:
            names[name] = category["id"]
        category_ids.add(category["id"])

    clipped = 0
    for ann in annotations.good:
        problem, was_clipped = _check_annotation(ann, sizes, category_ids, images, categories, clip_tolerance)
        if problem:
            problems.append(f"{source}: annotation id {ann['id']} {problem}")
        clipped += was_clipped
    if problems:
        raise DatasetError(*problems)
    coco.setdefault("info", {})
    coco.setdefault("licenses", [])
    return coco, clipped


def _check_annotation(
    ann: dict,
    sizes: dict[int, tuple[float, float]],
    category_ids: set[int],
    images: _Records,
    categories: _Records,
    clip_tolerance: float,
) -> tuple[str | None, bool]:
    """``(problem after "annotation id N ", or None; whether the box was clipped)``; fixes ``ann`` in place."""
    for field in ("image_id", "category_id"):
        if not _is_id(ann[field]):  # (also keeps unhashable values out of the lookups below)
            return f"{field} must be an integer (int64), got {_show(ann[field])}", False
    if ann["image_id"] not in sizes:
        if ann["image_id"] in images.bad_ids or not images.complete:
            return None, False  # the image's own problem is reported (or it may be the record without an id)
        return f"points to unknown image id {ann['image_id']}", False
    if ann["category_id"] not in category_ids:
        if ann["category_id"] in categories.bad_ids or not categories.complete:
            return None, False
        return f"points to unknown category id {ann['category_id']}", False
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {_show(bbox)}", False
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return f"has non-positive box width/height {w:g}/{h:g}", False
    width, height = sizes[ann["image_id"]]
    if x < -clip_tolerance or y < -clip_tolerance or x + w > width + clip_tolerance or y + h > height + clip_tolerance:
        return (
            f"box [{x:g}, {y:g}, {w:g}, {h:g}] (xywh) leaves image id {ann['image_id']} "
            f"({width:g}x{height:g}) by more than clip_tolerance={clip_tolerance:g} px"
        ), False
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, width), min(y + h, height)
    # in float32, as the training targets hold it: a box thinner than its resolution would be degenerate there
    if np.float32(x2) <= np.float32(x1) or np.float32(y2) <= np.float32(y1):
        return (
            f"box is empty after clipping to image id {ann['image_id']} (in float32: [{x:g}, {y:g}, {w:g}, {h:g}] xywh)"
        ), False
    iscrowd = ann.setdefault("iscrowd", 0)
    if iscrowd not in (0, 1):
        return f"iscrowd must be 0 or 1, got {_show(iscrowd)}", False
    if "area" in ann and (not _is_number(ann["area"]) or ann["area"] < 0):
        return f"has invalid area {_show(ann['area'])}", False
    was_clipped = (x1, y1, x2, y2) != (x, y, x + w, y + h)
    if was_clipped:
        ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
    if "area" not in ann:
        ann["area"] = (x2 - x1) * (y2 - y1)
    return None, was_clipped


def check_image_file(path: Path, image: dict, *, source: Path, load: bool = True) -> None:
    """Check that image record ``image`` exists at ``path`` and, if ``load``, that it decodes fully to its size.

    ``load`` really decodes every pixel (``Image.load()``), which is what catches truncated files.
    """
    name = f"image id {image['id']} ({image['file_name']})"
    if not path.is_file():
        raise DatasetError(f"{source}: {name}: image file not found: {path}")
    if not load:
        return
    try:
        with Image.open(path) as im:
            size = im.size
            im.load()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise DatasetError(f"{source}: {name}: unreadable image file {path}: {err}") from None
    if size != (image["width"], image["height"]):
        raise DatasetError(
            f"{source}: {name}: JSON size {image['width']}x{image['height']} differs from the real image size "
            f"{size[0]}x{size[1]} of {path}"
        )
