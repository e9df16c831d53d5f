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

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor

from cls2det.data.validate import DatasetError, check_image_file, read_json, validate_coco

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


@dataclass
class DetectionSplit:
    """One validated split of a COCO-format dataset; labels are contiguous ``0..C-1``."""

    name: str
    images_dir: Path
    annotation_file: Path
    images: list[dict]  # COCO image records, sorted by id
    annotations: dict[int, list[dict]]  # image id -> its annotation records (crowd included), sorted by id
    categories: list[dict]  # sorted by id
    class_names: list[str]
    cat_id_to_label: dict[int, int]
    label_to_cat_id: list[int]
    num_classes: int
    coco: dict  # the validated (possibly clipped) COCO dict, for evaluation
    clipped: int = 0  # boxes clipped to their image within clip_tolerance

    def image_path(self, image: dict) -> Path:
        return self.images_dir / image["file_name"]


def load_split(root: str | Path, split: str = "train", *, clip_tolerance: float = 1.0) -> DetectionSplit:
    """Load and validate ``split`` of the dataset at ``root`` (directory or data YAML).

    Runs every JSON check of :func:`validate_coco` (cheap); image files are only opened by :func:`check_dataset`.
    """
    images_dir, annotation_file = split_paths(root, split)
    if not images_dir.is_dir():
        raise DatasetError(f"{annotation_file}: images directory not found: {images_dir}")
    coco, clipped = validate_coco(
        read_json(annotation_file), source=annotation_file, clip_tolerance=clip_tolerance, inplace=True
    )
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    images = sorted(coco["images"], key=lambda im: im["id"])
    annotations: dict[int, list[dict]] = {im["id"]: [] for im in images}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        annotations[ann["image_id"]].append(ann)
    return DetectionSplit(
        name=split,
        images_dir=images_dir,
        annotation_file=annotation_file,
        images=images,
        annotations=annotations,
        categories=categories,
        class_names=[c["name"] for c in categories],
        cat_id_to_label={c["id"]: label for label, c in enumerate(categories)},
        label_to_cat_id=[c["id"] for c in categories],
        num_classes=len(categories),
        coco=coco,
        clipped=clipped,
    )


def split_summary(split: DetectionSplit) -> dict:
    """Counts of one split: images, annotations, crowd, empty images, clipped boxes, per class and per size."""
    per_class: Counter[str] = Counter({name: 0 for name in split.class_names})
    sizes = Counter({"small": 0, "medium": 0, "large": 0})
    crowd = empty = 0
    for image in split.images:
        anns = split.annotations[image["id"]]
        empty += not any(not a["iscrowd"] for a in anns)
        for ann in anns:
            if ann["iscrowd"]:
                crowd += 1
                continue
            per_class[split.class_names[split.cat_id_to_label[ann["category_id"]]]] += 1
            area = ann["bbox"][2] * ann["bbox"][3]
            sizes["small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"] += 1
    return {
        "images": len(split.images),
        "annotations": sum(len(a) for a in split.annotations.values()),
        "crowd": crowd,
        "empty_images": empty,
        "clipped": split.clipped,
        "per_class": dict(per_class),
        "sizes": dict(sizes),  # non-crowd boxes by COCO area range
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


def read_image(path: Path, image: dict, *, source: Path) -> Tensor:
    """Decode an RGB image to float32 ``[3, H, W]`` in 0..1; its size must match the JSON record."""
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
        return len(self.split.images)

    def target(self, i: int) -> dict[str, Tensor]:
        """The unflipped target of image ``i``."""
        image = self.split.images[i]
        anns = [a for a in self.split.annotations[image["id"]] if not a["iscrowd"]]
        boxes = torch.tensor([xywh_to_xyxy(a["bbox"]) for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.split.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels, "image_id": torch.tensor(image["id"], dtype=torch.int64)}

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = self.split.images[i]
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
