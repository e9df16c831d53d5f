"""Rebuild a trained student from its run folder (config.yaml + classes.json + a checkpoint)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from cls2det.config import ConfigError, TrainConfig, load_config
from cls2det.engine.checkpoint import CheckpointError, load_model_state
from cls2det.engine.run_dir import CLASSES, CONFIG, RunDirError, TrainingError
from cls2det.run_folder import check_run_kind, short_list
from cls2det.students import create_student
from cls2det.students.backbones import CHECKPOINT_WEIGHTS, is_local_weights
from cls2det.students.base import StudentAdapter


def load_student(run: str | Path, *, checkpoint: str = "last") -> tuple[StudentAdapter, TrainConfig]:
    """The student of run folder ``run`` in eval mode, with its weights from ``run/checkpoint``, and its config.

    Built from the folder alone (``config.yaml``, ``classes.json``, the checkpoint): the backbone's pretrained weights
    file is not read again (the run may have moved to where it is not); ``imagenet`` goes through torchvision's builder
    (its hub cache), whose layout depends on those weights (SSDlite's tail)."""
    run = Path(run)
    check_run_kind(run, "student", role="run")
    for name in (CONFIG, CLASSES):
        if not (run / name).is_file():
            raise ConfigError(f"{run} is not a training run: {name} not found")
    config = load_config(TrainConfig, run / CONFIG)
    classes = json.loads((run / CLASSES).read_text())
    student = config.student
    if is_local_weights(student.backbone_weights):  # the layout it trained with, no file read: the checkpoint has all
        student = dataclasses.replace(student, backbone_weights=CHECKPOINT_WEIGHTS)
    model = create_student(config.student.detector, len(classes["class_names"]), student)
    state = load_model_state(run / checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        culprit = (missing or unexpected)[0]
        raise CheckpointError(f"{run / checkpoint} does not fit {config.student.detector}: key {culprit}")
    return model.eval(), config


def run_class_names(run: str | Path) -> list[str]:
    """The class names a student run was trained on (``run/classes.json``)."""
    check_run_kind(run, "student", role="run")
    path = Path(run) / CLASSES
    if not path.is_file():
        raise ConfigError(f"{run} is not a training run: {CLASSES} not found")
    return list(json.loads(path.read_text())["class_names"])


def check_run_classes(run: str | Path, class_names: Sequence[str], *, data: str | Path | None = None) -> None:
    """Refuse data whose classes are not the ones student run ``run`` was trained on (same names, same order):
    its label indices would name other classes. ``data`` names the dataset in the message."""
    trained = run_class_names(run)
    if trained != [str(c) for c in class_names]:
        where = f"{data} has" if data is not None else "the data has"
        raise RunDirError(
            f"{run} was trained on classes {short_list(trained)}, but {where} {short_list(list(class_names))}: "
            "evaluate / predict a run on data with its own classes"
        )


def load_det_teacher(
    run: str | Path,
    student: StudentAdapter,
    class_names: Sequence[str],
    methods: Sequence[str],
    device: torch.device | str = "cpu",
) -> StudentAdapter:
    """The detector of run folder ``run`` (its last checkpoint) as the frozen det2det teacher of ``student``.

    Frozen: eval mode (BatchNorm uses its running statistics, dropout is off), ``requires_grad=False``, on
    ``device``. Checked first: the run's classes are ``class_names``, and ``student.check_det_teacher`` accepts it
    for ``methods`` (same family, same resizing, equal anchors / feature maps where the method needs them).
    """
    run = Path(run)
    teacher, _ = load_student(run)
    classes = json.loads((run / CLASSES).read_text())["class_names"]
    if list(classes) != list(class_names):
        raise TrainingError(f"det teacher {run} was trained on classes {classes}, but the data has {list(class_names)}")
    try:
        student.check_det_teacher(teacher, methods)
    except ValueError as err:
        raise TrainingError(f"det teacher {run}: {err}") from None
    return teacher.requires_grad_(False).eval().to(device)


def needs_teacher(config: TrainConfig) -> bool:
    """Whether ``config``'s KD terms run the classifier teacher (KD_cls, KD_loc; loc and det:* do not)."""
    return any(term in ("cls", "kd_loc") for term in config.distill.kd)


def load_distillation_teacher(
    config: TrainConfig, class_names: Sequence[str], *, flips: bool = False, device: torch.device | str = "cpu"
):
    """The frozen classifier teacher of ``config.teacher`` on ``device`` when ``config``'s terms need one, else None;
    a missing flag, a folder that is not a teacher run, a teacher of other classes, or one trained without flips for
    a student that flips (``flips``: it would score mirrored crops it never saw) is a one-line error."""
    if not needs_teacher(config):
        return None
    from cls2det.run_folder import check_run_kind
    from cls2det.teacher import load_teacher

    if not config.teacher:
        raise TrainingError(f"--kd {','.join(config.distill.kd)} needs a teacher: pass --teacher TEACHER_RUN")
    check_run_kind(config.teacher, "teacher", role="--teacher")
    teacher = load_teacher(config.teacher, device=device)
    if list(teacher.class_names) != list(class_names):
        raise TrainingError(
            f"teacher {config.teacher} was trained on classes {teacher.class_names}, but {config.data} has "
            f"{list(class_names)}"
        )
    if flips and teacher.hflip is False:
        raise TrainingError(
            f"the student flips its images (train.hflip, or the dataset's info.hflip_preserves_labels) but teacher "
            f"{config.teacher} was trained without flips: retrain it with teacher.hflip=true, or set train.hflip=false"
        )
    return teacher
