"""SSD / SSDlite adapter: torchvision's own losses, positives = the default boxes the matcher assigns to a GT."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import ssd as tv_ssd
from torchvision.models.detection import ssdlite as tv_ssdlite
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.vgg import cfgs, make_layers
from torchvision.ops import box_iou

from cls2det.config import StudentConfig
from cls2det.students.ssd import backbone_classifier, ssd300_vgg16, ssd_box_generator, ssdlite320_mobilenet_v3

SSD300_BOXES = DefaultBoxGenerator(
    [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
    steps=[8, 16, 32, 64, 100, 300],
)


@pytest.fixture(scope="module")
def lite():
    torch.manual_seed(0)
    return ssdlite320_mobilenet_v3(3, StudentConfig(detector="ssdlite320_mobilenet_v3", image_size=128))


def naive_decode(rel: torch.Tensor, boxes: torch.Tensor, weights=(10.0, 10.0, 5.0, 5.0)) -> torch.Tensor:
    """SSD box decoding written out: (dx, dy, dw, dh) / weights applied to xyxy default boxes; dw, dh clipped."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = rel[:, 0] / weights[0], rel[:, 1] / weights[1]
    dw = (rel[:, 2] / weights[2]).clamp(max=math.log(1000.0 / 16))
    dh = (rel[:, 3] / weights[3]).clamp(max=math.log(1000.0 / 16))
    px, py, pw, ph = dx * w + cx, dy * h + cy, dw.exp() * w, dh.exp() * h
    return torch.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], dim=1)


def run_stock_ssd(detector, images, targets) -> tuple[dict, dict]:
    """The stock train-mode forward, recording what it passes to ``SSD.compute_loss``."""
    seen: dict = {}
    compute_loss = detector.compute_loss

    def spy(targets, head_outputs, anchors, matched_idxs):
        seen.update(targets=targets, head_outputs=head_outputs, anchors=anchors, matched_idxs=matched_idxs)
        return compute_loss(targets, head_outputs, anchors, matched_idxs)

    detector.compute_loss = spy  # instance attribute shadows the method for this call only
    try:
        losses = detector(images, targets)
    finally:
        del detector.compute_loss
    return losses, seen


def assert_same_losses(adapter, images, targets, seed: int = 0):
    adapter.train()
    torch.manual_seed(seed)
    out = adapter(images, targets)
    torch.manual_seed(seed)
    ref, seen = run_stock_ssd(adapter.detector, images, adapter.to_detector_targets(targets))
    assert set(out.losses) == set(ref) == {"bbox_regression", "classification"}
    for key in ref:
        torch.testing.assert_close(out.losses[key], ref[key], rtol=0, atol=1e-6)
    return out, seen


def check_positives(out, seen, num_logits: int = 4):
    """Positives = the matcher's foreground default boxes, with their GT, logits and decoded regression."""
    pos, matched = out.positives, seen["matched_idxs"]
    fg = [torch.where(m >= 0)[0] for m in matched]
    assert len(pos) == sum(len(f) for f in fg) > 0
    assert pos.head == "softmax" and pos.logits.shape == (len(pos), num_logits)
    torch.testing.assert_close(pos.image_index, torch.cat([torch.full_like(f, i) for i, f in enumerate(fg)]))
    targets = seen["targets"]
    torch.testing.assert_close(pos.labels, torch.cat([t["labels"][m[f]] - 1 for t, m, f in zip(targets, matched, fg)]))
    torch.testing.assert_close(pos.gt_boxes, torch.cat([t["boxes"][m[f]] for t, m, f in zip(targets, matched, fg)]))
    heads = seen["head_outputs"]
    torch.testing.assert_close(pos.logits, torch.cat([heads["cls_logits"][i, f] for i, f in enumerate(fg)]))
    anchors = torch.cat([a[f] for a, f in zip(seen["anchors"], fg)])
    rel = torch.cat([heads["bbox_regression"][i, f] for i, f in enumerate(fg)])
    torch.testing.assert_close(pos.pred_boxes, naive_decode(rel, anchors), rtol=1e-5, atol=1e-4)
    # SSD's matching rule by hand: IoU >= 0.5 with the matched GT, or the matched GT's best default box
    for i, f in enumerate(fg):
        if len(f) == 0:
            continue
        iou = box_iou(targets[i]["boxes"], seen["anchors"][i])  # [M, A]
        own = iou[matched[i][f], f]  # [K_i]
        assert ((own >= 0.5) | (own == iou.amax(1)[matched[i][f]])).all()
        background = torch.where(matched[i] < 0)[0]
        assert (iou[:, background] < 0.5).all()


def test_losses_and_positives_equal_stock_detector(lite, tiny_batch):
    out, seen = assert_same_losses(lite, *tiny_batch)
    check_positives(out, seen)
    assert out.images.shape == (2, 3, 128, 128)
    torch.testing.assert_close(out.image_mean, torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(out.image_std, torch.tensor([0.5, 0.5, 0.5]))


@pytest.fixture(scope="module")
def ssd300_loaded(tmp_path_factory):
    """SSD300 with VGG16 feature weights from a local file, and torchvision's own extractor around the same VGG."""
    torch.manual_seed(0)
    vgg = torch.nn.Module()
    vgg.features = make_layers(cfgs["D"])  # vgg16().features without building its 120M-parameter classifier
    path = tmp_path_factory.mktemp("vgg") / "vgg.pt"
    torch.save(vgg.state_dict(), path)
    adapter = ssd300_vgg16(3, StudentConfig(backbone_weights=str(path)))
    return adapter, tv_ssd._vgg_extractor(vgg, False, 4)  # torchvision's default for a pretrained VGG: 4 stages


@pytest.mark.slow
def test_ssd300_losses_and_positives_equal_stock_detector(ssd300_loaded, tiny_batch):
    adapter, _ = ssd300_loaded
    out, seen = assert_same_losses(adapter, *tiny_batch)
    check_positives(out, seen)
    assert out.images.shape == (2, 3, 300, 300)
    # VGG's caffe-style normalisation: pixels01 = images * std + mean with std = 1/255
    torch.testing.assert_close(out.image_std, torch.full((3,), 1 / 255))
    pixels = out.images * out.image_std[:, None, None] + out.image_mean[:, None, None]
    assert -1e-4 < pixels.min() and pixels.max() < 1 + 1e-4


def test_eval_returns_torchvision_detections_with_zero_based_labels(lite, tiny_batch):
    images, _ = tiny_batch
    lite.eval()
    with torch.no_grad():
        out = lite(images)
        ref = lite.detector(images)
    assert sum(len(d["labels"]) for d in out) > 0
    for det, stock in zip(out, ref):
        assert set(det) == {"boxes", "labels", "scores"}
        torch.testing.assert_close(det["labels"], stock["labels"] - 1)
        torch.testing.assert_close(det["boxes"], stock["boxes"])
        assert det["labels"].min() >= 0 and det["labels"].max() < 3
        assert det["boxes"][:, 2:].max() <= 128  # original-image pixels (images are at most 128 px)
    lite.train()


def test_image_without_boxes(lite, batch_with_empty_image):
    out, seen = assert_same_losses(lite, *batch_with_empty_image)
    assert (seen["matched_idxs"][2] == -1).all()
    check_positives(out, seen)
    assert 2 not in out.positives.image_index.tolist()


# ----------------------------------------------------------------------------------------------- config


def test_box_generator_rules():
    # SSD300's stock scales written as pixel sizes at 300 px reproduce its stock default boxes exactly
    same = ssd_box_generator(SSD300_BOXES, 300, 300, [21, 45, 99, 153, 207, 261, 315])
    features = [torch.zeros(1, 1, s, s) for s in (38, 19, 10, 5, 3, 1)]
    batch = ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)])
    torch.testing.assert_close(same(batch, features)[0], SSD300_BOXES(batch, features)[0])
    # (min, max): linear scales over the 6 maps, plus 1.0; another size drops the 300-px steps
    two = ssd_box_generator(SSD300_BOXES, 400, 300, [40, 360])
    assert two.scales == pytest.approx([0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.0]) and two.steps is None
    assert two.num_anchors_per_location() == SSD300_BOXES.num_anchors_per_location()
    with pytest.raises(ValueError, match="needs 2 sizes .min, max. or 7"):
        ssd_box_generator(SSD300_BOXES, 300, 300, [10, 20, 30])
    with pytest.raises(ValueError, match="must be positive"):
        ssd_box_generator(SSD300_BOXES, 300, 300, [0, 20])


def test_image_size_and_anchor_sizes_reach_the_detector(tiny_batch):
    adapter = ssdlite320_mobilenet_v3(3, StudentConfig(image_size=160, anchor_sizes=[16, 128]))
    det = adapter.detector
    assert det.transform.fixed_size == (160, 160)
    # (min, max) = (16, 128) px at 160 px: linear from 0.1 to 0.8 over the 6 maps, then 1.0
    assert det.anchor_generator.scales == pytest.approx([0.1, 0.24, 0.38, 0.52, 0.66, 0.8, 1.0])
    out = adapter.train()(*tiny_batch)
    assert out.images.shape == (2, 3, 160, 160)
    smallest = out.positives.gt_boxes  # boxes were scaled to the fixed 160 x 160 input: 96x128 -> x1.25 / x1.667
    assert smallest[:, 2].max() <= 160 and smallest[:, 3].max() <= 160
    with pytest.raises(ValueError, match="student.image_size must be >= 268 for ssd300_vgg16, got 128"):
        ssd300_vgg16(3, StudentConfig(image_size=128))


def test_ssdlite_local_backbone_weights_equal_torchvisions_extractor(tmp_path):
    torch.manual_seed(0)
    classifier = backbone_classifier("ssdlite320_mobilenet_v3")
    save_file(classifier.state_dict(), tmp_path / "mv3.safetensors")
    adapter = ssdlite320_mobilenet_v3(
        3,
        StudentConfig(backbone_weights=str(tmp_path / "mv3.safetensors"), trainable_backbone_layers=3, image_size=128),
    )
    # reference: torchvision's own SSDlite extractor built around the same (loaded) classifier
    ref = tv_ssdlite._mobilenet_extractor(classifier, 3, torch.nn.BatchNorm2d)
    body = adapter.detector.backbone
    for key, value in ref.state_dict().items():
        if key.startswith("features."):
            torch.testing.assert_close(body.state_dict()[key], value, rtol=0, atol=0, msg=key)
    flags = {n: p.requires_grad for n, p in body.named_parameters() if n.startswith("features.")}
    assert flags == {n: p.requires_grad for n, p in ref.named_parameters() if n.startswith("features.")}
    assert not all(flags.values()) and any(flags.values())
    x = torch.rand(1, 3, 64, 64)
    classifier.eval(), body.eval()
    with torch.no_grad():
        torch.testing.assert_close(body.features[1](body.features[0](x)), classifier.features(x))


@pytest.mark.slow
def test_ssd300_local_backbone_weights_equal_torchvisions_extractor(ssd300_loaded):
    adapter, ref = ssd300_loaded
    body = adapter.detector.backbone
    loaded = [
        k
        for k in ref.state_dict()
        if k.startswith("features.") or k.startswith("extra.0.") and int(k.split(".")[2]) < 7
    ]
    assert len(loaded) == 26  # 13 convs x (weight, bias)
    for key in loaded:
        torch.testing.assert_close(body.state_dict()[key], ref.state_dict()[key], rtol=0, atol=0, msg=key)
    assert {n: p.requires_grad for n, p in body.named_parameters()} == {
        n: p.requires_grad for n, p in ref.named_parameters()
    }
    assert not body.features[0].weight.requires_grad and body.features[5].weight.requires_grad


def test_backbone_weight_errors(tmp_path):
    # the full-tail MobileNetV3 (ImageNet layout) does not fit the untrained SSDlite's reduced tail
    torch.save(mobilenet_v3_large().state_dict(), tmp_path / "full.pt")
    with pytest.raises(
        ValueError,
        match=r"full.pt: features.13.block.3.0.weight has shape \(160, 672, 1, 1\), "
        r"expected \(80, 672, 1, 1\) for mobilenet_v3_large\(reduced_tail=True\)",
    ):
        ssdlite320_mobilenet_v3(3, StudentConfig(backbone_weights=str(tmp_path / "full.pt")))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="resnet.pt: no features.0.0.weight among its 1 keys"):
        ssdlite320_mobilenet_v3(3, StudentConfig(backbone_weights=str(tmp_path / "resnet.pt")))
    with pytest.raises(ValueError, match="unknown SSD detector 'ssd512'"):
        backbone_classifier("ssd512")
