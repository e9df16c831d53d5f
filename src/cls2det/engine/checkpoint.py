"""The student's checkpoints: see :mod:`cls2det.files` (shared with the teacher's training)."""

from cls2det.files import CheckpointError, load_model_state, load_state, save_checkpoint

__all__ = ["CheckpointError", "load_model_state", "load_state", "save_checkpoint"]
