"""Teacher checkpoints: ``teacher.safetensors`` (the network's plain state dict) + ``teacher.json`` (everything else).

The weights file is an ordinary torchvision/timm state dict, so it doubles as a local ``pretrained`` file. The JSON
records its SHA-256, so a truncated or modified weights file is caught before it is used. Never pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cls2det.files import atomic_write_bytes, write_json
from cls2det.teacher.heads import teacher_loss
from cls2det.teacher.model import Teacher, TeacherError, build_teacher

if TYPE_CHECKING:
    from cls2det.config import TeacherConfig

WEIGHTS_FILE = "teacher.safetensors"
META_FILE = "teacher.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "arch", "library", "num_classes", "class_names", "input_size", "mean", "std", "sha256")


def save_teacher(
    teacher: Teacher, run_dir: str | Path, metrics: dict, *, config: TeacherConfig | dict[str, Any] | None = None
) -> Path:
    """Write ``run_dir/teacher.safetensors`` then ``run_dir/teacher.json``, each atomically; returns ``run_dir``.

    ``config``: the TeacherConfig (or a dict) the teacher was trained with, recorded for reproduction.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage; contiguous CPU copies are what it writes anyway
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in teacher.net.state_dict().items()}
    blob = sorted_metadata(save_safetensors(state, metadata={"arch": teacher.arch, "format": str(FORMAT_VERSION)}))
    meta = {
        "format": FORMAT_VERSION,
        "arch": teacher.arch,
        "library": teacher.library,
        "num_classes": teacher.num_classes,
        "class_names": teacher.class_names,
        "input_size": teacher.input_size,
        "mean": list(teacher.mean),
        "std": list(teacher.std),
        "loss": teacher.loss,
        "hflip": teacher.hflip,
        "taps": list(teacher.available_taps),
        "weights": WEIGHTS_FILE,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "metrics": metrics,
    }
    atomic_write_bytes(run_dir / WEIGHTS_FILE, blob)
    # the JSON goes last: a directory with a valid JSON always has the weights it describes
    write_json(run_dir / META_FILE, meta)
    return run_dir


def sorted_metadata(blob: bytes) -> bytes:
    """A safetensors file's bytes with its metadata keys sorted.

    safetensors writes the metadata map in the order of a Rust ``HashMap``, which is seeded per process: the same
    weights saved by two processes differed in their header (and SHA-256) half the time. The tensors' entries keep
    their (already fixed) order; the header is padded with spaces to 8 bytes, as safetensors pads it.
    """
    size = int.from_bytes(blob[:8], "little")  # header length, u64 little-endian
    header = json.loads(blob[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


def read_teacher_meta(run_dir: str | Path) -> dict:
    """The validated contents of ``run_dir/teacher.json`` (``run_dir`` may also be that file itself)."""
    path = _run_dir(run_dir) / META_FILE
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TeacherError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise TeacherError(f"{path}: top level must be an object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise TeacherError(f"{path}: missing key {missing[0]!r} (required: {', '.join(REQUIRED_KEYS)})")
    if meta["format"] != FORMAT_VERSION:
        raise TeacherError(f"{path}: unsupported format {meta['format']!r}, this version reads {FORMAT_VERSION}")
    names, num_classes = meta["class_names"], meta["num_classes"]
    if not isinstance(names, list) or not isinstance(num_classes, int) or len(names) != num_classes:
        raise TeacherError(f"{path}: class_names must be a list of num_classes ({num_classes}) names")
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
            raise TeacherError(f"{path}: {key} must be a list of 3 numbers, got {values!r}")
    return meta


def load_teacher(run_dir: str | Path, *, device: str | torch.device = "cpu") -> Teacher:
    """The teacher saved in ``run_dir``: built with random init, weights loaded (strict), frozen, on ``device``."""
    meta = read_teacher_meta(run_dir)
    weights = _run_dir(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise TeacherError(f"teacher weights not found: {weights}")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise TeacherError(f"{weights}: checksum does not match {META_FILE} (file truncated or modified)")
    try:
        state = load_safetensors(blob)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
        raise TeacherError(f"{weights}: not a valid safetensors file ({err})") from None
    try:
        teacher = build_teacher(
            meta["arch"],
            meta["num_classes"],
            class_names=meta["class_names"],
            input_size=meta["input_size"],
            library=meta["library"],
            mean=meta["mean"],
            std=meta["std"],
        )
    except TeacherError as err:
        raise TeacherError(f"{weights.with_name(META_FILE)}: {err}") from None
    try:
        teacher.net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise TeacherError(f"{weights}: does not fit {meta['arch']!r} ({reason})") from None
    teacher.loss = teacher_loss(meta)  # runs from before the key was recorded: "ce"
    # runs from before the key: their config's hflip (the old default, False, when not even that)
    teacher.hflip = meta.get("hflip", (meta.get("config") or {}).get("hflip", False))
    return teacher.freeze().to(device)


def _run_dir(path: str | Path) -> Path:
    """Accept the run folder or either of its two files."""
    path = Path(path)
    return path.parent if path.name in (META_FILE, WEIGHTS_FILE) else path
