"""RetinaNet over a MobileNetV3-Large FPN: the same detector as one built by hand from torchvision's parts, its
losses and positives, and the backbone weights (ImageNet path, local state dict, freezing)."""

from __future__ import annotations

import urllib.error
from functools import partial

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d, box_iou

from cls2det.config import StudentConfig
from cls2det.errors import WeightsError
from cls2det.students.registry import backbone_classifier, create_student
from cls2det.students.retinanet import (
    RetinaNetAdapter,
    retinanet_anchor_generator,
    retinanet_mobilenet_v3,
    retinanet_mobilenet_v3_large_fpn,
)
from cls2det.students.retinanet import backbone_classifier as retinanet_backbone_classifier

SIZE = 128
SIZES = [12, 24, 48, 96, 192]
NAME = "retinanet_mobilenet_v3"


def build(**config) -> RetinaNetAdapter:
    return retinanet_mobilenet_v3(3, StudentConfig(detector=NAME, image_size=SIZE, **config))


@pytest.fixture(scope="module")
def model() -> RetinaNetAdapter:
    torch.manual_seed(0)
    return build(anchor_sizes=SIZES).train()


def stock_detector(backbone: nn.Module, anchor_sizes: list[int], **kwargs) -> RetinaNet:
    """The detector assembled from torchvision's public parts: ``mobilenet_backbone`` (FPN on the stride-8 and
    stride-16 stage starts and the last conv, P6/P7 from P5) under a stock :class:`RetinaNet`."""
    anchors = retinanet_anchor_generator(anchor_sizes)
    return RetinaNet(backbone, 3, anchor_generator=anchors, min_size=SIZE, max_size=SIZE, **kwargs)


def naive_decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The R-CNN box parametrisation written out: centre shift in anchor units, log-scale size (weights 1)."""
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + w / 2, anchors[:, 1] + h / 2
    pcx, pcy = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
    pw, ph = w * deltas[:, 2].exp(), h * deltas[:, 3].exp()
    return torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], dim=1)


@torch.no_grad()  # equality checks only
def test_losses_and_positives_equal_a_stock_retinanet_with_the_same_weights(
    model, tiny_batch, stock_run, p3_p7_backbone
):
    stock = stock_detector(p3_p7_backbone(), SIZES).train()
    stock.load_state_dict(model.detector.state_dict())  # strict: the same modules, names and shapes
    images, targets = tiny_batch
    out = model(images, targets)
    stock_losses, seen = stock_run(stock, images, targets)
    assert out.losses.keys() == stock_losses.keys() == {"classification", "bbox_regression"}
    for key in stock_losses:
        torch.testing.assert_close(out.losses[key], stock_losses[key], rtol=0, atol=1e-6)
    # 5 levels P3..P7 at strides 8..128: 16, 8, 4, 2, 1 cells on the 128-px batch, 9 anchors each
    assert [f.shape[-1] for f in out.features] == [16, 8, 4, 2, 1]
    assert model.detector.anchor_generator.sizes[0] == (12, 15, 19)

    pos = out.positives
    assert pos.head == "sigmoid" and pos.logits.shape == (len(pos), 3)
    start = 0
    for i, matched in enumerate(seen["matched_idxs"]):
        fg = torch.where(matched >= 0)[0]
        rows = slice(start, start + fg.numel())
        start += fg.numel()
        gt = matched[fg]
        assert set(gt.tolist()) == set(range(len(targets[i]["labels"])))  # every GT has a positive
        assert (pos.image_index[rows] == i).all()
        assert torch.equal(pos.labels[rows], targets[i]["labels"][gt])
        assert torch.equal(pos.gt_boxes[rows], seen["targets"][i]["boxes"][gt])
        torch.testing.assert_close(pos.logits[rows], seen["head_outputs"]["cls_logits"][i, fg], rtol=0, atol=1e-6)
        regression = seen["head_outputs"]["bbox_regression"][i, fg]
        expected = naive_decode(regression, seen["anchors"][i][fg])
        torch.testing.assert_close(pos.pred_boxes[rows], expected, rtol=1e-5, atol=1e-4)
    assert start == len(pos) > 0


def test_a_zero_regression_decodes_to_the_anchor_and_pred_boxes_are_differentiable(tiny_batch):
    adapter = build(anchor_sizes=SIZES).train()
    reg = adapter.detector.head.regression_head.bbox_reg
    with torch.no_grad():
        reg.weight.zero_()
        reg.bias.zero_()
    out = adapter(*tiny_batch)
    pos = out.positives
    anchors = adapter.detector.anchor_generator(ImageList(out.images, out.image_sizes), out.features)[0]  # [A, 4]
    torch.testing.assert_close(pos.pred_boxes.detach(), anchors[pos.anchor_index], rtol=0, atol=1e-4)
    # each positive's anchor overlaps its GT box (IoU >= 0.5, or the GT's best anchor: > 0.3 with these sizes)
    assert (box_iou(pos.pred_boxes.detach(), pos.gt_boxes).diagonal() > 0.3).all()
    pos.pred_boxes.sum().backward()
    assert reg.weight.grad.abs().sum() > 0
    assert adapter.detector.head.classification_head.cls_logits.weight.grad is None


def test_builder_options_and_errors():
    adapter = create_student(NAME, 4, StudentConfig(detector=NAME, image_size=160, anchor_sizes=[16, 32, 64, 128, 256]))
    det = adapter.detector
    assert isinstance(adapter, RetinaNetAdapter) and adapter.head == "sigmoid" and adapter.label_offset == 0
    assert det.head.classification_head.num_classes == 4
    assert det.transform.min_size == (160,) and det.transform.max_size == 160
    assert det.anchor_generator.sizes[0] == (16, 20, 25) and det.anchor_generator.sizes[4] == (256, 322, 406)
    stock = retinanet_mobilenet_v3(4, StudentConfig(detector=NAME))
    assert stock.detector.anchor_generator.sizes[0] == (32, 40, 50)  # torchvision's RetinaNet default
    assert stock.detector.transform.min_size == (800,)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in stock.detector.modules())  # random init: BatchNorm
    assert all(p.requires_grad for p in stock.detector.parameters())
    with pytest.raises(ValueError, match=r"anchor_sizes: retinanet_mobilenet_v3 needs 5 positive sizes"):
        build(anchor_sizes=[16, 32])
    with pytest.raises(ValueError, match="num_classes must be > 0"):
        retinanet_mobilenet_v3(0, StudentConfig())
    with pytest.raises(ValueError, match="no pretrained detection weights"):
        retinanet_mobilenet_v3_large_fpn(weights="COCO_V1")
    with pytest.warns(UserWarning, match="trainable_backbone_layers has no effect"):
        build(trainable_backbone_layers=2)


def _patch_download(monkeypatch, state_or_error):
    """torchvision's pretrained-backbone path fetches through ``torchvision.models._api.load_state_dict_from_url``."""

    def fake(url, *args, **kwargs):
        if isinstance(state_or_error, Exception):
            raise state_or_error
        return {k: v.clone() for k, v in state_or_error.items()}

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", fake)


@pytest.mark.parametrize("trainable", [None, 2])
def test_local_backbone_weights_equal_torchvisions_pretrained_path(tmp_path, monkeypatch, trainable):
    torch.manual_seed(0)
    # the study's backbone pre-training saves this classifier's state dict; 1000 classes as torchvision's download
    classifier = backbone_classifier(NAME, 1000)
    with torch.no_grad():
        classifier.features[16][1].running_mean.uniform_(-1, 1)  # distinct BatchNorm statistics
    state = classifier.state_dict()
    save_file({f"model.{k}": v for k, v in state.items()}, tmp_path / "mv3.safetensors")  # a prefix is stripped
    ours = build(backbone_weights=str(tmp_path / "mv3.safetensors"), trainable_backbone_layers=trainable)
    _patch_download(monkeypatch, state)
    ref = build(backbone_weights="imagenet", trainable_backbone_layers=trainable)
    body, ref_body = ours.detector.backbone.body, ref.detector.backbone.body
    assert body.state_dict().keys() == ref_body.state_dict().keys()
    for key, value in ref_body.state_dict().items():
        torch.testing.assert_close(body.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(body["16"][1].running_mean, state["features.16.1.running_mean"], rtol=0, atol=0)
    assert [type(m) for m in body.modules()] == [type(m) for m in ref_body.modules()]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    grads = {n: p.requires_grad for n, p in body.named_parameters()}
    assert grads == {n: p.requires_grad for n, p in ref_body.named_parameters()}
    # stages start at features 0, 2, 4, 7, 13, 16 (stem, strided blocks, last conv): the last 3 (default) or 2 train
    first = 7 if trainable is None else 13
    assert {int(n.split(".")[0]) for n, g in grads.items() if g} == set(range(first, 17))


def test_backbone_weight_errors(tmp_path, monkeypatch):
    state = backbone_classifier(NAME, 10).state_dict()
    state["features.3.block.0.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt: features.3.block.0.0.weight has shape \(1, 1, 1, 1\)"):
        build(backbone_weights=str(tmp_path / "bad.pt"))
    torch.save(backbone_classifier("ssdlite320_mobilenet_v3", 10).state_dict(), tmp_path / "reduced.pt")
    reduced = r"reduced.pt: features.13.block.3.0.weight has shape \(80, 672, 1, 1\), expected \(160, 672, 1, 1\)"
    with pytest.raises(ValueError, match=reduced):
        build(backbone_weights=str(tmp_path / "reduced.pt"))  # SSDlite's reduced-tail layout is not this one
    _patch_download(monkeypatch, urllib.error.URLError("no network"))
    with pytest.raises(WeightsError, match="backbone_weights='imagenet': could not load .*no network") as err:
        build(backbone_weights="imagenet")
    assert "\n" not in str(err.value)
    assert backbone_classifier("retinanet_resnet50", 5).fc.out_features == 5  # the ResNet RetinaNet's, for the study
    assert backbone_classifier(NAME, 5).classifier[-1].out_features == 5
    with pytest.raises(ValueError, match="unknown RetinaNet detector 'retinanet_x'"):
        retinanet_backbone_classifier("retinanet_x")


@torch.no_grad()  # equality checks only
def test_head_v2_equals_torchvisions_v2_head_and_bad_versions_are_refused(tiny_batch, stock_run, p3_p7_backbone):
    torch.manual_seed(0)
    config = StudentConfig(detector=NAME, image_size=SIZE, anchor_sizes=SIZES, options={"head": "v2"})
    adapter = create_student(NAME, 3, config).train()  # options reach the builder as keyword arguments
    head = RetinaNetHead(256, 9, 3, norm_layer=partial(nn.GroupNorm, 32))  # as retinanet_resnet50_fpn_v2 builds it
    head.regression_head._loss_type = "giou"
    stock = stock_detector(p3_p7_backbone(), SIZES, head=head).train()
    stock.load_state_dict(adapter.detector.state_dict())  # strict: GroupNorm after each of the 4+4 convs
    images, targets = tiny_batch
    out = adapter(images, targets)
    stock_losses, _ = stock_run(stock, images, targets)
    for key in stock_losses:
        torch.testing.assert_close(out.losses[key], stock_losses[key], rtol=0, atol=1e-6)
    assert sum(isinstance(m, nn.GroupNorm) for m in adapter.detector.head.modules()) == 8
    assert adapter.detector.head.regression_head._loss_type == "giou"
    v1 = build(anchor_sizes=SIZES).detector.head  # the default: torchvision's v1 head, smooth L1
    assert not any(isinstance(m, nn.GroupNorm) for m in v1.modules()) and v1.regression_head._loss_type == "l1"
    own = retinanet_anchor_generator([16, 32, 64, 128, 256])  # a Python user's own option is passed through
    mine = create_student(NAME, 3, StudentConfig(detector=NAME, options={"anchor_generator": own, "head": "v2"}))
    assert mine.detector.anchor_generator is own
    with pytest.raises(ValueError, match=r"student.options.head must be 'v1' or 'v2', got 'v3'"):
        create_student(NAME, 3, StudentConfig(detector=NAME, options={"head": "v3"}))
