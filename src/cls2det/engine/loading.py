"""Rebuild a trained student from its run folder (config.yaml + classes.json + a checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from cls2det.config import ConfigError, TrainConfig, load_config
from cls2det.engine.checkpoint import CheckpointError, load_model_state
from cls2det.engine.run_dir import CLASSES, CONFIG
from cls2det.students import create_student


def load_student(run: str | Path, *, checkpoint: str = "last") -> tuple[nn.Module, TrainConfig]:
    """The student of run folder ``run`` in eval mode, with its weights from ``run/checkpoint``, and its config."""
    run = Path(run)
    for name in (CONFIG, CLASSES):
        if not (run / name).is_file():
            raise ConfigError(f"{run} is not a training run: {name} not found")
    config = load_config(TrainConfig, run / CONFIG)
    classes = json.loads((run / CLASSES).read_text())
    model = create_student(config.student.detector, len(classes["class_names"]), config.student)
    state = load_model_state(run / checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        culprit = (missing or unexpected)[0]
        raise CheckpointError(f"{run / checkpoint} does not fit {config.student.detector}: key {culprit}")
    return model.eval(), config
