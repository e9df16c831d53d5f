"""Faster R-CNN adapter: torchvision's own losses, positives = the RoI sampler's foreground proposals."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d, box_iou

from cls2det.config import StudentConfig
from cls2det.errors import WeightsError
from cls2det.students.faster_rcnn import (
    backbone_classifier,
    fasterrcnn_mobilenet_v3,
    fasterrcnn_resnet50,
    rpn_anchor_sizes,
)

# Fewer RPN proposals / sampled RoIs than torchvision's defaults keep the tests fast; stock and adapter share them.
SMALL = {
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 150,
    "box_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
}
BUILDERS = {"mv3": fasterrcnn_mobilenet_v3, "r50": fasterrcnn_resnet50}


def build(kind: str = "mv3", **config):
    return BUILDERS[kind](3, StudentConfig(detector="x", image_size=128, **config), **SMALL)


@pytest.fixture(scope="module")
def mv3():
    torch.manual_seed(0)
    return build("mv3")


def naive_decode(rel: torch.Tensor, boxes: torch.Tensor, weights=(10.0, 10.0, 5.0, 5.0)) -> torch.Tensor:
    """R-CNN box decoding written out: (dx, dy, dw, dh) / weights applied to xyxy ``boxes``; dw, dh clipped."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = rel[:, 0] / weights[0], rel[:, 1] / weights[1]
    dw = (rel[:, 2] / weights[2]).clamp(max=math.log(1000.0 / 16))
    dh = (rel[:, 3] / weights[3]).clamp(max=math.log(1000.0 / 16))
    px, py, pw, ph = dx * w + cx, dy * h + cy, dw.exp() * w, dh.exp() * h
    return torch.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], dim=1)


def run_stock_rcnn(detector, images, targets) -> tuple[dict, dict]:
    """The stock train-mode forward, recording the RoI sampler's output and the box predictor's output."""
    seen: dict = {}
    heads = detector.roi_heads
    select = heads.select_training_samples

    def spy(proposals, targets):
        out = select(proposals, targets)
        seen.update(targets=targets, proposals=out[0], matched_idxs=out[1], labels=out[2])
        return out

    heads.select_training_samples = spy  # instance attribute shadows the method for this call only
    hook = heads.box_predictor.register_forward_hook(
        lambda module, inputs, out: seen.update(class_logits=out[0], box_regression=out[1])
    )
    try:
        losses = detector(images, targets)
    finally:
        del heads.select_training_samples
        hook.remove()
    return losses, seen


def assert_same_losses(adapter, images, targets, seed: int = 0):
    adapter.train()
    torch.manual_seed(seed)
    out = adapter(images, targets)
    torch.manual_seed(seed)
    ref, seen = run_stock_rcnn(adapter.detector, images, adapter.to_detector_targets(targets))
    assert set(out.losses) == set(ref) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for key in ref:
        torch.testing.assert_close(out.losses[key], ref[key], rtol=0, atol=1e-6)
    return out, seen


def test_losses_equal_stock_detector(mv3, tiny_batch):
    assert_same_losses(mv3, *tiny_batch)


@pytest.mark.slow
def test_resnet50_losses_and_positives_equal_stock(tiny_batch):
    torch.manual_seed(0)
    out, seen = assert_same_losses(build("r50"), *tiny_batch)
    assert len(out.positives) == int(sum((label > 0).sum() for label in seen["labels"])) > 0


def test_positives_are_the_samplers_foreground(mv3, tiny_batch):
    out, seen = assert_same_losses(mv3, *tiny_batch, seed=1)
    pos = out.positives
    labels, matched = seen["labels"], seen["matched_idxs"]
    fg = [torch.where(label > 0)[0] for label in labels]
    assert len(pos) == sum(len(f) for f in fg) > 0
    assert pos.head == "softmax" and pos.logits.shape == (len(pos), 4)
    torch.testing.assert_close(pos.image_index, torch.cat([torch.full_like(f, i) for i, f in enumerate(fg)]))
    expected_labels = torch.cat([t["labels"][m[f]] - 1 for t, m, f in zip(seen["targets"], matched, fg)])
    torch.testing.assert_close(pos.labels, expected_labels)
    assert pos.labels.min() >= 0 and pos.labels.max() < 3
    gt = torch.cat([t["boxes"][m[f]] for t, m, f in zip(seen["targets"], matched, fg)])
    torch.testing.assert_close(pos.gt_boxes, gt)
    # the transformed GT boxes are the user's boxes scaled by the resize (here 1.0 and 128/128): spot-check one
    assert any(torch.equal(pos.gt_boxes[0], b) for t in seen["targets"] for b in t["boxes"])
    # every positive overlaps its GT box by at least the box head's foreground threshold (0.5), and best of all GTs
    proposals = torch.cat([p[f] for p, f in zip(seen["proposals"], fg)])
    iou = box_iou(proposals, gt).diagonal()
    assert (iou >= 0.5).all()
    best = torch.cat([box_iou(p[f], t["boxes"]).amax(1) for p, f, t in zip(seen["proposals"], fg, seen["targets"])])
    torch.testing.assert_close(iou, best)
    # logits are the box head's rows; pred boxes are the class-specific regression decoded on the proposal
    rows = torch.cat([f + sum(len(p) for p in seen["proposals"][:i]) for i, f in enumerate(fg)])
    torch.testing.assert_close(pos.logits, seen["class_logits"][rows])
    rel = seen["box_regression"].reshape(-1, 4, 4)[rows, pos.labels + 1]
    torch.testing.assert_close(pos.pred_boxes, naive_decode(rel, proposals), rtol=1e-5, atol=1e-4)


def test_eval_returns_torchvision_detections_with_zero_based_labels(mv3, tiny_batch):
    images, _ = tiny_batch
    mv3.eval()
    with torch.no_grad():
        out = mv3(images)
        ref = mv3.detector(images)
    assert sum(len(d["labels"]) for d in out) > 0
    for det, stock in zip(out, ref):
        assert set(det) == {"boxes", "labels", "scores"}
        torch.testing.assert_close(det["labels"], stock["labels"] - 1)
        torch.testing.assert_close(det["boxes"], stock["boxes"])
        assert det["labels"].min() >= 0 and det["labels"].max() < 3
    mv3.train()


def test_image_without_boxes(mv3, batch_with_empty_image):
    out, seen = assert_same_losses(mv3, *batch_with_empty_image)
    assert (seen["labels"][2] == 0).all()  # the empty image's sampled proposals are all background
    assert len(out.positives) > 0 and 2 not in out.positives.image_index.tolist()
    assert all(torch.isfinite(v) for v in out.losses.values())


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("builder", [fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn])
def test_anchor_rule_reproduces_torchvision_defaults(builder):
    stock = builder(weights=None, weights_backbone=None, num_classes=4).rpn.anchor_generator.sizes
    assert rpn_anchor_sizes([512, 256, 128, 64, 32], len(stock)) == stock


def test_anchor_rule_groups_and_errors():
    assert rpn_anchor_sizes([16, 8, 32, 64, 24, 48], 3) == ((8, 16), (24, 32), (48, 64))
    assert rpn_anchor_sizes([8, 16], 3) == ((8, 16),) * 3
    with pytest.raises(ValueError, match="student.anchor_sizes"):
        rpn_anchor_sizes([8, -16], 3)


def test_image_size_and_anchor_sizes_reach_the_detector(tiny_batch):
    adapter = build("mv3", anchor_sizes=[12, 24, 48])
    det = adapter.detector
    assert det.transform.min_size == (128,) and det.transform.max_size == 128
    assert det.rpn.anchor_generator.sizes == ((12,), (24,), (48,))
    assert det.rpn.head.cls_logits.out_channels == 3  # 1 size x 3 aspect ratios: the RPN head was rebuilt
    out = adapter.train()(*tiny_batch)
    assert out.images.shape[-2:] == (128, 128) and torch.isfinite(sum(out.losses.values()))


def _patch_download(monkeypatch, state_or_error):
    """torchvision's pretrained-backbone path fetches through ``torchvision.models._api.load_state_dict_from_url``."""

    def fake(url, *args, **kwargs):
        if isinstance(state_or_error, Exception):
            raise state_or_error
        return {k: v.clone() for k, v in state_or_error.items()}

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", fake)


@pytest.mark.parametrize("trainable", [None, 5])
def test_local_backbone_weights_equal_torchvisions_pretrained_path(tmp_path, monkeypatch, trainable):
    torch.manual_seed(0)
    state = backbone_classifier("fasterrcnn_mobilenet_v3").state_dict()
    save_file(state, tmp_path / "mv3.safetensors")
    ours = build("mv3", backbone_weights=str(tmp_path / "mv3.safetensors"), trainable_backbone_layers=trainable)
    _patch_download(monkeypatch, state)
    stock = build("mv3", backbone_weights="imagenet", trainable_backbone_layers=trainable)
    body, ref = ours.detector.backbone.body, stock.detector.backbone.body
    assert body.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(body.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert {n: p.requires_grad for n, p in body.named_parameters()} == {
        n: p.requires_grad for n, p in ref.named_parameters()
    }
    assert any(not p.requires_grad for p in body.parameters())  # some stages really are frozen
    assert [type(m) for m in body.modules()] == [type(m) for m in ref.modules()]
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())


@pytest.mark.slow
def test_resnet50_local_backbone_weights(tmp_path):
    state = backbone_classifier("fasterrcnn_resnet50").state_dict()
    torch.save(state, tmp_path / "r50.pt")
    body = build("r50", backbone_weights=str(tmp_path / "r50.pt")).detector.backbone.body
    torch.testing.assert_close(body.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad


def test_backbone_weight_errors(tmp_path, monkeypatch):
    state = backbone_classifier("fasterrcnn_mobilenet_v3").state_dict()
    state["features.3.block.0.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt: features.3.block.0.0.weight has shape \(1, 1, 1, 1\)"):
        build("mv3", backbone_weights=str(tmp_path / "bad.pt"))
    del state["features.3.block.0.0.weight"]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="missing backbone weight features.3.block.0.0.weight"):
        build("mv3", backbone_weights=str(tmp_path / "short.pt"))
    with pytest.raises(ValueError, match="weights file not found: .*nope.pt"):
        build("mv3", backbone_weights=str(tmp_path / "nope.pt"))
    _patch_download(monkeypatch, urllib.error.URLError("no network"))
    with pytest.raises(WeightsError, match="backbone_weights='imagenet'.*no network") as err:
        build("mv3", backbone_weights="imagenet")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="num_classes must be > 0"):
        fasterrcnn_mobilenet_v3(0, StudentConfig())


def test_returned_stages_build_a_finer_fpn(tiny_batch, tmp_path):
    # stages [2, 3, 5] = strides 8, 16, 32 (+ the max-pool level 64): at 128 px maps of 16, 8, 4, 2
    sizes = [12, 16, 24, 32, 48, 64, 96, 128]
    adapter = BUILDERS["mv3"](
        3, StudentConfig(detector="x", image_size=128, anchor_sizes=sizes), returned_stages=[2, 3, 5], **SMALL
    )
    det = adapter.detector
    maps = det.backbone(torch.zeros(1, 3, 128, 128))
    assert {k: v.shape[-1] for k, v in maps.items()} == {"0": 16, "1": 8, "2": 4, "pool": 2}
    assert det.rpn.anchor_generator.sizes == ((12, 16), (24, 32), (48, 64), (96, 128))  # 2 sizes per level
    out = adapter.train()(*tiny_batch)
    assert torch.isfinite(sum(out.losses.values())) and out.positives.logits.shape[1] == 4
    # a local backbone file loads into the finer FPN's body as into torchvision's
    torch.manual_seed(0)
    state = backbone_classifier("fasterrcnn_mobilenet_v3").state_dict()
    save_file(state, tmp_path / "mv3.safetensors")
    config = StudentConfig(detector="x", image_size=128, backbone_weights=str(tmp_path / "mv3.safetensors"))
    body = BUILDERS["mv3"](3, config, returned_stages=[2, 3, 5], **SMALL).detector.backbone.body
    torch.testing.assert_close(body["13"].block[0][0].weight, state["features.13.block.0.0.weight"])


@pytest.mark.parametrize("stages", [[], [3, 2], [0, 5], [2, 6]])
def test_returned_stages_errors(stages):
    from cls2det.config import ConfigError

    with pytest.raises(ConfigError, match=r"student.options.returned_stages must be increasing stages in 1..5"):
        BUILDERS["mv3"](3, StudentConfig(detector="x", image_size=128), returned_stages=stages)
