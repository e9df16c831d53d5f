"""Export a trained student alone (no teacher, no training code) as ONNX or TorchScript, with a JSON sidecar.

What is exported is the stock torchvision detector (``adapter.detector``) in eval mode: it takes float RGB images in
0..1 and does its own resizing and mean/std normalisation, and its labels stay in the detector's convention (index 0
is background for the softmax families), so the metadata says how to map them back: ``class = label -
label_offset``, ``category_id = category_ids[class]``.

The metadata (detector, classes, category ids, label offset, the run and checkpoint) travels inside an ONNX file
(its ``metadata_props``, key ``cls2det``): ``cls2det predict --onnx`` reads it from there, so a file copied,
renamed or exported beside another model cannot be run with another model's classes. It is also written to a JSON
sidecar named after the model file's stem (``student.onnx`` and ``student.torchscript.pt`` -> ``student.json``,
``ssd.onnx`` -> ``ssd.json``), for readers and for TorchScript, whose file has no place for it.

* ONNX: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, torchvision's own tested path
  for its detectors); one image per call, input ``image`` [3, H, W] with dynamic H and W, outputs ``boxes`` [N, 4]
  (xyxy, pixels of the input image), ``labels`` [N] int64, ``scores`` [N] float32.
* TorchScript: ``torch.jit.script(detector)``; the scripted detector takes ``list[Tensor[3, H, W]]`` and, as every
  scripted torchvision detector, returns the tuple ``(losses, detections)`` (losses empty in eval mode).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cls2det.config import ConfigError
from cls2det.engine.loading import load_student
from cls2det.engine.run_dir import CLASSES, write_json
from cls2det.errors import Cls2detError
from cls2det.files import atomic_write
from cls2det.students.base import Detector

FORMATS = {"onnx": "student.onnx", "torchscript": "student.torchscript.pt"}  # format -> default file in run/export
SIDECAR = "student.json"  # the sidecar of the default file names
METADATA_KEY = "cls2det"  # the ONNX metadata_props entry that holds the sidecar's JSON
ONNX_INPUT = "image"
ONNX_OUTPUTS = ("boxes", "labels", "scores")
ONNX_OPSET = 17  # the legacy exporter handles 7..20; 17 is what onnxruntime >= 1.13 runs everywhere


class ExportError(Cls2detError, RuntimeError):
    """An export that cannot be done (missing package, unsupported operator in this torch version)."""


def export_detector(
    detector: nn.Module,
    path: str | Path,
    fmt: str,
    *,
    image_size: int | tuple[int, int],
    example: Tensor | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write torchvision ``detector`` (switched to eval mode) to ``path`` as ``fmt`` ("onnx" or "torchscript").

    image_size: H = W (or (H, W)) of the example image the ONNX exporter traces with; any size runs afterwards.
    example: the [3, H, W] image in 0..1 to trace with instead of a random one (ONNX only). The file is written under
    a temporary name and renamed, so a failed export leaves no half-written model behind. metadata: JSON-able facts
    stored in the ONNX file's ``metadata_props`` under :data:`METADATA_KEY` (ONNX only). Returns ``path``.
    """
    _check_format(fmt)
    detector.eval()
    if fmt == "onnx":
        if example is None:
            height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
            device = next(detector.parameters()).device
            example = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
        return atomic_write(path, lambda tmp: _export_onnx(detector, example, tmp, metadata))
    return atomic_write(path, lambda tmp: _export_torchscript(detector, tmp))


def export_student(
    run: str | Path, *, fmt: str = "onnx", out: str | Path | None = None, checkpoint: str = "last"
) -> Path:
    """Export the student of training run folder ``run`` (weights of ``run/checkpoint``) and its sidecar.

    out: the model file (a name with a suffix), or a folder (an existing one, or a name without a suffix) to write
    ``student.onnx`` / ``student.torchscript.pt`` in; default ``run/export``. The sidecar (:func:`sidecar_path`) is
    written next to it (one sidecar describes both formats when both are exported under one stem); an ONNX file also
    holds the metadata itself.
    Raises ConfigError / CheckpointError for a missing or broken run folder or checkpoint, ExportError when the
    export itself fails. Returns the path of the model file.
    """
    _check_format(fmt)
    run = Path(run)
    adapter, config = load_student(run, checkpoint=checkpoint)
    classes = _read_classes(run / CLASSES)
    detector = adapter.detector
    size = config.student.image_size or _transform_size(detector)
    path = export_path(run, fmt, out)
    header = {
        "detector": config.student.detector,
        "class_names": classes["class_names"],
        "category_ids": classes.get("category_ids"),
        "label_offset": int(adapter.label_offset),
        "head": adapter.head,
    }
    entry = {"file": path.name, "run": str(run), "checkpoint": checkpoint, **_format_card(detector, fmt, size)}
    export_detector(detector, path, fmt, image_size=size, metadata={**header, "exports": {fmt: entry}})
    write_sidecar(sidecar_path(path), header, fmt, entry)
    return path


def export_path(run: Path, fmt: str, out: str | Path | None) -> Path:
    """Where ``export_student`` writes the model: ``out`` when it names a file (it has a suffix and is no folder),
    else ``FORMATS[fmt]`` in the folder ``out`` (default ``run/export``)."""
    if out is None:
        return run / "export" / FORMATS[fmt]
    out = Path(out)
    if out.is_dir() or not out.suffix:  # `--out X`: a folder, not an extensionless model file
        return out / FORMATS[fmt]
    return out


def sidecar_path(model: Path) -> Path:
    """The JSON sidecar of model file ``model``: its stem up to the first dot, ``.json``, beside it."""
    return model.with_name(model.name.split(".")[0] + ".json")


def read_onnx_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata ``cls2det export`` stored in ONNX file ``path`` (None for a file without it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None


def write_sidecar(path: Path, header: dict[str, Any], fmt: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Write ``{**header, "exports": {fmt: entry, ...}}`` to ``path``; keeps the other format's entry when the
    existing sidecar describes the same classes and label convention (same student), otherwise starts afresh."""
    exports: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and all(old.get(k) == v for k, v in header.items()):
            exports = {
                k: v
                for k, v in old.get("exports", {}).items()
                if k != fmt and isinstance(v, dict) and (path.parent / str(v.get("file"))).is_file()
            }
    payload = {**header, "exports": {**exports, fmt: entry}}
    write_json(path, payload)
    return payload


# ----------------------------------------------------------------------------------------------- helpers


def _export_onnx(detector: nn.Module, example: Tensor, path: Path, metadata: dict[str, Any] | None = None) -> None:
    try:
        import onnx  # noqa: F401  (the TorchScript-based exporter serialises through it)
    except ImportError:
        raise ExportError("ONNX export needs the 'onnx' package: pip install 'cls2det[export]'") from None
    dynamic = {ONNX_INPUT: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in ONNX_OUTPUTS}}
    model = _SingleImage(detector).eval()
    with warnings.catch_warnings():
        # Tracing torchvision's detectors prints dozens of TracerWarnings about shape arithmetic; torchvision
        # routes the data-dependent parts through scripted helpers, so they are expected noise here.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=[ONNX_INPUT],
                output_names=list(ONNX_OUTPUTS),
                dynamic_axes=dynamic,
            )
        except Exception as err:  # the exporter raises many kinds; the user needs one line saying which op failed
            raise ExportError(f"ONNX export of {type(detector).__name__} failed: {_first_line(err)}") from err
    if metadata is not None:
        import onnx

        model = onnx.load(str(path))
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.save(model, str(path))


class _SingleImage(nn.Module):
    """image [3, H, W] -> (boxes [N, 4], labels [N], scores [N]): a fixed output order for the ONNX graph.

    The exporter flattens a returned dict in its key order, which differs between families (Faster R-CNN:
    boxes, labels, scores; RetinaNet / FCOS / SSD: boxes, scores, labels), so names alone would mislabel outputs.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        detections = self.detector([image])[0]
        return detections["boxes"], detections["labels"], detections["scores"]


def _export_torchscript(detector: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices and torchvision's tuple-output warning
        try:
            scripted = torch.jit.script(detector)
        except Exception as err:
            raise ExportError(f"TorchScript export of {type(detector).__name__} failed: {_first_line(err)}") from err
        torch.jit.save(scripted, str(path))


def _format_card(detector: Detector, fmt: str, image_size: int) -> dict[str, Any]:
    """What a deployer needs to feed the exported file and read its outputs."""
    transform = detector.transform
    card: dict[str, Any] = {
        "input": {
            "layout": "[3, H, W] float32, RGB, values in 0..1, one image per call",
            "note": "resizing and mean/std normalisation happen inside the model; do not normalise",
            "image_size": image_size,
            "resize": {
                "min_size": list(transform.min_size),
                "max_size": transform.max_size,
                "fixed_size": list(transform.fixed_size) if transform.fixed_size else None,
            },
            "image_mean": [float(v) for v in transform.image_mean],
            "image_std": [float(v) for v in transform.image_std],
        },
        "outputs": {
            "boxes": "[N, 4] float32, xyxy, pixels of the input image",
            "labels": "[N] int64, detector convention: class = label - label_offset",
            "scores": "[N] float32",
        },
    }
    if fmt == "onnx":
        card["opset"] = ONNX_OPSET
        card["input_names"] = [ONNX_INPUT]
        card["output_names"] = list(ONNX_OUTPUTS)
        card["dynamic_axes"] = {ONNX_INPUT: ["height", "width"], "outputs": "detections"}
    else:
        card["call"] = (
            "model([image]) -> (losses, detections); detections[0] = {'boxes', 'labels', 'scores'} "
            "(torch.jit.load, no cls2det needed)"
        )
    return card


def _transform_size(detector: Detector) -> int:
    """The side the detector's transform resizes to (its smallest ``min_size``), for the example image."""
    transform = detector.transform
    if transform.fixed_size:
        return int(transform.fixed_size[0])
    return int(min(transform.min_size))


def _read_classes(path: Path) -> dict[str, Any]:
    try:
        classes = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({_first_line(err)})") from None
    if not isinstance(classes, dict) or not isinstance(classes.get("class_names"), list):
        raise ConfigError(f"{path}: no 'class_names' list")
    return classes


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
