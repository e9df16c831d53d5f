"""D_cls: GT-box crops vs hand-computed crops of synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cls2det.data import ClassificationCrops, load_split
from cls2det.data.crops import CropBatchSampler, crop_window, crop_windows


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


# ----------------------------------------------------------------------------------------------- storage and order


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts the image decodes of ClassificationCrops (read_pixels calls) per image path."""
    import cls2det.data.crops as crops_module

    calls: list[str] = []
    real = crops_module.read_pixels

    def counting(path, image, *, source):
        calls.append(str(path))
        return real(path, image, source=source)

    monkeypatch.setattr(crops_module, "read_pixels", counting)
    return calls


def test_every_storage_gives_the_same_uint8_crops(synth_root, tmp_path):
    split = load_split(synth_root)
    memory = ClassificationCrops(split, size=20, storage="memory")
    stream = ClassificationCrops(split, size=20, storage="stream")
    memmap = ClassificationCrops(split, size=20, storage="memmap", cache_dir=tmp_path, workers=2)
    assert (memory.storage, stream.storage, memmap.storage) == ("memory", "stream", "memmap")
    assert memory.crops.dtype == torch.uint8 and len(memory) > 100
    everything = np.arange(len(memory))
    assert torch.equal(stream.uint8_crops(everything), memory.crops)
    assert torch.equal(memmap.uint8_crops(everything), memory.crops)
    assert memmap.cache_file.stat().st_size == memory.nbytes == len(memory) * 3 * 20 * 20
    for i in (0, 7, len(memory) - 1):  # items: the same float crops and labels
        for other in (stream, memmap):
            assert torch.equal(other[i][0], memory[i][0]) and other[i][1] == memory[i][1]


def test_memmap_is_built_once_and_not_pickled(synth_root, tmp_path, count_decodes):
    import pickle

    split = load_split(synth_root)
    first = ClassificationCrops(split, size=8, storage="memmap", cache_dir=tmp_path)
    assert len(count_decodes) == len(np.unique(first.image_index))  # built with one decode per image
    count_decodes.clear()
    second = ClassificationCrops(split, size=8, storage="memmap", cache_dir=tmp_path)
    assert count_decodes == [] and second.cache_file == first.cache_file
    second[0]  # opens the memmap
    assert len(pickle.dumps(second)) < second.nbytes  # workers reopen the file, the data is not copied
    other_size = ClassificationCrops(split, size=9, storage="memmap", cache_dir=tmp_path)
    assert other_size.cache_file != first.cache_file


def test_streamed_batches_decode_each_image_once(synth_root, count_decodes):
    split = load_split(synth_root)
    crops = ClassificationCrops(split, size=8, storage="stream")
    images_with_crops = len(np.unique(crops.image_index))
    everything = torch.utils.data.DataLoader(crops, batch_sampler=crops.batch_sampler(len(crops), seed=1))
    (batch,) = list(everything)
    assert len(batch[1]) == len(crops) and len(count_decodes) == images_with_crops  # one batch: each image once
    assert len(set(count_decodes)) <= images_with_crops
    count_decodes.clear()
    sampler = crops.batch_sampler(16, seed=1)
    batches = list(sampler)
    list(torch.utils.data.DataLoader(crops, batch_sampler=sampler))
    pairs = sum(len(np.unique(crops.image_index[b])) for b in batches)  # (batch, image) pairs
    assert len(count_decodes) == pairs <= images_with_crops + len(batches) - 1  # only cut images decode twice
    count_decodes.clear()
    crops[3], crops[4]
    assert len(count_decodes) == 2  # one item, one decode


def test_memory_build_decodes_each_image_once(synth_root, count_decodes):
    crops = ClassificationCrops(load_split(synth_root), size=8, storage="memory")
    assert len(count_decodes) == len(set(count_decodes)) == len(np.unique(crops.image_index))


def test_batch_order_is_a_pure_function_of_seed_and_epoch(synth_root):
    crops = ClassificationCrops(load_split(synth_root), size=8, storage="stream")

    def order(seed, epoch, by_image=True):
        sampler = CropBatchSampler(crops.image_index, 16, seed=seed, by_image=by_image)
        sampler.set_epoch(epoch)
        return [i for batch in sampler for i in batch]

    assert order(0, 0) == order(0, 0) and order(0, 3) == order(0, 3)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(5, 2)) == list(range(len(crops)))  # a permutation of the crops
    assert sorted(order(5, 2, by_image=False)) == list(range(len(crops)))
    runs = [crops.image_index[i] for i in order(5, 2)]
    changes = sum(a != b for a, b in zip(runs, runs[1:]))
    assert changes == len(np.unique(crops.image_index)) - 1  # each image's crops are one contiguous run
    sampler = CropBatchSampler(crops.image_index, 16, drop_last=True)
    assert len(sampler) == len(crops) // 16 and all(len(b) == 16 for b in sampler)


def test_storage_that_cannot_fit_is_a_one_line_error_before_any_work(patch_split, tmp_path, monkeypatch, count_decodes):
    import shutil

    from cls2det.data import DatasetError

    split, _ = patch_split
    with pytest.raises(DatasetError, match=r"3 crops of 64 px need .* in memory, over 1e-09 of") as err:
        ClassificationCrops(split, size=64, storage="memory", memory_fraction=1e-9)
    assert "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="needs a cache_dir"):
        ClassificationCrops(split, size=64, storage="memmap")
    assert ClassificationCrops(split, size=64, memory_fraction=1e-9).storage == "stream"  # auto falls back
    auto = ClassificationCrops(split, size=64, memory_fraction=1e-9, cache_dir=tmp_path / "a")
    assert auto.storage == "memmap"
    count_decodes.clear()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(DatasetError, match=r"need .* on disk, but .* has 0.0 GiB free; use storage='stream'"):
        ClassificationCrops(split, size=64, storage="memmap", cache_dir=tmp_path / "b")
    assert count_decodes == []  # nothing was decoded before the error
    with pytest.raises(ValueError, match="storage must be one of"):
        ClassificationCrops(split, storage="gpu")


def test_vectorised_windows_match_crop_window():
    rng = np.random.default_rng(0)
    width, height = rng.integers(1, 200, 500), rng.integers(1, 200, 500)
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    boxes = np.stack([x, y, rng.uniform(0.01, width - x + 1e-3), rng.uniform(0.01, height - y + 1e-3)], axis=1)
    windows = crop_windows(boxes, width, height)
    expected = [crop_window(b.tolist(), float(w), float(h)) for b, w, h in zip(boxes, width, height)]
    assert windows.tolist() == [list(e) for e in expected]
