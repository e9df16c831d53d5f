"""The embedded demo dataset: digits typeset in the fonts matplotlib ships, pasted on real photos, in COCO format.

Nothing is downloaded. Each object is one digit ("0".."9", 10 classes) rendered by FreeType at the pixel size it is
pasted at (no upscaling of a small bitmap), in one of 22 font faces (``FONTS``: DejaVu Sans / Sans Mono / Serif and
STIX in four styles each, six Computer Modern faces, among them cmmi10's old-style figures), then sheared, rotated
and stretched (aspect ratio x 0.6..1.6) and alpha-blended into a crop of a photo or texture that scikit-image ships
(``BACKGROUNDS``) in a colour of random polarity and contrast. The box is the tight box of the digit's visible ink
(alpha >= ``INK_ALPHA``) at the time it is pasted.

What there is to learn (the knobs below):
* recognition: digits that a detector confuses (1/7, 3/8, 5/6/9 across fonts, cmmi10's old-style 3-9 that sit
  below the baseline) and up to ``MAX_CLUTTER`` letters that look like digits (O, l, I, S, Z, B, g, q, b, G, J), drawn
  the same way but not annotated;
* localisation: sizes log-uniform over a 6x range (longer side ``SIZE_RANGE`` of the image side), so COCO's
  small / medium / large area bins are all present (``cls2det data check`` counts them; the docs compare with COCO's
  41 / 34 / 24 %), varied aspect ratios, and partial occlusion: a later object may cover part of an earlier one
  (at most ``MAX_OVERLAP`` of the smaller of two boxes lies inside the other: no digit hides inside another one).

A mirrored digit is not a digit: horizontal flips do not preserve these labels, and the annotations say so
(``info.hflip_preserves_labels: false``, read by :attr:`cls2det.data.DetectionSplit.hflip_preserves_labels`).

Layout written: ``out/images/{train,val}/NNNNNN.png`` and ``out/annotations/{train,val}.json`` (categories 1..10
named "0".."9"; each annotation records ``font``). Train and val come from separate RNG streams; the same seed and
the same Pillow (its bundled FreeType renders the glyphs) give byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# skimage.data images that ship with the wheel (verified to load offline); others need a pooch download
BACKGROUNDS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
)  # fmt: skip
# font files of matplotlib's mpl-data/fonts/ttf that have the ten digits (the STIX size variants, cmex10 and cmsy10
# do not); cmmi10 has old-style figures
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmmi10.ttf",
)  # fmt: skip
CLASSES = tuple("0123456789")
CLUTTER = "OlISZBgqbGJ"  # letters that look like digits: drawn like the digits, never annotated
# longer side of an object's box, as a fraction of the image side (log-uniform): at 256 px 26-154 px, so COCO's
# small / medium / large area bins hold ~24 / 62 / 13 % of the boxes
SIZE_RANGE = (0.1, 0.6)
ASPECT_RANGE = (0.6, 1.6)  # horizontal stretch of a glyph (log-uniform)
MAX_SHEAR, MAX_ROTATION = 0.25, 12.0  # horizontal shear (x per y) and rotation (degrees)
MAX_OBJECTS = 8  # digits tried per image (1..MAX_OBJECTS); those that find no place are dropped
MAX_CLUTTER = 2  # clutter letters per image (0..MAX_CLUTTER)
# Max share of the smaller of two boxes of one image that lies inside the other (intersection over the smaller box):
# objects overlap (a later one covers part of an earlier one) but stay readable, and none sits inside another one
# (an IoU bound lets a small digit sit inside a large one's box).
MAX_OVERLAP = 0.2
INK_ALPHA = 0.25  # alpha from which a pixel counts as visible ink (defines the box)


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


def font_path(name: str) -> Path:
    """Where matplotlib keeps font file ``name`` (one of ``FONTS``)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"font {name} not found in matplotlib's data ({path.parent})")
    return path


@lru_cache(maxsize=4096)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random background, resized, flipped and tinted: float32 ``[size, size, 3]``."""
    sources = load_backgrounds()
    source = sources[rng.integers(len(sources))]
    height, width = source.shape[:2]
    side = int(min(height, width) * rng.uniform(0.2, 1.0))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    crop = Image.fromarray(source[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:  # a mirrored background is still a background
        pixels = pixels[:, ::-1]
    tint = rng.uniform(0.8, 1.2, size=3).astype(np.float32) * rng.uniform(0.7, 1.2)
    return np.clip(pixels * tint, 0.0, 1.0)


def glyph_alpha(
    rng: np.random.Generator, char: str, font: str, longer: int, *, source_px: int | None = None
) -> np.ndarray:
    """Alpha mask float32 ``[h, w]`` in 0..1 of ``char`` in ``font``, rendered so that its ink's longer side is about
    ``longer`` px after a random stretch, shear and rotation; cropped to its ink with a 1 px margin.

    ``source_px``: render the glyph at an em of that many px and upscale it (bicubic) instead of rendering it at its
    final size: the low source resolution of upscaled small bitmaps (a diagnosis knob; None = native)."""
    aspect = float(np.exp(rng.uniform(*np.log(ASPECT_RANGE))))  # width multiplier
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    # a digit's ink is ~0.72 em tall and ~0.55 em wide: choose the em so that the transformed ink is `longer` px
    ink_w, ink_h = 0.55 * aspect + 0.72 * abs(shear), 0.72
    em = max(round(longer / max(ink_w, ink_h)), 6)
    face = _font(font, min(em, source_px) if source_px else em)
    left, top, right, bottom = face.getbbox(char)
    canvas = Image.new("L", (int(right - left) + 4, int(bottom - top) + 4), 0)  # FreeType's bbox: whole pixels
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), char, font=face, fill=255)
    if source_px and em > source_px:
        scale = em / source_px
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)), Image.Resampling.BICUBIC)
    width, height = canvas.size
    new_w, new_h = max(round(width * aspect), 4), height
    # inverse affine (output -> input) of: stretch x by `aspect`, shear x by `shear * y`, about the centre
    side = int(np.ceil(np.hypot(new_w + abs(shear) * new_h, new_h))) + 2
    cx, cy = side / 2, side / 2
    theta = np.deg2rad(angle)
    cos, sin = np.cos(theta), np.sin(theta)
    # output (u, v) -> rotate back -> unshear -> unstretch -> input (x, y)
    a, b = cos / aspect, sin / aspect
    c, d = -sin, cos
    a, b = a - shear * c / aspect, b - shear * d / aspect
    x0 = width / 2 - a * cx - b * cy
    y0 = height / 2 - c * cx - d * cy
    warped = canvas.transform((side, side), Image.Transform.AFFINE, (a, b, x0, c, d, y0), Image.Resampling.BICUBIC)
    alpha = np.asarray(warped, dtype=np.float32) / 255.0
    rows, cols = np.nonzero(alpha >= INK_ALPHA)
    if len(rows) == 0:
        return np.zeros((0, 0), np.float32)
    alpha = alpha[max(rows.min() - 1, 0) : rows.max() + 2, max(cols.min() - 1, 0) : cols.max() + 2]
    return np.clip(alpha, 0.0, 1.0) * rng.uniform(0.85, 1.0)


def ink_colour(rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
    """An RGB colour that contrasts with ``patch [h, w, 3]``: random polarity (mostly away from the patch's mean
    lightness), contrast and saturation."""
    mean = float(patch.mean())
    dark = rng.random() < (0.8 if mean > 0.5 else 0.2)
    lightness = mean - rng.uniform(0.35, 0.7) if dark else mean + rng.uniform(0.35, 0.7)
    hue = rng.uniform(0.0, 1.0, size=3)
    colour = np.clip(lightness, 0.0, 1.0) + rng.uniform(0.0, 0.8) * (hue - hue.mean())
    return np.clip(colour, 0.0, 1.0).astype(np.float32)


def box_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection of two xyxy boxes over the area of the smaller one (1: one box lies inside the other)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def render_image(
    rng: np.random.Generator,
    size: int,
    *,
    object_size: tuple[float, float] = SIZE_RANGE,
    source_px: int | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """One image uint8 ``[size, size, 3]`` and its objects ``{"bbox": xywh, "label", "font"}``; ``object_size``: the
    range of a glyph's longer side, fraction of ``size``; ``source_px``: see :func:`glyph_alpha`."""
    pixels = background(rng, size)
    low, high = max(object_size[0] * size, 8), object_size[1] * size
    digits = [CLASSES[i] for i in rng.integers(len(CLASSES), size=rng.integers(1, MAX_OBJECTS + 1))]
    clutter = [CLUTTER[i] for i in rng.integers(len(CLUTTER), size=rng.integers(0, MAX_CLUTTER + 1))]
    # digits first, the largest first, so that they find a place (the first always does); clutter in what is left
    glyphs = []
    for chars in (digits, clutter):
        sizes = np.sort(np.exp(rng.uniform(np.log(low), np.log(high), size=len(chars))))[::-1]
        glyphs += list(zip(chars, sizes))
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for char, longer in glyphs:
        font = FONTS[rng.integers(len(FONTS))]
        alpha = glyph_alpha(rng, char, font, round(float(longer)), source_px=source_px)
        h, w = alpha.shape
        if h == 0 or h > size or w > size:
            continue
        rows, cols = np.nonzero(alpha >= INK_ALPHA)
        for _attempt in range(20):  # find a place whose box overlaps the others little enough
            top, left = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
            box = (left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1)
            if all(box_overlap(box, other) <= MAX_OVERLAP for other in boxes):
                break
        else:
            continue  # no room left for this glyph
        patch = pixels[top : top + h, left : left + w]  # [h, w, 3] view
        patch += alpha[:, :, None] * (ink_colour(rng, patch) - patch)  # alpha blend in place
        boxes.append(box)
        if char in CLASSES:
            x1, y1, x2, y2 = (int(v) for v in box)
            objects.append({"bbox": [x1, y1, x2 - x1, y2 - y1], "label": CLASSES.index(char), "font": font})
    return np.round(pixels * 255).astype(np.uint8), objects


def write_split(out: Path, split: str, rng: np.random.Generator, count: int, size: int, **render: Any) -> None:
    images_dir = out / "images" / split
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # from an earlier, larger generation
        stale.unlink()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, count + 1):
        pixels, objects = render_image(rng, size, **render)
        file_name = f"{split}/{image_id:06d}.png"
        Image.fromarray(pixels).save(out / "images" / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"] + 1,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "font": obj["font"],
            })  # fmt: skip
    coco = {
        "info": {
            "description": "cls2det demo: digits in matplotlib's fonts on scikit-image photos/textures",
            "split": split,
            "hflip_preserves_labels": False,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "digit"} for k, name in enumerate(CLASSES)],
    }
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / f"{split}.json").write_text(json.dumps(coco, sort_keys=True, indent=1) + "\n")


def generate_demo(
    out: str | Path,
    *,
    seed: int = 0,
    train_images: int = 600,
    val_images: int = 200,
    image_size: int = 256,
    object_size: Sequence[float] = SIZE_RANGE,
    source_px: int | None = None,
) -> Path:
    """Write the demo dataset to ``out`` (see the module docstring) and return ``out``.

    ``object_size``: (min, max) longer side of a glyph's box, fraction of ``image_size``, drawn log-uniformly;
    ``source_px``: render glyphs at that em and upscale them (None: at their final size). Each split draws its images
    from its own RNG stream, so train does not change with ``val_images``.
    """
    if train_images < 0 or val_images < 0 or train_images + val_images == 0:
        raise ValueError(f"need a positive number of images, got train={train_images}, val={val_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] <= 0.95:
        raise ValueError(f"object_size must be (min, max) with 0 < min <= max <= 0.95, got {list(object_size)}")
    if source_px is not None and source_px < 4:
        raise ValueError(f"source_px must be >= 4 or None, got {source_px}")
    out = Path(out)
    counts = {"train": train_images, "val": val_images}
    render = {"object_size": (float(object_size[0]), float(object_size[1])), "source_px": source_px}
    for stream, split in enumerate(("train", "val"), start=1):
        write_split(out, split, np.random.default_rng([seed, stream]), counts[split], image_size, **render)
    return out
