"""COCO evaluation, study summaries/reports and plots.

``plots`` (matplotlib) is imported lazily, so ``import cls2det.evaluation`` stays cheap for training code.
"""

from .coco_eval import IOU_THRESHOLDS, METRIC_KEYS, CocoEvaluator, evaluate_coco, per_class_ap
from .errors import ERROR_TYPES, error_breakdown, fixed_ap50
from .report import summarize, write_report

__all__ = [
    "ERROR_TYPES",
    "IOU_THRESHOLDS",
    "METRIC_KEYS",
    "CocoEvaluator",
    "evaluate_coco",
    "per_class_ap",
    "error_breakdown",
    "fixed_ap50",
    "summarize",
    "write_report",
    "plot_ap_vs_iou",
    "plot_error_breakdown",
    "plot_loss_curves",
    "plot_prediction_grid",
]

_PLOTS = {"plot_ap_vs_iou", "plot_error_breakdown", "plot_loss_curves", "plot_prediction_grid"}


def __getattr__(name: str):
    if name in _PLOTS:
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
