"""The soft-label cache: its logits are the teacher's on the GT crops, its flipped entries are the teacher's on the
crop of the flipped image at the flipped box, rows are found by (image id, GT index) including after empty images,
and it survives a save / load round trip."""
from __future__ import annotations

import importlib

import pytest
import torch

from cls2det.data import CocoDetection, load_split
from cls2det.distill import crop_boxes_naive
from cls2det.distill.cache import SoftLabelCache, build_soft_label_cache
from cls2det.teacher import load_teacher

hflip_batch = importlib.import_module("cls2det.engine.fit").hflip_batch

FP16 = {"rtol": 2e-3, "atol": 2e-3}  # the cache stores float16 logits (10 bits of mantissa: 4.9e-4 relative)


class ListDataset(torch.utils.data.Dataset):
    """(image [3, H, W] 0..1, {"boxes" [N, 4] xyxy px, "image_id"}) items, ids deliberately not 0..n-1."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def synthetic_items() -> list[tuple[torch.Tensor, dict]]:
    g = torch.Generator().manual_seed(0)
    boxes = [
        [[2.0, 3.0, 30.0, 40.0], [10.5, 0.0, 47.0, 21.25]],
        [],  # an image without boxes: the next image's rows must not shift
        [[0.0, 0.0, 48.0, 40.0], [5.0, 6.0, 12.0, 15.0], [20.0, 20.0, 44.5, 39.0]],
    ]
    items = []
    for image_id, b in zip((7, 3, 9), boxes):
        image = torch.rand(3, 40, 48, generator=g)
        target = {"boxes": torch.tensor(b).reshape(-1, 4), "labels": torch.zeros(len(b), dtype=torch.int64),
                  "image_id": torch.tensor(image_id)}
        items.append((image, target))
    return items


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: on the 2 shared cores, OpenMP threads waiting on each other made these small teacher
    forwards several times slower. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(teacher_run):
    return load_teacher(teacher_run)


def reference_logits(teacher, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """The teacher on one crop, with the naive (replicate the image per box) crop: [C] float32."""
    crop = crop_boxes_naive(image[None], box[None], torch.zeros(1, dtype=torch.int64), size=teacher.input_size)
    with torch.no_grad():
        return teacher(crop)[0].float()


def flipped(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """The training loop's own horizontal flip, forced on."""
    images, targets, flips = hflip_batch([image], [target], torch.Generator().manual_seed(0), p=1.0)
    assert flips.tolist() == [True]
    return images[0], targets[0]


def test_cache_holds_the_teacher_logits_of_every_crop_and_its_flip(teacher):
    items = synthetic_items()
    cache = build_soft_label_cache(teacher, ListDataset(items))
    assert cache.logits.dtype == torch.float16 and cache.logits.shape == (5, 2, len(teacher.class_names))
    for image, target in items:
        image_id = int(target["image_id"])
        flip_image, flip_target = flipped(image, target)
        for k, box in enumerate(target["boxes"]):
            ids, gt = torch.tensor([image_id]), torch.tensor([k])
            plain = cache.lookup(ids, gt, torch.tensor([False]))[0]
            mirror = cache.lookup(ids, gt, torch.tensor([True]))[0]
            torch.testing.assert_close(plain, reference_logits(teacher, image, box), **FP16)
            torch.testing.assert_close(mirror, reference_logits(teacher, flip_image, flip_target["boxes"][k]), **FP16)
            # the flip matters for these random pixels, so the check above could fail
            assert (plain - mirror).abs().max() > 20 * FP16["atol"]


def test_batched_lookup_matches_one_by_one(teacher):
    cache = build_soft_label_cache(teacher, ListDataset(synthetic_items()))
    ids = torch.tensor([9, 7, 9, 7, 9, 9])
    gt = torch.tensor([2, 1, 0, 0, 1, 2])
    flips = torch.tensor([True, False, False, True, True, False])
    batch = cache.lookup(ids, gt, flips)
    assert batch.dtype == torch.float32 and batch.shape == (6, len(teacher.class_names))
    for k in range(6):
        one = cache.lookup(ids[k : k + 1], gt[k : k + 1], flips[k : k + 1])[0]
        assert torch.equal(batch[k], one)
    # rows: image 7 holds rows 0-1, image 3 none, image 9 rows 2-4
    assert torch.equal(batch[0], cache.logits[4, 1].float()) and torch.equal(batch[1], cache.logits[1, 0].float())


def test_cache_over_the_demo_dataset_follows_its_image_ids(teacher, demo_data):
    dataset = CocoDetection(load_split(demo_data, "train"))
    cache = build_soft_label_cache(teacher, dataset)
    assert len(cache.logits) == sum(len(dataset[i][1]["boxes"]) for i in range(len(dataset)))
    for i in (0, 5, len(dataset) - 1):
        image, target = dataset[i]
        flip_image, flip_target = flipped(image, target)
        n = len(target["boxes"])
        ids, gt = target["image_id"].repeat(n), torch.arange(n)
        expected = torch.stack([reference_logits(teacher, image, b) for b in target["boxes"]])
        expected_flip = torch.stack([reference_logits(teacher, flip_image, b) for b in flip_target["boxes"]])
        torch.testing.assert_close(cache.lookup(ids, gt, torch.zeros(n, dtype=torch.bool)), expected, **FP16)
        torch.testing.assert_close(cache.lookup(ids, gt, torch.ones(n, dtype=torch.bool)), expected_flip, **FP16)


def test_save_load_round_trip(teacher, tmp_path):
    cache = build_soft_label_cache(teacher, ListDataset(synthetic_items()))
    path = tmp_path / "soft_labels.safetensors"
    cache.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically, no temp file left
    loaded = SoftLabelCache.load(path)
    assert loaded.logits.dtype == torch.float16 and torch.equal(loaded.logits, cache.logits)
    assert torch.equal(loaded.image_ids, cache.image_ids) and torch.equal(loaded.offsets, cache.offsets)
    assert loaded.row_of == cache.row_of == {7: 0, 3: 2, 9: 2}
    ids, gt, flips = torch.tensor([7, 9, 9]), torch.tensor([1, 0, 2]), torch.tensor([True, False, True])
    assert torch.equal(loaded.lookup(ids, gt, flips), cache.lookup(ids, gt, flips))
