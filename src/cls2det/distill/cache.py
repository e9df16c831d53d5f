"""Soft-label cache: the frozen teacher's logits on every GT crop, computed once instead of every step.

The teacher is frozen and GT boxes are fixed, so KD_cls's teacher logits depend only on (image, GT box, flip).
A horizontally flipped crop is exactly the flip of the unflipped crop (the sampling grid of eq. 8-9 is symmetric),
so both variants come from one crop. Valid while no augmentation changes the crop's pixels other than the flip
(photometric augmentation needs the online path); crops are taken from the original image, which equals the
online crop from the detector's resized batch up to the resampling of the resize.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from cls2det.distill.crops import crop_boxes


class SoftLabelCache:
    """Teacher logits per GT box: ``logits`` [M, 2, C] float16 (index 1 = flipped), rows grouped by image."""

    def __init__(self, logits: Tensor, image_ids: Tensor, offsets: Tensor) -> None:
        self.logits = logits  # [M, 2, C]
        self.row_of = {int(i): int(o) for i, o in zip(image_ids, offsets)}  # image id -> its first row
        self.image_ids, self.offsets = image_ids, offsets

    def lookup(self, image_ids: Tensor, gt_index: Tensor, flipped: Tensor) -> Tensor:
        """[K] image ids, [K] GT index within the image, [K] bool flipped -> teacher logits [K, C] float32."""
        rows = torch.tensor([self.row_of[int(i)] for i in image_ids.tolist()], dtype=torch.int64) + gt_index.cpu()
        return self.logits[rows, flipped.long().cpu()].float()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"logits": self.logits, "image_ids": self.image_ids, "offsets": self.offsets}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "SoftLabelCache":
        tensors = load_file(str(path))
        return cls(tensors["logits"], tensors["image_ids"], tensors["offsets"])


@torch.no_grad()
def build_soft_label_cache(teacher, dataset, *, device: str | torch.device = "cpu") -> SoftLabelCache:
    """Run ``teacher`` once over the GT crops of ``dataset`` (items ``(image [3,H,W] 0..1, target)``)."""
    logits, image_ids, offsets, row = [], [], [], 0
    for i in range(len(dataset)):
        image, target = dataset[i]
        boxes = target["boxes"].to(device)
        image_ids.append(int(target["image_id"]))
        offsets.append(row)
        row += len(boxes)
        if len(boxes) == 0:
            continue
        index = torch.zeros(len(boxes), dtype=torch.int64, device=device)
        crops = crop_boxes(image[None].to(device), boxes, index, size=teacher.input_size)  # [N_i, 3, S, S]
        both = teacher(torch.cat([crops, crops.flip(-1)]))  # [2 N_i, C]
        logits.append(torch.stack(both.chunk(2), 1).half().cpu())  # [N_i, 2, C]
    num_classes = len(teacher.class_names)
    table = torch.cat(logits) if logits else torch.zeros(0, 2, num_classes, dtype=torch.float16)
    return SoftLabelCache(table, torch.tensor(image_ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64))
