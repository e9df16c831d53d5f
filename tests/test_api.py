"""The public API for a user's own loop: ``from cls2det import ...``, ``wrap_detector`` on a detector the user built,
``Distiller`` on its output; and ``examples/own_loop.py`` run for a few steps, so that the example cannot rot."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn, retinanet_resnet50_fpn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large as ssdlite

import cls2det
from cls2det import DistillConfig, Distiller, load_teacher, wrap_detector
from cls2det.data import CocoDetection, collate, load_split
from cls2det.engine.objective import distillation_losses
from cls2det.students.faster_rcnn import FasterRCNNAdapter
from cls2det.students.retinanet import RetinaNetAdapter
from cls2det.students.ssd import SSDAdapter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"
NUM_CLASSES = 10  # the demo data's digits


def test_root_exports_are_listed_and_lazy():
    for name in cls2det.__all__:
        assert getattr(cls2det, name) is not None
    # a fresh interpreter: importing the package (and the CLI) loads neither torch nor Fabric
    code = "import sys, cls2det, cls2det.cli; print('torch' in sys.modules, 'lightning_fabric' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    with pytest.raises(AttributeError):
        cls2det.no_such_name  # noqa: B018


def test_wrap_detector_infers_and_checks_the_class_count():
    det = ssdlite(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1)
    adapter = wrap_detector(det)
    assert isinstance(adapter, SSDAdapter) and adapter.detector is det and adapter.num_classes == NUM_CLASSES
    rcnn = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=4)
    assert isinstance(wrap_detector(rcnn, 3), FasterRCNNAdapter)
    retina = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert isinstance(wrap_detector(retina), RetinaNetAdapter) and wrap_detector(retina).num_classes == 3
    with pytest.raises(ValueError, match=r"predicts 10 classes \+ 1 \(background\)"):
        wrap_detector(det, NUM_CLASSES + 1)  # a user who passed torchvision's count
    with pytest.raises(ValueError, match="cannot wrap a Linear"):
        wrap_detector(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already an adapter"):
        wrap_detector(adapter)


@pytest.fixture(scope="module")
def batch(demo_data):
    images, targets = collate([CocoDetection(load_split(demo_data, "train"))[i] for i in range(2)])
    return images, targets


def test_distiller_adds_the_paper_terms_to_the_detector_losses(teacher_run, batch):
    torch.manual_seed(0)
    student = wrap_detector(ssdlite(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1)).train()
    teacher = load_teacher(teacher_run)
    config = DistillConfig(kd=["cls", "loc", "kd_loc"], sample_size=32, max_positives=16, lambda_kd_loc=0.5)
    distiller = Distiller(teacher, config, generator=torch.Generator().manual_seed(1))
    output = student(*batch)
    kd = distiller.losses(output)
    assert set(kd) == {"kd_cls", "loc", "kd_loc"} and all(math.isfinite(v.item()) and v.item() > 0 for v in kd.values())
    # the same numbers as cls2det train's objective, with the same positives' sample
    same = distillation_losses(output, teacher, config, generator=torch.Generator().manual_seed(1))
    assert {k: v.item() for k, v in kd.items()} == pytest.approx({k: v.item() for k, v in same.items()}, rel=1e-6)
    total = distiller.total(output, kd)
    expected = sum(output.losses.values()) + 0.4 * kd["kd_cls"] + 1.0 * kd["loc"] + 0.5 * kd["kd_loc"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert distiller.weighted(output, kd)["kd_loc"].item() == pytest.approx(0.5 * kd["kd_loc"].item(), rel=1e-6)
    assert set(distiller.weighted(output)) == set(kd)  # recomputed: another sample of the positives
    total.backward()
    head = student.detector.head.classification_head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # frozen


def test_distiller_refuses_a_teacher_of_other_classes_or_none(teacher_run, batch):
    with pytest.raises(ValueError, match="needs a classifier teacher"):
        Distiller(None, DistillConfig(kd=["cls"]))
    assert Distiller(None, DistillConfig(kd=["loc"])).config.kd == ["loc"]  # loc needs no teacher
    student = wrap_detector(ssdlite(weights=None, weights_backbone=None, num_classes=4)).train()
    images, targets = batch
    targets = [{**t, "labels": t["labels"] % 3} for t in targets]  # a 3-class dataset
    with pytest.raises(ValueError, match="the teacher has 10 classes, the student 3"):
        Distiller(load_teacher(teacher_run)).losses(student(images, targets))
    student = wrap_detector(ssdlite(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1)).train()
    with pytest.raises(ValueError, match="the teacher is on meta, the student's batch on cpu"):
        Distiller(load_teacher(teacher_run).to("meta")).losses(student(*batch))


@pytest.mark.slow
def test_own_loop_example_runs(tmp_path):
    """The README's example, end to end (demo data, a 1-epoch teacher, 3 steps): finite losses, KD terms printed."""
    cmd = [sys.executable, str(EXAMPLE), "--out", str(tmp_path), "--steps", "3", "--train-images", "12"]
    cmd += ["--teacher-epochs", "1", "--batch-size", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3, done.stdout
    for line in steps:
        values = dict(re.findall(r"(\w+)=(\S+)", line))
        assert {"loss", "classification", "bbox_regression", "kd_cls", "kd_loc"} <= set(values), line
        assert all(math.isfinite(float(v)) for v in values.values()), line


def _env() -> dict[str, str]:
    import os

    src = str(Path(cls2det.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
