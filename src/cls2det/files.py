"""Run files that survive crashes: checkpoints that never execute code when loaded, atomic JSON, metrics.csv.

Neutral ground (torch + safetensors only): the student's engine and the teacher's training both write their run
folders with these, without the teacher package importing the engine.

A checkpoint is a folder: ``model.safetensors`` (the student's weights) and ``state.pt`` (optimizer, scheduler,
counters, RNG: tensors and plain containers only, loaded with ``weights_only=True``). Both are written to a temp
name, fsynced and renamed; the folder itself is swapped in with one rename, so the previous checkpoint stays intact
until the new one is complete.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, tampered with or does not fit the model."""


def save_checkpoint(path: str | Path, model_state: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``path/model.safetensors`` + ``path/state.pt`` atomically and return ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(_untie(tensors), str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    for name in ("model.safetensors", "state.pt"):
        _fsync(tmp / name)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of checkpoint folder ``path`` (or a ``.safetensors`` file); never unpickles."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"checkpoint weights not found: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not a valid safetensors file ({err})") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """The training state of checkpoint folder ``path``, loaded with ``weights_only=True``."""
    file = Path(path) / "state.pt"
    if not file.is_file():
        raise CheckpointError(f"checkpoint state not found: {file}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated / hostile files; none may pass silently
        raise CheckpointError(f"{file}: unreadable or unsafe checkpoint state ({type(err).__name__})") from None


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; clone the later ones of each shared storage."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=float)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    """Appends one row per logged step to ``csv_path`` and mirrors scalars to TensorBoard under ``tb_dir``.

    Columns are ``columns`` when given, else fixed by the first row written (a resumed run keeps the existing
    header); keys that are not columns go to TensorBoard only, columns a row lacks are left empty.
    """

    def __init__(self, csv_path: Path, tb_dir: Path | None = None, columns: list[str] | None = None) -> None:
        self.csv_path = csv_path
        self.columns: list[str] | None = list(columns) if columns is not None else None
        self.header_written = False
        if csv_path.is_file() and csv_path.stat().st_size:
            with open(csv_path, newline="") as f:
                self.columns = next(csv.reader(f))
            self.header_written = True
        self.tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tb_dir))
            except ImportError:  # tensorboard is a dependency, but a stripped install still trains
                self.tb = None

    def log(self, row: dict[str, float], step: int) -> None:
        if self.columns is None:
            self.columns = list(row)
        if not self.header_written:
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
            self.header_written = True
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in self.columns])
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the header and the complete rows of steps <= ``step`` in metrics.csv.

    A run killed between checkpoints logged steps that its resumed run does again; without this the CSV would hold
    those steps twice (and a row cut short by the kill).
    """
    if not path.is_file():
        return
    with open(path, newline="") as f:  # keep the csv module's \r\n line ends as they are
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return
    header, rows = lines[0], lines[1:]

    def keep(line: str) -> bool:
        if not line.endswith("\n") or line.count(",") != header.count(","):
            return False
        head = line.split(",", 1)[0]
        return head.isdigit() and int(head) <= step

    kept = [line for line in rows if keep(line)]
    if len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            f.write(header + "".join(kept))
        os.replace(tmp, path)
