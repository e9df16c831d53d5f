"""RetinaNet (torchvision ``retinanet_resnet50_fpn``) as a student: a sigmoid head with C outputs.

The adapter runs the stock ``RetinaNet.forward`` step by step (transform -> backbone -> head -> anchors ->
matching -> ``head.compute_loss``), so the loss numbers are torchvision's own, and reads off the positives:
every anchor the detector's ``proposal_matcher`` assigns to a GT box (IoU >= 0.5, plus each GT's best anchors).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from cls2det.config import ConfigError, StudentConfig
from cls2det.students.backbones import build_resnet_fpn_detector, fpn_level_sizes, transform_kwargs
from cls2det.students.dense import DenseHeadAdapter
from cls2det.students.forward_steps import match_anchors


def retinanet_anchor_generator(sizes: list[int]) -> AnchorGenerator:
    """torchvision's RetinaNet anchors with other base sizes: per FPN level (P3..P7) base size ``s`` gives the
    3 scales per octave ``(s, int(s * 2**(1/3)), int(s * 2**(2/3)))`` x aspect ratios (0.5, 1, 2) = 9 anchors.
    Stock: ``sizes = [32, 64, 128, 256, 512]``."""
    anchor_sizes = tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in sizes)
    return AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))


class RetinaNetAdapter(DenseHeadAdapter):
    """A torchvision :class:`RetinaNet` with ``num_classes = C`` (labels 0..C-1, no background column).

    Positives: every anchor the detector's ``proposal_matcher`` assigns to a GT box (IoU >= 0.5, plus each GT's best
    anchors); logits [K, C]; pred_boxes = ``box_coder.decode_single(bbox_regression, anchor)``. Negatives: anchors
    at IoU < 0.4 with every GT box; the ignored ones in [0.4, 0.5) are left out, as the focal loss leaves them out.
    """

    head = "sigmoid"

    def match(self, anchors: list[Tensor], targets: list[dict[str, Tensor]], features: list[Tensor]) -> list[Tensor]:
        return match_anchors(self.detector, anchors, targets)

    def decode_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return self.detector.box_coder.decode_single(regression, anchors)


def retinanet_resnet50(num_classes: int, config: StudentConfig, **options: Any) -> RetinaNetAdapter:
    """RetinaNet-ResNet50-FPN (torchvision v1) for ``num_classes`` foreground classes.

    config.image_size -> transform min_size = max_size; config.anchor_sizes -> 5 base sizes, one per FPN level
    (see :func:`retinanet_anchor_generator`); config.backbone_weights / trainable_backbone_layers -> see
    :func:`cls2det.students.backbones.build_resnet_fpn_detector`.
    """
    if num_classes <= 0:
        raise ConfigError(f"num_classes must be > 0, got {num_classes}")
    kwargs = {**transform_kwargs(config), **options}
    sizes = fpn_level_sizes(config.anchor_sizes, "retinanet_resnet50")
    if sizes is not None:
        kwargs["anchor_generator"] = retinanet_anchor_generator(sizes)
    detector = build_resnet_fpn_detector(retinanet_resnet50_fpn, num_classes, config, **kwargs)
    return RetinaNetAdapter(detector, num_classes)
