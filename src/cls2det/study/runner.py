"""Run a study: detectors x rows x seeds of student trainings on one dataset and teacher, then its report.

Each run is a ``cls2det train`` subprocess (clean peak-memory figures, a crash ends one run only) in
``out/<detector>/<row>/seed<k>``; a run with ``results.json`` is skipped, one with a checkpoint is resumed.
Rows with det2det terms (``distill.kd`` with ``det:*``) get a detector teacher trained once per detector
(``study.det_teacher``) in ``out/<detector>/det_teacher``, skipped the same way.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cls2det.config import (
    ConfigError,
    StudyConfig,
    TrainConfig,
    apply_overrides,
    det_methods,
    from_dict,
    load_config,
    save_config,
    shipped_config,
    to_dict,
)
from cls2det.engine.run_dir import (
    CONFIG,
    LAST,
    METRICS_CSV,
    RESULTS,
    RESUME_PATHS,
    RESUME_SAFE,
    RunDirError,
    TrainingError,
)
from cls2det.run_folder import ANY, config_differences

DEMO_CONFIG = "demo.yaml"
DET_TEACHER = "det_teacher"  # out/<detector>/det_teacher: the det2det rows' detector teacher


def run_demo(out: str | Path, overrides: Sequence[str] = ()) -> Path:
    """``cls2det demo``: the packaged demo study, written to ``out``."""
    return run_study(shipped_config(DEMO_CONFIG), [f"out={out}", *overrides])


def run_study(path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Run study ``path`` (a :class:`StudyConfig` YAML) with overrides; returns the report's path."""
    study = load_config(StudyConfig, path, overrides)
    out = Path(study.out)
    check_study(study, out)  # every row, before spending compute or writing anything
    out.mkdir(parents=True, exist_ok=True)
    save_config(study, out / "study.yaml")

    data = Path(study.data) if study.data else _demo_data(study, out)
    teacher_run, teacher_top1 = _teacher(study, data, out)
    results, notes = [], list(study.notes)
    for detector in study.detectors:
        backbone = _backbone(study, data, out, detector)
        det_teacher = _det_teacher(study, data, out, detector, backbone)
        if det_teacher is not None:
            notes.append(_det_teacher_note(det_teacher))
        for seed in study.seeds_of(detector):
            for row in study.rows_of(detector):
                config = row_config(study, row, detector, out, seed)
                config.data, config.teacher = str(data), str(teacher_run)
                if backbone is not None:
                    config.student.backbone_weights = str(backbone)
                if det_teacher is not None and needs_study_det_teacher(config):
                    config.distill.det_teacher = det_teacher["run"]
                results.append(train_row(config, row))
    return _report(study, results, teacher_top1, out, data, notes)


def check_study(study: StudyConfig, out: Path) -> None:
    """Raise :class:`ConfigError` unless every row (and the detector teacher's run) makes a valid TrainConfig and
    every det2det row has a detector teacher (``study.det_teacher`` or its own ``distill.det_teacher``), and the
    detectors named by ``detector_overrides`` / ``detector_rows`` / ``detector_seeds`` exist."""
    from cls2det.students.registry import list_students

    for field_name in ("detector_overrides", "detector_rows", "detector_seeds"):
        unknown = sorted(set(getattr(study, field_name)) - set(list_students()))
        if unknown:
            raise ConfigError(
                f"study.{field_name}: {unknown[0]!r} is not a detector (valid: {', '.join(list_students())})"
            )
    for detector in study.detectors:
        for row in study.rows:
            config = row_config(study, row, detector, out, 0)
            if needs_study_det_teacher(config) and study.det_teacher is None:
                raise ConfigError(
                    f"row {row!r} uses {','.join(config.distill.kd)} but the study has no det_teacher "
                    "block and the row sets no distill.det_teacher"
                )
        if study.det_teacher is not None:
            det_teacher_config(study, detector, out)


def needs_study_det_teacher(config: TrainConfig) -> bool:
    """Whether a row's run needs the study's detector teacher: det:* terms and no distill.det_teacher of its own."""
    return bool(det_methods(config.distill.kd)) and not config.distill.det_teacher


def uses_det_teacher(study: StudyConfig) -> bool:
    """Whether the study trains a detector teacher: it has a det_teacher block and a row needs it."""
    rows = [row_config(study, row, study.detectors[0], Path("."), 0) for row in study.rows]
    return study.det_teacher is not None and any(needs_study_det_teacher(config) for config in rows)


def det_teacher_config(study: StudyConfig, detector: str, out: Path) -> TrainConfig:
    """The detector teacher's run: the study's ``train`` section, then ``study.det_teacher``'s overrides, without
    KD terms, the row's detector (so the same family, input size and anchors), in ``out/<detector>/det_teacher``."""
    values = detector_train_values(study, detector)
    values = apply_overrides(values, study.det_teacher or [])
    values["student"]["detector"] = detector
    values["distill"]["kd"], values["distill"]["kd_cls_negatives"] = [], 0
    values["out"] = str(out / detector / DET_TEACHER)
    return from_dict(TrainConfig, values)


def detector_train_values(study: StudyConfig, detector: str) -> dict:
    """The study's ``train`` section as a dict (a copy), with ``study.detector_overrides[detector]`` applied."""
    return apply_overrides(copy.deepcopy(to_dict(study.train)), study.detector_overrides.get(detector, []))


def row_config(study: StudyConfig, row: str, detector: str, out: Path, seed: int) -> TrainConfig:
    """The TrainConfig of one run: the study's ``train`` section, the detector's overrides, then the row's."""
    try:
        values = apply_overrides(detector_train_values(study, detector), study.rows[row])
        values["seed"] = seed
        values["student"]["detector"] = detector
        values["out"] = str(out / detector / row / f"seed{seed}")
        return from_dict(TrainConfig, values)
    except ConfigError as err:  # a typo in a row: say which row (and detector) holds it
        raise ConfigError(f"study row {row!r} ({detector}): {err}") from None


def _demo_data(study: StudyConfig, out: Path) -> Path:
    from cls2det.data import generate_demo

    data = out / "data"
    if not (data / "annotations" / "val.json").is_file():
        demo = study.demo_data
        _say(f"generating the demo dataset in {data}")
        generate_demo(
            data, seed=demo.seed, train_images=demo.train_images, val_images=demo.val_images, image_size=demo.image_size
        )
    return data


def _teacher(study: StudyConfig, data: Path, out: Path) -> tuple[Path, float | None]:
    from cls2det.teacher import train_teacher

    run = Path(study.teacher_run) if study.teacher_run else out / "teacher"
    meta = run / "teacher.json"
    if not meta.is_file():
        if study.teacher_run:
            raise ConfigError(f"teacher_run {run}: teacher.json not found")
        _say(f"training the teacher ({study.teacher.arch}) in {run}")
        train_teacher(data, run, study.teacher, resume=(run / "last").is_dir())  # a study stopped mid-teacher
    top1 = json.loads(meta.read_text()).get("metrics", {}).get("top1")
    return run, top1


def _backbone(study: StudyConfig, data: Path, out: Path, detector: str) -> Path | None:
    from cls2det.study.pretrain import pretrain_backbone

    if study.backbone_pretrain is None:
        return None
    path = out / "backbone" / f"{detector}.safetensors"
    if not path.is_file():
        _say(f"pre-training the {detector} backbone on the train crops (the ImageNet stand-in)")
        pretrain_backbone(data, detector, path, study.backbone_pretrain)
    return path


def _det_teacher(study: StudyConfig, data: Path, out: Path, detector: str, backbone: Path | None) -> dict | None:
    """Train (or find finished) ``detector``'s det2det teacher when a row needs it; its results, or None."""
    if not uses_det_teacher(study):
        return None
    config = det_teacher_config(study, detector, out)
    config.data, config.teacher = str(data), None
    if backbone is not None:
        config.student.backbone_weights = str(backbone)  # the same ImageNet stand-in as the rows
    return train_row(config, DET_TEACHER)


def _det_teacher_note(results: dict) -> str:
    metrics = results["metrics"]
    return (
        f"Detector teacher of the det:* rows ({results['detector']}, {results['epochs']} epochs, seed "
        f"{results['seed']}, no KD): mAP {metrics['mAP']:.2f}, AP50 {metrics['AP50']:.2f} ({results['run']})"
    )


def train_row(config: TrainConfig, row: str) -> dict:
    """Train one run of the grid into ``config.out`` (a subprocess: ``cls2det train``), or reuse it if it finished
    with this very recipe; a finished run of another recipe is refused (:func:`check_finished_run`)."""
    run = Path(config.out)
    if (run / RESULTS).is_file():
        check_finished_run(run, config)
    else:
        run.parent.mkdir(parents=True, exist_ok=True)
        recipe = run.with_name(f"{run.name}.yaml")  # <row>/seed<k>.yaml, <detector>/det_teacher.yaml
        save_config(config, recipe)
        flag = "--resume" if (run / LAST).is_dir() else "--overwrite"
        cmd = [
            sys.executable,
            "-m",
            "cls2det",
            "train",
            config.data,
            "--out",
            str(run),
            "--config",
            str(recipe),
            flag,
            "--no-progress",
        ]
        log = run.with_name(f"{run.name}.log")  # the run's whole output, kept (a failure's traceback included)
        _say(f"{config.student.detector} / {row} / seed {config.seed}: training (log: {log})")
        start = time.perf_counter()
        with open(log, "a") as stream:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            code = subprocess.run(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise TrainingError(f"run {run} failed (exit {code}): {tail[0]} (full log: {log})")
        _say(f"  done in {time.perf_counter() - start:.0f} s")
    results = json.loads((run / RESULTS).read_text())
    return {**results, "row": row, "seed": config.seed, "detector": config.student.detector, "run": str(run)}


def check_finished_run(run: Path, config: TrainConfig) -> None:
    """Raise :class:`RunDirError` unless the finished ``run`` was trained with ``config``'s recipe: every key of its
    ``config.yaml`` equal, except those that do not change what a run learns (``RESUME_SAFE``'s "any" keys: when it
    evaluates and saves, data workers, the folder's spelling). A study never mixes a run of another recipe into its
    report (e.g. after a changed config): the error names the first differing key."""
    saved = load_config(TrainConfig, run / CONFIG)
    ignored = {key for key, rule in RESUME_SAFE.items() if rule == ANY}
    for key, old, new in config_differences(to_dict(saved), to_dict(config), RESUME_PATHS):
        if key not in ignored:
            raise RunDirError(
                f"{run} finished with {key}={old}, but the study asks {key}={new}: move that run away (or give the "
                "study another out) to train it with this recipe"
            )


def _report(
    study: StudyConfig, results: list[dict], teacher_top1: float | None, out: Path, data: Path, notes: list[str]
) -> Path:
    from cls2det.evaluation.plots import plot_ap_vs_iou, plot_error_breakdown, plot_loss_curves
    from cls2det.evaluation.report import write_report

    plots = [plot_ap_vs_iou(results, out / "ap_vs_iou.png")]
    if any(r.get("errors") or r["metrics"].get("errors") for r in results):
        plots.append(plot_error_breakdown(results, out / "error_breakdown.png"))
    first_seed = study.seeds_of(study.detectors[0])[0]
    curves = {
        r["row"]: Path(r["run"]) / METRICS_CSV
        for r in results
        if r["seed"] == first_seed and r["detector"] == study.detectors[0]
    }
    plots.append(plot_loss_curves(curves, out / "loss_curves.png"))
    if _prediction_grid(study, results, out, data):
        plots.append(out / "predictions.png")
    return write_report(
        results,
        out,
        title=study.name,
        teacher_top1=teacher_top1,
        notes=notes,
        plots=plots,
        baseline_row=study.baseline_row,
        comparisons=study.comparisons,
    )


def _prediction_grid(study: StudyConfig, results: list[dict], out: Path, data: Path, count: int = 4) -> bool:
    """Baseline vs the last row on the same val images (first detector, first seed)."""
    from cls2det.data import CocoDetection, load_split
    from cls2det.engine.loading import load_student
    from cls2det.evaluation.evaluate import predict
    from cls2det.evaluation.plots import plot_prediction_grid

    first = study.rows_of(study.detectors[0])
    others = [row for row in first if row != study.baseline_row]
    if study.baseline_row not in first or not others:
        return False
    rows = [study.baseline_row, others[-1]]
    detector = study.detectors[0]
    seed = study.seeds_of(detector)[0]
    runs = {r["row"]: r["run"] for r in results if (r["detector"], r["seed"]) == (detector, seed) and r["row"] in rows}
    split = load_split(data, "val")
    dataset = CocoDetection(split)
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    images = [img for img, _ in samples]
    predictions = {row: predict(load_student(run)[0], images, "cpu") for row, run in runs.items()}
    plot_prediction_grid(images, predictions, [t for _, t in samples], split.class_names, out / "predictions.png")
    return True


def _say(message: str) -> None:
    print(message, flush=True)
