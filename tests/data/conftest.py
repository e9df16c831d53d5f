"""Tiny COCO-format datasets built in tmp_path with PIL, for the data tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, width: int, height: int, *, seed: int = 0, fmt: str = "PNG") -> np.ndarray:
    """Write a random RGB image and return its pixels [H, W, 3] uint8."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def base_coco() -> dict:
    """Two images (one empty), three categories with non-contiguous ids, one crowd box."""
    return {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "sub/b.png", "width": 20, "height": 20},
            {"id": 9, "file_name": "empty.png", "width": 16, "height": 16},
        ],
        "annotations": [
            {"id": 11, "image_id": 7, "category_id": 90, "bbox": [2, 3, 10, 8], "iscrowd": 0, "area": 80},
            {"id": 12, "image_id": 7, "category_id": 5, "bbox": [20, 5, 15, 20], "iscrowd": 0, "area": 300},
            {"id": 13, "image_id": 7, "category_id": 17, "bbox": [0, 0, 40, 30], "iscrowd": 1, "area": 1200},
            {"id": 14, "image_id": 3, "category_id": 17, "bbox": [4, 4, 6, 10], "iscrowd": 0, "area": 60},
        ],
        "categories": [{"id": 90, "name": "zebra"}, {"id": 5, "name": "cat"}, {"id": 17, "name": "dog"}],
    }


def write_dataset(root: Path, coco: dict | str, *, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Write ``coco`` (a dict, or raw text for malformed JSON) as every split, with one image file per record."""
    for split in splits:
        ann_file = root / "annotations" / f"{split}.json"
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        ann_file.write_text(coco if isinstance(coco, str) else json.dumps(coco, indent=1))
        images = coco.get("images", []) if isinstance(coco, dict) else []
        for k, image in enumerate(images if isinstance(images, list) else []):
            if {"file_name", "width", "height"} <= set(image) and min(image["width"], image["height"]) > 0:
                path = root / "images" / image["file_name"]
                if not path.exists():  # broken records (the tests' culprits) get no file
                    write_image(path, image["width"], image["height"], seed=k)
    (root / "images").mkdir(exist_ok=True)
    return root


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``make_dataset(coco=None, splits=("train", "val"))`` -> dataset dir; coco defaults to :func:`base_coco`."""
    counter = iter(range(1000))

    def make(coco: dict | str | None = None, *, splits: tuple[str, ...] = ("train", "val")) -> Path:
        return write_dataset(tmp_path / f"ds{next(counter)}", base_coco() if coco is None else coco, splits=splits)

    return make


@pytest.fixture
def coco() -> dict:
    """A fresh copy of :func:`base_coco` to edit."""
    return base_coco()


@pytest.fixture(name="write_image")
def write_image_fixture() -> Callable[..., np.ndarray]:
    """:func:`write_image`, for test modules (they cannot import conftest portably)."""
    return write_image


@pytest.fixture(scope="session")
def coco_synth():
    """The module ``benchmarks/coco_synth.py`` (the COCO-2017-shaped generator), imported by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "coco_synth.py"
    spec = importlib.util.spec_from_file_location("coco_synth", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synth_root(coco_synth, tmp_path_factory) -> Path:
    """A 20-train / 5-val image COCO-shaped dataset (written once per session; do not modify)."""
    return coco_synth.write_coco_synth(tmp_path_factory.mktemp("coco_synth"), train=20, val=5, seed=3)
