"""Checkpoints that survive crashes and never execute code when loaded.

A checkpoint is a folder: ``model.safetensors`` (the student's weights) and ``state.pt`` (optimizer, scheduler,
counters, RNG: tensors and plain containers only, loaded with ``weights_only=True``). Both are written to a temp
name, fsynced and renamed; the folder itself is swapped in with one rename, so the previous checkpoint stays intact
until the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cls2det.errors import Cls2detError
from cls2det.files import fsync_path


class CheckpointError(Cls2detError, ValueError):
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
