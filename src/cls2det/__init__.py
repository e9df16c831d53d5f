"""cls2det: distill image classifiers into object detectors.

The public API for your own training loop (README, "Your own training loop"), importable from here::

    from cls2det import Distiller, DistillConfig, load_teacher, wrap_detector

Names load on first use (PEP 562), so ``import cls2det`` and the CLI's start stay cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {  # name -> module that defines it
    "DistillConfig": "cls2det.config",
    "TeacherConfig": "cls2det.config",
    "Distiller": "cls2det.engine.distiller",
    "StudentOutput": "cls2det.students.base",
    "Positives": "cls2det.students.base",
    "create_student": "cls2det.students.registry",
    "wrap_detector": "cls2det.students.registry",
    "load_teacher": "cls2det.teacher.io",
    "train_teacher": "cls2det.teacher.train",
    "load_student": "cls2det.engine.loading",
    "generate_demo": "cls2det.data.demo",
}

__all__ = [
    "DistillConfig",
    "Distiller",
    "Positives",
    "StudentOutput",
    "TeacherConfig",
    "__version__",
    "create_student",
    "generate_demo",
    "load_student",
    "load_teacher",
    "train_teacher",
    "wrap_detector",
]

if TYPE_CHECKING:
    from cls2det.config import DistillConfig, TeacherConfig
    from cls2det.data.demo import generate_demo
    from cls2det.engine.distiller import Distiller
    from cls2det.engine.loading import load_student
    from cls2det.students.base import Positives, StudentOutput
    from cls2det.students.registry import create_student, wrap_detector
    from cls2det.teacher.io import load_teacher
    from cls2det.teacher.train import train_teacher


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cls2det' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
