"""Building a torchvision detector from a ``StudentConfig``: the input size, the backbone's starting weights
(random, torchvision's ImageNet download, or a local state-dict file) and which of its stages train.

One rule for every family (:func:`build_detector`), as torchvision applies it to a pretrained backbone: with
``backbone_weights`` given, BatchNorm is frozen where torchvision freezes it and only the last
``trainable_backbone_layers`` stages train; without, everything trains from random weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, mobilenet_v3_large
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _validate_trainable_layers,
)
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

from cls2det.config import ConfigError, StudentConfig
from cls2det.errors import WeightsError
from cls2det.files import read_state_dict  # one safe reader for every local weights file
from cls2det.students.base import Detector

# The order in which torchvision unfreezes ResNet stages (``backbone_utils._resnet_fpn_extractor``).
RESNET_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")
MOBILENET_STAGES = 6  # torchvision's ``_mobilenet_extractor`` stages: stem, the 4 strided blocks, the last conv
# ``student.backbone_weights`` of a trained run being rebuilt (load_student): the pretrained layout, no weights read
CHECKPOINT_WEIGHTS = "<checkpoint>"


def is_local_weights(backbone_weights: str | None) -> bool:
    """Whether ``student.backbone_weights`` names a local state-dict file (not None, not ``imagenet``): the case
    :data:`CHECKPOINT_WEIGHTS` rebuilds exactly. ``imagenet`` is not: torchvision builds SSDlite's backbone with a
    full tail for ImageNet weights and a reduced one without."""
    return backbone_weights not in (None, "imagenet", CHECKPOINT_WEIGHTS)


def mobilenet_v3_fpn_backbone(
    weights_backbone: MobileNet_V3_Large_Weights | None,
    trainable_backbone_layers: int | None,
    returned_stages: list[int],
    extra_blocks: ExtraFPNBlock | None = None,
) -> BackboneWithFPN:
    """A MobileNetV3-Large FPN over ``returned_stages`` (of :data:`MOBILENET_STAGES`: 2 = stride 8, 3 = 16,
    4 and 5 = 32), built as torchvision builds ``fasterrcnn_mobilenet_v3_large_fpn``'s (stages [4, 5]): with
    ImageNet weights ``FrozenBatchNorm2d`` and the last ``trainable_backbone_layers`` stages trainable (default 3);
    random: ``BatchNorm2d``, all trainable. ``extra_blocks`` None = torchvision's max-pool level on top."""
    weights_backbone = MobileNet_V3_Large_Weights.verify(weights_backbone)
    is_trained = weights_backbone is not None
    trainable = _validate_trainable_layers(is_trained, trainable_backbone_layers, MOBILENET_STAGES, 3)
    norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    body = mobilenet_v3_large(weights=weights_backbone, norm_layer=norm_layer)
    return _mobilenet_extractor(body, True, trainable, returned_layers=returned_stages, extra_blocks=extra_blocks)


# MobileNetV3-Large stages that feed a one-stage FPN (RetinaNet, FCOS): the stride-8 and stride-16 stage starts and the
# last conv (stride 32), as C3, C4, C5 of the ResNet detectors; P6, P7 come from P5 (``LastLevelP6P7(256, 256)``), so
# the 5 levels P3..P7 (strides 8..128) of the stock anchors.
P3_P7_STAGES = [2, 3, 5]


def mobilenet_v3_p3_p7_backbone(
    detector: str,
    weights: Any,
    weights_backbone: MobileNet_V3_Large_Weights | None,
    trainable_backbone_layers: int | None,
) -> BackboneWithFPN:
    """The MobileNetV3-Large FPN of ``retinanet_mobilenet_v3`` / ``fcos_mobilenet_v3`` (:data:`P3_P7_STAGES` + P6,
    P7), built as :func:`mobilenet_v3_fpn_backbone` builds it. torchvision has no such detector: ``weights`` (of the
    whole detector) must be None."""
    if weights is not None:
        raise ConfigError(f"{detector} has no pretrained detection weights; use backbone weights")
    return mobilenet_v3_fpn_backbone(weights_backbone, trainable_backbone_layers, P3_P7_STAGES, LastLevelP6P7(256, 256))


def load_mobilenet_fpn_body(detector: Detector, path: str, trainable: int | None) -> None:
    """Load a local ``mobilenet_v3_large`` state dict into ``detector.backbone.body`` (an ``IntermediateLayerGetter``
    over ``mobilenet_v3_large().features``) and treat it as torchvision treats a pretrained backbone: BatchNorm
    frozen, only the last ``trainable`` (default 3, max 6) stages trainable. The ``load_local`` of
    :func:`build_detector` for every MobileNetV3-FPN family."""
    body = detector.backbone.body
    freeze_batchnorm(body)
    view = features_view(body.values())
    load_view_weights(view, path, "mobilenet_v3_large")
    features = cast(nn.Sequential, view.features)
    freeze_stages(features, stage_indices(features, "mobilenet"), 3 if trainable is None else trainable)


def build_detector(
    builder: Callable[..., nn.Module],
    config: StudentConfig,
    imagenet_weights: Any,
    load_local: Callable[[nn.Module, str, int | None], None],
    **kwargs: Any,
) -> nn.Module:
    """``builder(...)`` (a torchvision detection builder) with the backbone ``config.backbone_weights`` asks for:

    * ``None``: random init, every layer trainable (a ``trainable_backbone_layers`` value is ignored with
      torchvision's own warning);
    * ``"imagenet"``: torchvision's ``weights_backbone=imagenet_weights`` path (download or torch hub cache);
    * a local state-dict file: the untrained detector, then ``load_local(detector, path, trainable_backbone_layers)``
      loads the file into its backbone and freezes as torchvision freezes a pretrained one;
    * :data:`CHECKPOINT_WEIGHTS`: the layout of the local-file case (frozen BatchNorm, frozen stages) without reading
      any file: how a trained run is rebuilt before its checkpoint, which holds every weight, is loaded.
    """
    weights, trainable = config.backbone_weights, config.trainable_backbone_layers
    if weights == CHECKPOINT_WEIGHTS:  # a pretrained backbone's layout; no file, no download: the checkpoint fills it
        detector = builder(weights=None, weights_backbone=None, trainable_backbone_layers=None, **kwargs)
        load_local(detector, CHECKPOINT_WEIGHTS, trainable)
        return detector
    if weights == "imagenet":
        return build_imagenet_detector(builder, imagenet_weights, trainable_backbone_layers=trainable, **kwargs)
    detector = builder(
        weights=None, weights_backbone=None, trainable_backbone_layers=trainable if weights is None else None, **kwargs
    )
    if weights is not None:
        load_local(detector, weights, trainable)
    return detector


def build_imagenet_detector(builder: Callable[..., nn.Module], weights_backbone: Any, **kwargs: Any) -> nn.Module:
    """``builder(weights=None, weights_backbone=weights_backbone, **kwargs)``: torchvision's own pretrained-backbone
    path; a one-line :class:`WeightsError` when the weights can be neither downloaded nor found in the torch hub
    cache (offline)."""
    try:
        return builder(weights=None, weights_backbone=weights_backbone, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a corrupt cache raises RuntimeError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(
            f"student.backbone_weights='imagenet': could not load torchvision's {weights_backbone} "
            f"weights ({reason}); pass a local state-dict file instead"
        ) from None


def transform_kwargs(config: StudentConfig) -> dict[str, int]:
    """``min_size`` / ``max_size`` for the detector's ``GeneralizedRCNNTransform``: both = ``config.image_size``.

    ``image_size=None`` returns ``{}`` (torchvision's own defaults, 800 / 1333 for the FPN families).
    """
    if config.image_size is None:
        return {}
    if config.image_size <= 0:
        raise ConfigError(f"student.image_size must be > 0, got {config.image_size}")
    return {"min_size": config.image_size, "max_size": config.image_size}


def build_resnet_fpn_detector(
    builder: Callable[..., nn.Module], num_classes: int, config: StudentConfig, **kwargs: Any
) -> nn.Module:
    """A torchvision ``*_resnet50_fpn`` builder through :func:`build_detector` (ImageNet: ``IMAGENET1K_V1``); a
    local file is loaded into ``backbone.body``, then BatchNorm is frozen and only the last
    ``trainable_backbone_layers`` (default 3) stages train."""

    def load_local(detector: Detector, path: str, trainable: int | None) -> None:
        load_backbone_weights(detector.backbone.body, path)
        freeze_resnet_body(detector.backbone.body, 3 if trainable is None else trainable)

    return build_detector(
        builder, config, ResNet50_Weights.IMAGENET1K_V1, load_local, num_classes=num_classes, **kwargs
    )


def build_mobilenet_fpn_detector(
    builder: Callable[..., nn.Module], num_classes: int, config: StudentConfig, **kwargs: Any
) -> nn.Module:
    """A MobileNetV3-Large FPN builder through :func:`build_detector` (ImageNet: ``IMAGENET1K_V1``); a local file is
    loaded by :func:`load_mobilenet_fpn_body` (BatchNorm frozen, the last ``trainable_backbone_layers`` stages
    train). ``num_classes`` is the builder's own (C + 1 for Faster R-CNN)."""
    return build_detector(
        builder,
        config,
        MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        load_mobilenet_fpn_body,
        num_classes=num_classes,
        **kwargs,
    )


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """Load a ResNet state dict from ``path`` into ``body`` (the detector's ``backbone.body``), in place.

    Keys may carry one common prefix (``model.``, ``backbone.body.``, ``module.`` ...): it is found from the
    stem's ``conv1.weight`` and stripped; keys outside it and the classifier (``fc.*``) are ignored. Every
    body tensor must be present with the right shape (``num_batches_tracked`` may be missing).
    """
    if path == CHECKPOINT_WEIGHTS:
        return  # the run's checkpoint fills the body
    state = read_state_dict(path)
    # a prefix p is the ResNet's if both p + "conv1.weight" (stem) and p + "layer1.0.conv1.weight" exist
    prefixes = [k[: -len("conv1.weight")] for k in state if k.endswith("conv1.weight")]
    prefixes = [p for p in prefixes if p + "layer1.0.conv1.weight" in state]
    if not prefixes:
        raise WeightsError(f"{path}: no ResNet weights (conv1.weight, layer1.0.conv1.weight) in its {len(state)} keys")
    prefix = prefixes[0]
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(
                f"{path}: {prefix}{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{path}: missing backbone weight {prefix}{missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{path}: unexpected key {prefix}{unexpected[0]} for a ResNet-50 body")


def freeze_resnet_body(body: nn.Module, trainable_layers: int) -> None:
    """What torchvision does to a pretrained ResNet body, in place: BatchNorm -> ``FrozenBatchNorm2d`` (same
    statistics) and ``requires_grad=False`` outside the last ``trainable_layers`` stages (0..5; 5 = all)."""
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"student.trainable_backbone_layers must be in [0, 5], got {trainable_layers}")
    freeze_batchnorm(body)
    layers = list(RESNET_TRAINABLE_ORDER[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    for name, param in body.named_parameters():
        if not any(name.startswith(layer) for layer in layers):
            param.requires_grad_(False)


def fpn_level_sizes(sizes: list[int] | None, detector: str, levels: int = 5) -> list[int] | None:
    """Validate ``student.anchor_sizes``: ``levels`` positive ints, one base size per FPN level (P3..P7)."""
    if sizes is None:
        return None
    if len(sizes) != levels or any(s <= 0 for s in sizes):
        raise ConfigError(
            f"student.anchor_sizes: {detector} needs {levels} positive sizes (one per FPN level), got {list(sizes)}"
        )
    return list(sizes)


# ------------------------------------------------------------------------------------ classifier-layout backbones
# MobileNet / VGG bodies (Faster R-CNN MV3, SSD, SSDlite) keep the classifier's ``features`` blocks but regroup them.
# A "view" is a module laid out like the torchvision classifier (``view.features[i]`` = classifier ``features[i]``)
# whose submodules are the detector's own, so loading the classifier's state dict into the view fills the detector.


# whose submodules are the detector's own, so loading the classifier's state dict into the view fills the detector.


def load_view_weights(view: nn.Module, path: str | Path, classifier: str) -> None:
    """Load a torchvision ``classifier`` state dict (e.g. from ``mobilenet_v3_large().state_dict()``) into ``view``.

    Keys may carry one common prefix (found from the view's first key, e.g. ``features.0.0.weight``); keys of the
    classification head (``fc.*`` / ``classifier.*``) and outside the prefix are ignored. Every view tensor must be
    present with the right shape (``num_batches_tracked`` may be missing).
    """
    if path == CHECKPOINT_WEIGHTS:
        return  # the run's checkpoint fills the view
    state = read_state_dict(path)
    own = view.state_dict()
    first = next(iter(own))
    hits = [k for k in state if k == first or k.endswith("." + first)]
    if not hits:
        raise WeightsError(f"{path}: no {first} among its {len(state)} keys; expected a {classifier} state dict")
    prefix = min(hits, key=len)[: -len(first)]
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(
                f"{path}: {prefix}{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)} "
                f"for {classifier}"
            )
    missing, unexpected = view.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{path}: missing backbone weight {prefix}{missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{path}: unexpected key {prefix}{unexpected[0]} for {classifier}")


def stage_indices(features: nn.Sequential, kind: str) -> list[int]:
    """torchvision's stage starts in a classifier's ``features``: ``"mobilenet"`` = [0, strided blocks, last]
    (``_mobilenet_extractor``), ``"vgg"`` = [0, max-pools except the last] (``_vgg_extractor``)."""
    if kind == "mobilenet":
        return [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    return [0] + [i for i, b in enumerate(features) if isinstance(b, nn.MaxPool2d)][:-1]


def freeze_stages(features: nn.Sequential, stages: list[int], trainable_layers: int) -> None:
    """``requires_grad=False`` on ``features`` before the last ``trainable_layers`` stages (torchvision's rule)."""
    if not 0 <= trainable_layers <= len(stages):
        raise ConfigError(f"student.trainable_backbone_layers must be in [0, {len(stages)}], got {trainable_layers}")
    freeze_before = len(features) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    for block in list(features)[:freeze_before]:
        block.requires_grad_(False)


def features_view(blocks) -> nn.Module:
    """A module whose ``features`` is ``nn.Sequential(*blocks)`` (shared, not copied): a classifier's key layout."""
    view = nn.Module()
    view.features = nn.Sequential(*blocks)
    return view


def freeze_batchnorm(module: nn.Module) -> None:
    """Every ``nn.BatchNorm2d`` below ``module`` -> ``FrozenBatchNorm2d`` with the same statistics, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(cast(Tensor, child.running_mean).device)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
