"""Importers from Pascal VOC XML and YOLO txt labels to the COCO-format default layout.

Both write ``out/images/{split}/...`` (hard links where the filesystem allows, else copies) and
``out/annotations/{split}.json``, then validate the result with :func:`check_dataset` and return its summary.
Errors name the offending file (and line). The output splits are ``train``, ``val`` (what ``cls2det train`` reads)
or ``test``; a source split of another name is mapped onto one (``train=training``).

All or nothing: an import is written into a hidden folder beside ``out`` and renamed to ``out`` only once it has
passed :func:`check_dataset`, so a refused import leaves nothing behind (an earlier import in ``out`` stays as it
was); an ``out`` that holds anything but a dataset's ``annotations/`` and ``images/`` is refused before anything is
read.

YOLO layouts, both as Ultralytics reads them:

* ``images/{train,val}/*.jpg`` + ``labels/{train,val}/*.txt`` (the Ultralytics docs' layout);
* ``{train,valid,test}/images`` + ``{train,valid,test}/labels`` (Roboflow's and Ultralytics' exports), with a
  ``data.yaml`` such as ``{train: ../train/images, val: ../valid/images, names: [...]}``.

A ``data.yaml`` (or ``data.yml``, ``dataset.yaml``) names each split's image folder: relative to its ``path:`` key,
itself relative to the YAML's folder (default: that folder); a ``../x`` that does not exist is read as ``x``
(Ultralytics' rule for Roboflow's files). A split's labels are the image folder with its last ``images`` component
replaced by ``labels``. Without the YAML (or a split it does not name), ``images/{split}`` then ``{split}/images``
are looked for (``val`` also as ``valid``).
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from cls2det.data.coco import check_dataset
from cls2det.data.validate import DatasetError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
OUTPUT_SPLITS = ("train", "val", "test")  # cls2det train reads train and val
YOLO_YAMLS = ("data.yaml", "data.yml", "dataset.yaml")
EDGE_TOLERANCE = 1.0  # px a converted box may leave the image by (rounding in the label tool) before it is an error


def _place_image(source: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another filesystem, or links not supported: fall back to a copy
            pass
    shutil.copy2(source, target)


def check_output_splits(splits: Iterable[str]) -> None:
    """Refuse output split names ``cls2det`` would not read (e.g. ``training``): the import would succeed and the
    dataset then fail ``data check`` and ``train``."""
    for split in splits:
        if split not in OUTPUT_SPLITS:
            raise DatasetError(
                f"--splits: output split {split!r} is not one of {', '.join(OUTPUT_SPLITS)} (cls2det train reads "
                f"train and val); map the source's split onto one, e.g. train={split}"
            )


def _import_atomically(out: Path, write: Callable[[Path], tuple[str, ...]]) -> dict:
    """Run ``write(folder)`` (it fills ``folder`` and returns the splits it wrote) into a hidden folder beside
    ``out``, check the result with :func:`check_dataset`, then rename it to ``out``; on any error the hidden folder
    is removed and ``out`` is as it was. Returns the check's summary (its ``root``: ``out``)."""
    if out.exists() and (not out.is_dir() or not {p.name for p in out.iterdir()} <= {"annotations", "images"}):
        raise DatasetError(
            f"--out {out} exists and holds other files than a dataset's annotations/ and images/: import into a new "
            "folder"
        )
    partial, previous = out.with_name(f".{out.name}.importing"), out.with_name(f".{out.name}.previous")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed import
    try:
        splits = write(partial)
        summary = check_dataset(partial, splits=splits)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():  # an earlier import (or an empty folder): replaced only now that the new one is whole
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(out, previous)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out)
    shutil.rmtree(previous, ignore_errors=True)
    return {**summary, "root": str(out)}


def _write_coco(out: Path, split: str, images: list, annotations: list, class_names: list[str]) -> None:
    coco = {
        "info": {"description": f"imported by cls2det ({split})"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(class_names)],
    }
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / f"{split}.json").write_text(json.dumps(coco, sort_keys=True, indent=1) + "\n")


def _clip_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int, where: str) -> list[float]:
    """COCO xywh of an xyxy box clipped to the image; leaving it by more than EDGE_TOLERANCE is an error."""
    t = EDGE_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise DatasetError(f"{where}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] (xyxy) leaves the {width}x{height} image")
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{where}: box has non-positive width/height")
    return [x1, y1, x2 - x1, y2 - y1]


# ----------------------------------------------------------------------------------------------------- VOC


def _xml_text(node: ET.Element, path: str, where: str) -> str:
    child = node.find(path)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{where}: missing <{path}>")
    return child.text.strip()


def _xml_number(node: ET.Element, path: str, where: str) -> float:
    text = _xml_text(node, path, where)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{where}: <{path}> is not a number: {text!r}") from None


def read_voc_xml(path: Path, class_names: list[str] | None = None) -> tuple[dict, list[dict]]:
    """One VOC annotation file -> ``({"file_name", "width", "height"}, [{"bbox", "category_id", "iscrowd"}])``.

    VOC boxes are 1-based inclusive pixel indices; as a continuous 0-based box that is
    ``[xmin - 1, ymin - 1, xmax, ymax]`` (as Detectron2's VOC loader). ``difficult`` objects become
    ``iscrowd=1`` (ignored by training and by COCO evaluation), as in torchvision's references.
    With ``class_names=None`` each object has its class ``"name"`` instead of a ``category_id``.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line, column = err.position
        raise DatasetError(f"{path}:{line}:{column}: malformed XML: {err}") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read: {err}") from None
    image: dict[str, Any] = {
        "file_name": _xml_text(root, "filename", str(path)),
        "width": int(_xml_number(root, "size/width", str(path))),
        "height": int(_xml_number(root, "size/height", str(path))),
    }
    objects = []
    for index, obj in enumerate(root.findall("object"), start=1):
        where = f"{path}: object {index}"
        name = _xml_text(obj, "name", where)
        difficult = obj.find("difficult")
        is_difficult = difficult is not None and (difficult.text or "0").strip() == "1"
        x1, y1, x2, y2 = (_xml_number(obj, f"bndbox/{k}", where) for k in ("xmin", "ymin", "xmax", "ymax"))
        bbox = _clip_box(x1 - 1, y1 - 1, x2, y2, image["width"], image["height"], where)
        objects.append({"bbox": bbox, "name": name, "iscrowd": int(is_difficult), "where": where})
    if class_names is not None:
        objects = [_with_category_id(obj, class_names) for obj in objects]
    return image, objects


def _with_category_id(obj: dict, class_names: list[str]) -> dict:
    """A read object with ``category_id`` (1..C, the index in ``class_names`` + 1) in place of its name."""
    name, where = obj["name"], obj["where"]
    if name not in class_names:
        raise DatasetError(f"{where}: unknown class {name!r} (classes: {', '.join(class_names)})")
    return {"bbox": obj["bbox"], "category_id": class_names.index(name) + 1, "iscrowd": obj["iscrowd"]}


def _voc_list_file(voc_dir: Path, list_name: str) -> Path | None:
    """An image list named ``list_name``: a path, or a file under ``voc_dir`` or ``voc_dir/ImageSets/Main``
    (``.txt`` may be left out)."""
    main = voc_dir / "ImageSets" / "Main"
    names = (list_name, f"{list_name}.txt")
    for candidate in (Path(list_name), *(voc_dir / n for n in names), *(main / n for n in names)):
        if candidate.is_file():
            return candidate
    return None


def _voc_ids(voc_dir: Path, list_name: str) -> tuple[Path, list[tuple[int, str]]]:
    """Image ids of an image list (see :func:`_voc_list_file`), with their line numbers."""
    list_file = _voc_list_file(voc_dir, list_name)
    if list_file is None:
        raise DatasetError(f"{voc_dir}: image list not found: {list_name} (nor under ImageSets/Main)")
    lines = list_file.read_text(encoding="utf-8").splitlines()
    return list_file, [(n, line.split()[0]) for n, line in enumerate(lines, start=1) if line.strip()]


def voc_default_splits(voc_dir: Path) -> dict[str, str]:
    """The split -> image list mapping of a VOC folder: Pascal's ``trainval`` / ``test`` lists (VOC2007) when both
    are there, else ``train`` / ``val`` (VOC2012, custom exports), under ``ImageSets/Main`` or the folder itself."""
    for train, val in (("trainval", "test"), ("train", "val")):
        if _voc_list_file(voc_dir, f"{train}.txt") and _voc_list_file(voc_dir, f"{val}.txt"):
            return {"train": train, "val": val}
    found = sorted(
        str(p.relative_to(voc_dir))
        for folder in (voc_dir, voc_dir / "ImageSets" / "Main")
        if folder.is_dir()
        for p in folder.glob("*.txt")
    )
    raise DatasetError(
        f"{voc_dir}: no image lists for the default splits (ImageSets/Main/trainval.txt + test.txt, or train.txt + "
        f"val.txt); found: {', '.join(found) or 'no .txt file'}; name them with --splits train=FILE,val=FILE"
    )


def import_voc(
    voc_dir: str | Path,
    out: str | Path,
    *,
    splits: dict[str, str] | None = None,
    class_names: list[str] | tuple[str, ...] | None = None,
    link: bool = True,
) -> dict:
    """Convert a VOC-like folder (Annotations/*.xml, JPEGImages/, image lists) to COCO format.

    ``splits`` maps an output split to an image list: a path, or a file name under the folder or its
    ``ImageSets/Main`` (``.txt`` optional); default :func:`voc_default_splits`. Categories are ``class_names``
    or, if None, the class names found in the splits' XML files, sorted; ids 1..C (:data:`VOC_CLASSES` are Pascal's
    20). Returns :func:`check_dataset`'s summary of ``out``; nothing is written when the import is refused.
    """
    voc_dir, out = Path(voc_dir), Path(out)
    if not voc_dir.is_dir():
        raise DatasetError(f"{voc_dir}: VOC folder not found")
    splits = splits or voc_default_splits(voc_dir)
    check_output_splits(splits)
    read: dict[str, list[tuple[Path, dict, list[dict]]]] = {}
    for split, list_name in splits.items():
        list_file, ids = _voc_ids(voc_dir, list_name)
        read[split] = []
        for line, name in ids:
            xml_path = voc_dir / "Annotations" / f"{name}.xml"
            if not xml_path.is_file():
                raise DatasetError(f"{list_file}:{line}: no annotation file {xml_path}")
            read[split].append((xml_path, *read_voc_xml(xml_path)))
    if class_names is None:
        class_names = sorted({obj["name"] for items in read.values() for _, _, objects in items for obj in objects})
        if not class_names:
            raise DatasetError(f"{voc_dir}: no <object> in the splits' annotation files: no class to import")
    names = list(class_names)
    if len(set(names)) != len(names):
        raise DatasetError(f"{voc_dir}: class names repeat: {', '.join(names)}")

    def write(folder: Path) -> tuple[str, ...]:
        for split, items in read.items():
            images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
            for image_id, (xml_path, record, objects) in enumerate(items, start=1):
                source = voc_dir / "JPEGImages" / record["file_name"]
                if not source.is_file():
                    raise DatasetError(f"{xml_path}: image file not found: {source}")
                file_name = f"{split}/{source.name}"
                _place_image(source, folder / "images" / file_name, link)
                images.append(
                    {"id": image_id, "file_name": file_name, "width": record["width"], "height": record["height"]}
                )
                for obj in objects:
                    obj = _with_category_id(obj, names)
                    area = obj["bbox"][2] * obj["bbox"][3]
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "area": area, **obj})
            _write_coco(folder, split, images, annotations, names)
        return tuple(splits)

    return _import_atomically(out, write)


# ---------------------------------------------------------------------------------------------------- YOLO


def yolo_data_yaml(yolo_dir: Path) -> tuple[Path, dict] | None:
    """``(path, contents)`` of the folder's ``data.yaml`` (or ``data.yml``, ``dataset.yaml``), None without one."""
    for yaml_name in YOLO_YAMLS:
        path = yolo_dir / yaml_name
        if path.is_file():
            try:
                spec = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                raise DatasetError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
            return path, spec if isinstance(spec, dict) else {}
    return None


def yolo_class_names(yolo_dir: Path) -> list[str]:
    """Class names from ``data.yaml`` (``names:`` list or ``{index: name}`` mapping) or ``classes.txt``."""
    found = yolo_data_yaml(yolo_dir)
    if found is not None:
        path, spec = found
        names = spec.get("names")
        if isinstance(names, dict) and sorted(names) == list(range(len(names))):
            return [str(names[k]) for k in range(len(names))]
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        raise DatasetError(f"{path}: 'names' must be a non-empty list or a mapping 0..C-1 -> name")
    path = yolo_dir / "classes.txt"
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if names:
            return names
    raise DatasetError(f"{yolo_dir}: no class names: expected data.yaml with 'names:' or classes.txt")


def yolo_split_folders(yolo_dir: Path, split: str) -> tuple[Path, Path]:
    """``(images folder, labels folder)`` of source split ``split`` in either layout of the module docstring."""
    found = yolo_data_yaml(yolo_dir)
    if found is not None and split in found[1]:
        path, spec = found
        entry = spec[split]
        if not isinstance(entry, str):
            raise DatasetError(
                f"{path}: '{split}' must name one folder of images (lists of folders and .txt image lists are not "
                "supported)"
            )
        base = path.parent / str(spec.get("path") or ".")
        named = base / entry
        if not named.is_dir() and entry.startswith("../"):  # Roboflow's "../train/images": train/images here
            named = base / entry[3:]
        candidates = [named]
    else:
        names = (split, "valid") if split == "val" else (split,)
        candidates = [yolo_dir / "images" / name for name in names] + [yolo_dir / name / "images" for name in names]
    images = next((c for c in candidates if c.is_dir()), None)
    if images is None:
        raise DatasetError(f"{yolo_dir}: split '{split}' missing: no {' or '.join(map(str, candidates))}")
    parts = list(images.parts)
    if "images" in parts:
        at = len(parts) - 1 - parts[::-1].index("images")
        parts[at] = "labels"
    return images, Path(*parts)


def read_yolo_labels(path: Path, width: int, height: int, num_classes: int) -> list[dict]:
    """One YOLO label file (``cls cx cy w h`` per line, normalised to 0..1) -> ``[{"bbox", "category_id"}]``."""
    objects = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{line_number}"
        if len(fields) != 5:
            hint = " (segmentation polygons are not supported)" if len(fields) > 5 else ""
            raise DatasetError(f"{where}: expected 5 values 'cls cx cy w h', got {len(fields)}{hint}")
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise DatasetError(f"{where}: not numbers: {line.strip()!r}") from None
        if not 0 <= cls < num_classes:
            raise DatasetError(f"{where}: class {cls} out of range 0..{num_classes - 1}")
        if w <= 0 or h <= 0:
            raise DatasetError(f"{where}: non-positive box width/height {w:g}/{h:g}")
        x1, y1 = (cx - w / 2) * width, (cy - h / 2) * height
        bbox = _clip_box(x1, y1, x1 + w * width, y1 + h * height, width, height, where)
        objects.append({"bbox": bbox, "category_id": cls + 1})
    return objects


def import_yolo(
    yolo_dir: str | Path,
    out: str | Path,
    *,
    names: list[str] | None = None,
    splits: tuple[str, ...] | dict[str, str] = ("train", "val"),
    link: bool = True,
) -> dict:
    """Convert a YOLO folder (either layout of the module docstring) to COCO format.

    ``splits``: the output splits, each read from the source split of the same name, or ``{output: source}``
    (e.g. ``{"train": "training", "val": "valid"}``). Class names: ``names`` or, if None, ``data.yaml``'s
    ``names:`` or ``classes.txt``; category ids 1..C. An image without a label file has no objects; a label file
    without an image is an error. Returns :func:`check_dataset`'s summary of ``out``; nothing is written when the
    import is refused.
    """
    yolo_dir, out = Path(yolo_dir), Path(out)
    sources = dict(splits) if isinstance(splits, dict) else {split: split for split in splits}
    check_output_splits(sources)
    class_names = list(names) if names is not None else yolo_class_names(yolo_dir)
    folders = {split: yolo_split_folders(yolo_dir, source) for split, source in sources.items()}

    def write(folder: Path) -> tuple[str, ...]:
        for split, (images_dir, labels_dir) in folders.items():
            _write_yolo_split(folder, split, images_dir, labels_dir, class_names, link)
        return tuple(folders)

    return _import_atomically(out, write)


def _write_yolo_split(
    out: Path, split: str, images_dir: Path, labels_dir: Path, class_names: list[str], link: bool
) -> None:
    sources = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = {p.relative_to(images_dir).with_suffix("") for p in sources}
    if labels_dir.is_dir():
        for label_file in sorted(labels_dir.rglob("*.txt")):
            if label_file.relative_to(labels_dir).with_suffix("") not in stems:
                raise DatasetError(f"{label_file}: no image for this label file in {images_dir}")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, source in enumerate(sources, start=1):
        relative = source.relative_to(images_dir)
        try:
            with Image.open(source) as im:
                width, height = im.size
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for broken files
            raise DatasetError(f"{source}: unreadable image file: {err}") from None
        label_file = (labels_dir / relative).with_suffix(".txt")
        objects = read_yolo_labels(label_file, width, height, len(class_names)) if label_file.is_file() else []
        file_name = f"{split}/{relative.as_posix()}"
        _place_image(source, out / "images" / file_name, link)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            area = obj["bbox"][2] * obj["bbox"][3]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "area": area, "iscrowd": 0, **obj})
    _write_coco(out, split, images, annotations, class_names)
