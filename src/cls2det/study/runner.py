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
from contextlib import contextmanager
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
    usable_cores,
)
from cls2det.engine.loading import needs_teacher
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
from cls2det.files import write_json
from cls2det.run_folder import ANY, VAL_CSV, config_differences

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
    # no teacher for a grid of plain rows (loc and det:* need none either)
    wanted = any(needs_teacher(row_config(study, row, d, out, 0)) for d in study.detectors for row in study.rows_of(d))
    # with jobs > 1 the teacher trains in a process of its own while the backbones pre-train here, each on its share
    # of the cores (OpenMP threads that share a core with another busy process wait on each other)
    teacher = _TeacherJob(study, data, out, background=study.jobs > 1) if wanted else None
    with _intra_op_threads(max(1, usable_cores() // study.jobs) if study.jobs > 1 else None):
        backbones = {detector: _backbone(study, data, out, detector) for detector in study.detectors}
    teacher_run, teacher_top1 = teacher.result() if teacher is not None else (None, None)
    runs, notes = [], list(study.notes)
    for detector in study.detectors:
        backbone = backbones[detector]
        det_teacher = _det_teacher(study, data, out, detector, backbone)
        if det_teacher is not None:
            notes.append(_det_teacher_note(det_teacher))
        for seed in study.seeds_of(detector):
            for row in study.rows_of(detector):
                config = row_config(study, row, detector, out, seed)
                config.data, config.teacher = str(data), str(teacher_run) if teacher_run else None
                if backbone is not None and not sets_backbone(study.rows[row]):
                    config.student.backbone_weights = str(backbone)
                if det_teacher is not None and needs_study_det_teacher(config):
                    config.distill.det_teacher = det_teacher["run"]
                runs.append((config, row))
    results = train_rows(runs, jobs=study.jobs)
    return _report(study, results, teacher_top1, out, data, notes)


def train_rows(runs: Sequence[tuple[TrainConfig, str]], *, jobs: int = 1) -> list[dict]:
    """:func:`train_row` of every ``(config, row)``, ``jobs`` at a time (each a process with its share of this
    process's CPU cores as intra-op threads); the results in ``runs``' order. The first failure stops the runs not
    yet started and is raised once the running ones end."""
    if jobs <= 1:
        return [train_row(config, row) for config, row in runs]
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, usable_cores() // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train_row, config, row, threads=threads) for config, row in runs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


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


def sets_backbone(overrides: Sequence[str]) -> bool:
    """Whether a row's overrides choose its own backbone weights (e.g. ``student.backbone_weights=null``: from scratch,
    an ablation of the study's backbone pre-training)."""
    return any(item.split("=", 1)[0].strip() == "student.backbone_weights" for item in overrides)


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

    data, settings = out / "data", to_dict(study.demo_data)
    recipe = data / "demo_data.json"  # what the folder was generated with: a changed demo_data is never mixed in
    if (data / "annotations" / "val.json").is_file():
        made = json.loads(recipe.read_text()) if recipe.is_file() else None
        if made != settings:
            raise ConfigError(
                f"{data} was generated with demo_data={made}, but the study asks {settings}: give the study another "
                "out (or remove that folder) to generate it anew"
            )
        return data
    _say(f"generating the demo dataset in {data}")
    generate_demo(data, **settings)
    write_json(recipe, settings)
    return data


class _TeacherJob:
    """The study's teacher: ``study.teacher_run`` as given, or trained into ``out/teacher`` (resumed if a study stopped
    mid-teacher), in this process or, with ``background``, in a ``cls2det teacher`` process of one thread started
    here (its output in ``out/teacher.log``); :meth:`result` waits for it."""

    def __init__(self, study: StudyConfig, data: Path, out: Path, *, background: bool) -> None:
        from cls2det.teacher import train_teacher

        self.run = Path(study.teacher_run) if study.teacher_run else out / "teacher"
        self.process: subprocess.Popen | None = None
        if (self.run / "teacher.json").is_file():
            return
        if study.teacher_run:
            raise ConfigError(f"teacher_run {self.run}: teacher.json not found")
        _say(f"training the teacher ({study.teacher.arch}) in {self.run}")
        resume = (self.run / "last").is_dir()  # a study stopped mid-teacher
        if not background:
            train_teacher(data, self.run, study.teacher, resume=resume)
            return
        recipe, self.log = out / "teacher.yaml", out / "teacher.log"
        save_config(study.teacher, recipe)
        cmd = [sys.executable, "-m", "cls2det", "teacher", str(data), "--out", str(self.run), "--config", str(recipe)]
        cmd += ["--resume" if resume else "--overwrite", "--no-progress"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log, "a") as stream:
            self.process = subprocess.Popen(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT)

    def result(self) -> tuple[Path, float | None]:
        """(the teacher's run folder, its val top-1), once it has finished."""
        if self.process is not None:
            code = self.process.wait()
            if code != 0:
                tail = self.log.read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise TrainingError(f"teacher {self.run} failed (exit {code}): {tail[0]} (full log: {self.log})")
        top1 = json.loads((self.run / "teacher.json").read_text()).get("metrics", {}).get("top1")
        return self.run, top1


@contextmanager
def _intra_op_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` inside the block (None: unchanged)."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def train_row(config: TrainConfig, row: str, *, threads: int | None = None) -> dict:
    """Train one run of the grid into ``config.out`` (a subprocess: ``cls2det train``, with ``threads`` intra-op
    threads when given), or reuse it if it finished with this very recipe; a finished run of another recipe is
    refused (:func:`check_finished_run`)."""
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
            if threads is not None:
                env["OMP_NUM_THREADS"] = str(threads)
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
    from cls2det.evaluation.plots import plot_ap_vs_iou, plot_error_breakdown, plot_loss_curves, plot_val_curves
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
    val_curves: dict[str, list[Path]] = {}
    for r in results:  # runs that evaluated on val more than once: their curves (where the schedule flattens)
        val = Path(r["run"]) / VAL_CSV
        if val.is_file() and len(val.read_text().splitlines()) > 2:
            val_curves.setdefault(f"{r['detector']} / {r['row']}", []).append(val)
    if val_curves:
        plots.append(plot_val_curves(val_curves, out / "val_curves.png"))
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
