"""Building the teacher caches at scale: the DataLoader build gives the values of the former single-process build,
shards of several ranks assemble into exactly the file of one rank, the file is read memory-mapped, and a cache of
thousands of boxes is looked up right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cls2det.data import CocoDetection, load_split
from cls2det.distill import crop_boxes
from cls2det.engine import cache_file
from cls2det.engine.cache_build import assemble, build_cache_file, build_shard, shard_path
from cls2det.engine.teacher_cache import (
    GTBoxCache,
    SoftLabelCache,
    build_gt_feature_cache,
    build_soft_label_cache,
    gt_feature_outputs,
    soft_label_key,
    soft_label_outputs,
)
from cls2det.teacher import load_teacher

FP16 = {"rtol": 2e-3, "atol": 2e-3}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(teacher_run):
    return load_teacher(teacher_run)


@pytest.fixture(scope="module")
def dataset(demo_data):
    return CocoDetection(load_split(demo_data, "train"))


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@torch.no_grad()
def former_build(compute, dataset, size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The build before the DataLoader / shards (commit 0e4272e's ``_per_gt_box``), the reference: one process,
    every image in turn, crops batched up to 128 boxes, parts concatenated in RAM."""
    parts, pending, image_ids, offsets, row = {}, [], [], [], 0

    def flush():
        crops = torch.cat(pending)
        out = compute(torch.cat([crops, crops.flip(-1)]))
        for name, value in out.items():
            parts.setdefault(name, []).append(torch.stack(value.chunk(2), 1).half())
        pending.clear()

    for i in range(len(dataset)):
        image, target = dataset[i]
        boxes = target["boxes"]
        image_ids.append(int(target["image_id"]))
        offsets.append(row)
        row += len(boxes)
        if len(boxes):
            pending.append(crop_boxes(image[None], boxes, torch.zeros(len(boxes), dtype=torch.int64), size=size))
        if sum(len(c) for c in pending) >= 128:
            flush()
    if pending:
        flush()
    return {name: torch.cat(p) for name, p in parts.items()}, torch.tensor(image_ids), torch.tensor(offsets)


@pytest.mark.parametrize("workers", [0, 2])
def test_file_build_gives_the_former_builds_values(teacher, dataset, tmp_path, workers):
    tables, image_ids, offsets = former_build(soft_label_outputs(teacher), dataset, teacher.input_size)
    path = tmp_path / "soft_labels.safetensors"
    cache = build_soft_label_cache(teacher, dataset, path=path, workers=workers)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no shard or temp file left
    assert torch.equal(cache.image_ids, image_ids) and torch.equal(cache.offsets, offsets)
    assert cache.logits.shape == tables["logits"].shape and cache.logits.dtype == torch.float16
    torch.testing.assert_close(cache.logits.float(), tables["logits"].float(), **FP16)
    assert cache.key == soft_label_key(teacher, dataset)


def test_gt_feature_file_build_gives_the_former_builds_values(teacher, dataset, tmp_path):
    taps, size, pools = ["obj", "l0"], 32, [4, 8]
    cache = build_gt_feature_cache(
        teacher, dataset, taps=taps, size=size, pools=pools, path=tmp_path / "gt.safetensors", workers=1
    )
    memory = build_gt_feature_cache(teacher, dataset, taps=taps, size=size, pools=pools)
    tables, _, _ = former_build(gt_feature_outputs(teacher, taps, pools), dataset, size)
    for tap in taps:
        torch.testing.assert_close(cache.tables[tap].float(), tables[tap].float(), **FP16)
        torch.testing.assert_close(memory.tables[tap].float(), tables[tap].float(), **FP16)


def test_two_shards_assemble_into_the_one_shard_file_exactly(teacher, dataset, tmp_path):
    """Two ranks simulated in turn. ``batch_boxes=1``: each teacher call is one image's crops and their flips in
    both builds, so the outputs are bit for bit the same whatever the batching of the other images."""
    outputs, size, key = soft_label_outputs(teacher), teacher.input_size, {"k": "v"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    build_cache_file(one, dataset, outputs, size=size, key=key, device="cpu", batch_boxes=1)
    shards = [
        build_shard(two, dataset, outputs, size=size, key=key, device="cpu", rank=r, world=2, batch_boxes=1)
        for r in (0, 1)
    ]
    assert shards == [shard_path(two, 0, 2), shard_path(two, 1, 2)]
    rows = [len(load_file(str(s))["table.logits"]) for s in shards]
    assert all(rows) and sum(rows) == len(load_file(str(one))["table.logits"])  # both ranks did part of the work
    assemble(two, 2, chunk_bytes=100)  # a few rows per copy: the chunked copy is exercised
    assert not any(s.exists() for s in shards)
    a, b = load_file(str(one)), load_file(str(two))  # safetensors' own reader accepts the files
    assert set(a) == set(b) == {"image_ids", "offsets", "table.logits"}
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert SoftLabelCache.load(two).key == key


def test_reads_are_memory_mapped(teacher, dataset, tmp_path):
    path = tmp_path / "soft_labels.safetensors"
    build_soft_label_cache(teacher, dataset, path=path)
    cache = SoftLabelCache.load(path)
    mapped = cache.mapped["logits"]
    # the table is a view of a map of the file, not a tensor with storage of its own
    assert isinstance(mapped, np.memmap) and mapped.filename == path.resolve()
    assert cache.logits.data_ptr() == mapped.ctypes.data
    assert cache.logits.untyped_storage().nbytes() == mapped.nbytes
    entries, _, base = cache_file.read_header(path)
    start, end = (base + o for o in entries["table.logits"]["data_offsets"])
    assert mapped.offset <= start and end - start == mapped.nbytes
    # and what the map shows is the file's bytes
    raw = np.frombuffer(path.read_bytes()[start:end], dtype=np.float16).reshape(mapped.shape)
    assert np.array_equal(raw, mapped)
    # a cache moved to a device (here: copied) holds its own tensors
    assert cache.to("cpu").mapped is not None and SoftLabelCache.load(path).to("meta").mapped is None


def crop_means(items, size):
    """The exact per-box value the synthetic cache below stores: each crop's channel means [n, 3], and its flip's."""
    out = []
    for image, target in items:
        n = len(target["boxes"])
        crops = crop_boxes(image[None], target["boxes"], torch.zeros(n, dtype=torch.int64), size=size)
        out.append(torch.stack([crops.mean((2, 3)), crops.flip(-1).mean((2, 3))], 1))  # [n, 2, 3]
    return out


def test_a_cache_of_thousands_of_boxes_is_built_across_ranks_and_looked_up(tmp_path):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(300):  # 0..19 boxes per image, some images empty; image ids not 0..n-1
        n = int(torch.randint(0, 20, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * 20
        boxes = torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * 10], 1)  # [n, 4] inside a 32x32 image
        items.append((torch.rand(3, 32, 32, generator=g), {"boxes": boxes, "image_id": torch.tensor(1000 + 7 * i)}))
    total = sum(len(t["boxes"]) for _, t in items)
    assert total > 2500
    dataset, size = ListDataset(items), 8
    outputs = lambda crops: {"mean": crops.mean((2, 3))}  # noqa: E731 - [n, 3]: the "teacher"
    path = tmp_path / "cache.safetensors"
    for rank in range(3):  # three ranks in turn, then the assembly
        build_shard(path, dataset, outputs, size=size, key={}, device="cpu", rank=rank, world=3, batch_boxes=64)
    assemble(path, 3)
    cache = GTBoxCache.load(path)
    assert cache.tables["mean"].shape == (total, 2, 3)
    expected = crop_means(items, size)
    # every (image, GT box, flip), in a shuffled order, in one lookup
    ids = torch.cat([t["image_id"].repeat(len(t["boxes"])) for _, t in items])
    gt = torch.cat([torch.arange(len(t["boxes"])) for _, t in items])
    ref = torch.cat(expected)  # [total, 2, 3]
    order = torch.randperm(total, generator=g)
    flips = torch.rand(total, generator=g) < 0.5
    got = cache.values("mean", ids[order], gt[order], flips[order])
    torch.testing.assert_close(got, ref[order, flips[order].long()], rtol=1e-3, atol=1e-3)
