"""FCOS adapter: torchvision's own losses and assignment, differentiable positives, builder options."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList

from cls2det.config import StudentConfig
from cls2det.students.fcos import (
    FCOSAdapter,
    fcos_matched_idxs,
    fcos_mobilenet_v3_large_fpn,
    fcos_resnet50,
)
from cls2det.students.fcos import backbone_classifier as fcos_backbone_classifier
from cls2det.students.registry import backbone_classifier, create_student

SIZE = 128


@pytest.fixture(scope="module")
def model() -> FCOSAdapter:
    torch.manual_seed(0)
    return fcos_resnet50(3, StudentConfig(detector="fcos_resnet50", image_size=SIZE)).train()


def naive_decode(ltrb: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """FCOS boxes written out: the four side distances from the anchor centre, in units of the anchor side."""
    size = anchors[:, 2:3] - anchors[:, 0:1]  # [K, 1], square anchors
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    d = ltrb * size
    return torch.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], dim=1)


def check_against_stock(adapter, images, targets, stock_run):
    """Losses, matches and positives of ``adapter`` equal what the stock detector computes on the same batch."""
    out = adapter(images, targets)
    stock, seen = stock_run(adapter.detector, images, targets)
    assert out.losses.keys() == stock.keys() == {"classification", "bbox_regression", "bbox_ctrness"}
    for key in stock:
        torch.testing.assert_close(out.losses[key], stock[key], rtol=0, atol=1e-6)
    pos = out.positives
    assert pos.head == "sigmoid" and pos.logits.shape == (len(pos), 3)
    start = 0
    for i, matched in enumerate(seen["matched_idxs"]):
        fg = torch.where(matched >= 0)[0]
        rows = slice(start, start + fg.numel())
        start += fg.numel()
        gt = matched[fg]
        assert (pos.image_index[rows] == i).all()
        assert torch.equal(pos.labels[rows], targets[i]["labels"][gt])
        assert torch.equal(pos.gt_boxes[rows], seen["targets"][i]["boxes"][gt])
        torch.testing.assert_close(pos.logits[rows], seen["head_outputs"]["cls_logits"][i, fg], rtol=0, atol=1e-6)
        ltrb, anchors = seen["head_outputs"]["bbox_regression"][i, fg], seen["anchors"][i][fg]
        torch.testing.assert_close(pos.pred_boxes[rows], naive_decode(ltrb, anchors), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(pos.pred_boxes[rows], adapter.detector.box_coder.decode(ltrb, anchors))
    assert start == len(pos)
    return out, seen


@torch.no_grad()  # equality checks only; saves the autograd graph
def test_losses_and_positives_match_torchvision(model, tiny_batch, stock_run):
    images, targets = tiny_batch
    out, seen = check_against_stock(model, images, targets, stock_run)
    for i, matched in enumerate(seen["matched_idxs"]):  # every GT box of the batch has a positive location
        assert set(matched[matched >= 0].tolist()) == set(range(len(targets[i]["labels"])))
    torch.testing.assert_close(out.image_std, torch.tensor([0.229, 0.224, 0.225]))
    assert out.images.shape == (2, 3, SIZE, SIZE)


def test_assignment_equals_torchvision_on_random_boxes(model):
    """The reproduced center-sampling assignment vs the one ``FCOS.compute_loss`` makes, on many overlapping boxes
    of all scales (so every level and the smallest-area tie-break are exercised), without running the network."""
    det = model.detector
    features = [torch.zeros(2, 1, 512 // s, 512 // s) for s in (8, 16, 32, 64, 128)]
    anchors = det.anchor_generator(ImageList(torch.zeros(2, 3, 512, 512), [(512, 512)] * 2), features)
    num_per_level = [f.shape[2] * f.shape[3] for f in features]
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(2):
        xy = torch.rand(20, 2, generator=g) * 400
        wh = 8 + torch.rand(20, 2, generator=g) ** 2 * 500
        boxes = torch.cat([xy, (xy + wh).clamp(max=512)], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, 3, (20,), generator=g)})
    num = sum(num_per_level)
    head_outputs = {
        "cls_logits": torch.zeros(2, num, 3),
        "bbox_regression": torch.zeros(2, num, 4),
        "bbox_ctrness": torch.zeros(2, num, 1),
    }
    seen = []
    compute_loss = det.head.compute_loss
    det.head.compute_loss = lambda t, h, a, matched: seen.append(matched) or compute_loss(t, h, a, matched)
    try:
        det.compute_loss(targets, head_outputs, anchors, num_per_level)
    finally:
        del det.head.compute_loss
    ours = fcos_matched_idxs(anchors, targets, num_per_level, det.center_sampling_radius)
    for theirs, mine in zip(seen[0], ours):
        assert torch.equal(theirs, mine)
    level = torch.repeat_interleave(torch.arange(5), torch.tensor(num_per_level))
    assert len(set(level[ours[0] >= 0].tolist())) >= 4  # positives on at least 4 of the 5 levels


@torch.no_grad()  # equality checks only; saves the autograd graph
def test_anchor_sizes_change_the_assignment_and_keep_torchvision_losses(tiny_batch, stock_run):
    torch.manual_seed(0)
    config = StudentConfig(detector="fcos_resnet50", image_size=SIZE, anchor_sizes=[4, 8, 16, 32, 64])
    adapter = create_student("fcos_resnet50", 3, config).train()
    assert adapter.detector.anchor_generator.sizes == ((4,), (8,), (16,), (32,), (64,))
    images, targets = tiny_batch
    out, seen = check_against_stock(adapter, images, targets, stock_run)
    side = seen["anchors"][0][:, 2] - seen["anchors"][0][:, 0]
    assert set(side.tolist()) == {4.0, 8.0, 16.0, 32.0, 64.0}
    centers = (seen["anchors"][0][:, :2] + seen["anchors"][0][:, 2:]) / 2
    assert torch.equal(centers[:256], torch.cartesian_prod(torch.arange(16.0), torch.arange(16.0))[:, [1, 0]] * 8)


@torch.no_grad()  # equality checks only; saves the autograd graph
def test_empty_image_in_batch(model, batch_with_empty_image, stock_run):
    images, targets = batch_with_empty_image
    out, seen = check_against_stock(model, images, targets, stock_run)
    assert (seen["matched_idxs"][2] == -1).all()
    assert len(out.positives) > 0 and not (out.positives.image_index == 2).any()


def test_eval_returns_zero_based_detections(model, tiny_batch):
    adapter = copy.deepcopy(model).eval()
    with torch.no_grad():  # class 2 (0-based) the only one above FCOS's score threshold
        adapter.detector.head.classification_head.cls_logits.bias[2] = 4.0
        detections = adapter(tiny_batch[0])
    for det, image in zip(detections, tiny_batch[0]):
        assert det["labels"].numel() > 0 and (det["labels"] == 2).all()
        h, w = image.shape[1:]
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()


def test_builder_options():
    adapter = fcos_resnet50(4, StudentConfig(detector="fcos_resnet50", image_size=96))
    assert isinstance(adapter, FCOSAdapter) and adapter.head == "sigmoid" and adapter.label_offset == 0
    det = adapter.detector
    assert det.head.classification_head.num_classes == 4
    assert det.transform.min_size == (96,) and det.transform.max_size == 96
    assert det.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))  # stock: the strides
    with pytest.raises(ValueError, match=r"anchor_sizes: fcos_resnet50 needs 5 positive sizes"):
        fcos_resnet50(4, StudentConfig(anchor_sizes=[8, 16, 32, 64]))
    with pytest.raises(ValueError, match=r"student.anchor_sizes must be > 0, got 0"):  # refused by the config already
        StudentConfig(anchor_sizes=[8, 16, 32, 64, 0])


def test_bf16_autocast_decodes_pred_boxes_in_float32(model, tiny_batch):
    """Under bf16 autocast the head's regression is bf16; decoding it in bf16 would round the boxes (0.25 px at
    128 px, 2 px at 800 px). Every positive's box must be the float32 decode of its location's bf16 output."""
    det = model.detector
    seen = {}
    hooks = [
        det.head.register_forward_hook(lambda m, i, o: seen.update(head=o)),
        det.anchor_generator.register_forward_hook(lambda m, i, o: seen.update(anchors=o)),
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*tiny_batch)
    finally:
        for hook in hooks:
            hook.remove()
    pos = out.positives
    regression = seen["head"]["bbox_regression"]
    assert regression.dtype == torch.bfloat16 and pos.pred_boxes.dtype == torch.float32
    assert all(torch.isfinite(v) for v in out.losses.values())
    for i in range(2):
        ref = naive_decode(regression[i].float(), seen["anchors"][i])  # [A, 4] every location, float32
        mine = pos.pred_boxes[pos.image_index == i]  # [K_i, 4]
        dist = (mine[:, None, :] - ref[None, :, :]).abs().amax(dim=2).amin(dim=1)  # [K_i] to the nearest location
        assert dist.max() < 1e-4


# --- FCOS over a MobileNetV3-Large FPN: the small sigmoid student ---------------------------------------------


def stock_fcos_mobilenet(backbone: nn.Module, num_classes: int) -> FCOS:
    """The detector assembled from torchvision's public parts: ``mobilenet_backbone`` (FPN on the stride-8 and
    stride-16 stage starts and the last conv, P6/P7 from P5) under a stock :class:`FCOS`."""
    return FCOS(backbone, num_classes, min_size=SIZE, max_size=SIZE)


@torch.no_grad()  # equality checks only
def test_fcos_mobilenet_equals_a_stock_fcos_over_torchvisions_mobilenet_fpn(tiny_batch, stock_run, p3_p7_backbone):
    torch.manual_seed(0)
    adapter = create_student("fcos_mobilenet_v3", 3, StudentConfig(detector="fcos_mobilenet_v3", image_size=SIZE))
    stock = stock_fcos_mobilenet(p3_p7_backbone(), 3)
    stock.load_state_dict(adapter.detector.state_dict())  # strict: the same modules, names and shapes
    adapter.train()
    images, targets = tiny_batch
    out, _ = check_against_stock(adapter, images, targets, stock_run)
    stock_losses, _ = stock_run(stock.train(), images, targets)
    for key in stock_losses:
        torch.testing.assert_close(out.losses[key], stock_losses[key], rtol=0, atol=1e-6)
    assert [f.shape[-1] for f in out.features] == [16, 8, 4, 2, 1]  # P3..P7 at strides 8..128 on 128 px
    assert isinstance(adapter, FCOSAdapter) and adapter.head == "sigmoid"
    assert adapter.detector.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))  # torchvision's default


def test_fcos_mobilenet_local_backbone_weights_and_errors(tmp_path):
    torch.manual_seed(0)
    classifier = backbone_classifier("fcos_mobilenet_v3", 10)
    with torch.no_grad():
        classifier.features[16][1].running_mean.uniform_(-1, 1)  # distinct BatchNorm statistics
    save_file(classifier.state_dict(), tmp_path / "mv3.safetensors")
    name = "fcos_mobilenet_v3"
    config = StudentConfig(detector=name, image_size=SIZE, backbone_weights=str(tmp_path / "mv3.safetensors"))
    body = create_student(name, 3, config).detector.backbone.body
    torch.testing.assert_close(body["16"][1].running_mean, classifier.features[16][1].running_mean, rtol=0, atol=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())  # frozen, as a pretrained backbone
    trainable = {int(n.split(".")[0]) for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == set(range(7, 17))  # the last 3 of the stages at features 0, 2, 4, 7, 13, 16
    assert backbone_classifier("fcos_resnet50", 5).fc.out_features == 5
    with pytest.raises(ValueError, match="unknown FCOS detector 'fcos_x'"):
        fcos_backbone_classifier("fcos_x")
    with pytest.raises(ValueError, match="fcos_mobilenet_v3 has no pretrained detection weights"):
        fcos_mobilenet_v3_large_fpn(weights="COCO_V1")
    with pytest.raises(ValueError, match=r"anchor_sizes: fcos_mobilenet_v3 needs 5 positive sizes"):
        create_student(name, 3, StudentConfig(detector=name, anchor_sizes=[8, 16]))
