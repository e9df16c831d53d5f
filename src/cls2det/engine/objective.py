"""The paper's total loss (eq. 12): the detector's own losses plus the weighted distillation terms.

This is the glue between a student adapter's :class:`~cls2det.students.StudentOutput` and the frozen teachers
(the classifier, and for the det2det baselines a detector of the student's family); the losses themselves are the
pure functions of :mod:`cls2det.distill.losses` and :mod:`cls2det.distill.det2det`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import Tensor

from cls2det.config import DistillConfig, det_methods
from cls2det.distill.crops import crop_boxes, sanitize_boxes
from cls2det.distill.det2det import (
    fgfi_level_masks,
    fgfi_multilevel_loss,
    kd_cls_negatives_loss,
    logit_kd_loss,
    pkd_multilevel_loss,
)
from cls2det.distill.losses import kd_cls_loss, kd_loc_loss, loc_loss
from cls2det.students.base import Negatives, Positives, StudentAdapter, StudentOutput
from cls2det.teacher.protocol import TeacherLike


def subsample_positives(positives: Positives, max_count: int, generator: torch.Generator | None = None) -> Positives:
    """At most ``max_count`` positives, drawn uniformly without replacement (bounds the teacher's cost), in their
    original order (adapters list them image by image, which spares :func:`crop_boxes` a reordering)."""
    if len(positives) <= max_count:
        return positives
    keep = torch.randperm(len(positives), generator=generator)[:max_count].sort().values.to(positives.labels.device)
    return positives.subset(keep)


def precision_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for a Fabric-style precision name, e.g. of the teacher's passes for
    ``distill.teacher_precision``: ``"auto"`` leaves the enclosing one in force (Fabric's ``train.precision``),
    ``"32-true"`` turns autocast off, ``"bf16-mixed"`` / ``"16-mixed"`` run convolutions and matmuls in bfloat16 /
    float16 (the teacher's features then come out in that dtype; the losses are computed in float32)."""
    if precision == "auto":
        return contextlib.nullcontext()
    if precision == "32-true":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)


def distillation_losses(
    output: StudentOutput,
    teacher: TeacherLike | None,
    config: DistillConfig,
    *,
    generator: torch.Generator | None = None,
    soft_labels: Callable[[Positives], Tensor] | None = None,
    gt_features: Callable[[Positives], list[Tensor]] | None = None,
    det_teacher: StudentAdapter | None = None,
) -> dict[str, Tensor]:
    """Unweighted KD terms ``{"kd_cls", "loc", "kd_loc", "det_logit", "det_fgfi", "det_pkd"}`` (those in
    ``config.kd``) for one batch, on at most ``config.max_positives`` positives (KD_cls from the soft-label cache: on
    every positive, it costs a lookup).

    ``teacher`` / ``soft_labels`` / ``gt_features``: see :func:`classifier_losses`; ``det_teacher`` (a frozen adapter
    of the student's family, needed by the ``det:*`` terms): see :func:`det2det_losses`.
    """
    if not config.kd:
        return {}
    positives = subsample_positives(output.positives, config.max_positives, generator)
    losses = classifier_losses(output, positives, teacher, config, soft_labels=soft_labels, gt_features=gt_features)
    losses.update(det2det_losses(output, positives, det_teacher, config))
    return losses


def classifier_losses(
    output: StudentOutput,
    positives: Positives,
    teacher: TeacherLike | None,
    config: DistillConfig,
    *,
    soft_labels: Callable[[Positives], Tensor] | None = None,
    gt_features: Callable[[Positives], list[Tensor]] | None = None,
) -> dict[str, Tensor]:
    """The paper's terms ``kd_cls``, ``loc``, ``kd_loc`` of ``config.kd``, unweighted; ``{}`` when none is asked;
    with ``config.kd_cls_negatives`` > 0 also ``kd_cls_neg`` (:func:`negatives_kd_cls`, beyond the paper).

    ``teacher`` (a frozen :class:`~cls2det.teacher.Teacher`, may be None when only ``loc`` is asked) sees crops in
    0..1 pixels: the detector's normalised batch is mapped back with its own mean/std, so the crops are exactly the
    pixels the detector saw (after its resize) and the teacher applies its own normalisation. Its passes run in
    ``config.teacher_precision`` (:func:`precision_autocast`).
    ``soft_labels(positives) -> [K, C]``, when given, returns KD_cls's teacher logits from a cache instead;
    ``gt_features(positives) -> L x [K, M_l, P_l, P_l]`` likewise KD_loc's pooled GT-crop taps (``config.taps``
    order, pooled to ``config.tap_pools()``), so that the teacher runs on the predicted crops only. ``soft_labels`` is
    called with every positive of the batch (``output.positives``), ``gt_features`` with the subsampled ones.
    """
    losses: dict[str, Tensor] = {}
    if not set(config.kd) & {"cls", "loc", "kd_loc"}:
        return losses
    images = output.images
    mean = output.image_mean.to(images)[None, :, None, None]
    std = output.image_std.to(images)[None, :, None, None]
    pixels = images * std + mean  # [N, 3, H, W] in 0..1
    height, width = images.shape[-2:]
    gt_boxes = positives.gt_boxes.detach()
    pred_boxes = sanitize_boxes(positives.pred_boxes, height, width)
    index = positives.image_index
    precision = config.teacher_precision

    if "cls" in config.kd:
        if soft_labels is not None:
            cls_positives = output.positives  # a cache lookup: every positive, not the capped subset
            teacher_logits = soft_labels(cls_positives).to(cls_positives.logits.device)  # [K_all, C]
        else:
            assert teacher is not None, "KD_cls without a soft-label cache needs the teacher"
            cls_positives = positives
            with torch.no_grad():
                gt_crops = crop_boxes(pixels, gt_boxes, index, size=teacher.input_size)  # [K, 3, S, S]
                with precision_autocast(precision, pixels.device):
                    teacher_logits = teacher(gt_crops).float()  # [K, C]
        losses["kd_cls"] = kd_cls_loss(
            cls_positives.logits.float(),
            teacher_logits,
            cls_positives.labels,
            head=cls_positives.head,
            temperature=config.temperature,
        )
        if config.kd_cls_negatives:
            with precision_autocast(precision, pixels.device):
                losses["kd_cls_neg"] = negatives_kd_cls(output, pixels, teacher, config.temperature)
    if "loc" in config.kd:
        losses["loc"] = loc_loss(pixels, pred_boxes, gt_boxes, index, size=config.sample_size, pool=config.loc_pool)
    if "kd_loc" in config.kd:
        taps = list(config.taps)

        def teacher_taps(crops: Tensor) -> list[Tensor]:
            assert teacher is not None, "KD_loc needs the teacher"
            with precision_autocast(precision, crops.device):
                return teacher.forward_taps(crops, taps)

        cached = None if gt_features is None else [f.to(pixels.device) for f in gt_features(positives)]
        losses["kd_loc"] = kd_loc_loss(
            teacher_taps,
            pixels,
            pred_boxes,
            gt_boxes,
            index,
            size=config.sample_size,
            pools=config.tap_pools(),
            gt_features=cached,
            is_pixel_level=[tap == "obj" for tap in taps],
        )
    return losses


def negatives_kd_cls(output: StudentOutput, pixels: Tensor, teacher: TeacherLike | None, temperature: float) -> Tensor:
    """KD_cls on the student's negatives (``output.negatives``, M of them; beyond the paper): the frozen teacher's
    logits on the crop of each negative's anchor / proposal box, clipped to its image (online, no gradient), against
    the student's (:func:`~cls2det.distill.kd_cls_negatives_loss`). ``pixels`` [N, 3, H, W] is the batch in 0..1.
    Returns a 0-dim tensor, zero (attached to the student's graph) when M == 0."""
    negatives: Negatives | None = output.negatives
    if negatives is None:
        raise ValueError(
            "distill.kd_cls_negatives > 0 but the student returned no negatives: set the adapter's max_negatives to it"
        )
    student_logits = negatives.logits.float()  # [M, C+1] (softmax) or [M, C] (sigmoid)
    if len(negatives) == 0:
        return student_logits.sum() * 0
    assert teacher is not None, "KD_cls on negatives needs the teacher"
    sizes = torch.tensor(output.image_sizes, dtype=pixels.dtype, device=pixels.device)[negatives.image_index]  # [M, 2]
    with torch.no_grad():
        boxes = sanitize_boxes(negatives.boxes, sizes[:, 0], sizes[:, 1])  # anchors reach past the image's edges
        crops = crop_boxes(pixels, boxes, negatives.image_index, size=teacher.input_size)  # [M, 3, S, S]
        teacher_logits = teacher(crops).float()  # [M, C]
    return kd_cls_negatives_loss(student_logits, teacher_logits, head=negatives.head, temperature=temperature)


def det2det_losses(
    output: StudentOutput, positives: Positives, det_teacher: StudentAdapter | None, config: DistillConfig
) -> dict[str, Tensor]:
    """The ``det:*`` terms of ``config.kd``: ``det_logit`` (Chen et al. 2017), ``det_fgfi`` (Wang et al. 2019),
    ``det_pkd`` (Cao et al. 2022), unweighted; ``{}`` when none is asked.

    The teacher runs once, without gradient, on the student's own batch (:meth:`StudentAdapter.teach`).
      * det_logit: :func:`logit_kd_loss` between the student's and the teacher's class logits of ``positives``.
      * det_fgfi: :func:`fgfi_loss` on every feature level, the levels pooled as one set of locations (one N_p, the
        sum over levels of masked squared differences / 2 N_p); masks from :func:`fgfi_level_masks`.
      * det_pkd: :func:`pkd_loss` summed over the feature levels (as the PKD authors' code), skipping a level with
        fewer than 2 values per channel (a 1x1 map of a 1-image batch has no per-channel std).
    """
    methods = det_methods(config.kd)
    if not methods:
        return {}
    if det_teacher is None:
        raise ValueError(f"distill.kd {','.join(config.kd)} needs a detector teacher: set distill.det_teacher")
    taught = det_teacher.teach(output, positives if "logit" in methods else None)
    losses: dict[str, Tensor] = {}
    if "logit" in methods:
        assert taught.logits is not None  # asked for, with the positives
        losses["det_logit"] = logit_kd_loss(
            positives.logits.float(), taught.logits.float(), head=positives.head, temperature=config.det_temperature
        )
    if {"fgfi", "pkd"} & set(methods):
        mine, theirs = [tuple(f.shape) for f in output.features], [tuple(f.shape) for f in taught.features]
        if mine != theirs:
            raise ValueError(
                f"det:fgfi / det:pkd need equal feature maps: the student's are {mine}, the det teacher's {theirs}"
            )
    if "fgfi" in methods:
        if not output.level_anchors:
            raise ValueError("det:fgfi needs the student's anchors; its family is anchor-free (use det:pkd)")
        per_image = [fgfi_level_masks(gt, output.level_anchors, config.fgfi_psi) for gt in output.gt_boxes]
        masks = [torch.stack(level) for level in zip(*per_image)]  # L x [N, H_l, W_l]
        losses["det_fgfi"] = fgfi_multilevel_loss(output.features, taught.features, masks)
    if "pkd" in methods:
        losses["det_pkd"] = pkd_multilevel_loss(output.features, taught.features)
    return losses


LOSS_WEIGHTS = {  # KD term -> the DistillConfig field that weighs it in eq. (12)
    "kd_cls": "lambda_kd_cls",
    "kd_cls_neg": "lambda_kd_cls",
    "loc": "lambda_loc",
    "kd_loc": "lambda_kd_loc",
    "det_logit": "lambda_det_logit",
    "det_fgfi": "lambda_det_fgfi",
    "det_pkd": "lambda_det_pkd",
}


def loss_weights(config: DistillConfig) -> dict[str, float]:
    """The weight of each KD term (:data:`LOSS_WEIGHTS`) as ``config`` sets it, e.g. ``{"kd_cls": 0.4, ...}``."""
    return {term: float(getattr(config, field)) for term, field in LOSS_WEIGHTS.items()}


def total_loss(
    detector_losses: Mapping[str, Tensor], kd_losses: Mapping[str, Tensor], weights: Mapping[str, float]
) -> Tensor:
    """Eq. (12): ``sum(L_det) + Σ_term weights[term] · term`` over the KD terms (``lambda_kc·KD_cls + lambda_kl·KD_loc
    + lambda_l·loc``, plus each det2det term and, when asked, KD_cls on negatives at lambda_kc: each of the two KD_cls
    terms is a mean, so positives and negatives weigh the same whatever their counts). ``weights``: a plain mapping,
    e.g. :func:`loss_weights`; a KD term without a weight is an error."""
    missing = sorted(set(kd_losses) - set(weights))
    if missing:
        raise KeyError(f"no weight for the KD terms {missing}")
    total = cast(Tensor, sum(detector_losses.values()))  # the detector's loss dict is never empty
    for name, value in kd_losses.items():
        total = total + weights[name] * value
    return total
