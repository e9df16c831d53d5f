"""Shared fixtures for the student adapter tests: a tiny detection batch in torchvision's contract."""

from __future__ import annotations

import pytest
import torch

NUM_CLASSES = 3


def make_batch(seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """2 images (96x128 and 128x112, RGB in 0..1) with 2 and 3 boxes (xyxy pixels), labels 0-based in [0, 3)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 128, 112, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 8.0, 58.0, 70.0], [64.0, 30.0, 120.0, 90.0]]), "labels": torch.tensor([0, 2])},
        {
            "boxes": torch.tensor([[4.0, 10.0, 40.0, 50.0], [50.0, 60.0, 104.0, 124.0], [20.0, 70.0, 44.0, 100.0]]),
            "labels": torch.tensor([1, 2, 1]),
        },
    ]
    return images, targets


def make_p3_p7_backbone():
    """The MobileNetV3-Large FPN of the one-stage MV3 students, assembled from torchvision's public parts:
    ``mobilenet_backbone`` on the stride-8 and stride-16 stage starts and the last conv, P6/P7 from P5."""
    from torch import nn
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    return mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        weights=None,
        fpn=True,
        norm_layer=nn.BatchNorm2d,
        trainable_layers=6,
        returned_layers=[2, 3, 5],
        extra_blocks=LastLevelP6P7(256, 256),
    )


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run these detector tests on one intra-op thread: with 2 cores shared by several processes, OpenMP threads
    waiting on each other made a ResNet-50-FPN step up to 20x slower (0.5 s -> 12 s measured); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def num_classes() -> int:
    return NUM_CLASSES


@pytest.fixture
def tiny_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A fresh copy per test (tests may modify it)."""
    return make_batch()


@pytest.fixture
def batch_with_empty_image(tiny_batch):
    """``tiny_batch`` with a third image (112x96) that has no boxes."""
    images, targets = tiny_batch
    images = images + [torch.rand(3, 112, 96, generator=torch.Generator().manual_seed(1))]
    targets = targets + [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


def run_stock(detector, images, targets) -> tuple[dict[str, torch.Tensor], dict]:
    """The stock detector's own train-mode forward, recording what it passes to ``head.compute_loss``.

    Works for RetinaNet and FCOS, whose heads take ``(targets, head_outputs, anchors, matched_idxs)``: the
    record holds torchvision's own transformed targets, head outputs, anchors and matches.
    """
    seen: dict = {}
    compute_loss = detector.head.compute_loss

    def spy(targets, head_outputs, anchors, matched_idxs):
        seen.update(targets=targets, head_outputs=head_outputs, anchors=anchors, matched_idxs=matched_idxs)
        return compute_loss(targets, head_outputs, anchors, matched_idxs)

    detector.head.compute_loss = spy  # an instance attribute shadows the method for this call only
    try:
        losses = detector(images, targets)
    finally:
        del detector.head.compute_loss
    return losses, seen


@pytest.fixture
def stock_run():
    return run_stock


@pytest.fixture
def p3_p7_backbone():
    """:func:`make_p3_p7_backbone`, the builder (call it for a fresh backbone)."""
    return make_p3_p7_backbone
