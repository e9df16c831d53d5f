"""Which classifier teachers suit which student heads (paper, Sec. 3.1 and 4).

KD_cls compares the teacher's and the student's class posteriors in the student's head kind: a softmax over the
classes (Faster R-CNN box head, SSD) or one sigmoid per class (RetinaNet, FCOS). A teacher trained with the softmax
cross-entropy alone ("ce") has logits that are meaningful only up to a shift, so their per-class sigmoids are not
calibrated one-vs-rest probabilities; the paper trains one teacher with the cross-entropy and the per-class binary
cross-entropy jointly ("ce+bce") so that its logits suit both head kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cls2det.teacher.model import TeacherError

LEGACY_LOSS = "ce"  # teacher runs written before teacher.json recorded the loss were all trained with "ce"


def teacher_loss(meta_or_teacher: Any) -> str:
    """The loss kind a teacher was trained with: a :class:`~cls2det.teacher.Teacher` (``.loss``) or the dict of its
    ``teacher.json`` (key ``"loss"``); missing or None counts as "ce" (runs before the key existed)."""
    if isinstance(meta_or_teacher, Mapping):
        loss = meta_or_teacher.get("loss")
    else:
        loss = getattr(meta_or_teacher, "loss", None)
    return loss or LEGACY_LOSS


def check_teacher_for_head(meta_or_teacher: Any, head: str, *, allow_ce_teacher: bool = False) -> None:
    """Raise a one-line :class:`TeacherError` when a teacher's logits do not suit a ``head`` ("softmax" / "sigmoid")
    student: a sigmoid student needs a teacher trained with "bce" or "ce+bce", unless ``allow_ce_teacher``."""
    if head not in ("softmax", "sigmoid"):
        raise TeacherError(f"head must be 'softmax' or 'sigmoid', got {head!r}")
    loss = teacher_loss(meta_or_teacher)
    if head == "sigmoid" and "bce" not in loss.split("+") and not allow_ce_teacher:
        raise TeacherError(
            f"the teacher was trained with loss {loss!r} (softmax only), but KD_cls of a sigmoid-head student needs "
            f"per-class sigmoid logits: retrain it with `cls2det teacher ... --loss ce+bce`, or set "
            f"distill.allow_ce_teacher=true to distill its sigmoids anyway"
        )
