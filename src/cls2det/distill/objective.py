"""The paper's total loss (eq. 12): the detector's own losses plus the weighted distillation terms.

This is the glue between a student adapter's :class:`~cls2det.students.StudentOutput` and the frozen teacher;
the losses themselves are the pure functions of :mod:`cls2det.distill.losses`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from cls2det.config import DistillConfig
from cls2det.distill.crops import crop_boxes, sanitize_boxes
from cls2det.distill.losses import kd_cls_loss, kd_loc_loss, loc_loss
from cls2det.students.base import Positives, StudentOutput


def subsample_positives(positives: Positives, max_count: int, generator: torch.Generator | None = None) -> Positives:
    """At most ``max_count`` positives, drawn uniformly without replacement (bounds the teacher's cost)."""
    if len(positives) <= max_count:
        return positives
    keep = torch.randperm(len(positives), generator=generator)[:max_count].to(positives.labels.device)
    return positives.subset(keep)


def distillation_losses(
    output: StudentOutput, teacher, config: DistillConfig, *, generator: torch.Generator | None = None,
    soft_labels: Callable[[Positives], Tensor] | None = None,
    gt_features: Callable[[Positives], list[Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Unweighted KD terms ``{"kd_cls", "loc", "kd_loc"}`` (those in ``config.kd``) for one batch.

    ``teacher`` (a frozen :class:`~cls2det.teacher.Teacher`, may be None when only ``loc`` is asked) sees crops in
    0..1 pixels: the detector's normalised batch is mapped back with its own mean/std, so the crops are exactly the
    pixels the detector saw (after its resize) and the teacher applies its own normalisation.
    ``soft_labels(positives) -> [K, C]``, when given, returns KD_cls's teacher logits from a cache instead;
    ``gt_features(positives) -> L x [K, M_l, P, P]`` likewise KD_loc's pooled GT-crop taps (``config.taps`` order),
    so that the teacher runs on the predicted crops only. Both are called with the subsampled positives.
    """
    if not config.kd:
        return {}
    positives = subsample_positives(output.positives, config.max_positives, generator)
    images = output.images
    mean = output.image_mean.to(images)[None, :, None, None]
    std = output.image_std.to(images)[None, :, None, None]
    pixels = images * std + mean  # [N, 3, H, W] in 0..1
    height, width = images.shape[-2:]
    gt_boxes = positives.gt_boxes.detach()
    pred_boxes = sanitize_boxes(positives.pred_boxes, height, width)
    index = positives.image_index

    losses: dict[str, Tensor] = {}
    if "cls" in config.kd:
        if soft_labels is not None:
            teacher_logits = soft_labels(positives).to(positives.logits.device)  # [K, C]
        else:
            with torch.no_grad():
                gt_crops = crop_boxes(pixels, gt_boxes, index, size=teacher.input_size)  # [K, 3, S, S]
                teacher_logits = teacher(gt_crops).float()  # [K, C]
        losses["kd_cls"] = kd_cls_loss(
            positives.logits.float(), teacher_logits, positives.labels, head=positives.head,
            temperature=config.temperature,
        )
    if "loc" in config.kd:
        losses["loc"] = loc_loss(pixels, pred_boxes, gt_boxes, index, size=config.sample_size, pool=config.loc_pool)
    if "kd_loc" in config.kd:
        taps = list(config.taps)
        cached = None if gt_features is None else [f.to(pixels.device) for f in gt_features(positives)]
        losses["kd_loc"] = kd_loc_loss(
            lambda crops: teacher.forward_taps(crops, taps), pixels, pred_boxes, gt_boxes, index,
            size=config.sample_size, pools=[config.pool] * len(taps), gt_features=cached,
        )
    return losses


LOSS_WEIGHTS = {"kd_cls": "lambda_kd_cls", "loc": "lambda_loc", "kd_loc": "lambda_kd_loc"}


def total_loss(detector_losses: dict[str, Tensor], kd_losses: dict[str, Tensor], config: DistillConfig) -> Tensor:
    """Eq. (12): ``sum(L_det) + lambda_kc*KD_cls + lambda_kl*KD_loc + lambda_l*loc``."""
    total = sum(detector_losses.values())
    for name, value in kd_losses.items():
        total = total + getattr(config, LOSS_WEIGHTS[name]) * value
    return total
