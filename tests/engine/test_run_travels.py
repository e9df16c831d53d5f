"""A run folder travels (issue #27): it works from any working directory and after being moved, its resume compares
paths by the file they name, an extended schedule continues at the right learning rate, and what `train` / `eval`
print and write is what a user reads back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from cls2det.cli import main
from cls2det.engine.fit import fit
from cls2det.students.registry import backbone_classifier

DETECTOR = "ssdlite320_mobilenet_v3"


@pytest.fixture(scope="module")
def made_elsewhere(tmp_path_factory, demo_data, tiny_overrides):
    """A 2-step SSDlite run trained from folder ``made`` with relative paths (the data, a local backbone file), then
    moved to ``moved/run``: ``(moved run, the data's absolute path)``."""
    root = tmp_path_factory.mktemp("travels")
    made = root / "made"
    made.mkdir()
    shutil.copytree(demo_data, made / "data")
    save_file(backbone_classifier(DETECTOR, 10).state_dict(), str(made / "backbone.safetensors"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(made)
        argv = ["train", "data", "--out", "runs/r", "--no-progress", "--kd", "none", *tiny_overrides(DETECTOR)]
        assert main([*argv, "max_steps=2", "student.backbone_weights=backbone.safetensors"]) == 0
    saved = yaml.safe_load((made / "runs/r/config.yaml").read_text())
    assert saved["data"] == str(made / "data")  # inputs recorded absolute
    assert saved["student"]["backbone_weights"] == str(made / "backbone.safetensors")
    (root / "moved").mkdir()
    shutil.move(made / "runs/r", root / "moved/run")
    (made / "backbone.safetensors").unlink()  # gone too: the checkpoint holds every weight
    return root / "moved/run", made / "data"


def test_a_moved_run_evaluates_exports_and_predicts_from_another_folder(
    made_elsewhere, tmp_path, monkeypatch, capsys, one_thread
):
    run, data = made_elsewhere
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(run), str(data), "--json", "m.json"]) == 0, capsys.readouterr().err
    metrics = json.loads(Path("m.json").read_text())  # strict JSON: a metric without a value is null, not NaN
    assert set(metrics) >= {"mAP", "AP50", "APl"} and metrics["APl"] is None  # no large objects in 96 px images
    assert main(["export", str(run), "--format", "onnx", "--out", "exported"]) == 0, capsys.readouterr().err
    assert Path("exported/student.onnx").is_file()
    photo = next((data / "images").rglob("*.png"))
    assert main(["predict", str(run), str(photo), "--out", "p", "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads(Path("p/images.json").read_text())["model"]["detector"] == DETECTOR


def test_resume_from_another_folder_takes_the_data_by_any_spelling(
    made_elsewhere, tmp_path, monkeypatch, capsys, one_thread
):
    """The data given by another path to the same folder (here relative to a new working directory) is the same
    data: --resume goes on instead of refusing "was run with data=..."."""
    run, data = made_elsewhere
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    monkeypatch.chdir(data.parent.parent)  # the data is now "made/data", before it was "data"
    code = main(["train", "made/data", "--out", str(copy), "--resume", "--no-progress", "max_steps=3"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((copy / "results.json").read_text())["steps"] == 3


def test_extending_a_finished_run_continues_the_schedule(make_train_config, tmp_path, read_metrics, load_weights):
    """--resume max_steps=4 on a finished 2-step run: step 3 uses the 4-step schedule's LR (was 0, the finished
    cosine's end) and the run ends with the weights of a fresh 4-step run."""
    extended = ["epochs=2", "optim.lr=0.003"]
    fit(make_train_config(tmp_path / "short", DETECTOR, [*extended, "max_steps=2"]), progress=False)
    resumed = make_train_config(tmp_path / "short", DETECTOR, [*extended, "max_steps=4"])
    fit(resumed, resume=True, progress=False)
    fit(make_train_config(tmp_path / "fresh", DETECTOR, [*extended, "max_steps=4"]), progress=False)
    _, short = read_metrics(tmp_path / "short" / "metrics.csv")
    _, fresh = read_metrics(tmp_path / "fresh" / "metrics.csv")
    assert [row["step"] for row in short] == [1, 2, 3, 4]
    assert short[2]["lr"] == pytest.approx(0.003 * 0.75)  # cosine over 4 steps, 1 warm-up step: 0.00225
    assert [row["lr"] for row in short] == [row["lr"] for row in fresh]
    assert short[3]["loss"] == fresh[3]["loss"]
    a, b = load_weights(tmp_path / "short"), load_weights(tmp_path / "fresh")
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_the_run_summary_names_the_kd_terms_as_the_flag_takes_them(
    demo_data, teacher_run, tiny_overrides, tmp_path, capsys, one_thread
):
    argv = ["train", str(demo_data), "--out", str(tmp_path / "r"), "--no-progress", "--teacher", str(teacher_run)]
    assert main([*argv, "--kd", "cls,kd_loc", *tiny_overrides(DETECTOR), "max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert f"{DETECTOR} --kd cls,kd_loc" in out.splitlines() and "['cls'" not in out
