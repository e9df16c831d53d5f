"""Per-step loss logging to a CSV file and TensorBoard: see :mod:`cls2det.files` (shared with the teacher)."""

from cls2det.files import MetricsLogger, truncate_metrics

__all__ = ["MetricsLogger", "truncate_metrics"]
