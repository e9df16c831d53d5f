"""Helpers shared by the student adapters: building a torchvision detector from a ``StudentConfig``,
loading local backbone weights, running the detector's transform / backbone as its own forward does,
and turning per-anchor matches into a :class:`Positives` record.

Nothing here changes what a detector computes; these are the steps of the stock ``forward`` made callable
one by one, so an adapter can read the intermediate tensors (anchors, matches, head outputs) it needs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights
from torchvision.models.detection._utils import Matcher
from torchvision.ops import FrozenBatchNorm2d, box_iou

from cls2det.config import StudentConfig
from cls2det.files import read_state_dict  # one safe reader for every local weights file
from cls2det.students.base import Negatives, Positives, StudentOutput, empty_positives

# The order in which torchvision unfreezes ResNet stages (``backbone_utils._resnet_fpn_extractor``).
_RESNET_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


# ----------------------------------------------------------------------------------------------- building


def transform_kwargs(config: StudentConfig) -> dict[str, int]:
    """``min_size`` / ``max_size`` for the detector's ``GeneralizedRCNNTransform``: both = ``config.image_size``.

    ``image_size=None`` returns ``{}`` (torchvision's own defaults, 800 / 1333 for the FPN families).
    """
    if config.image_size is None:
        return {}
    if config.image_size <= 0:
        raise ValueError(f"student.image_size must be > 0, got {config.image_size}")
    return {"min_size": config.image_size, "max_size": config.image_size}


def build_resnet_fpn_detector(
    builder: Callable[..., nn.Module], num_classes: int, config: StudentConfig, **kwargs
) -> nn.Module:
    """Call a torchvision ``*_resnet50_fpn`` builder (``weights=None``) and set up its ResNet body per ``config``.

    ``config.backbone_weights``:
      * ``None``: random init, plain BatchNorm, every layer trainable (torchvision's untrained path; a
        ``trainable_backbone_layers`` value is ignored with torchvision's own warning);
      * ``"imagenet"``: torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` (needs the download or the torch hub cache);
      * a local state-dict file (safetensors or ``torch.save``): loaded into ``backbone.body``, then treated like
        torchvision treats a pretrained backbone: BatchNorm frozen and only the last ``trainable_backbone_layers``
        (default 3) stages trainable.
    """
    weights = config.backbone_weights
    trainable = config.trainable_backbone_layers
    if weights == "imagenet":
        return build_imagenet_detector(
            builder,
            ResNet50_Weights.IMAGENET1K_V1,
            num_classes=num_classes,
            trainable_backbone_layers=trainable,
            **kwargs,
        )
    detector = builder(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        trainable_backbone_layers=trainable if weights is None else None,
        **kwargs,
    )
    if weights is not None:
        body = detector.backbone.body
        load_backbone_weights(body, weights)
        freeze_resnet_body(body, 3 if trainable is None else trainable)
    return detector


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """Load a ResNet state dict from ``path`` into ``body`` (the detector's ``backbone.body``), in place.

    Keys may carry one common prefix (``model.``, ``backbone.body.``, ``module.`` ...): it is found from the
    stem's ``conv1.weight`` and stripped; keys outside it and the classifier (``fc.*``) are ignored. Every
    body tensor must be present with the right shape (``num_batches_tracked`` may be missing).
    """
    state = read_state_dict(path)
    # a prefix p is the ResNet's if both p + "conv1.weight" (stem) and p + "layer1.0.conv1.weight" exist
    prefixes = [k[: -len("conv1.weight")] for k in state if k.endswith("conv1.weight")]
    prefixes = [p for p in prefixes if p + "layer1.0.conv1.weight" in state]
    if not prefixes:
        raise ValueError(f"{path}: no ResNet weights (conv1.weight, layer1.0.conv1.weight) in its {len(state)} keys")
    prefix = prefixes[0]
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{path}: {prefix}{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: missing backbone weight {prefix}{missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{path}: unexpected key {prefix}{unexpected[0]} for a ResNet-50 body")


def freeze_resnet_body(body: nn.Module, trainable_layers: int) -> None:
    """What torchvision does to a pretrained ResNet body, in place: BatchNorm -> ``FrozenBatchNorm2d`` (same
    statistics) and ``requires_grad=False`` outside the last ``trainable_layers`` stages (0..5; 5 = all)."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"student.trainable_backbone_layers must be in [0, 5], got {trainable_layers}")
    _freeze_batchnorm(body)
    layers = list(_RESNET_TRAINABLE_ORDER[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    for name, param in body.named_parameters():
        if not any(name.startswith(layer) for layer in layers):
            param.requires_grad_(False)


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.running_mean.device)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def fpn_level_sizes(sizes: list[int] | None, detector: str, levels: int = 5) -> list[int] | None:
    """Validate ``student.anchor_sizes``: ``levels`` positive ints, one base size per FPN level (P3..P7)."""
    if sizes is None:
        return None
    if len(sizes) != levels or any(s <= 0 for s in sizes):
        raise ValueError(
            f"student.anchor_sizes: {detector} needs {levels} positive sizes (one per FPN level), got {list(sizes)}"
        )
    return list(sizes)


# ----------------------------------------------------------------------------------------------- forward pieces


def transform_batch(detector: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]):
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


def backbone_features(detector: nn.Module, tensors: Tensor) -> list[Tensor]:
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


def match_anchors(detector: nn.Module, anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
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
    detector: nn.Module,
    losses: dict[str, Tensor],
    positives: Positives,
    image_list,
    features: list[Tensor],
    targets: list[dict[str, Tensor]],
    anchors: Tensor | None = None,
    anchor_generator: nn.Module | None = None,
    negatives: Negatives | None = None,
) -> StudentOutput:
    """The train-step record of an adapter. ``anchors``: one image's [A, 4] anchors (every image of a batch has the
    same), split per level with ``anchor_generator.num_anchors_per_location()``; None for anchor-free families."""
    mean, std = image_mean_std(detector.transform, image_list.tensors)
    levels = (
        [] if anchors is None else split_anchor_levels(anchors, features, anchor_generator.num_anchors_per_location())
    )
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


# ------------------------------------------------------------------------------------ classifier-layout backbones
# MobileNet / VGG bodies (Faster R-CNN MV3, SSD, SSDlite) keep the classifier's ``features`` blocks but regroup them.
# A "view" is a module laid out like the torchvision classifier (``view.features[i]`` = classifier ``features[i]``)
# whose submodules are the detector's own, so loading the classifier's state dict into the view fills the detector.


def build_imagenet_detector(builder: Callable[..., nn.Module], weights_backbone, **kwargs) -> nn.Module:
    """``builder(weights=None, weights_backbone=weights_backbone, **kwargs)``: torchvision's own pretrained-backbone
    path; a one-line ``RuntimeError`` when the weights can be neither downloaded nor found in the torch hub cache."""
    try:
        return builder(weights=None, weights_backbone=weights_backbone, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a corrupt cache raises RuntimeError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(
            f"student.backbone_weights='imagenet': could not load torchvision's {weights_backbone} "
            f"weights ({reason}); pass a local state-dict file instead"
        ) from None


def load_view_weights(view: nn.Module, path: str | Path, classifier: str) -> None:
    """Load a torchvision ``classifier`` state dict (e.g. from ``mobilenet_v3_large().state_dict()``) into ``view``.

    Keys may carry one common prefix (found from the view's first key, e.g. ``features.0.0.weight``); keys of the
    classification head (``fc.*`` / ``classifier.*``) and outside the prefix are ignored. Every view tensor must be
    present with the right shape (``num_batches_tracked`` may be missing).
    """
    state = read_state_dict(path)
    own = view.state_dict()
    first = next(iter(own))
    hits = [k for k in state if k == first or k.endswith("." + first)]
    if not hits:
        raise ValueError(f"{path}: no {first} among its {len(state)} keys; expected a {classifier} state dict")
    prefix = min(hits, key=len)[: -len(first)]
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{path}: {prefix}{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)} "
                f"for {classifier}"
            )
    missing, unexpected = view.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: missing backbone weight {prefix}{missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{path}: unexpected key {prefix}{unexpected[0]} for {classifier}")


def stage_indices(features: nn.Sequential, kind: str) -> list[int]:
    """torchvision's stage starts in a classifier's ``features``: ``"mobilenet"`` = [0, strided blocks, last]
    (``_mobilenet_extractor``), ``"vgg"`` = [0, max-pools except the last] (``_vgg_extractor``)."""
    if kind == "mobilenet":
        return [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    return [0] + [i for i, b in enumerate(features) if isinstance(b, nn.MaxPool2d)][:-1]


def freeze_stages(features: nn.Sequential, stages: list[int], trainable_layers: int) -> None:
    """``requires_grad=False`` on ``features`` before the last ``trainable_layers`` stages (torchvision's rule)."""
    if not 0 <= trainable_layers <= len(stages):
        raise ValueError(f"student.trainable_backbone_layers must be in [0, {len(stages)}], got {trainable_layers}")
    freeze_before = len(features) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    for block in list(features)[:freeze_before]:
        block.requires_grad_(False)


def features_view(blocks) -> nn.Module:
    """A module whose ``features`` is ``nn.Sequential(*blocks)`` (shared, not copied): a classifier's key layout."""
    view = nn.Module()
    view.features = nn.Sequential(*blocks)
    return view


def freeze_batchnorm(module: nn.Module) -> None:
    """Every ``nn.BatchNorm2d`` below ``module`` -> ``FrozenBatchNorm2d`` with the same statistics, in place."""
    _freeze_batchnorm(module)
