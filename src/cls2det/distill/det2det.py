"""Detector-to-detector distillation baselines, as pure functions (teacher and student are both detectors).

* :func:`logit_kd_loss` Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation",
  NeurIPS 2017: soft-label KD on the classification outputs of matched positives.
* :func:`fgfi_mask`, :func:`fgfi_level_masks`, :func:`fgfi_loss` Wang et al., "Distilling Object Detectors with
  Fine-grained Feature Imitation", CVPR 2019: feature imitation restricted to the anchor locations near GT objects;
  :func:`fgfi_multilevel_loss` over the levels of a feature pyramid.
* :func:`pkd_loss` Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation
  Coefficient", NeurIPS 2022: MSE between per-channel standardised features (= 1 - Pearson correlation);
  :func:`pkd_multilevel_loss` over the levels of a feature pyramid.

Teacher tensors are detached everywhere: gradients reach the student only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from .losses import HEADS, compute_dtype, kl_terms, zero_loss


def logit_kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, head: str, temperature: float = 1.0) -> Tensor:
    """Logit distillation between two detectors (Chen et al. 2017, soft-label term L_soft = −Σ_c P_t,c log P_s,c),
    written as the KL it differs from by the teacher's constant entropy, with Hinton's T² factor::

        softmax: 1/K Σ_k T² Σ_c p_t,c (log p_t,c − log p_s,c),    p = softmax(z / T) over all D outputs
        sigmoid: 1/K Σ_k T²/C Σ_c KL([1−q_t,c, q_t,c] || [1−q_s,c, q_s,c]),    q = sigmoid(z / T)

    Unlike :func:`~cls2det.distill.kd_cls_loss` both networks have the same outputs, background included.

    Args:
        student_logits: [K, D] logits of the K matched positives (D = C+1 for softmax heads, C for sigmoid heads).
        teacher_logits: [K, D] the teacher detector's logits for the same positives (detached).
        head: "softmax" or "sigmoid".
        temperature: T > 0.

    Returns:
        0-dim tensor in ``student_logits``' dtype; zero attached to the graph when K == 0.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must be equal [K, D], got {list(student_logits.shape)} and "
            f"{list(teacher_logits.shape)}"
        )
    out_dtype = student_logits.dtype
    if student_logits.shape[0] == 0:
        return zero_loss(student_logits, out_dtype)
    dtype = compute_dtype(out_dtype)
    z_s = student_logits.to(dtype) / temperature  # [K, D]
    z_t = teacher_logits.detach().to(dtype) / temperature  # [K, D]
    if head == "softmax":
        log_p_s, log_p_t = F.log_softmax(z_s, dim=1), F.log_softmax(z_t, dim=1)
        kl = kl_terms(log_p_t.exp(), log_p_t, log_p_s).sum(dim=1)  # [K]
    else:
        log_q_s, log_1mq_s = F.logsigmoid(z_s), F.logsigmoid(-z_s)
        log_q_t, log_1mq_t = F.logsigmoid(z_t), F.logsigmoid(-z_t)
        kl_c = kl_terms(log_q_t.exp(), log_q_t, log_q_s) + kl_terms(log_1mq_t.exp(), log_1mq_t, log_1mq_s)
        kl = kl_c.mean(dim=1)  # [K], the 1/C of the per-class sum
    return (temperature**2 * kl.mean()).to(out_dtype)


def fgfi_mask(anchors_iou: Tensor, psi: float = 0.5) -> Tensor:
    """The fine-grained imitation mask I of Wang et al. (2019).

    For each GT box g: M_g = max IoU over all anchors; keep the anchors with IoU > psi·M_g; a location is kept if
    any of its A anchors is kept (OR over anchors); the image's mask is the OR over its GT boxes.

    Args:
        anchors_iou: [..., G, H, W, A] IoU of each of G GT boxes with the A anchors of each feature-map location
            (e.g. ``box_iou(gt_boxes, anchors).view(G, H, W, A)`` for torchvision's location-major anchor order).
            Padding GT rows of zeros keep nothing.
        psi: the threshold factor ψ in (0, 1] (paper: 0.5).

    Returns:
        [..., H, W] bool mask.
    """
    if anchors_iou.dim() < 4:
        raise ValueError(f"anchors_iou must be [..., G, H, W, A], got shape {tuple(anchors_iou.shape)}")
    if not 0 < psi <= 1:
        raise ValueError(f"psi must be in (0, 1], got {psi}")
    g, h, w, a = anchors_iou.shape[-4:]
    if g == 0:
        return torch.zeros(anchors_iou.shape[:-4] + (h, w), dtype=torch.bool, device=anchors_iou.device)
    best = anchors_iou.flatten(-3).amax(dim=-1)  # [..., G] M_g
    keep = anchors_iou > psi * best[..., None, None, None]  # [..., G, H, W, A]
    return keep.any(dim=-1).any(dim=-3)  # OR over anchors, then over GT boxes -> [..., H, W]


def fgfi_level_masks(gt_boxes: Tensor, level_anchors: list[Tensor], psi: float = 0.5) -> list[Tensor]:
    """FGFI's mask for one image whose detector has several feature levels (FPN, SSD's maps).

    As :func:`fgfi_mask`, with M_g the max IoU of GT box g over the anchors of *every* level (Wang et al. take the
    max over all anchors of the image; with one level the two are the same)::

        keep_g,a = IoU(g, a) > psi * max_a' IoU(g, a'),   I_l[i, j] = OR over g and over the anchors at (l, i, j)

    Args:
        gt_boxes: [G, 4] the image's GT boxes, xyxy in the pixels of the anchors.
        level_anchors: per level [H_l, W_l, A_l, 4] anchors, xyxy.
        psi: the threshold factor ψ in (0, 1] (paper: 0.5).

    Returns:
        per level an [H_l, W_l] bool mask (all False when G == 0).
    """
    if not 0 < psi <= 1:
        raise ValueError(f"psi must be in (0, 1], got {psi}")
    shapes = [a.shape[:3] for a in level_anchors]
    if gt_boxes.shape[0] == 0:
        return [torch.zeros(s[:2], dtype=torch.bool, device=gt_boxes.device) for s in shapes]
    iou = box_iou(gt_boxes, torch.cat([a.reshape(-1, 4) for a in level_anchors]))  # [G, sum_l H_l W_l A_l]
    keep = iou > psi * iou.amax(dim=1, keepdim=True)  # [G, A]
    levels = keep.split([s.numel() for s in shapes], dim=1)  # L x [G, H_l W_l A_l]
    return [k.view(-1, *s).any(dim=-1).any(dim=0) for k, s in zip(levels, shapes)]  # L x [H_l, W_l]


def fgfi_loss(student_feat: Tensor, teacher_feat: Tensor, mask: Tensor) -> Tensor:
    """Fine-grained feature imitation loss of Wang et al. (2019)::

        L_imitation = 1/(2·N_p) Σ_{n,i,j} I_nij Σ_c (s_nijc − t_nijc)²,   N_p = Σ_{n,i,j} I_nij

    Args:
        student_feat: [N, M, H, W] the student's feature map after its adaptation layer (same channels as the teacher).
        teacher_feat: [N, M, H, W] the teacher's feature map (detached).
        mask: [N, H, W] bool or float imitation mask I (:func:`fgfi_mask`).

    Returns:
        0-dim tensor in ``student_feat``' dtype; zero attached to the graph when the mask is empty.
    """
    if student_feat.dim() != 4 or student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"student_feat and teacher_feat must be equal [N, M, H, W], got {list(student_feat.shape)} and "
            f"{list(teacher_feat.shape)}"
        )
    n, _, h, w = student_feat.shape
    if mask.shape != (n, h, w):
        raise ValueError(f"mask must be [N, H, W]={[n, h, w]}, got {list(mask.shape)}")
    dtype = compute_dtype(student_feat.dtype)
    weight = mask.to(dtype)[:, None]  # [N, 1, H, W]
    num_pos = weight.sum()
    sq = (student_feat.to(dtype) - teacher_feat.detach().to(dtype)).square()  # [N, M, H, W]
    loss = (weight * sq).sum() / (2 * num_pos.clamp(min=1))  # an empty mask gives 0 attached to the graph
    return loss.to(student_feat.dtype)


def _standardise_channels(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """[N, M, H, W] -> each channel shifted/scaled to mean 0, (unbiased) std 1 over its N·H·W values."""
    flat = feat.transpose(0, 1).flatten(1)  # [M, N*H*W]
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + eps)
    return flat.view(feat.shape[1], feat.shape[0], *feat.shape[2:]).transpose(0, 1)  # [N, M, H, W]


def pkd_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """PKD feature loss of Cao et al. (2022)::

        L_FD = 1/(2·N·M·H·W) Σ (ŝ − t̂)²,   x̂ = (x − mean_c(x)) / (std_c(x) + 1e-6)

    where mean_c / std_c are each channel's mean and unbiased standard deviation over the batch and spatial
    positions (as in the authors' implementation). With n = N·H·W this is the mean over channels of
    (n−1)/n · (1 − r_c), r_c the Pearson correlation of channel c: invariant to the scale and shift of either map.

    Args:
        student_feat: [N, M, H, W] student features (same shape as the teacher's; resize and adapt beforehand).
        teacher_feat: [N, M, H, W] teacher features (detached).

    Returns:
        0-dim tensor in ``student_feat``' dtype.
    """
    if student_feat.dim() != 4 or student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"student_feat and teacher_feat must be equal [N, M, H, W], got {list(student_feat.shape)} and "
            f"{list(teacher_feat.shape)}"
        )
    n, _, h, w = student_feat.shape
    if n * h * w < 2:
        raise ValueError(f"pkd_loss needs at least 2 values per channel, got N*H*W={n * h * w}")
    dtype = compute_dtype(student_feat.dtype)
    s = _standardise_channels(student_feat.to(dtype))
    t = _standardise_channels(teacher_feat.detach().to(dtype))
    return (F.mse_loss(s, t) / 2).to(student_feat.dtype)


def fgfi_multilevel_loss(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], masks: Sequence[Tensor]
) -> Tensor:
    """FGFI over a feature pyramid, its levels pooled as one set of imitation locations (one N_p)::

        L = Σ_l Σ_{n,i,j} I^l_nij Σ_c (s^l_nijc − t^l_nijc)² / (2 Σ_l N^l_p)

    Args:
        student_feats: L maps [N, M_l, H_l, W_l] of the student.
        teacher_feats: L maps of the same shapes, the teacher's (detached).
        masks: L masks [N, H_l, W_l] (:func:`fgfi_level_masks` per image, stacked).

    Returns:
        0-dim tensor; zero attached to the graph when every mask is empty.
    """
    counts = [m.sum() for m in masks]  # N_p of each level
    imitation = [fgfi_loss(s, t, m) * n for s, t, m, n in zip(student_feats, teacher_feats, masks, counts)]
    return torch.stack(imitation).sum() / torch.stack(counts).sum().clamp(min=1)


def pkd_multilevel_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    """PKD summed over the levels of a feature pyramid (as the PKD authors' code), skipping a level with fewer than
    2 values per channel (a 1x1 map of a 1-image batch has no per-channel std).

    Args: L student maps [N, M_l, H_l, W_l] and the teacher's of the same shapes. Returns a 0-dim tensor.
    """
    levels = [pkd_loss(s, t) for s, t in zip(student_feats, teacher_feats) if s.shape[0] * s.shape[2] * s.shape[3] >= 2]
    if not levels:
        return student_feats[0].sum() * 0
    return torch.stack(levels).sum()


def kd_cls_negatives_loss(student_logits: Tensor, teacher_logits: Tensor, *, head: str, temperature: float) -> Tensor:
    """KD_cls on negatives (beyond the paper, whose KD_cls sees positives only). A negative has no GT box and the
    classifier teacher no background class, so the target is the teacher's view of which foreground class the region
    looks like, and the background score is left to the detector's own loss::

        softmax heads: T² · KL(softmax(z_t / T) || softmax(z_s[:, 1:] / T))   the C foreground logits renormalised
        sigmoid heads: T² / C · Σ_c KL([1−q_t,c, q_t,c] || [1−q_s,c, q_s,c]),   q = sigmoid(z / T)

    averaged over the M negatives.

    Args:
        student_logits: [M, C+1] (softmax; column 0 = background) or [M, C] (sigmoid), the student's logits.
        teacher_logits: [M, C] the classifier teacher's logits on the crops of the negatives' boxes (detached).
        head: "softmax" or "sigmoid".
        temperature: T > 0.

    Returns:
        0-dim tensor; zero attached to ``student_logits``' graph when M == 0.
    """
    if head == "softmax":
        student_logits = student_logits[:, 1:]  # [M, C]: drop background, the teacher has no such class
    return logit_kd_loss(student_logits, teacher_logits, head=head, temperature=temperature)
