"""The teacher's run folder: the same rules as a student run's, checkpoints, Ctrl-C and --resume, metrics.csv."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from cls2det.cli import main
from cls2det.config import TeacherConfig
from cls2det.engine import TrainingInterrupted, load_state
from cls2det.teacher import load_teacher, train_teacher

train_module = importlib.import_module("cls2det.teacher.train")
TINY = dict(arch="test_resnet", input_size=16, epochs=2, batch_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory):
    """A two-epoch teacher run, never interrupted."""
    out = tmp_path_factory.mktemp("teacher_run") / "A"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that compare with it (a module fixture runs before their one_thread)
    torch.manual_seed(0)  # the network's random init (the run's own seed covers the training, not the init)
    train_teacher(demo_data, out, TeacherConfig(**TINY), progress=False)
    torch.set_num_threads(threads)
    return out


def test_a_teacher_run_folder_has_checkpoints_metrics_and_its_kind(uninterrupted):
    out = uninterrupted
    assert json.loads((out / "run.json").read_text())["kind"] == "teacher"
    state = load_state(out / "last")
    assert state["epoch"] == 3 and state["batch_in_epoch"] == 0 and len(state["history"]) == 2
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,lr,loss,top1" and len(rows) == 1 + state["step"] + 2  # a row per step + per epoch
    assert any((out / "tb").iterdir()) and (out / "best" / "model.safetensors").is_file()
    load_teacher(out)  # the finished teacher itself


def test_an_interrupted_teacher_resumed_ends_with_the_same_weights(uninterrupted, demo_data, tmp_path, monkeypatch):
    out = tmp_path / "B"
    calls = {"n": 0}
    loss = train_module.classification_loss

    def ctrl_c_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "classification_loss", ctrl_c_in_step_3)
    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted, match="at step 3; continue with --resume"):
        train_teacher(demo_data, out, TeacherConfig(**TINY), progress=False)
    monkeypatch.undo()
    state = load_state(out / "last")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 1, 3)  # mid-epoch
    assert not (out / "teacher.json").exists()

    assert main(["teacher", str(demo_data), "--out", str(out), "--resume", "--no-progress"]) == 0
    ours, theirs = (load_file(str(p / "teacher.safetensors")) for p in (out, uninterrupted))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "metrics.csv").read_text() == (uninterrupted / "metrics.csv").read_text()
    history = [json.loads((p / "teacher.json").read_text())["metrics"]["history"] for p in (out, uninterrupted)]
    assert history[0] == history[1]
    events = [json.loads(line)["event"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert events == ["start", "resume"]


def test_teacher_resume_refuses_another_recipe_and_takes_more_epochs(uninterrupted, demo_data, tmp_path, capsys):
    out = tmp_path / "A"
    shutil.copytree(uninterrupted, out)
    meta = (out / "teacher.json").read_bytes()
    teacher = ["teacher", str(demo_data), "--out", str(out), "--no-progress"]

    assert main([*teacher, "--resume", "lr=0.1"]) == 2
    assert "was run with lr=0.002; --resume cannot change it to 0.1" in capsys.readouterr().err
    assert main([*teacher, "--resume"]) == 0  # finished: nothing to do, nothing rewritten
    assert (out / "teacher.json").read_bytes() == meta

    assert main([*teacher, "--resume", "--epochs", "3"]) == 0
    assert json.loads((out / "teacher.json").read_text())["metrics"]["epochs"] == 3
    assert "epochs: 3" in (out / "config.yaml").read_text()
    resumed = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert resumed["event"] == "resume" and resumed["changed"] == {"epochs": {"old": 2, "new": 3}}


def test_teacher_and_student_run_folders_keep_apart(uninterrupted, demo_data, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    shutil.copytree(uninterrupted, teacher_dir)
    weights = (teacher_dir / "teacher.safetensors").read_bytes()
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    (student_dir / "config.yaml").write_text("epochs: 1\n")
    (student_dir / "last").mkdir()
    data = str(demo_data)

    def error(argv) -> str:
        assert main([*map(str, argv)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    # a second teacher run into the same folder no longer replaces the first one silently
    assert (
        "holds a finished run: train it longer with --resume and more epochs, or replace it with --overwrite"
        in error(["teacher", data, "--out", teacher_dir])
    )
    # --overwrite keeps the old run until the new one has started (here: an unknown architecture)
    assert "nope" in error(["teacher", data, "--out", teacher_dir, "--overwrite", "--arch", "nope"])
    assert (teacher_dir / "teacher.safetensors").read_bytes() == weights
    assert f"{student_dir} holds a student run (cls2det train); cls2det teacher writes teacher runs" in error(
        ["teacher", data, "--out", student_dir]
    )
    assert f"{teacher_dir} holds a teacher run (cls2det teacher); cls2det train writes student runs" in error(
        ["train", data, "--out", teacher_dir, "--overwrite"]
    )
    assert f"--teacher {student_dir} is a student run (cls2det train), not a teacher run" in error(
        ["train", data, "--out", tmp_path / "new", "--kd", "cls", "--teacher", student_dir, "--no-progress"]
    )
    assert f"run {teacher_dir} is a teacher run (cls2det teacher), not a student run" in error(
        ["eval", teacher_dir, data]
    )
    assert not (tmp_path / "new").exists()  # the refused start left no folder behind
    assert (student_dir / "config.yaml").read_text() == "epochs: 1\n"
