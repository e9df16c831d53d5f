"""SSD300-VGG16 and SSDlite320-MobileNetV3 (torchvision) as students: a softmax head with C+1 outputs.

The adapter runs the stock ``SSD.forward`` training path step by step (transform -> backbone -> head -> default
boxes -> matching -> ``SSD.compute_loss``), so the loss numbers are torchvision's own, and reads off the
positives: every default box the detector's ``proposal_matcher`` assigns to a GT box (IoU >= 0.5, plus each
GT's best box).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast

from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, VGG16_Weights, mobilenet_v3_large, vgg16
from torchvision.models.detection import ssd300_vgg16 as tv_ssd300_vgg16
from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite320
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cls2det.config import ConfigError, StudentConfig
from cls2det.students.backbones import (
    build_detector,
    features_view,
    freeze_stages,
    load_view_weights,
    stage_indices,
)
from cls2det.students.dense import DenseHeadAdapter
from cls2det.students.forward_steps import match_anchors

SSD300_MIN_SIZE = 268  # below this the VGG extra layers (3x3 convs without padding) run out of pixels


class SSDAdapter(DenseHeadAdapter):
    """A torchvision :class:`SSD` (or SSDlite) with ``num_classes = C + 1`` (label 0 = background).

    Losses: torchvision's ``bbox_regression`` and ``classification`` (hard-negative mined). Positives: the default
    boxes matched to a GT box; logits [K, C+1]; pred_boxes = ``box_coder.decode_single(bbox_regression, default
    box)``; all in pixels of the transformed (fixed-size) batch. Negatives: default boxes at IoU < 0.5 with every
    GT box: all of them are candidates, not only the 3:1 hard negatives SSD's classification loss mines.
    """

    head = "softmax"

    def match(self, anchors: list[Tensor], targets: list[dict[str, Tensor]], features: list[Tensor]) -> list[Tensor]:
        return match_anchors(self.detector, anchors, targets)

    def decode_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return self.detector.box_coder.decode_single(regression, anchors)

    def detector_losses(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor], matched: list
    ) -> dict[str, Tensor]:
        return self.detector.compute_loss(targets, head_outputs, anchors, matched)


def ssd_box_generator(
    stock: DefaultBoxGenerator, image_size: int, stock_size: int, anchor_sizes: list[int] | None
) -> DefaultBoxGenerator:
    """The default boxes for a square input of ``image_size`` px, from the detector's stock generator.

    ``anchor_sizes`` (pixels of the transformed image, divided by ``image_size`` into SSD's relative scales):
      * ``None``: the stock scales;
      * 2 values ``(min, max)``: scales spaced linearly from min to max over the feature maps, plus 1.0 for the
        last map's extra box (``DefaultBoxGenerator``'s ``min_ratio`` / ``max_ratio`` rule, SSDlite's stock form);
      * one value per feature map + 1: explicit scales (SSD300's stock form, the last one only sets the extra
        ``sqrt(s_k * s_k+1)`` box of the last map).
    The stock ``steps`` (SSD300: 8..300) only fit ``stock_size``; at another size the boxes tile each feature map
    evenly (``steps=None``). Aspect ratios (so the head's anchors per location) stay as they are.
    """
    steps = stock.steps if image_size == stock_size else None
    if anchor_sizes is None:
        return DefaultBoxGenerator(stock.aspect_ratios, scales=list(stock.scales), steps=steps, clip=stock.clip)
    maps = len(stock.aspect_ratios)
    if any(s <= 0 for s in anchor_sizes):
        raise ConfigError(f"student.anchor_sizes must be positive, got {list(anchor_sizes)}")
    if len(anchor_sizes) == 2:
        low, high = sorted(anchor_sizes)
        return DefaultBoxGenerator(
            stock.aspect_ratios, min_ratio=low / image_size, max_ratio=high / image_size, steps=steps, clip=stock.clip
        )
    if len(anchor_sizes) == maps + 1:
        scales = [s / image_size for s in anchor_sizes]
        return DefaultBoxGenerator(stock.aspect_ratios, scales=scales, steps=steps, clip=stock.clip)
    raise ConfigError(
        f"student.anchor_sizes for SSD needs 2 sizes (min, max) or {maps + 1} (one per feature map "
        f"+ 1), got {len(anchor_sizes)}"
    )


def set_ssd_geometry(detector: SSD, config: StudentConfig, stock_size: int) -> None:
    """Resize to ``config.image_size`` squared (replacing the transform) and set the default boxes, in place."""
    size = config.image_size or stock_size
    if size != stock_size:
        old = detector.transform
        detector.transform = GeneralizedRCNNTransform(
            size, size, old.image_mean, old.image_std, size_divisible=1, fixed_size=(size, size)
        )
    if size != stock_size or config.anchor_sizes is not None:
        detector.anchor_generator = ssd_box_generator(detector.anchor_generator, size, stock_size, config.anchor_sizes)


def _check(num_classes: int, config: StudentConfig, min_size: int, detector: str) -> None:
    if num_classes <= 0:
        raise ConfigError(f"num_classes must be > 0, got {num_classes}")
    if config.image_size is not None and config.image_size < min_size:
        raise ConfigError(f"student.image_size must be >= {min_size} for {detector}, got {config.image_size}")


def ssd300_vgg16(num_classes: int, config: StudentConfig, **kwargs: Any) -> SSDAdapter:
    """SSD300-VGG16 (torchvision ``ssd300_vgg16``), C+1 outputs, input resized to image_size x image_size (300).

    config.anchor_sizes -> :func:`ssd_box_generator`. config.backbone_weights:
      * ``None``: random init, all layers trainable (``trainable_backbone_layers`` ignored, with torchvision's warning);
      * ``"imagenet"``: torchvision's ``VGG16_Weights.IMAGENET1K_FEATURES`` path (needs the download / cache);
      * a local ``vgg16`` state dict (only ``features.*`` is read): loaded into ``features`` (conv1_1..conv4_3) and
        ``extra[0]`` (conv5_1..conv5_3); only the last ``trainable_backbone_layers`` (default 4, max 5) stages
        trainable, as torchvision does with a pretrained VGG.
    kwargs go to torchvision's :class:`SSD` (e.g. ``score_thresh``, ``topk_candidates``).
    """
    _check(num_classes, config, SSD300_MIN_SIZE, "ssd300_vgg16")

    def load_local(detector: SSD, path: str, trainable: int | None) -> None:
        body = detector.backbone
        # vgg16().features[0:23] = body.features, [23:30] = body.extra[0][:7]; [30] (pool5) is replaced by SSD.
        view = features_view([*body.features, *body.extra[0][:7], nn.MaxPool2d(2, 2)])
        load_view_weights(view, path, "vgg16")
        features = cast(nn.Sequential, view.features)
        freeze_stages(features, stage_indices(features, "vgg"), 4 if trainable is None else trainable)

    kwargs = {**kwargs, "num_classes": num_classes + 1}
    detector = build_detector(tv_ssd300_vgg16, config, VGG16_Weights.IMAGENET1K_FEATURES, load_local, **kwargs)
    set_ssd_geometry(detector, config, 300)
    return SSDAdapter(detector, num_classes)


def ssdlite320_mobilenet_v3(num_classes: int, config: StudentConfig, **kwargs: Any) -> SSDAdapter:
    """SSDlite320-MobileNetV3-Large (torchvision ``ssdlite320_mobilenet_v3_large``), C+1 outputs, input resized to
    image_size x image_size (320).

    config.anchor_sizes -> :func:`ssd_box_generator`. config.backbone_weights:
      * ``None``: random init (torchvision's: reduced tail, normal init), everything trainable;
      * ``"imagenet"``: torchvision's ``MobileNet_V3_Large_Weights.IMAGENET1K_V1`` path (full tail; needs the
        download / cache);
      * a local state dict of ``mobilenet_v3_large(reduced_tail=True)`` (the untrained detector's layout, see
        :func:`backbone_classifier`): loaded into the backbone's ``features``; only the last
        ``trainable_backbone_layers`` (default 6 = all) stages trainable. BatchNorm stays trainable, as in torchvision.
    kwargs go to torchvision's :class:`SSD` (e.g. ``score_thresh``, ``topk_candidates``).
    """
    _check(num_classes, config, 1, "ssdlite320_mobilenet_v3")

    def load_local(detector: SSD, path: str, trainable: int | None) -> None:
        view = _ssdlite_view(detector.backbone)
        load_view_weights(view, path, "mobilenet_v3_large(reduced_tail=True)")
        features = cast(nn.Sequential, view.features)
        freeze_stages(features, stage_indices(features, "mobilenet"), 6 if trainable is None else trainable)

    kwargs = {**kwargs, "num_classes": num_classes + 1}
    detector = build_detector(tv_ssdlite320, config, MobileNet_V3_Large_Weights.IMAGENET1K_V1, load_local, **kwargs)
    set_ssd_geometry(detector, config, 320)
    return SSDAdapter(detector, num_classes)


def _ssdlite_view(body: Any) -> nn.Module:  # body: torchvision's SSDLiteFeatureExtractorMobileNet (untyped)
    """The classifier layout of SSDlite's body: torchvision splits block C4 (``features[c4]``) after its expansion
    conv, ``body.features = [features[:c4] + [C4.block[0]], [C4.block[1:]] + features[c4+1:]]``; re-join it."""
    first, second = body.features  # nn.Sequential each
    c4 = len(first) - 1
    split = nn.Module()
    split.block = nn.Sequential(OrderedDict([("0", first[c4]), *second[0].named_children()]))  # keeps names 1..3
    # C4 is a strided block: a stage start for torchvision's freezing rule (the ignore: nn.Module.__setattr__ is
    # typed for tensors and modules only)
    split._is_cn = True  # type: ignore[assignment]
    return features_view([*first[:c4], split, *second[1:]])


def backbone_classifier(detector: str, num_classes: int = 1000) -> nn.Module:
    """The torchvision classifier whose ``state_dict()`` ``student.backbone_weights`` expects for ``detector``
    (pre-train it, save its state dict, pass the file): its head is ignored when loading."""
    if detector == "ssd300_vgg16":
        return vgg16(num_classes=num_classes)
    if detector == "ssdlite320_mobilenet_v3":
        return mobilenet_v3_large(num_classes=num_classes, reduced_tail=True)
    raise ConfigError(f"unknown SSD detector {detector!r}; valid: ssd300_vgg16, ssdlite320_mobilenet_v3")
