"""The adapter of the dense-head families (SSD, RetinaNet, FCOS): class logits and a box regression at every
anchor / location, trained on the anchors a matcher assigns to GT boxes.

:class:`DenseHeadAdapter` runs the stock ``forward`` step by step (transform -> backbone -> head -> anchors ->
matching -> the detector's own loss), so the loss numbers are torchvision's, and reads off the positives (every
anchor matched to a GT box) and, when asked, a sample of the negatives. A family says only how it matches and how
it decodes a box.
"""

from __future__ import annotations

from torch import Tensor

from cls2det.students.base import StudentAdapter, StudentOutput
from cls2det.students.forward_steps import backbone_features, dense_head_output, transform_batch


class DenseHeadAdapter(StudentAdapter):
    """Base of the dense-head adapters. Subclasses implement :meth:`match` and :meth:`decode_boxes`."""

    def match(self, anchors: list[Tensor], targets: list[dict[str, Tensor]], features: list[Tensor]) -> list[Tensor]:
        """Per image [A] int64: the GT index assigned to each anchor, -1 background, -2 ignored."""
        raise NotImplementedError

    def decode_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        """[K, 4] regression rows and their [K, 4] anchors -> [K, 4] xyxy boxes in the batch tensor's pixels."""
        raise NotImplementedError

    def detector_losses(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor], matched: list
    ) -> dict[str, Tensor]:
        """The detector's own loss dict, computed as its ``forward`` does (RetinaNet, FCOS: the head's)."""
        return self.detector.head.compute_loss(targets, head_outputs, anchors, matched)

    def forward_train(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> StudentOutput:
        """images: list of [3, H_i, W_i] in 0..1; targets: {"boxes": [N_i, 4] xyxy pixels, "labels": [N_i] in [0, C)}.

        Positives: logits [K, C'] (the anchor's ``cls_logits`` row), pred_boxes [K, 4] = :meth:`decode_boxes` of its
        regression (not clipped), gt_boxes [K, 4] the matched GT box, all in the batch tensor's pixels. Negatives
        (``max_negatives`` > 0): anchors matched to background (-1); the ignored ones (-2) are left out.
        """
        det = self.detector
        image_list, targets = transform_batch(det, images, self.to_detector_targets(targets))
        features = backbone_features(det, image_list.tensors)  # L x [N, D_l, H_l, W_l]
        head_outputs = det.head(features)  # cls_logits [N, A, C'], bbox_regression [N, A, 4] (FCOS: + ctrness)
        anchors = det.anchor_generator(image_list, features)  # N x [A, 4]
        matched_idxs = self.match(anchors, targets, features)
        losses = self.detector_losses(targets, head_outputs, anchors, matched_idxs)
        regression = head_outputs["bbox_regression"]

        def decode(i: int, fg: Tensor) -> Tensor:
            # float32: the coders cast anchors to the regression's dtype, which loses pixels under bf16 autocast
            return self.decode_boxes(regression[i, fg].float(), anchors[i][fg])  # [K_i, 4]

        cls_logits = head_outputs["cls_logits"]
        return dense_head_output(
            self,
            losses,
            image_list,
            features,
            targets,
            anchors,
            matched_idxs,
            cls_logits,
            decode,
            anchor_free=not self.has_anchors,
        )
