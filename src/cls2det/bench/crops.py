"""Benchmark: crop_boxes (one grid_sample per image, grids stacked) vs crop_boxes_naive (image replicated per box).

Times forward + backward (gradient w.r.t. the boxes, as in KD_loc / loc) of both variants in the same run, measures
their peak memory, checks that they agree, and prints a table with the ratios.

    python benchmarks/bench_crops.py --boxes 256 --images 2 --size 1024 --crop 112 --repeats 5 --device cpu

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what the inputs hold; on CPU each variant runs once in
a fresh subprocess that reports its peak resident set size (VmHWM, reset after allocating the inputs and a warm-up
call; ``ru_maxrss`` where that is unavailable) above its RSS at that point, with glibc's mmap threshold fixed so that
freed tensors leave the RSS. Separate processes keep one variant's allocator caches from hiding the other's peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from cls2det.bench.memory import peak_above, run_in_subprocess
from cls2det.distill import crop_boxes, crop_boxes_naive

VARIANTS = {"ours": crop_boxes, "naive": crop_boxes_naive}


def make_inputs(boxes: int, images: int, size: int, device: str, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Images [N, 3, size, size] in 0..1, K random boxes (8 px to half the image) spread evenly over the images."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(images, 3, size, size, generator=g)
    wh = torch.rand(boxes, 2, generator=g) * (size / 2 - 8) + 8
    xy = torch.rand(boxes, 2, generator=g) * (size - wh)
    box = torch.cat([xy, xy + wh], dim=1)
    index = torch.randperm(boxes, generator=g) % images  # shuffled, as positives come from an assigner
    return pixels.to(device), box.to(device), index.to(device)


def _sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def seconds(run, device: str | torch.device) -> float:
    """Wall seconds of ``run()``, the device synchronised before and after (CUDA runs asynchronously)."""
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def forward_backward(fn, images, boxes, index, crop: int):
    """One KD_loc-like step: crop with gradient w.r.t. the boxes, reduce, backward. Returns (crops, box grad)."""
    b = boxes.detach().requires_grad_()
    out = fn(images, b, index, size=crop)  # [K, 3, crop, crop]
    out.mean().backward()
    return out.detach(), b.grad


def time_variants(images, boxes, index, crop: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of forward + backward per variant, interleaved so both see the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for fn in VARIANTS.values():  # warm-up
        forward_backward(fn, images, boxes, index, crop)
    for _ in range(repeats):
        for name, fn in VARIANTS.items():
            times[name].append(seconds(lambda fn=fn: forward_backward(fn, images, boxes, index, crop), device))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mib(
    variant: str, boxes: int, images: int, size: int, crop: int, device: str, seed: int, threads: int = 0
) -> float:
    """Peak extra memory (MiB) of one forward + backward of ``variant`` above its inputs."""
    if device.startswith("cuda"):
        inputs = make_inputs(boxes, images, size, device, seed)
        _warm_up(VARIANTS[variant], *inputs, crop)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(VARIANTS[variant], *inputs, crop)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    arguments = dict(variant=variant, boxes=boxes, images=images, size=size, crop=crop, seed=seed, threads=threads)
    return run_in_subprocess("cls2det.bench.crops:memory_worker", arguments)


def _warm_up(fn, images, boxes, index, crop: int) -> None:
    """One tiny call, so that library initialisation (kernels, thread pools) is not counted as the variant's peak."""
    forward_backward(fn, images[:1, :, :64, :64], boxes[:1] / 16, index[:1] * 0, crop)


def memory_worker(variant: str, boxes: int, images: int, size: int, crop: int, seed: int, threads: int) -> float:
    """Run in a fresh process by :func:`peak_memory_mib`: the peak extra MiB of one forward + backward."""
    if threads > 0:
        torch.set_num_threads(threads)
    images_, boxes_, index = make_inputs(boxes, images, size, "cpu", seed)
    fn = VARIANTS[variant]
    _warm_up(fn, images_, boxes_, index, crop)
    return peak_above(lambda: forward_backward(fn, images_, boxes_, index, crop))


def run_crop_benchmark(
    *,
    boxes: int = 256,
    images: int = 2,
    size: int = 1024,
    crop: int = 112,
    repeats: int = 5,
    device: str = "cpu",
    memory: bool = True,
    seed: int = 0,
    threads: int = 0,
) -> dict:
    """Run the benchmark; returns {"config", "ours", "naive", "speedup", "memory_ratio", "max_abs_diff"}.

    ``ours`` / ``naive``: {"time_s": median forward+backward seconds, "peak_mib": peak extra memory or None}.
    ``speedup`` = naive time / ours; ``memory_ratio`` = naive peak / ours; ``max_abs_diff``: largest difference of
    the crops and of the box gradients between the two variants. ``threads`` > 0 sets torch's CPU threads.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    inputs = make_inputs(boxes, images, size, device, seed)
    (out_a, grad_a), (out_b, grad_b) = (forward_backward(fn, *inputs, crop) for fn in VARIANTS.values())
    max_abs_diff = {"crops": (out_a - out_b).abs().max().item(), "box_grad": (grad_a - grad_b).abs().max().item()}
    del out_a, out_b
    times = time_variants(*inputs, crop, repeats, device)
    del inputs
    result: dict[str, Any] = {
        "config": dict(
            boxes=boxes,
            images=images,
            size=size,
            crop=crop,
            repeats=repeats,
            device=device,
            threads=torch.get_num_threads(),
        ),
        "max_abs_diff": max_abs_diff,
    }
    for name in VARIANTS:
        peak = peak_memory_mib(name, boxes, images, size, crop, device, seed, threads) if memory else None
        result[name] = {"time_s": times[name], "peak_mib": peak}
    result["speedup"] = times["naive"] / times["ours"]
    if memory:
        result["memory_ratio"] = result["naive"]["peak_mib"] / max(result["ours"]["peak_mib"], 1e-6)
    return result


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"crop_boxes, K={c['boxes']} boxes from {c['images']} images of {c['size']}x{c['size']}, s={c['crop']}, "
        f"{c['device']} ({c['threads']} threads), forward+backward, median of {c['repeats']}",
        f"{'variant':<8} {'time (s)':>10} {'peak (MiB)':>12}",
    ]
    for name in VARIANTS:
        peak = result[name]["peak_mib"]
        lines.append(f"{name:<8} {result[name]['time_s']:>10.4f} {'-' if peak is None else f'{peak:.1f}':>12}")
    ratio = f"{result['memory_ratio']:.1f}x less memory" if "memory_ratio" in result else "memory not measured"
    lines.append(
        f"ours vs naive: {result['speedup']:.2f}x faster, {ratio}; max |diff| crops "
        f"{result['max_abs_diff']['crops']:.2e}, box grads {result['max_abs_diff']['box_grad']:.2e}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=256)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--crop", type=int, default=112, help="crop side s in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", action="store_true", help="print the result dict as JSON after the table")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = run_crop_benchmark(
        boxes=args.boxes,
        images=args.images,
        size=args.size,
        crop=args.crop,
        repeats=args.repeats,
        device=args.device,
        memory=not args.no_memory,
        seed=args.seed,
        threads=args.threads,
    )
    print(format_table(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
