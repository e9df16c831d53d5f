"""The embedded demo dataset: determinism, geometry, tight boxes, disjoint digit samples, speed."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cls2det.data import check_dataset, generate_demo
from cls2det.data import demo as demo_module
from cls2det.data.demo import BACKGROUNDS, MAX_IOU, box_iou, load_backgrounds, load_digit_images

SMALL = {"train_images": 10, "val_images": 5, "image_size": 64}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "d", seed=0, **SMALL)


def test_backgrounds_load_offline():
    backgrounds = load_backgrounds()
    assert len(backgrounds) == len(BACKGROUNDS) >= 10
    for array in backgrounds:
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3 and min(array.shape[:2]) >= 256


def test_same_seed_byte_identical_different_seed_differs(small_demo, tmp_path):
    again = generate_demo(tmp_path / "again", seed=0, **SMALL)
    other = generate_demo(tmp_path / "other", seed=1, **SMALL)
    reference = files(small_demo)
    assert len(reference) == 10 + 5 + 2
    assert files(again) == reference
    different = files(other)
    assert different.keys() == reference.keys()
    assert different["annotations/train.json"] != reference["annotations/train.json"]
    assert sum(different[k] != reference[k] for k in reference if k.endswith(".png")) >= 14


def test_layout_and_annotations_are_valid(small_demo):
    summary = check_dataset(small_demo)  # decodes every image and checks sizes, boxes, ids
    assert summary["class_names"] == [str(k) for k in range(10)]
    assert summary["splits"]["train"]["images"] == 10 and summary["splits"]["val"]["images"] == 5
    _, targets = load_digit_images()
    for split in ("train", "val"):
        coco = json.loads((small_demo / "annotations" / f"{split}.json").read_text())
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        per_image: dict[int, list] = {im["id"]: [] for im in coco["images"]}
        for ann in coco["annotations"]:
            per_image[ann["image_id"]].append(ann)
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 1 and h >= 1
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            assert ann["category_id"] - 1 == targets[ann["digit_index"]]  # label = the pasted digit's class
        for image in coco["images"]:
            assert image["file_name"] == f"{split}/{image['id']:06d}.png"
            assert Image.open(small_demo / "images" / image["file_name"]).size == (64, 64)
            anns = per_image[image["id"]]
            assert 1 <= len(anns) <= 6
            boxes = [
                (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) for a in anns
            ]
            assert all(box_iou(a, b) <= MAX_IOU + 1e-9 for a, b in combinations(boxes, 2))


def test_train_and_val_use_disjoint_digit_samples(small_demo):
    used = {
        split: {
            a["digit_index"]
            for a in json.loads((small_demo / "annotations" / f"{split}.json").read_text())["annotations"]
        }
        for split in ("train", "val")
    }
    assert used["train"] and used["val"] and not used["train"] & used["val"]


def test_boxes_are_tight_on_visible_ink(tmp_path, monkeypatch):
    """Grey background and black ink: value = 0.5 * (1 - alpha). Pixels outside every box have alpha < INK_ALPHA;
    every side of every box holds a pixel with alpha >= INK_ALPHA."""
    monkeypatch.setattr(demo_module, "background", lambda rng, size: np.full((size, size, 3), 0.5, np.float32))
    monkeypatch.setattr(demo_module, "ink_colour", lambda rng, patch: np.zeros(3, np.float32))
    root = generate_demo(tmp_path / "grey", seed=3, train_images=8, val_images=2, image_size=96)
    coco = json.loads((root / "annotations" / "train.json").read_text())
    threshold = 0.5 * (1 - demo_module.INK_ALPHA) * 255  # the value of a pixel at alpha = INK_ALPHA
    for image in coco["images"]:
        value = np.asarray(Image.open(root / "images" / image["file_name"]))[:, :, 0].astype(np.float64)  # [H, W]
        ink = value < threshold + 0.5  # alpha >= INK_ALPHA up to the uint8 rounding
        outside = value < threshold - 0.5  # surely alpha > INK_ALPHA
        for ann in coco["annotations"]:
            if ann["image_id"] != image["id"]:
                continue
            x, y, w, h = ann["bbox"]
            box = ink[y : y + h, x : x + w]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            outside[y : y + h, x : x + w] = False
        assert not outside.any()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="positive number of images"):
        generate_demo(tmp_path, train_images=0, val_images=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_demo(tmp_path, image_size=16)


@pytest.mark.slow
def test_default_demo_is_sized(tmp_path):
    root = generate_demo(tmp_path / "demo")
    summary = check_dataset(root, check_images=False)
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert (train["images"], val["images"]) == (600, 200)
    assert 1.0 * 600 <= train["annotations"] <= 6 * 600 and train["empty_images"] == 0
    assert min(train["per_class"].values()) > 0.5 * train["annotations"] / 10  # roughly balanced classes
    assert train["sizes"]["small"] > 0 and train["sizes"]["medium"] > 0
