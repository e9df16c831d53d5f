"""The run folder as a contract, for student runs (``cls2det train``) and teacher runs (``cls2det teacher``) alike.

* ``RUN/run.json`` says what kind of run a folder holds (``{"kind": "student" | "teacher", ...}``); folders written
  before it existed are recognised by their files (``teacher.json``: teacher; ``config.yaml`` / ``last/`` /
  ``results.json``: student). A command never writes into, reads from or replaces a run of the other kind.
* A folder *holds a run* once the run has something worth keeping: a checkpoint (``last/``) or its final outputs
  (``results.json``, ``teacher.json``). Another start there needs ``--resume`` or ``--overwrite``. A start that
  fails on its inputs leaves nothing behind (what it wrote is removed, an empty folder too); a run that fails or is
  killed after it started but before its first checkpoint leaves an *unfinished start* (its metrics.csv shows how
  far it got) that a plain rerun reuses and ``--resume`` names as such.
* ``--resume`` continues the recipe in ``RUN/config.yaml``: the newly resolved config is compared with it key by key
  and any difference is refused, except the keys a caller names as safe (e.g. more epochs), which are applied,
  written back to ``config.yaml`` and recorded in ``RUN/history.jsonl``. Paths are equal when they name the same
  file, however they are spelled.
* **A run folder travels.** Its own files are always found relative to the folder a command is given (``RUN/last``,
  ``RUN/classes.json``, ...), never through a path recorded inside it, so it works from any working directory and
  after being moved or copied. The inputs it was made from (``data``, ``teacher``, ``distill.det_teacher``,
  ``student.backbone_weights``, a teacher's ``pretrained`` file, ``run.json``'s ``data``) are resolved once, when
  the run starts, and recorded as absolute paths (:func:`absolute_input`): ``--resume`` finds them from anywhere
  on the same machine (elsewhere, it needs them at the same paths). ``out`` records where the run was made and is
  not read back. A trained student is rebuilt (eval, export, predict, a resume) from ``config.yaml`` and its
  checkpoint: a local ``student.backbone_weights`` file is not read again, the checkpoint holds every weight. (A
  student started from ``imagenet`` is rebuilt through torchvision's builder, which takes the ImageNet weights from
  the torch hub cache: for SSDlite the layout itself depends on them.)

Neutral ground: imported by the engine and by the teacher package, imports neither.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cls2det.errors import Cls2detError
from cls2det.files import write_json

CONFIG = "config.yaml"
LAST = "last"  # checkpoint folder of the latest state (end of epoch or interruption)
BEST = "best"  # checkpoint folder of the best val metric (weights only are needed from it)
RESULTS = "results.json"
METRICS_CSV = "metrics.csv"
VAL_CSV = "val.csv"  # one row per evaluation on val during training: step, epoch, mAP, AP50, AP75
TENSORBOARD = "tb"
SOFT_LABELS = "soft_labels.safetensors"  # the teacher's logits per GT box (distill.soft_label_cache)
GT_FEATURES = "gt_features.safetensors"  # KD_loc's pooled teacher taps per GT box (distill.gt_feature_cache)
CLASSES = "classes.json"  # class names and COCO category ids, so a run is usable without its dataset
RUN_JSON = "run.json"  # {"kind": "student" | "teacher", "format": 1, "data": ...}
HISTORY = "history.jsonl"  # one JSON line per start / resume: step, changed config keys
TEACHER_META = "teacher.json"  # the finished teacher's metadata (cls2det.teacher.io.META_FILE)
TEACHER_WEIGHTS = "teacher.safetensors"
KINDS = {"student": "cls2det train", "teacher": "cls2det teacher"}
FORMAT_VERSION = 1
# what a run writes into its folder: removed when a start fails before its first checkpoint
RUN_FILES = (
    CONFIG,
    LAST,
    LAST + ".tmp",
    BEST,
    BEST + ".tmp",
    RESULTS,
    METRICS_CSV,
    VAL_CSV,
    TENSORBOARD,
    SOFT_LABELS,
    GT_FEATURES,
    CLASSES,
    RUN_JSON,
    HISTORY,
    TEACHER_META,
    TEACHER_WEIGHTS,
)
# a run with one of these is worth keeping: another start needs --resume or --overwrite
KEEPERS = (LAST, RESULTS, TEACHER_META)


class RunDirError(Cls2detError, ValueError):
    """An output folder that cannot be used as asked."""


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM: the run saved its state and stopped; ``--resume`` continues it."""


def run_kind(path: str | Path) -> str | None:
    """``"student"``, ``"teacher"`` or None (no run) for folder ``path``."""
    path = Path(path)
    if not path.is_dir():
        return None
    marker = path / RUN_JSON
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            kind = None
        if kind in KINDS:
            return kind
    if (path / TEACHER_META).is_file() or (path / TEACHER_WEIGHTS).is_file():
        return "teacher"
    if any((path / name).exists() for name in (CONFIG, LAST, RESULTS)):
        return "student"
    return None


def check_run_kind(path: str | Path, kind: str, *, role: str) -> None:
    """Refuse folder ``path`` as ``role`` (e.g. ``--teacher``) when it holds a run of the other kind than ``kind``."""
    found = run_kind(path)
    if found is not None and found != kind:
        raise RunDirError(
            f"{role} {path} is a {found} run ({KINDS[found]}), not a {kind} run ({KINDS[kind]}): pass a {kind} run"
        )


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run worth keeping (a checkpoint or final outputs)."""
    return out.is_dir() and any((out / name).exists() for name in KEEPERS)


@dataclass
class RunStart:
    """A run being started in ``out``; :meth:`started` once its inputs are validated, :meth:`failed` on any error."""

    out: Path
    kind: str
    resume: bool
    replaced: Path | None = None  # the old run moved aside by --overwrite, until the new one has started
    existed: frozenset[str] | None = None  # entries of ``out`` before this start (None: the folder is new)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # config keys a resume changed: (old, new)
    is_started: bool = False  # the inputs were valid and training began

    def started(self, step: int = 0, **meta: Any) -> None:
        """The new run is under way: drop the replaced run, mark the folder, log the start / resume."""
        discard_replaced(self.replaced)
        self.replaced = None
        self.is_started = True
        marker = self.out / RUN_JSON
        if not marker.is_file():
            write_run_json(self.out, self.kind, **meta)
        event: dict[str, Any] = {"event": "resume" if self.resume else "start", "step": step}
        if self.changes:
            event["changed"] = {key: {"old": old, "new": new} for key, (old, new) in self.changes.items()}
        append_history(self.out, event)

    def failed(self) -> None:
        """The run stopped on an error: put a replaced run back; keep a run that has started (with a checkpoint
        --resume continues it, without one it is an unfinished start that a plain rerun reuses); otherwise (its
        inputs were refused) remove what this start wrote, so that the folder is as it was."""
        if self.resume or self.is_started:
            return
        if self.replaced is not None:
            restore(self.out, self.replaced)
            self.replaced = None
            return
        if self.existed is None:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for name in RUN_FILES:
            if name not in self.existed:
                _remove(self.out / name)


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool, kind: str = "student") -> RunStart:
    """Check ``out`` for a ``kind`` run and create it; refuse one that holds another run unless ``resume`` or
    ``overwrite``.

    With ``overwrite`` the old run is moved aside, not deleted: :meth:`RunStart.started` deletes it once the new run
    has started, :meth:`RunStart.failed` puts it back if the start fails.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    found = run_kind(out)
    if found is not None and found != kind:
        raise RunDirError(
            f"{out} holds a {found} run ({KINDS[found]}); {KINDS[kind]} writes {kind} runs: choose another --out"
        )
    if resume:
        if not (out / LAST).is_dir():
            if found is not None and not holds_run(out):
                raise RunDirError(
                    f"nothing to resume in {out}: the run stopped before its first checkpoint; "
                    "run again without --resume to start it over"
                )
            raise RunDirError(f"nothing to resume in {out}: no '{LAST}' checkpoint; run without --resume to start it")
        return RunStart(out, kind, resume=True)
    replaced = None
    if holds_run(out):
        if not overwrite:
            if (out / LAST).is_dir() and not any((out / name).exists() for name in (RESULTS, TEACHER_META)):
                raise RunDirError(
                    f"{out} holds an interrupted run (a '{LAST}' checkpoint, no final results): continue it with "
                    "--resume, or start it over with --overwrite"
                )
            raise RunDirError(
                f"{out} holds a finished run: train it longer with --resume and more epochs, or replace it with "
                "--overwrite (or choose another --out)"
            )
        replaced = out.with_name(out.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
    elif found is not None:  # an unfinished start (no checkpoint, no results): start it over
        for name in RUN_FILES:
            _remove(out / name)
    existed = frozenset(p.name for p in out.iterdir()) if out.is_dir() else None
    out.mkdir(parents=True, exist_ok=True)
    return RunStart(out, kind, resume=False, replaced=replaced, existed=existed)


def restore(out: Path, replaced: Path | None) -> None:
    """Put back the run that ``prepare_run_dir(overwrite=True)`` moved aside (the new one failed to start)."""
    if replaced is not None and replaced.is_dir():
        shutil.rmtree(out, ignore_errors=True)
        os.replace(replaced, out)


def discard_replaced(replaced: Path | None) -> None:
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- resume contract

# how a key that --resume may change is allowed to change
ANY, UP, PATH = "any", "up", "path"


def resume_changes(
    out: Path, saved: Mapping[str, Any], new: Mapping[str, Any], safe: Mapping[str, str], paths: tuple[str, ...] = ()
) -> dict[str, tuple[Any, Any]]:
    """Compare the resolved config ``new`` with the run's ``saved`` one (nested dicts), key by key.

    ``safe``: key -> ``ANY`` (any new value) or ``UP`` (a number at least the old one; None = unlimited); keys in
    ``paths`` are file paths, equal when they resolve to the same file. Returns {key: (old, new)} of the safe
    changes; raises :class:`RunDirError` naming the first other difference.
    """
    changes = {}
    for key, old, value in config_differences(saved, new, paths):
        rule = safe.get(key)
        if rule == ANY or (rule == UP and _at_least(value, old)):
            changes[key] = (old, value)
            continue
        how = " (it may only grow)" if rule == UP else ""
        raise RunDirError(
            f"{out} was run with {key}={_show(old)}; --resume cannot change it to {_show(value)}{how}: "
            "drop the change, or start a new run (another --out, or --overwrite)"
        )
    return changes


def config_differences(
    saved: Mapping[str, Any], new: Mapping[str, Any], paths: tuple[str, ...] = ()
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, new value)`` for every key where two configs (nested dicts) differ, sorted by key;
    keys in ``paths`` are file paths, equal when they resolve to the same file."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    differences = []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(key), new_flat.get(key)
        if old != value and not (key in paths and _same_path(old, value)):
            differences.append((key, old, value))
    return differences


def absolute_input(path: str | None) -> str | None:
    """An input path as a run records it: absolute and normalised (``..`` folded, symlinks kept as named), so that the
    run folder works from any working directory. None and names that are not files (``"imagenet"``) stay as given."""
    if path is None or path == "" or path.lower() == "imagenet":
        return path
    return os.path.abspath(path)


def write_run_json(out: Path, kind: str, **meta: Any) -> None:
    write_json(out / RUN_JSON, {"kind": kind, "format": FORMAT_VERSION, **meta})


def append_history(out: Path, event: dict[str, Any]) -> None:
    """One JSON line per start / resume in ``out/history.jsonl``."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}, default=str)
    with open(out / HISTORY, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def short_list(names: list[str], limit: int = 6) -> str:
    """``[a, b, c, ..., z] (26)``: a class list short enough for a one-line error."""
    names = [str(n) for n in names]
    if len(names) <= limit:
        return "[" + ", ".join(names) + "]"
    return "[" + ", ".join(names[: limit - 2]) + f", ..., {names[-1]}] ({len(names)} classes)"


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _same_path(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve()


def _at_least(new: Any, old: Any) -> bool:
    if new is None:  # unlimited
        return True
    if old is None or isinstance(new, bool) or not isinstance(new, (int, float)):
        return False
    return new >= old


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
