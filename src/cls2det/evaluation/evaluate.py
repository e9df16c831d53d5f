"""Run a student over a split and score it with COCO mAP."""

from __future__ import annotations

import torch
from torch import nn

from cls2det.data import CocoDetection, DetectionSplit, collate
from cls2det.evaluation import CocoEvaluator


@torch.no_grad()
def predict(model: nn.Module, images: list[torch.Tensor], device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """Detections (boxes xyxy in original pixels, scores, 0-based labels) for a list of [3, H, W] images."""
    was_training = model.training
    model.eval()
    outputs = model([img.to(device) for img in images])
    model.train(was_training)
    return [{k: v.cpu() for k, v in out.items()} for out in outputs]


def evaluate_student(
    model: nn.Module,
    split: DetectionSplit,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    workers: int = 0,
    errors: bool = False,
) -> dict:
    """COCO metrics of ``model`` on ``split`` (see :func:`cls2det.evaluation.evaluate_coco`); with ``errors`` also
    ``metrics["errors"]``, the AP50 points lost to each TIDE error type (:mod:`cls2det.evaluation.errors`)."""
    loader = torch.utils.data.DataLoader(
        CocoDetection(split),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    evaluator = CocoEvaluator(split.coco, split.label_to_cat_id)
    for images, targets in loader:
        outputs = predict(model, images, device)
        evaluator.process([int(t["image_id"]) for t in targets], outputs)
    metrics = evaluator.evaluate()
    if errors:
        from cls2det.evaluation.errors import evaluator_errors

        metrics["errors"] = evaluator_errors(evaluator)
    return metrics
