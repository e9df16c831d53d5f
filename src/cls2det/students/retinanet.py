"""RetinaNet (torchvision ``retinanet_resnet50_fpn``) as a student: a sigmoid head with C outputs.

The adapter runs the stock ``RetinaNet.forward`` step by step (transform -> backbone -> head -> anchors ->
matching -> ``head.compute_loss``), so the loss numbers are torchvision's own, and reads off the positives:
every anchor the detector's ``proposal_matcher`` assigns to a GT box (IoU >= 0.5, plus each GT's best anchors).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from cls2det.config import StudentConfig
from cls2det.students._common import (
    backbone_features,
    build_resnet_fpn_detector,
    dense_head_output,
    fpn_level_sizes,
    match_anchors,
    transform_batch,
    transform_kwargs,
)
from cls2det.students.base import StudentAdapter, StudentOutput


def retinanet_anchor_generator(sizes: list[int]) -> AnchorGenerator:
    """torchvision's RetinaNet anchors with other base sizes: per FPN level (P3..P7) base size ``s`` gives the
    3 scales per octave ``(s, int(s * 2**(1/3)), int(s * 2**(2/3)))`` x aspect ratios (0.5, 1, 2) = 9 anchors.
    Stock: ``sizes = [32, 64, 128, 256, 512]``."""
    anchor_sizes = tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in sizes)
    return AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))


class RetinaNetAdapter(StudentAdapter):
    """A torchvision :class:`RetinaNet` with ``num_classes = C`` (labels 0..C-1, no background column)."""

    head = "sigmoid"

    def forward_train(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> StudentOutput:
        """images: list of [3, H_i, W_i] in 0..1; targets: {"boxes": [N_i, 4] xyxy pixels, "labels": [N_i] in [0, C)}.

        Positives: logits [K, C] (the anchor's ``cls_logits`` row), pred_boxes [K, 4] =
        ``box_coder.decode_single(bbox_regression, anchor)`` (not clipped), all in the batch tensor's pixels.
        Negatives (``max_negatives`` > 0): anchors the matcher set to background (IoU < 0.4 with every GT box); the
        ignored ones in [0.4, 0.5) are left out, as the focal loss leaves them out.
        """
        det: RetinaNet = self.detector
        image_list, targets = transform_batch(det, images, self.to_detector_targets(targets))
        features = backbone_features(det, image_list.tensors)  # 5 x [N, 256, H_l, W_l]
        head_outputs = det.head(features)  # cls_logits [N, A, C], bbox_regression [N, A, 4]
        anchors = det.anchor_generator(image_list, features)  # N x [A, 4]
        matched_idxs = match_anchors(det, anchors, targets)
        losses = det.head.compute_loss(targets, head_outputs, anchors, matched_idxs)

        regression = head_outputs["bbox_regression"]

        def decode(i: int, fg: Tensor) -> Tensor:
            # float32: the coder casts anchors to the regression's dtype, which loses pixels under bf16 autocast
            return det.box_coder.decode_single(regression[i, fg].float(), anchors[i][fg])  # [K_i, 4]

        return dense_head_output(
            self, losses, image_list, features, targets, anchors, matched_idxs, head_outputs["cls_logits"], decode
        )


def retinanet_resnet50(num_classes: int, config: StudentConfig, **options: Any) -> RetinaNetAdapter:
    """RetinaNet-ResNet50-FPN (torchvision v1) for ``num_classes`` foreground classes.

    config.image_size -> transform min_size = max_size; config.anchor_sizes -> 5 base sizes, one per FPN level
    (see :func:`retinanet_anchor_generator`); config.backbone_weights / trainable_backbone_layers -> see
    :func:`cls2det.students._common.build_resnet_fpn_detector`.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")
    kwargs = {**transform_kwargs(config), **options}
    sizes = fpn_level_sizes(config.anchor_sizes, "retinanet_resnet50")
    if sizes is not None:
        kwargs["anchor_generator"] = retinanet_anchor_generator(sizes)
    detector = build_resnet_fpn_detector(retinanet_resnet50_fpn, num_classes, config, **kwargs)
    return RetinaNetAdapter(detector, num_classes)
