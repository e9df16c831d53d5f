"""The objective's wiring of KD_loc and of the positives cap: KD_loc on the taps' release pools (obj 4, l0 8) with
the obj level summed and the teacher layers averaged; ``max_positives`` caps the terms that run the teacher online,
while KD_cls from the soft-label cache sees every positive."""

from __future__ import annotations

import pytest
import torch

from cls2det.config import DistillConfig
from cls2det.distill import kd_cls_loss, kd_loc_loss, sanitize_boxes
from cls2det.engine.objective import distillation_losses, subsample_positives
from cls2det.students import Positives, StudentOutput

K, C = 6, 3


class StubTeacher:
    """A frozen teacher stand-in: logits from the crops' mean colour; taps obj (its input) and l0 (a 2x-strided
    grey map); records how many crops each call sees."""

    input_size = 8

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, crops):
        self.calls.append(("logits", len(crops)))
        return crops.mean(dim=(2, 3))  # [K, 3] = [K, C]

    def forward_taps(self, crops, taps):
        self.calls.append(("taps", len(crops)))
        found = {"obj": crops, "l0": crops.mean(dim=1, keepdim=True)[:, :, ::2, ::2].square()}
        return [found[t] for t in taps]


def make_output() -> StudentOutput:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    xy = torch.rand(K, 2, generator=g) * 16
    gt = torch.cat([xy, xy + 8 + torch.rand(K, 2, generator=g) * 6], dim=1)
    pred = (gt + torch.randn(K, 4, generator=g)).requires_grad_()
    logits = torch.randn(K, C + 1, generator=g).requires_grad_()
    positives = Positives(
        torch.tensor([0, 0, 0, 1, 1, 1]), gt, torch.tensor([0, 1, 2, 0, 1, 2]), logits, pred, "softmax"
    )
    return StudentOutput({}, positives, images, torch.zeros(3), torch.ones(3), image_sizes=[(32, 32)] * 2)


def test_cached_kd_cls_uses_every_positive_and_kd_loc_the_capped_subset():
    output, teacher = make_output(), StubTeacher()
    soft = torch.randn(K, C, generator=torch.Generator().manual_seed(1))
    seen = []

    def soft_labels(positives):
        seen.append(len(positives))
        return soft[: len(positives)]

    config = DistillConfig(kd=["cls", "kd_loc"], max_positives=2, sample_size=16)
    losses = distillation_losses(
        output, teacher, config, generator=torch.Generator().manual_seed(3), soft_labels=soft_labels
    )
    assert seen == [K]  # the cache lookup: all six positives
    expected_cls = kd_cls_loss(output.positives.logits, soft, output.positives.labels, head="softmax")
    assert losses["kd_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-6)
    assert teacher.calls == [("taps", 2), ("taps", 2)]  # KD_loc: predicted and GT crops of the 2 kept positives

    kept = subsample_positives(output.positives, 2, torch.Generator().manual_seed(3))
    expected_loc = kd_loc_loss(
        lambda crops: StubTeacher().forward_taps(crops, ["obj", "l0"]),
        output.images,
        sanitize_boxes(kept.pred_boxes, 32, 32),  # as the objective does
        kept.gt_boxes,
        kept.image_index,
        size=16,
        pools=[4, 8],
        is_pixel_level=[True, False],
    )
    assert losses["kd_loc"].item() == pytest.approx(expected_loc.item(), rel=1e-6)


def test_online_kd_cls_is_capped_like_kd_loc():
    output, teacher = make_output(), StubTeacher()
    config = DistillConfig(kd=["cls"], max_positives=2, soft_label_cache=False)
    distillation_losses(output, teacher, config, generator=torch.Generator().manual_seed(3))
    assert teacher.calls == [("logits", 2)]
