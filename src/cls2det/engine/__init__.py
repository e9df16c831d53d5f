"""Training loop (Lightning Fabric), checkpoints, logging and evaluation of students."""
from cls2det.engine.checkpoint import CheckpointError, load_model_state, load_state, save_checkpoint
from cls2det.engine.evaluate import evaluate_student, predict
from cls2det.engine.fit import TrainingError, TrainingInterrupted, fit
from cls2det.engine.run_dir import RunDirError

__all__ = [
    "CheckpointError", "RunDirError", "TrainingError", "TrainingInterrupted", "evaluate_student", "fit",
    "load_model_state", "load_state", "predict", "save_checkpoint",
]
