"""Helpers of the end-to-end engine tests (training, resume, DDP); the data / teacher fixtures live in
``tests/conftest.py`` so that ``tests/test_cli.py`` shares them."""

from __future__ import annotations

import csv
import importlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cls2det.teacher

fit_module = importlib.import_module("cls2det.engine.fit")  # the package exports a function named fit


def read_metrics(path: Path) -> tuple[list[str], list[dict[str, float]]]:
    """metrics.csv -> (columns, rows as {column: float}); empty cells (a term absent that step) are NaN."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        columns = next(reader)
        rows = [{c: float(v) if v != "" else math.nan for c, v in zip(columns, line)} for line in reader]
    return columns, rows


@pytest.fixture(name="read_metrics")
def read_metrics_fixture():
    return read_metrics


def load_weights(run: Path, checkpoint: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run) / checkpoint / "model.safetensors"))


@pytest.fixture(name="load_weights")
def load_weights_fixture():
    """``load_weights(run, checkpoint="last") -> state dict`` of a run folder's checkpoint."""
    return load_weights


@pytest.fixture
def spy_fit(monkeypatch):
    """Record what :func:`cls2det.engine.fit` builds: ``spy["teacher"]`` (the Teacher object it trains against),
    ``spy["teacher_init"]`` (a copy of its state when loaded) and ``spy["student_init"]`` (a copy of the student's
    state dict right after it was built, before any step), ``spy["student"]`` (the student itself)."""
    spy: dict = {}
    load_teacher, create_student = cls2det.teacher.load_teacher, fit_module.create_student

    def spy_load_teacher(*args, **kwargs):
        teacher = load_teacher(*args, **kwargs)
        spy["teacher"], spy["teacher_init"] = teacher, {k: v.clone() for k, v in teacher.state_dict().items()}
        return teacher

    def spy_create_student(*args, **kwargs):
        student = create_student(*args, **kwargs)
        spy["student"], spy["student_init"] = student, {k: v.detach().clone() for k, v in student.state_dict().items()}
        return student

    monkeypatch.setattr(cls2det.teacher, "load_teacher", spy_load_teacher)  # fit imports it at call time
    monkeypatch.setattr(fit_module, "create_student", spy_create_student)
    return spy
