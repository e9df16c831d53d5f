"""kd_loc_loss (eq. 10) as the authors' release normalises it: the obj (pixel) level plus the mean over the teacher
layers, each level's L1 summed and divided by C·H·W of that level, the total divided by K. Checked against a
reference written straight from that formula (loops over positives and levels), values and box gradients."""

import pytest
import torch
import torch.nn.functional as F

from cls2det.distill import crop_boxes_naive, kd_loc_loss


def _reference(features, images, pred, gt, index, *, size, pools, is_pixel):
    """1/K Σ_k [ Σ_{pixel l} D_l(k) + mean_{teacher l} D_l(k) ], D_l(k) = Σ|AP(F_l(pred_k)) − AP(F_l(gt_k))| / (C·H·W),
    one positive at a time; the GT branch without gradient."""
    total = 0.0
    for k in range(len(pred)):
        maps_p = features(crop_boxes_naive(images, pred[k : k + 1], index[k : k + 1], size=size))
        with torch.no_grad():
            maps_g = features(crop_boxes_naive(images, gt[k : k + 1], index[k : k + 1], size=size))
        pixel_terms, teacher_terms = [], []
        for level, (mp, mg, pool) in enumerate(zip(maps_p, maps_g, pools)):
            ap, ag = F.adaptive_avg_pool2d(mp, pool)[0], F.adaptive_avg_pool2d(mg, pool)[0]  # [C, P, P]
            channels, height, width = ap.shape
            term = (ap - ag).abs().sum() / (channels * height * width)
            (pixel_terms if is_pixel[level] else teacher_terms).append(term)
        total = total + sum(pixel_terms) + (sum(teacher_terms) / len(teacher_terms) if teacher_terms else 0.0)
    return total / len(pred)


def _ramp(height=32, width=32, images=2):
    """[N, 3, H, W], every pixel's value = its column index x."""
    return torch.arange(width, dtype=torch.float64).expand(images, 3, height, width).clone()


def test_hand_case_ramp_obj_plus_mean_of_teacher_layers():
    # A box shifted right by 2 px on the ramp samples values larger by exactly 2: the obj level differs by 2 in every
    # cell, a "layer" 2x by 4, a "layer" 3x by 6. Release: obj + mean(layers) = 2 + (4 + 6) / 2 = 7 (1/L would give 4).
    images = _ramp()
    gt = torch.tensor([[4.0, 4.0, 12.0, 12.0], [10.0, 3.0, 18.0, 11.0]], dtype=torch.float64)
    pred = gt + torch.tensor([2.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    index = torch.tensor([0, 1])

    def features(x):
        return [x, 2 * x, 3 * x]

    loss = kd_loc_loss(features, images, pred, gt, index, size=8, pools=[4, 8, 2], is_pixel_level=[True, False, False])
    assert loss.item() == pytest.approx(7.0, abs=1e-12)
    # without pixel levels: the plain mean over the levels
    plain = kd_loc_loss(features, images, pred, gt, index, size=8, pools=[4, 8, 2])
    assert plain.item() == pytest.approx(4.0, abs=1e-12)
    # pixel levels only: their sum
    pixels = kd_loc_loss(features, images, pred, gt, index, size=8, pools=[4, 8, 2], is_pixel_level=[True] * 3)
    assert pixels.item() == pytest.approx(12.0, abs=1e-12)


def test_hand_case_constant_image_box_half_outside():
    # A constant image c = 3, 16 px wide. The GT box [4, 0, 12, 8] samples c everywhere; the predicted box
    # [12, 0, 20, 8] samples c at x = 12.5..15.5 and the zero padding at 16.5..19.5 (bilinear between the last pixel
    # centre 15.5 and the padding gives 0 from 16.5 on). Pooled to 2x2: left cells c, right cells 0 -> obj D = c / 2.
    # The second level (2x the crop, a teacher layer, pooled to 4x4) gives 2 · c / 2. Total: 1.5 + 3.0 = 4.5.
    images = torch.full((1, 3, 8, 16), 3.0, dtype=torch.float64)
    gt = torch.tensor([[4.0, 0.0, 12.0, 8.0]], dtype=torch.float64)
    pred = torch.tensor([[12.0, 0.0, 20.0, 8.0]], dtype=torch.float64)
    index = torch.tensor([0])
    loss = kd_loc_loss(
        lambda x: [x, 2 * x], images, pred, gt, index, size=8, pools=[2, 4], is_pixel_level=[True, False]
    )
    assert loss.item() == pytest.approx(4.5, abs=1e-12)


def _random_case(seed, k=5):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 24, 32, generator=g, dtype=torch.float64)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 16
    gt = torch.cat([xy, xy + 4 + torch.rand(k, 2, generator=g, dtype=torch.float64) * 8], dim=1)
    pred = gt + torch.randn(k, 4, generator=g, dtype=torch.float64)
    index = torch.randint(0, 2, (k,), generator=g)
    return images, pred, gt, index


class _Teacher(torch.nn.Module):
    """A frozen two-stage conv "teacher" whose taps are (obj = its input, l0, l1), at 16 px: 16x16, 8x8, 4x4."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l0 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU()).double()
        self.l1 = torch.nn.Sequential(torch.nn.Conv2d(4, 5, 3, stride=2, padding=1), torch.nn.Tanh()).double()
        self.requires_grad_(False)

    def forward(self, x):
        l0 = self.l0(x)
        return [x, l0, self.l1(l0)]


# (pools, is_pixel_level): the release's default obj+l0 at 4, 8; obj+l0+l1 at 4, 8, 16 (l1 is 4x4 at 16 px: the
# adaptive pool then replicates cells); teacher layers only; a non-divisible pool
CASES = [
    ([4, 8, 16], [True, False, False]),
    ([4, 8, 3], [True, False, False]),
    ([5, 3, 2], [False, False, False]),
    ([4, 8, 16], [True, True, False]),
]


@pytest.mark.parametrize(("pools", "is_pixel"), CASES)
def test_matches_the_formula_values_and_box_gradients(pools, is_pixel):
    teacher = _Teacher()
    images, pred, gt, index = _random_case(sum(pools))
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss = kd_loc_loss(teacher, images, p1, gt, index, size=16, pools=pools, is_pixel_level=is_pixel)
    expected = _reference(teacher, images, p2, gt, index, size=16, pools=pools, is_pixel=is_pixel)
    assert loss.shape == () and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    (grad,) = torch.autograd.grad(loss, p1)
    (expected_grad,) = torch.autograd.grad(expected, p2)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_obj_and_l0_pools_4_and_8_with_gt_features_equal_the_online_path():
    teacher = _Teacher()
    images, pred, gt, index = _random_case(11)
    pools, is_pixel = [4, 8], [True, False]

    def features(x):
        return teacher(x)[:2]

    with torch.no_grad():
        gt_maps = features(crop_boxes_naive(images, gt, index, size=16))
        gt_features = [F.adaptive_avg_pool2d(f, p).float() for f, p in zip(gt_maps, pools)]  # a cache stores floats
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    online = kd_loc_loss(features, images, p1, gt, index, size=16, pools=pools, is_pixel_level=is_pixel)
    cached = kd_loc_loss(
        features, images, p2, gt, index, size=16, pools=pools, is_pixel_level=is_pixel, gt_features=gt_features
    )
    assert cached.item() == pytest.approx(online.item(), rel=1e-6)
    (g1,) = torch.autograd.grad(online, p1)
    (g2,) = torch.autograd.grad(cached, p2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)


def test_gt_branch_without_gradient_and_box_gradients_only():
    teacher = _Teacher()
    images, pred, gt, index = _random_case(12)
    p, g = pred.clone().requires_grad_(), gt.clone().requires_grad_()
    kd_loc_loss(teacher, images, p, g, index, size=16, pools=[4, 8, 16], is_pixel_level=[True, False, False]).backward()
    assert g.grad is None
    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(w.grad is None for w in teacher.parameters())


def test_zero_positives_give_a_connected_zero_without_running_the_teacher():
    calls = []

    def features(x):
        calls.append(x)
        return [x, x]

    images = torch.rand(2, 3, 16, 16)
    p = torch.zeros(0, 4, requires_grad=True)
    loss = kd_loc_loss(
        features,
        images,
        p,
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.int64),
        pools=[4, 8],
        is_pixel_level=[True, False],
    )
    assert loss.shape == () and loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert p.grad.shape == (0, 4) and calls == []


def test_is_pixel_level_must_match_pools():
    images, pred, gt, index = _random_case(13)
    with pytest.raises(ValueError, match="is_pixel_level has 1 entries but pools has 2"):
        kd_loc_loss(lambda x: [x, x], images, pred, gt, index, size=8, pools=[2, 4], is_pixel_level=[True])
