"""Validation of COCO-format detection annotations: cheap JSON checks and image-file checks.

Every problem raises :class:`DatasetError` with a one-line message that names the culprit (file, image id,
annotation id or category id), so the CLI can print it as is.

Box convention: COCO ``bbox`` = ``[x, y, w, h]`` in pixels, ``(x, y)`` the top-left corner, the image spanning
``[0, width] x [0, height]``. A box that leaves the image by at most ``clip_tolerance`` pixels (rounding in
exporters) is clipped to the image; by more, it is an error.
"""

from __future__ import annotations

import copy
import json
import math
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cls2det.errors import Cls2detError


class DatasetError(Cls2detError, ValueError):
    """A dataset that cannot be used as is; the message is one line naming the file / image id / annotation id."""


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


def _show(value: Any) -> str:
    """A short one-line repr of a JSON value, for messages (strings, lists and deep nesting are cut)."""
    return reprlib.repr(value)


def _records(coco: dict, key: str, required: tuple[str, ...], source: Path) -> list[dict]:
    """The list ``coco[key]``, each record a dict holding ``required`` keys and an int id."""
    if key not in coco:
        raise DatasetError(f"{source}: missing key '{key}'")
    records = coco[key]
    if not isinstance(records, list):
        raise DatasetError(f"{source}: '{key}' must be a list, got {type(records).__name__}")
    kind = {"images": "image", "annotations": "annotation", "categories": "category"}[key]
    seen: set[int] = set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(f"{source}: {key}[{index}] must be an object, got {type(record).__name__}")
        name = f"{kind} id {record['id']}" if _is_id(record.get("id")) else f"{key}[{index}]"
        for field in required:
            if field not in record:
                raise DatasetError(f"{source}: {name} is missing key '{field}'")
        if not _is_id(record["id"]):
            raise DatasetError(f"{source}: {key}[{index}] id must be an integer (int64), got {_show(record['id'])}")
        if record["id"] in seen:
            raise DatasetError(f"{source}: duplicate {kind} id {record['id']}")
        seen.add(record["id"])
    return records


def validate_coco(
    coco: Any, *, source: str | Path, clip_tolerance: float = 1.0, inplace: bool = False
) -> tuple[dict, int]:
    """Check a parsed COCO detection dict and return ``(fixed copy, number of boxes clipped)``.

    The copy has every box clipped to its image (within ``clip_tolerance`` pixels), ``iscrowd`` defaulted to 0
    and ``area`` defaulted to ``w * h`` of the clipped box (pycocotools' evaluation needs both). The input is
    modified only with ``inplace`` (which saves a deep copy of COCO-size dicts). Image files are not touched
    here (see :func:`check_image_file`).
    """
    source = Path(source)
    if not isinstance(coco, dict):
        raise DatasetError(f"{source}: top level must be a JSON object, got {type(coco).__name__}")
    if not clip_tolerance >= 0:  # NaN too
        raise ValueError(f"clip_tolerance must be >= 0, got {clip_tolerance}")
    if not inplace:
        coco = copy.deepcopy(coco)
    images = _records(coco, "images", IMAGE_KEYS, source)
    annotations = _records(coco, "annotations", ANNOTATION_KEYS, source)
    categories = _records(coco, "categories", CATEGORY_KEYS, source)
    if not categories:
        raise DatasetError(f"{source}: 'categories' is empty")

    sizes: dict[int, tuple[float, float]] = {}
    for image in images:
        width, height = image["width"], image["height"]
        if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
            raise DatasetError(
                f"{source}: image id {image['id']} has invalid width/height {_show(width)}/{_show(height)}"
            )
        # one non-empty line: the name goes into messages (and a line break in a file name is a bug upstream)
        if not isinstance(image["file_name"], str) or image["file_name"].splitlines() != [image["file_name"]]:
            raise DatasetError(f"{source}: image id {image['id']} has invalid file_name {_show(image['file_name'])}")
        sizes[image["id"]] = (float(width), float(height))
    for category in categories:
        if not isinstance(category["name"], str):
            raise DatasetError(f"{source}: category id {category['id']} name must be a string")
    category_ids = {c["id"] for c in categories}

    clipped = 0
    for ann in annotations:
        name = f"annotation id {ann['id']}"
        for field in ("image_id", "category_id"):
            if not _is_id(ann[field]):  # (also keeps unhashable values out of the lookups below)
                raise DatasetError(f"{source}: {name} {field} must be an integer (int64), got {_show(ann[field])}")
        if ann["image_id"] not in sizes:
            raise DatasetError(f"{source}: {name} points to unknown image id {ann['image_id']}")
        if ann["category_id"] not in category_ids:
            raise DatasetError(f"{source}: {name} points to unknown category id {ann['category_id']}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{source}: {name} bbox must be 4 finite numbers [x, y, w, h], got {_show(bbox)}")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise DatasetError(f"{source}: {name} has non-positive box width/height {w:g}/{h:g}")
        width, height = sizes[ann["image_id"]]
        if (
            x < -clip_tolerance
            or y < -clip_tolerance
            or x + w > width + clip_tolerance
            or y + h > height + clip_tolerance
        ):
            raise DatasetError(
                f"{source}: {name} box [{x:g}, {y:g}, {w:g}, {h:g}] (xywh) leaves image id {ann['image_id']} "
                f"({width:g}x{height:g}) by more than clip_tolerance={clip_tolerance:g} px"
            )
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, width), min(y + h, height)
        # in float32, as the training targets hold it: a box thinner than its resolution would be degenerate there
        if np.float32(x2) <= np.float32(x1) or np.float32(y2) <= np.float32(y1):
            raise DatasetError(
                f"{source}: {name} box is empty after clipping to image id {ann['image_id']} (in float32: "
                f"[{x:g}, {y:g}, {w:g}, {h:g}] xywh)"
            )
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            clipped += 1
            ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        iscrowd = ann.setdefault("iscrowd", 0)
        if iscrowd not in (0, 1):
            raise DatasetError(f"{source}: {name} iscrowd must be 0 or 1, got {_show(iscrowd)}")
        if "area" not in ann:
            ann["area"] = (x2 - x1) * (y2 - y1)
        elif not _is_number(ann["area"]) or ann["area"] < 0:
            raise DatasetError(f"{source}: {name} has invalid area {_show(ann['area'])}")
    coco.setdefault("info", {})
    coco.setdefault("licenses", [])
    return coco, clipped


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
