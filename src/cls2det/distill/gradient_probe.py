"""Does a localisation loss pull a box towards its GT box? A probe of the gradient a loss sends to the box corners.

A box loss can lift AP75 only if, for boxes that already overlap their GT box well (IoU 0.5-0.9), its gradient with
respect to the box points towards the GT box. :func:`boxes_at_iou` displaces GT boxes to a chosen IoU in random
directions; :func:`gradient_alignment` measures, per box, the cosine between the descent direction ``-dL/dB`` and the
direction to the GT box ``B* - B`` (1: straight at the GT box; 0: no localisation signal; < 0: away from it), and
whether a small step along ``-dL/dB`` raises the IoU.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou


def boxes_at_iou(gt_boxes: Tensor, iou: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Boxes at IoU ``iou`` with their GT box, each moved along one random direction of its four corners.

    Box k is ``B*_k + a_k · d_k ⊙ (w_k, h_k, w_k, h_k)`` with ``d_k`` a random unit vector in R^4 and ``a_k >= 0``
    found by bisection so that IoU(B_k, B*_k) = ``iou`` (to 1e-6: IoU is continuous in ``a``, 1 at ``a = 0`` and 0
    once the box is empty or far away, so the bisection always brackets a crossing).

    Args:
        gt_boxes: [K, 4] xyxy, positive width and height.
        iou: target IoU in (0, 1].
        generator: for the random directions.

    Returns:
        [K, 4] xyxy boxes in the units of ``gt_boxes``.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    gt = gt_boxes.double()
    size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)  # [K, 4] (w, h, w, h)
    direction = F.normalize(torch.randn(gt.shape, generator=generator, dtype=torch.float64), dim=1)
    # bisection on a in [0, hi]: IoU(a) falls from 1; hi = 4 box sizes is far past IoU 0 for any direction
    lo = torch.zeros(len(gt), dtype=torch.float64)
    hi = torch.full_like(lo, 4.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        boxes = gt + mid[:, None] * direction * size
        valid = (boxes[:, 2:] > boxes[:, :2]).all(dim=1)
        overlap = box_iou(boxes, gt).diagonal().where(valid, torch.zeros_like(mid))
        too_far = overlap < iou
        hi = torch.where(too_far, mid, hi)
        lo = torch.where(too_far, lo, mid)
    return (gt + lo[:, None] * direction * size).to(gt_boxes.dtype)


def gradient_alignment(
    loss_fn: Callable[[Tensor], Tensor], boxes: Tensor, gt_boxes: Tensor, *, step: float = 0.5
) -> dict[str, Tensor]:
    """Per box: how well the descent direction of ``loss_fn`` points at the GT box.

    ``loss_fn(boxes)`` must be a sum or mean of per-box terms (as ``loc`` and ``KD_loc`` are: box k's term depends on
    box k only), so that the gradient of the total with respect to box k is that of box k's own term.

    Args:
        loss_fn: [K, 4] xyxy boxes -> 0-dim loss.
        boxes: [K, 4] xyxy, the boxes to probe (e.g. :func:`boxes_at_iou`).
        gt_boxes: [K, 4] xyxy, their GT boxes.
        step: length in pixels of the step along ``-dL/dB`` (normalised to unit length) whose IoU change is reported.

    Returns:
        ``cosine`` [K]: cos(-dL/dB_k, B*_k - B_k) (0 where the gradient is zero);
        ``iou_gain`` [K]: IoU(B_k + step · u_k, B*_k) - IoU(B_k, B*_k), u_k the unit descent direction;
        ``grad_norm`` [K]: |dL/dB_k| (loss units per pixel).
    """
    boxes = boxes.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(boxes), boxes)
    boxes = boxes.detach()
    descent = -grad.double()
    towards = (gt_boxes - boxes).double()
    cosine = F.cosine_similarity(descent, towards, dim=1, eps=1e-30)
    norm = descent.norm(dim=1)
    moved = boxes.double() + step * descent / norm.clamp_min(1e-30)[:, None]
    before = box_iou(boxes.double(), gt_boxes.double()).diagonal()
    after = box_iou(moved, gt_boxes.double()).diagonal()
    zero = norm == 0
    return {
        "cosine": cosine.where(~zero, torch.zeros_like(cosine)),
        "iou_gain": (after - before).where(~zero, torch.zeros_like(before)),
        "grad_norm": norm,
    }
