"""Property test: every loss stays finite, with finite gradients, on extreme logits and garbage boxes."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cls2det.distill import kd_cls_loss, kd_loc_loss, loc_loss, sanitize_boxes

_logit = st.one_of(st.sampled_from([1e4, -1e4, 0.0, 50.0, -50.0]), st.floats(-1e4, 1e4, allow_nan=False))
_coord = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, 24.0, 32.0]),
    st.floats(-100, 100, allow_nan=False),
)


@st.composite
def _cases(draw):
    k, c = draw(st.integers(0, 8)), draw(st.integers(1, 5))
    head = draw(st.sampled_from(["softmax", "sigmoid"]))
    width = c + (head == "softmax")
    student = draw(st.lists(_logit, min_size=k * width, max_size=k * width))
    teacher = draw(st.lists(_logit, min_size=k * c, max_size=k * c))
    labels = draw(st.lists(st.integers(0, c - 1), min_size=k, max_size=k))
    pred = draw(st.lists(_coord, min_size=4 * k, max_size=4 * k))
    gt = draw(st.lists(_coord, min_size=4 * k, max_size=4 * k))
    index = draw(st.lists(st.integers(0, 1), min_size=k, max_size=k))
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0, 8.0]))
    return k, c, head, width, student, teacher, labels, pred, gt, index, temperature


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CPU shared in CI
@given(_cases())
def test_losses_and_gradients_are_finite(case):
    k, c, head, width, student, teacher, labels, pred, gt, index, temperature = case
    s = torch.tensor(student, dtype=torch.float32).view(k, width).requires_grad_()
    t = torch.tensor(teacher, dtype=torch.float32).view(k, c)
    cls = kd_cls_loss(s, t, torch.tensor(labels, dtype=torch.int64), head=head, temperature=temperature)
    cls.backward()
    assert torch.isfinite(cls) and cls.item() >= -1e-4  # a KL is non-negative (up to rounding)
    assert torch.isfinite(s.grad).all()

    images = torch.rand(2, 3, 24, 32)
    raw_pred = torch.tensor(pred, dtype=torch.float32).view(k, 4).requires_grad_()
    pred_boxes = sanitize_boxes(raw_pred, 24, 32)
    gt_boxes = sanitize_boxes(torch.tensor(gt, dtype=torch.float32).view(k, 4), 24, 32)
    image_index = torch.tensor(index, dtype=torch.int64)
    loc = loc_loss(images, pred_boxes, gt_boxes, image_index, size=8, pool=2)
    kd_loc = kd_loc_loss(
        lambda x: [x, x.mean(dim=1, keepdim=True).square()],
        images,
        pred_boxes,
        gt_boxes,
        image_index,
        size=8,
        pools=[2, 1],
        is_pixel_level=[True, False],
    )
    (loc + kd_loc).backward()
    assert torch.isfinite(loc) and torch.isfinite(kd_loc)
    assert torch.isfinite(raw_pred.grad).all()
