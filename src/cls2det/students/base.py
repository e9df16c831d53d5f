"""What every student adapter returns: the detector's own losses plus the batch's positives.

An adapter wraps one torchvision detector family. It is the only code that knows the detector's
internals. In train mode it runs the detector's own loss computation (unchanged) and also returns,
for the positives the detector's own matcher / sampler chose, the record the distillation losses need.
In eval mode it returns torchvision's detections, with labels mapped back to 0-based classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Positives:
    """The K positive anchors / proposals of a batch, each with its assigned ground truth.

    All boxes are xyxy in pixels of ``StudentOutput.images`` (the transformed, batched input).
    """

    image_index: Tensor  # [K] int64, which image of the batch
    gt_boxes: Tensor  # [K, 4] the assigned GT box (no gradient)
    labels: Tensor  # [K] int64 in [0, C), the assigned GT class
    logits: Tensor  # [K, C+1] (head="softmax", column 0 = background) or [K, C] (head="sigmoid")
    pred_boxes: Tensor  # [K, 4] the student's decoded prediction, differentiable w.r.t. its regression output
    head: str  # "softmax" or "sigmoid"
    gt_index: Tensor | None = None  # [K] int64, index of the assigned GT box within its image's targets

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: Tensor) -> "Positives":
        """The positives at ``index`` ([k] int64 or bool mask)."""
        return Positives(
            self.image_index[index], self.gt_boxes[index], self.labels[index], self.logits[index],
            self.pred_boxes[index], self.head, None if self.gt_index is None else self.gt_index[index],
        )


@dataclass
class StudentOutput:
    """Train-mode output of an adapter."""

    losses: dict[str, Tensor]  # the detector's own loss dict (torchvision's keys), each a 0-dim tensor
    positives: Positives
    images: Tensor  # [N, 3, H, W] the normalised, resized, padded batch the detector saw
    image_mean: Tensor  # [3] the detector transform's mean: pixels01 = images * image_std + image_mean
    image_std: Tensor  # [3]


class StudentAdapter(nn.Module):
    """Base class: holds ``self.detector`` (a stock torchvision detector) and its class count.

    Subclasses implement ``forward_train(images, targets) -> StudentOutput``. Targets follow torchvision's
    contract except that ``labels`` are 0-based in [0, C); the adapter shifts them if the family needs it.
    """

    head: str = "softmax"

    def __init__(self, detector: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.detector = detector
        self.num_classes = num_classes

    @property
    def label_offset(self) -> int:
        """What the detector's labels add to our 0-based classes (1 where index 0 is background)."""
        return 1 if self.head == "softmax" else 0

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are required in train mode")
            return self.forward_train(images, targets)
        detections = self.detector(images)
        for det in detections:
            det["labels"] = det["labels"] - self.label_offset
        return detections

    def forward_train(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> StudentOutput:
        raise NotImplementedError

    def to_detector_targets(self, targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Shallow-copy targets with labels shifted into the detector's convention."""
        return [{**t, "labels": t["labels"] + self.label_offset} for t in targets]


def empty_positives(device: torch.device, dtype: torch.dtype, num_logits: int, head: str) -> Positives:
    return Positives(
        torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, 4, dtype=dtype, device=device),
        torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, num_logits, dtype=dtype, device=device),
        torch.zeros(0, 4, dtype=dtype, device=device), head, torch.zeros(0, dtype=torch.int64, device=device),
    )
