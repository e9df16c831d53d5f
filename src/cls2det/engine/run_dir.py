"""The student's run folder: the rules live in :mod:`cls2det.run_folder` (shared with the teacher's runs); the
engine adds how a student run ends badly."""

from __future__ import annotations

from cls2det.errors import Cls2detError
from cls2det.files import write_json
from cls2det.run_folder import (
    BEST,
    CLASSES,
    CONFIG,
    GT_FEATURES,
    HISTORY,
    LAST,
    METRICS_CSV,
    RESULTS,
    RUN_JSON,
    SOFT_LABELS,
    RunDirError,
    RunStart,
    TrainingInterrupted,
    discard_replaced,
    prepare_run_dir,
    restore,
)

__all__ = [
    "BEST",
    "CLASSES",
    "CONFIG",
    "GT_FEATURES",
    "HISTORY",
    "LAST",
    "METRICS_CSV",
    "RESULTS",
    "RUN_JSON",
    "SOFT_LABELS",
    "RunDirError",
    "RunStart",
    "TrainingError",
    "TrainingInterrupted",
    "discard_replaced",
    "prepare_run_dir",
    "restore",
    "write_json",
]


class TrainingError(Cls2detError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""
