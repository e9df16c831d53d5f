"""`cls2det study`: a tiny grid end to end (data, teacher, backbone pre-training, rows, report), then resumed."""
import json

import pytest
import yaml

from cls2det.engine.study import run_study


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resumable(tmp_path):
    config = {
        "name": "tiny", "out": str(tmp_path / "study"),
        "demo_data": {"train_images": 8, "val_images": 4, "image_size": 96},
        "teacher": {"arch": "resnet18", "input_size": 32, "epochs": 1, "batch_size": 32},
        "backbone_pretrain": {"input_size": 32, "epochs": 1, "batch_size": 32},
        "train": {"epochs": 1, "batch_size": 4, "max_steps": 1, "eval_every": 100, "accelerator": "cpu",
                  "student": {"image_size": 96}, "optim": {"warmup_steps": 1},
                  "distill": {"sample_size": 32, "max_positives": 16}},
        "detectors": ["ssdlite320_mobilenet_v3"], "seeds": [0],
        "rows": {"baseline": ["distill.kd=[]"], "all": ["distill.kd=[cls,loc,kd_loc]"]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    report = run_study(path)
    out = tmp_path / "study"
    text = report.read_text()
    assert "`baseline`" in text and "`all`" in text and "![ap_vs_iou](ap_vs_iou.png)" in text
    for name in ("report.csv", "ap_vs_iou.png", "loss_curves.png", "predictions.png", "teacher/teacher.json",
                 "backbone/ssdlite320_mobilenet_v3.safetensors"):
        assert (out / name).is_file(), name
    runs = {row: out / "ssdlite320_mobilenet_v3" / row / "seed0" for row in ("baseline", "all")}
    saved = yaml.safe_load((runs["all"] / "config.yaml").read_text())
    assert saved["distill"]["kd"] == ["cls", "loc", "kd_loc"]  # the row's override reached its run
    assert saved["student"]["backbone_weights"].endswith("ssdlite320_mobilenet_v3.safetensors")
    assert json.loads((runs["baseline"] / "results.json").read_text().replace("NaN", "null"))["steps"] == 1

    stamps = {row: (run / "results.json").stat().st_mtime_ns for row, run in runs.items()}
    run_study(path)  # finished runs are skipped
    assert {row: (run / "results.json").stat().st_mtime_ns for row, run in runs.items()} == stamps


def test_study_without_rows_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nrows: {}\n")
    with pytest.raises(ValueError, match="study.rows is empty"):
        run_study(path)
