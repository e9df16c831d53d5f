"""Training with a detector teacher (``--kd ...,det:<method> --det-teacher RUN``) on the tiny demo dataset: every
det2det term end to end for SSDlite and Faster R-CNN MobileNetV3, the combination with the classifier teacher,
and the guards (no det teacher, other classes, other input size)."""

from __future__ import annotations

import importlib
import json
import math
import shutil

import pytest
import torch

from cls2det.config import ConfigError
from cls2det.engine import TrainingError
from cls2det.engine.fit import fit
from cls2det.engine.run_dir import CLASSES, CONFIG

fit_module = importlib.import_module("cls2det.engine.fit")

pytestmark = pytest.mark.usefixtures("one_thread")

DET_TERMS = ("det_logit", "det_fgfi", "det_pkd")


@pytest.fixture(scope="module")
def det_teachers(make_train_config, tmp_path_factory):
    """``{detector: run folder}``: a 1-step baseline run of each detector (a trained detector's run layout)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    try:
        for detector in ("ssdlite320_mobilenet_v3", "fasterrcnn_mobilenet_v3"):
            out = tmp_path_factory.mktemp("det_teacher") / detector
            fit(
                make_train_config(out, detector, ["distill.kd=[]", "teacher=null", "max_steps=1", "seed=5"]),
                progress=False,
            )
            runs[detector] = out
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.fixture
def spy_det_teacher(monkeypatch):
    """``spy["teacher"]``: the det teacher fit trains against, ``spy["init"]``: a copy of its state when loaded."""
    spy: dict = {}
    real = fit_module.load_det_teacher

    def load(*args, **kwargs):
        teacher = real(*args, **kwargs)
        spy["teacher"], spy["init"] = teacher, {k: v.clone() for k, v in teacher.state_dict().items()}
        return teacher

    monkeypatch.setattr(fit_module, "load_det_teacher", load)
    return spy


@pytest.mark.parametrize("detector", ["ssdlite320_mobilenet_v3", "fasterrcnn_mobilenet_v3"])
def test_every_det_term_one_step(
    detector, det_teachers, make_train_config, tmp_path, spy_det_teacher, spy_fit, read_metrics, load_weights
):
    out = tmp_path / "run"
    kd = "distill.kd=[det:logit,det:fgfi,det:pkd]"
    config = make_train_config(out, detector, [kd, f"distill.det_teacher={det_teachers[detector]}", "max_steps=1"])
    results = fit(config, progress=False)
    assert results["steps"] == 1 and results["kd"] == ["det:logit", "det:fgfi", "det:pkd"]
    assert "teacher" not in spy_fit  # no classifier teacher is loaded for det:* terms alone

    columns, rows = read_metrics(out / "metrics.csv")
    row = rows[0]
    assert {*DET_TERMS, *(f"w_{t}" for t in DET_TERMS)} <= set(columns)
    assert all(math.isfinite(v) for v in row.values()) and all(row[t] > 0 for t in DET_TERMS), row
    weights = {
        "det_logit": config.distill.lambda_det_logit,
        "det_fgfi": config.distill.lambda_det_fgfi,
        "det_pkd": config.distill.lambda_det_pkd,
    }
    for term, weight in weights.items():
        assert row[f"w_{term}"] == pytest.approx(weight * row[term], rel=1e-4)
    skip = {"step", "epoch", "lr", "loss", "positives", *DET_TERMS, *(f"w_{t}" for t in DET_TERMS)}
    detector_losses = sum(row[c] for c in columns if c not in skip)
    assert row["loss"] == pytest.approx(detector_losses + sum(row[f"w_{t}"] for t in DET_TERMS), rel=1e-4)

    teacher = spy_det_teacher["teacher"]  # frozen: eval mode, no gradient, weights as loaded
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in spy_det_teacher["init"].items())
    after = load_weights(out)
    assert any(not torch.equal(after[k], v) for k, v in spy_fit["student_init"].items() if v.is_floating_point())
    assert set(after) == set(spy_fit["student_init"])  # the checkpoint holds the student alone


def test_classifier_and_detector_teachers_together(det_teachers, make_train_config, tmp_path, read_metrics):
    """Table 2's combination: the full method plus a det2det term, --kd cls,kd_loc,det:pkd."""
    out = tmp_path / "both"
    detector = "ssdlite320_mobilenet_v3"
    config = make_train_config(
        out,
        detector,
        ["distill.kd=[cls,kd_loc,det:pkd]", "max_steps=2", f"distill.det_teacher={det_teachers[detector]}"],
    )
    fit(config, progress=False)
    columns, rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2]
    for term in ("kd_cls", "kd_loc", "det_pkd"):
        assert all(math.isfinite(r[term]) and r[term] > 0 for r in rows), term
    assert "loc" not in columns


def test_det_terms_without_a_det_teacher_are_refused(make_train_config, tmp_path):
    config = make_train_config(tmp_path / "r", "ssdlite320_mobilenet_v3", ["distill.kd=[cls,det:pkd]"])
    with pytest.raises(TrainingError, match=r"--kd cls,det:pkd needs a detector teacher: pass --det-teacher RUN"):
        fit(config, progress=False)
    assert not (tmp_path / "r" / CONFIG).exists()


def test_det_teacher_with_other_classes_is_refused(det_teachers, make_train_config, tmp_path):
    other = tmp_path / "det_teacher"
    shutil.copytree(det_teachers["ssdlite320_mobilenet_v3"], other)
    classes = json.loads((other / CLASSES).read_text())
    classes["class_names"] = [f"c{name}" for name in classes["class_names"]]
    (other / CLASSES).write_text(json.dumps(classes))
    config = make_train_config(
        tmp_path / "r", "ssdlite320_mobilenet_v3", ["distill.kd=[det:logit]", f"distill.det_teacher={other}"]
    )
    with pytest.raises(TrainingError, match="det teacher .* was trained on classes") as err:
        fit(config, progress=False)
    assert str(classes["class_names"]) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "r" / CONFIG).exists()


def test_det_teacher_of_another_size_or_family_is_refused(det_teachers, make_train_config, tmp_path):
    teacher = det_teachers["ssdlite320_mobilenet_v3"]
    bigger = make_train_config(
        tmp_path / "a",
        "ssdlite320_mobilenet_v3",
        ["distill.kd=[det:pkd]", f"distill.det_teacher={teacher}", "student.image_size=128"],
    )
    with pytest.raises(TrainingError, match="resizes images with .* train the teacher with the student's"):
        fit(bigger, progress=False)
    family = make_train_config(
        tmp_path / "b", "fasterrcnn_mobilenet_v3", ["distill.kd=[det:logit]", f"distill.det_teacher={teacher}"]
    )
    with pytest.raises(TrainingError, match="the det teacher is a SSDAdapter, the student a FasterRCNNAdapter"):
        fit(family, progress=False)
    missing = make_train_config(
        tmp_path / "c",
        "ssdlite320_mobilenet_v3",
        ["distill.kd=[det:pkd]", f"distill.det_teacher={tmp_path / 'nothing'}"],
    )
    with pytest.raises(ConfigError, match="nothing is not a training run: config.yaml not found"):
        fit(missing, progress=False)
