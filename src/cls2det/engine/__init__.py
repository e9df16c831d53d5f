"""Training loop (Lightning Fabric), checkpoints, logging, studies and evaluation of students.

``fit``, ``evaluate_student`` and ``predict`` load lazily: importing the error types (as the CLI does on every
command) does not pay for Lightning Fabric.
"""
from cls2det.engine.checkpoint import CheckpointError, load_model_state, load_state, save_checkpoint
from cls2det.engine.run_dir import RunDirError, TrainingError, TrainingInterrupted

__all__ = [
    "CheckpointError", "RunDirError", "TrainingError", "TrainingInterrupted", "evaluate_student", "fit",
    "load_model_state", "load_state", "predict", "save_checkpoint",
]


def __getattr__(name: str):
    if name == "fit":
        from cls2det.engine.fit import fit

        return fit
    if name in ("evaluate_student", "predict"):
        from cls2det.engine import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'cls2det.engine' has no attribute {name!r}")
