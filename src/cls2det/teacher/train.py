"""Train the classifier teacher on D_cls, the ground-truth crops of the detection train split (paper, sec. 3.1).

Recipe: AdamW (no decay on norms/biases), linear warm-up then cosine LR per step, by default the paper's joint
softmax + per-class sigmoid loss (``ce+bce``) without label smoothing (KD_cls distils these very logits), batched
augmentation of the crop tensors (mild random resized crop + small translation, brightness/contrast; horizontal flip
off by default because digits and text are not flip-invariant). Top-1 on the val crops after every epoch; the best
epoch's weights are kept.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sized
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cls2det.config import TeacherConfig, resolve_workers
from cls2det.determinism import deterministic_algorithms
from cls2det.lr import lr_factor
from cls2det.run_folder import absolute_input
from cls2det.teacher.io import save_teacher
from cls2det.teacher.model import Teacher, TeacherError, build_teacher
from cls2det.teacher.run import LoopState, TeacherRun


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
    hflip: bool = False  # flip half the crops horizontally (off where a mirror changes the label: digits, text)

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
def evaluate_top1(
    teacher: Teacher, dataset: Dataset | DataLoader, *, batch_size: int = 256, device: str = "cpu", workers: int = 0
) -> float:
    """Top-1 accuracy in percent of ``teacher`` on a dataset of (crop [3, S, S] in 0..1, label) items (or a loader
    of such batches, to reuse its workers)."""
    was_training = teacher.training
    teacher.eval()
    correct = total = 0
    loader = dataset if isinstance(dataset, DataLoader) else DataLoader(dataset, batch_size, num_workers=workers)
    for crops, labels in loader:
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
    run: TeacherRun | None = None,
    label: str = "teacher",
) -> dict[str, Any]:
    """Train ``teacher`` in place on (crop, label) items; returns metrics (top1 in percent on ``val_set``).

    Seeded by ``config.seed`` without touching the global RNG: the epoch's crop order is a function of (seed, epoch),
    each step's augmentation of (seed, step), so a run stopped at a step boundary and resumed is the uninterrupted
    run; ``config.deterministic`` allows deterministic kernels only (:mod:`cls2det.determinism`). Leaves the best
    epoch's weights in ``teacher`` (the last epoch's when there is no val set).

    ``label``: what the progress bar and the epoch lines call the network (e.g. the backbone pre-training's).
    ``run``: the run folder (:class:`~cls2det.teacher.run.TeacherRun`) that gets a checkpoint at every epoch's end
    and at SIGINT / SIGTERM, metrics.csv and TensorBoard; when it is resuming, training continues from its ``last/``.
    """
    num_train = len(cast(Sized, train_set))  # map-style datasets: they have a length
    num_val = len(cast(Sized, val_set)) if val_set is not None else 0
    if num_train == 0:
        raise TeacherError("the teacher's training set is empty (no ground-truth boxes in the train split?)")
    if teacher.is_frozen:
        raise TeacherError(f"teacher {teacher.arch!r} is frozen (a distillation teacher); build a new one to train")
    augment = augment if augment is not None else Augment(hflip=bool(config.hflip))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), deterministic_algorithms(config.deterministic):
        torch.manual_seed(config.seed)
        drop_last = num_train > config.batch_size  # no 1-crop batch for BatchNorm; keep tiny sets whole
        workers = resolve_workers(config.workers)
        # one loader per run, its workers kept across epochs
        common: dict[str, Any] = {
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "pin_memory": _is_cuda(device),
        }
        # the order is a pure function of (seed, epoch); ClassificationCrops groups crops by image when streamed
        if hasattr(train_set, "batch_sampler"):
            sampler = train_set.batch_sampler(config.batch_size, seed=config.seed, drop_last=drop_last)
        else:
            from cls2det.data.crops import CropBatchSampler

            index = torch.arange(num_train).numpy()
            sampler = CropBatchSampler(index, config.batch_size, seed=config.seed, drop_last=drop_last, by_image=False)
        steps_per_epoch = len(sampler)
        loader = DataLoader(train_set, batch_sampler=sampler, **common)
        val_loader = DataLoader(val_set, 256, **common) if val_set is not None and num_val > 0 else None
        steps = config.epochs * steps_per_epoch
        warmup = max(1, round(config.warmup_epochs * steps_per_epoch))  # capped at 10% of the run by lr_factor
        optimizer = torch.optim.AdamW(_param_groups(teacher, config.weight_decay), lr=config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, steps, warmup, floor=0.01)
        )  # cosine to 1%
        teacher.to(device).train()
        if config.channels_last:
            teacher.to(memory_format=torch.channels_last)
        loop, best_state = LoopState(), None
        if run is not None and run.start.resume:
            loop, best_state = run.load(teacher.net, optimizer, scheduler)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, disable=not progress) as bar, run.signals() if run is not None else nullcontext():
            task = bar.add_task(label, total=steps, completed=loop.step)
            for epoch in range(loop.epoch, config.epochs + 1):
                sampler.set_epoch(epoch, skip=loop.batch_in_epoch)
                for crops, labels in loader:
                    step_seed = config.seed * 1_000_003 + loop.step
                    generator = torch.Generator().manual_seed(step_seed)
                    torch.manual_seed(step_seed)  # dropout / drop-path of timm models draw from the global RNG
                    crops = augment(crops.to(device), generator)  # [B, 3, S, S]
                    labels = labels.to(device)
                    loss = classification_loss(teacher(crops), labels, config.loss, config.label_smoothing)
                    lr = optimizer.param_groups[0]["lr"]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loop.step, loop.batch_in_epoch = loop.step + 1, loop.batch_in_epoch + 1
                    loop.loss_sum, loop.seen = loop.loss_sum + loss.item() * len(labels), loop.seen + len(labels)
                    if run is not None:
                        run.log({"step": loop.step, "epoch": epoch, "lr": lr, "loss": loss.item()}, loop.step)
                        run.stop_if_asked(teacher.net, optimizer, scheduler, loop)
                    bar.update(task, advance=1, description=f"{label} epoch {epoch}/{config.epochs} loss {loss:.3f}")
                top1 = evaluate_top1(teacher, val_loader, device=str(device)) if val_loader is not None else None
                mean_loss = loop.loss_sum / max(loop.seen, 1)
                loop.history.append({"epoch": epoch, "loss": mean_loss, "top1": top1})
                if progress:
                    val = f", val top-1 {top1:.2f}%" if top1 is not None else ""  # no val set: nothing to show
                    bar.console.print(f"{label} epoch {epoch}: train loss {mean_loss:.4f}{val}")
                new_best = top1 is not None and top1 > loop.best_top1
                if new_best:
                    assert top1 is not None  # new_best implies it
                    loop.best_top1, loop.best_epoch = top1, epoch
                    best_state = {k: v.detach().clone() for k, v in teacher.net.state_dict().items()}
                loop.epoch, loop.batch_in_epoch, loop.loss_sum, loop.seen = epoch + 1, 0, 0.0, 0
                if run is not None:
                    if top1 is not None:
                        run.log({"step": loop.step, "epoch": epoch, "top1": top1}, loop.step)
                    run.save(teacher.net, optimizer, scheduler, loop, best_state if new_best else None)
        if best_state is not None:
            teacher.net.load_state_dict(best_state)
    teacher.loss = config.loss
    teacher.eval()
    history = loop.history
    return {
        "top1": loop.best_top1 if best_state is not None else None,
        "best_epoch": loop.best_epoch,
        "top1_last": history[-1]["top1"] if history else None,
        "epochs": config.epochs,
        "steps": steps,
        "num_train": num_train,
        "num_val": num_val,
        "wall_s": round(time.perf_counter() - start, 2),
        "history": history,
    }


def train_teacher(
    data: str | Path,
    out: str | Path,
    config: TeacherConfig,
    *,
    progress: bool = True,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build D_cls from ``data``'s train/val splits, train ``config.arch`` on it, write it to run folder ``out``.

    Writes ``out/teacher.safetensors`` and ``out/teacher.json`` (see :func:`~cls2det.teacher.io.save_teacher`), and
    on the way checkpoints, metrics.csv and TensorBoard (see :mod:`cls2det.teacher.run`). ``out`` follows the run
    folder rules of ``cls2det train``: a folder that holds a run needs ``resume`` (continue it, same recipe but more
    epochs) or ``overwrite`` (replace it once the new run has started); a student run is refused.

    Returns the metrics (also stored in teacher.json): top1 (percent, best epoch, val crops), epochs, wall_s, ...
    """
    # inputs resolved once and recorded absolute (config.yaml, run.json): the run folder works from anywhere
    data = absolute_input(str(data)) or str(data)
    config = dataclasses.replace(config, pretrained=absolute_input(config.pretrained))
    run = TeacherRun.open(out, config, data, resume=resume, overwrite=overwrite)
    try:
        done = run.finished_metrics()
        if done is not None:  # a resumed run with nothing left to do: its outputs stay as they are
            print(f"{out} finished its {config.epochs} epochs: nothing to resume; raise --epochs to train on")
            return done
        return _train_teacher(data, out, config, run, progress=progress, device=device)
    except BaseException:
        run.failed()  # a start that failed before its first checkpoint leaves nothing behind
        raise
    finally:
        run.close()


def _train_teacher(data, out, config: TeacherConfig, run: TeacherRun, *, progress: bool, device: str):
    from cls2det.data import ClassificationCrops, load_split  # the data package imports heavier deps; load lazily

    train_split, val_split = load_split(data, "train"), load_split(data, "val")
    if val_split.class_names != train_split.class_names:
        raise TeacherError(
            f"{data}: val classes {val_split.class_names} differ from train classes {train_split.class_names}"
        )
    workers = resolve_workers(config.workers)
    train_set = ClassificationCrops(train_split, size=config.input_size, workers=workers)
    val_set = ClassificationCrops(val_split, size=config.input_size, workers=workers)
    with torch.random.fork_rng(devices=[]):  # the head's (and a from-scratch net's) initial weights: from the seed
        torch.manual_seed(config.seed)
        teacher = build_teacher(
            config.arch,
            train_split.num_classes,
            class_names=train_split.class_names,
            input_size=config.input_size,
            pretrained=config.pretrained,
        )
    # the student's augmentation rule (train.hflip): flip only where the dataset says a mirror keeps the labels
    teacher.hflip = train_split.hflip_preserves_labels if config.hflip is None else config.hflip
    run.started(data)
    augment = Augment(hflip=teacher.hflip)
    metrics = fit_teacher(
        teacher, train_set, val_set, config, progress=progress, device=device, augment=augment, run=run
    )
    save_teacher(teacher, out, metrics, config=config)
    return metrics


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _param_groups(teacher: Teacher, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices / conv kernels only, not on norms and biases (1-D tensors)."""
    params = [p for p in teacher.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
