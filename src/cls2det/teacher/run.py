"""The teacher's run folder (``cls2det teacher --out RUN``): the same rules as a student run's (see
:mod:`cls2det.run_folder`), checkpoints every epoch and at Ctrl-C / SIGTERM, ``--resume``, metrics.csv + TensorBoard.

``RUN/`` holds ``run.json`` (kind "teacher"), ``config.yaml`` (the TeacherConfig), ``last/`` (weights + optimizer,
LR schedule, counters, history; written at every epoch's end and at an interruption), ``best/`` (the best epoch's
weights), ``metrics.csv`` and ``tb/`` (loss and LR per step, val top-1 per epoch), ``history.jsonl``, and once the run
has finished the teacher itself: ``teacher.safetensors`` + ``teacher.json`` (:func:`cls2det.teacher.io.save_teacher`).
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cls2det.config import TeacherConfig, load_config, save_config, to_dict
from cls2det.files import MetricsLogger, load_model_state, load_state, save_checkpoint, truncate_metrics
from cls2det.lr import continue_schedule
from cls2det.run_folder import (
    ANY,
    BEST,
    CONFIG,
    LAST,
    METRICS_CSV,
    TEACHER_META,
    TENSORBOARD,
    UP,
    RunStart,
    TrainingInterrupted,
    prepare_run_dir,
    resume_changes,
)

# What --resume may change in a teacher run's recipe: more epochs (the LR schedule is laid over the new length from
# the current step on) and the data-loading processes (same batches). Everything else, the data included, is the
# recipe and must stay as it was.
RESUME_SAFE = {"epochs": UP, "workers": ANY}
COLUMNS = ["step", "epoch", "lr", "loss", "top1"]  # metrics.csv: a row per step, and one with top1 per epoch


@dataclass
class LoopState:
    """Where the teacher's training loop is: everything besides the weights, optimizer and schedule it needs to go
    on exactly as an uninterrupted run would."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch under way (1-based)
    batch_in_epoch: int = 0  # batches of ``epoch`` done
    loss_sum: float = 0.0  # of ``epoch`` so far, for its mean train loss
    seen: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class TeacherRun:
    """A teacher run folder being trained: checkpoints, metrics, signals. :meth:`open` checks and creates it."""

    def __init__(self, out: Path, config: TeacherConfig, start: RunStart) -> None:
        self.out, self.config, self.start = out, config, start
        self.stop_signal: int | None = None
        self.logger: MetricsLogger | None = None

    @classmethod
    def open(cls, out: str | Path, config: TeacherConfig, data: str | Path, *, resume: bool, overwrite: bool):
        """Refuse a folder that holds a student run, or another teacher run unless ``resume`` / ``overwrite``; on
        ``resume`` refuse a recipe (``config`` and ``data``) that differs from the run's but for RESUME_SAFE."""
        out = Path(out)
        start = prepare_run_dir(out, resume=resume, overwrite=overwrite, kind="teacher")
        if resume:
            saved = to_dict(load_config(TeacherConfig, out / CONFIG))
            saved["data"] = _run_json(out).get("data")
            new = {**to_dict(config), "data": str(data)}
            start.changes = resume_changes(out, saved, new, RESUME_SAFE, paths=("data", "pretrained"))
        return cls(out, config, start)

    # ----------------------------------------------------------------------------------------------- lifecycle

    def started(self, data: str | Path) -> None:
        """The inputs are valid: write config.yaml (again, when a resume changed a key) and run.json."""
        step = 0
        if self.start.resume:
            step = load_state(self.out / LAST)["step"]
            truncate_metrics(self.out / METRICS_CSV, step)  # rows logged after the checkpoint are done again
        if not self.start.resume or self.start.changes:
            save_config(self.config, self.out / CONFIG)
        self.start.started(step=step, data=str(data))
        self.logger = MetricsLogger(self.out / METRICS_CSV, self.out / TENSORBOARD, columns=COLUMNS)

    def failed(self) -> None:
        self.start.failed()

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    def finished_metrics(self) -> dict[str, Any] | None:
        """On resume, the metrics of a run that has already done all ``config.epochs`` epochs (nothing to train)."""
        if not self.start.resume or not (self.out / TEACHER_META).is_file():
            return None
        state = load_state(self.out / LAST)
        if state["epoch"] <= self.config.epochs:
            return None
        return json.loads((self.out / TEACHER_META).read_text()).get("metrics")

    # ----------------------------------------------------------------------------------------------- checkpoints

    def save(self, net: torch.nn.Module, optimizer, scheduler, loop: LoopState, best_state=None) -> None:
        """``last/`` (and ``best/`` when ``best_state`` is new), atomically."""
        if best_state is not None:
            save_checkpoint(self.out / BEST, best_state, {"epoch": loop.best_epoch, "top1": loop.best_top1})
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **asdict(loop)}
        save_checkpoint(self.out / LAST, net.state_dict(), state)

    def load(self, net: torch.nn.Module, optimizer, scheduler) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
        """Restore ``last/`` into ``net``, ``optimizer``, ``scheduler``; returns the loop state and the best epoch's
        weights (None before the first evaluation)."""
        net.load_state_dict(load_model_state(self.out / LAST))
        state = load_state(self.out / LAST)
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        continue_schedule(scheduler)  # more epochs: the new schedule's LR, not the floor the old one ended at
        loop = LoopState(**state)
        best = load_model_state(self.out / BEST) if (self.out / BEST).is_dir() else None
        return loop, best

    def log(self, row: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log(row, step)

    # ----------------------------------------------------------------------------------------------- signals

    @contextmanager
    def signals(self):
        """SIGINT / SIGTERM set :attr:`stop_signal` (the loop saves at the next step boundary); a second one stops
        at once."""

        def on_signal(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_if_asked(self, net: torch.nn.Module, optimizer, scheduler, loop: LoopState, best_state=None) -> None:
        """After a step: when a signal came, save ``last/`` and raise :class:`TrainingInterrupted`."""
        if self.stop_signal is None:
            return
        self.save(net, optimizer, scheduler, loop, best_state)
        raise TrainingInterrupted(
            f"stopped by signal {self.stop_signal} at step {loop.step}; "
            f"continue with --resume (checkpoint {self.out / LAST})"
        )


def _run_json(out: Path) -> dict:
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
