"""The student's run folder as a contract (issue #15): --resume keeps the recipe, eval checks the data's classes,
a run that fails early leaves nothing a rerun trips over, and notices about inputs that fit small data badly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cls2det.cli import main
from cls2det.config import TrainConfig, load_config
from cls2det.data import load_split
from cls2det.engine.run_dir import RunDirError
from cls2det.students import create_student

DETECTOR = "ssdlite320_mobilenet_v3"


def train(data, out, *args) -> list[str]:
    return ["train", str(data), "--out", str(out), "--no-progress", *map(str, args)]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_data, teacher_run, tiny_overrides) -> Path:
    """A finished one-epoch (3-step) SSDlite run with KD_cls."""
    out = tmp_path_factory.mktemp("contract") / "run"
    assert main(train(demo_data, out, "--kd", "cls", "--teacher", teacher_run, *tiny_overrides(DETECTOR))) == 0
    return out


def test_resume_refuses_another_recipe_and_rewrites_nothing(finished_run, demo_data, capsys, one_thread):
    run = finished_run
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "results.json", "metrics.csv")}
    assert main(train(demo_data, run, "--resume", "--kd", "none", "student.image_size=128")) == 2
    line = one_error_line(capsys)
    assert f"{run} was run with distill.kd=['cls']; --resume cannot change it to []" in line
    assert main(train(demo_data, run, "--resume", "epochs=0")) == 2  # no run has 0 epochs: refused by the config
    assert one_error_line(capsys) == "error: epochs must be > 0, got 0"
    assert main(train(demo_data, run, "--resume", "max_steps=1")) == 2  # was null (no cap)
    assert "max_steps=null; --resume cannot change it to 1 (it may only grow)" in one_error_line(capsys)
    # the same recipe: the run is finished, nothing to do and nothing rewritten
    assert main(train(demo_data, run, "--resume")) == 0
    assert "nothing to resume; raise epochs=N" in capsys.readouterr().out
    assert {name: (run / name).read_bytes() for name in before} == before


def test_resume_with_more_epochs_is_applied_and_recorded(finished_run, demo_data, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(train(demo_data, run, "--resume", "--epochs", "2", "workers=0")) == 0, capsys.readouterr().err
    assert load_config(TrainConfig, run / "config.yaml").epochs == 2
    assert json.loads((run / "results.json").read_text())["steps"] == 6
    events = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "resume"]
    assert events[1]["step"] == 3 and events[1]["changed"]["epochs"] == {"old": 1, "new": 2}
    assert events[1]["changed"]["out"] == {"old": str(finished_run), "new": str(run)}  # the copied run moved


def test_eval_refuses_data_with_other_classes(finished_run, demo_data, tmp_path, capsys):
    other = tmp_path / "animals"
    shutil.copytree(demo_data, other)
    for split in ("train", "val"):
        path = other / "annotations" / f"{split}.json"
        coco = json.loads(path.read_text())
        for category in coco["categories"]:
            category["name"] = f"animal{category['name']}"
        path.write_text(json.dumps(coco))
    assert main(["eval", str(finished_run), str(other)]) == 2
    line = one_error_line(capsys)
    assert f"{finished_run} was trained on classes [0, 1, 2, 3, ..., 9] (10 classes), but {other} has" in line
    assert "[animal0, animal1, animal2, animal3, ..., animal9] (10 classes)" in line
    from cls2det.engine.loading import check_run_classes  # (imported here: the test must run on older code too)

    names = load_split(other, "val").class_names
    with pytest.raises(RunDirError, match="was trained on classes"):
        check_run_classes(finished_run, names)  # what `predict` calls
    check_run_classes(finished_run, load_split(demo_data, "val").class_names)


def test_a_run_that_fails_before_its_first_checkpoint_is_rerun_plainly(
    demo_data, tmp_path, tiny_overrides, capsys, one_thread
):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    image = data / "images" / "train" / "000005.png"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])  # truncated: met at some step of the first epoch
    out = tmp_path / "run"
    args = train(data, out, "--kd", "none", *tiny_overrides(DETECTOR))
    assert main(args) == 2
    assert "000005.png: image file is truncated" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / "last").exists() and (out / "config.yaml").is_file()  # an unfinished start
    # a start refused on its inputs leaves no folder at all
    assert main([*train(data, tmp_path / "early", "--kd", "cls"), "accelerator=cpu"]) == 2  # no --teacher
    assert "needs a teacher" in one_error_line(capsys) and not (tmp_path / "early").exists()

    # --resume names the way out of an unfinished start, and a plain rerun takes the folder (as it takes what a run
    # killed with SIGKILL before its first checkpoint leaves)
    image.write_bytes(good)
    assert main([*args, "--resume"]) == 2
    assert "stopped before its first checkpoint; run again without --resume to start it over" in one_error_line(capsys)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (out / "results.json").is_file() and (out / "last").is_dir()
    assert "note: student.backbone_weights is unset" in err  # printed once the run has started


def test_notices_for_inputs_that_fit_small_images_badly(demo_data):
    from cls2det.engine.advice import input_notices

    split = load_split(demo_data, "train")  # 96 px images
    config = TrainConfig(data=str(demo_data))  # Faster R-CNN MobileNetV3 at its default 800 px
    student = create_student(config.student.detector, split.num_classes, config.student)
    size, backbone = input_notices(config, student, split)
    assert size.startswith("warning: the train images are ~96 px but fasterrcnn_mobilenet_v3 resizes them to 800 px")
    assert size.endswith("consider student.image_size=320")
    assert backbone.startswith("note: student.backbone_weights is unset") and "backbone_weights=imagenet" in backbone
    config.student.image_size, config.student.backbone_weights = 320, "weights.safetensors"
    assert input_notices(config, student, split) == []
