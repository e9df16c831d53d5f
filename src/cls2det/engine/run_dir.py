"""The run folder: what it holds, refusing to overwrite another run by accident, and how a run ends badly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cls2det.errors import Cls2detError
from cls2det.files import write_json  # noqa: F401 - the run folder's JSON writer, re-exported

CONFIG = "config.yaml"
LAST = "last"  # checkpoint folder of the latest state (end of epoch or interruption)
BEST = "best"  # checkpoint folder of the best val mAP (weights only are needed from it)
RESULTS = "results.json"
METRICS_CSV = "metrics.csv"
SOFT_LABELS = "soft_labels.safetensors"  # the teacher's logits per GT box (distill.soft_label_cache)
GT_FEATURES = "gt_features.safetensors"  # KD_loc's pooled teacher taps per GT box (distill.gt_feature_cache)
CLASSES = "classes.json"  # class names and COCO category ids, so a run is usable without its dataset


class RunDirError(Cls2detError, ValueError):
    """An output folder that cannot be used as asked."""


class TrainingError(Cls2detError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM: the run saved its state and stopped; ``--resume`` continues it."""


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Create ``out``; refuse one that holds another run unless ``resume`` or ``overwrite``.

    With ``overwrite`` the old run is moved aside, not deleted, and its new path returned: the caller deletes it
    once the new run has started (:func:`discard_replaced`) or puts it back if the start fails (:func:`restore`).
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    holds_run = out.is_dir() and any((out / name).exists() for name in (CONFIG, LAST, RESULTS))
    if resume:
        if not (out / LAST).is_dir():
            raise RunDirError(f"nothing to resume in {out}: no '{LAST}' checkpoint")
        return None
    replaced = None
    if holds_run:
        if not overwrite:
            raise RunDirError(f"{out} holds another run; pass --resume to continue it or --overwrite to replace it")
        replaced = out.with_name(out.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
    out.mkdir(parents=True, exist_ok=True)
    return replaced


def restore(out: Path, replaced: Path | None) -> None:
    """Put back the run that ``prepare_run_dir(overwrite=True)`` moved aside (the new one failed to start)."""
    if replaced is not None and replaced.is_dir():
        shutil.rmtree(out, ignore_errors=True)
        os.replace(replaced, out)


def discard_replaced(replaced: Path | None) -> None:
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
