"""The det2det terms of the objective (``det2det_losses`` via ``distillation_losses``) on real adapter outputs:
values against direct computations, gradients to the student only, weights in the total loss."""

from __future__ import annotations

import math

import pytest
import torch

from cls2det.config import DistillConfig, StudentConfig
from cls2det.distill import fgfi_level_masks, logit_kd_loss, pkd_loss
from cls2det.engine.objective import distillation_losses, loss_weights, total_loss
from cls2det.students import create_student

NUM_CLASSES = 3
ALL = ["det:logit", "det:fgfi", "det:pkd"]
OPTIONS = {
    "fasterrcnn_mobilenet_v3": {
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "box_batch_size_per_image": 64,
    }
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def batch(count: int = 2):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 128, 112, generator=g)][:count]
    targets = [
        {"boxes": torch.tensor([[10.0, 8.0, 58.0, 70.0], [64.0, 30.0, 120.0, 90.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[4.0, 10.0, 40.0, 50.0], [50.0, 60.0, 104.0, 124.0]]), "labels": torch.tensor([1, 2])},
    ][:count]
    return images, targets


def pair(name: str):
    """(student in train mode, an independently initialised frozen teacher of the same detector)."""
    config = StudentConfig(detector=name, image_size=128, options=OPTIONS.get(name, {}))
    torch.manual_seed(0)
    student = create_student(name, NUM_CLASSES, config).train()
    torch.manual_seed(1)
    teacher = create_student(name, NUM_CLASSES, config).eval().requires_grad_(False)
    return student, teacher


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3", "fasterrcnn_mobilenet_v3"])
def test_det_terms_against_direct_computations(name):
    student, teacher = pair(name)
    output = student(*batch())
    config = DistillConfig(kd=ALL, max_positives=10_000)  # no subsampling: all positives
    losses = distillation_losses(output, None, config, det_teacher=teacher)
    assert set(losses) == {"det_logit", "det_fgfi", "det_pkd"}
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in losses.values()), losses

    teacher_maps = list(teacher.detector.backbone(output.images).values())  # the teacher's own forward
    expected_pkd = sum(pkd_loss(s, t) for s, t in zip(output.features, teacher_maps))
    assert losses["det_pkd"].item() == pytest.approx(expected_pkd.item(), rel=1e-5)

    # FGFI, levels pooled: sum of masked squared differences over every level / (2 * masked locations)
    num, den = 0.0, 0.0
    per_image = [fgfi_level_masks(gt, output.level_anchors, 0.5) for gt in output.gt_boxes]
    for level, (s, t) in enumerate(zip(output.features, teacher_maps)):
        mask = torch.stack([masks[level] for masks in per_image]).float()  # [N, H, W]
        num += ((s - t) ** 2 * mask[:, None]).sum().item()
        den += mask.sum().item()
    assert den > 0 and losses["det_fgfi"].item() == pytest.approx(num / (2 * den), rel=1e-5)

    positives = output.positives
    expected_logit = logit_kd_loss(positives.logits, teacher.teach(output, positives).logits, head="softmax")
    assert losses["det_logit"].item() == pytest.approx(expected_logit.item(), rel=1e-6)

    # the weighted total, and gradients that reach the student's backbone and nothing of the teacher
    total = total_loss(output.losses, losses, loss_weights(config))
    expected_total = sum(output.losses.values()) + sum(
        getattr(config, f"lambda_{name}") * value for name, value in losses.items()
    )
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    assert (config.lambda_det_logit, config.lambda_det_fgfi, config.lambda_det_pkd) == (1.0, 0.01, 6.0)
    sum(losses.values()).backward()  # the det terms alone
    backbone = [p for p in student.detector.backbone.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_each_term_alone_and_its_gradient_source():
    """det:logit reaches the student through its class logits only; the feature terms through its feature maps."""
    student, teacher = pair("ssdlite320_mobilenet_v3")
    for term, key in (("det:logit", "det_logit"), ("det:pkd", "det_pkd"), ("det:fgfi", "det_fgfi")):
        student.zero_grad(set_to_none=True)
        output = student(*batch())
        losses = distillation_losses(output, None, DistillConfig(kd=[term]), det_teacher=teacher)
        assert list(losses) == [key]
        losses[key].backward()
        head_grad = student.detector.head.classification_head.module_list[0][0][0].weight.grad
        if term == "det:logit":
            assert head_grad is not None and head_grad.abs().sum() > 0
        else:  # feature imitation does not touch the head
            assert head_grad is None or head_grad.abs().sum() == 0


def test_pkd_skips_maps_without_two_values_per_channel():
    student, teacher = pair("ssdlite320_mobilenet_v3")
    # SSDlite at 128 px: its last three maps are 1x1 (eval mode: BatchNorm itself refuses that batch in training,
    # not every detector's last maps have a BatchNorm, e.g. the FPN's pool level)
    output = student.eval().forward_train(*batch(count=1))
    assert [f.shape[-1] for f in output.features][-3:] == [1, 1, 1]
    losses = distillation_losses(output, None, DistillConfig(kd=["det:pkd"]), det_teacher=teacher)
    maps = list(teacher.detector.backbone(output.images).values())
    expected = sum(pkd_loss(s, t) for s, t in zip(output.features[:3], maps[:3]))
    assert losses["det_pkd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_det_terms_need_a_detector_teacher():
    student, _ = pair("ssdlite320_mobilenet_v3")
    output = student(*batch())
    with pytest.raises(ValueError, match="det:pkd needs a detector teacher"):
        distillation_losses(output, None, DistillConfig(kd=["det:pkd"]))
    assert distillation_losses(output, None, DistillConfig(kd=[])) == {}
