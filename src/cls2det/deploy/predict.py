"""``cls2det predict``: run a trained student (or its ONNX export) on image files, folders or globs.

Writes to ``out``:
  * ``predictions.json``: COCO results, one record per detection with score >= ``json_threshold`` (default 0.05,
    what COCO evaluation keeps; the detector's own ``score_thresh`` applies first):
    ``{"image_id", "file_name", "category_id", "category_name", "bbox": [x, y, w, h], "score"}``, bbox in pixels of
    the original image, category ids the dataset's own (``classes.json`` / the export's metadata);
  * ``images.json``: the images (id, file_name, width, height), the skipped files with their reason, the model;
  * with ``save_images``: each image with its detections of score >= ``score_threshold`` (default 0.3) drawn,
    one colour per class, under its name relative to the folder it was found in (a file's own name otherwise).

An unreadable file (truncated, not an image) is reported on stderr and skipped; anything a user can get wrong
before the first image (no such run, no images found, onnxruntime missing) is a :class:`PredictError`.
"""

from __future__ import annotations

import colorsys
import glob
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

from cls2det.engine.run_dir import BEST, CLASSES, CONFIG, LAST, write_json
from cls2det.errors import Cls2detError
from cls2det.run_folder import check_run_kind

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PREDICTIONS = "predictions.json"
IMAGES = "images.json"
JSON_THRESHOLD = 0.05  # detections kept in predictions.json
SCORE_THRESHOLD = 0.3  # detections drawn
WRITABLE = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}  # drawings keep these suffixes, others -> .png


class PredictError(Cls2detError, ValueError):
    """A bad input to ``cls2det predict`` (one ``error:`` line, exit 2)."""


@dataclass(frozen=True)
class ImageFile:
    path: Path  # where it was found, as given (relative paths stay relative)
    name: str  # its name under the output folder (relative to the searched folder, or its own name)


@dataclass
class Classes:
    names: list[str]
    category_ids: list[int]


# ------------------------------------------------------------------------------------------------- sources


def find_images(sources: Sequence[str | Path]) -> list[ImageFile]:
    """Expand image files, folders (searched recursively for :data:`IMAGE_SUFFIXES`) and glob patterns, in order,
    each file once. A named file is taken whatever its suffix (it is skipped later if it does not decode); a source
    that is neither a file, a folder nor a pattern matching something is a :class:`PredictError`."""
    found: dict[Path, ImageFile] = {}

    def add(path: Path, name: str) -> None:
        found.setdefault(path.resolve(), ImageFile(path, name))

    def add_folder(folder: Path) -> None:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                add(f, f.relative_to(folder).as_posix())

    for source in map(str, sources):
        path = Path(source)
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            add(path, path.name)
        elif glob.has_magic(source):
            matches = sorted(glob.glob(source, recursive=True))
            for match in map(Path, matches):
                if match.is_dir():
                    add_folder(match)
                elif match.suffix.lower() in IMAGE_SUFFIXES:
                    add(match, match.name)
        else:
            raise PredictError(f"{source}: no such file or folder")
    if not found:
        raise PredictError(f"no images found in {', '.join(map(str, sources))} (suffixes: {' '.join(IMAGE_SUFFIXES)})")
    return _unique_names(list(found.values()))


def _unique_names(files: list[ImageFile]) -> list[ImageFile]:
    """Output names made unique (``a.jpg``, ``a_1.jpg``, ...) when two sources hold the same relative name."""
    seen: set[str] = set()
    out = []
    for f in files:
        name, stem, suffix, n = f.name, Path(f.name).with_suffix("").as_posix(), Path(f.name).suffix, 0
        while name.lower() in seen:
            n += 1
            name = f"{stem}_{n}{suffix}"
        seen.add(name.lower())
        out.append(ImageFile(f.path, name))
    return out


def read_rgb(path: Path) -> Image.Image:
    """The decoded RGB image, turned upright by its EXIF orientation (as a photo viewer shows it, so the boxes land
    where the user sees the objects); PIL's errors (truncated file, not an image, decompression bomb) propagate."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")  # decodes fully: a truncated file fails here, not later


def to_tensor(image: Image.Image) -> Tensor:
    """[3, H, W] float32 in 0..1, as the training data is read (:func:`cls2det.data.coco.read_image`)."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)


# ------------------------------------------------------------------------------------------------- models

Model = Callable[[list[Tensor]], list[dict[str, Tensor]]]  # images [3, H, W] in 0..1 -> boxes / scores / labels


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / CLASSES).is_file()


def read_classes(names: Any, category_ids: Any, source: Path) -> Classes:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise PredictError(f"{source}: no class_names list")
    if category_ids is None:  # a run written before category ids were recorded: COCO's 1-based convention
        category_ids = list(range(1, len(names) + 1))
    if not isinstance(category_ids, list) or len(category_ids) != len(names):
        raise PredictError(f"{source}: category_ids must list one id per class ({len(names)})")
    return Classes(list(names), [int(c) for c in category_ids])


def run_classes(run: Path) -> Classes:
    """The classes of run folder ``run`` (its ``classes.json``), checked."""
    if not run.is_dir():
        raise PredictError(f"no such run folder: {run}")
    check_run_kind(run, "student", role="run")  # a teacher run: the same line as eval and export
    if not is_run(run):
        raise PredictError(f"{run} is not a training run: {CONFIG} or {CLASSES} not found")
    try:
        data = json.loads((run / CLASSES).read_text())
    except ValueError as err:
        raise PredictError(f"{run / CLASSES}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise PredictError(f"{run / CLASSES}: not a JSON object")
    return read_classes(data.get("class_names"), data.get("category_ids"), run / CLASSES)


def torch_model(run: Path, checkpoint: str | None, device: str) -> tuple[Model, Classes, dict[str, Any]]:
    """The student of run folder ``run`` (checkpoint ``best`` when the run has one, else ``last``)."""
    from cls2det.engine.loading import load_student

    classes = run_classes(run)
    checkpoint = checkpoint or (BEST if (run / BEST).is_dir() else LAST)
    if not (run / checkpoint).is_dir():
        raise PredictError(f"{run} has no '{checkpoint}' checkpoint")
    classes = run_classes(run)
    dev = _torch_device(device)
    adapter, config = load_student(run, checkpoint=checkpoint)
    adapter.to(dev).eval()

    @torch.no_grad()
    def run_batch(images: list[Tensor]) -> list[dict[str, Tensor]]:
        outputs = adapter([img.to(dev) for img in images])  # labels already 0-based
        return [{k: v.cpu() for k, v in out.items()} for out in outputs]

    info = {"run": str(run), "checkpoint": checkpoint, "detector": config.student.detector, "device": str(dev)}
    return run_batch, classes, info


def onnx_model(path: Path, device: str) -> tuple[Model, Classes, dict[str, Any]]:
    """An ONNX file of ``cls2det export --format onnx`` and the metadata it holds (classes, label offset)."""
    from cls2det.deploy.export import ONNX_INPUT, ONNX_OUTPUTS

    try:
        import onnxruntime as ort
    except ImportError:
        raise PredictError("--onnx needs onnxruntime: pip install 'cls2det[export]'") from None
    if not path.is_file():
        raise PredictError(f"no such ONNX file: {path}")
    meta, source = onnx_metadata(path)
    classes = read_classes(meta.get("class_names"), meta.get("category_ids"), source)
    offset = int(meta.get("label_offset", 0))
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types for a broken file
        raise PredictError(f"{path}: not a loadable ONNX model ({' '.join(str(err).split())[:200]})") from None

    def run_batch(images: list[Tensor]) -> list[dict[str, Tensor]]:
        outputs = []
        for image in images:  # the export takes one image per call
            boxes, labels, scores = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: image.numpy()})
            labels = torch.from_numpy(np.asarray(labels)).long() - offset
            outputs.append({"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores), "labels": labels})
        return outputs

    info = {"onnx": str(path), "detector": meta.get("detector"), "providers": session.get_providers()}
    return run_batch, classes, info


def onnx_metadata(path: Path) -> tuple[dict[str, Any], Path]:
    """The classes, label offset and detector of ONNX file ``path``, and where they were read: the file's own
    metadata (``cls2det export`` stores it there), else, for a file exported before it did, its sidecar, but only
    when the sidecar names this very file (a sidecar of another model in the same folder would mislabel it)."""
    from cls2det.deploy.export import read_onnx_metadata, sidecar_path

    try:
        meta = read_onnx_metadata(path)
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others for a file that is not a model
        raise PredictError(f"{path}: not a loadable ONNX model ({' '.join(str(err).split())[:200]})") from None
    if meta is not None:
        return meta, path
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise PredictError(f"{path} holds no cls2det metadata and {sidecar} is not there: export it again")
    try:
        meta = json.loads(sidecar.read_text())
    except ValueError as err:
        raise PredictError(f"{sidecar}: not valid JSON ({err})") from None
    described = (meta.get("exports") or {}).get("onnx", {}).get("file") if isinstance(meta, dict) else None
    if described != path.name:
        raise PredictError(
            f"{path} holds no cls2det metadata and {sidecar} describes {described or 'no ONNX file'}, not "
            f"{path.name}: export it again (`cls2det export RUN --format onnx`)"
        )
    return meta, sidecar


def _torch_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise PredictError(f"--device {device}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {device}: CUDA is not available on this machine")
    return dev


# ------------------------------------------------------------------------------------------------- predict


def predict_images(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    run: str | Path | None = None,
    onnx: str | Path | None = None,
    checkpoint: str | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    score_threshold: float = SCORE_THRESHOLD,
    json_threshold: float = JSON_THRESHOLD,
    save_images: bool = False,
    progress: bool = True,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Detect objects in ``sources`` with the student of ``run`` or the ONNX file ``onnx``; write the files of the
    module docstring to ``out``. With both ``run`` and ``onnx``, the export's classes must be the run's. Returns the
    summary ``{"images", "detections", "drawn", "skipped": [(file, reason)], "out", "model"}``."""
    log = log or sys.stderr
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    for flag, value in (("--score-threshold", score_threshold), ("--json-threshold", json_threshold)):
        if not 0.0 <= value <= 1.0:
            raise PredictError(f"{flag} must be in [0, 1], got {value}")
    if run is None and onnx is None:
        raise PredictError("give a training run folder or --onnx FILE")
    files = find_images(sources)
    if onnx is not None:
        model, classes, info = onnx_model(Path(onnx), device)
        if run is not None:
            names = run_classes(Path(run)).names
            if names != classes.names:
                raise PredictError(f"{onnx} was exported for classes {classes.names}, {run} has {names}")
    else:
        assert run is not None  # checked above: run or onnx
        model, classes, info = torch_model(Path(run), checkpoint, device)
    out = Path(out)
    if save_images:
        for f in files:
            if (out / f.name).resolve() == f.path.resolve():
                raise PredictError(f"--out {out} would overwrite the input image {f.path}: choose another folder")
    out.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    drawn = 0
    with _Progress(progress, len(files), log) as bar:
        for start in range(0, len(files), batch_size):
            batch = []
            for image_id, f in enumerate(files[start : start + batch_size], start=start + 1):
                try:
                    pil = read_rgb(f.path)
                except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, bombs, ...
                    reason = " ".join(str(err).split()) or type(err).__name__
                    bar.note(f"skipped {f.path}: {reason}")
                    skipped.append((str(f.path), reason))
                    bar.advance()
                    continue
                batch.append((image_id, f, pil))
            if not batch:
                continue
            for (image_id, f, pil), det in zip(batch, model([to_tensor(pil) for _, _, pil in batch])):
                images.append({"id": image_id, "file_name": str(f.path), "width": pil.width, "height": pil.height})
                records.extend(coco_records(det, image_id, str(f.path), classes, json_threshold))
                if save_images:
                    draw_detections(pil, det, classes.names, score_threshold)
                    save_drawing(pil, out / f.name)
                    drawn += 1
                bar.advance()
    (out / PREDICTIONS).write_text(json.dumps(records))
    summary = {
        "images": len(images),
        "detections": len(records),
        "drawn": drawn,
        "skipped": skipped,
        "out": str(out),
        "model": info,
        "json_threshold": json_threshold,
        "score_threshold": score_threshold,
    }
    write_json(out / IMAGES, {**summary, "images": images, "skipped": [{"file": f, "reason": r} for f, r in skipped]})
    return summary


def coco_records(
    det: dict[str, Tensor], image_id: int, file_name: str, classes: Classes, threshold: float
) -> list[dict[str, Any]]:
    """COCO result records of one image's detections (boxes [N, 4] xyxy, scores [N], labels [N] in [0, C))."""
    keep = det["scores"] >= threshold
    boxes, scores, labels = det["boxes"][keep].tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist()
    records = []
    for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
        if not 0 <= label < len(classes.names):
            raise PredictError(f"the model output label {label}, but it has {len(classes.names)} classes")
        records.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "category_id": classes.category_ids[label],
                "category_name": classes.names[label],
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(score, 5),
            }
        )
    return records


# ------------------------------------------------------------------------------------------------- drawing


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (hues spaced by the golden ratio)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, det: dict[str, Tensor], names: list[str], threshold: float) -> None:
    """Draw the detections with score >= ``threshold`` on ``image`` in place: box, class name and score."""
    draw = ImageDraw.Draw(image)
    side = min(image.size)
    width = max(1, round(side / 200))
    try:
        font = ImageFont.load_default(size=max(10, round(side / 40)))
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    order = det["scores"].argsort()  # the best drawn last, on top
    for i in order.tolist():
        score, label = float(det["scores"][i]), int(det["labels"][i])
        if score < threshold:
            continue
        x1, y1, x2, y2 = det["boxes"][i].tolist()
        colour = class_colour(label)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        lift = bottom - top + 2
        ty = y1 - lift if y1 - lift >= 0 else y1  # above the box, inside it at the top edge
        draw.rectangle((x1, ty, x1 + right - left + 4, ty + lift), fill=colour)
        draw.text((x1 + 2, ty + 1 - (top - y1)), text, fill=(0, 0, 0), font=font)


def save_drawing(image: Image.Image, path: Path) -> None:
    if path.suffix.lower() not in WRITABLE:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    image.save(path, **options)


class _Progress:
    """A rich progress bar with ETA over the images on stderr (or nothing): ``advance()`` after each image,
    ``note(text)`` for a line on stderr that does not tear the bar."""

    def __init__(self, enabled: bool, total: int, log: TextIO) -> None:
        self.enabled, self.total, self.log = enabled, total, log

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich import progress
            from rich.console import Console

            self.bar = progress.Progress(
                progress.TextColumn("predict"),
                progress.BarColumn(),
                progress.MofNCompleteColumn(),
                progress.TimeElapsedColumn(),
                progress.TimeRemainingColumn(),
                transient=True,
                console=Console(file=self.log),
            )
            self.bar.start()
            self.task = self.bar.add_task("predict", total=self.total)
        return self

    def advance(self) -> None:
        if self.enabled:
            self.bar.advance(self.task)

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.log)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
