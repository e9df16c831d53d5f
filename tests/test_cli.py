"""The ``cls2det`` command: ``python -m cls2det`` subprocesses for the data commands and for bad inputs (exit 2, one
``error:`` line on stderr, no traceback), and ``cls2det.cli.main`` in-process for train -> eval -> export."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cls2det.cli import main
from cls2det.students import list_students


def test_help_lists_every_command(run_cli):
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("data", "teacher", "train", "eval", "study", "demo", "bench", "export"):
        assert command in result.stdout


@pytest.mark.slow
def test_data_demo_then_check(run_cli, tmp_path):
    data = tmp_path / "D"
    made = run_cli("data", "demo", "--out", data, "--train-images", 8, "--val-images", 4, "--image-size", 96)
    assert made.returncode == 0, made.stderr
    for split, count in (("train", 8), ("val", 4)):
        coco = json.loads((data / "annotations" / f"{split}.json").read_text())
        assert len(coco["images"]) == count and coco["annotations"]
        assert all(img["width"] == img["height"] == 96 for img in coco["images"])
        assert all((data / "images" / img["file_name"]).is_file() for img in coco["images"])
    checked = run_cli("data", "check", data)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip().splitlines()[-1] == f"{data}: OK"


# ------------------------------------------------------------------------------------------------ bad inputs

BAD_CASES = (
    "check_missing_dir",
    "check_broken_json",
    "unknown_detector",
    "unknown_kd_term",
    "unknown_override_key",
    "out_holds_a_run",
    "resume_nothing",
    "teacher_without_meta",
    "eval_missing_run",
    "unknown_det_method",
    "det_without_det_teacher",
)


def bad_inputs(root: Path, data: Path, teacher: Path) -> dict[str, tuple[list, list[str]]]:
    """name -> (arguments, strings the error line must contain); builds the broken inputs under ``root``."""
    broken = root / "broken"
    shutil.copytree(data, broken)
    (broken / "annotations" / "train.json").write_text('{"images": [')
    held = root / "held"
    held.mkdir()
    (held / "config.yaml").write_text("epochs: 1\n")
    (held / "last").mkdir()  # a checkpoint (or results.json) is what makes a folder "hold a run"
    (root / "empty").mkdir()
    (root / "no_meta").mkdir()  # a teacher folder without teacher.json
    shutil.copy(teacher / "teacher.safetensors", root / "no_meta")
    train = ["train", data, "--out"]
    return {
        "check_missing_dir": (["data", "check", root / "nowhere"], ["nowhere"]),
        "check_broken_json": (["data", "check", broken], ["train.json"]),
        "unknown_detector": ([*train, root / "r1", "--detector", "nope"], ["'nope'", *list_students()]),
        "unknown_kd_term": ([*train, root / "r2", "--kd", "foo"], ["'foo'", "cls, loc, kd_loc"]),
        "unknown_override_key": ([*train, root / "r3", "epochz=1"], ["epochz", "epochs"]),
        "out_holds_a_run": (
            [*train, held],
            [str(held), "holds an interrupted run", "continue it with --resume", "--overwrite"],
        ),
        "resume_nothing": ([*train, root / "empty", "--resume"], ["nothing to resume", str(root / "empty")]),
        "teacher_without_meta": (
            [*train, root / "r4", "--kd", "cls", "--teacher", root / "no_meta"],
            ["teacher.json", str(root / "no_meta")],
        ),
        "eval_missing_run": (["eval", root / "norun", data], ["norun", "not a training run"]),
        "unknown_det_method": (
            [*train, root / "r5", "--kd", "cls,det:foo"],
            ["'det:foo'", "det:logit, det:fgfi, det:pkd"],
        ),
        "det_without_det_teacher": (
            [*train, root / "r6", "--kd", "cls,det:pkd", "--teacher", teacher],
            ["needs a detector teacher", "--det-teacher RUN"],
        ),
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, demo_data, teacher_run, cli_env):
    """Every bad input's process, all started at once (each pays ~5 s of imports; in parallel they share it)."""
    root = tmp_path_factory.mktemp("bad")
    cases = bad_inputs(root, demo_data, teacher_run)
    assert tuple(cases) == BAD_CASES
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "cls2det", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env,
        )
        for name, (args, _) in cases.items()
    }
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = (proc.returncode, stdout, stderr, cases[name][1])
    return root, done


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line_and_exit_2(bad_runs, case):
    _, done = bad_runs
    returncode, _, stderr, expected = done[case]
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in expected:
        assert text in lines[0]


@pytest.mark.slow
def test_a_failed_start_leaves_no_run_behind(bad_runs, demo_data, teacher_run, tiny_overrides, capsys, one_thread):
    """After the teacher error, fixing the teacher and running again must not hit "holds another run"."""
    root, _ = bad_runs
    assert (root / "held" / "config.yaml").read_text() == "epochs: 1\n"  # the refused run touched nothing
    assert not (root / "r4" / "config.yaml").exists()
    code = main(
        [
            "train",
            str(demo_data),
            "--out",
            str(root / "r4"),
            "--kd",
            "cls",
            "--teacher",
            str(teacher_run),
            "--no-progress",
            *tiny_overrides("ssdlite320_mobilenet_v3"),
            "max_steps=1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (root / "r4" / "results.json").is_file()


# ------------------------------------------------------------------------------------------------ happy path


def test_det_teacher_flag_and_det_terms_reach_the_config(tmp_path):
    from cls2det.cli import build_parser, train_config_from_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("distill: {kd: [cls], det_teacher: from_yaml, lambda_det_pkd: 3}\n")
    parse = build_parser().parse_args
    args = parse(
        [
            "train",
            "data",
            "distill.fgfi_psi=0.7",
            "--out",
            "o",
            "--config",
            str(recipe),
            "--kd",
            "cls,loc,kd_loc,det:pkd",
            "--det-teacher",
            "runs/det",
        ]
    )
    distill = train_config_from_args(args).distill
    assert distill.kd == ["cls", "loc", "kd_loc", "det:pkd"] and distill.det_teacher == "runs/det"
    assert distill.lambda_det_pkd == 3.0 and distill.fgfi_psi == 0.7  # the YAML's other keys stay
    kept = train_config_from_args(parse(["train", "data", "--out", "o", "--config", str(recipe), "--kd", "det:logit"]))
    assert kept.distill.kd == ["det:logit"] and kept.distill.det_teacher == "from_yaml"


def test_train_eval_export_in_process(demo_data, teacher_run, tiny_overrides, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            str(demo_data),
            "--out",
            str(run),
            "--teacher",
            str(teacher_run),
            "--kd",
            "cls,loc,kd_loc",
            "--no-progress",
            *tiny_overrides("ssdlite320_mobilenet_v3"),
            "max_steps=1",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "ssdlite320_mobilenet_v3 --kd cls,loc,kd_loc" in printed.out and "mAP |" in printed.out
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 1

    metrics_file = tmp_path / "metrics.json"
    code = main(["eval", str(run), str(demo_data), "--json", str(metrics_file)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = printed.out.strip().splitlines()
    assert lines[-2].split() == "mAP | AP50 | AP75 | APs | APm | APl | mAR".split()
    assert len(lines[-1].split("|")) == 7
    # the same weights on the same split: eval agrees with the run's own final evaluation
    metrics = json.loads(metrics_file.read_text())
    for key in ("mAP", "AP50", "AP75", "APs", "APm", "APl", "mAR"):
        assert same_number(metrics[key], results["metrics"][key]), key
        assert f"{results['metrics'][key]:6.2f}" in lines[-1]  # printed as nan, written as null

    # --errors: the same metrics, then the TIDE breakdown table (also in the JSON)
    code = main(["eval", str(run), str(demo_data), "--errors", "--json", str(metrics_file)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = printed.out.strip().splitlines()
    with_errors = json.loads(metrics_file.read_text())
    for key in ("mAP", "AP50", "AP75", "APs", "APm", "APl", "mAR"):
        assert same_number(with_errors[key], metrics[key]), key
    assert lines[-3].startswith("TIDE error breakdown")
    assert lines[-2].split() == "AP50 | cls | loc | both | dupe | bkg | miss".split()
    errors = with_errors["errors"]
    keys = ("AP50", "cls", "loc", "both", "dupe", "bkg", "miss")
    assert lines[-1].split(" | ") == [f"{errors[k]:6.2f}" for k in keys]
    assert all(0.0 <= errors[k] <= 100.0 for k in errors)

    exported = tmp_path / "student.pt"
    code = main(["export", str(run), "--format", "torchscript", "--out", str(exported)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert str(exported) in printed.out
    sidecar = json.loads((tmp_path / "student.json").read_text())
    classes = json.loads((run / "classes.json").read_text())
    assert sidecar["class_names"] == classes["class_names"] and sidecar["detector"] == "ssdlite320_mobilenet_v3"
    scripted = torch.jit.load(str(exported))
    _, detections = scripted([torch.rand(3, 96, 96)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def same_number(a: float | None, b: float | None) -> bool:
    """Equal metrics, a metric without a value being null in `eval --json` and NaN in results.json."""
    a, b = (math.nan if v is None else v for v in (a, b))
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_export_failure_is_one_error_line(tmp_path, capsys, monkeypatch):
    """An export the environment cannot do (ExportError, e.g. onnx not installed) ends like any bad input."""
    from cls2det.deploy import export

    def fail(*args, **kwargs):
        raise export.ExportError("ONNX export needs the 'onnx' package: pip install 'cls2det[export]'")

    monkeypatch.setattr(export, "export_student", fail)
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX export needs the 'onnx' package") and err.count("\n") == 1


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(monkeypatch, capsys, tmp_path):
    """Only the project's own error types are bad input (exit 2); a ValueError raised deep in the code is a bug and
    must surface with its traceback instead of reading like a user's mistake."""
    import cls2det.cli as cli
    from cls2det.data import DatasetError

    def bug(args):
        raise ValueError("shape mismatch deep in training")

    monkeypatch.setattr(cli, "cmd_train", bug)
    with pytest.raises(ValueError, match="shape mismatch deep in training"):
        main(["train", str(tmp_path), "--out", str(tmp_path / "run")])

    def bad_input(args):
        raise DatasetError("annotations/train.json: image 3 has no file_name")

    monkeypatch.setattr(cli, "cmd_train", bad_input)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "error: annotations/train.json: image 3 has no file_name\n"


# ------------------------------------------------------------------------------------------------ help and version


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"cls2det {version('cls2det')}"


def test_train_list_names_every_detector(capsys):
    """`cls2det train --help` points to --list: it exists and needs no dataset or --out."""
    with pytest.raises(SystemExit) as caught:
        main(["train", "--list"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.split() == list_students()


def test_every_flag_and_positional_has_help():
    import argparse

    from cls2det.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    silent = [
        f"{parser.prog} {action.dest}"
        for parser in parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)) and not action.help
    ]
    assert silent == []


@pytest.mark.parametrize("value", ["0", "-1"])
def test_epochs_below_one_is_one_error_line(value, capsys, tmp_path):
    """`--epochs 0` exited 0, printed the mAP of an untrained model and left a run without a checkpoint."""
    with pytest.raises(SystemExit) as caught:
        main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--epochs", value])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cls2det train: argument --epochs: must be >= 1, got {value}"
    ]
    assert not (tmp_path / "r").exists()


def test_json_safe_writes_null_for_a_metric_without_a_value():
    from cls2det.cli import json_safe

    text = json.dumps(json_safe({"mAP": 1.5, "APl": math.nan, "per_iou": [math.inf, 2.0]}), allow_nan=False)
    assert json.loads(text) == {"mAP": 1.5, "APl": None, "per_iou": [None, 2.0]}
