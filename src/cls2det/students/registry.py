"""The detector names ``cls2det train --detector`` accepts, each mapped to its family's builder.

A builder is ``fn(num_classes: int, config: StudentConfig) -> StudentAdapter``. Adding a detector is one
builder in its family's module and one line here.
"""

from __future__ import annotations

import importlib

from cls2det.config import StudentConfig
from cls2det.students.base import StudentAdapter

STUDENTS: dict[str, str] = {
    "fasterrcnn_mobilenet_v3": "cls2det.students.faster_rcnn:fasterrcnn_mobilenet_v3",
    "fasterrcnn_resnet50": "cls2det.students.faster_rcnn:fasterrcnn_resnet50",
    "retinanet_resnet50": "cls2det.students.retinanet:retinanet_resnet50",
    "ssd300_vgg16": "cls2det.students.ssd:ssd300_vgg16",
    "ssdlite320_mobilenet_v3": "cls2det.students.ssd:ssdlite320_mobilenet_v3",
    "fcos_resnet50": "cls2det.students.fcos:fcos_resnet50",
}


def list_students() -> list[str]:
    return sorted(STUDENTS)


def backbone_classifier(name: str, num_classes: int):
    """The torchvision classifier whose state dict ``student.backbone_weights`` takes for detector ``name``."""
    if name not in STUDENTS:
        raise ValueError(f"unknown detector {name!r}; valid: {', '.join(list_students())}")
    module = importlib.import_module(STUDENTS[name].split(":")[0])
    if not hasattr(module, "backbone_classifier"):
        raise ValueError(f"{name}: backbone pre-training is not available for this family")
    return module.backbone_classifier(name, num_classes)


def create_student(name: str, num_classes: int, config: StudentConfig | None = None) -> StudentAdapter:
    """Build detector ``name`` for ``num_classes`` foreground classes, wrapped in its adapter."""
    if name not in STUDENTS:
        raise ValueError(f"unknown detector {name!r}; valid: {', '.join(list_students())}")
    module, attr = STUDENTS[name].split(":")
    builder = getattr(importlib.import_module(module), attr)
    config = config or StudentConfig(detector=name)
    try:
        return builder(num_classes, config, **config.options)
    except TypeError as err:  # an option the torchvision builder does not take
        raise ValueError(f"student.options for {name}: {err}") from None
    except RuntimeError as err:
        # build_imagenet_detector's one-line error (offline and not in the torch hub cache): a user's input, which the
        # CLI prints as one line like a ValueError, not a bug with a traceback
        if config.backbone_weights == "imagenet" and str(err).startswith("student.backbone_weights='imagenet'"):
            raise ValueError(str(err)) from None
        raise
