"""Distillation losses of Guo et al. (NeurIPS 2021) as pure functions, plus det2det baselines.

``kd_cls_loss`` (eq. 1-7), ``crop_boxes`` (eq. 8-9), ``kd_loc_loss`` (eq. 10), ``loc_loss`` (eq. 11).
"""

from .crops import box_affine_grids, box_grids, crop_boxes, crop_boxes_naive, sanitize_boxes
from .det2det import (
    fgfi_level_masks,
    fgfi_loss,
    fgfi_mask,
    fgfi_multilevel_loss,
    kd_cls_negatives_loss,
    logit_kd_loss,
    pkd_loss,
    pkd_multilevel_loss,
)
from .losses import kd_cls_loss, kd_loc_loss, loc_loss

__all__ = [
    "box_affine_grids",
    "box_grids",
    "crop_boxes",
    "crop_boxes_naive",
    "fgfi_level_masks",
    "fgfi_loss",
    "fgfi_mask",
    "fgfi_multilevel_loss",
    "kd_cls_loss",
    "kd_cls_negatives_loss",
    "kd_loc_loss",
    "loc_loss",
    "logit_kd_loss",
    "pkd_loss",
    "pkd_multilevel_loss",
    "sanitize_boxes",
]
