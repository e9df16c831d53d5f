"""Run files that no reader ever sees half-written, and files read without unpickling anything.

Neutral ground (torch + safetensors only): the student's engine, the teacher's training, the caches and the exports
all write through these, so no package imports another for its file handling.

* :func:`atomic_write` and its forms (bytes, text, JSON, safetensors): a temporary name in the same folder, fsync,
  one rename over the target, fsync of the folder.
* Checkpoints: a folder of ``model.safetensors`` (weights) and ``state.pt`` (optimizer, scheduler, counters, RNG:
  tensors and plain containers only, loaded with ``weights_only=True``), swapped in with one rename, so the previous
  checkpoint stays intact until the new one is complete.
* :func:`read_state_dict`: every local weights file (a teacher's ``--pretrained``, ``student.backbone_weights``).
* :class:`MetricsLogger`: one CSV row per step (+ TensorBoard), and :func:`truncate_metrics` for a resumed run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from cls2det.errors import CheckpointError, WeightsError


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: so that a rename in it survives a crash); a no-op where
    the platform cannot open folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Create ``path`` through ``write(tmp)``: ``write`` fills a temporary file beside it, which is fsynced and
    renamed over ``path``. A failing ``write`` leaves ``path`` as it was and no temporary file. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:  # keep the text's own line ends (csv writes \r\n)
            f.write(text)

    return atomic_write(path, write)


def write_json(path: str | Path, payload: Any) -> Path:
    """Atomic, indented JSON; tensors become lists and paths strings."""
    return atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def save_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomic safetensors file of contiguous CPU tensors."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` (safetensors) or ``.pth``/``.pt`` (``torch.load(weights_only=True)``);
    ``state_dict`` / ``model`` wrappers and DDP's ``module.`` prefixes are removed. Raises :class:`WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise WeightsError(f"{path}: unknown weights format {suffix!r}; expected .safetensors, .pth or .pt")
    state: object  # what the file holds: checked below
    try:
        if suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt file, pickle refused by weights_only, ...
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {reason})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------- checkpoints


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
        fsync_path(tmp / name)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_path(path.parent)
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


# ----------------------------------------------------------------------------------------------- metrics


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
        atomic_write_text(path, header + "".join(kept))


def append_csv_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to CSV file ``path`` (its keys as the header when the file is new); the first column is a step,
    so :func:`truncate_metrics` can cut the file back on resume."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
