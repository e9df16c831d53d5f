"""What every student adapter returns: the detector's own losses plus the batch's positives.

An adapter wraps one torchvision detector family. It is the only code that knows the detector's
internals. In train mode it runs the detector's own loss computation (unchanged) and also returns,
for the positives the detector's own matcher / sampler chose, the record the distillation losses need.
In eval mode it returns torchvision's detections, with labels mapped back to 0-based classes.
A trained, frozen adapter can also teach a student of its own family (det2det, :meth:`StudentAdapter.teach`): its
feature maps and its class logits for the student's positives, computed on the student's own batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

# A stock torchvision detector (FasterRCNN, RetinaNet, SSD, FCOS). torchvision ships no type information, so mypy
# sees its classes as Any anyway; typed as nn.Module, every attribute read (``detector.transform`` ...) would go
# through ``nn.Module.__getattr__`` and come back as ``Tensor | Module``.
Detector: TypeAlias = Any


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
    # Where each positive sits in the detector, so that a det2det teacher of the same family can score it too:
    anchor_index: Tensor | None = None  # [K] int64, the anchor / location within its image's anchors (dense heads)
    proposals: Tensor | None = None  # [K, 4] the sampled proposal box (Faster R-CNN), batch pixels, no gradient

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: Tensor) -> Positives:
        """The positives at ``index`` ([k] int64 or bool mask)."""

        def pick(value):
            return value if value is None or isinstance(value, str) else value[index]

        return Positives(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})


@dataclass
class Negatives:
    """A random sample of the batch's negatives, as the detector's own matcher / sampler labels them (for KD_cls on
    negatives, an ablation beyond the paper; see ``DistillConfig.kd_cls_negatives``).

    Dense heads (SSD, RetinaNet, FCOS): anchors / locations matched to background (not the ignored ones between the
    matcher's thresholds); Faster R-CNN: the proposals the RoI sampler drew with the background label. A negative has
    no GT box: ``boxes`` is the anchor / proposal itself, xyxy in pixels of ``StudentOutput.images``.
    """

    image_index: Tensor  # [M] int64, which image of the batch
    boxes: Tensor  # [M, 4] the anchor (FCOS: the location's square) or proposal box, batch pixels, no gradient
    logits: Tensor  # [M, C+1] (head="softmax", column 0 = background) or [M, C] (head="sigmoid"), with gradient
    head: str  # "softmax" or "sigmoid"
    anchor_index: Tensor | None = None  # [M] int64, the anchor / location within its image's anchors (dense heads)

    def __len__(self) -> int:
        return int(self.image_index.numel())


@dataclass
class StudentOutput:
    """Train-mode output of an adapter."""

    losses: dict[str, Tensor]  # the detector's own loss dict (torchvision's keys), each a 0-dim tensor
    positives: Positives
    images: Tensor  # [N, 3, H, W] the normalised, resized, padded batch the detector saw
    image_mean: Tensor  # [3] the detector transform's mean: pixels01 = images * image_std + image_mean
    image_std: Tensor  # [3]
    # For det2det feature distillation (:mod:`cls2det.distill.det2det`):
    features: list[Tensor] = field(default_factory=list)  # the L maps the heads read, [N, D_l, H_l, W_l], with grad
    level_anchors: list[Tensor] = field(default_factory=list)  # per level [H_l, W_l, a_l, 4] anchors in batch pixels,
    # the same for every image of the batch; empty for anchor-free families (FCOS)
    gt_boxes: list[Tensor] = field(default_factory=list)  # per image [G_i, 4] its GT boxes in batch pixels
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # per image (h, w) after resizing, before padding
    negatives: Negatives | None = None  # at most ``StudentAdapter.max_negatives`` of them; None when that is 0


@dataclass
class DetTeacherOutput:
    """What a frozen detector teacher computes on a student's batch (:meth:`StudentAdapter.teach`)."""

    features: list[Tensor]  # its L feature maps [N, D_l, H_l, W_l]
    logits: Tensor | None  # [K, D] its class logits for the student's K positives (None when not asked)


class StudentAdapter(nn.Module):
    """Base class: holds ``self.detector`` (a stock torchvision detector) and its class count.

    Subclasses implement ``forward_train(images, targets) -> StudentOutput``. Targets follow torchvision's
    contract except that ``labels`` are 0-based in [0, C); the adapter shifts them if the family needs it.
    ``max_negatives`` > 0 makes ``forward_train`` also return up to that many of the batch's negatives
    (:class:`Negatives`), drawn uniformly from the global RNG (which the training loop seeds every step); 0, the
    default, draws nothing and does no extra work.
    """

    head: str = "softmax"
    has_anchors: bool = True  # FGFI's mask needs anchors; False for anchor-free families
    dense_head: bool = True  # class logits at every anchor / location (False: Faster R-CNN's box head on proposals)
    max_negatives: int = 0  # negatives per batch to return in StudentOutput.negatives (0 = none)
    detector: Detector

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

    # ------------------------------------------------------------------------------------ det2det: as a teacher

    @property
    def anchor_generator(self) -> nn.Module:
        """The generator of the anchors (or locations) the head predicts at; Faster R-CNN: the RPN's."""
        return self.detector.anchor_generator

    def backbone_maps(self, tensors: Tensor) -> dict[str, Tensor]:
        """The named feature maps the heads read, for a normalised batch [N, 3, H, W]."""
        features = self.detector.backbone(tensors)
        return {"0": features} if isinstance(features, Tensor) else features

    @torch.no_grad()
    def teach(self, output: StudentOutput, positives: Positives | None = None) -> DetTeacherOutput:
        """Run this detector (a frozen det2det teacher of the student's family) on the student's own batch.

        ``output.images`` is re-normalised from the student's mean/std to this detector's (the identity when they
        are equal); it is not resized again: :meth:`check_det_teacher` has checked that both transforms resize
        alike. Returns this detector's feature maps and, when ``positives`` is given, its class logits for them:
        dense heads (SSD, RetinaNet, FCOS) at the same anchors (``positives.anchor_index``); Faster R-CNN
        overrides :meth:`positive_logits` to run its box head on the student's proposals.
        """
        images = output.images  # [N, 3, H, W]
        transform = self.detector.transform
        mean = torch.as_tensor(transform.image_mean, device=images.device, dtype=images.dtype)[:, None, None]
        std = torch.as_tensor(transform.image_std, device=images.device, dtype=images.dtype)[:, None, None]
        student_mean = output.image_mean.to(images)[:, None, None]
        student_std = output.image_std.to(images)[:, None, None]
        if not (torch.equal(mean, student_mean) and torch.equal(std, student_std)):
            images = (images * student_std + student_mean - mean) / std
        features = self.backbone_maps(images)  # L x [N, D_l, H_l, W_l]
        logits = None if positives is None else self.positive_logits(features, output, positives)
        return DetTeacherOutput(list(features.values()), logits)

    def positive_logits(self, features: dict[str, Tensor], output: StudentOutput, positives: Positives) -> Tensor:
        """[K, D] this detector's class logits at the positives' anchors (dense heads; Faster R-CNN overrides)."""
        if positives.anchor_index is None:
            raise ValueError(f"{type(self).__name__}: the positives carry no anchor_index")
        cls_logits = self.detector.head.classification_head(list(features.values()))  # [N, A, D]
        return cls_logits[positives.image_index, positives.anchor_index]  # [K, D]

    @torch.no_grad()
    def geometry_probe(self) -> tuple[list[tuple[int, ...]], Tensor]:
        """(feature-map shapes, anchors [A, 4]) for one blank image of this detector's input size, in eval mode
        (BatchNorm statistics untouched): what two detectors must share to distill one into the other."""
        transform = self.detector.transform
        side = transform.fixed_size[0] if transform.fixed_size else transform.min_size[-1]
        dtype = next(self.parameters()).dtype
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            image_list, _ = transform([torch.zeros(3, side, side, dtype=dtype, device=device)])
            features = list(self.backbone_maps(image_list.tensors).values())
            anchors = self.anchor_generator(image_list, features)[0]  # [A, 4]
        finally:
            self.train(was_training)
        return [tuple(f.shape[1:]) for f in features], anchors

    def check_det_teacher(self, teacher: StudentAdapter, methods: Sequence[str]) -> None:
        """Raise a one-line ``ValueError`` unless ``teacher`` can teach this student with det2det ``methods``
        (``logit``, ``fgfi``, ``pkd``): same family, same classes, same resizing; same anchors for logit KD on a
        dense head; the same feature-map shapes for the feature methods (no adaptation layer is added: with
        the registry's detectors a channel-only mismatch does not occur, the map sizes or counts differ too)."""
        name, other = type(self).__name__, type(teacher).__name__
        if other != name:
            raise ValueError(f"the det teacher is a {other}, the student a {name}: det2det needs the same family")
        if teacher.num_classes != self.num_classes:
            raise ValueError(f"the det teacher has {teacher.num_classes} classes, the student {self.num_classes}")
        if "fgfi" in methods and not self.has_anchors:
            raise ValueError(f"det:fgfi needs anchors and {name} is anchor-free: use det:logit or det:pkd")

        def resizing(adapter: StudentAdapter):
            t = adapter.detector.transform
            return {
                "min_size": tuple(t.min_size),
                "max_size": t.max_size,
                "fixed_size": t.fixed_size,
                "size_divisible": t.size_divisible,
            }

        mine, theirs = resizing(self), resizing(teacher)
        if mine != theirs:
            raise ValueError(
                f"the det teacher resizes images with {theirs}, the student with {mine}: train the "
                "teacher with the student's student.image_size"
            )
        my_shapes, my_anchors = self.geometry_probe()
        their_shapes, their_anchors = teacher.geometry_probe()
        if {"fgfi", "pkd"} & set(methods) and my_shapes != their_shapes:
            raise ValueError(
                f"det:fgfi / det:pkd need equal feature maps: the student's are {my_shapes} ([D, H, W] "
                f"per level), the det teacher's {their_shapes}; use a teacher of the same detector"
            )
        same_anchors = my_anchors.shape == their_anchors.shape and torch.equal(my_anchors, their_anchors)
        if "logit" in methods and self.dense_head and not same_anchors:
            raise ValueError(
                f"det:logit needs the same anchors: the student has {len(my_anchors)}, the det teacher "
                f"{len(their_anchors)} (or at other places); set the same student.anchor_sizes"
            )


def empty_positives(device: torch.device, dtype: torch.dtype, num_logits: int, head: str) -> Positives:
    return Positives(
        torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros(0, 4, dtype=dtype, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros(0, num_logits, dtype=dtype, device=device),
        torch.zeros(0, 4, dtype=dtype, device=device),
        head,
        torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
    )
