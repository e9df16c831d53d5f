"""RetinaNet (torchvision ``retinanet_resnet50_fpn``, and the same detector over a MobileNetV3-Large FPN) as a
student: a sigmoid head with C outputs.

The adapter runs the stock ``RetinaNet.forward`` step by step (transform -> backbone -> head -> anchors ->
matching -> ``head.compute_loss``), so the loss numbers are torchvision's own, and reads off the positives:
every anchor the detector's ``proposal_matcher`` assigns to a GT box (IoU >= 0.5, plus each GT's best anchors).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large, resnet50
from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from cls2det.config import ConfigError, StudentConfig
from cls2det.students.backbones import (
    build_mobilenet_fpn_detector,
    build_resnet_fpn_detector,
    fpn_level_sizes,
    mobilenet_v3_p3_p7_backbone,
    transform_kwargs,
)
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
    kwargs = _kwargs(num_classes, config, "retinanet_resnet50", options)
    detector = build_resnet_fpn_detector(retinanet_resnet50_fpn, num_classes, config, **kwargs)
    return RetinaNetAdapter(detector, num_classes)


def retinanet_mobilenet_v3_large_fpn(
    *,
    weights: None = None,
    weights_backbone: MobileNet_V3_Large_Weights | None = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> RetinaNet:
    """torchvision's :class:`RetinaNet` over a MobileNetV3-Large FPN backbone on levels P3..P7
    (:func:`cls2det.students.backbones.mobilenet_v3_p3_p7_backbone`; pretrained backbone: ``FrozenBatchNorm2d`` and
    the last ``trainable_backbone_layers`` of 6 stages trainable, default 3; random: ``BatchNorm2d``, all trainable).
    torchvision has no such detector, so there are no detection ``weights``; kwargs go to :class:`RetinaNet`
    (``anchor_generator``, ``head``, ``min_size`` ...)."""
    backbone = mobilenet_v3_p3_p7_backbone(
        "retinanet_mobilenet_v3", weights, weights_backbone, trainable_backbone_layers
    )
    kwargs.setdefault("anchor_generator", retinanet_anchor_generator([32, 64, 128, 256, 512]))
    return RetinaNet(backbone, num_classes, **kwargs)


def retinanet_mobilenet_v3(num_classes: int, config: StudentConfig, **options: Any) -> RetinaNetAdapter:
    """RetinaNet-MobileNetV3-Large-FPN (:func:`retinanet_mobilenet_v3_large_fpn`) for ``num_classes`` classes.

    config.image_size -> transform min_size = max_size; config.anchor_sizes -> 5 base sizes, one per level P3..P7
    (strides 8..128, see :func:`retinanet_anchor_generator`). config.backbone_weights:
      * ``None``: random init, BatchNorm, all layers trainable (``trainable_backbone_layers`` ignored, with
        torchvision's warning);
      * ``"imagenet"``: ``MobileNet_V3_Large_Weights.IMAGENET1K_V1`` (needs the download / torch hub cache);
      * a local ``mobilenet_v3_large`` state dict (see :func:`backbone_classifier`): loaded into ``backbone.body``,
        BatchNorm frozen, only the last ``trainable_backbone_layers`` (default 3, max 6) stages trainable, as the
        ``"imagenet"`` path does.
    options: ``head`` (``"v1"`` default, or ``"v2"``: :func:`retinanet_head`); the others go to torchvision's
    :class:`RetinaNet` (e.g. ``score_thresh``, ``topk_candidates``).
    """
    kwargs = _kwargs(num_classes, config, "retinanet_mobilenet_v3", options)
    detector = build_mobilenet_fpn_detector(retinanet_mobilenet_v3_large_fpn, num_classes, config, **kwargs)
    return RetinaNetAdapter(detector, num_classes)


def retinanet_head(version: str, num_anchors: int, num_classes: int, in_channels: int = 256) -> RetinaNetHead:
    """torchvision's RetinaNet head, ``"v1"`` (``retinanet_resnet50_fpn``: 4 plain convs per branch, smooth-L1 box
    loss) or ``"v2"`` (``retinanet_resnet50_fpn_v2``: GroupNorm(32) after each conv, GIoU box loss)."""
    if version == "v1":
        return RetinaNetHead(in_channels, num_anchors, num_classes)
    if version == "v2":
        head = RetinaNetHead(in_channels, num_anchors, num_classes, norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
        return head
    raise ConfigError(f"student.options.head must be 'v1' or 'v2', got {version!r}")


def _kwargs(num_classes: int, config: StudentConfig, detector: str, options: dict[str, Any]) -> dict[str, Any]:
    """The RetinaNet kwargs of a builder: transform size, anchor generator, head, then the user's options.

    ``options["head"]``: ``"v1"`` (default) or ``"v2"``, see :func:`retinanet_head`."""
    if num_classes <= 0:
        raise ConfigError(f"num_classes must be > 0, got {num_classes}")
    options = dict(options)
    head_version = options.pop("head", "v1")
    kwargs = {**transform_kwargs(config), **options}
    sizes = fpn_level_sizes(config.anchor_sizes, detector)
    if sizes is not None:
        kwargs["anchor_generator"] = retinanet_anchor_generator(sizes)
    if head_version != "v1":  # v1 is the head RetinaNet builds itself
        anchors = kwargs.get("anchor_generator")
        num_anchors = 9 if anchors is None else anchors.num_anchors_per_location()[0]  # stock: 3 scales x 3 ratios
        kwargs["head"] = retinanet_head(head_version, num_anchors, num_classes)
    return kwargs


def backbone_classifier(detector: str, num_classes: int = 1000) -> nn.Module:
    """The torchvision classifier whose ``state_dict()`` ``student.backbone_weights`` expects for ``detector``
    (pre-train it, save its state dict, pass the file): its head is ignored when loading."""
    if detector == "retinanet_mobilenet_v3":
        return mobilenet_v3_large(num_classes=num_classes)
    if detector == "retinanet_resnet50":
        return resnet50(num_classes=num_classes)
    raise ConfigError(f"unknown RetinaNet detector {detector!r}; valid: retinanet_mobilenet_v3, retinanet_resnet50")
