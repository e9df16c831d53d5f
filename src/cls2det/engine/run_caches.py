"""The run folder's teacher caches (KD_cls's soft labels, KD_loc's GT features), opened for a training run: built
when missing or stale (another teacher, dataset or settings than the file was computed with), else reused."""

from __future__ import annotations

from pathlib import Path

from lightning_fabric import Fabric

from cls2det.config import DistillConfig
from cls2det.engine.run_dir import GT_FEATURES, SOFT_LABELS
from cls2det.engine.teacher_cache import (
    GTFeatureCache,
    SoftLabelCache,
    build_gt_feature_cache,
    build_soft_label_cache,
    gt_feature_key,
    read_key,
    soft_label_key,
)


def open_teacher_caches(
    fabric: Fabric,
    out: Path,
    teacher,
    dataset,
    distill: DistillConfig,
    *,
    flips: bool,
    workers: int,
    progress: bool,
) -> tuple[SoftLabelCache | None, GTFeatureCache | None]:
    """The caches ``distill`` asks for (``soft_label_cache`` with KD_cls, ``gt_feature_cache`` with KD_loc), each
    None when not asked or without a teacher; ``flips``: whether the run flips its images (the flipped crops' rows)."""
    soft_labels = gt_features = None
    if teacher is not None and "cls" in distill.kd and distill.soft_label_cache:
        soft_labels = _open(
            fabric,
            out / SOFT_LABELS,
            SoftLabelCache,
            soft_label_key(teacher, dataset, flips=flips),
            lambda **build: build_soft_label_cache(teacher, dataset, device=fabric.device, flips=flips, **build),
            workers,
            progress,
        )
    if teacher is not None and "kd_loc" in distill.kd and distill.gt_feature_cache:
        taps, size, pools = distill.taps, distill.sample_size, distill.tap_pools()
        gt_features = _open(
            fabric,
            out / GT_FEATURES,
            GTFeatureCache,
            gt_feature_key(teacher, dataset, taps, size, pools, flips=flips),
            lambda **build: build_gt_feature_cache(
                teacher, dataset, taps=taps, size=size, pools=pools, device=fabric.device, flips=flips, **build
            ),
            workers,
            progress,
        )
    return soft_labels, gt_features


def _open(fabric: Fabric, path: Path, cache_class, key: dict[str, str], build, workers: int, progress: bool):
    """A teacher cache in the run folder (kept for --resume): every rank builds a shard of the images, rank 0
    assembles the file, then every rank reads it memory-mapped; rank 0 decides whether it is stale, so that every
    rank takes the same branch."""
    stored = read_key(path) if fabric.is_global_zero else None
    if fabric.broadcast(stored != key, 0):
        if stored is not None:
            fabric.print(f"{path} was computed with {stored}, the run asks {key}: rebuilding it")
        return build(
            path=path,
            key=key,
            rank=fabric.global_rank,
            world=fabric.world_size,
            barrier=fabric.barrier,
            workers=workers,
            progress=progress and fabric.is_global_zero,
        )
    return cache_class.load(path, key=key)
