import math

import pytest
import torch
from torchvision.ops import box_iou

from cls2det.distill.gradient_probe import boxes_at_iou, gradient_alignment
from cls2det.distill.losses import loc_loss


@pytest.mark.parametrize("iou", [0.5, 0.75, 0.9, 1.0])
def test_boxes_at_iou_hits_the_target(iou):
    gen = torch.Generator().manual_seed(0)
    gt = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 13.0, 57.0], [100.0, 5.0, 101.5, 9.0]]).repeat(20, 1)
    boxes = boxes_at_iou(gt, iou, generator=gen)
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert torch.allclose(box_iou(boxes, gt).diagonal(), torch.full((60,), iou), atol=1e-5)
    assert (boxes != gt).any() or iou == 1.0


def test_boxes_at_iou_refuses_a_target_outside_0_1():
    with pytest.raises(ValueError, match="iou must be in"):
        boxes_at_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 0.0)


def test_alignment_of_a_coordinate_l1_loss_by_hand():
    box, gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[1.0, 2.0, 10.0, 12.0]])
    out = gradient_alignment(lambda b: (b - gt).abs().sum(), box, gt, step=0.5)
    # descent = sign(gt - box) = (1, 1, 0, 1) (|x| has gradient 0 at 0); towards = (1, 2, 0, 2)
    assert out["cosine"].item() == pytest.approx(5 / (math.sqrt(3) * 3), abs=1e-9)
    assert out["grad_norm"].item() == pytest.approx(math.sqrt(3), abs=1e-9)
    u = 0.5 / math.sqrt(3)
    moved = torch.tensor([[u, u, 10.0, 10.0 + u]], dtype=torch.float64)
    expected = box_iou(moved, gt.double()).item() - box_iou(box.double(), gt.double()).item()
    assert out["iou_gain"].item() == pytest.approx(expected, abs=1e-9)
    assert expected > 0


def _square_image():
    image = torch.zeros(1, 3, 128, 128)
    image[:, :, 40:80, 30:90] = 1.0  # one bright object on black: the pixels say exactly where it is
    return image, torch.tensor([[30.0, 40.0, 90.0, 80.0]])


def test_pixel_loss_points_at_the_object():
    image, gt_one = _square_image()
    gt = gt_one.repeat(64, 1)
    boxes = boxes_at_iou(gt, 0.7, generator=torch.Generator().manual_seed(1))
    index = torch.zeros(64, dtype=torch.long)
    out = gradient_alignment(lambda b: loc_loss(image, b, gt, index, size=112, pool=4), boxes, gt)
    assert out["cosine"].mean() > 0.5  # measured 0.56 (0.37 at s = 32: fewer samples near the edges)
    assert (out["iou_gain"] > 0).float().mean() > 0.9  # measured 0.95


def test_a_flat_image_gives_no_signal():
    image, gt_one = _square_image()
    image.fill_(0.5)
    gt = gt_one.repeat(4, 1)
    boxes = boxes_at_iou(gt, 0.7, generator=torch.Generator().manual_seed(2))
    index = torch.zeros(4, dtype=torch.long)
    out = gradient_alignment(lambda b: loc_loss(image, b, gt, index, size=32, pool=4), boxes, gt)
    assert torch.equal(out["grad_norm"], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(out["cosine"], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(out["iou_gain"], torch.zeros(4, dtype=torch.float64))
