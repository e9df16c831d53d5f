"""D_cls, the classification dataset of the paper (Sec. 3.1): every non-crowd GT box of a split, cropped and resized.

Each box (the box itself, no context around it: the teacher sees box crops during distillation too; the release
crops the box) is clamped to the image, rounded outward to whole pixels, cropped and resized to ``size x size``
(bilinear, antialiased, ``align_corners=False``) and rounded to uint8; every storage mode gives the same uint8 crops.

Storage (``storage=``), for COCO scale (851k crops = 32 GB at 112 px):

* ``"memory"``: all crops in one uint8 tensor, built once (each image decoded once);
* ``"memmap"``: the same tensor in a file under ``cache_dir``, built once (with ``workers`` loader processes) and
  memory-mapped read-only by every worker and rank;
* ``"stream"``: crops cut from the decoded image on access; a batch decodes each of its images once
  (``__getitems__``) and :class:`CropBatchSampler` puts an image's crops in the same batch;
* ``"auto"``: memory when it fits :data:`MEMORY_FRACTION` of the available RAM, else memmap when ``cache_dir`` is
  given and its disk has room, else stream.

A requested mode that cannot fit raises a one-line :class:`DatasetError` before any image is read.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cls2det.data.coco import DetectionSplit, read_pixels
from cls2det.data.validate import DatasetError

STORAGES = ("auto", "memory", "stream", "memmap")
MEMORY_FRACTION = 0.3  # "memory" may take at most this share of MemAvailable


def crop_window(bbox: list[float], width: float, height: float) -> tuple[int, int, int, int]:
    """Integer pixel window ``(left, top, right, bottom)`` (right/bottom exclusive) covering a COCO xywh box.

    The box is clamped to the image and rounded outward; the window is at least 1 px wide and high.
    """
    x, y, w, h = bbox
    x1, x2 = max(x, 0.0), min(x + w, width)
    y1, y2 = max(y, 0.0), min(y + h, height)
    left, top = math.floor(x1), math.floor(y1)
    right, bottom = max(math.ceil(x2), left + 1), max(math.ceil(y2), top + 1)
    return left, top, min(right, int(width)), min(bottom, int(height))


def crop_windows(bboxes: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """:func:`crop_window` for many boxes at once (the same float64 arithmetic). bboxes [K, 4] xywh -> int64 [K, 4]"""
    x, y, w, h = bboxes.T.astype(np.float64)
    widths, heights = widths.astype(np.float64), heights.astype(np.float64)
    x1, x2 = np.maximum(x, 0.0), np.minimum(x + w, widths)
    y1, y2 = np.maximum(y, 0.0), np.minimum(y + h, heights)
    left, top = np.floor(x1), np.floor(y1)
    right, bottom = np.maximum(np.ceil(x2), left + 1), np.maximum(np.ceil(y2), top + 1)
    right, bottom = np.minimum(right, np.trunc(widths)), np.minimum(bottom, np.trunc(heights))
    return np.stack([left, top, right, bottom], axis=1).astype(np.int64)  # [K, 4]


def resize_crop(pixels: Tensor, window: tuple[int, int, int, int], size: int) -> Tensor:
    """Crop ``pixels [3, H, W]`` to ``window`` and resize to ``[3, size, size]`` (bilinear, antialias)."""
    left, top, right, bottom = window
    crop = pixels[None, :, top:bottom, left:right]  # [1, 3, h, w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def crop_uint8(pixels: np.ndarray, window: tuple[int, int, int, int], size: int) -> Tensor:
    """The stored crop: window of ``pixels`` uint8 [H, W, 3], resized in float, rounded to uint8 [3, size, size].

    Only the window is converted to float (cheaper than converting the image, and the same numbers).
    """
    left, top, right, bottom = window
    window_pixels = torch.from_numpy(np.array(pixels[top:bottom, left:right]))  # [h, w, 3] uint8
    crop = window_pixels.permute(2, 0, 1).float().div_(255)  # [3, h, w]
    crop = resize_crop(crop, (0, 0, right - left, bottom - top), size)  # [3, size, size]
    return crop.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def available_memory() -> int:
    """Bytes of RAM available to new allocations (``MemAvailable`` of /proc/meminfo, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ClassificationCrops(torch.utils.data.Dataset):
    """The GT-object crops of a detection split: ``(crop float32 [3, size, size] in 0..1, label in [0, C))``.

    Crops are ordered by image (then annotation id); ``image_index`` [M] holds each crop's image position in the
    split and ``windows`` [M, 4] its pixel window. See the module docstring for ``storage``; ``in_memory`` is the
    former switch (True = "memory", False = "stream"). ``workers`` loader processes build the memory / memmap
    tensor; ``memory_fraction`` bounds "memory" (and "auto") to that share of the available RAM.
    """

    def __init__(
        self,
        split: DetectionSplit,
        *,
        size: int = 112,
        storage: str = "auto",
        in_memory: bool | None = None,
        cache_dir: str | Path | None = None,
        workers: int = 0,
        memory_fraction: float = MEMORY_FRACTION,
    ):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if in_memory is not None:
            storage = "memory" if in_memory else "stream"
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        self.split = split
        self.size = size
        self.class_names = split.class_names
        keep = ~split.is_crowd  # [A] annotation rows -> non-crowd crops, in (image, annotation id) order
        rows_image = np.repeat(np.arange(split.num_images), np.diff(split.ann_start))  # [A]
        self.image_index = rows_image[keep]  # [M] int64
        self.windows = crop_windows(
            split.bboxes[keep], split.widths[self.image_index], split.heights[self.image_index]
        )  # [M, 4] int64 (left, top, right, bottom)
        self._ann_ids = split.ann_ids[keep]  # [M]
        self.labels = torch.from_numpy(split.labels[keep].copy())  # [M] int64
        self.storage = self._choose_storage(storage, cache_dir, memory_fraction) if len(self) else "memory"
        self.cache_file: Path | None = None
        self._memmap: np.ndarray | None = None
        self.crops: Tensor | None = None  # [M, 3, size, size] uint8 ("memory")
        if self.storage == "memory":
            crops = torch.empty(len(self), 3, size, size, dtype=torch.uint8)  # not in self while the workers run
            self._fill(crops.numpy(), workers)
            self.crops = crops
        elif self.storage == "memmap":
            assert cache_dir is not None  # _choose_storage picks memmap only with a cache_dir
            self.cache_file = self._build_memmap(Path(cache_dir), workers)

    @property
    def ann_ids(self) -> list[int]:
        """COCO annotation id of each crop."""
        return self._ann_ids.tolist()

    @property
    def nbytes(self) -> int:
        """Bytes of all crops as uint8."""
        return len(self) * 3 * self.size * self.size

    # ----------------------------------------------------------------------------------------------- storage

    def _choose_storage(self, storage: str, cache_dir: str | Path | None, memory_fraction: float) -> str:
        need, budget = self.nbytes, int(memory_fraction * available_memory())
        gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
        if storage == "memory" and need > budget:
            raise DatasetError(
                f"{self.split.annotation_file}: {len(self)} crops of {self.size} px need {gib(need)} in memory, over "
                f"{memory_fraction:g} of the {gib(available_memory())} available; use storage='stream' or 'memmap'"
            )
        if storage == "memmap":
            if cache_dir is None:
                raise DatasetError(f"{self.split.annotation_file}: storage='memmap' needs a cache_dir")
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(cache_dir).free
            if need > free and not self._cache_path(Path(cache_dir)).is_file():
                raise DatasetError(
                    f"{self.split.annotation_file}: {len(self)} crops of {self.size} px need {gib(need)} on disk, "
                    f"but {cache_dir} has {gib(free)} free; use storage='stream'"
                )
        if storage != "auto":
            return storage
        if need <= budget:
            return "memory"
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            if need <= shutil.disk_usage(cache_dir).free or self._cache_path(Path(cache_dir)).is_file():
                return "memmap"
        return "stream"

    def _cache_path(self, cache_dir: Path) -> Path:
        """A file name that changes with anything the crops depend on (images, windows, size)."""
        digest = hashlib.sha256()
        digest.update(f"{self.split.images_dir.resolve()}|{self.size}|".encode())
        for array in (self.split.file_names.data, self.split.file_names.offsets, self.image_index, self.windows):
            digest.update(np.ascontiguousarray(array).tobytes())
        return cache_dir / f"crops_{self.size}_{len(self)}_{digest.hexdigest()[:16]}.u8"

    def _build_memmap(self, cache_dir: Path, workers: int) -> Path:
        path = self._cache_path(cache_dir)
        if not path.is_file() or path.stat().st_size != self.nbytes:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(self), 3, self.size, self.size))
            self._fill(array, workers)
            array.flush()
            del array
            os.replace(tmp, path)  # atomic: a concurrent rank sees the whole file or none
        return path

    def _fill(self, out: np.ndarray, workers: int) -> None:
        """Write every crop into ``out`` [M, 3, S, S] uint8, each image decoded once, by ``workers`` processes."""
        images = np.unique(self.image_index)
        loader = torch.utils.data.DataLoader(
            _ImageCrops(self, images), batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None
        )
        for first, crops in loader:
            out[first : first + len(crops)] = crops.numpy()

    def _array(self) -> np.ndarray | Tensor | None:
        if self.crops is not None:
            return self.crops
        if self.cache_file is not None:
            if self._memmap is None:  # opened lazily: once per worker process
                self._memmap = np.memmap(self.cache_file, dtype=np.uint8, mode="r").reshape(-1, 3, self.size, self.size)
            return self._memmap
        return None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_memmap"] = None  # a memmap pickles as a copy of its data; workers reopen the file instead
        return state

    # ----------------------------------------------------------------------------------------------- access

    def _read(self, index: int) -> np.ndarray:
        """Decoded image ``index`` of the split, uint8 [H, W, 3]."""
        split = self.split
        return read_pixels(split.image_path(index), split.image_record(index), source=split.annotation_file)

    def crops_of_image(self, index: int, rows: np.ndarray) -> Tensor:
        """Crops ``rows`` (all of image ``index``) from one decode. uint8 [len(rows), 3, S, S]"""
        pixels = self._read(index)
        return torch.stack([crop_uint8(pixels, tuple(self.windows[k].tolist()), self.size) for k in rows])

    def uint8_crops(self, indices: list[int] | np.ndarray) -> Tensor:
        """Crops ``indices`` as uint8 [B, 3, S, S]; streamed, each image among them is decoded once."""
        indices = np.asarray(indices, dtype=np.int64)
        array = self._array()
        if array is not None:
            return torch.as_tensor(np.asarray(array[indices]) if isinstance(array, np.ndarray) else array[indices])
        out = torch.empty(len(indices), 3, self.size, self.size, dtype=torch.uint8)
        images = self.image_index[indices]  # [B]
        for index in np.unique(images):
            where = np.flatnonzero(images == index)
            out[where] = self.crops_of_image(int(index), indices[where])
        return out

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.uint8_crops([i])[0].float().div_(255), int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, int]]:
        """A DataLoader batch: converted to float once, each image decoded once (DataLoader calls this per batch)."""
        crops = self.uint8_crops(indices).float().div_(255)  # [B, 3, S, S]
        return list(zip(crops.unbind(0), self.labels[indices].tolist()))

    def batch_sampler(self, batch_size: int, *, seed: int = 0, drop_last: bool = False) -> CropBatchSampler:
        """The training order that suits the storage: grouped by image when streamed, per crop otherwise."""
        return CropBatchSampler(
            self.image_index, batch_size, seed=seed, drop_last=drop_last, by_image=self.storage == "stream"
        )


class _ImageCrops(torch.utils.data.Dataset):
    """Item ``j`` = ``(first row, uint8 crops [n, 3, S, S])`` of the ``j``-th image that has crops (one decode)."""

    def __init__(self, crops: ClassificationCrops, images: np.ndarray) -> None:
        self.crops, self.images = crops, images
        self.starts = np.searchsorted(crops.image_index, images)  # [n_images]; rows are grouped by image
        self.stops = np.searchsorted(crops.image_index, images, side="right")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, j: int) -> tuple[int, Tensor]:
        start, stop = int(self.starts[j]), int(self.stops[j])
        return start, self.crops.crops_of_image(int(self.images[j]), np.arange(start, stop))


class CropBatchSampler(torch.utils.data.Sampler):
    """Seeded batches of crop indices; the order is a pure function of ``(seed, epoch)`` (:meth:`set_epoch`).

    ``by_image=True`` shuffles the images and keeps each image's crops together, so a streamed batch decodes each
    of its images once (an image cut by a batch boundary is decoded once per batch); ``False`` shuffles crops.
    """

    def __init__(
        self, image_index: np.ndarray, batch_size: int, *, seed: int = 0, drop_last: bool = False, by_image: bool = True
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.image_index = np.asarray(image_index, dtype=np.int64)  # [M], grouped by image
        self.batch_size, self.seed, self.drop_last, self.by_image = batch_size, seed, drop_last, by_image
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The order of ``epoch``, from batch ``skip`` on (a run resumed mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def order(self) -> np.ndarray:
        """This epoch's crop order. int64 [M]"""
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.by_image:
            return rng.permutation(len(self.image_index))
        starts = np.flatnonzero(np.r_[True, self.image_index[1:] != self.image_index[:-1]])
        starts = np.asarray(starts if len(self.image_index) else [], dtype=np.int64)  # [G] first crop of each image
        counts = np.diff(np.r_[starts, len(self.image_index)])  # [G]
        perm = rng.permutation(len(starts))
        lengths = counts[perm]
        offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [M] where each image starts in the order
        return np.arange(lengths.sum()) - offsets + np.repeat(starts[perm], lengths)

    def __len__(self) -> int:
        n = len(self.image_index)
        return (n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for b in range(self.skip, self.skip + len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
