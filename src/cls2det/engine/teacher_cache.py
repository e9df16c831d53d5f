"""Per-GT-box caches of the frozen teacher: what it computes on the GT crops, computed once instead of every step.

The teacher is frozen and GT boxes are fixed, so its outputs on a GT crop depend only on (image, GT box, flip):

* :class:`SoftLabelCache`: KD_cls's teacher logits on the GT crop at the teacher's input size (eq. 1-7);
* :class:`GTFeatureCache`: KD_loc's GT branch (eq. 10), the teacher's tap features of the GT crop at the sample size
  ``s``, average-pooled to ``P x P`` per tap. The predicted-box branch needs gradients through the crop and stays
  online.

A horizontally flipped crop is exactly the flip of the unflipped crop (the sampling grid of eq. 8-9 is symmetric),
so both variants come from one crop; the teacher runs on each (a conv stem is not flip-equivariant, so the flipped
outputs are not the flipped unflipped outputs). A run that does not flip (a dataset whose labels a mirror does not
keep, e.g. glyphs: ``info.hflip_preserves_labels``) builds the unflipped variant only, and the key records which.
Valid while no augmentation changes the crop's pixels other than the flip (photometric augmentation needs the online
path); crops are taken from the original image, which equals the online crop from the detector's resized batch up to
the resampling of the resize.

Each cache stores its ``key`` in the file's metadata: the settings it was computed with, the SHA-256 of the teacher's
weights and a fingerprint of the dataset split. A run resumed with another teacher (same architecture, other
weights), another dataset or other settings finds the file stale (:class:`StaleCacheError`) instead of silently
reusing it.

Scale (a COCO-sized split: 118k images, 860k boxes). The build (:mod:`cls2det.engine.cache_build`) reads images through
a DataLoader with workers (decode + crop there, every image once for all its boxes), runs the teacher in batches on the
main process's device, and is split across ranks (rank r takes images r, r + world, ...) into shard files that rank 0
assembles into one preallocated file; no step holds more than a batch of rows in RAM. Every rank reads the file
memory-mapped (:mod:`cls2det.engine.cache_file`): the tables are views of the map, a lookup reads its rows only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cls2det.engine import cache_file
from cls2det.errors import Cls2detError

_Cache = TypeVar("_Cache", bound="GTBoxCache")  # a subclass's to() returns that subclass
TABLE = "table."  # prefix of the per-box tables in the safetensors file (beside "image_ids" and "offsets")


class StaleCacheError(Cls2detError, ValueError):
    """A cache file computed with other settings than the ones asked for."""


class GTBoxCache:
    """Named tables of per-GT-box values, rows grouped by image: each table [M, V, ...] float16, V = 2 when built with
    flips (index 1 = flipped), else 1.

    ``image_ids`` [I] and ``offsets`` [I] int64: image ``image_ids[i]`` holds rows ``offsets[i]`` onwards, one per GT
    box in its targets' order. ``key``: the settings the tables were computed with (str -> str). ``mapped``: for a
    cache read by :meth:`load`, the file's tensors as memory-mapped numpy arrays, of which ``tables`` are views (no
    copy); None for a cache built in memory.
    """

    def __init__(
        self,
        tables: dict[str, Tensor],
        image_ids: Tensor,
        offsets: Tensor,
        key: dict[str, str],
        *,
        mapped: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.tables, self.key, self.mapped = tables, dict(key), mapped
        self.row_of = {int(i): int(o) for i, o in zip(image_ids.tolist(), offsets.tolist())}  # image id -> 1st row
        self.image_ids, self.offsets = image_ids, offsets

    def rows(self, image_ids: Tensor, gt_index: Tensor) -> Tensor:
        """[K] image ids, [K] GT index within the image -> [K] int64 rows of the tables (on CPU)."""
        first = torch.tensor([self.row_of[int(i)] for i in image_ids.tolist()], dtype=torch.int64)
        return first + gt_index.cpu()

    def values(self, name: str, image_ids: Tensor, gt_index: Tensor, flipped: Tensor) -> Tensor:
        """Table ``name`` at [K] image ids, [K] GT indices, [K] bool flipped -> [K, ...] float32, on its device.

        On a memory-mapped table this reads the K rows asked for, nothing else."""
        table = self.tables[name]
        if table.shape[1] == 1 and bool(flipped.any()):  # the key ("hflip") keeps a run from reaching this
            raise StaleCacheError(f"the {name!r} table was built without flipped crops, and a flipped box was asked")
        rows = self.rows(image_ids, gt_index).to(table.device)
        return table[rows, flipped.long().to(table.device)].float()

    def to(self: _Cache, device: str | torch.device) -> _Cache:
        """The tables on ``device`` (e.g. the GPU, so that a lookup copies nothing from the host): a full copy."""
        tables = {name: table.to(device) for name, table in self.tables.items()}
        if any(tables[name] is not table for name, table in self.tables.items()):
            self.mapped = None  # the tables are copies now
        self.tables = tables
        return self

    def save(self, path: str | Path) -> None:
        """Atomic write (temp file, rename) of the tables, the row index and the key (as metadata)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"image_ids": self.image_ids, "offsets": self.offsets}
        tensors |= {TABLE + name: table for name, table in self.tables.items()}
        specs = {name: (torch_to_numpy_dtype(t.dtype), tuple(t.shape)) for name, t in tensors.items()}
        out = cache_file.create(tmp, specs, self.key)
        for name, t in tensors.items():
            out.write(name, 0, t.cpu().numpy())
        out.close(sync=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, *, key: dict[str, str] | None = None):
        """Map a cache file (its tables stay on disk until read); with ``key``, raise :class:`StaleCacheError` if it
        was computed with other settings."""
        if key is not None:
            check_key(path, key)
        arrays, metadata = cache_file.open_tensors(path)
        tables = {name[len(TABLE) :]: torch.from_numpy(a) for name, a in arrays.items() if name.startswith(TABLE)}
        mapped = {name[len(TABLE) :]: a for name, a in arrays.items() if name.startswith(TABLE)}
        image_ids = torch.from_numpy(np.array(arrays["image_ids"]))  # small: copied into memory
        offsets = torch.from_numpy(np.array(arrays["offsets"]))
        return cls(tables, image_ids, offsets, metadata, mapped=mapped)


def torch_to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def read_key(path: str | Path) -> dict[str, str] | None:
    """The settings a cache file was computed with (its metadata); None if there is no such file."""
    if not Path(path).is_file():
        return None
    return cache_file.read_header(path)[1]


def check_key(path: str | Path, key: dict[str, str]) -> None:
    """:class:`StaleCacheError` naming the settings that differ, unless ``path`` was computed with ``key``."""
    stored = read_key(path)
    if stored is None:
        raise FileNotFoundError(f"cache file not found: {path}")
    if stored != key:
        diff = ", ".join(
            f"{k}={stored.get(k)!r} (asked {key.get(k)!r})"
            for k in sorted(set(stored) | set(key))
            if stored.get(k) != key.get(k)
        )
        raise StaleCacheError(f"{path} was computed with other settings: {diff}")


class SoftLabelCache(GTBoxCache):
    """KD_cls's teacher logits per GT box: ``logits`` [M, V, C] float16 (index 1 = flipped)."""

    @property
    def logits(self) -> Tensor:
        return self.tables["logits"]

    def lookup(self, image_ids: Tensor, gt_index: Tensor, flipped: Tensor) -> Tensor:
        """[K] image ids, [K] GT index within the image, [K] bool flipped -> teacher logits [K, C] float32."""
        return self.values("logits", image_ids, gt_index, flipped)


class GTFeatureCache(GTBoxCache):
    """KD_loc's GT branch per GT box: one table per tap, [M, V, M_l, P, P] float16 (index 1 = flipped)."""

    @property
    def taps(self) -> list[str]:
        return self.key["taps"].split(",")

    def lookup(self, image_ids: Tensor, gt_index: Tensor, flipped: Tensor) -> list[Tensor]:
        """[K] image ids, GT indices, bool flipped -> pooled GT features, one [K, M_l, P, P] float32 per tap."""
        return [self.values(tap, image_ids, gt_index, flipped) for tap in self.taps]


# ----------------------------------------------------------------------------------------------- keys


def teacher_fingerprint(teacher) -> str:
    """SHA-256 of the teacher's state dict (names, dtypes, shapes, bytes) and its input normalisation: two teachers
    of one architecture with other weights differ. Memory layout (channels_last) and device do not count."""
    digest = hashlib.sha256()
    for name, value in teacher.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    digest.update(repr((list(getattr(teacher, "mean", [])), list(getattr(teacher, "std", [])))).encode())
    return digest.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """What the cache's rows depend on in ``dataset``: the SHA-256 of its split's annotation file when it has one
    (:class:`~cls2det.data.CocoDetection`), else of every image's id and GT boxes (the rows' order and crops)."""
    annotation_file = getattr(getattr(dataset, "split", None), "annotation_file", None)
    digest = hashlib.sha256()
    if annotation_file is not None and Path(annotation_file).is_file():
        with open(annotation_file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        return f"annotations:{digest.hexdigest()}"
    for i in range(len(dataset)):
        target = dataset.target(i) if hasattr(dataset, "target") else dataset[i][1]
        digest.update(np.int64(int(target["image_id"])).tobytes())
        digest.update(target["boxes"].detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
        digest.update(b";")
    return f"boxes:{digest.hexdigest()}"


def soft_label_key(teacher, dataset, *, flips: bool = True) -> dict[str, str]:
    """The settings KD_cls's teacher logits depend on: the teacher (architecture, weights, input size), the data and
    whether the student's images are flipped (the flipped crops' rows exist only then)."""
    return {
        "teacher": teacher.arch,
        "teacher_sha256": teacher_fingerprint(teacher),
        "input_size": str(teacher.input_size),
        "data": dataset_fingerprint(dataset),
        "hflip": str(bool(flips)).lower(),
    }


def gt_feature_key(
    teacher, dataset, taps: Sequence[str], size: int, pools: Sequence[int], *, flips: bool = True
) -> dict[str, str]:
    """The settings KD_loc's pooled GT features depend on: the teacher (architecture, weights), the data, its taps,
    the sample size s, the pooled size P_l of each tap and whether the student's images are flipped."""
    return {
        "teacher": teacher.arch,
        "teacher_sha256": teacher_fingerprint(teacher),
        "data": dataset_fingerprint(dataset),
        "taps": ",".join(taps),
        "sample_size": str(size),
        "pools": ",".join(map(str, pools)),
        "hflip": str(bool(flips)).lower(),
    }


# ----------------------------------------------------------------------------------------------- builds


def soft_label_outputs(teacher) -> Callable[[Tensor], dict[str, Tensor]]:
    """crops [n, 3, S, S] -> {"logits": [n, C]}: what the soft-label cache stores per crop."""
    return lambda crops: {"logits": teacher(crops)}


def gt_feature_outputs(teacher, taps: Sequence[str], pools: Sequence[int]) -> Callable[[Tensor], dict[str, Tensor]]:
    """crops [n, 3, s, s] -> {tap: [n, M_l, P_l, P_l]}: ``teacher.forward_taps(crops, taps)``, tap l pooled to P_l."""
    taps = list(taps)

    def pooled(crops: Tensor) -> dict[str, Tensor]:
        maps = teacher.forward_taps(crops, taps)
        return {tap: F.adaptive_avg_pool2d(f, p) for tap, f, p in zip(taps, maps, pools)}  # each [n, M_l, P_l, P_l]

    return pooled


@torch.no_grad()
def build_soft_label_cache(
    teacher,
    dataset,
    *,
    device: str | torch.device = "cpu",
    path: str | Path | None = None,
    flips: bool = True,
    **build,
) -> SoftLabelCache:
    """Run ``teacher`` once over the GT crops of ``dataset`` (items ``(image [3,H,W] 0..1, target)``, unflipped) and,
    with ``flips``, over their horizontal flips.

    Without ``path``: the tables in memory (small datasets, benchmarks). With ``path``: written to that file
    (``build``: ``key``, ``rank``, ``world``, ``barrier``, ``workers``, ``progress`` of
    :func:`~cls2det.engine.cache_build.build_cache_file`), then read memory-mapped."""
    from cls2det.engine.cache_build import build_cache_file, build_in_memory

    outputs, size = soft_label_outputs(teacher), teacher.input_size
    if path is None:
        tables, image_ids, offsets = build_in_memory(dataset, outputs, size=size, device=device, flips=flips, **build)
        return SoftLabelCache(tables, image_ids, offsets, soft_label_key(teacher, dataset, flips=flips))
    key = build.pop("key", None) or soft_label_key(teacher, dataset, flips=flips)
    build_cache_file(path, dataset, outputs, size=size, key=key, device=device, flips=flips, **build)
    return SoftLabelCache.load(path, key=key)


@torch.no_grad()
def build_gt_feature_cache(
    teacher,
    dataset,
    *,
    taps: Sequence[str],
    size: int,
    pools: Sequence[int],
    device: str | torch.device = "cpu",
    path: str | Path | None = None,
    flips: bool = True,
    **build,
) -> GTFeatureCache:
    """The pooled tap features KD_loc compares against (eq. 10, GT branch) for every GT crop of ``dataset``:
    crops at ``size`` (s), ``teacher.forward_taps(crops, taps)``, tap l adaptive-average-pooled to ``pools[l]``.
    ``path`` and ``build``: as :func:`build_soft_label_cache`."""
    from cls2det.engine.cache_build import build_cache_file, build_in_memory

    outputs = gt_feature_outputs(teacher, taps, pools)
    if path is None:
        tables, image_ids, offsets = build_in_memory(dataset, outputs, size=size, device=device, flips=flips, **build)
        key = gt_feature_key(teacher, dataset, taps, size, pools, flips=flips)
        return GTFeatureCache(tables, image_ids, offsets, key)
    key = build.pop("key", None) or gt_feature_key(teacher, dataset, taps, size, pools, flips=flips)
    build_cache_file(path, dataset, outputs, size=size, key=key, device=device, flips=flips, **build)
    return GTFeatureCache.load(path, key=key)
