"""The run folder: what it holds, and refusing to overwrite another run by accident."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
LAST = "last"  # checkpoint folder of the latest state (end of epoch or interruption)
BEST = "best"  # checkpoint folder of the best val mAP (weights only are needed from it)
RESULTS = "results.json"
METRICS_CSV = "metrics.csv"
SOFT_LABELS = "soft_labels.safetensors"  # the teacher's logits per GT box (distill.soft_label_cache)
CLASSES = "classes.json"  # class names and COCO category ids, so a run is usable without its dataset


class RunDirError(ValueError):
    """An output folder that cannot be used as asked."""


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``out``; refuse one that holds another run unless ``resume`` or ``overwrite``."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    holds_run = out.is_dir() and any((out / name).exists() for name in (CONFIG, LAST, RESULTS))
    if resume:
        if not (out / LAST).is_dir():
            raise RunDirError(f"nothing to resume in {out}: no '{LAST}' checkpoint")
        return
    if holds_run:
        if not overwrite:
            raise RunDirError(f"{out} holds another run; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=float)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
