"""The student's batches: the epoch's image order and the per-step horizontal flips, each a pure function of the
seed and the epoch / step, so a run stopped at a step boundary and resumed sees exactly the same batches."""

from __future__ import annotations

import weakref

import torch

from cls2det.data.coco import hflip


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled image order of ``epoch``: a pure function of (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def hflip_batch(images: list[torch.Tensor], targets: list[dict], generator: torch.Generator, p: float = 0.5):
    """Flip each image and its boxes horizontally with probability ``p`` (boxes xyxy in pixels).

    Returns (images, targets, flipped [N] bool).
    """
    flips = (torch.rand(len(images), generator=generator) < p).tolist()
    out_images, out_targets = [], []
    for image, target, flip in zip(images, targets, flips):
        if flip:
            image, boxes = hflip(image, target["boxes"])
            target = {**target, "boxes": boxes}
        out_images.append(image)
        out_targets.append(target)
    return out_images, out_targets, torch.tensor(flips, dtype=torch.bool)


class EpochBatches:
    """A trainer's batch sampler: this rank's batches of the trainer's current epoch from its ``batch_in_epoch`` on,
    a pure function of (seed, epoch, rank), read each time the loader starts an epoch (so one persistent loader
    serves the whole run and a resumed run starts mid-epoch). ``trainer``: has ``dataset``, ``config`` (seed,
    batch_size), ``fabric`` (rank, world size), ``epoch``, ``steps_per_epoch``, ``batch_in_epoch``."""

    def __init__(self, trainer) -> None:
        # a weak reference: the trainer holds the loader that holds this sampler, and a cycle would leave the loader's
        # persistent workers to the garbage collector, which shut them down at some later, arbitrary point
        self.trainer = weakref.proxy(trainer)

    def batches(self) -> list[list[int]]:
        t = self.trainer
        order = epoch_order(len(t.dataset), t.config.seed, t.epoch)[t.fabric.global_rank :: t.fabric.world_size]
        batches = [order[i : i + t.config.batch_size] for i in range(0, len(order), t.config.batch_size)]
        return batches[: t.steps_per_epoch][t.batch_in_epoch :]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
