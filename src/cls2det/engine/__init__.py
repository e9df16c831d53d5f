"""Training loop (Lightning Fabric), checkpoints, logging, studies and evaluation of students.

Only the light pieces load here, so that the CLI's error handling does not pay for Lightning Fabric; the loop
is ``from cls2det.engine.fit import fit`` and evaluation ``from cls2det.engine.evaluate import evaluate_student``.
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
