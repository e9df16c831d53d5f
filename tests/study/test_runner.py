"""`cls2det study`: a tiny grid end to end (data, teacher, backbone pre-training, detector teacher, rows, report),
then resumed; the det2det study's rows and detector teacher."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from cls2det.config import ConfigError, StudyConfig, from_dict, load_config, shipped_config
from cls2det.study.runner import check_study, det_teacher_config, row_config, run_study


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resumable(tmp_path):
    config = {
        "name": "tiny",
        "out": str(tmp_path / "study"),
        "demo_data": {"train_images": 8, "val_images": 4, "image_size": 96},
        "teacher": {"arch": "resnet18", "input_size": 32, "epochs": 1, "batch_size": 32},
        "backbone_pretrain": {"input_size": 32, "epochs": 1, "batch_size": 32},
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "max_steps": 1,
            "eval_every": 100,
            "accelerator": "cpu",
            "student": {"image_size": 96},
            "optim": {"warmup_steps": 1},
            "distill": {"sample_size": 32, "max_positives": 16},
        },
        "detectors": ["ssdlite320_mobilenet_v3"],
        "seeds": [0],
        "jobs": 2,  # the teacher in its own process beside the backbone pre-training, then two runs at a time
        "det_teacher": ["max_steps=2", "seed=7"],
        "rows": {
            "baseline": ["distill.kd=[]"],
            "all": ["distill.kd=[cls,kd_loc]"],  # the full method
            "all+det_pkd": ["distill.kd=[cls,kd_loc,det:pkd]"],
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    report = run_study(path)
    out = tmp_path / "study"
    text = report.read_text()
    assert "`baseline`" in text and "`all`" in text and "![ap_vs_iou](ap_vs_iou.png)" in text
    for name in (
        "report.csv",
        "ap_vs_iou.png",
        "loss_curves.png",
        "predictions.png",
        "teacher/teacher.json",
        "teacher.log",  # the background teacher's output
        "backbone/ssdlite320_mobilenet_v3.safetensors",
    ):
        assert (out / name).is_file(), name
    runs = {row: out / "ssdlite320_mobilenet_v3" / row / "seed0" for row in ("baseline", "all", "all+det_pkd")}
    saved = yaml.safe_load((runs["all"] / "config.yaml").read_text())
    assert saved["distill"]["kd"] == ["cls", "kd_loc"]  # the row's override reached its run
    assert saved["student"]["backbone_weights"].endswith("ssdlite320_mobilenet_v3.safetensors")
    assert saved["distill"]["det_teacher"] is None  # only det:* rows get the detector teacher
    assert json.loads((runs["baseline"] / "results.json").read_text().replace("NaN", "null"))["steps"] == 1
    # the detector teacher: trained once, without KD, from the same backbone, with its own overrides
    det_teacher = out / "ssdlite320_mobilenet_v3" / "det_teacher"
    teacher_config = yaml.safe_load((det_teacher / "config.yaml").read_text())
    assert teacher_config["distill"]["kd"] == [] and (teacher_config["max_steps"], teacher_config["seed"]) == (2, 7)
    assert teacher_config["student"]["backbone_weights"] == saved["student"]["backbone_weights"]
    det_row = yaml.safe_load((runs["all+det_pkd"] / "config.yaml").read_text())
    assert det_row["distill"]["det_teacher"] == str(det_teacher)
    columns = (runs["all+det_pkd"] / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"det_pkd", "w_det_pkd", "kd_cls", "kd_loc"} <= set(columns)
    teacher_results = json.loads((det_teacher / "results.json").read_text().replace("NaN", "null"))
    assert teacher_results["steps"] == 2 and "`all+det_pkd`" in text
    assert "Detector teacher of the det:* rows (ssdlite320_mobilenet_v3" in text and str(det_teacher) in text
    runs["det_teacher"] = det_teacher

    stamps = {row: (run / "results.json").stat().st_mtime_ns for row, run in runs.items()}
    run_study(path)  # finished runs are skipped
    assert {row: (run / "results.json").stat().st_mtime_ns for row, run in runs.items()} == stamps


def test_study_without_rows_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nrows: {}\n")
    with pytest.raises(ValueError, match="study.rows is empty"):
        run_study(path)


def test_det2det_study_shares_the_full_studys_recipe_and_trains_its_teacher_longer():
    study = load_config(StudyConfig, shipped_config("study_det2det.yaml"))
    demo = load_config(StudyConfig, shipped_config("study_full.yaml"))  # the demo's grid over 3 seeds
    check_study(study, Path("runs"))
    assert (study.demo_data, study.teacher, study.backbone_pretrain, study.train) == (
        demo.demo_data,
        demo.teacher,
        demo.backbone_pretrain,
        demo.train,
    )
    assert study.seeds == [0, 1, 2] and study.detectors == ["ssdlite320_mobilenet_v3"]
    kd = {row: row_config(study, row, "ssdlite320_mobilenet_v3", Path("runs"), 0).distill.kd for row in study.rows}
    assert kd == {
        "baseline": [],
        "det_pkd": ["det:pkd"],
        "kd_cls+kd_loc": ["cls", "kd_loc"],
        "kd_cls+kd_loc+det_pkd": ["cls", "kd_loc", "det:pkd"],
        "det_logit": ["det:logit"],
        "kd_cls+kd_loc+det_logit": ["cls", "kd_loc", "det:logit"],
    }
    teacher = det_teacher_config(study, "ssdlite320_mobilenet_v3", Path("runs"))
    assert (teacher.epochs, teacher.seed, teacher.distill.kd) == (2 * study.train.epochs, 100, [])
    assert teacher.out == str(Path("runs") / "ssdlite320_mobilenet_v3" / "det_teacher")
    assert teacher.student == study.train.student and teacher.optim == study.train.optim


def test_det_rows_need_a_detector_teacher(tmp_path):
    rows = {"baseline": ["distill.kd=[]"], "pkd": ["distill.kd=[det:pkd]"]}
    study = StudyConfig(rows=rows)
    with pytest.raises(ConfigError, match="row 'pkd' uses det:pkd but the study has no det_teacher block"):
        check_study(study, tmp_path)
    check_study(StudyConfig(rows={**rows, "pkd": ["distill.kd=[det:pkd]", "distill.det_teacher=runs/x"]}), tmp_path)
    with pytest.raises(ConfigError, match="unknown key epochz"):
        check_study(StudyConfig(rows=rows, det_teacher=["epochz=3"]), tmp_path)
    with pytest.raises(ConfigError, match="'det_teacher' names the detector teacher's run folder"):
        StudyConfig(rows={"det_teacher": []})


def test_det_teacher_drops_kd_cls_on_negatives_with_the_kd_terms():
    """A study whose train block distills KD_cls on negatives still trains its detector teacher without any KD."""
    study = from_dict(
        StudyConfig,
        {
            "train": {"distill": {"kd": ["cls"], "kd_cls_negatives": 8}},
            "det_teacher": ["epochs=2"],
            "rows": {"pkd": ["distill.kd=[cls,det:pkd]"]},
        },
    )
    teacher = det_teacher_config(study, "ssdlite320_mobilenet_v3", Path("runs"))
    assert (teacher.distill.kd, teacher.distill.kd_cls_negatives, teacher.epochs) == ([], 0, 2)
    assert row_config(study, "pkd", "ssdlite320_mobilenet_v3", Path("runs"), 0).distill.kd_cls_negatives == 8


def test_a_failed_run_keeps_its_whole_log_and_names_it(tmp_path):
    """A study run that fails leaves its full output beside the run folder, and the error points at it."""
    from cls2det.config import TrainConfig
    from cls2det.engine.run_dir import TrainingError
    from cls2det.study.runner import train_row

    run = tmp_path / "ssdlite" / "baseline" / "seed0"
    config = TrainConfig(data=str(tmp_path / "no_such_data"), out=str(run), accelerator="cpu")
    with pytest.raises(TrainingError, match=r"seed0 failed \(exit 2\): error: .*no_such_data.*full log: .*seed0.log"):
        train_row(config, "baseline")
    log = run.with_name("seed0.log").read_text()
    assert "error:" in log and "no_such_data" in log


def test_detector_overrides_apply_to_their_detector_before_the_rows(tmp_path):
    retina = "retinanet_mobilenet_v3"
    values = {
        "train": {"epochs": 3},
        "detectors": ["ssdlite320_mobilenet_v3", retina],
        "detector_overrides": {retina: ["student.anchor_sizes=[12,24,48,96,192]", "epochs=5"]},
        "det_teacher": ["seed=3"],
        "rows": {"baseline": ["distill.kd=[]"], "long": ["epochs=7"], "pkd": ["distill.kd=[det:pkd]"]},
    }
    study = from_dict(StudyConfig, values)
    check_study(study, tmp_path)
    mine = row_config(study, "baseline", retina, tmp_path, 0)
    assert (mine.student.detector, mine.student.anchor_sizes, mine.epochs) == (retina, [12, 24, 48, 96, 192], 5)
    other = row_config(study, "baseline", "ssdlite320_mobilenet_v3", tmp_path, 0)
    assert (other.student.anchor_sizes, other.epochs) == (None, 3)  # another detector's overrides do not leak
    assert row_config(study, "long", retina, tmp_path, 0).epochs == 7  # the row's override comes last
    teacher = det_teacher_config(study, retina, tmp_path)  # the detector teacher has the detector's settings too
    assert (teacher.student.anchor_sizes, teacher.epochs, teacher.seed) == ([12, 24, 48, 96, 192], 5, 3)

    typo = from_dict(StudyConfig, {**values, "detector_overrides": {"retinanet_mobilenet_v4": ["epochs=2"]}})
    with pytest.raises(ConfigError, match=r"study.detector_overrides: 'retinanet_mobilenet_v4' is not a detector"):
        check_study(typo, tmp_path)
    # a detector the study does not run may keep its entry: detectors=[...] runs a subset of a grid
    subset = from_dict(StudyConfig, {**values, "detector_overrides": {"fcos_resnet50": ["epochs=2"]}})
    check_study(subset, tmp_path)
    bad = from_dict(StudyConfig, {**values, "detector_overrides": {retina: ["student.anchor_sizez=[8]"]}})
    with pytest.raises(ConfigError, match="unknown key student.anchor_sizez"):
        check_study(bad, tmp_path)  # every detector's runs are checked, not only the first detector's


def test_families_study_runs_three_families_on_the_full_studys_recipe():
    study = load_config(StudyConfig, shipped_config("study_families.yaml"))
    full = load_config(StudyConfig, shipped_config("study_full.yaml"))
    check_study(study, Path("runs"))
    families = ["ssdlite320_mobilenet_v3", "fasterrcnn_mobilenet_v3", "retinanet_mobilenet_v3"]
    assert study.detectors == families and study.seeds == [0, 1, 2]
    assert (study.demo_data, study.teacher, study.backbone_pretrain) == (
        full.demo_data,
        full.teacher,
        full.backbone_pretrain,
    )
    assert study.teacher.loss == "ce+bce"  # RetinaNet is a sigmoid student
    assert study.train == full.train  # the demo's recipe
    assert study.train.optim == full.train.optim and study.train.distill == full.train.distill
    rows = {"baseline": [], "kd_cls": ["cls"], "kd_loc": ["kd_loc"], "kd_cls+kd_loc": ["cls", "kd_loc"]}
    kd = {row: row_config(study, row, families[0], Path("runs"), 0).distill.kd for row in study.rows_of(families[0])}
    assert kd == rows and study.rows_of(families[0]) == list(rows)
    weighted = {"kd_loc@0.06": ["kd_loc"], "kd_cls+kd_loc@0.06": ["cls", "kd_loc"]}  # Faster R-CNN's weight check
    assert study.rows_of(families[1]) == list(rows) + list(weighted)
    for row, terms in weighted.items():
        config = row_config(study, row, families[1], Path("runs"), 0)
        assert (config.distill.kd, config.distill.lambda_kd_loc) == (terms, 0.06)
    assert study.rows_of(families[2]) == ["baseline", "kd_cls", *weighted]  # RetinaNet: the weight of the rule
    assert all(study.seeds_of(family) == [0, 1, 2] for family in families)
    assert study.comparisons == [["kd_cls+kd_loc", "kd_cls"], ["kd_cls+kd_loc@0.06", "kd_cls"]]
    students = {d: row_config(study, "baseline", d, Path("runs"), 0).student for d in families}
    assert students["ssdlite320_mobilenet_v3"] == full.train.student  # study_full's measured SSDlite recipe
    assert students["retinanet_mobilenet_v3"].anchor_sizes == [24, 48, 96, 192, 384]
    assert students["retinanet_mobilenet_v3"].options == {"head": "v2"}  # GroupNorm head: trains in the budget
    assert row_config(study, "baseline", families[2], Path("runs"), 0).optim.lr == 0.001
    frcnn = students["fasterrcnn_mobilenet_v3"]
    assert frcnn.anchor_sizes == [24, 32, 48, 64, 96, 128, 192, 256] and frcnn.options["returned_stages"] == [2, 3, 5]
    assert [row_config(study, "baseline", d, Path("runs"), 0).epochs for d in families] == [6, 6, 6]
    assert all(s.image_size == 256 for s in students.values())
    # one family of the grid: the others' overrides stay in the config, unused
    ssd = load_config(StudyConfig, shipped_config("study_families.yaml"), ["detectors=[ssdlite320_mobilenet_v3]"])
    check_study(ssd, Path("runs"))
    assert ssd.rows_of("ssdlite320_mobilenet_v3") == list(rows)


def test_comparisons_must_name_two_rows():
    values = {"rows": {"baseline": [], "kd_cls": ["distill.kd=[cls]"]}}
    assert from_dict(StudyConfig, {**values, "comparisons": [["kd_cls", "baseline"]]}).comparisons == [
        ["kd_cls", "baseline"]
    ]
    with pytest.raises(ConfigError, match=r"study.comparisons: \['kd_cls', 'kd_loc'\] must be \[row, reference\]"):
        from_dict(StudyConfig, {**values, "comparisons": [["kd_cls", "kd_loc"]]})
    with pytest.raises(ConfigError, match="must be \\[row, reference\\]"):
        from_dict(StudyConfig, {**values, "comparisons": [["kd_cls"]]})


def test_detector_rows_pick_a_subset_per_detector():
    values = {
        "detectors": ["ssdlite320_mobilenet_v3", "retinanet_mobilenet_v3"],
        "rows": {"baseline": [], "kd_cls": ["distill.kd=[cls]"], "kd_loc": ["distill.kd=[kd_loc]"]},
    }
    study = from_dict(StudyConfig, {**values, "detector_rows": {"retinanet_mobilenet_v3": ["kd_cls", "baseline"]}})
    assert study.rows_of("retinanet_mobilenet_v3") == ["baseline", "kd_cls"]  # in rows' order
    assert study.rows_of("ssdlite320_mobilenet_v3") == ["baseline", "kd_cls", "kd_loc"]
    with pytest.raises(ConfigError, match=r"study.detector_rows: 'fcos_resnet5' is not a detector"):
        check_study(from_dict(StudyConfig, {**values, "detector_rows": {"fcos_resnet5": ["baseline"]}}), Path("x"))
    with pytest.raises(ConfigError, match=r"study.detector_rows.retinanet_mobilenet_v3: 'kd' is not one of the rows"):
        from_dict(StudyConfig, {**values, "detector_rows": {"retinanet_mobilenet_v3": ["baseline", "kd"]}})


class FinishedTeacher:
    """Stands in for the study's teacher job: a finished teacher run."""

    def __init__(self, study, data, out, *, background):
        self.run, self.process = out / "teacher", None

    def result(self):
        return self.run, 90.0


def test_detector_seeds_replace_the_seeds_per_detector(tmp_path, monkeypatch):
    import cls2det.study.runner as runner

    values = {
        "out": str(tmp_path / "study"),
        "data": str(tmp_path / "data"),
        "detectors": ["ssdlite320_mobilenet_v3", "retinanet_mobilenet_v3"],
        "seeds": [0, 1],
        "detector_seeds": {"ssdlite320_mobilenet_v3": [0, 1, 2, 3]},
        "rows": {"baseline": [], "kd_cls": ["distill.kd=[cls]"]},
    }
    study = from_dict(StudyConfig, values)
    assert study.seeds_of("ssdlite320_mobilenet_v3") == [0, 1, 2, 3] and study.seeds_of("fcos_resnet50") == [0, 1]
    trained = []
    monkeypatch.setattr(runner, "_TeacherJob", FinishedTeacher)
    monkeypatch.setattr(runner, "_backbone", lambda *args: None)
    monkeypatch.setattr(runner, "_det_teacher", lambda *args: None)
    monkeypatch.setattr(runner, "train_row", lambda config, row: trained.append((config.student.detector, config.seed)))
    monkeypatch.setattr(runner, "_report", lambda *args: tmp_path / "report.md")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(values))
    run_study(path)
    ssd = [seed for detector, seed in trained if detector == "ssdlite320_mobilenet_v3"]
    retina = [seed for detector, seed in trained if detector == "retinanet_mobilenet_v3"]
    assert ssd == [0, 0, 1, 1, 2, 2, 3, 3] and retina == [0, 0, 1, 1]  # 2 rows per seed
    with pytest.raises(ConfigError, match=r"study.detector_seeds.ssdlite320_mobilenet_v3 must be a non-empty list"):
        from_dict(StudyConfig, {**values, "detector_seeds": {"ssdlite320_mobilenet_v3": [1, 1]}})
    typo = from_dict(StudyConfig, {**values, "detector_seeds": {"ssdlite_v3": [0]}})
    with pytest.raises(ConfigError, match=r"study.detector_seeds: 'ssdlite_v3' is not a detector"):
        check_study(typo, tmp_path)


def test_a_finished_run_is_reused_only_with_its_own_recipe(tmp_path):
    from cls2det.config import TrainConfig, save_config
    from cls2det.run_folder import RunDirError
    from cls2det.study.runner import train_row

    run = tmp_path / "ssdlite320_mobilenet_v3" / "baseline" / "seed0"
    run.mkdir(parents=True)
    config = from_dict(TrainConfig, {"out": str(run), "data": str(tmp_path / "data"), "optim": {"lr": 0.003}})
    save_config(config, run / "config.yaml")
    (run / "results.json").write_text(json.dumps({"metrics": {"mAP": 0.25}}))
    # keys that do not change what a run learns may differ (and the folder may be spelled another way)
    same = from_dict(TrainConfig, {**yaml.safe_load((run / "config.yaml").read_text()), "workers": 3, "eval_every": 7})
    same.out = str(tmp_path / "." / run.relative_to(tmp_path))
    result = train_row(same, "baseline")  # no training: the finished run's results
    assert result["metrics"] == {"mAP": 0.25} and (result["row"], result["seed"]) == ("baseline", 0)
    for key, value in (("optim.lr", 0.001), ("epochs", 13), ("student.options", {"head": "v2"})):
        other = copy.deepcopy(same)
        section, _, name = key.rpartition(".")
        setattr(getattr(other, section) if section else other, name, value)
        with pytest.raises(RunDirError, match=rf"seed0 finished with {key}=.*but the study asks {key}="):
            train_row(other, "baseline")
    assert json.loads((run / "results.json").read_text()) == {"metrics": {"mAP": 0.25}}  # nothing touched


def stub_study(tmp_path, monkeypatch, rows, **values):
    """Run a study of ``rows`` on stubs (teacher, backbone, report); returns what each run was given:
    [(row, config, threads)] in the order train_row was called, and run_study's results."""
    import cls2det.study.runner as runner

    values = {"out": str(tmp_path / "study"), "data": str(tmp_path / "data"), "seeds": [0, 1], "rows": rows, **values}
    calls, teachers = [], []

    class Teacher(FinishedTeacher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            teachers.append(self)

    def train_row(config, row, threads=None):
        import time

        time.sleep(0.05 if config.seed == 0 else 0.0)  # the later runs finish first
        calls.append((row, config, threads))
        return {"row": row, "seed": config.seed}

    monkeypatch.setattr(runner, "_TeacherJob", Teacher)
    monkeypatch.setattr(runner, "_backbone", lambda *args: tmp_path / "backbone.safetensors")
    monkeypatch.setattr(runner, "_det_teacher", lambda *args: None)
    monkeypatch.setattr(runner, "train_row", train_row)
    reported = []
    monkeypatch.setattr(runner, "_report", lambda study, results, *args: reported.append(results) or tmp_path / "r.md")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(values))
    run_study(path)
    return calls, reported[0], teachers


def test_jobs_train_runs_side_by_side_on_a_share_of_the_cores_and_report_in_grid_order(tmp_path, monkeypatch):
    import cls2det.study.runner as runner

    monkeypatch.setattr(runner, "usable_cores", lambda: 4)
    rows = {"baseline": ["distill.kd=[]"], "kd_cls": ["distill.kd=[cls]"]}
    calls, results, _ = stub_study(tmp_path, monkeypatch, rows, jobs=2)
    assert {threads for _, _, threads in calls} == {2}  # 4 cores / 2 jobs
    assert [(r["row"], r["seed"]) for r in results] == [("baseline", 0), ("kd_cls", 0), ("baseline", 1), ("kd_cls", 1)]
    calls, results, _ = stub_study(tmp_path, monkeypatch, rows)  # jobs: 1, one after the other, threads untouched
    assert [threads for _, _, threads in calls] == [None] * 4 and [r["seed"] for r in results] == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="study.jobs must be >= 1, got 0"):
        from_dict(StudyConfig, {"rows": rows, "jobs": 0})


def test_a_grid_of_plain_rows_trains_no_teacher_and_a_row_may_choose_its_own_backbone(tmp_path, monkeypatch):
    rows = {"baseline": ["distill.kd=[]"], "scratch": ["distill.kd=[]", "student.backbone_weights=null"]}
    calls, _, teachers = stub_study(tmp_path, monkeypatch, rows, seeds=[0])
    assert teachers == []  # no row needs the classifier teacher
    weights = {row: config.student.backbone_weights for row, config, _ in calls}
    assert weights == {"baseline": str(tmp_path / "backbone.safetensors"), "scratch": None}
    assert all(config.teacher is None for _, config, _ in calls)
    _, _, teachers = stub_study(tmp_path, monkeypatch, {**rows, "kd_loc": ["distill.kd=[kd_loc]"]}, seeds=[0])
    assert len(teachers) == 1


def test_a_typo_in_a_row_names_the_row_and_writes_nothing(tmp_path):
    path = tmp_path / "s.yaml"
    out = tmp_path / "out"
    path.write_text(f"out: {out}\nrows: {{baseline: [], kd_cls: ['distill.kd=[cls]', distill.temprature=4]}}\n")
    with pytest.raises(ConfigError) as caught:
        run_study(path)
    assert str(caught.value).startswith("study row 'kd_cls' (fasterrcnn_mobilenet_v3): unknown key distill.temprature")
    assert not out.exists()  # no out/study.yaml left behind


def test_a_demo_data_folder_made_with_other_settings_is_refused(tmp_path):
    from cls2det.study.runner import _demo_data

    study = from_dict(StudyConfig, {"rows": {"baseline": []}, "demo_data": {"train_images": 2, "val_images": 1}})
    data = _demo_data(study, tmp_path)
    assert json.loads((data / "demo_data.json").read_text())["train_images"] == 2
    assert _demo_data(study, tmp_path) == data  # the same settings: reused
    other = from_dict(StudyConfig, {"rows": {"baseline": []}, "demo_data": {"train_images": 3, "val_images": 1}})
    with pytest.raises(ConfigError, match=r"generated with demo_data=\{.*'train_images': 2.*but the study asks"):
        _demo_data(other, tmp_path)
