"""The embedded demo dataset: real handwritten digits pasted on real photos and textures, in COCO format.

Nothing is downloaded. Objects are the 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (10 classes),
backgrounds are random crops of the photos/textures that ship inside scikit-image (``BACKGROUNDS``). Each digit is
cropped to its ink, upscaled to a longer side of 14..56 px (for 128 px images; scaled with ``image_size``) with its
aspect ratio distorted by 0.8..1.25, slightly blurred, and alpha-blended into the background with its intensity as
the alpha mask (so the digit, not a rectangle, is pasted), in a random colour of random polarity and contrast.
The box is the tight box of the digit's visible ink (alpha >= ``INK_ALPHA``); a later digit may cover part of an
earlier one (IoU between boxes <= ``MAX_IOU``). Train and val draw from disjoint digit samples; every annotation
records its source digit as ``digit_index``.

Layout written: ``out/images/{train,val}/NNNNNN.png`` and ``out/annotations/{train,val}.json`` (categories 1..10
named "0".."9"). The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

# skimage.data images that ship with the wheel (verified to load offline); others need a pooch download
BACKGROUNDS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
)  # fmt: skip
MIN_SIZE, MAX_SIZE = 14, 56  # longer side of a digit, in px of a 128 px image
# Max IoU between two boxes of one image. At 0.3, 22% of the val digits were >20% covered by another one and the
# teacher's top-1 stalled at ~90%; at 0.1 objects still overlap but stay readable.
MAX_IOU = 0.1
INK_ALPHA = 0.25  # alpha from which a pixel counts as visible ink (defines the box)
MAX_OBJECTS = 6


@lru_cache(maxsize=1)
def load_backgrounds() -> tuple[np.ndarray, ...]:
    """The background photos/textures as uint8 RGB arrays ``[H, W, 3]``."""
    import skimage.data

    images = []
    for name in BACKGROUNDS:
        array = np.asarray(getattr(skimage.data, name)())
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        images.append(np.ascontiguousarray(array[:, :, :3], dtype=np.uint8))
    return tuple(images)


@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: ``(images float32 [1797, 8, 8] in 0..1, targets int64 [1797])``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random background, resized, flipped and tinted: float32 ``[size, size, 3]``."""
    sources = load_backgrounds()
    source = sources[rng.integers(len(sources))]
    height, width = source.shape[:2]
    side = int(min(height, width) * rng.uniform(0.2, 1.0))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    crop = Image.fromarray(source[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    tint = rng.uniform(0.8, 1.2, size=3).astype(np.float32) * rng.uniform(0.7, 1.2)
    return np.clip(pixels * tint, 0.0, 1.0)


def digit_alpha(digit: np.ndarray, rng: np.random.Generator, longer: int) -> np.ndarray:
    """Alpha mask float32 ``[h, w]`` in 0..1 of one 8x8 digit: cropped to its ink, upscaled, blurred, 1 px margin."""
    rows, cols = np.nonzero(digit >= 0.25)
    digit = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    aspect = digit.shape[1] / digit.shape[0] * rng.uniform(0.8, 1.25)  # width / height
    height, width = (longer, longer * aspect) if aspect <= 1 else (longer / aspect, longer)
    height, width = max(round(height), 4), max(round(width), 4)
    up = np.asarray(Image.fromarray(digit).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    up = gaussian_filter(np.pad(up, 2), sigma=rng.uniform(0.3, 1.2))  # slight blur; the pad keeps the fade-out
    low = rng.uniform(0.05, 0.2)  # intensities below `low` are paper (transparent), above `low + 0.35` full ink
    return np.clip((up - low) / 0.35, 0.0, 1.0) * rng.uniform(0.9, 1.0)


def ink_colour(rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
    """An RGB colour that contrasts with ``patch [h, w, 3]``: random polarity (mostly away from the patch's mean
    lightness), contrast and saturation."""
    mean = float(patch.mean())
    dark = rng.random() < (0.8 if mean > 0.5 else 0.2)
    lightness = mean - rng.uniform(0.4, 0.7) if dark else mean + rng.uniform(0.4, 0.7)
    hue = rng.uniform(0.0, 1.0, size=3)
    colour = np.clip(lightness, 0.0, 1.0) + rng.uniform(0.0, 0.8) * (hue - hue.mean())
    return np.clip(colour, 0.0, 1.0).astype(np.float32)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two xyxy boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def render_image(rng: np.random.Generator, pool: np.ndarray, size: int) -> tuple[np.ndarray, list[dict]]:
    """One image uint8 ``[size, size, 3]`` and its objects ``{"bbox": xywh, "digit_index", "label"}``."""
    digits, targets = load_digit_images()
    pixels = background(rng, size)
    scale = size / 128
    low, high = max(MIN_SIZE * scale, 6), min(MAX_SIZE * scale, size - 6)
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(rng.integers(1, MAX_OBJECTS + 1)):
        index = int(pool[rng.integers(len(pool))])
        alpha = digit_alpha(digits[index], rng, round(float(np.exp(rng.uniform(np.log(low), np.log(high))))))
        rows, cols = np.nonzero(alpha >= INK_ALPHA)
        if len(rows) == 0:
            continue
        h, w = alpha.shape
        for _attempt in range(20):  # find a place whose box overlaps the others little enough
            top, left = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
            box = (left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1)
            if all(box_iou(box, other) <= MAX_IOU for other in boxes):
                break
        else:
            continue  # no room left for this digit
        patch = pixels[top : top + h, left : left + w]  # [h, w, 3] view
        patch += alpha[:, :, None] * (ink_colour(rng, patch) - patch)  # alpha blend in place
        boxes.append(box)
        x1, y1, x2, y2 = (int(v) for v in box)
        objects.append({"bbox": [x1, y1, x2 - x1, y2 - y1], "digit_index": index, "label": int(targets[index])})
    return np.round(pixels * 255).astype(np.uint8), objects


def write_split(out: Path, split: str, rng: np.random.Generator, pool: np.ndarray, count: int, size: int) -> None:
    images_dir = out / "images" / split
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # from an earlier, larger generation
        stale.unlink()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, count + 1):
        pixels, objects = render_image(rng, pool, size)
        file_name = f"{split}/{image_id:06d}.png"
        Image.fromarray(pixels).save(out / "images" / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"] + 1,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "digit_index": obj["digit_index"],
            })  # fmt: skip
    coco = {
        "info": {"description": "cls2det demo: sklearn digits on scikit-image photos/textures", "split": split},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": str(k), "supercategory": "digit"} for k in range(10)],
    }
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / f"{split}.json").write_text(json.dumps(coco, sort_keys=True, indent=1) + "\n")


def generate_demo(
    out: str | Path, *, seed: int = 0, train_images: int = 600, val_images: int = 200, image_size: int = 128
) -> Path:
    """Write the demo dataset to ``out`` (see the module docstring) and return ``out``.

    The 1,797 digits are split by a seeded permutation in proportion to the image counts; each split draws its
    images from its own RNG stream, so train does not change with ``val_images``.
    """
    if train_images < 0 or val_images < 0 or train_images + val_images == 0:
        raise ValueError(f"need a positive number of images, got train={train_images}, val={val_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    out = Path(out)
    digits, _ = load_digit_images()
    order = np.random.default_rng([seed, 0]).permutation(len(digits))
    num_val = round(len(digits) * val_images / (train_images + val_images))
    num_val = min(max(num_val, int(val_images > 0)), len(digits) - int(train_images > 0))  # no split left empty
    pools = {"train": order[num_val:], "val": order[:num_val]}
    counts = {"train": train_images, "val": val_images}
    for stream, split in enumerate(("train", "val"), start=1):
        write_split(out, split, np.random.default_rng([seed, stream]), pools[split], counts[split], image_size)
    return out
