"""The student's run folder: the rules live in :mod:`cls2det.run_folder` (shared with the teacher's runs); the
engine adds how a student run ends badly."""

from __future__ import annotations

import dataclasses

from cls2det.config import TrainConfig
from cls2det.errors import Cls2detError
from cls2det.files import write_json
from cls2det.run_folder import (
    ANY,
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
    UP,
    RunDirError,
    RunStart,
    TrainingInterrupted,
    absolute_input,
    discard_replaced,
    prepare_run_dir,
    restore,
)

__all__ = [
    "RESUME_PATHS",
    "RESUME_SAFE",
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
    "with_absolute_inputs",
    "write_json",
]


class TrainingError(Cls2detError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


# What --resume may change in a run's recipe, and how; every other key is the recipe and must stay as it was.
# Refused on purpose: devices / num_nodes (the world size sets the global batch and the images each rank sees, so
# the resumed steps would not be the ones the run was doing), accelerator / strategy / precision (the numbers a step
# computes), data, the teachers, and every student / distill / optim key.
RESUME_SAFE = {
    "epochs": UP,  # train longer: the LR schedule is laid over the new length from the current step on
    "max_steps": UP,  # likewise (null = no cap)
    "eval_every": ANY,  # when the run evaluates and saves, not what it learns
    "checkpoint_every": ANY,
    "workers": ANY,  # data-loading processes: the batches are the same
    "dist_timeout_s": ANY,  # how long a collective waits for a slow rank
    "out": ANY,  # the run folder itself (moved, or spelled another way)
}
# equal when they name the same file
RESUME_PATHS = ("data", "teacher", "out", "distill.det_teacher", "student.backbone_weights")


def with_absolute_inputs(config: TrainConfig) -> TrainConfig:
    """``config`` with its input paths (data, teacher, det teacher, backbone weights file) absolute: resolved once,
    against the working directory the run starts in, and so recorded in ``config.yaml`` (the run-folder contract in
    :mod:`cls2det.run_folder`)."""
    student = dataclasses.replace(config.student, backbone_weights=absolute_input(config.student.backbone_weights))
    distill = dataclasses.replace(config.distill, det_teacher=absolute_input(config.distill.det_teacher))
    data, teacher = absolute_input(config.data), absolute_input(config.teacher)
    return dataclasses.replace(config, data=data or "", teacher=teacher, student=student, distill=distill)
