"""loc_loss (eq. 11) and kd_loc_loss (eq. 10): hand cases, a naive reference, gradients, K == 0."""

import pytest
import torch

from cls2det.distill import crop_boxes_naive, kd_loc_loss, loc_loss


def _ramp(height=32, width=32, images=2):
    """[N, 3, H, W], every pixel's value = its column index x (the same in all channels and images)."""
    return torch.arange(width, dtype=torch.float64).expand(images, 3, height, width).clone()


def _naive_loc(images, pred, gt, index, size, pool):
    """Eq. (11) by hand: replicate-the-image crops, average pooling by block means (size divisible by pool)."""

    def pooled(boxes):
        crops = crop_boxes_naive(images, boxes, index, size=size)  # [K, 3, s, s]
        b = size // pool
        return crops.view(len(boxes), 3, pool, b, pool, b).mean(dim=(3, 5))  # [K, 3, P, P]

    diff = pooled(pred) - pooled(gt)
    total = 0.0
    for value in diff.flatten().tolist():
        total += abs(value)
    return total / diff.numel()


def test_loc_hand_case_shifted_box_on_a_ramp():
    # On a ramp image value = x, a box shifted right by 2 px samples values larger by exactly 2 (all samples are
    # pixel centres inside the image), so every pooled cell differs by 2.
    images = _ramp()
    gt = torch.tensor([[4.0, 4.0, 12.0, 12.0], [10.0, 3.0, 18.0, 11.0]], dtype=torch.float64)
    pred = gt + torch.tensor([2.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    index = torch.tensor([0, 1])
    assert loc_loss(images, pred, gt, index, size=8, pool=4).item() == pytest.approx(2.0, abs=1e-12)
    assert loc_loss(images, gt, pred, index, size=8, pool=2).item() == pytest.approx(2.0, abs=1e-12)


def test_kd_loc_hand_case_two_taps():
    # taps: the crop (obj, a pixel level) and twice the crop (a teacher layer): the release's obj + mean(layers)
    # = 2 + 4 = 6; with both as teacher layers, their mean: (2 + 4) / 2 = 3
    images = _ramp()
    gt = torch.tensor([[4.0, 4.0, 12.0, 12.0]], dtype=torch.float64)
    pred = gt + torch.tensor([2.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    index = torch.tensor([1])
    loss = kd_loc_loss(lambda x: [x, 2 * x], images, pred, gt, index, size=8, pools=[4, 2], is_pixel_level=[1, 0])
    assert loss.item() == pytest.approx(6.0, abs=1e-12)
    loss = kd_loc_loss(lambda x: [x, 2 * x], images, pred, gt, index, size=8, pools=[4, 2])
    assert loss.item() == pytest.approx(3.0, abs=1e-12)


def _random_case(seed, k=6):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 24, 32, generator=g, dtype=torch.float64)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 16
    gt = torch.cat([xy, xy + 4 + torch.rand(k, 2, generator=g, dtype=torch.float64) * 8], dim=1)
    pred = gt + torch.randn(k, 4, generator=g, dtype=torch.float64)
    index = torch.randint(0, 2, (k,), generator=g)
    return images, pred, gt, index


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_loc_matches_naive_reference(pool):
    images, pred, gt, index = _random_case(pool)
    loss = loc_loss(images, pred, gt, index, size=8, pool=pool)
    assert loss.shape == () and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_naive_loc(images, pred, gt, index, 8, pool), rel=1e-12)


@pytest.mark.parametrize("pool", [2, 4])
@pytest.mark.parametrize("is_pixel_level", [None, [True]])
def test_kd_loc_with_identity_features_equals_loc(pool, is_pixel_level):
    images, pred, gt, index = _random_case(10 + pool)
    loc = loc_loss(images, pred, gt, index, size=8, pool=pool)
    kd = kd_loc_loss(lambda x: [x], images, pred, gt, index, size=8, pools=[pool], is_pixel_level=is_pixel_level)
    assert kd.item() == pytest.approx(loc.item(), rel=1e-12)


def test_zero_when_pred_equals_gt():
    images, _, gt, index = _random_case(3)
    assert loc_loss(images, gt.clone(), gt, index, size=8).item() == 0.0
    feats = torch.nn.Conv2d(3, 4, 3, stride=2).double()
    assert kd_loc_loss(lambda x: [x, feats(x)], images, gt.clone(), gt, index, size=8, pools=[4, 2]).item() == 0.0


def test_gradient_reaches_pred_boxes_only():
    images, pred, gt, index = _random_case(4)
    conv = torch.nn.Conv2d(3, 4, 3).double().requires_grad_(False)  # a frozen "teacher"
    for loss_fn in (
        lambda p, g: loc_loss(images, p, g, index, size=8, pool=2),
        lambda p, g: kd_loc_loss(lambda x: [x, conv(x)], images, p, g, index, size=8, pools=[2, 3]),
    ):
        p, g = pred.clone().requires_grad_(), gt.clone().requires_grad_()
        loss_fn(p, g).backward()
        assert g.grad is None
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_gradient_matches_naive_reference():
    images, pred, gt, index = _random_case(5)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loc_loss(images, p1, gt, index, size=8, pool=4).backward()

    crops_p = crop_boxes_naive(images, p2, index, size=8).view(6, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    crops_g = crop_boxes_naive(images, gt, index, size=8).view(6, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    (crops_p - crops_g).abs().mean().backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=1e-12)


def test_empty_positives():
    images = torch.rand(2, 3, 16, 16)
    calls = []

    def features(x):
        calls.append(x)
        return [x]

    for fn in (
        lambda p: loc_loss(images, p, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),
        lambda p: kd_loc_loss(features, images, p, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), pools=[4]),
    ):
        p = torch.zeros(0, 4, requires_grad=True)
        loss = fn(p)
        assert loss.shape == () and loss.item() == 0.0 and loss.dtype == torch.float32
        loss.backward()
        assert p.grad.shape == (0, 4)
    assert calls == []  # the teacher is not run for no positives


def test_bad_inputs_raise():
    images, pred, gt, index = _random_case(6)
    with pytest.raises(ValueError, match="features returned 2 maps but pools has 1 sizes"):
        kd_loc_loss(lambda x: [x, x], images, pred, gt, index, size=8, pools=[2])
    with pytest.raises(ValueError, match="pools must name one pooled size per feature map"):
        kd_loc_loss(lambda x: [x], images, pred, gt, index, size=8, pools=[])
    with pytest.raises(ValueError, match=r"gt_boxes must match pred_boxes \[6, 4\]"):
        loc_loss(images, pred, gt[:3], index)
