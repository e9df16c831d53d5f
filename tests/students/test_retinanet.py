"""RetinaNet adapter: torchvision's own losses and matches, differentiable positives, builder options."""

from __future__ import annotations

import copy
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.ops import FrozenBatchNorm2d

from cls2det.config import StudentConfig
from cls2det.errors import WeightsError
from cls2det.students.registry import create_student
from cls2det.students.retinanet import RetinaNetAdapter, retinanet_resnet50

SIZE = 128


@pytest.fixture(scope="module")
def model() -> RetinaNetAdapter:
    torch.manual_seed(0)
    return retinanet_resnet50(3, StudentConfig(detector="retinanet_resnet50", image_size=SIZE)).train()


def naive_decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The R-CNN box parametrisation written out: centre shift in anchor units, log-scale size (weights 1)."""
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + w / 2, anchors[:, 1] + h / 2
    pcx, pcy = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
    pw, ph = w * deltas[:, 2].exp(), h * deltas[:, 3].exp()
    return torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], dim=1)


@torch.no_grad()  # equality checks only; saves the autograd graph
def test_losses_and_positives_match_torchvision(model, tiny_batch, stock_run):
    images, targets = tiny_batch
    out = model(images, targets)
    stock, seen = stock_run(model.detector, images, targets)
    assert out.losses.keys() == stock.keys() == {"classification", "bbox_regression"}
    for key in stock:
        torch.testing.assert_close(out.losses[key], stock[key], rtol=0, atol=1e-6)

    pos = out.positives
    assert pos.head == "sigmoid" and pos.logits.shape == (len(pos), 3)
    start = 0
    for i, matched in enumerate(seen["matched_idxs"]):
        fg = torch.where(matched >= 0)[0]
        assert fg.numel() > 0
        rows = slice(start, start + fg.numel())
        start += fg.numel()
        assert (pos.image_index[rows] == i).all()
        gt = matched[fg]
        assert set(gt.tolist()) == set(range(len(targets[i]["labels"])))  # every GT has a positive (low-quality)
        assert torch.equal(pos.labels[rows], targets[i]["labels"][gt])  # 0-based, as given
        assert torch.equal(pos.gt_boxes[rows], seen["targets"][i]["boxes"][gt])  # resized coordinates
        torch.testing.assert_close(pos.logits[rows], seen["head_outputs"]["cls_logits"][i, fg], rtol=0, atol=1e-6)
        anchors = seen["anchors"][i][fg]
        regression = seen["head_outputs"]["bbox_regression"][i, fg]
        torch.testing.assert_close(pos.pred_boxes[rows], naive_decode(regression, anchors), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(pos.pred_boxes[rows], model.detector.box_coder.decode_single(regression, anchors))
    assert start == len(pos)

    torch.testing.assert_close(out.image_mean, torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(out.image_std, torch.tensor([0.229, 0.224, 0.225]))
    assert out.images.shape == (2, 3, SIZE, SIZE)  # 96x128 and 128x112 kept (max side 128), padded to 32
    pixels = out.images[0, :, :96, :128] * out.image_std[:, None, None] + out.image_mean[:, None, None]
    torch.testing.assert_close(pixels, images[0], rtol=0, atol=1e-5)


@torch.no_grad()  # equality checks only; saves the autograd graph
def test_empty_image_in_batch(model, batch_with_empty_image, stock_run):
    images, targets = batch_with_empty_image
    out = model(images, targets)
    stock, seen = stock_run(model.detector, images, targets)
    for key in stock:
        torch.testing.assert_close(out.losses[key], stock[key], rtol=0, atol=1e-6)
    assert (seen["matched_idxs"][2] == -1).all()
    assert len(out.positives) == sum(int((m >= 0).sum()) for m in seen["matched_idxs"]) > 0
    assert not (out.positives.image_index == 2).any()


def test_eval_returns_zero_based_detections(model, tiny_batch):
    adapter = copy.deepcopy(model).eval()
    # make class 2 (0-based) the only confident one: cls_logits channels are laid out anchor-major, class-minor
    bias = adapter.detector.head.classification_head.cls_logits.bias
    with torch.no_grad():
        bias[2::3] = 4.0
    images, _ = tiny_batch
    with torch.no_grad():
        detections = adapter(images)
    assert len(detections) == 2
    for det, image in zip(detections, images):
        assert det["labels"].numel() > 0 and (det["labels"] == 2).all()
        h, w = image.shape[1:]
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()


# ----------------------------------------------------------------------------------------------- builder


def test_builder_options():
    config = StudentConfig(detector="retinanet_resnet50", image_size=160, anchor_sizes=[16, 32, 64, 128, 256])
    adapter = create_student("retinanet_resnet50", 4, config)
    assert isinstance(adapter, RetinaNetAdapter) and adapter.head == "sigmoid" and adapter.label_offset == 0
    det = adapter.detector
    assert det.head.classification_head.num_classes == 4
    assert det.transform.min_size == (160,) and det.transform.max_size == 160
    # 3 scales per octave as torchvision's default generator: int(16 * 2**(1/3)) = 20, int(16 * 2**(2/3)) = 25
    assert det.anchor_generator.sizes[0] == (16, 20, 25) and det.anchor_generator.sizes[4] == (256, 322, 406)
    assert det.anchor_generator.aspect_ratios[0] == (0.5, 1.0, 2.0)
    stock = retinanet_resnet50(4, StudentConfig(detector="retinanet_resnet50"))
    assert stock.detector.transform.min_size == (800,) and stock.detector.transform.max_size == 1333
    assert stock.detector.anchor_generator.sizes[0] == (32, 40, 50)
    with pytest.raises(ValueError, match=r"anchor_sizes: retinanet_resnet50 needs 5 positive sizes"):
        retinanet_resnet50(4, StudentConfig(anchor_sizes=[16, 32]))
    with pytest.raises(ValueError, match="image_size must be > 0"):
        retinanet_resnet50(4, StudentConfig(image_size=0))
    with pytest.warns(UserWarning, match="trainable_backbone_layers has no effect"):
        retinanet_resnet50(4, StudentConfig(trainable_backbone_layers=2))


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict]:
    """A ResNet-50 classifier state dict (random, distinct stats) saved as safetensors (prefixed) and torch."""
    torch.manual_seed(1)
    net = torchvision.models.resnet50(weights=None, num_classes=7)
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-1, 1)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    root = tmp_path_factory.mktemp("weights")
    save_file({f"model.{k}": v for k, v in state.items()}, str(root / "cls.safetensors"))
    torch.save(state, root / "cls.pt")
    return state, {"safetensors": root / "cls.safetensors", "torch": root / "cls.pt", "root": root}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_local_backbone_weights_load_and_freeze(resnet_weights, fmt):
    state, files = resnet_weights
    config = StudentConfig(image_size=SIZE, backbone_weights=str(files[fmt]), trainable_backbone_layers=2)
    body = retinanet_resnet50(3, config).detector.backbone.body
    torch.testing.assert_close(body.layer4[2].conv3.weight, state["layer4.2.conv3.weight"], rtol=0, atol=0)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(body.bn1.running_mean, state["bn1.running_mean"], rtol=0, atol=0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_backbone_weight_errors(resnet_weights, monkeypatch):
    _, files = resnet_weights
    with pytest.raises(ValueError, match="weights file not found: .*nope.pt"):
        retinanet_resnet50(3, StudentConfig(backbone_weights=str(files["root"] / "nope.pt")))
    small = files["root"] / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), small)
    with pytest.raises(ValueError, match=r"r18.pt: layer1.0.conv1.weight has shape \(64, 64, 3, 3\), expected"):
        retinanet_resnet50(3, StudentConfig(backbone_weights=str(small)))
    junk = files["root"] / "junk.safetensors"
    junk.write_text("not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors: cannot read weights"):
        retinanet_resnet50(3, StudentConfig(backbone_weights=str(junk)))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="backbone_weights='imagenet': could not load .*no network") as err:
        retinanet_resnet50(3, StudentConfig(backbone_weights="imagenet"))
    assert "\n" not in str(err.value)


def test_bad_targets_are_one_line_errors(model, tiny_batch):
    images, targets = tiny_batch
    targets[1]["boxes"][2] = torch.tensor([30.0, 70.0, 30.0, 100.0])  # zero width
    with pytest.raises(ValueError, match=r"^target 1: box \[30.0, 70.0, 30.0, 100.0\] \(after resizing\) has non-pos"):
        model(images, targets)
    targets[1]["boxes"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"target 1: boxes must be a \[N, 4\] tensor"):
        model(images, targets)
    with pytest.raises(ValueError, match="targets are required in train mode"):
        model(images)
