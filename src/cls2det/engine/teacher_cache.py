"""Per-GT-box caches of the frozen teacher: what it computes on the GT crops, computed once instead of every step.

The teacher is frozen and GT boxes are fixed, so its outputs on a GT crop depend only on (image, GT box, flip):

* :class:`SoftLabelCache`: KD_cls's teacher logits on the GT crop at the teacher's input size (eq. 1-7);
* :class:`GTFeatureCache`: KD_loc's GT branch (eq. 10), the teacher's tap features of the GT crop at the sample size
  ``s``, average-pooled to ``P_l x P_l`` per tap. The predicted-box branch needs gradients through the crop and stays
  online.

A horizontally flipped crop is exactly the flip of the unflipped crop (the sampling grid of eq. 8-9 is symmetric),
so both variants come from one crop; the teacher runs on each (a conv stem is not flip-equivariant, so the flipped
outputs are not the flipped unflipped outputs). Valid while no augmentation changes the crop's pixels other than the
flip (photometric augmentation needs the online path); crops are taken from the original image, which equals the
online crop from the detector's resized batch up to the resampling of the resize.

Each cache stores its ``key`` (the settings it was computed with) in the file's metadata, so a run resumed with
other settings finds it stale (:class:`StaleCacheError`) instead of silently reusing it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from cls2det.distill.crops import crop_boxes
from cls2det.errors import Cls2detError
from cls2det.files import save_safetensors

TABLE = "table."  # prefix of the per-box tables in the safetensors file (beside "image_ids" and "offsets")


class StaleCacheError(Cls2detError, ValueError):
    """A cache file computed with other settings than the ones asked for."""


class GTBoxCache:
    """Named tables of per-GT-box values, rows grouped by image: each table [M, 2, ...] float16 (index 1 = flipped).

    ``image_ids`` [I] and ``offsets`` [I] int64: image ``image_ids[i]`` holds rows ``offsets[i]`` onwards, one per GT
    box in its targets' order. ``key``: the settings the tables were computed with (str -> str).
    """

    def __init__(self, tables: dict[str, Tensor], image_ids: Tensor, offsets: Tensor, key: dict[str, str]) -> None:
        self.tables, self.key = tables, dict(key)
        self.row_of = {int(i): int(o) for i, o in zip(image_ids, offsets)}  # image id -> its first row
        self.image_ids, self.offsets = image_ids, offsets

    def rows(self, image_ids: Tensor, gt_index: Tensor) -> Tensor:
        """[K] image ids, [K] GT index within the image -> [K] int64 rows of the tables (on CPU)."""
        first = torch.tensor([self.row_of[int(i)] for i in image_ids.tolist()], dtype=torch.int64)
        return first + gt_index.cpu()

    def values(self, name: str, image_ids: Tensor, gt_index: Tensor, flipped: Tensor) -> Tensor:
        """Table ``name`` at [K] image ids, [K] GT indices, [K] bool flipped -> [K, ...] float32, on its device."""
        table = self.tables[name]
        rows = self.rows(image_ids, gt_index).to(table.device)
        return table[rows, flipped.long().to(table.device)].float()

    def to(self, device: str | torch.device) -> GTBoxCache:
        """The tables on ``device`` (e.g. the GPU, so that a lookup copies nothing from the host)."""
        self.tables = {name: table.to(device) for name, table in self.tables.items()}
        return self

    def save(self, path: str | Path) -> None:
        """Atomic write (temp file, rename) of the tables, the row index and the key (as metadata)."""
        tensors = {TABLE + name: table for name, table in self.tables.items()}
        save_safetensors(path, {**tensors, "image_ids": self.image_ids, "offsets": self.offsets}, metadata=self.key)

    @classmethod
    def load(cls, path: str | Path, *, key: dict[str, str] | None = None):
        """Read a cache; with ``key``, raise :class:`StaleCacheError` if it was computed with other settings."""
        if key is not None:
            check_key(path, key)
        tensors = load_file(str(path))
        tables = {name[len(TABLE) :]: t for name, t in tensors.items() if name.startswith(TABLE)}
        return cls(tables, tensors["image_ids"], tensors["offsets"], read_key(path) or {})


def read_key(path: str | Path) -> dict[str, str] | None:
    """The settings a cache file was computed with (its metadata); None if there is no such file."""
    if not Path(path).is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


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
    """KD_cls's teacher logits per GT box: ``logits`` [M, 2, C] float16 (index 1 = flipped)."""

    @property
    def logits(self) -> Tensor:
        return self.tables["logits"]

    def lookup(self, image_ids: Tensor, gt_index: Tensor, flipped: Tensor) -> Tensor:
        """[K] image ids, [K] GT index within the image, [K] bool flipped -> teacher logits [K, C] float32."""
        return self.values("logits", image_ids, gt_index, flipped)


class GTFeatureCache(GTBoxCache):
    """KD_loc's GT branch per GT box: one table per tap, [M, 2, M_l, P_l, P_l] float16 (index 1 = flipped)."""

    @property
    def taps(self) -> list[str]:
        return self.key["taps"].split(",")

    def lookup(self, image_ids: Tensor, gt_index: Tensor, flipped: Tensor) -> list[Tensor]:
        """[K] image ids, GT indices, bool flipped -> pooled GT features, one [K, M_l, P_l, P_l] float32 per tap."""
        return [self.values(tap, image_ids, gt_index, flipped) for tap in self.taps]


def soft_label_key(teacher) -> dict[str, str]:
    """The settings KD_cls's teacher logits depend on."""
    return {"teacher": teacher.arch, "input_size": str(teacher.input_size)}


def gt_feature_key(teacher, taps: Sequence[str], size: int, pools: Sequence[int]) -> dict[str, str]:
    """The settings KD_loc's pooled GT features depend on: the teacher, its taps, the sample size s and the pooled
    size P_l of each tap."""
    pooled = ",".join(map(str, pools))
    return {"teacher": teacher.arch, "taps": ",".join(taps), "sample_size": str(size), "pools": pooled}


@torch.no_grad()
def build_soft_label_cache(teacher, dataset, *, device: str | torch.device = "cpu") -> SoftLabelCache:
    """Run ``teacher`` once over the GT crops of ``dataset`` (items ``(image [3,H,W] 0..1, target)``)."""
    tables, image_ids, offsets = _per_gt_box(
        dataset, lambda crops: {"logits": teacher(crops)}, size=teacher.input_size, device=device
    )
    return SoftLabelCache(tables, image_ids, offsets, soft_label_key(teacher))


@torch.no_grad()
def build_gt_feature_cache(
    teacher, dataset, *, taps: Sequence[str], size: int, pools: Sequence[int], device: str | torch.device = "cpu"
) -> GTFeatureCache:
    """The pooled tap features KD_loc compares against (eq. 10, GT branch) for every GT crop of ``dataset``:
    crops at ``size`` (s), ``teacher.forward_taps(crops, taps)``, tap l adaptive-average-pooled to ``pools[l]``."""
    taps = list(taps)

    def pooled(crops: Tensor) -> dict[str, Tensor]:
        maps = teacher.forward_taps(crops, taps)
        return {tap: F.adaptive_avg_pool2d(f, p) for tap, f, p in zip(taps, maps, pools)}  # each [n, M_l, P_l, P_l]

    tables, image_ids, offsets = _per_gt_box(dataset, pooled, size=size, device=device)
    return GTFeatureCache(tables, image_ids, offsets, gt_feature_key(teacher, taps, size, pools))


def _per_gt_box(
    dataset,
    compute: Callable[[Tensor], dict[str, Tensor]],
    *,
    size: int,
    device: str | torch.device,
    batch_boxes: int = 128,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """``compute(crops [n, 3, s, s]) -> {name: [n, ...]}`` on every GT crop of ``dataset`` and on its flip.

    Crops of several images are batched up to ``batch_boxes`` boxes per call (the teacher is in eval mode, so a
    crop's outputs do not depend on its batch). Returns ({name: [M, 2, ...] float16 on CPU}, image_ids, offsets).
    """
    parts: dict[str, list[Tensor]] = {}
    pending: list[Tensor] = []

    def flush() -> None:
        crops = torch.cat(pending)  # [n, 3, s, s]
        out = compute(torch.cat([crops, crops.flip(-1)]))  # each [2n, ...]
        for name, value in out.items():
            parts.setdefault(name, []).append(torch.stack(value.chunk(2), 1).half().cpu())  # [n, 2, ...]
        pending.clear()

    image_ids, offsets, row = [], [], 0
    for i in range(len(dataset)):
        image, target = dataset[i]
        boxes = target["boxes"].to(device)
        image_ids.append(int(target["image_id"]))
        offsets.append(row)
        row += len(boxes)
        if len(boxes):
            index = torch.zeros(len(boxes), dtype=torch.int64, device=device)
            pending.append(crop_boxes(image[None].to(device), boxes, index, size=size))  # [N_i, 3, s, s]
        if sum(len(c) for c in pending) >= batch_boxes:
            flush()
    if pending:
        flush()
    if not parts:  # no box at all: empty tables of the right shape, from one dummy crop
        dummy = compute(torch.zeros(1, 3, size, size, device=device))
        shapes = {name: value.shape[1:] for name, value in dummy.items()}
        parts = {name: [torch.zeros(0, 2, *shape, dtype=torch.float16)] for name, shape in shapes.items()}
    tables = {name: torch.cat(chunks) for name, chunks in parts.items()}
    return tables, torch.tensor(image_ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)
