"""A synthetic dataset shaped like COCO 2017 detection, for scale tests of the data side (issue #17).

Writes ``OUT/annotations/{train,val}.json`` and ``OUT/images/{train2017,val2017}/<id>.jpg`` in cls2det's dataset
layout, with COCO 2017's statistics:

* 118,287 train / 5,000 val images (``--train`` / ``--val``), 480-640 px on each side (a few fixed sizes);
* the 80 categories with COCO's names and non-contiguous ids (1..90 with 10 gaps), image ids non-contiguous;
* ~7.3 boxes per image (Poisson, ~1% of images empty), sizes spread like COCO's: ~41% small (< 32^2),
  ~34% medium, ~25% large (> 96^2), aspect ratios log-uniform in [1/3, 3];
* every box with a polygon ``segmentation`` (an ellipse of ~30 vertices, as heavy as COCO's), ~1% crowd boxes with
  an uncompressed RLE ``segmentation`` and ``iscrowd=1``; ``area`` of the ellipse (not of the box, as in COCO).

Image files are **hard links** to a handful of real JPEGs written once per size (smooth noise, ~100 KB), so the
full set costs almost no disk; each record's width/height is that of the JPEG it links to.

    python benchmarks/coco_synth.py /work/coco_synth              # full COCO counts (~1 min, ~0.5 GB JSON)
    python benchmarks/coco_synth.py /tmp/tiny --train 20 --val 5  # a tiny one (tests)

Importable: ``from coco_synth import write_coco_synth`` (or load the file by path).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass "
    "cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink "
    "refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()
_MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_CAT_IDS = [i for i in range(1, 91) if i not in _MISSING_IDS]  # 80 ids, as COCO 2017
COCO_COUNTS = {"train": 118_287, "val": 5_000}
BOXES_PER_IMAGE = 7.27  # 860,001 / 118,287
SIZE_MIX = (0.41, 0.34, 0.25)  # small / medium / large share of boxes
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (640, 512), (500, 640), (612, 612), (640, 360), (560, 640))
CROWD_FRACTION = 0.01
POLYGON_VERTICES = 30


def write_template_jpegs(folder: Path, seed: int) -> dict[tuple[int, int], Path]:
    """One real JPEG per size in :data:`IMAGE_SIZES` (smooth colour noise with edges); returns size -> path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for width, height in IMAGE_SIZES:
        coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        detail = rng.integers(-24, 25, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, np.int16) + detail, 0, 255).astype(np.uint8)
        path = folder / f"template_{width}x{height}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        out[(width, height)] = path
    return out


def _boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """``n`` xywh boxes inside a ``width x height`` image with COCO's small/medium/large mix. [n, 4] float64"""
    bucket = rng.choice(3, size=n, p=SIZE_MIX)
    lo = np.array([4.0**2, 32.0**2, 96.0**2])[bucket]
    hi = np.array([32.0**2, 96.0**2, 0.8 * width * height])[bucket]
    area = np.exp(rng.uniform(np.log(lo), np.log(hi)))
    ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3), size=n))  # w / h
    w = np.minimum(np.sqrt(area * ratio), width - 1.0)
    h = np.minimum(np.sqrt(area / ratio), height - 1.0)
    x = rng.uniform(0, width - w)
    y = rng.uniform(0, height - h)
    return np.round(np.stack([x, y, w, h], axis=1), 2)


def _polygon(rng: np.random.Generator, box: np.ndarray) -> list[list[float]]:
    """An ellipse inscribed in an xywh box, ~30 jittered vertices: COCO's polygon format ``[[x1, y1, x2, ...]]``."""
    x, y, w, h = box
    k = POLYGON_VERTICES + int(rng.integers(-8, 9))
    t = np.sort(rng.uniform(0, 2 * np.pi, size=k))
    r = rng.uniform(0.85, 1.0, size=k)
    xs = x + w / 2 + r * np.cos(t) * w / 2
    ys = y + h / 2 + r * np.sin(t) * h / 2
    return [np.round(np.stack([xs, ys], axis=1).reshape(-1), 2).tolist()]


def _rle(box: np.ndarray, width: int, height: int) -> dict:
    """Uncompressed RLE (column-major, as COCO's crowd annotations) of the box's pixels."""
    x1, y1 = int(box[0]), int(box[1])
    x2, y2 = min(int(np.ceil(box[0] + box[2])), width), min(int(np.ceil(box[1] + box[3])), height)
    counts, position = [], 0
    for column in range(x1, x2):
        start = column * height + y1
        counts += [start - position, y2 - y1]
        position = start + y2 - y1
    counts.append(width * height - position)
    return {"counts": counts, "size": [height, width]}


def make_split(
    name: str, num_images: int, rng: np.random.Generator, *, first_ann_id: int, templates: dict
) -> tuple[dict, list[tuple[str, tuple[int, int]]]]:
    """A COCO dict for one split and the (file_name, size) of each image."""
    ids = np.sort(rng.choice(np.arange(1, max(10 * num_images, 100)), size=num_images, replace=False))
    sizes = list(templates)
    size_index = rng.integers(0, len(sizes), size=num_images)
    counts = rng.poisson(BOXES_PER_IMAGE, size=num_images)
    images, annotations, files = [], [], []
    ann_id = first_ann_id
    for image_id, s, n in zip(ids.tolist(), size_index.tolist(), counts.tolist()):
        width, height = sizes[s]
        file_name = f"{name}2017/{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1})
        files.append((file_name, (width, height)))
        boxes = _boxes(rng, n, width, height)
        labels = rng.integers(0, len(COCO_CAT_IDS), size=n)
        crowd = rng.random(n) < CROWD_FRACTION
        for box, label, is_crowd in zip(boxes, labels.tolist(), crowd.tolist()):
            segmentation = _rle(box, width, height) if is_crowd else _polygon(rng, box)
            area = float(box[2] * box[3]) if is_crowd else float(np.pi / 4 * box[2] * box[3] * 0.9)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": COCO_CAT_IDS[label],
                    "bbox": box.tolist(),
                    "area": round(area, 2),
                    "iscrowd": int(is_crowd),
                    "segmentation": segmentation,
                }
            )
            ann_id += 1
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in zip(COCO_CAT_IDS, COCO_NAMES)]
    info = {"description": "cls2det synthetic COCO-2017-shaped dataset", "version": "1.0"}
    licenses = [{"id": 1, "name": "synthetic", "url": ""}]
    coco = {"info": info, "licenses": licenses, "images": images, "annotations": annotations, "categories": categories}
    return coco, files


def write_coco_synth(
    out: str | Path, *, train: int = COCO_COUNTS["train"], val: int = COCO_COUNTS["val"], seed: int = 0
) -> Path:
    """Write the synthetic COCO-shaped dataset to ``out`` (see the module docstring); returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    templates = write_template_jpegs(out / "templates", seed)
    first_ann_id = 1
    for name, num_images in (("train", train), ("val", val)):
        coco, files = make_split(name, num_images, rng, first_ann_id=first_ann_id, templates=templates)
        first_ann_id += len(coco["annotations"]) + 1_000_000
        ann_file = out / "annotations" / f"{name}.json"
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        ann_file.write_text(json.dumps(coco, separators=(",", ":")), encoding="utf-8")
        del coco
        folder = out / "images" / f"{name}2017"
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, size in files:
            target = out / "images" / file_name
            if target.exists():
                target.unlink()
            os.link(templates[size], target)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output dataset folder")
    parser.add_argument("--train", type=int, default=COCO_COUNTS["train"], help="train images (default: COCO's)")
    parser.add_argument("--val", type=int, default=COCO_COUNTS["val"], help="val images (default: COCO's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = write_coco_synth(args.out, train=args.train, val=args.val, seed=args.seed)
    for name in ("train", "val"):
        size = (out / "annotations" / f"{name}.json").stat().st_size
        print(f"{out}/annotations/{name}.json: {size / 2**20:.1f} MiB")
    print(f"written in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
