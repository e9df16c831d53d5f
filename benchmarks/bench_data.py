"""The data side at scale, in one run: teacher crop loader (old per-crop path vs per-image path), student loader,
``load_split`` time and peak RSS.

    python benchmarks/coco_synth.py /work/coco_synth                      # once: a COCO-2017-shaped dataset
    python benchmarks/bench_data.py /work/coco_synth --workers 0 --batches 20

* per-crop (old): a shuffled DataLoader over crops where every crop decodes its whole image to float (the former
  ``ClassificationCrops(in_memory=False)``, copied here);
* per-image (new): ``ClassificationCrops(storage="stream")`` with its ``CropBatchSampler`` (an image's crops share
  a batch, each image decoded once per batch, only the crop windows converted to float);
* student: ``CocoDetection`` (decode + targets) in batches of ``--student-batch``;
* ``load_split``: wall time and peak RSS of a fresh process that imports cls2det and loads the split.

Times start after the first batch (worker start-up excluded); crops/s and images/s are per run, not per core.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from cls2det.data import ClassificationCrops, CocoDetection, collate, load_split
from cls2det.data.coco import read_image
from cls2det.data.crops import resize_crop

LOAD_SPLIT = """
import json, resource, sys, time
from cls2det.data import load_split
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
start = time.perf_counter()
split = load_split(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_before": before, "rss_after": rss(),
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


class PerCropStream(torch.utils.data.Dataset):
    """The former streamed D_cls: each crop decodes its whole image to float, then crops and resizes."""

    def __init__(self, crops: ClassificationCrops) -> None:
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int):
        split, index = self.crops.split, int(self.crops.image_index[i])
        pixels = read_image(split.image_path(index), split.image_record(index), source=split.annotation_file)
        window = tuple(self.crops.windows[i].tolist())
        return resize_crop(pixels, window, self.crops.size).clamp_(0, 1), int(self.crops.labels[i])


def rate(loader, batches: int, count) -> float:
    """Items per second over ``batches`` batches after the first one."""
    it = iter(loader)
    next(it)
    items, start = 0, time.perf_counter()
    for _ in range(batches):
        items += count(next(it))
    return items / (time.perf_counter() - start)


def measure_load_split(data: str, split: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_SPLIT, data, split], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="dataset directory or data YAML")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batches", type=int, default=20, help="measured batches per loader")
    parser.add_argument("--batch-size", type=int, default=64, help="teacher crops per batch")
    parser.add_argument("--student-batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-load-split", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    if not args.skip_load_split:
        load = measure_load_split(args.data, args.split)
        gib = 2**30
        rows.append(("load_split time", f"{load['seconds']:.1f} s", ""))
        rows.append(("load_split peak RSS", f"{load['peak'] / gib:.2f} GiB", "whole process, imports included"))
        kept = (load["rss_after"] - load["rss_before"]) / gib
        rows.append(("load_split RSS kept", f"{kept:.2f} GiB", f"over {load['rss_before'] / gib:.2f} GiB of imports"))

    split = load_split(args.data, args.split)
    crops = ClassificationCrops(split, size=args.size, storage="stream")
    workers = {"num_workers": args.workers, "persistent_workers": args.workers > 0}
    generator = torch.Generator().manual_seed(args.seed)
    old = torch.utils.data.DataLoader(
        PerCropStream(crops), batch_size=args.batch_size, shuffle=True, generator=generator, **workers
    )
    sampler = crops.batch_sampler(args.batch_size, seed=args.seed)
    new = torch.utils.data.DataLoader(crops, batch_sampler=sampler, **workers)
    per_crop = rate(old, args.batches, lambda batch: len(batch[1]))
    per_image = rate(new, args.batches, lambda batch: len(batch[1]))
    rows.append(("teacher crops/s, per-crop (old)", f"{per_crop:.0f}", f"batch {args.batch_size}"))
    rows.append(("teacher crops/s, per-image (new)", f"{per_image:.0f}", f"ratio {per_image / per_crop:.2f}x"))
    student = torch.utils.data.DataLoader(
        CocoDetection(split),
        batch_size=args.student_batch,
        shuffle=True,
        generator=generator,
        collate_fn=collate,
        **workers,
    )
    images = rate(student, args.batches, lambda batch: len(batch[0]))
    rows.append(("student images/s", f"{images:.1f}", f"batch {args.student_batch}"))

    print(f"data {args.data} ({args.split}: {split.num_images} images, {len(crops)} crops), workers {args.workers}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
