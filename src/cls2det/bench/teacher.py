"""Benchmark: the teacher's throughput on D_cls crops against the bare torchvision / timm network's, in one run.

"ours" is :class:`~cls2det.teacher.Teacher` as cls2det runs it (pixels in 0..1, normalised inside its forward, the
loss of :func:`~cls2det.teacher.train.classification_loss`); "bare" is the same network alone on crops normalised
beforehand, as a torchvision transform would, with ``F.cross_entropy``. Both infer (``inference_mode``) and train
(forward + loss + backward + SGD step) on the same crops, interleaved so that machine noise hits them alike; the
report is crops per second and the ratio ours / bare (the target: at least 0.9).
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F

from cls2det.bench.crops import seconds

MODES = ("infer", "train")


def teacher_throughput(
    arch: str = "resnet18",
    *,
    input_size: int = 112,
    batch_size: int = 64,
    num_classes: int = 10,
    repeats: int = 5,
    device: str = "cpu",
    label_smoothing: float = 0.1,
) -> dict[str, dict[str, float]]:
    """``{mode: {"ours": crops/s, "bare": crops/s}}`` for ``mode`` in ("infer", "train"): medians of ``repeats``."""
    from cls2det.teacher import build_teacher
    from cls2det.teacher.train import classification_loss

    torch.manual_seed(0)
    teacher = build_teacher(arch, num_classes, input_size=input_size).to(device)
    bare = copy.deepcopy(teacher.net)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch_size, 3, input_size, input_size, generator=g).to(device)  # [B, 3, S, S] in 0..1
    labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    with torch.no_grad():
        normalized = teacher.normalize(pixels)  # what a Normalize transform hands the bare network
    sgd = {"ours": torch.optim.SGD(teacher.parameters(), lr=1e-4), "bare": torch.optim.SGD(bare.parameters(), lr=1e-4)}
    losses = {
        "ours": lambda: classification_loss(teacher(pixels), labels, teacher.loss, label_smoothing),
        "bare": lambda: F.cross_entropy(bare(normalized), labels, label_smoothing=label_smoothing),
    }

    def infer(name: str) -> None:
        with torch.inference_mode():
            (teacher.eval()(pixels) if name == "ours" else bare.eval()(normalized)).sum().item()

    def train(name: str) -> None:
        (teacher if name == "ours" else bare).train()
        sgd[name].zero_grad(set_to_none=True)
        losses[name]().backward()
        sgd[name].step()

    result = {}
    for mode, run in (("infer", infer), ("train", train)):
        times: dict[str, list[float]] = {"ours": [], "bare": []}
        for name in times:  # warm-up
            run(name)
        for i in range(repeats):
            for name in ("ours", "bare") if i % 2 == 0 else ("bare", "ours"):
                times[name].append(seconds(lambda run=run, name=name: run(name), device))
        result[mode] = {name: batch_size / statistics.median(t) for name, t in times.items()}
    return result


def format_throughput(result: dict[str, dict[str, float]], title: str = "teacher throughput on D_cls crops") -> str:
    lines = [title, f"{'mode':<8}{'ours crops/s':>14}{'bare crops/s':>14}{'ours / bare':>13}"]
    for mode, row in result.items():
        lines.append(f"{mode:<8}{row['ours']:>14.1f}{row['bare']:>14.1f}{row['ours'] / row['bare']:>13.3f}")
    return "\n".join(lines)
