"""D_cls: GT-box crops vs hand-computed crops of synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cls2det.data import ClassificationCrops, load_split
from cls2det.data.crops import crop_window


@pytest.fixture
def patch_split(make_dataset, coco):
    """Image 7 (40x30): black, with a solid colour patch exactly under ann 11's box [2, 3, 10, 8] (xywh)."""
    root = make_dataset(coco)
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[3:11, 2:12] = (200, 50, 100)
    Image.fromarray(pixels).save(root / "images" / "a.png")
    return load_split(root), pixels


def test_labels_and_crowd_excluded(patch_split):
    split, _ = patch_split
    crops = ClassificationCrops(split, size=16)
    # non-crowd boxes in image order: image 3 -> ann 14 (dog, 1); image 7 -> ann 11 (zebra, 2), ann 12 (cat, 0)
    assert crops.ann_ids == [14, 11, 12]
    assert crops.labels.tolist() == [1, 2, 0] and crops.labels.dtype == torch.int64
    assert len(crops) == 3
    crop, label = crops[1]
    assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32 and label == 2


@pytest.mark.parametrize("in_memory", [True, False])
def test_crop_of_colour_patch_is_that_colour(patch_split, in_memory):
    split, _ = patch_split
    crop, _ = ClassificationCrops(split, size=24, in_memory=in_memory)[1]
    expected = torch.tensor([200, 50, 100]).view(3, 1, 1).expand(3, 24, 24) / 255
    torch.testing.assert_close(crop, expected, atol=1e-6, rtol=0)


def test_crop_is_the_box_itself_and_matches_pil_reference(patch_split):
    """[2, 3, 10, 8] -> window [2, 12) x [3, 11), no context around the box; vs PIL's antialiased resize."""
    split, pixels = patch_split
    assert crop_window([2, 3, 10, 8], 40, 30) == (2, 3, 12, 11)
    crop, _ = ClassificationCrops(split, size=12)[1]
    reference = Image.fromarray(pixels).crop((2, 3, 12, 11)).resize((12, 12), Image.BILINEAR)  # antialiased
    reference = torch.from_numpy(np.asarray(reference, np.float32) / 255).permute(2, 0, 1)
    assert (crop - reference).abs().max() <= 2 / 255


def test_crop_of_random_image_matches_naive_reference(make_dataset, coco):
    """Fractional box [2.5, 3.2, 13, 9.1] -> pixel window x [2, 16), y [3, 13) (rounded outward)."""
    coco["annotations"][0]["bbox"] = [2.5, 3.2, 13, 9.1]
    split = load_split(make_dataset(coco))
    pixels = np.asarray(Image.open(split.image_path(split.images[1])).convert("RGB"))
    assert crop_window([2.5, 3.2, 13, 9.1], 40, 30) == (2, 3, 16, 13)
    for in_memory in (True, False):
        crop, _ = ClassificationCrops(split, size=20, in_memory=in_memory)[1]
        window = torch.from_numpy(pixels[3:13, 2:16].astype(np.float32) / 255).permute(2, 0, 1)  # [3, 10, 14]
        reference = torch.nn.functional.interpolate(window[None], size=(20, 20), mode="bilinear", antialias=True)[0]
        torch.testing.assert_close(crop, reference.clamp(0, 1), atol=0.5 / 255 + 1e-6, rtol=0)


def test_crop_window_edges():
    assert crop_window([-5, -2, 50, 40], 40, 30) == (0, 0, 40, 30)  # clamped to the image
    assert crop_window([39.6, 29.7, 0.3, 0.2], 40, 30) == (39, 29, 40, 30)  # at least 1 px, inside the image
    assert crop_window([10.5, 9.5, 4, 2], 40, 30) == (10, 9, 15, 12)  # rounded outward


def test_in_memory_equals_lazy(patch_split):
    split, _ = patch_split
    eager = ClassificationCrops(split, size=16)
    lazy = ClassificationCrops(split, size=16, in_memory=False)
    assert eager.crops is not None and eager.crops.dtype == torch.uint8 and eager.crops.shape == (3, 3, 16, 16)
    assert lazy.crops is None
    for i in range(len(eager)):
        torch.testing.assert_close(eager[i][0], lazy[i][0], atol=0.5 / 255 + 1e-6, rtol=0)


def test_invalid_arguments(patch_split):
    split, _ = patch_split
    with pytest.raises(ValueError, match="size"):
        ClassificationCrops(split, size=0)
