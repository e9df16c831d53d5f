"""``cls2det bench``: the cost of distillation over plain training, measured in one process run.

Each KD mode is timed with the teacher **online** (the GT crops go through the teacher every step) and **cached**
(KD_cls's soft labels and KD_loc's pooled GT-crop features come from the caches of :mod:`cls2det.engine.teacher_cache`,
built once from the synthetic batch's GT boxes before timing); with ``channels_last`` every variant is timed once
more with student and teacher in channels_last memory format; with ``teacher_precision`` the cached KD_loc modes (the
ones that still run the teacher, on the predicted crops) are timed once more with the teacher in that precision
(``distill.teacher_precision``); ``precision`` runs every step under that autocast, as Fabric's ``train.precision``.
Variants are timed round-robin so that machine noise hits them alike, each round in a new (seeded) random order: a
step right after a heavier variant runs on colder caches and freshly faulted pages, and a fixed order gave that
penalty to the same variant every round (the baseline, always right after the other format's "+all cached", measured
8-16% slower than "+kd_cls cached", which does strictly more work). The table reports medians, ratios to the
baseline step, peak memory and the teacher's forward passes per step (0 for the GT branch of a cached mode: the
cache really is used).

Peak memory is that of one training step above what was held before it: on CUDA ``torch.cuda.max_memory_allocated``
reset per variant; on CPU the resident set's high-water mark (VmHWM, reset per variant) in one fresh subprocess with
glibc's mmap threshold fixed so that freed tensors leave the resident set (as in :mod:`cls2det.bench.crops`),
so that neither the timing nor one variant's freed memory hides another's peak.
"""

from __future__ import annotations

import copy
import gc
import random
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from cls2det.bench.crops import seconds
from cls2det.bench.memory import peak_above, run_in_subprocess
from cls2det.config import DistillConfig, StudentConfig
from cls2det.engine.objective import distillation_losses, loss_weights, precision_autocast, total_loss
from cls2det.engine.teacher_cache import build_gt_feature_cache, build_soft_label_cache
from cls2det.students import create_student

MODES = {"baseline": [], "+kd_cls": ["cls"], "+kd_loc": ["kd_loc"], "+all": ["cls", "kd_loc"]}  # +all: the full method


@dataclass(frozen=True)
class Variant:
    """One timed row: a KD mode, its teacher's GT branch online or from the caches, the memory format, the teacher's
    precision (``distill.teacher_precision``)."""

    mode: str  # a key of MODES
    cached: bool = False
    channels_last: bool = False
    teacher_precision: str = "auto"

    @property
    def name(self) -> str:
        teacher = (" cached" if self.cached else " online") if MODES[self.mode] else ""
        precision = "" if self.teacher_precision == "auto" else f" teacher {self.teacher_precision}"
        return self.mode + teacher + precision + (" channels_last" if self.channels_last else "")


def variants(channels_last: bool = False, teacher_precision: str | None = None) -> list[Variant]:
    """The baseline and every KD mode online then cached; with ``teacher_precision`` also each cached KD_loc mode
    with its teacher in that precision; with ``channels_last`` all of them again in that format."""
    rows = []
    for fmt in (False, True) if channels_last else (False,):
        for mode, kd in MODES.items():
            rows += [Variant(mode, cached, fmt) for cached in ((False, True) if kd else (False,))]
            if teacher_precision and "kd_loc" in kd:
                rows.append(Variant(mode, True, fmt, teacher_precision))
    return rows


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, boxes_per_image: int = 4, seed: int = 0):
    """Random images [3, S, S] in 0..1 with ``boxes_per_image`` random boxes of 10-50% of the side each; image ids
    0..N-1 (the caches' row index)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(batch_size):
        images.append(torch.rand(3, image_size, image_size, generator=g))
        wh = (0.1 + 0.4 * torch.rand(boxes_per_image, 2, generator=g)) * image_size
        xy = torch.rand(boxes_per_image, 2, generator=g) * (image_size - wh)
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], 1),
                "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=g),
                "image_id": torch.tensor(i),
            }
        )
    return images, targets


class CountingTeacher:
    """The teacher, counting its forward passes (``teacher(crops)`` and ``teacher.forward_taps(crops, taps)``)."""

    def __init__(self, teacher) -> None:
        self.teacher, self.calls = teacher, 0

    def __call__(self, pixels):
        self.calls += 1
        return self.teacher(pixels)

    def forward_taps(self, pixels, taps, **kwargs):
        self.calls += 1
        return self.teacher.forward_taps(pixels, taps, **kwargs)

    def __getattr__(self, name):  # input_size, class_names, ...
        return getattr(self.teacher, name)


class StepBench:
    """A student, its frozen teacher, one synthetic batch and the teacher caches; :meth:`step` runs one training step
    (forward + backward + SGD step) of a :class:`Variant`."""

    def __init__(
        self,
        detector: str,
        *,
        batch_size: int,
        image_size: int,
        device: str,
        teacher_arch: str = "resnet18",
        teacher_size: int = 112,
        sample_size: int = 112,
        num_classes: int = 10,
        channels_last: bool = False,
        precision: str = "32-true",
    ) -> None:
        from cls2det.teacher import build_teacher

        torch.manual_seed(0)
        self.device, self.sample_size = device, sample_size
        # the whole step's autocast, as Fabric's precision plugin applies it around the forward
        self.autocast = precision_autocast(precision, torch.device(device))
        student = create_student(detector, num_classes, StudentConfig(detector=detector, image_size=image_size))
        student = student.to(device).train()
        teacher = build_teacher(teacher_arch, num_classes, input_size=teacher_size).to(device).freeze()
        images, targets = synthetic_batch(batch_size, image_size, num_classes)
        self.images = [i.to(device) for i in images]
        self.targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        # the caches, from the batch's GT boxes and before any timing, as `cls2det train` builds them before step 1
        dataset, config = list(zip(images, targets)), DistillConfig(sample_size=sample_size)
        self.soft_labels = build_soft_label_cache(teacher, dataset, device=device).to(device)
        self.gt_features = build_gt_feature_cache(
            teacher, dataset, taps=config.taps, size=sample_size, pools=config.tap_pools(), device=device
        ).to(device)
        self.nets = {False: self._with_optimizer(student, teacher)}
        if channels_last:  # a copy with the same weights, so that both formats are timed in this run
            cl = torch.channels_last
            self.nets[True] = self._with_optimizer(
                copy.deepcopy(student).to(memory_format=cl), copy.deepcopy(teacher).to(memory_format=cl)
            )

    @staticmethod
    def _with_optimizer(student, teacher):
        optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4)
        return student, CountingTeacher(teacher), optimizer

    def teacher_calls(self, variant: Variant) -> int:
        return self.nets[variant.channels_last][1].calls

    def config(self, variant: Variant) -> DistillConfig:
        return DistillConfig(
            kd=MODES[variant.mode], sample_size=self.sample_size, teacher_precision=variant.teacher_precision
        )

    def lookups(self, variant: Variant) -> dict:
        """The cache lookups ``distillation_losses`` takes (``soft_labels``, ``gt_features``) for a cached variant."""
        if not variant.cached:
            return {}
        image_ids, flipped = torch.arange(len(self.images)), torch.zeros(len(self.images), dtype=torch.bool)

        def rows(positives):  # (image id, GT index, flipped) per positive; no flips in the benchmark
            index = positives.image_index.cpu()
            return image_ids[index], positives.gt_index, flipped[index]

        return {
            "soft_labels": lambda p: self.soft_labels.lookup(*rows(p)),
            "gt_features": lambda p: self.gt_features.lookup(*rows(p)),
        }

    def step(self, variant: Variant) -> float:
        """Seconds of one training step of ``variant`` (the caches' lookups included, their building not)."""
        student, teacher, optimizer = self.nets[variant.channels_last]
        config, lookups = self.config(variant), self.lookups(variant)

        def train_step() -> None:
            with self.autocast:
                output = student(self.images, self.targets)
                kd_losses = distillation_losses(output, teacher, config, **lookups)
                loss = total_loss(output.losses, kd_losses, loss_weights(config))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return seconds(train_step, self.device)

    def peak_memory_mib(self, variant: Variant) -> float:
        """Peak memory of one step of ``variant`` above what was held before it, in MiB (see the module docstring:
        on CPU only meaningful in a process started with a fixed ``MALLOC_MMAP_THRESHOLD_``)."""
        gc.collect()
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.step(variant)
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        return peak_above(lambda: self.step(variant))


def time_train_steps(
    detector: str = "fasterrcnn_mobilenet_v3",
    *,
    batch_size: int = 4,
    image_size: int = 256,
    repeats: int = 5,
    device: str = "cpu",
    teacher_arch: str = "resnet18",
    teacher_size: int = 112,
    sample_size: int = 112,
    num_classes: int = 10,
    channels_last: bool = False,
    teacher_precision: str | None = None,
    precision: str = "32-true",
    memory: bool = True,
) -> dict[str, dict]:
    """Per variant name: ``{"time_s": median seconds per step, "teacher_calls": teacher forward passes per step,
    "peak_mib": peak memory of a step (None without ``memory``)}``, in :func:`variants` order."""
    setup: dict[str, Any] = dict(
        batch_size=batch_size,
        image_size=image_size,
        device=device,
        teacher_arch=teacher_arch,
        teacher_size=teacher_size,
        sample_size=sample_size,
        num_classes=num_classes,
        channels_last=channels_last,
        precision=precision,
    )
    rows = variants(channels_last, teacher_precision)
    bench = StepBench(detector, **setup)
    for variant in rows:  # warm-up
        bench.step(variant)
    times: dict[Variant, list[float]] = {v: [] for v in rows}
    calls = dict.fromkeys(rows, 0)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        order = list(rows)
        shuffle(order)
        for variant in order:
            before = bench.teacher_calls(variant)
            times[variant].append(bench.step(variant))
            calls[variant] += bench.teacher_calls(variant) - before
    peaks = dict.fromkeys(rows)
    if memory and str(device).startswith("cuda"):
        peaks = {variant: bench.peak_memory_mib(variant) for variant in rows}
    elif memory:
        del bench
        peaks = dict(zip(rows, _peaks_in_subprocess(detector, setup, teacher_precision)))
    return {
        v.name: {"time_s": statistics.median(times[v]), "teacher_calls": calls[v] / repeats, "peak_mib": peaks[v]}
        for v in rows
    }


def _peaks_in_subprocess(detector: str, setup: dict, teacher_precision: str | None) -> list[float]:
    arguments = {"detector": detector, "teacher_precision": teacher_precision, **setup}
    return run_in_subprocess("cls2det.bench.step:memory_worker", arguments)


def memory_worker(detector: str, teacher_precision: str | None, **setup) -> list[float]:
    """Run in a fresh process: each variant's peak step memory (MiB), after one warm-up step of "+all online" in each
    memory format (it runs every code path the other variants run, so no one-time initialisation is counted)."""
    rows = variants(setup["channels_last"], teacher_precision)
    bench = StepBench(detector, **setup)
    for variant in rows:
        if variant.mode == "+all" and not variant.cached:
            bench.step(variant)
    return [bench.peak_memory_mib(variant) for variant in rows]


def format_step_table(steps: dict[str, dict], title: str) -> str:
    """The step-time table as the README prints it (Markdown): one row per variant; "x base" is the time over the
    baseline **of the same memory format**; with channels_last rows, the two formats side by side. Peak memory (and
    its ratio to the baseline's) and the teacher's passes per step are the contiguous variant's."""
    suffix = " channels_last"
    contiguous = [name for name in steps if not name.endswith(suffix)]
    side_by_side = any(name + suffix in steps for name in contiguous)
    base = steps["baseline"]
    header = ["variant", "s/step", "x base"]
    if side_by_side:
        header = ["variant", "contiguous s/step", "x base", "channels_last s/step", "x base"]
    header += ["peak MiB", "x base", "teacher passes/step"]
    lines = [title, _markdown_row(header), _markdown_row(["---"] + ["---:"] * (len(header) - 1))]
    for name in contiguous:
        row = steps[name]
        cells = [name, f"{row['time_s']:.3f}", f"{row['time_s'] / base['time_s']:.2f}"]
        if side_by_side:
            other, other_base = steps.get(name + suffix), steps.get("baseline" + suffix)
            if other is None or other_base is None:
                cells += ["-", "-"]
            else:
                cells += [f"{other['time_s']:.3f}", f"{other['time_s'] / other_base['time_s']:.2f}"]
        peak = row["peak_mib"]
        if peak is None:
            cells += ["-", "-"]
        else:
            cells += [f"{peak:.1f}", f"{peak / max(base['peak_mib'], 1e-6):.2f}"]
        cells.append(f"{row['teacher_calls']:.0f}")
        lines.append(_markdown_row(cells))
    if side_by_side:
        ratios = ", ".join(
            f"{name} {steps[name + suffix]['time_s'] / steps[name]['time_s']:.2f}"
            for name in contiguous
            if name + suffix in steps
        )
        lines.append(f"channels_last time / contiguous time: {ratios}")
    return "\n".join(lines)


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def run_benchmarks(
    *,
    detector: str,
    batch_size: int,
    image_size: int,
    repeats: int,
    device: str,
    teacher_size: int = 112,
    sample_size: int = 112,
    channels_last: bool = False,
    teacher_precision: str | None = None,
    precision: str = "32-true",
    memory: bool = True,
) -> dict:
    """Print the step-time table, the crop benchmark and the teacher's throughput; return the three as a dict."""
    steps = time_train_steps(
        detector,
        batch_size=batch_size,
        image_size=image_size,
        repeats=repeats,
        device=device,
        teacher_size=teacher_size,
        sample_size=sample_size,
        channels_last=channels_last,
        teacher_precision=teacher_precision,
        precision=precision,
        memory=memory,
    )
    title = (
        f"train step, {detector}, batch {batch_size}, {image_size}px, precision {precision}, teacher resnet18 at "
        f"{teacher_size}px, s={sample_size}, {device} ({torch.get_num_threads()} threads), median of {repeats}; "
        "x base: / the baseline of the same memory format"
    )
    print(format_step_table(steps, title), flush=True)
    from cls2det.bench.crops import format_table, run_crop_benchmark
    from cls2det.bench.teacher import format_throughput, teacher_throughput

    crops = run_crop_benchmark(boxes=256, images=2, size=1024, crop=112, repeats=repeats, device=device, memory=memory)
    print(format_table(crops), flush=True)
    throughput = teacher_throughput("resnet18", input_size=teacher_size, repeats=repeats, device=device)
    print(format_throughput(throughput))
    return {"steps": steps, "crops": crops, "teacher": throughput}
