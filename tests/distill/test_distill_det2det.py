"""det2det baselines: logit KD (Chen et al. 2017), FGFI (Wang et al. 2019), PKD (Cao et al. 2022)."""

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from cls2det.distill import fgfi_level_masks, fgfi_loss, fgfi_mask, logit_kd_loss, pkd_loss


def test_logit_kd_softmax_hand_case():
    # K=1, 3 outputs (background included in both): KL(p_t || p_s) with T=1
    s = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    zs, zt = sum(math.exp(v) for v in (0, 1, 2)), math.exp(1) + 2
    ps = [math.exp(v) / zs for v in (0, 1, 2)]
    pt = [math.exp(1) / zt, 1 / zt, 1 / zt]
    expected = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert logit_kd_loss(s, t, head="softmax", temperature=1.0).item() == pytest.approx(expected, rel=1e-12)
    # T=3 adds the T^2 factor to the KL of the softened distributions
    zs, zt = sum(math.exp(v / 3) for v in (0, 1, 2)), math.exp(1 / 3) + 2
    ps = [math.exp(v / 3) / zs for v in (0, 1, 2)]
    pt = [math.exp(1 / 3) / zt, 1 / zt, 1 / zt]
    expected = 9 * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert logit_kd_loss(s, t, head="softmax", temperature=3.0).item() == pytest.approx(expected, rel=1e-12)


def test_logit_kd_sigmoid_hand_case_and_zero():
    s = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    t = torch.tensor([[1.2, 0.4]], dtype=torch.float64)

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def binary_kl(qt, qs):
        return qt * math.log(qt / qs) + (1 - qt) * math.log((1 - qt) / (1 - qs))

    expected = (binary_kl(sig(1.2), sig(0.3)) + binary_kl(sig(0.4), sig(-0.7))) / 2
    assert logit_kd_loss(s, t, head="sigmoid").item() == pytest.approx(expected, rel=1e-12)
    assert logit_kd_loss(t.clone(), t, head="sigmoid").item() == pytest.approx(0.0, abs=1e-14)


def test_logit_kd_gradient_and_empty():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: logit_kd_loss(x, t, head="softmax", temperature=2.0), (s,))
    e = torch.zeros(0, 4, requires_grad=True)
    loss = logit_kd_loss(e, torch.zeros(0, 4), head="sigmoid")
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 4)
    with pytest.raises(ValueError, match="must be equal"):
        logit_kd_loss(torch.zeros(2, 4), torch.zeros(2, 3), head="softmax")


def test_fgfi_mask_hand_case():
    # one image, G=2 GT boxes, a 2x3 map with A=2 anchors per location
    iou = torch.zeros(2, 2, 3, 2)
    iou[0, 0, 0, 1] = 0.8  # GT 0: max 0.8, threshold 0.4
    iou[0, 1, 2, 0] = 0.5  # kept (0.5 > 0.4)
    iou[0, 0, 1, 0] = 0.4  # not kept (not > 0.4)
    iou[1, 1, 1, 1] = 0.1  # GT 1: a small object, max 0.1, threshold 0.05: kept
    iou[1, 0, 2, 0] = 0.04  # below 0.05
    expected = torch.tensor([[True, False, False], [False, True, True]])
    assert torch.equal(fgfi_mask(iou, psi=0.5), expected)
    # batched [N, G, H, W, A]; a padding GT of zeros adds nothing; no GT at all gives an empty mask
    batched = torch.stack([iou, torch.cat([iou[:1], torch.zeros(1, 2, 3, 2)])])
    assert torch.equal(fgfi_mask(batched)[0], expected)
    assert torch.equal(fgfi_mask(batched)[1], torch.tensor([[True, False, False], [False, False, True]]))
    assert not fgfi_mask(torch.zeros(0, 2, 3, 2)).any() and fgfi_mask(torch.zeros(0, 2, 3, 2)).shape == (2, 3)


def grid_anchors(height: int, width: int, stride: float, sizes: list[float]) -> torch.Tensor:
    """[H, W, A, 4] square anchors of the given sides centred on a stride grid (location-major, as torchvision)."""
    ys, xs = torch.meshgrid(torch.arange(height) * stride, torch.arange(width) * stride, indexing="ij")
    centres = torch.stack([xs, ys, xs, ys], dim=-1).float()[:, :, None]  # [H, W, 1, 4]
    half = torch.tensor(sizes)[:, None] / 2 * torch.tensor([-1.0, -1.0, 1.0, 1.0])  # [A, 4]
    return centres + half  # [H, W, A, 4]


def test_fgfi_level_masks_one_level_is_fgfi_mask():
    anchors = grid_anchors(4, 5, 8.0, [8.0, 16.0])  # [4, 5, 2, 4]
    gt = torch.tensor([[2.0, 3.0, 14.0, 17.0], [20.0, 4.0, 36.0, 30.0]])
    iou = box_iou(gt, anchors.reshape(-1, 4)).view(2, 4, 5, 2)
    (mask,) = fgfi_level_masks(gt, [anchors], psi=0.5)
    assert torch.equal(mask, fgfi_mask(iou, psi=0.5)) and mask.any() and not mask.all()
    assert not fgfi_level_masks(torch.zeros(0, 4), [anchors])[0].any()


def test_fgfi_level_masks_take_the_max_over_every_level():
    # one GT box equal to a level-0 anchor (IoU 1), overlapping a level-1 anchor at IoU 0.25: with psi=0.5 the
    # threshold is 0.5 for both levels (Wang et al.'s max over all anchors), so level 1 keeps nothing; a per-level
    # max (0.25) would have kept that level-1 location
    fine = torch.tensor([[[[0.0, 0.0, 8.0, 8.0]], [[8.0, 0.0, 16.0, 8.0]]]])  # [1, 2, 1, 4]
    coarse = torch.tensor([[[[0.0, 0.0, 16.0, 16.0]]]])  # [1, 1, 1, 4]
    gt = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    masks = fgfi_level_masks(gt, [fine, coarse], psi=0.5)
    assert [m.tolist() for m in masks] == [[[True, False]], [[False]]]
    assert fgfi_mask(box_iou(gt, coarse.view(-1, 4)).view(1, 1, 1, 1)).item()  # the per-level rule differs
    assert [m.tolist() for m in fgfi_level_masks(gt, [fine, coarse], psi=0.2)] == [[[True, False]], [[True]]]
    with pytest.raises(ValueError, match="psi"):
        fgfi_level_masks(gt, [fine], psi=0.0)


def test_fgfi_loss_hand_case():
    s = torch.zeros(1, 2, 2, 2, requires_grad=True)
    t = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # [1, 2, 2, 2]
    mask = torch.tensor([[[True, False], [False, True]]])  # 2 positions
    # positions (0,0): 1^2 + 0^2 = 1 ; (1,1): 4^2 + 0^2 = 16 -> (1 + 16) / (2 * 2)
    loss = fgfi_loss(s, t, mask)
    assert loss.item() == pytest.approx(17 / 4)
    loss.backward()
    assert s.grad[0, 0, 0, 1] == 0 and s.grad[0, 0, 1, 1] == pytest.approx(-4 / 2)  # d/ds (s-t)^2/4 = (s-t)/2
    empty = fgfi_loss(s, t, torch.zeros(1, 2, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_pkd_loss_is_one_minus_pearson():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) + 0.5 * s
    n = 2 * 4 * 5
    r = [np.corrcoef(s[:, c].flatten().numpy(), t[:, c].flatten().numpy())[0, 1] for c in range(3)]
    expected = float(np.mean([(n - 1) / n * (1 - rc) for rc in r]))
    assert pkd_loss(s, t).item() == pytest.approx(expected, rel=1e-5)  # 1e-6 eps in the std
    # invariant to scale and shift of the teacher; zero for identical features
    assert pkd_loss(s, 3 * t + 7).item() == pytest.approx(pkd_loss(s, t).item(), rel=1e-5)
    assert pkd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-10)
    sg = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pkd_loss(x, t), (sg,))
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        pkd_loss(torch.zeros(1, 3, 1, 1), torch.zeros(1, 3, 1, 1))


def test_multilevel_fgfi_pools_the_levels_as_one_set_of_locations():
    """Σ_l masked squared differences / (2 Σ_l N_p), against a hand computation on two levels."""
    from cls2det.distill import fgfi_multilevel_loss

    s = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    t = [torch.ones(1, 2, 2, 2), torch.full((1, 2, 1, 1), 2.0)]
    masks = [torch.tensor([[[True, False], [False, False]]]), torch.tensor([[[True]]])]
    # level 0: one location, 2 channels x 1² = 2; level 1: one location, 2 channels x 2² = 8; N_p = 2
    assert fgfi_multilevel_loss(s, t, masks).item() == pytest.approx((2 + 8) / (2 * 2))
    empty = [torch.zeros_like(m) for m in masks]
    assert fgfi_multilevel_loss(s, t, empty).item() == 0


def test_multilevel_pkd_sums_levels_and_skips_a_single_value_level():
    from cls2det.distill import pkd_loss, pkd_multilevel_loss

    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(1, 3, 1, 1, generator=g)]
    t = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(1, 3, 1, 1, generator=g)]
    assert pkd_multilevel_loss(s, t).item() == pytest.approx(pkd_loss(s[0], t[0]).item())
