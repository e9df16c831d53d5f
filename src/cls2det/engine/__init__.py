"""The student's training: the Fabric loop, the objective (eq. 12) that joins an adapter's output to the teachers,
the teacher caches, checkpoints, run folders, logging and the LR schedule.

Only the light pieces load here, so that the CLI's error handling does not pay for Lightning Fabric; the loop
is ``from cls2det.engine.fit import fit``.
"""

from cls2det.engine.checkpoint import CheckpointError, load_model_state, load_state, save_checkpoint
from cls2det.engine.run_dir import RunDirError, TrainingError, TrainingInterrupted

__all__ = [
    "CheckpointError",
    "RunDirError",
    "TrainingError",
    "TrainingInterrupted",
    "load_model_state",
    "load_state",
    "save_checkpoint",
]
