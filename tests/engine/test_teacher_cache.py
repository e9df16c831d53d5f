"""The teacher caches. Soft labels: the logits are the teacher's on the GT crops, the flipped entries the teacher's on
the crop of the flipped image at the flipped box, rows are found by (image id, GT index) including after empty
images, and the cache survives a save / load round trip. GT features: KD_loc with the cached GT branch equals the
online loss and its box gradients on flipped and unflipped images; a cache built with other settings is stale."""

from __future__ import annotations

import dataclasses
import importlib
import shutil

import pytest
import torch
from safetensors.torch import save_file

from cls2det.data import CocoDetection, generate_demo, load_split
from cls2det.distill import crop_boxes_naive, kd_loc_loss
from cls2det.engine.run_dir import SOFT_LABELS
from cls2det.engine.teacher_cache import (
    GTFeatureCache,
    SoftLabelCache,
    StaleCacheError,
    build_gt_feature_cache,
    build_soft_label_cache,
    dataset_fingerprint,
    gt_feature_key,
    read_key,
    soft_label_key,
    teacher_fingerprint,
)
from cls2det.teacher import load_teacher, save_teacher

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
        target = {
            "boxes": torch.tensor(b).reshape(-1, 4),
            "labels": torch.zeros(len(b), dtype=torch.int64),
            "image_id": torch.tensor(image_id),
        }
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


# ----------------------------------------------------------------------------------------------- KD_loc's GT branch
TAPS, SIZE, POOL = ["obj", "l0", "l1"], 32, 4
POOLS = [POOL] * len(TAPS)


def mixed_flip_batch(items):
    """Images 7 (flipped by the training loop's own flip) and 9 (as is), both 40x48, as one batch; each GT box gets a
    predicted box a few pixels off (so that the L1 terms of eq. 10 are far from their kinks)."""
    (image_a, target_a), (image_b, target_b) = flipped(*items[0]), items[2]
    pixels = torch.stack([image_a, image_b])  # [2, 3, 40, 48]
    gt_boxes = torch.cat([target_a["boxes"], target_b["boxes"]])  # [5, 4]
    g = torch.Generator().manual_seed(1)
    pred_boxes = (gt_boxes + (torch.rand(5, 4, generator=g) * 6 - 3)).clamp(min=0)
    pred_boxes = torch.minimum(pred_boxes, torch.tensor([48.0, 40.0, 48.0, 40.0]))
    index = torch.tensor([0, 0, 1, 1, 1])
    ids, gt_index = torch.tensor([7, 7, 9, 9, 9]), torch.tensor([0, 1, 0, 1, 2])
    return pixels, pred_boxes, gt_boxes, index, (ids, gt_index, torch.tensor([True, True, False, False, False]))


def counting_taps(teacher, taps):
    calls = []

    def features(crops):
        calls.append(len(crops))
        return teacher.forward_taps(crops, taps)

    return features, calls


def test_gt_feature_cache_gives_the_online_kd_loc_loss_and_box_gradients(teacher):
    """Cached GT branch vs the online one, on a batch with a flipped and an unflipped image: same loss and same
    gradients w.r.t. the predicted boxes within float16 tolerance; the teacher then runs on the predicted crops only."""
    items = synthetic_items()
    cache = build_gt_feature_cache(teacher, ListDataset(items), taps=TAPS, size=SIZE, pools=POOLS)
    assert cache.taps == TAPS and cache.key == gt_feature_key(teacher, ListDataset(items), TAPS, SIZE, POOLS)
    assert [cache.tables[t].shape for t in TAPS] == [
        (5, 2, 3, POOL, POOL),
        (5, 2, 64, POOL, POOL),
        (5, 2, 64, POOL, POOL),
    ]
    assert all(cache.tables[t].dtype == torch.float16 for t in TAPS)
    pixels, pred_boxes, gt_boxes, index, rows = mixed_flip_batch(items)

    def loss_and_grad(gt_features):
        features, calls = counting_taps(teacher, TAPS)
        boxes = pred_boxes.clone().requires_grad_()
        loss = kd_loc_loss(
            features, pixels, boxes, gt_boxes, index, size=SIZE, pools=[POOL] * 3, gt_features=gt_features
        )
        return loss, torch.autograd.grad(loss, boxes)[0], calls

    online, online_grad, online_calls = loss_and_grad(None)
    cached, cached_grad, cached_calls = loss_and_grad(cache.lookup(*rows))
    assert online_calls == [5, 5] and cached_calls == [5]  # predicted + GT crops vs predicted crops only
    torch.testing.assert_close(cached, online, rtol=1e-3, atol=0)
    assert online_grad.abs().min() > 0  # every coordinate moves the loss, so the comparison below is not vacuous
    torch.testing.assert_close(cached_grad, online_grad, rtol=1e-2, atol=5e-3 * online_grad.abs().max().item())
    # the flipped / unflipped entries are not interchangeable: the wrong ones are far off
    ids, gt_index, flips = rows
    swapped, _, _ = loss_and_grad(cache.lookup(ids, gt_index, ~flips))
    assert (swapped - online).abs() > 50 * 1e-3 * online


def test_gt_features_of_the_wrong_shape_are_refused(teacher):
    pixels, pred_boxes, gt_boxes, index, _ = mixed_flip_batch(synthetic_items())
    features, _ = counting_taps(teacher, ["obj"])
    with pytest.raises(
        ValueError,
        match=r"gt_features must be 1 tensors of shapes \[\[5, 3, 4, 4\]\].*"
        r"got \[\[5, 3, 8, 8\]\]",
    ):
        kd_loc_loss(
            features, pixels, pred_boxes, gt_boxes, index, size=SIZE, pools=[4], gt_features=[torch.zeros(5, 3, 8, 8)]
        )


def test_gt_feature_cache_round_trip_and_stale_key(teacher, tmp_path):
    dataset = ListDataset(synthetic_items())
    cache = build_gt_feature_cache(teacher, dataset, taps=TAPS, size=SIZE, pools=POOLS)
    path = tmp_path / "gt_features.safetensors"
    cache.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert read_key(path) == {
        "teacher": "resnet18",
        "teacher_sha256": teacher_fingerprint(teacher),
        "data": dataset_fingerprint(dataset),
        "taps": "obj,l0,l1",
        "sample_size": "32",
        "pools": "4,4,4",
        "hflip": "true",  # built with the flipped crops' rows
    }
    loaded = GTFeatureCache.load(path, key=cache.key)
    assert loaded.taps == TAPS and all(torch.equal(loaded.tables[t], cache.tables[t]) for t in TAPS)
    ids, gt, flips = torch.tensor([9, 7]), torch.tensor([2, 0]), torch.tensor([False, True])
    assert all(torch.equal(a, b) for a, b in zip(loaded.lookup(ids, gt, flips), cache.lookup(ids, gt, flips)))
    # another pool size or tap list: the file is stale, and the error names what differs
    with pytest.raises(StaleCacheError, match=r"pools='4,4,4' \(asked '4,8,16'\)$"):
        GTFeatureCache.load(path, key=gt_feature_key(teacher, dataset, TAPS, SIZE, [4, 8, 16]))
    with pytest.raises(StaleCacheError, match=r"taps='obj,l0,l1' \(asked 'obj,l0'\)$"):
        GTFeatureCache.load(path, key=gt_feature_key(teacher, dataset, ["obj", "l0"], SIZE, [POOL, POOL]))
    # a soft-label cache of the old format (no key) is stale for any key
    save_file({"logits": torch.zeros(2, 2, 10, dtype=torch.float16)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(StaleCacheError, match="input_size=None"):
        SoftLabelCache.load(tmp_path / "old.safetensors", key=soft_label_key(teacher, dataset))


def test_empty_dataset_gives_empty_tables_of_the_right_shape(teacher):
    image, target = synthetic_items()[1]  # the image without boxes
    cache = build_gt_feature_cache(teacher, ListDataset([(image, target)]), taps=TAPS, size=SIZE, pools=POOLS)
    assert [cache.tables[t].shape for t in TAPS] == [(0, 2, 3, 4, 4), (0, 2, 64, 4, 4), (0, 2, 64, 4, 4)]
    assert [
        f.shape
        for f in cache.lookup(
            torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.bool)
        )
    ] == [(0, 3, 4, 4), (0, 64, 4, 4), (0, 64, 4, 4)]


# ----------------------------------------------------------------------------------------------- stale keys (#18.1)


@pytest.fixture(scope="module")
def other_teacher_run(teacher_run, tmp_path_factory):
    """The session's teacher with other weights (same architecture, classes and input size): its stem conv scaled."""
    teacher = load_teacher(teacher_run)
    with torch.no_grad():
        teacher.net.conv1.weight.mul_(1.5)
    return save_teacher(teacher, tmp_path_factory.mktemp("other_teacher"), {})


@pytest.fixture(scope="module")
def other_demo_data(tmp_path_factory):
    """Another demo dataset with the same classes (another seed: other images and boxes)."""
    return generate_demo(tmp_path_factory.mktemp("other") / "data", seed=1, train_images=8, val_images=4, image_size=96)


def test_fingerprints_follow_the_weights_and_the_data(teacher, teacher_run, other_teacher_run, demo_data):
    assert teacher_fingerprint(load_teacher(teacher_run)) == teacher_fingerprint(teacher)
    assert teacher_fingerprint(load_teacher(teacher_run).to(memory_format=torch.channels_last)) == (
        teacher_fingerprint(teacher)
    )
    assert teacher_fingerprint(load_teacher(other_teacher_run)) != teacher_fingerprint(teacher)
    dataset = CocoDetection(load_split(demo_data, "train"))
    assert dataset_fingerprint(dataset).startswith("annotations:")
    assert dataset_fingerprint(CocoDetection(load_split(demo_data, "train"))) == dataset_fingerprint(dataset)
    assert dataset_fingerprint(CocoDetection(load_split(demo_data, "val"))) != dataset_fingerprint(dataset)
    items = synthetic_items()
    moved = synthetic_items()
    moved[2][1]["boxes"][1, 0] += 0.5  # one coordinate of one box
    assert dataset_fingerprint(ListDataset(items)).startswith("boxes:")
    assert dataset_fingerprint(ListDataset(moved)) != dataset_fingerprint(ListDataset(items))
    assert dataset_fingerprint(ListDataset(synthetic_items())) == dataset_fingerprint(ListDataset(items))


def test_resume_rebuilds_the_soft_labels_for_other_weights_or_data_and_reuses_them_otherwise(
    make_train_config, teacher_run, demo_data, other_teacher_run, other_demo_data, tmp_path, monkeypatch, capsys
):
    """The run folder's soft labels: reused (file untouched) when nothing changed; rebuilt when the run resumes after
    its teacher run was retrained in place (same folder, same architecture, other weights: what --resume's recipe
    check cannot see), or after its dataset's annotations were replaced."""
    fit_module = importlib.import_module("cls2det.engine.fit")
    builds = []
    caches = importlib.import_module("cls2det.engine.run_caches")
    real = caches.build_soft_label_cache

    def counting(teacher, dataset, **kwargs):
        builds.append(teacher_fingerprint(teacher))
        return real(teacher, dataset, **kwargs)

    monkeypatch.setattr(caches, "build_soft_label_cache", counting)
    out, teacher, data = tmp_path / "run", tmp_path / "teacher", tmp_path / "data"
    shutil.copytree(teacher_run, teacher)
    shutil.copytree(demo_data, data)

    def run(max_steps):
        config = make_train_config(out, "ssdlite320_mobilenet_v3", ["distill.kd=[cls]", f"max_steps={max_steps}"])
        config = dataclasses.replace(config, teacher=str(teacher), data=str(data))
        fit_module.fit(config, resume=max_steps > 1, progress=False)
        return read_key(out / SOFT_LABELS)

    first = run(1)
    assert len(builds) == 1
    stat = (out / SOFT_LABELS).stat()
    capsys.readouterr()
    assert run(2) == first and len(builds) == 1  # same teacher, same data: reused, the file not even rewritten
    after = (out / SOFT_LABELS).stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    for name in ("teacher.safetensors", "teacher.json"):  # the teacher retrained into its own folder
        shutil.copy(other_teacher_run / name, teacher / name)
    other = run(3)
    assert len(builds) == 2 and builds[1] != builds[0]
    assert other["teacher"] == first["teacher"] and other["teacher_sha256"] != first["teacher_sha256"]
    assert "soft_labels.safetensors was computed with" in capsys.readouterr().out
    # the file now holds the other teacher's logits
    new_teacher = load_teacher(other_teacher_run)
    dataset = CocoDetection(load_split(data, "train"))
    image, target = dataset[0]
    cache = SoftLabelCache.load(out / SOFT_LABELS, key=other)
    got = cache.lookup(target["image_id"].view(1), torch.tensor([0]), torch.tensor([False]))[0]
    torch.testing.assert_close(got, reference_logits(new_teacher, image, target["boxes"][0]), **FP16)

    shutil.rmtree(data)  # the dataset's files replaced by another one's (same classes, other images and boxes)
    shutil.copytree(other_demo_data, data)
    moved = run(4)
    assert len(builds) == 3 and moved["data"] != other["data"] and moved["teacher_sha256"] == other["teacher_sha256"]
    assert "soft_labels.safetensors was computed with" in capsys.readouterr().out
