"""The embedded demo dataset: determinism, geometry, tight boxes, fonts, clutter, the flip statement, the size mix."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cls2det.data import check_dataset, generate_demo
from cls2det.data import demo as demo_module
from cls2det.data.demo import (
    BACKGROUNDS,
    CLASSES,
    CLUTTER,
    FONTS,
    MAX_OBJECTS,
    MAX_OVERLAP,
    box_overlap,
    glyph_alpha,
    load_backgrounds,
)

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


def test_a_low_source_resolution_blurs_the_glyph():
    native = glyph_alpha(np.random.default_rng(2), "8", "DejaVuSans.ttf", 48)
    upscaled = glyph_alpha(np.random.default_rng(2), "8", "DejaVuSans.ttf", 48, source_px=8)
    assert abs(native.shape[0] - upscaled.shape[0]) <= 8  # about the same size
    # fewer fully inked or fully clear pixels: the 8 px em's ink smeared over the upscaled glyph
    crisp = lambda alpha: float(np.mean((alpha < 0.05) | (alpha > 0.8)))  # noqa: E731
    assert crisp(upscaled) < crisp(native) - 0.1


def test_every_font_renders_every_digit_and_the_fonts_differ():
    rng = np.random.default_rng(0)
    for font in FONTS:
        for char in CLASSES:
            alpha = glyph_alpha(rng, char, font, 40)
            assert alpha.dtype == np.float32 and 20 <= max(alpha.shape) <= 60 and alpha.max() > 0.8, (font, char)
    # the same glyph, same draw of stretch / shear / rotation, in two faces: other pixels
    a = glyph_alpha(np.random.default_rng(1), "4", "DejaVuSans.ttf", 40)
    b = glyph_alpha(np.random.default_rng(1), "4", "cmr10.ttf", 40)
    assert a.shape != b.shape or np.abs(a - b).mean() > 0.05


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
    for split in ("train", "val"):
        coco = json.loads((small_demo / "annotations" / f"{split}.json").read_text())
        assert coco["info"]["hflip_preserves_labels"] is False  # a mirrored digit is not a digit
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        per_image: dict[int, list] = {im["id"]: [] for im in coco["images"]}
        for ann in coco["annotations"]:
            per_image[ann["image_id"]].append(ann)
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 1 and h >= 1
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            assert ann["font"] in FONTS
        for image in coco["images"]:
            assert image["file_name"] == f"{split}/{image['id']:06d}.png"
            assert Image.open(small_demo / "images" / image["file_name"]).size == (64, 64)
            anns = per_image[image["id"]]
            assert 1 <= len(anns) <= MAX_OBJECTS
            boxes = [
                (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) for a in anns
            ]
            assert all(box_overlap(a, b) <= MAX_OVERLAP + 1e-9 for a, b in combinations(boxes, 2))


def test_clutter_letters_are_drawn_but_never_annotated(tmp_path, monkeypatch):
    drawn = []
    real = demo_module.glyph_alpha

    def spy(rng, char, font, longer, **options):
        drawn.append(char)
        return real(rng, char, font, longer, **options)

    monkeypatch.setattr(demo_module, "glyph_alpha", spy)
    root = generate_demo(tmp_path / "d", seed=0, train_images=20, val_images=1, image_size=96)
    annotations = json.loads((root / "annotations" / "train.json").read_text())["annotations"]
    assert any(char in CLUTTER for char in drawn)
    assert {a["category_id"] for a in annotations} <= set(range(1, 11))
    assert len(annotations) <= sum(char in CLASSES for char in drawn)


def test_boxes_are_tight_on_visible_ink(tmp_path, monkeypatch):
    """Grey background and black ink: value = 0.5 * (1 - alpha). Pixels outside every box have alpha < INK_ALPHA;
    every side of every box holds a pixel with alpha >= INK_ALPHA."""
    monkeypatch.setattr(demo_module, "background", lambda rng, size: np.full((size, size, 3), 0.5, np.float32))
    monkeypatch.setattr(demo_module, "ink_colour", lambda rng, patch: np.zeros(3, np.float32))
    monkeypatch.setattr(demo_module, "MAX_CLUTTER", 0)  # unannotated letters are ink outside every box
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
    with pytest.raises(
        ValueError, match=r"object_size must be \(min, max\) with 0 < min <= max <= 0.95, got \[0.5, 0.2\]"
    ):
        generate_demo(tmp_path, object_size=(0.5, 0.2))
    with pytest.raises(ValueError, match="source_px must be >= 4 or None, got 2"):
        generate_demo(tmp_path, source_px=2)


@pytest.mark.slow
def test_default_demo_is_sized_and_spreads_its_objects_over_cocos_size_bins(tmp_path):
    root = generate_demo(tmp_path / "demo")
    summary = check_dataset(root, check_images=False)
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert (train["images"], val["images"]) == (600, 200)
    assert 3 * 600 <= train["annotations"] <= MAX_OBJECTS * 600 and train["empty_images"] == 0
    assert min(train["per_class"].values()) > 0.7 * train["annotations"] / 10  # roughly balanced classes
    coco = json.loads((root / "annotations" / "train.json").read_text())
    mix = {size: count / train["annotations"] for size, count in train["sizes"].items()}  # COCO's area bins
    assert abs(sum(mix.values()) - 1) < 1e-9
    # every COCO area bin holds a real share (COCO train 2017: small 41%, medium 34%, large 24%)
    assert mix["small"] >= 0.2 and mix["medium"] >= 0.3 and mix["large"] >= 0.1, mix
    widths, heights = (np.array([a["bbox"][k] for a in coco["annotations"]], float) for k in (2, 3))
    aspect = widths / heights
    assert np.quantile(aspect, 0.1) < 0.5 and np.quantile(aspect, 0.9) > 0.9  # tall digits and wide ones
