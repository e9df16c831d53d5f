"""The steps of a torchvision detector's stock ``forward`` made callable one by one (transform, backbone, anchor
matching), so that an adapter can read the intermediate tensors it needs, and the turning of per-anchor matches
into the :class:`~cls2det.students.base.Positives` / ``Negatives`` records. Nothing here changes what a detector
computes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from cls2det.students.base import Detector, Negatives, Positives, StudentOutput, empty_positives


def transform_batch(detector: Detector, images: list[Tensor], targets: list[dict[str, Tensor]]):
    """``detector.transform`` with the target checks of the stock ``forward``, as one-line ``ValueError`` s.

    Returns ``(image_list, targets)``: the resized, normalised, padded batch and the targets in its pixels.
    """
    for i, target in enumerate(targets):
        boxes = target["boxes"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must be a [N, 4] tensor, got {getattr(boxes, 'shape', type(boxes))}")
    image_list, targets = detector.transform(images, targets)
    for i, target in enumerate(targets):
        bad = (target["boxes"][:, 2:] <= target["boxes"][:, :2]).any(dim=1)
        if bad.any():
            box = [round(v, 2) for v in target["boxes"][bad.nonzero()[0, 0]].tolist()]
            raise ValueError(f"target {i}: box {box} (after resizing) has non-positive width or height")
    return image_list, targets


def backbone_features(detector: Detector, tensors: Tensor) -> list[Tensor]:
    """``detector.backbone`` on the batch, as the list of feature maps the stock ``forward`` passes to the head."""
    features = detector.backbone(tensors)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    return list(features.values())


def image_mean_std(transform: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
    """The transform's normalisation as two [3] tensors on ``like``'s device and dtype."""
    mean = torch.as_tensor(transform.image_mean, device=like.device, dtype=like.dtype)
    std = torch.as_tensor(transform.image_std, device=like.device, dtype=like.dtype)
    return mean, std


def match_anchors(detector: Detector, anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
    """Per image [A] int64: the GT index matched to each anchor, -1 background, -2 ignored (between thresholds).

    The computation of ``RetinaNet.compute_loss`` and ``SSD.forward`` (torchvision 0.16-0.29): the detector's
    ``proposal_matcher`` on the [M, A] IoU matrix; an image without GT boxes is all background.
    """
    return match_per_image(
        anchors, targets, lambda gt_boxes, anchors_i: detector.proposal_matcher(box_iou(gt_boxes, anchors_i))
    )


def match_per_image(
    anchors: list[Tensor], targets: list[dict[str, Tensor]], match: Callable[[Tensor, Tensor], Tensor]
) -> list[Tensor]:
    """Per image [A] int64 ``match(gt_boxes [M, 4], anchors [A, 4])``; an image without GT boxes is all background
    (-1) without calling ``match``."""
    matched_idxs = []
    for anchors_per_image, target in zip(anchors, targets):
        if target["boxes"].numel() == 0:
            matched_idxs.append(
                torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64, device=anchors_per_image.device)
            )
        else:
            matched_idxs.append(match(target["boxes"], anchors_per_image))
    return matched_idxs


def positives_from_matches(
    matched_idxs: list[Tensor],
    targets: list[dict[str, Tensor]],
    cls_logits: Tensor,
    decode: Callable[[int, Tensor], Tensor],
    *,
    head: str,
    label_offset: int = 0,
) -> Positives:
    """Gather the foreground anchors (``matched_idxs >= 0``) of every image into one :class:`Positives`.

    matched_idxs: per image [A] int64, the GT index per anchor (< 0 = background / ignored).
    targets: the transformed targets (boxes in the batch tensor's pixels, labels in the detector's convention).
    cls_logits: [N, A, C'] the head's class logits. decode(i, fg): [K_i, 4] predicted boxes of image i's
    foreground anchor indices ``fg`` ([K_i] int64), differentiable w.r.t. the regression output.
    """
    parts = []
    for i, (matched, target) in enumerate(zip(matched_idxs, targets)):
        fg = torch.where(matched >= 0)[0]  # [K_i]
        gt = matched[fg]  # [K_i]
        parts.append(
            (
                torch.full_like(fg, i),
                target["boxes"][gt].detach(),
                target["labels"][gt] - label_offset,
                cls_logits[i, fg],
                decode(i, fg),
                gt,
                fg,
            )
        )
    if not parts:
        return empty_positives(cls_logits.device, cls_logits.dtype, cls_logits.shape[-1], head)
    image_index, gt_boxes, labels, logits, pred_boxes, gt_index, anchor_index = (torch.cat(p) for p in zip(*parts))
    return Positives(image_index, gt_boxes, labels, logits, pred_boxes, head, gt_index, anchor_index)


def sample_rows(is_candidate: Tensor, max_count: int, generator: torch.Generator | None = None) -> Tensor:
    """[M] int64, ascending: the indices of at most ``max_count`` True entries of the flat bool mask
    ``is_candidate`` [R], drawn uniformly without replacement from ``generator`` (None: the global CPU RNG)."""
    rows = torch.where(is_candidate)[0]  # [R']
    if rows.numel() > max_count:
        keep = torch.randperm(rows.numel(), generator=generator)[:max_count].sort().values  # CPU, device-independent
        rows = rows[keep.to(rows.device)]
    return rows


def negatives_from_matches(
    matched_idxs: list[Tensor],
    anchors: list[Tensor],
    cls_logits: Tensor,
    max_count: int,
    *,
    head: str,
    generator: torch.Generator | None = None,
) -> Negatives | None:
    """At most ``max_count`` of the batch's background anchors, drawn uniformly over all images; None when
    ``max_count`` is 0 (nothing is computed).

    matched_idxs: per image [A] int64 (:func:`match_anchors`, FCOS's assignment); background is
    ``Matcher.BELOW_LOW_THRESHOLD`` (-1), the ignored anchors between the thresholds (-2) are left out.
    anchors: per image [A, 4] the anchors (or FCOS locations), batch pixels. cls_logits: [N, A, C'] the head's.
    """
    if max_count <= 0:
        return None
    num_anchors = cls_logits.shape[1]
    is_background = torch.stack(matched_idxs) == Matcher.BELOW_LOW_THRESHOLD  # [N, A]
    rows = sample_rows(is_background.flatten(), max_count, generator)  # [M] into the flattened [N * A]
    boxes = torch.stack(anchors).flatten(0, 1)[rows].detach()  # [M, 4]
    return Negatives(rows // num_anchors, boxes, cls_logits.flatten(0, 1)[rows], head, rows % num_anchors)


def student_output(
    detector: Detector,
    losses: dict[str, Tensor],
    positives: Positives,
    image_list,
    features: list[Tensor],
    targets: list[dict[str, Tensor]],
    anchors: Tensor | None = None,
    anchor_generator: Any | None = None,  # torchvision's AnchorGenerator / DefaultBoxGenerator (untyped)
    negatives: Negatives | None = None,
) -> StudentOutput:
    """The train-step record of an adapter. ``anchors``: one image's [A, 4] anchors (every image of a batch has the
    same), split per level with ``anchor_generator.num_anchors_per_location()``; None for anchor-free families."""
    mean, std = image_mean_std(detector.transform, image_list.tensors)
    levels: list[Tensor] = []
    if anchors is not None:
        assert anchor_generator is not None, "anchors come with their anchor_generator"
        levels = split_anchor_levels(anchors, features, anchor_generator.num_anchors_per_location())
    return StudentOutput(
        losses,
        positives,
        image_list.tensors,
        mean,
        std,
        features=list(features),
        level_anchors=levels,
        gt_boxes=[t["boxes"].detach() for t in targets],
        image_sizes=[tuple(s) for s in image_list.image_sizes],
        negatives=negatives,
    )


def dense_head_output(
    adapter,
    losses: dict[str, Tensor],
    image_list,
    features: list[Tensor],
    targets: list[dict[str, Tensor]],
    anchors: list[Tensor],
    matched_idxs: list[Tensor],
    cls_logits: Tensor,
    decode: Callable[[int, Tensor], Tensor],
    *,
    anchor_free: bool = False,
) -> StudentOutput:
    """The train-step record of a dense-head adapter (SSD, RetinaNet, FCOS): its positives, its negatives when asked
    (``adapter.max_negatives``) and :func:`student_output`. anchors: per image [A, 4]; cls_logits: [N, A, C'];
    ``anchor_free``: FCOS's square "anchors" are locations, not FGFI's anchors, so no level anchors are recorded."""
    det = adapter.detector
    positives = positives_from_matches(
        matched_idxs, targets, cls_logits, decode, head=adapter.head, label_offset=adapter.label_offset
    )
    negatives = negatives_from_matches(matched_idxs, anchors, cls_logits, adapter.max_negatives, head=adapter.head)
    if anchor_free:
        return student_output(det, losses, positives, image_list, features, targets, negatives=negatives)
    return student_output(
        det, losses, positives, image_list, features, targets, anchors[0], det.anchor_generator, negatives=negatives
    )


def split_anchor_levels(anchors: Tensor, features: list[Tensor], anchors_per_location: list[int]) -> list[Tensor]:
    """One image's anchors [A, 4] (torchvision's order: level, then location row-major, then anchor) as one
    [H_l, W_l, a_l, 4] tensor per level; ``anchors_per_location`` = the generator's ``num_anchors_per_location()``."""
    sizes = [f.shape[-2] * f.shape[-1] * a for f, a in zip(features, anchors_per_location)]
    if sum(sizes) != anchors.shape[0]:
        raise ValueError(f"{anchors.shape[0]} anchors do not tile feature maps of {sizes} anchors")
    return [
        level.view(f.shape[-2], f.shape[-1], a, 4)
        for level, f, a in zip(anchors.split(sizes), features, anchors_per_location)
    ]
