"""Building a teacher cache at scale: workers decode and crop, the teacher runs batched, ranks build shards.

* **Images once, in workers.** A DataLoader (``workers`` processes) reads each image with GT boxes once and crops all
  its boxes there (:func:`~cls2det.distill.crops.crop_boxes`, eq. 8-9); the main process batches the crops of several
  images, adds their flips (when the run flips) and runs the teacher on its device.
* **Shards.** Rank r of ``world`` takes images r, r + world, ... (the DataLoader sampler's split) and writes its rows
  into its own shard file (a cache file of its images). Rank 0 then assembles the shards into ONE preallocated file,
  copying a chunk of rows at a time; every rank works for ~1/world of the build, so the barrier after it waits for
  the slowest shard only (not for a whole single-rank build, which at COCO scale outlives ``dist_timeout_s``).
* **O(batch) memory.** Rows are written in place into preallocated files with ``pwrite``
  (:class:`~cls2det.engine.cache_file.TableFile`: the pages go to the page cache, not into the process's resident
  set, as they would through a writable memory map); no step holds more than one batch of crops and outputs (or one
  copy chunk), whatever the number of boxes. What does grow with the data is the row index (an int64 per image).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cls2det.distill.crops import crop_boxes
from cls2det.engine import cache_file
from cls2det.engine.teacher_cache import TABLE

Outputs = Callable[[Tensor], dict[str, Tensor]]  # crops [n, 3, s, s] -> {table name: [n, ...]}


def box_layout(dataset) -> tuple[np.ndarray, np.ndarray]:
    """([I] int64 image ids, [I] int64 GT box counts) of ``dataset`` in its order; with ``dataset.target(i)``
    (:class:`~cls2det.data.CocoDetection`) no image is decoded."""
    ids, counts = np.zeros(len(dataset), np.int64), np.zeros(len(dataset), np.int64)
    for i in range(len(dataset)):
        target = dataset.target(i) if hasattr(dataset, "target") else dataset[i][1]
        ids[i], counts[i] = int(target["image_id"]), len(target["boxes"])
    return ids, counts


class _GTCrops(torch.utils.data.Dataset):
    """Item j: (j, the GT crops [n, 3, s, s] float32 of image ``indices[j]``), computed in a DataLoader worker."""

    def __init__(self, dataset, indices: Sequence[int] | np.ndarray, size: int) -> None:
        self.dataset, self.indices, self.size = dataset, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, Tensor]:
        image, target = self.dataset[int(self.indices[j])]
        boxes = target["boxes"].to(image.device, torch.float32)  # [n, 4] xyxy px
        index = torch.zeros(len(boxes), dtype=torch.int64, device=image.device)
        return j, crop_boxes(image[None], boxes, index, size=self.size).cpu()  # [n, 3, s, s]


def output_shapes(outputs: Outputs, size: int, device: str | torch.device) -> dict[str, tuple[int, ...]]:
    """{table name: the shape of one crop's output}, from one blank crop."""
    with torch.no_grad():
        out = outputs(torch.zeros(1, 3, size, size, device=device))
    return {name: tuple(value.shape[1:]) for name, value in out.items()}


@torch.no_grad()
def fill_rows(
    write: Callable[[str, int, np.ndarray], None],
    dataset,
    indices: Sequence[int] | np.ndarray,
    first_rows: Sequence[int] | np.ndarray,
    outputs: Outputs,
    *,
    size: int,
    device: str | torch.device,
    workers: int = 0,
    batch_boxes: int = 128,
    progress: Callable[[int], None] | None = None,
    flips: bool = True,
) -> None:
    """``write(name, row, values [n, V, ...] float16)`` the ``outputs`` of the GT crops of image ``indices[j]`` (index
    0 of each row) and, with ``flips`` (V = 2; else V = 1), of their horizontal flips (index 1) as rows
    ``first_rows[j]`` onwards of the tables.

    The images' rows must follow each other (``first_rows[j + 1] = first_rows[j] + boxes of image j``). Crops of
    several images are batched up to ``batch_boxes`` boxes per teacher call (the teacher is in eval mode, so a crop's
    outputs do not depend on its batch). ``progress(boxes)`` is called after each batch."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        _GTCrops(dataset, indices, size),
        batch_size=None,  # one image per item: its crops
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=8 if workers else None,
        generator=torch.Generator(),  # its own: the loader's seed draw leaves the global RNG (the student's init) alone
    )
    pending: list[Tensor] = []
    row = start = int(first_rows[0]) if len(first_rows) else 0

    def flush() -> None:
        nonlocal start
        crops = torch.cat(pending).to(device, non_blocking=True)  # [n, 3, s, s]
        variants = [crops, crops.flip(-1)] if flips else [crops]
        out = outputs(torch.cat(variants))  # each [V·n, ...]
        for name, value in out.items():
            write(name, start, torch.stack(value.chunk(len(variants)), 1).half().cpu().numpy())  # [n, V, ...]
        start += len(crops)
        pending.clear()
        if progress is not None:
            progress(len(crops))

    for j, crops in loader:
        if int(first_rows[j]) != row:
            raise ValueError(f"rows of image {indices[j]} start at {first_rows[j]}, expected {row} (not contiguous)")
        row += len(crops)
        pending.append(crops)
        if row - start >= batch_boxes:
            flush()
    if pending:
        flush()


def shard_path(path: str | Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its shard of the cache file ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.shard{rank}of{world}")


def build_shard(
    path: str | Path,
    dataset,
    outputs: Outputs,
    *,
    size: int,
    key: dict[str, str],
    device: str | torch.device,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    batch_boxes: int = 128,
    progress: bool = False,
    flips: bool = True,
) -> Path:
    """Rank ``rank``'s shard of the cache: images ``rank::world`` of ``dataset``, written to
    :func:`shard_path` (atomically) as a cache file of its own. Returns its path."""
    image_ids, counts = box_layout(dataset)
    mine = np.arange(rank, len(image_ids), world)
    offsets = np.cumsum(counts[mine]) - counts[mine]  # [I_r] first row of each image in the shard
    rows = int(counts[mine].sum())
    specs: dict[str, tuple[Any, tuple[int, ...]]] = {
        "image_ids": (np.int64, (len(mine),)),
        "offsets": (np.int64, (len(mine),)),
    }
    specs |= {
        TABLE + name: (np.float16, (rows, 1 + flips, *shape))
        for name, shape in output_shapes(outputs, size, device).items()
    }
    shard = shard_path(path, rank, world)
    tmp = shard.with_name(shard.name + ".tmp")
    out = cache_file.create(tmp, specs, key)
    out.write("image_ids", 0, image_ids[mine])
    out.write("offsets", 0, offsets)
    has_boxes = counts[mine] > 0  # images without boxes are not even read
    with _bar(progress, rows, f"teacher cache {Path(path).name} ({rank + 1}/{world})") as advance:
        fill_rows(
            lambda name, row, values: out.write(TABLE + name, row, values),
            dataset,
            mine[has_boxes],
            offsets[has_boxes],
            outputs,
            size=size,
            device=device,
            workers=workers,
            batch_boxes=batch_boxes,
            progress=advance,
            flips=flips,
        )
    out.close(sync=True)
    os.replace(tmp, shard)
    return shard


def assemble(path: str | Path, world: int, *, chunk_bytes: int = 64 << 20) -> None:
    """The shards 0..world-1 of :func:`build_shard` -> one cache file at ``path`` (atomically), rows in the dataset's
    image order; the shards are removed. A chunk of at most ``chunk_bytes`` of rows is in RAM at a time."""
    path = Path(path)
    shards = [shard_path(path, rank, world) for rank in range(world)]
    if world == 1:  # the one shard already is the file
        os.replace(shards[0], path)
        return
    parts = [cache_file.TableFile(shard) for shard in shards]
    names = [name for name in parts[0].entries if name.startswith(TABLE)]
    num_images = sum(part.shape("image_ids")[0] for part in parts)
    image_ids, counts = np.zeros(num_images, np.int64), np.zeros(num_images, np.int64)
    shard_offsets = [part.read("offsets", 0, part.shape("offsets")[0]) for part in parts]
    for rank, part in enumerate(parts):  # image i of the dataset is image i // world of shard i % world
        image_ids[rank::world] = part.read("image_ids", 0, part.shape("image_ids")[0])
        counts[rank::world] = np.diff(np.append(shard_offsets[rank], part.shape(names[0])[0]))
    offsets = np.cumsum(counts) - counts
    specs = {"image_ids": (np.int64, (num_images,)), "offsets": (np.int64, (num_images,))}
    specs |= {name: (np.float16, (int(counts.sum()), *parts[0].shape(name)[1:])) for name in names}
    tmp = path.with_name(path.name + ".tmp")
    out = cache_file.create(tmp, specs, parts[0].metadata)
    out.write("image_ids", 0, image_ids)
    out.write("offsets", 0, offsets)
    row_bytes = sum(2 * math.prod(parts[0].shape(name)[1:]) for name in names)  # float16
    for rank, part in enumerate(parts):
        # a chunk of the shard's images at a time: read their rows, write each image's rows where the file wants them
        first, count, dest = shard_offsets[rank], counts[rank::world], offsets[rank::world]
        a = 0
        while a < len(first):
            b = a + 1
            while b < len(first) and (first[b] + count[b] - first[a]) * row_bytes <= chunk_bytes:
                b += 1
            lo, hi = int(first[a]), int(first[b - 1] + count[b - 1])
            for name in names:
                rows = part.read(name, lo, hi)  # [hi - lo, V, ...]
                for j in range(a, b):
                    if count[j]:
                        out.write(name, int(dest[j]), rows[first[j] - lo : first[j] - lo + count[j]])
            a = b
    for part in parts:
        part.close()
    out.close(sync=True)
    os.replace(tmp, path)
    for shard in shards:
        shard.unlink()


def build_cache_file(
    path: str | Path,
    dataset,
    outputs: Outputs,
    *,
    size: int,
    key: dict[str, str],
    device: str | torch.device,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    workers: int = 0,
    batch_boxes: int = 128,
    progress: bool = False,
    flips: bool = True,
) -> None:
    """Every rank of ``world`` calls this: each builds its shard, then rank 0 assembles ``path``. ``barrier``: the
    ranks' barrier (``fabric.barrier``), needed when ``world`` > 1. On return ``path`` is complete on every rank."""
    if world > 1 and barrier is None:
        raise ValueError("a build on several ranks needs their barrier")
    build_shard(
        path,
        dataset,
        outputs,
        size=size,
        key=key,
        device=device,
        rank=rank,
        world=world,
        workers=workers,
        batch_boxes=batch_boxes,
        progress=progress and rank == 0,
        flips=flips,
    )
    if world > 1:
        assert barrier is not None  # checked above
        barrier()  # waits for the slowest shard only: every rank built 1/world of the rows
    if rank == 0:
        assemble(path, world)
    if world > 1:
        assert barrier is not None
        barrier()


def build_in_memory(
    dataset,
    outputs: Outputs,
    *,
    size: int,
    device: str | torch.device,
    workers: int = 0,
    batch_boxes: int = 128,
    progress: bool = False,
    flips: bool = True,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The tables in RAM (small datasets, benchmarks): ({name: [M, V, ...] float16}, [I] image ids, [I] offsets),
    V = 2 with ``flips`` (index 1: the flipped crop), else 1."""
    image_ids, counts = box_layout(dataset)
    offsets = np.cumsum(counts) - counts
    rows = int(counts.sum())
    tables = {
        name: np.zeros((rows, 1 + flips, *shape), np.float16)
        for name, shape in output_shapes(outputs, size, device).items()
    }
    has_boxes = counts > 0
    with _bar(progress, rows, "teacher cache") as advance:
        fill_rows(
            lambda name, row, values: tables[name].__setitem__(slice(row, row + len(values)), values),
            dataset,
            np.flatnonzero(has_boxes),
            offsets[has_boxes],
            outputs,
            size=size,
            device=device,
            workers=workers,
            batch_boxes=batch_boxes,
            progress=advance,
            flips=flips,
        )
    tensors = {name: torch.from_numpy(table) for name, table in tables.items()}
    return tensors, torch.from_numpy(image_ids), torch.from_numpy(offsets)


class _bar:
    """A rich progress bar with ETA over ``total`` boxes (or nothing), called as ``advance(boxes)``."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich import progress

        self.bar = progress.Progress(
            progress.TextColumn("{task.description}"),
            progress.BarColumn(),
            progress.MofNCompleteColumn(),
            progress.TextColumn("boxes"),
            progress.TimeElapsedColumn(),
            progress.TimeRemainingColumn(),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda boxes: self.bar.advance(task, boxes)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
