"""One-line notices about a student run's inputs that are legal but probably not what the user wants."""

from __future__ import annotations

import math
import statistics

from cls2det.config import TrainConfig
from cls2det.data import DetectionSplit

# warn when the detector's default input side is at least this many times the images' typical longer side
UPSCALE_WARNING = 2.5
SMALLEST_SUGGESTION = 320  # torchvision's own small variants (fasterrcnn_mobilenet_v3_large_320_fpn, SSDlite320)


def input_notices(config: TrainConfig, student, split: DetectionSplit) -> list[str]:
    """The warning / notice lines for ``config``'s student built as ``student`` on the train ``split``."""
    lines = []
    size_warning = small_images_warning(config, student, split)
    if size_warning:
        lines.append(size_warning)
    if config.student.backbone_weights is None:
        lines.append(
            f"note: student.backbone_weights is unset: the {config.student.detector} backbone starts from random "
            "weights and learns slowly on small data; pass student.backbone_weights=imagenet (or a local "
            ".safetensors / .pth file of the backbone classifier) to start from pretrained ones"
        )
    return lines


def small_images_warning(config: TrainConfig, student, split: DetectionSplit) -> str | None:
    """A warning when ``student.image_size`` is unset and the family's default input side is much larger than the
    images (Faster R-CNN's 800 px on 96-128 px images: a step took 4.7x longer and 6.3 GB, measured at batch 4 on
    CPU against student.image_size=320), with a suggested size: the images' typical longer side doubled, rounded up
    to a multiple of 32, at least 320 and at most the default."""
    if config.student.image_size is not None or not split.images:
        return None
    transform = student.detector.transform
    default = int(transform.fixed_size[0] if transform.fixed_size else transform.min_size[-1])
    typical = statistics.median(max(int(im.get("width", 0)), int(im.get("height", 0))) for im in split.images)
    if typical <= 0 or default < UPSCALE_WARNING * typical:
        return None
    suggested = min(default, max(SMALLEST_SUGGESTION, 32 * math.ceil(2 * typical / 32)))
    if suggested >= default:
        return None
    return (
        f"warning: the train images are ~{typical:g} px but {config.student.detector} resizes them to {default} px "
        f"by default ({default / typical:.1f}x: slow and memory-hungry for no detail gained); "
        f"consider student.image_size={suggested}"
    )
