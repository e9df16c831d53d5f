"""The detector names ``cls2det train --detector`` accepts, each mapped to its family's builder.

A builder is ``fn(num_classes: int, config: StudentConfig) -> StudentAdapter``. Adding a detector is one
builder in its family's module and one line here. :func:`wrap_detector` wraps a detector the user built instead.
"""

from __future__ import annotations

import importlib

from torch import nn

from cls2det.config import ConfigError, StudentConfig
from cls2det.students.base import StudentAdapter

STUDENTS: dict[str, str] = {
    "fasterrcnn_mobilenet_v3": "cls2det.students.faster_rcnn:fasterrcnn_mobilenet_v3",
    "fasterrcnn_resnet50": "cls2det.students.faster_rcnn:fasterrcnn_resnet50",
    "retinanet_mobilenet_v3": "cls2det.students.retinanet:retinanet_mobilenet_v3",
    "retinanet_resnet50": "cls2det.students.retinanet:retinanet_resnet50",
    "ssd300_vgg16": "cls2det.students.ssd:ssd300_vgg16",
    "ssdlite320_mobilenet_v3": "cls2det.students.ssd:ssdlite320_mobilenet_v3",
    "fcos_mobilenet_v3": "cls2det.students.fcos:fcos_mobilenet_v3",
    "fcos_resnet50": "cls2det.students.fcos:fcos_resnet50",
}


def list_students() -> list[str]:
    return sorted(STUDENTS)


def backbone_classifier(name: str, num_classes: int):
    """The torchvision classifier whose state dict ``student.backbone_weights`` takes for detector ``name``."""
    if name not in STUDENTS:
        raise ConfigError(f"unknown detector {name!r}; valid: {', '.join(list_students())}")
    module = importlib.import_module(STUDENTS[name].split(":")[0])
    if not hasattr(module, "backbone_classifier"):
        raise ConfigError(f"{name}: backbone pre-training is not available for this family")
    return module.backbone_classifier(name, num_classes)


def create_student(name: str, num_classes: int, config: StudentConfig | None = None) -> StudentAdapter:
    """Build detector ``name`` for ``num_classes`` foreground classes, wrapped in its adapter."""
    if name not in STUDENTS:
        raise ConfigError(f"unknown detector {name!r}; valid: {', '.join(list_students())}")
    module, attr = STUDENTS[name].split(":")
    builder = getattr(importlib.import_module(module), attr)
    config = config or StudentConfig(detector=name)
    try:
        return builder(num_classes, config, **config.options)
    except TypeError as err:  # an option the torchvision builder does not take
        raise ConfigError(f"student.options for {name}: {err}") from None


def wrap_detector(detector: nn.Module, num_classes: int | None = None) -> StudentAdapter:
    """Wrap a torchvision detector you built yourself in its family's adapter (no copy: the adapter holds it).

    Accepted: ``FasterRCNN`` (e.g. ``fasterrcnn_mobilenet_v3_large_fpn``), ``SSD`` (``ssd300_vgg16``,
    ``ssdlite320_mobilenet_v3_large``), ``RetinaNet`` and ``FCOS`` instances, built with torchvision's own
    ``num_classes`` convention: C + 1 for Faster R-CNN and SSD (index 0 = background), C for RetinaNet and FCOS.
    Mask / Keypoint R-CNN are refused (the adapter would drop their mask / keypoint losses).

    num_classes: C, the foreground classes; inferred from the detector's classification head when None, checked
    against it otherwise. The adapter takes targets with 0-based labels in [0, C) and shifts them itself.
    Returns the adapter: train mode ``adapter(images, targets) -> StudentOutput`` (``.losses``, ``.positives``),
    eval mode ``adapter(images) -> list of {"boxes", "scores", "labels" in [0, C)}``.
    """
    from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.ssd import SSD

    from cls2det.students.faster_rcnn import FasterRCNNAdapter
    from cls2det.students.fcos import FCOSAdapter
    from cls2det.students.retinanet import RetinaNetAdapter
    from cls2det.students.ssd import SSDAdapter

    if isinstance(detector, StudentAdapter):
        raise ValueError(f"{type(detector).__name__} is already an adapter; pass its .detector or use it as it is")
    if isinstance(detector, (MaskRCNN, KeypointRCNN)):
        raise ValueError(f"{type(detector).__name__} is not supported: only its box losses would be trained")
    adapter: type[StudentAdapter]
    outputs: int | None
    if isinstance(detector, FasterRCNN):
        classes = _out_features(detector.roi_heads.box_predictor, "cls_score")
        adapter, outputs = FasterRCNNAdapter, None if classes is None else classes - 1
    elif isinstance(detector, SSD):
        adapter, outputs = SSDAdapter, int(detector.head.classification_head.num_columns) - 1
    elif isinstance(detector, RetinaNet):
        adapter, outputs = RetinaNetAdapter, int(detector.head.classification_head.num_classes)
    elif isinstance(detector, FCOS):
        adapter, outputs = FCOSAdapter, int(detector.head.classification_head.num_classes)
    else:
        raise ValueError(
            f"cannot wrap a {type(detector).__name__}: wrap_detector takes torchvision's FasterRCNN, SSD, RetinaNet or "
            f"FCOS; or build one by name with create_student({', '.join(list_students())})"
        )
    if outputs is None:  # a custom box predictor: trust the caller
        if num_classes is None:
            raise ValueError(f"{type(detector).__name__}: cannot read the class count of its box predictor; pass it")
        outputs = num_classes
    if num_classes is not None and num_classes != outputs:
        offset = " + 1 (background)" if adapter.head == "softmax" else ""
        raise ValueError(
            f"num_classes={num_classes}, but the {type(detector).__name__}'s head predicts {outputs} classes{offset}; "
            f"torchvision's num_classes is C{offset}"
        )
    if outputs <= 0:
        raise ValueError(f"{type(detector).__name__} predicts no foreground class")
    return adapter(detector, outputs)


def _out_features(module: nn.Module, name: str) -> int | None:
    layer = getattr(module, name, None)
    return int(layer.out_features) if isinstance(layer, nn.Linear) else None
