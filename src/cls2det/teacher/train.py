"""Train the classifier teacher on D_cls, the ground-truth crops of the detection train split (paper, sec. 3.1).

Recipe: AdamW (no decay on norms/biases), linear warm-up then cosine LR per step, label smoothing, batched
augmentation of the crop tensors (mild random resized crop + small translation, brightness/contrast; horizontal flip
off by default because digits and text are not flip-invariant). Top-1 on the val crops after every epoch; the best
epoch's weights are kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cls2det.config import TeacherConfig
from cls2det.determinism import deterministic_algorithms
from cls2det.teacher.io import save_teacher
from cls2det.teacher.model import Teacher, TeacherError, build_teacher


@dataclass(frozen=True)
class Augment:
    """Batched augmentation of crops [B, 3, S, S] in 0..1 (all ranges are sampled uniformly per crop)."""

    # Mild by default: crops are tight GT boxes, and a strong zoom (scale 0.6) cuts digits into other digits
    # (demo set, ResNet-18 at 32 px, 6 epochs: scale 0.6-1 + translate 0.1 -> 84.2% top-1; 0.85-1 + 0.05 -> 87.9%;
    # no augmentation -> 86.6%).
    scale: tuple[float, float] = (0.85, 1.0)  # area fraction of the random resized crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the random resized crop
    translate: float = 0.05  # extra shift, fraction of the crop side (may move content out: zero padding, as KD crops)
    brightness: float = 0.3  # multiply by 1 +- brightness
    contrast: float = 0.3  # scale the deviation from the crop's mean grey by 1 +- contrast
    hflip: bool = False  # flip half the crops horizontally (off: digits are not flip-invariant)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b = x.shape[0]
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=generator)  # noqa: E731 - [B] on CPU
        area, log_ratio = u(*self.scale), u(math.log(self.ratio[0]), math.log(self.ratio[1]))
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width, fraction of the side
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx = (1 - w) * u(-1, 1) + 2 * self.translate * u(-1, 1)  # crop centre, normalised coordinates
        cy = (1 - h) * u(-1, 1) + 2 * self.translate * u(-1, 1)
        sx = torch.where(torch.rand(b, generator=generator) < 0.5, -w, w) if self.hflip else w
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)  # [B, S, S, 2]
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        brightness = u(1 - self.brightness, 1 + self.brightness).to(x).view(b, 1, 1, 1)
        contrast = u(1 - self.contrast, 1 + self.contrast).to(x).view(b, 1, 1, 1)
        grey = x.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
        return ((x * brightness - grey * brightness) * contrast + grey * brightness).clamp(0, 1)


def classification_loss(logits: Tensor, labels: Tensor, kind: str, label_smoothing: float = 0.0) -> Tensor:
    """Mean over the batch. logits [B, C], labels [B] int64 in [0, C).

    "ce": softmax cross-entropy; "bce": per-class sigmoid BCE with (smoothed) one-hot targets, summed over classes;
    "ce+bce": their sum, so the logits suit softmax and sigmoid students alike (paper, sec. 4).
    """
    if kind not in ("ce", "bce", "ce+bce"):
        raise TeacherError(f"unknown teacher loss {kind!r}; valid: ce, bce, ce+bce")
    loss = logits.new_zeros(())
    if "ce" in kind.split("+"):
        loss = loss + F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if "bce" in kind:
        target = F.one_hot(labels, logits.shape[1]).to(logits)  # [B, C]
        target = target * (1 - label_smoothing) + label_smoothing / logits.shape[1]
        loss = loss + F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]
    return loss


@torch.no_grad()
def evaluate_top1(teacher: Teacher, dataset: Dataset, *, batch_size: int = 256, device: str = "cpu") -> float:
    """Top-1 accuracy in percent of ``teacher`` on a dataset of (crop [3, S, S] in 0..1, label) items."""
    was_training = teacher.training
    teacher.eval()
    correct = total = 0
    for crops, labels in DataLoader(dataset, batch_size=batch_size):
        pred = teacher(crops.to(device)).argmax(1).cpu()  # [B]
        correct += int((pred == labels).sum())
        total += len(labels)
    teacher.train(was_training)
    return 100.0 * correct / max(total, 1)


def fit_teacher(
    teacher: Teacher,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TeacherConfig,
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
    augment: Augment | None = None,
) -> dict[str, Any]:
    """Train ``teacher`` in place on (crop, label) items; returns metrics (top1 in percent on ``val_set``).

    Seeded by ``config.seed`` without touching the global RNG; ``config.deterministic`` allows deterministic kernels
    only (:mod:`cls2det.determinism`). Leaves the best epoch's weights in ``teacher``
    (the last epoch's when there is no val set).
    """
    if len(train_set) == 0:
        raise TeacherError("the teacher's training set is empty (no ground-truth boxes in the train split?)")
    if teacher.is_frozen:
        raise TeacherError(f"teacher {teacher.arch!r} is frozen (a distillation teacher); build a new one to train")
    augment = augment if augment is not None else Augment(hflip=config.hflip)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), deterministic_algorithms(config.deterministic):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(
            train_set,
            batch_size=config.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=config.workers,
            drop_last=len(train_set) > config.batch_size,  # no 1-crop batch for BatchNorm; keep tiny sets whole
        )
        steps = config.epochs * len(loader)
        warmup = max(1, round(config.warmup_epochs * len(loader)))
        optimizer = torch.optim.AdamW(_param_groups(teacher, config.weight_decay), lr=config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, steps))
        teacher.to(device).train()
        history: list[dict[str, Any]] = []
        best_top1, best_state, best_epoch = -1.0, None, 0
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("teacher", total=steps)
            for epoch in range(1, config.epochs + 1):
                loss_sum = seen = 0.0
                for crops, labels in loader:
                    crops = augment(crops.to(device), generator)  # [B, 3, S, S]
                    labels = labels.to(device)
                    loss = classification_loss(teacher(crops), labels, config.loss, config.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum, seen = loss_sum + loss.item() * len(labels), seen + len(labels)
                    bar.update(task, advance=1, description=f"teacher epoch {epoch}/{config.epochs} loss {loss:.3f}")
                has_val = val_set is not None and len(val_set) > 0
                top1 = evaluate_top1(teacher, val_set, device=str(device)) if has_val else None
                history.append({"epoch": epoch, "loss": loss_sum / max(seen, 1), "top1": top1})
                if progress:
                    val = f"{top1:.2f}%" if top1 is not None else "n/a"
                    mean_loss = loss_sum / max(seen, 1)
                    bar.console.print(f"teacher epoch {epoch}: train loss {mean_loss:.4f}, val top-1 {val}")
                if top1 is not None and top1 > best_top1:
                    best_top1, best_epoch = top1, epoch
                    best_state = {k: v.detach().clone() for k, v in teacher.net.state_dict().items()}
        if best_state is not None:
            teacher.net.load_state_dict(best_state)
    teacher.loss = config.loss
    teacher.eval()
    return {
        "top1": best_top1 if best_state is not None else None,
        "best_epoch": best_epoch,
        "top1_last": history[-1]["top1"] if history else None,
        "epochs": config.epochs,
        "steps": steps,
        "num_train": len(train_set),
        "num_val": len(val_set) if val_set is not None else 0,
        "wall_s": round(time.perf_counter() - start, 2),
        "history": history,
    }


def train_teacher(
    data: str | Path, out: str | Path, config: TeacherConfig, *, progress: bool = True, device: str = "cpu"
) -> dict[str, Any]:
    """Build D_cls from ``data``'s train/val splits, train ``config.arch`` on it, write it to ``out``.

    Writes ``out/teacher.safetensors`` and ``out/teacher.json`` (see :func:`~cls2det.teacher.io.save_teacher`).

    Returns the metrics (also stored in teacher.json): top1 (percent, best epoch, val crops), epochs, wall_s, ...
    """
    from cls2det.data import ClassificationCrops, load_split  # the data package imports heavier deps; load lazily

    train_split, val_split = load_split(data, "train"), load_split(data, "val")
    if val_split.class_names != train_split.class_names:
        raise TeacherError(
            f"{data}: val classes {val_split.class_names} differ from train classes {train_split.class_names}"
        )
    train_set = ClassificationCrops(train_split, size=config.input_size, context=config.context)
    val_set = ClassificationCrops(val_split, size=config.input_size, context=config.context)
    with torch.random.fork_rng(devices=[]):  # the head's (and a from-scratch net's) initial weights: from the seed
        torch.manual_seed(config.seed)
        teacher = build_teacher(
            config.arch,
            train_split.num_classes,
            class_names=train_split.class_names,
            input_size=config.input_size,
            pretrained=config.pretrained,
        )
    metrics = fit_teacher(teacher, train_set, val_set, config, progress=progress, device=device)
    save_teacher(teacher, out, metrics, config=config)
    return metrics


def _param_groups(teacher: Teacher, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices / conv kernels only, not on norms and biases (1-D tensors)."""
    params = [p for p in teacher.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 1% of the peak at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
