"""``cls2det bench``: the cost of distillation over plain training, measured in one process run.

Modes are timed round-robin (baseline, +KD_cls, +all, ...) so that machine noise hits them alike; the table
reports medians and ratios to the baseline step.
"""
from __future__ import annotations

import statistics
import time

import torch

from cls2det.config import DistillConfig, StudentConfig
from cls2det.distill.objective import distillation_losses, total_loss
from cls2det.students import create_student

MODES = {"baseline": [], "+kd_cls": ["cls"], "+loc+kd_loc": ["loc", "kd_loc"], "+all": ["cls", "loc", "kd_loc"]}


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, boxes_per_image: int = 4, seed: int = 0):
    """Random images [3, S, S] in 0..1 with ``boxes_per_image`` random boxes of 10-50% of the side each."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, image_size, image_size, generator=g))
        wh = (0.1 + 0.4 * torch.rand(boxes_per_image, 2, generator=g)) * image_size
        xy = torch.rand(boxes_per_image, 2, generator=g) * (image_size - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=g)})
    return images, targets


def time_train_steps(
    detector: str = "fasterrcnn_mobilenet_v3", *, batch_size: int = 4, image_size: int = 256, repeats: int = 5,
    device: str = "cpu", teacher_arch: str = "resnet18", num_classes: int = 10,
) -> dict[str, float]:
    """Median seconds per training step (forward + backward + SGD step) of each mode in MODES."""
    from cls2det.teacher import build_teacher

    torch.manual_seed(0)
    student = create_student(detector, num_classes, StudentConfig(detector=detector, image_size=image_size)).to(device)
    student.train()
    teacher = build_teacher(teacher_arch, num_classes, class_names=[str(i) for i in range(num_classes)]).to(device)
    teacher.freeze()
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    images, targets = synthetic_batch(batch_size, image_size, num_classes)
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    def step(kd: list[str]) -> float:
        config = DistillConfig(kd=kd)
        _sync(device)
        start = time.perf_counter()
        output = student(images, targets)
        loss = total_loss(output.losses, distillation_losses(output, teacher, config), config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode, kd in MODES.items():  # warm-up
        step(kd)
    for _ in range(repeats):
        for mode, kd in MODES.items():
            times[mode].append(step(kd))
    return {mode: statistics.median(t) for mode, t in times.items()}


def run_benchmarks(*, detector: str, batch_size: int, image_size: int, repeats: int, device: str) -> dict:
    """Print the step-time table and the crop benchmark; return both as a dict."""
    steps = time_train_steps(detector, batch_size=batch_size, image_size=image_size, repeats=repeats, device=device)
    base = steps["baseline"]
    print(f"train step, {detector}, batch {batch_size}, {image_size}px, {device}, median of {repeats}")
    print(f"{'mode':<14}{'s/step':>10}{'x baseline':>12}")
    for mode, seconds in steps.items():
        print(f"{mode:<14}{seconds:>10.3f}{seconds / base:>12.2f}")
    from cls2det.engine.bench_crops import format_table, run_crop_benchmark

    crops = run_crop_benchmark(boxes=256, images=2, size=1024, crop=112, repeats=repeats, device=device)
    print(format_table(crops))
    return {"steps": steps, "crops": crops}


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
