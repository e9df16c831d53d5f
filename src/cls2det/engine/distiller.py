"""The paper's losses for a training loop you already have: ``Distiller(teacher, config)`` on an adapter's output.

    student = wrap_detector(torchvision_detector)              # or create_student("ssdlite320_mobilenet_v3", C)
    distiller = Distiller(load_teacher("runs/teacher"), DistillConfig(kd=["cls", "kd_loc"]))
    for images, targets in loader:                             # torchvision's contract, labels in [0, C)
        output = student(images, targets)                      # StudentOutput: .losses (the detector's), .positives
        loss = distiller.total(output)                         # sum(detector losses) + sum(lambda * KD term)
        optimizer.zero_grad(); loss.backward(); optimizer.step()

It is the glue of ``cls2det train`` (:mod:`cls2det.engine.objective`) without Fabric, caches or logging: the teacher
runs online on every batch (``cls2det train`` caches KD_cls's soft labels per GT box instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cls2det.config import DistillConfig, det_methods
from cls2det.engine.objective import distillation_losses, loss_weights, total_loss
from cls2det.students.base import StudentAdapter, StudentOutput

if TYPE_CHECKING:
    from cls2det.teacher.model import Teacher

PAPER_TERMS = ("cls", "kd_loc")  # the full method, the paper's best row: KD_cls + KD_loc (obj + l0)


class Distiller:
    """KD terms of one batch for a student adapter's train-mode output.

    teacher: a frozen :class:`~cls2det.teacher.Teacher` (:func:`~cls2det.teacher.load_teacher`) on the student's
        device, trained on the student's classes (same order); may be None when ``config.kd`` needs no teacher
        (``["loc"]`` or ``det:*`` terms only).
    config: which terms (``config.kd``) and their hyper-parameters; default ``DistillConfig(kd=["cls", "kd_loc"])``
        (the full method) with cls2det's defaults (README: hyper-parameters): T = 2, lambda_kd_cls = 0.4, taps
        obj + l0 pooled to 4 and 8, s = 112.
        ``soft_label_cache`` / ``gt_feature_cache`` are ``cls2det train`` switches and ignored here.
    det_teacher: a frozen adapter of the student's family for the ``det:*`` terms (see ``load_det_teacher``).
    generator: the RNG of the positives' subsample (``config.max_positives``); None = torch's global RNG.

    ``config.kd_cls_negatives`` > 0 needs the student's ``max_negatives`` set to it (``cls2det train`` does it).
    """

    def __init__(
        self,
        teacher: Teacher | None = None,
        config: DistillConfig | None = None,
        *,
        det_teacher: StudentAdapter | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.config = config if config is not None else DistillConfig(kd=list(PAPER_TERMS))
        needs_teacher = bool({"cls", "kd_loc"} & set(self.config.kd))
        if needs_teacher and teacher is None:
            raise ValueError(f"distill.kd [{','.join(self.config.kd)}] needs a classifier teacher")
        if det_methods(self.config.kd) and det_teacher is None:
            raise ValueError(f"distill.kd [{','.join(self.config.kd)}] needs a det_teacher")
        if teacher is not None:
            teacher.requires_grad_(False).eval()  # frozen; never trained through the KD terms
        self.teacher = teacher
        self.det_teacher = det_teacher
        self.generator = generator
        self.weights = loss_weights(self.config)  # {term: lambda}

    def losses(self, output: StudentOutput) -> dict[str, Tensor]:
        """The unweighted KD terms of ``config.kd``: ``{"kd_cls", "loc", "kd_loc", ...}``, each a 0-dim tensor with
        gradients into the student (logits [K, C(+1)] for KD_cls, predicted boxes [K, 4] for loc / KD_loc), on at
        most ``config.max_positives`` of the batch's K positives; finite (zero) when K == 0."""
        self._check_teacher(output)
        return distillation_losses(
            output, self.teacher, self.config, generator=self.generator, det_teacher=self.det_teacher
        )

    def weighted(self, output: StudentOutput, kd_losses: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{term: lambda_term * value}`` for the terms of :meth:`losses` (what :meth:`total` adds); pass
        ``kd_losses`` to weigh terms already computed."""
        kd_losses = self.losses(output) if kd_losses is None else kd_losses
        return {name: self.weights[name] * value for name, value in kd_losses.items()}

    def total(self, output: StudentOutput, kd_losses: dict[str, Tensor] | None = None) -> Tensor:
        """Eq. (12): the sum of ``output.losses`` (the detector's own) plus each KD term times its lambda; a 0-dim
        tensor to call ``backward()`` on. Pass ``kd_losses`` (from :meth:`losses`) to reuse terms already computed
        (e.g. to log them) instead of running the teacher again."""
        kd_losses = self.losses(output) if kd_losses is None else kd_losses
        return total_loss(output.losses, kd_losses, self.weights)

    def _check_teacher(self, output: StudentOutput) -> None:
        teacher, positives = self.teacher, output.positives
        if teacher is None:
            return
        device = next(teacher.parameters()).device
        if device != output.images.device:
            raise ValueError(
                f"the teacher is on {device}, the student's batch on {output.images.device}: "
                "load_teacher(run, device=...) or teacher.to(...)"
            )
        if "cls" not in self.config.kd:
            return
        classes = positives.logits.shape[1] - (1 if positives.head == "softmax" else 0)
        if teacher.num_classes != classes:
            raise ValueError(
                f"the teacher has {teacher.num_classes} classes, the student {classes}: train the teacher on the "
                "student's classes, in the same order"
            )
