"""Negatives (for KD_cls on negatives): every family returns, only when asked, a capped uniform sample of exactly the
anchors / proposals its stock torchvision detector labels background, with differentiable logits, drawn
deterministically from the seeded RNG and without changing what the detector computes."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from cls2det.config import StudentConfig
from cls2det.students import create_student
from cls2det.students.forward_steps import sample_rows

SIZES = {"ssdlite320_mobilenet_v3": 128, "retinanet_resnet50": 96, "fcos_resnet50": 96, "fasterrcnn_mobilenet_v3": 128}
OPTIONS = {
    "fasterrcnn_mobilenet_v3": {
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 150,
        "box_batch_size_per_image": 64,
    }
}
ALL = 10**9  # a cap above any count: every negative


@pytest.fixture(scope="module", params=list(SIZES))
def student(request):
    name = request.param
    torch.manual_seed(0)
    config = StudentConfig(detector=name, image_size=SIZES[name], options=OPTIONS.get(name, {}))
    return create_student(name, 3, config).train()


def forward(student, batch, max_negatives: int, seed: int):
    student.max_negatives = max_negatives
    torch.manual_seed(seed)
    try:
        return student(*batch)
    finally:
        student.max_negatives = 0


def stock_background(student, images, targets, seed: int) -> dict[str, torch.Tensor]:
    """The stock torchvision forward (same seed, so Faster R-CNN's samplers draw alike), read at the point where the
    detector decides background: ``image_index``, ``anchor_index`` (dense heads), ``boxes`` and ``logits`` of every
    anchor matched to -1 (dense heads) or every sampled proposal labelled 0 (Faster R-CNN), in batch order."""
    det, seen = student.detector, {}
    targets = student.to_detector_targets(targets)
    torch.manual_seed(seed)
    if student.dense_head:  # SSD computes its loss on the detector, RetinaNet / FCOS on the head
        owner = det if isinstance(det, SSD) else det.head
        compute_loss = owner.compute_loss

        def spy(targets, head_outputs, anchors, matched_idxs):
            seen.update(logits=head_outputs["cls_logits"], anchors=anchors, matched=matched_idxs)
            return compute_loss(targets, head_outputs, anchors, matched_idxs)

        owner.compute_loss = spy
        try:
            det(images, targets)
        finally:
            del owner.compute_loss
        image_index, anchor_index = torch.where(torch.stack(seen["matched"]) == -1)
        return {
            "image_index": image_index,
            "anchor_index": anchor_index,
            "boxes": torch.stack(seen["anchors"])[image_index, anchor_index],
            "logits": seen["logits"][image_index, anchor_index],
        }
    heads = det.roi_heads
    select = heads.select_training_samples

    def spy_select(proposals, targets):
        out = select(proposals, targets)
        seen.update(proposals=out[0], labels=out[2])
        return out

    heads.select_training_samples = spy_select
    hook = heads.box_predictor.register_forward_hook(lambda module, inputs, out: seen.update(logits=out[0]))
    try:
        det(images, targets)
    finally:
        del heads.select_training_samples
        hook.remove()
    rows = torch.where(torch.cat(seen["labels"]) == 0)[0]
    image_index = torch.cat([torch.full_like(label, i) for i, label in enumerate(seen["labels"])])[rows]
    return {"image_index": image_index, "boxes": torch.cat(seen["proposals"])[rows], "logits": seen["logits"][rows]}


def test_none_unless_asked_and_the_detector_computes_the_same(student, tiny_batch):
    off = forward(student, tiny_batch, 0, seed=3)
    on = forward(student, tiny_batch, 16, seed=3)
    assert off.negatives is None and len(on.negatives) == 16
    assert on.negatives.head == student.head and on.negatives.logits.shape == (16, off.positives.logits.shape[1])
    assert not on.negatives.boxes.requires_grad
    # drawn after the detector's own sampling: same losses and positives as without negatives
    assert all(torch.equal(on.losses[k], off.losses[k]) for k in off.losses)
    assert torch.equal(on.positives.logits, off.positives.logits)


@torch.no_grad()
def test_negatives_are_the_stock_detectors_background(student, batch_with_empty_image):
    images, targets = batch_with_empty_image  # image 2 has no boxes: all of it is background
    out = forward(student, (images, targets), ALL, seed=1)
    expected = stock_background(student, images, targets, seed=1)
    neg = out.negatives
    assert len(neg) == len(expected["image_index"]) > 0 and (neg.image_index == 2).any()
    assert torch.equal(neg.image_index, expected["image_index"])
    if student.dense_head:
        assert torch.equal(neg.anchor_index, expected["anchor_index"])
    else:
        assert neg.anchor_index is None
    torch.testing.assert_close(neg.boxes, expected["boxes"], rtol=0, atol=1e-6)
    torch.testing.assert_close(neg.logits, expected["logits"], rtol=0, atol=1e-6)
    # and, independently of the matcher, what background means for the IoU-matched families
    threshold = {"SSDAdapter": 0.5, "RetinaNetAdapter": 0.4, "FasterRCNNAdapter": 0.5}.get(type(student).__name__)
    if threshold is not None:
        for i, gt in enumerate(out.gt_boxes):
            if len(gt):
                assert box_iou(neg.boxes[neg.image_index == i], gt).max() < threshold


def test_capped_sample_is_seeded_and_from_the_background(student, tiny_batch):
    everything = forward(student, tiny_batch, ALL, seed=0).negatives
    a, b = (forward(student, tiny_batch, 16, seed=0).negatives for _ in range(2))
    c = forward(student, tiny_batch, 16, seed=1).negatives
    assert len(a) == len(c) == 16 < len(everything)
    assert torch.equal(a.image_index, b.image_index) and torch.equal(a.boxes, b.boxes)
    assert torch.equal(a.logits, b.logits)
    assert not torch.equal(a.boxes, c.boxes)  # another seed draws other negatives
    if student.dense_head:  # every sampled anchor is one of the background anchors
        background = set(zip(everything.image_index.tolist(), everything.anchor_index.tolist()))
        assert set(zip(a.image_index.tolist(), a.anchor_index.tolist())) <= background


def test_gradients_reach_the_classification_head(student, tiny_batch):
    student.zero_grad()
    forward(student, tiny_batch, 16, seed=0).negatives.logits.square().sum().backward()
    det = student.detector
    head = det.roi_heads.box_predictor.cls_score if not student.dense_head else det.head.classification_head
    assert sum(p.grad.abs().sum() for p in head.parameters() if p.grad is not None) > 0
    student.zero_grad()


def test_sample_rows_is_uniform_capped_and_seeded():
    mask = torch.zeros(20, dtype=torch.bool)
    mask[::2] = True  # 10 candidates
    first = sample_rows(mask, 3, torch.Generator().manual_seed(5))
    assert torch.equal(first, sample_rows(mask, 3, torch.Generator().manual_seed(5)))
    assert len(first) == 3 and mask[first].all() and torch.equal(first, first.sort().values)
    assert torch.equal(sample_rows(mask, 50), torch.arange(0, 20, 2))  # fewer candidates than the cap: all of them
    assert sample_rows(mask, 0).numel() == 0
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([sample_rows(mask, 3, g) for _ in range(2000)]), minlength=20).float() / 2000
    assert counts[1::2].sum() == 0 and (counts[::2] - 0.3).abs().max() < 0.05  # each candidate 3/10 of the time
