"""FCOS (torchvision ``fcos_resnet50_fpn``) as a student: a sigmoid head with C outputs.

The adapter runs the stock ``FCOS.forward`` step by step (transform -> backbone -> head -> anchors ->
center-sampling assignment -> ``head.compute_loss``), so the loss numbers are torchvision's own, and reads off
the positives: every location FCOS assigns to a GT box.

FCOS has no anchors in the RetinaNet sense. torchvision places one square "anchor" per feature-map location,
of side ``size_l`` per level (stock: the strides 8, 16, 32, 64, 128), and uses it three ways:
  * center sampling: a location is a candidate for a GT box if it lies within ``1.5 * size_l`` (per axis) of
    the box centre, and inside the box;
  * scale assignment: level l takes the box only if the largest location-to-side distance is in
    ``(4 * size_l, 8 * size_l)`` (no lower bound on the first level, no upper bound on the last);
  * regression unit: the head predicts the four side distances in units of ``size_l``.
``StudentConfig.anchor_sizes`` (5 ints) replaces ``size_l``: smaller sizes move objects to coarser levels and
shrink the sampling radius (fewer positives per object), larger sizes do the opposite. The locations stay on the
stride grid (at ``(x * stride, y * stride)``), whatever the sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large, resnet50
from torchvision.models.detection import FCOS, fcos_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from cls2det.config import ConfigError, StudentConfig
from cls2det.students.backbones import (
    build_mobilenet_fpn_detector,
    build_resnet_fpn_detector,
    fpn_level_sizes,
    mobilenet_v3_p3_p7_backbone,
    transform_kwargs,
)
from cls2det.students.dense import DenseHeadAdapter
from cls2det.students.forward_steps import match_per_image


def fcos_anchor_generator(sizes: list[int]) -> AnchorGenerator:
    """One square anchor of side ``sizes[l]`` per location of FPN level l (P3..P7); stock: [8, 16, 32, 64, 128]."""
    return AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))


def fcos_matched_idxs(
    anchors: list[Tensor],
    targets: list[dict[str, Tensor]],
    num_anchors_per_level: list[int],
    center_sampling_radius: float,
) -> list[Tensor]:
    """Per image [A] int64: the GT index assigned to each location, -1 for background.

    A reproduction of the assignment inside ``FCOS.compute_loss`` (torchvision 0.16-0.29), which does not expose
    it: center sampling, inside-box, per-level scale range, then the smallest-area GT among the candidates.
    The tests check it against the ``matched_idxs`` torchvision passes to ``FCOSHead.compute_loss``.
    """

    def assign(gt_boxes: Tensor, anchors_per_image: Tensor) -> Tensor:  # [M, 4], [A, 4] -> [A]
        gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [M, 2]
        anchor_centers = (anchors_per_image[:, :2] + anchors_per_image[:, 2:]) / 2  # [A, 2]
        anchor_sizes = anchors_per_image[:, 2] - anchors_per_image[:, 0]  # [A]
        # center sampling: the location is within radius * size of the GT centre (Chebyshev distance)
        is_match = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs().max(
            dim=2
        ).values < center_sampling_radius * anchor_sizes[:, None]  # [A, M]
        x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)  # [A, 1] each
        x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)  # [1, M] each
        side_dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)  # [A, M, 4]
        is_match &= side_dist.min(dim=2).values > 0  # inside the box
        lower_bound = anchor_sizes * 4
        lower_bound[: num_anchors_per_level[0]] = 0
        upper_bound = anchor_sizes * 8
        upper_bound[-num_anchors_per_level[-1] :] = float("inf")
        max_dist = side_dist.max(dim=2).values  # [A, M]
        is_match &= (max_dist > lower_bound[:, None]) & (max_dist < upper_bound[:, None])
        # several candidates: the GT with the smallest area wins
        gt_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])  # [M]
        score = is_match.to(torch.float32) * (1e8 - gt_areas[None, :])  # [A, M]
        best, matched = score.max(dim=1)  # [A]
        matched[best < 1e-5] = -1
        return matched

    return match_per_image(anchors, targets, assign)


class FCOSAdapter(DenseHeadAdapter):
    """A torchvision :class:`FCOS` with ``num_classes = C`` (labels 0..C-1, no background column).

    Positives: every location FCOS assigns to a GT box (:func:`fcos_matched_idxs`); logits [K, C]; pred_boxes =
    ``box_coder.decode(bbox_regression, anchor)`` as FCOS's postprocess does. The centerness output is not part of
    the record. Negatives: locations assigned to no GT box; their box is the location's square "anchor".
    """

    head = "sigmoid"
    has_anchors = False

    def match(self, anchors: list[Tensor], targets: list[dict[str, Tensor]], features: list[Tensor]) -> list[Tensor]:
        num_anchors_per_level = [f.size(2) * f.size(3) for f in features]
        return fcos_matched_idxs(anchors, targets, num_anchors_per_level, self.detector.center_sampling_radius)

    def decode_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return self.detector.box_coder.decode(regression, anchors)


def fcos_resnet50(num_classes: int, config: StudentConfig, **options: Any) -> FCOSAdapter:
    """FCOS-ResNet50-FPN for ``num_classes`` foreground classes.

    config.image_size -> transform min_size = max_size; config.anchor_sizes -> the 5 per-level location sizes
    (module docstring: sampling radius, scale range, regression unit); config.backbone_weights /
    trainable_backbone_layers -> see :func:`cls2det.students.backbones.build_resnet_fpn_detector`.
    """
    kwargs = _kwargs(num_classes, config, "fcos_resnet50", options)
    detector = build_resnet_fpn_detector(fcos_resnet50_fpn, num_classes, config, **kwargs)
    return FCOSAdapter(detector, num_classes)


def fcos_mobilenet_v3_large_fpn(
    *,
    weights: None = None,
    weights_backbone: MobileNet_V3_Large_Weights | None = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> FCOS:
    """torchvision's :class:`FCOS` (GroupNorm head, focal + GIoU + centerness losses) over a MobileNetV3-Large FPN
    on levels P3..P7 (:func:`cls2det.students.backbones.mobilenet_v3_p3_p7_backbone`, as RetinaNet-MV3's).
    torchvision has no such detector, so there are no detection ``weights``; kwargs go to :class:`FCOS`
    (``anchor_generator``, ``min_size`` ...)."""
    backbone = mobilenet_v3_p3_p7_backbone("fcos_mobilenet_v3", weights, weights_backbone, trainable_backbone_layers)
    kwargs.setdefault("anchor_generator", fcos_anchor_generator([8, 16, 32, 64, 128]))
    return FCOS(backbone, num_classes, **kwargs)


def fcos_mobilenet_v3(num_classes: int, config: StudentConfig, **options: Any) -> FCOSAdapter:
    """FCOS-MobileNetV3-Large-FPN (:func:`fcos_mobilenet_v3_large_fpn`) for ``num_classes`` classes: the small
    sigmoid student. config.image_size / anchor_sizes as :func:`fcos_resnet50`; config.backbone_weights: ``None``
    (random, all trainable), ``"imagenet"`` (``MobileNet_V3_Large_Weights.IMAGENET1K_V1``) or a local
    ``mobilenet_v3_large`` state dict (:func:`cls2det.students.backbones.load_mobilenet_fpn_body`)."""
    kwargs = _kwargs(num_classes, config, "fcos_mobilenet_v3", options)
    detector = build_mobilenet_fpn_detector(fcos_mobilenet_v3_large_fpn, num_classes, config, **kwargs)
    return FCOSAdapter(detector, num_classes)


def _kwargs(num_classes: int, config: StudentConfig, detector: str, options: dict[str, Any]) -> dict[str, Any]:
    """The FCOS kwargs of a builder: transform size, location sizes, then the user's options."""
    if num_classes <= 0:
        raise ConfigError(f"num_classes must be > 0, got {num_classes}")
    kwargs = {**transform_kwargs(config), **options}
    sizes = fpn_level_sizes(config.anchor_sizes, detector)
    if sizes is not None:
        kwargs["anchor_generator"] = fcos_anchor_generator(sizes)
    return kwargs


def backbone_classifier(detector: str, num_classes: int = 1000) -> nn.Module:
    """The torchvision classifier whose ``state_dict()`` ``student.backbone_weights`` expects for ``detector``."""
    if detector == "fcos_mobilenet_v3":
        return mobilenet_v3_large(num_classes=num_classes)
    if detector == "fcos_resnet50":
        return resnet50(num_classes=num_classes)
    raise ConfigError(f"unknown FCOS detector {detector!r}; valid: fcos_mobilenet_v3, fcos_resnet50")
