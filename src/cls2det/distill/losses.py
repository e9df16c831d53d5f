"""The distillation losses of Guo, Alvarez, Salzmann, "Distilling Image Classifiers in Object Detectors" (NeurIPS
2021, arXiv:2106.05209), as pure functions of tensors.

* :func:`kd_cls_loss`  eq. (1)-(7): KL between the classifier teacher's and the detector student's class posteriors.
* :func:`loc_loss`     eq. (11):    L1 between pooled pixel crops of the predicted and the ground-truth boxes.
* :func:`kd_loc_loss`  eq. (10):    L1 between the teacher's pooled features of those two crops.

Every function returns a 0-dim tensor in the inputs' dtype and device, and accepts K == 0 positives: it then returns
a zero still attached to the differentiable input's graph, so ``loss.backward()`` works and nothing is NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .crops import crop_boxes

HEADS = ("softmax", "sigmoid")


def zero_loss(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A 0-dim zero connected to ``x``'s graph (``x`` may be empty)."""
    return x.sum().to(dtype) * 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least: half-precision log-probabilities lose the small KL values the loss is made of."""
    return torch.promote_types(dtype, torch.float32)


def kl_terms(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise ``p * (log p - log q)`` with the convention 0·log 0 = 0 (also when log q = -inf)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=p.dtype, device=p.device))


def kd_cls_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, head: str, temperature: float = 2.0
) -> Tensor:
    """Classification distillation KD_cls, eq. (1): ``1/K · Σ_k KL(p_t,k || p_s,k)``, with T² inside the KL.

    ``head="softmax"`` (Faster R-CNN box head, SSD), eq. (2)-(4)::

        p_s = softmax(z_s / T) over the C+1 outputs,  p_t = [0 (background), softmax(z_t / T) over the C classes]
        KL  = T² · Σ_{c=1..C} p_t,c (log p_t,c − log p_s,c)          (0·log 0 = 0; the background term vanishes)

    ``head="sigmoid"`` (RetinaNet, FCOS), eq. (5)-(7): with q = sigmoid(z / T) per class, each class c is the 2-state
    distribution [1−q_c, q_c] if c is the label l, else [q_c, 1−q_c], for both networks::

        KL  = T² / C · Σ_c Σ_i p_t,c(i) (log p_t,c(i) − log p_s,c(i))

    The state order given by the label permutes teacher and student alike, so it leaves the KL unchanged: ``labels``
    fixes eq. (6) but does not alter the value (the tests check this against the literal per-label formula).

    Args:
        student_logits: [K, C+1] (softmax; column 0 = background, column c+1 = class c, torchvision's order)
            or [K, C] (sigmoid), the student's logits of its K positives.
        teacher_logits: [K, C] the classifier teacher's logits on the crops of the positives' assigned GT boxes.
            Treated as constants (detached): the teacher is frozen.
        labels: [K] int64 in [0, C), the assigned GT classes.
        head: "softmax" or "sigmoid".
        temperature: T > 0 (paper default 2).

    Returns:
        0-dim tensor in ``student_logits``' dtype; zero (attached to ``student_logits``' graph) when K == 0.
        Log-probabilities come from ``log_softmax`` / ``logsigmoid``, so ±1e4 logits stay finite.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            f"student_logits and teacher_logits must be 2-D, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    num_pos, num_classes = teacher_logits.shape
    expected = (num_pos, num_classes + 1) if head == "softmax" else (num_pos, num_classes)
    if tuple(student_logits.shape) != expected:
        raise ValueError(
            f"student_logits must be {list(expected)} for head={head!r} and teacher_logits "
            f"{list(teacher_logits.shape)}, got {list(student_logits.shape)}"
        )
    if labels.shape != (num_pos,):
        raise ValueError(f"labels must be [K]={num_pos}, got shape {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError("teacher_logits must have at least one class column")
    out_dtype = student_logits.dtype
    if num_pos == 0:
        return zero_loss(student_logits, out_dtype)

    dtype = compute_dtype(out_dtype)
    z_s = student_logits.to(dtype) / temperature  # [K, C+1] or [K, C]
    z_t = teacher_logits.detach().to(dtype) / temperature  # [K, C]
    if head == "softmax":
        log_p_s = F.log_softmax(z_s, dim=1)[:, 1:]  # [K, C] foreground columns; p_t(background) = 0 drops column 0
        log_p_t = F.log_softmax(z_t, dim=1)  # [K, C]
        kl = kl_terms(log_p_t.exp(), log_p_t, log_p_s).sum(dim=1)  # [K]
    else:
        # the two states of class c: q and 1 - q, as log-probabilities (logsigmoid(-z) = log(1 - sigmoid(z)))
        log_q_s, log_1mq_s = F.logsigmoid(z_s), F.logsigmoid(-z_s)  # [K, C] each
        log_q_t, log_1mq_t = F.logsigmoid(z_t), F.logsigmoid(-z_t)
        kl_c = kl_terms(log_q_t.exp(), log_q_t, log_q_s) + kl_terms(log_1mq_t.exp(), log_1mq_t, log_1mq_s)
        kl = kl_c.sum(dim=1) / num_classes  # [K]
    return (temperature**2 * kl.mean()).to(out_dtype)


def _check_box_pairs(images: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, image_index: Tensor) -> int:
    if pred_boxes.dim() != 2 or pred_boxes.shape[1] != 4:
        raise ValueError(f"pred_boxes must be [K, 4] xyxy, got shape {tuple(pred_boxes.shape)}")
    if gt_boxes.shape != pred_boxes.shape:
        raise ValueError(f"gt_boxes must match pred_boxes {list(pred_boxes.shape)}, got {list(gt_boxes.shape)}")
    if image_index.shape != (pred_boxes.shape[0],):
        raise ValueError(f"image_index must be [K]={pred_boxes.shape[0]}, got shape {tuple(image_index.shape)}")
    if images.dim() != 4:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    return pred_boxes.shape[0]


def _mean_abs_diff(a: Tensor, b: Tensor) -> Tensor:
    dtype = compute_dtype(a.dtype)
    return (a.to(dtype) - b.to(dtype)).abs().mean()


def loc_loss(
    images: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, image_index: Tensor, *, size: int = 112, pool: int = 4
) -> Tensor:
    """Teacher-free localisation loss "loc", eq. (11): the obj level of eq. (10) without a teacher::

        L_loc = 1/(K·3·P·P) Σ_k |AP_P(crop(B_k)) − AP_P(crop(B*_k))|

    where crop is eq. (8)-(9) at s x s (:func:`crop_boxes`), AP_P an adaptive average pool to P x P, B_k the
    student's predicted box and B*_k its assigned GT box.

    Args:
        images: [N, 3, H, W] the batch the detector saw (pixels in any normalisation; not differentiated).
        pred_boxes: [K, 4] xyxy pixels of ``images``, the decoded predictions; gradients flow into them only.
        gt_boxes: [K, 4] xyxy pixels, the assigned GT boxes (cropped under ``torch.no_grad``).
        image_index: [K] int64, the image of each positive.
        size: s, the crop side in pixels (paper: 112).
        pool: P, the pooled side (paper's ablation: 2..16).

    Returns:
        0-dim tensor in ``images.dtype``, in the units of ``images``' pixels; zero (attached to ``pred_boxes``'
        graph) when K == 0. Use :func:`~cls2det.distill.crops.sanitize_boxes` on predictions first.
    """
    if _check_box_pairs(images, pred_boxes, gt_boxes, image_index) == 0:
        return zero_loss(pred_boxes, images.dtype)
    images = images.detach()
    pred = F.adaptive_avg_pool2d(crop_boxes(images, pred_boxes, image_index, size=size), pool)  # [K, 3, P, P]
    with torch.no_grad():
        gt = F.adaptive_avg_pool2d(crop_boxes(images, gt_boxes, image_index, size=size), pool)  # [K, 3, P, P]
    return _mean_abs_diff(pred, gt).to(images.dtype)


def kd_loc_loss(
    features: Callable[[Tensor], Sequence[Tensor]],
    images: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    image_index: Tensor,
    *,
    size: int = 112,
    pools: Sequence[int],
    gt_features: Sequence[Tensor] | None = None,
    is_pixel_level: Sequence[bool] | None = None,
) -> Tensor:
    """Localisation distillation KD_loc, eq. (10), normalised as the authors' release computes it::

        D_l(k)   = Σ |AP_l(F_l(crop(B_k))) − AP_l(F_l(crop(B*_k)))| / (M_l·P_l·P_l)     one level l, one positive k
        L_kd_loc = 1/K Σ_k ( Σ_{l pixel} D_l(k)  +  1/|T| Σ_{l in T} D_l(k) )

    i.e. the pixel ("obj") level is added as is and the teacher layers T are averaged (a term with only pixel levels
    or only teacher layers keeps just its sum or its mean). The predicted box B_k and the GT box B*_k are cropped by
    eq. (8)-(9) (:func:`crop_boxes`), both crops go through ``features`` (the frozen teacher's taps F_l; for a pixel
    level F_l is the teacher's input, the crop itself), and each map is adaptive-average-pooled to P_l x P_l (the
    release: the obj level at 4, the j-th teacher layer at 4·2^(j+1)). The GT branch runs under ``torch.no_grad``;
    gradients reach ``pred_boxes`` only (through the teacher, whose weights should be frozen). The GT branch is a
    constant per (image, GT box, flip), so it can come precomputed (``gt_features``, e.g. from
    :class:`~cls2det.engine.teacher_cache.GTFeatureCache`); ``features`` then runs on the predicted crops only.

    Args:
        features: callable, crops [K, 3, s, s] -> list of L feature maps [K, M_l, H_l, W_l] (e.g. the teacher's
            ``forward_taps`` with its taps bound); a single Tensor counts as L = 1.
        images: [N, 3, H, W] the batch the detector saw, in the pixel space ``features`` expects.
        pred_boxes: [K, 4] xyxy pixels of ``images``, the decoded predictions.
        gt_boxes: [K, 4] xyxy pixels, the assigned GT boxes.
        image_index: [K] int64, the image of each positive.
        size: s, the crop side in pixels (paper: 112).
        pools: L ints P_l, one per map (release: obj 4, l0 8, l1 16, ...).
        gt_features: optional L tensors [K, M_l, P_l, P_l], the pooled maps of the GT crops
            (``AP_l(F_l(crop(B*_k)))``, any float dtype, treated as constants); ``gt_boxes`` are then only checked
            for their shape.
        is_pixel_level: L bools, True for a pixel level (summed), False for a teacher layer (averaged with the other
            teacher layers); None = every map is a teacher layer (the plain mean over the L levels).

    Returns:
        0-dim tensor in ``images.dtype``; zero (attached to ``pred_boxes``' graph, without calling ``features``)
        when K == 0.
    """
    pools = list(pools)
    if not pools:
        raise ValueError("pools must name one pooled size per feature map, got none")
    is_pixel = [False] * len(pools) if is_pixel_level is None else [bool(p) for p in is_pixel_level]
    if len(is_pixel) != len(pools):
        raise ValueError(f"is_pixel_level has {len(is_pixel)} entries but pools has {len(pools)}: {pools}")
    num_pos = _check_box_pairs(images, pred_boxes, gt_boxes, image_index)
    if num_pos == 0:
        return zero_loss(pred_boxes, images.dtype)
    images = images.detach()

    def pooled_maps(boxes: Tensor) -> list[Tensor]:
        maps = features(crop_boxes(images, boxes, image_index, size=size))
        maps = [maps] if isinstance(maps, Tensor) else list(maps)
        if len(maps) != len(pools):
            raise ValueError(f"features returned {len(maps)} maps but pools has {len(pools)} sizes: {pools}")
        return [F.adaptive_avg_pool2d(f, p) for f, p in zip(maps, pools)]  # each [K, M_l, P_l, P_l]

    pred = pooled_maps(pred_boxes)
    if gt_features is None:
        with torch.no_grad():
            gt = pooled_maps(gt_boxes)
    else:
        gt = [g.detach() for g in ([gt_features] if isinstance(gt_features, Tensor) else gt_features)]
        shapes = [list(p.shape) for p in pred]
        if [list(g.shape) for g in gt] != shapes:
            raise ValueError(
                f"gt_features must be {len(shapes)} tensors of shapes {shapes} (the pooled maps of the "
                f"predicted crops), got {[list(g.shape) for g in gt]}"
            )
    # Σ_k D_l(k) / K = the mean over the K·M_l·P_l·P_l values of level l
    levels = [_mean_abs_diff(p, g) for p, g in zip(pred, gt)]
    pixel = [d for d, is_p in zip(levels, is_pixel) if is_p]
    teacher = [d for d, is_p in zip(levels, is_pixel) if not is_p]
    total = cast(Tensor, sum(pixel) + (sum(teacher) / len(teacher) if teacher else 0))  # there is at least one level
    return total.to(images.dtype)
