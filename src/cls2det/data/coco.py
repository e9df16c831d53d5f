"""COCO-format detection datasets: locate, load and validate a split; the torchvision-style detection dataset.

Two layouts are accepted for ``root``:

* a dataset directory ``DIR`` holding ``DIR/annotations/{split}.json``, each image's ``file_name`` relative to
  ``DIR/images/`` (what ``cls2det data demo`` and the importers write);
* a data YAML file, for any other layout (COCO 2017 itself)::

      train: {images: train2017, annotations: annotations/instances_train2017.json}
      val:   {images: val2017,   annotations: annotations/instances_val2017.json}

  relative paths are resolved against the YAML file's folder.

Category ids may be any integers; they map to contiguous labels ``0..C-1`` in increasing id order
(``cat_id_to_label``) and back (``label_to_cat_id``). Crowd boxes (``iscrowd=1``) stay in ``annotations`` and in
``coco`` (the evaluation needs them) but never reach the training targets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor

from cls2det.data.validate import DatasetError, check_image_file, is_usable_image_record, read_json, validate_coco

SPLITS = ("train", "val")
YAML_SUFFIXES = (".yaml", ".yml")
# COCO's object-size ranges (area in pixels^2): small < 32^2 <= medium < 96^2 <= large
SMALL_AREA, LARGE_AREA = 32**2, 96**2


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(images_dir, annotation_file)`` of ``split`` for a dataset directory or data YAML ``root``."""
    root = Path(root)
    if root.suffix in YAML_SUFFIXES:
        if not root.is_file():
            raise DatasetError(f"{root}: data YAML not found")
        try:
            spec = yaml.safe_load(root.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise DatasetError(f"{root}{where}: malformed YAML: {problem}") from None
        if not isinstance(spec, dict):
            raise DatasetError(f"{root}: data YAML must be a mapping of splits")
        if split not in spec:
            raise DatasetError(f"{root}: split '{split}' missing (keys: {', '.join(map(str, spec))})")
        entry = spec[split]
        if not isinstance(entry, dict) or "images" not in entry or "annotations" not in entry:
            raise DatasetError(f"{root}: split '{split}' must have keys 'images' and 'annotations'")
        return root.parent / str(entry["images"]), root.parent / str(entry["annotations"])
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found (expected a directory or a data YAML)")
    annotation_file = root / "annotations" / f"{split}.json"
    if not annotation_file.is_file():
        raise DatasetError(f"{root}: split '{split}' missing: no {annotation_file}")
    return root / "images", annotation_file


@dataclass(frozen=True)
class Strings:
    """An immutable list of strings held as one UTF-8 byte array plus offsets: no Python object per string, so
    forked DataLoader workers share it copy-on-write (a ``list[str]`` is touched by refcounting and gets copied)."""

    data: np.ndarray  # uint8 [total bytes]
    offsets: np.ndarray  # int64 [n + 1]

    @classmethod
    def of(cls, values: Sequence[str]) -> Strings:
        encoded = [v.encode("utf-8", "surrogatepass") for v in values]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8", "surrogatepass")


def _numbers(values: list) -> np.ndarray:
    """JSON numbers as int64 when they all are (fitting) ints, else float64, so that ``.item()`` gives them back."""
    if all(type(v) is int for v in values):
        try:
            return np.asarray(values, dtype=np.int64)
        except OverflowError:
            pass
    return np.asarray(values, dtype=np.float64)


@dataclass
class DetectionSplit:
    """One validated split of a COCO-format dataset, held as numpy arrays; labels are contiguous ``0..C-1``.

    Images are sorted by id; image ``i``'s annotations (crowd included, sorted by id) are rows
    ``ann_start[i]:ann_start[i + 1]`` of the annotation arrays (:meth:`ann_rows`). Polygons and RLE masks are dropped
    at load time unless ``keep_segmentation``: COCO 2017's train split takes ~0.1 GB this way instead of 2.4 GB as
    a Python dict, and forked workers share the arrays copy-on-write. ``images``, ``annotations`` and ``coco`` are
    views that build COCO-style dicts on access (``coco`` is built on every access: evaluation only).
    """

    name: str
    images_dir: Path
    annotation_file: Path
    image_ids: np.ndarray  # int64 [N], increasing
    widths: np.ndarray  # [N] int64 (float64 if the JSON has non-integer sizes)
    heights: np.ndarray  # [N]
    file_names: Strings  # [N]
    ann_start: np.ndarray  # int64 [N + 1]: image i owns annotation rows ann_start[i]:ann_start[i + 1]
    ann_ids: np.ndarray  # int64 [M]
    bboxes: np.ndarray  # float64 [M, 4] xywh pixels, clipped to the image (float64: the JSON's values exactly)
    category_ids: np.ndarray  # int64 [M]
    labels: np.ndarray  # int64 [M] in [0, C)
    areas: np.ndarray  # float64 [M] (COCO's area: the mask's, or w*h of the clipped box when the JSON has none)
    is_crowd: np.ndarray  # bool [M]
    json_order: np.ndarray  # int64 [M]: position of each row in the JSON's annotation list (evaluation keeps it)
    categories: list[dict]  # sorted by id
    class_names: list[str]
    cat_id_to_label: dict[int, int]
    label_to_cat_id: list[int]
    num_classes: int
    info: Any = None
    licenses: Any = None
    segmentations: list | None = None  # [M], only with keep_segmentation
    clipped: int = 0  # boxes clipped to their image within clip_tolerance

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def hflip_preserves_labels(self) -> bool:
        """Whether a left-right mirror of an image keeps its labels: the annotation file's
        ``info.hflip_preserves_labels`` (cls2det's key: false for glyphs, whose mirror is no glyph), true when absent
        (natural objects, as COCO)."""
        value = self.info.get("hflip_preserves_labels", True) if isinstance(self.info, dict) else True
        if not isinstance(value, bool):
            raise DatasetError(
                f"{self.annotation_file}: info.hflip_preserves_labels must be true or false, got {value!r}"
            )
        return value

    def image_record(self, i: int) -> dict:
        """COCO image record of image ``i`` (by position): ``{"id", "file_name", "width", "height"}``."""
        return {
            "id": int(self.image_ids[i]),
            "file_name": self.file_names[i],
            "width": self.widths[i].item(),
            "height": self.heights[i].item(),
        }

    def ann_rows(self, i: int) -> slice:
        """Rows of image ``i``'s annotations (crowd included) in the annotation arrays."""
        return slice(int(self.ann_start[i]), int(self.ann_start[i + 1]))

    def annotation_record(self, row: int) -> dict:
        """COCO annotation record of annotation row ``row``."""
        record = {
            "id": int(self.ann_ids[row]),
            "image_id": int(self.image_ids[np.searchsorted(self.ann_start, row, side="right") - 1]),
            "category_id": int(self.category_ids[row]),
            "bbox": self.bboxes[row].tolist(),
            "area": self.areas[row].item(),
            "iscrowd": int(self.is_crowd[row]),
        }
        if self.segmentations is not None and self.segmentations[row] is not None:
            record["segmentation"] = self.segmentations[row]
        return record

    @property
    def images(self) -> _ImageRecords:
        """The image records, sorted by id (a read-only sequence of dicts)."""
        return _ImageRecords(self)

    @property
    def annotations(self) -> _AnnotationRecords:
        """image id -> its annotation records (crowd included), sorted by id (a read-only mapping)."""
        return _AnnotationRecords(self)

    @property
    def coco(self) -> dict:
        """A COCO dict of the validated (possibly clipped) split, annotations in the JSON's order, for evaluation."""
        return {
            "info": self.info if self.info is not None else {},
            "licenses": self.licenses if self.licenses is not None else [],
            "images": list(self.images),
            "annotations": [self.annotation_record(int(row)) for row in np.argsort(self.json_order)],
            "categories": self.categories,
        }

    def image_path(self, image: dict | int) -> Path:
        """Path of an image record, or of image ``i`` by position."""
        name = self.file_names[image] if isinstance(image, (int, np.integer)) else image["file_name"]
        return self.images_dir / name


class _ImageRecords(Sequence):
    def __init__(self, split: DetectionSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.image_ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.split.image_record(k) for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.split.image_record(i % len(self))


class _AnnotationRecords(Mapping):
    def __init__(self, split: DetectionSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.image_ids)

    def __iter__(self):
        return iter(self.split.image_ids.tolist())

    def __getitem__(self, image_id: int) -> list[dict]:
        ids = self.split.image_ids
        i = int(np.searchsorted(ids, image_id))
        if i == len(ids) or ids[i] != image_id:
            raise KeyError(image_id)
        rows = self.split.ann_rows(i)
        return [self.split.annotation_record(row) for row in range(rows.start, rows.stop)]


def _drop_segmentation(record: dict) -> dict:
    record.pop("segmentation", None)
    return record


def _parse(annotation_file: Path, *, keep_segmentation: bool) -> Any:
    """Parse the JSON, dropping every ``segmentation`` value as it is decoded (the polygons never pile up).

    Any failure is re-raised by :func:`read_json` itself, so error messages are exactly the validator's.
    """
    if keep_segmentation:
        return read_json(annotation_file)
    try:
        return json.loads(annotation_file.read_bytes().decode("utf-8"), object_hook=_drop_segmentation)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return read_json(annotation_file)  # raises the validator's DatasetError (or parses: then use that)


def load_split(
    root: str | Path, split: str = "train", *, clip_tolerance: float = 1.0, keep_segmentation: bool = False
) -> DetectionSplit:
    """Load and validate ``split`` of the dataset at ``root`` (directory or data YAML).

    Runs every JSON check of :func:`validate_coco` (cheap); image files are only opened by :func:`check_dataset`.
    ``segmentation`` (polygons, RLE) is dropped while parsing unless ``keep_segmentation`` (then it is kept per
    annotation in ``segmentations`` and in ``coco``); the validator never reads it, so the checks are the same.
    """
    images_dir, annotation_file = split_paths(root, split)
    if not images_dir.is_dir():
        raise DatasetError(f"{annotation_file}: images directory not found: {images_dir}")
    raw = _parse(annotation_file, keep_segmentation=keep_segmentation)
    coco, clipped = validate_coco(raw, source=annotation_file, clip_tolerance=clip_tolerance, inplace=True)
    del raw
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    cat_id_to_label = {c["id"]: label for label, c in enumerate(categories)}
    images = sorted(coco.pop("images"), key=lambda im: im["id"])
    image_ids = np.asarray([im["id"] for im in images], dtype=np.int64)  # [N]
    widths, heights = _numbers([im["width"] for im in images]), _numbers([im["height"] for im in images])
    file_names = Strings.of([im["file_name"] for im in images])
    del images
    annotations = coco.pop("annotations")
    m = len(annotations)
    ann_ids = np.fromiter((a["id"] for a in annotations), np.int64, m)
    ann_image_ids = np.fromiter((a["image_id"] for a in annotations), np.int64, m)
    category_ids = np.fromiter((a["category_id"] for a in annotations), np.int64, m)
    bboxes = np.asarray([a["bbox"] for a in annotations], dtype=np.float64).reshape(m, 4)  # [M, 4] xywh
    areas = np.fromiter((a["area"] for a in annotations), np.float64, m)
    is_crowd = np.fromiter((bool(a["iscrowd"]) for a in annotations), bool, m)
    segmentations = [a.get("segmentation") for a in annotations] if keep_segmentation else None
    del annotations
    image_index = np.searchsorted(image_ids, ann_image_ids)  # [M] (every image id was validated)
    order = np.lexsort((ann_ids, image_index))  # by image, then by annotation id
    ann_start = np.zeros(len(image_ids) + 1, np.int64)
    np.cumsum(np.bincount(image_index, minlength=len(image_ids)), out=ann_start[1:])
    label_of = np.vectorize(cat_id_to_label.__getitem__, otypes=[np.int64])
    category_ids = category_ids[order]
    return DetectionSplit(
        name=split,
        images_dir=images_dir,
        annotation_file=annotation_file,
        image_ids=image_ids,
        widths=widths,
        heights=heights,
        file_names=file_names,
        ann_start=ann_start,
        ann_ids=ann_ids[order],
        bboxes=bboxes[order],
        category_ids=category_ids,
        labels=label_of(category_ids) if m else np.zeros(0, np.int64),
        areas=areas[order],
        is_crowd=is_crowd[order],
        json_order=order.astype(np.int64),
        categories=categories,
        class_names=[c["name"] for c in categories],
        cat_id_to_label=cat_id_to_label,
        label_to_cat_id=[c["id"] for c in categories],
        num_classes=len(categories),
        info=coco.get("info"),
        licenses=coco.get("licenses"),
        segmentations=[segmentations[k] for k in order] if segmentations is not None else None,
        clipped=clipped,
    )


def split_summary(split: DetectionSplit) -> dict:
    """Counts of one split: images, annotations, crowd, empty images, clipped boxes, per class and per size."""
    fg = ~split.is_crowd  # [M]
    row_image = np.repeat(np.arange(split.num_images), np.diff(split.ann_start))  # [M] image position of each row
    per_image_fg = np.bincount(row_image[fg], minlength=split.num_images)  # [N]
    per_class = np.bincount(split.labels[fg], minlength=split.num_classes)
    area = split.bboxes[fg, 2] * split.bboxes[fg, 3]
    return {
        "images": split.num_images,
        "annotations": len(split.ann_ids),
        "crowd": int(split.is_crowd.sum()),
        "empty_images": int((per_image_fg == 0).sum()),
        "clipped": split.clipped,
        "per_class": {name: int(n) for name, n in zip(split.class_names, per_class)},
        "sizes": {  # non-crowd boxes by COCO area range
            "small": int((area < SMALL_AREA).sum()),
            "medium": int(((area >= SMALL_AREA) & (area < LARGE_AREA)).sum()),
            "large": int((area >= LARGE_AREA).sum()),
        },
    }


def check_dataset(
    root: str | Path, *, splits: tuple[str, ...] = SPLITS, check_images: bool = True, clip_tolerance: float = 1.0
) -> dict:
    """Validate every split of a dataset and return a summary.

    Beyond :func:`load_split`'s JSON checks: every image file must exist and, with ``check_images``, decode fully
    and match its JSON width/height; all splits must share the same categories; a train split with images must have
    at least one (non-crowd) box. Raises one :class:`DatasetError` whose ``problems`` lists every problem found in
    every split (:func:`load_split` alone raises the same for one split's JSON, before any image is opened).

    Returns ``{"root", "class_names", "num_classes", "splits": {name: split_summary}}``.
    """
    problems: list[str] = []
    loaded: list[DetectionSplit] = []
    for name in splits:
        try:
            loaded.append(load_split(root, name, clip_tolerance=clip_tolerance))
        except DatasetError as err:
            problems.extend(err.problems)
            # the image files of a split whose JSON is broken are checked too: one pass lists every problem
            problems.extend(_image_file_problems(root, name, check_images=check_images))
    for split in loaded:
        for image in split.images:
            try:
                check_image_file(split.image_path(image), image, source=split.annotation_file, load=check_images)
            except DatasetError as err:
                problems.extend(err.problems)
        boxes = sum(not a["iscrowd"] for anns in split.annotations.values() for a in anns)
        if split.name == "train" and split.images and not boxes:
            problems.append(
                f"{split.annotation_file}: split 'train' has {len(split.images)} images but no (non-crowd) "
                "annotations: nothing to train on"
            )
    for split in loaded[1:]:
        if split.categories != loaded[0].categories:
            problems.append(
                f"{split.annotation_file}: categories differ from those of split '{loaded[0].name}' "
                f"({loaded[0].annotation_file})"
            )
    if problems:  # (a missing root or data YAML is the same problem for every split: once)
        raise DatasetError(*dict.fromkeys(problems))
    first = loaded[0] if loaded else None
    return {
        "root": str(root),
        "class_names": first.class_names if first else [],
        "num_classes": first.num_classes if first else 0,
        "splits": {split.name: split_summary(split) for split in loaded},
    }


def _image_file_problems(root: str | Path, split: str, *, check_images: bool) -> list[str]:
    """The image-file problems of ``split`` read from its raw JSON, for a split that failed :func:`load_split`:
    every image record whole enough to name a file (:func:`is_usable_image_record`) is checked as
    :func:`check_dataset` checks a valid split's; the JSON's own problems are reported by ``load_split``, so a JSON
    that cannot be read at all adds nothing here."""
    try:
        images_dir, annotation_file = split_paths(root, split)
        coco = read_json(annotation_file)
    except DatasetError:
        return []
    records = coco.get("images") if isinstance(coco, dict) else None
    if not images_dir.is_dir() or not isinstance(records, list):
        return []
    problems = []
    for image in records:
        if not is_usable_image_record(image):  # reported by load_split as broken: not again through its file
            continue
        try:
            check_image_file(images_dir / image["file_name"], image, source=annotation_file, load=check_images)
        except DatasetError as err:
            problems.extend(err.problems)
    return problems


def read_pixels(path: Path, image: dict, *, source: Path) -> np.ndarray:
    """Decode an RGB image to uint8 ``[H, W, 3]``; its size must match the JSON record."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
    except FileNotFoundError:
        raise DatasetError(f"{source}: image id {image['id']}: image file not found: {path}") from None
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise DatasetError(f"{source}: image id {image['id']}: unreadable image file {path}: {err}") from None
    if array.shape[:2] != (image["height"], image["width"]):
        raise DatasetError(
            f"{source}: image id {image['id']}: JSON size {image['width']}x{image['height']} differs from the real "
            f"image size {array.shape[1]}x{array.shape[0]} of {path}"
        )
    return array


def read_image(path: Path, image: dict, *, source: Path) -> Tensor:
    """Decode an RGB image to float32 ``[3, H, W]`` in 0..1; its size must match the JSON record."""
    array = read_pixels(path, image, source=source)  # [H, W, 3] uint8
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)  # [3, H, W]


def xywh_to_xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


class CocoDetection(torch.utils.data.Dataset):
    """A detection split in torchvision's contract: ``(image [3, H, W] float 0..1, target)``.

    ``target = {"boxes": float32 [N, 4] xyxy pixels, "labels": int64 [N] in [0, C), "image_id": int64 0-dim}``;
    crowd boxes are dropped (COCO evaluation reads them from the JSON). With ``train=True`` the image and its
    boxes are flipped left-right with probability ``hflip`` (drawn from torch's global RNG, which DataLoader
    seeds per worker).
    """

    def __init__(self, split: DetectionSplit, *, train: bool = False, hflip: float = 0.5) -> None:
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.split = split
        self.train = train
        self.hflip = hflip if train else 0.0

    def __len__(self) -> int:
        return self.split.num_images

    def target(self, i: int) -> dict[str, Tensor]:
        """The unflipped target of image ``i``."""
        split, rows = self.split, self.split.ann_rows(i)
        keep = ~split.is_crowd[rows]  # [n]
        xywh = split.bboxes[rows][keep]  # [n', 4] float64
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # [n', 4], x2 = x + w in float64
        return {
            "boxes": torch.from_numpy(xyxy.astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(split.labels[rows][keep].copy()),
            "image_id": torch.tensor(int(split.image_ids[i]), dtype=torch.int64),
        }

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = self.split.image_record(i)
        pixels = read_image(self.split.image_path(image), image, source=self.split.annotation_file)  # [3, H, W]
        target = self.target(i)
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            pixels, target["boxes"] = hflip(pixels, target["boxes"])
        return pixels, target


def hflip(pixels: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Flip an image ``[C, H, W]`` left-right and its xyxy boxes ``[N, 4]``: ``x' = W - x``, so x1/x2 swap."""
    width = pixels.shape[-1]
    flipped = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([width, 0.0, width, 0.0])
    return pixels.flip(-1), flipped


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Batch for torchvision detectors: images of different sizes stay a list."""
    images, targets = zip(*batch)
    return list(images), list(targets)
