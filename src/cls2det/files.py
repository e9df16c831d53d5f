"""Files that no reader ever sees half-written, and weight files read without unpickling anything.

Every file the project writes goes through :func:`atomic_write`: a temporary name in the same folder, fsync, one
rename over the target, fsync of the folder. Every local weights file (a teacher's ``--pretrained``, a student's
``backbone_weights``) is read by :func:`read_state_dict`: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cls2det.errors import WeightsError


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


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
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
    from safetensors.torch import save_file

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
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

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


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
