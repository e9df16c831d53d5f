"""D_cls: the classification dataset of GT-object crops that the teacher is trained on (paper, Sec. 3.1).

Each non-crowd GT box of a split is clamped to the image, rounded outward to whole pixels, cropped and resized to
``size x size`` (bilinear, antialiased, ``align_corners=False``). The box itself, no context around it: the teacher
sees box crops during distillation too (paper, Sec. 3.1; the release crops the box).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cls2det.data.coco import DetectionSplit, read_image


def crop_window(bbox: list[float], width: float, height: float) -> tuple[int, int, int, int]:
    """Integer pixel window ``(left, top, right, bottom)`` (right/bottom exclusive) covering a COCO xywh box.

    The box is clamped to the image and rounded outward; the window is at least 1 px wide and high.
    """
    x, y, w, h = bbox
    x1, x2 = max(x, 0.0), min(x + w, width)
    y1, y2 = max(y, 0.0), min(y + h, height)
    left, top = math.floor(x1), math.floor(y1)
    right, bottom = max(math.ceil(x2), left + 1), max(math.ceil(y2), top + 1)
    return left, top, min(right, int(width)), min(bottom, int(height))


def resize_crop(pixels: Tensor, window: tuple[int, int, int, int], size: int) -> Tensor:
    """Crop ``pixels [3, H, W]`` to ``window`` and resize to ``[3, size, size]`` (bilinear, antialias)."""
    left, top, right, bottom = window
    crop = pixels[None, :, top:bottom, left:right]  # [1, 3, h, w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


class ClassificationCrops(torch.utils.data.Dataset):
    """The GT-object crops of a detection split: ``(crop float32 [3, size, size] in 0..1, label in [0, C))``.

    ``in_memory=True`` decodes every image once and keeps all crops as one uint8 tensor ``[M, 3, size, size]``
    (fast for small datasets; M * 3 * size^2 bytes); ``in_memory=False`` decodes the image on every access
    (COCO scale). Both give the same crops up to uint8 rounding.
    """

    def __init__(self, split: DetectionSplit, *, size: int = 112, in_memory: bool = True):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.split = split
        self.size = size
        self.class_names = split.class_names
        # one record per non-crowd GT box: (index into split.images, crop window)
        self.records: list[tuple[int, tuple[int, int, int, int]]] = []
        self.ann_ids: list[int] = []
        labels = []
        for index, image in enumerate(split.images):
            for ann in split.annotations[image["id"]]:
                if ann["iscrowd"]:
                    continue
                self.records.append((index, crop_window(ann["bbox"], image["width"], image["height"])))
                self.ann_ids.append(ann["id"])
                labels.append(split.cat_id_to_label[ann["category_id"]])
        self.labels = torch.tensor(labels, dtype=torch.int64)  # [M]
        self.crops: Tensor | None = self._all_crops() if in_memory else None  # [M, 3, size, size] uint8

    def _all_crops(self) -> Tensor:
        crops = torch.empty(len(self.records), 3, self.size, self.size, dtype=torch.uint8)
        current, pixels = -1, None
        for k, (index, window) in enumerate(self.records):  # records are grouped by image: decode each once
            if index != current:
                current, pixels = index, self._read(index)
            crops[k] = resize_crop(pixels, window, self.size).mul(255).round_().clamp_(0, 255).to(torch.uint8)
        return crops

    def _read(self, index: int) -> Tensor:
        image = self.split.images[index]
        return read_image(self.split.image_path(image), image, source=self.split.annotation_file)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self.crops is not None:
            crop = self.crops[i].float().div_(255)
        else:
            index, window = self.records[i]
            crop = resize_crop(self._read(index), window, self.size).clamp_(0, 1)
        return crop, int(self.labels[i])
