"""COCO evaluation, study summaries/reports and plots.

``plots`` (matplotlib) is imported lazily, so ``import cls2det.evaluation`` stays cheap for training code.
"""

from .coco_eval import IOU_THRESHOLDS, METRIC_KEYS, CocoEvaluator, evaluate_coco, per_class_ap
from .report import summarize, write_report

__all__ = [
    "IOU_THRESHOLDS",
    "METRIC_KEYS",
    "CocoEvaluator",
    "evaluate_coco",
    "per_class_ap",
    "summarize",
    "write_report",
    "plot_ap_vs_iou",
    "plot_loss_curves",
    "plot_prediction_grid",
]

_PLOTS = {"plot_ap_vs_iou", "plot_loss_curves", "plot_prediction_grid"}


def __getattr__(name: str):
    if name in _PLOTS:
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
