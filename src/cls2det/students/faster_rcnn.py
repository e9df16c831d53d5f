"""Faster R-CNN (torchvision ``fasterrcnn_*_fpn``) as a student: a softmax box head with C+1 outputs.

The adapter runs the stock ``GeneralizedRCNN.forward`` / ``RoIHeads.forward`` training path step by step
(transform -> backbone -> rpn -> ``roi_heads.select_training_samples`` -> box RoI pool -> box head -> box
predictor -> ``fastrcnn_loss``), so the loss numbers are torchvision's own, and reads off the positives: the
proposals the RoI sampler drew with a foreground label (IoU >= 0.5 with a GT box, GT boxes themselves included).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large, resnet50
from torchvision.models.detection import FasterRCNN, fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RPNHead

from cls2det.config import ConfigError, StudentConfig
from cls2det.students.backbones import (
    build_mobilenet_fpn_detector,
    build_resnet_fpn_detector,
    mobilenet_v3_fpn_backbone,
    transform_kwargs,
)
from cls2det.students.base import Negatives, Positives, StudentAdapter, StudentOutput
from cls2det.students.forward_steps import sample_rows, student_output, transform_batch

ASPECT_RATIOS = (0.5, 1.0, 2.0)  # torchvision's RPN default for every level


def rpn_anchor_sizes(sizes: list[int], levels: int) -> tuple[tuple[int, ...], ...]:
    """Per-level RPN anchor sizes (pixels of the transformed image) from the flat ``student.anchor_sizes``.

    Sizes are sorted; when ``levels`` divides their count they are split into ``levels`` equal consecutive groups
    (finest level = smallest sizes), otherwise every level gets all of them. Both torchvision defaults follow
    this rule: R50-FPN ``[32, 64, 128, 256, 512]`` on 5 levels -> one size per level; MobileNetV3-FPN the same
    5 sizes on its 3 levels -> all 5 on each.
    """
    if not sizes or any(int(s) != s or s <= 0 for s in sizes):
        raise ConfigError(f"student.anchor_sizes must be positive integers, got {list(sizes or [])}")
    ordered = sorted(int(s) for s in sizes)
    if len(ordered) % levels:
        return (tuple(ordered),) * levels
    step = len(ordered) // levels
    return tuple(tuple(ordered[i * step : (i + 1) * step]) for i in range(levels))


def set_rpn_anchors(detector: FasterRCNN, sizes: list[int]) -> None:
    """Replace the RPN's anchor generator (and its head, fresh, if the anchor count per location changes)."""
    rpn = detector.rpn
    per_level = rpn_anchor_sizes(sizes, len(rpn.anchor_generator.sizes))
    rpn.anchor_generator = AnchorGenerator(per_level, (ASPECT_RATIOS,) * len(per_level))
    num_anchors = rpn.anchor_generator.num_anchors_per_location()[0]
    if num_anchors != rpn.head.cls_logits.out_channels:
        rpn.head = RPNHead(detector.backbone.out_channels, num_anchors)


class FasterRCNNAdapter(StudentAdapter):
    """A torchvision :class:`FasterRCNN` with ``num_classes = C + 1`` (label 0 = background)."""

    head = "softmax"
    dense_head = False  # class logits come from the box head on proposals

    def forward_train(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> StudentOutput:
        """images: list of [3, H_i, W_i] in 0..1; targets: {"boxes": [N_i, 4] xyxy pixels, "labels": [N_i] in [0, C)}.

        Losses: torchvision's ``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``.
        Positives (K = sampled proposals with a foreground label, over the batch): logits [K, C+1] (the box
        head's ``class_logits`` rows), pred_boxes [K, 4] = ``box_coder.decode_single`` of the regression for the
        assigned class applied to the proposal (not clipped), gt_boxes [K, 4] the matched GT box; all in pixels of
        the transformed batch. Negatives (``max_negatives`` > 0): sampled proposals with the background label
        (IoU < 0.5 with every GT box), logits their box head's rows, boxes the proposals.
        """
        det: FasterRCNN = self.detector
        heads = det.roi_heads
        image_list, targets = transform_batch(det, images, self.to_detector_targets(targets))
        features = det.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        proposals, rpn_losses = det.rpn(image_list, features, targets)  # N x [P_i, 4], no gradient
        # Sampled proposals (GT boxes appended), their matched GT index and label (0 = background) per image.
        proposals, matched_idxs, labels, regression_targets = heads.select_training_samples(proposals, targets)
        box_features = heads.box_roi_pool(features, proposals, image_list.image_sizes)  # [R, 256, 7, 7]
        box_features = heads.box_head(box_features)  # [R, D]
        class_logits, box_regression = heads.box_predictor(box_features)  # [R, C+1], [R, (C+1) * 4]
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, **rpn_losses}

        positives = self._positives(proposals, matched_idxs, labels, targets, class_logits, box_regression)
        feature_maps = list(features.values())
        rpn_anchors = det.rpn.anchor_generator(image_list, feature_maps)[0]  # [A, 4]: FGFI's anchors, as in Wang et al.
        negatives = self._negatives(proposals, labels, class_logits)
        return student_output(
            det,
            losses,
            positives,
            image_list,
            feature_maps,
            targets,
            rpn_anchors,
            det.rpn.anchor_generator,
            negatives=negatives,
        )

    def _negatives(self, proposals: list[Tensor], labels: list[Tensor], class_logits: Tensor) -> Negatives | None:
        """At most ``max_negatives`` of the sampled background proposals (label 0) of the batch; None when 0."""
        if self.max_negatives <= 0:
            return None
        rows = sample_rows(torch.cat(labels) == 0, self.max_negatives)  # [M] into the R sampled proposals
        image_index = torch.cat([torch.full_like(label, i) for i, label in enumerate(labels)])[rows]  # [M]
        return Negatives(image_index, torch.cat(proposals)[rows].detach(), class_logits[rows], self.head)

    def _positives(
        self,
        proposals: list[Tensor],
        matched_idxs: list[Tensor],
        labels: list[Tensor],
        targets: list[dict[str, Tensor]],
        class_logits: Tensor,
        box_regression: Tensor,
    ) -> Positives:
        """The sampled foreground proposals; rows of ``class_logits`` follow the images' proposals in order."""
        gt_boxes, gt_index = [], []
        for matched, label, target in zip(matched_idxs, labels, targets):
            fg = torch.where(label > 0)[0]  # [K_i]; an image without GT boxes has none
            gt_boxes.append(target["boxes"][matched[fg]].detach())
            gt_index.append(matched[fg])
        all_labels = torch.cat(labels)  # [R]
        fg = torch.where(all_labels > 0)[0]  # [K]
        image_index = torch.cat([torch.full_like(label, i) for i, label in enumerate(labels)])[fg]  # [K]
        fg_labels = all_labels[fg]  # [K] in 1..C
        regression = box_regression.reshape(box_regression.shape[0], -1, 4)[fg, fg_labels]  # [K, 4]
        fg_proposals = torch.cat(proposals)[fg]  # [K, 4]
        pred_boxes = self.detector.roi_heads.box_coder.decode_single(regression, fg_proposals)  # [K, 4]
        return Positives(
            image_index,
            torch.cat(gt_boxes),
            fg_labels - self.label_offset,
            class_logits[fg],
            pred_boxes,
            self.head,
            torch.cat(gt_index),
            proposals=fg_proposals.detach(),
        )

    # ------------------------------------------------------------------------------------ det2det: as a teacher

    @property
    def anchor_generator(self) -> nn.Module:
        return self.detector.rpn.anchor_generator

    def positive_logits(self, features: dict[str, Tensor], output: StudentOutput, positives: Positives) -> Tensor:
        """[K, C+1] this detector's box-head logits for the student's positive proposals (Chen et al. 2017 run the
        teacher's RoI head on the student's sampled RoIs): RoI-align on this detector's maps, box head, predictor."""
        heads = self.detector.roi_heads
        if positives.proposals is None:
            raise ValueError("FasterRCNNAdapter: the positives carry no proposals")
        by_image = [torch.where(positives.image_index == i)[0] for i in range(output.images.shape[0])]  # N x [K_i]
        pooled = heads.box_roi_pool(features, [positives.proposals[k] for k in by_image], output.image_sizes)
        class_logits, _ = heads.box_predictor(heads.box_head(pooled))  # [K, C+1], rows in image order
        logits = torch.empty_like(class_logits)
        logits[torch.cat(by_image)] = class_logits  # back to the positives' order
        return logits


def _check_num_classes(num_classes: int) -> None:
    if num_classes <= 0:
        raise ConfigError(f"num_classes must be > 0, got {num_classes}")


def fasterrcnn_mobilenet_v3_large_fpn_stages(
    *,
    returned_stages: list[int],
    weights: None = None,
    weights_backbone: MobileNet_V3_Large_Weights | None = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` with its FPN over other MobileNetV3 stages
    (``returned_stages``; torchvision's: [4, 5], two stride-32 maps, plus a max-pool level): e.g. [2, 3, 5] gives
    strides 8, 16, 32 (+ 64), which small objects at a small input need. RPN anchors: torchvision's 5 sizes x 3
    ratios on every level. No detection ``weights`` exist for it; kwargs go to :class:`FasterRCNN`."""
    if weights is not None:
        raise ConfigError("student.options.returned_stages: no pretrained detection weights; use backbone weights")
    if (
        not returned_stages
        or any(s not in range(1, 6) for s in returned_stages)
        or sorted(set(returned_stages)) != list(returned_stages)
    ):
        raise ConfigError(f"student.options.returned_stages must be increasing stages in 1..5, got {returned_stages}")
    backbone = mobilenet_v3_fpn_backbone(weights_backbone, trainable_backbone_layers, list(returned_stages))
    levels = len(returned_stages) + 1  # + the max-pool level
    kwargs.setdefault(
        "rpn_anchor_generator", AnchorGenerator(((32, 64, 128, 256, 512),) * levels, (ASPECT_RATIOS,) * levels)
    )
    return FasterRCNN(backbone, num_classes, **kwargs)


def fasterrcnn_mobilenet_v3(num_classes: int, config: StudentConfig, **kwargs: Any) -> FasterRCNNAdapter:
    """Faster R-CNN MobileNetV3-Large-FPN (torchvision ``fasterrcnn_mobilenet_v3_large_fpn``), C+1 outputs.

    config.image_size -> transform min_size = max_size (the ``_320_fpn`` variant is image_size=320; torchvision
    also lowers its test-time RPN top-n to 150 there, which is not done here). config.anchor_sizes -> see
    :func:`rpn_anchor_sizes` (3 levels). config.backbone_weights:
      * ``None``: random init, BatchNorm, all layers trainable (``trainable_backbone_layers`` ignored, with
        torchvision's warning);
      * ``"imagenet"``: torchvision's ``MobileNet_V3_Large_Weights.IMAGENET1K_V1`` path (needs the download / cache);
      * a local ``mobilenet_v3_large`` state dict (safetensors / ``torch.save``, see :func:`backbone_classifier`):
        loaded into ``backbone.body`` and treated as torchvision treats a pretrained backbone: BatchNorm frozen,
        only the last ``trainable_backbone_layers`` (default 3, max 6) stages trainable.
    kwargs go to torchvision's :class:`FasterRCNN` (e.g. ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``),
    except ``returned_stages`` (e.g. [2, 3, 5]), which builds the FPN over other stages
    (:func:`fasterrcnn_mobilenet_v3_large_fpn_stages`).
    """
    _check_num_classes(num_classes)
    kwargs = {**kwargs, **transform_kwargs(config)}
    builder: Any = fasterrcnn_mobilenet_v3_large_fpn
    if "returned_stages" in kwargs:
        builder = functools.partial(
            fasterrcnn_mobilenet_v3_large_fpn_stages, returned_stages=kwargs.pop("returned_stages")
        )
    detector = build_mobilenet_fpn_detector(builder, num_classes + 1, config, **kwargs)
    if config.anchor_sizes is not None:
        set_rpn_anchors(detector, config.anchor_sizes)
    return FasterRCNNAdapter(detector, num_classes)


def fasterrcnn_resnet50(num_classes: int, config: StudentConfig, **kwargs: Any) -> FasterRCNNAdapter:
    """Faster R-CNN ResNet50-FPN (torchvision v1 ``fasterrcnn_resnet50_fpn``), C+1 outputs.

    config.image_size -> transform min_size = max_size; config.anchor_sizes -> see :func:`rpn_anchor_sizes`
    (5 levels); config.backbone_weights / trainable_backbone_layers -> see
    :func:`cls2det.students.backbones.build_resnet_fpn_detector` (a local file is a ``resnet50`` state dict).
    kwargs go to torchvision's :class:`FasterRCNN`.
    """
    _check_num_classes(num_classes)
    detector = build_resnet_fpn_detector(
        fasterrcnn_resnet50_fpn, num_classes + 1, config, **{**kwargs, **transform_kwargs(config)}
    )
    if config.anchor_sizes is not None:
        set_rpn_anchors(detector, config.anchor_sizes)
    return FasterRCNNAdapter(detector, num_classes)


def backbone_classifier(detector: str, num_classes: int = 1000) -> nn.Module:
    """The torchvision classifier whose ``state_dict()`` ``student.backbone_weights`` expects for ``detector``
    (pre-train it, save its state dict, pass the file): its head is ignored when loading."""
    if detector == "fasterrcnn_mobilenet_v3":
        return mobilenet_v3_large(num_classes=num_classes)
    if detector == "fasterrcnn_resnet50":
        return resnet50(num_classes=num_classes)
    raise ConfigError(
        f"unknown Faster R-CNN detector {detector!r}; valid: fasterrcnn_mobilenet_v3, fasterrcnn_resnet50"
    )
