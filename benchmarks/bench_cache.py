"""Teacher caches at scale: build speed (boxes/s) and peak RSS of the build and of the memory-mapped reads.

Standalone; each measurement in a fresh process so that its peak RSS is its own::

    python benchmarks/bench_cache.py data  --out /tmp/synth --images 300          # COCO-shaped: 640x480, ~7.3 boxes
    python benchmarks/bench_cache.py build --data /tmp/synth --cache soft --workers 2
    python benchmarks/bench_cache.py build --data /tmp/synth --cache gt --former   # the former in-RAM build
    python benchmarks/bench_cache.py build --data /tmp/synth --cache crops --workers 2  # no teacher: the loader alone
    python benchmarks/bench_cache.py fake  --out /tmp/soft.safetensors --boxes 860000
    python benchmarks/bench_cache.py read  --file /tmp/soft.safetensors --lookups 2000

``build`` prints boxes, seconds, boxes/s, the peak RSS of the main process and its anonymous resident memory at the
end (the former build still holds every row there); ``read`` the peak RSS, and the anonymous / file-backed parts of
the resident set after the lookups (file-backed pages are the map's: shared between the ranks of a node, and dropped
by the kernel under memory pressure).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

# COCO train2017: 118,287 images, 860,001 boxes (7.27 per image), 80 classes, images ~640x480
BOXES_PER_IMAGE, CLASSES, WIDTH, HEIGHT = 7.27, 80, 640, 480


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def rss_parts_mb() -> dict[str, float]:
    lines = Path("/proc/self/status").read_text().splitlines()
    wanted = ("RssAnon", "RssFile")
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in lines if line.startswith(wanted)}


def make_data(out: Path, images: int, seed: int) -> None:
    """``out/annotations/train.json`` + ``out/images/``: ``images`` 640x480 JPEGs hard-linked from 16 distinct ones,
    a Poisson(7.27) count of boxes each, sides log-uniform in 8..400 px."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sources = []
    for k in range(16):
        noise = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
        path = out / f"source{k}.jpg"
        Image.fromarray(noise).resize((WIDTH, HEIGHT), Image.BILINEAR).save(path, quality=90)
        sources.append(path)
    records, anns = [], []
    for i in range(images):
        name = f"{i:012d}.jpg"
        target = out / "images" / name
        if not target.exists():
            os.link(sources[i % len(sources)], target)
        records.append({"id": i + 1, "file_name": name, "width": WIDTH, "height": HEIGHT})
        for _ in range(rng.poisson(BOXES_PER_IMAGE)):
            w, h = np.exp(rng.uniform(np.log(8), np.log(400), 2))
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, CLASSES + 1)),
                    "bbox": [round(float(x), 2), round(float(y), 2), round(float(w), 2), round(float(h), 2)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, CLASSES + 1)]
    coco = {"images": records, "annotations": anns, "categories": categories}
    (out / "annotations" / "train.json").write_text(json.dumps(coco))
    (out / "annotations" / "val.json").write_text(json.dumps({**coco, "images": records[:1], "annotations": []}))
    print(f"{out}: {images} images, {len(anns)} boxes")


def former_build(compute, dataset, size: int) -> int:
    """The build before #17, copied: one process, every image in turn, parts concatenated in RAM at the end."""
    from cls2det.distill import crop_boxes

    parts, pending = {}, []

    def flush():
        crops = torch.cat(pending)
        out = compute(torch.cat([crops, crops.flip(-1)]))
        for name, value in out.items():
            parts.setdefault(name, []).append(torch.stack(value.chunk(2), 1).half())
        pending.clear()

    for i in range(len(dataset)):
        image, target = dataset[i]
        boxes = target["boxes"]
        if len(boxes):
            pending.append(crop_boxes(image[None], boxes, torch.zeros(len(boxes), dtype=torch.int64), size=size))
        if sum(len(c) for c in pending) >= 128:
            flush()
    if pending:
        flush()
    tables = {name: torch.cat(p) for name, p in parts.items()}
    return len(next(iter(tables.values())))


@torch.no_grad()
def build(args) -> None:
    from cls2det.data import CocoDetection, load_split
    from cls2det.engine.cache_build import build_cache_file
    from cls2det.engine.teacher_cache import gt_feature_outputs, soft_label_outputs
    from cls2det.teacher import build_teacher

    torch.set_num_threads(args.threads)
    dataset = CocoDetection(load_split(args.data, "train"))
    teacher = build_teacher(args.arch, CLASSES, input_size=args.teacher_size).freeze()
    if args.cache == "soft":
        outputs, size = soft_label_outputs(teacher), args.teacher_size
    elif args.cache == "crops":  # no teacher: the loader's pace (decode + crop), what a GPU teacher leaves to wait on
        outputs, size = (lambda crops: {"mean": crops.mean((2, 3))}), args.teacher_size
    else:
        outputs, size = gt_feature_outputs(teacher, args.taps.split(","), args.pool), args.sample_size
    out = Path(args.out)
    row_kb = sum(v[0].numel() for v in outputs(torch.zeros(1, 3, size, size)).values()) * 2 * 2 / 1024  # float16, flip
    before = peak_rss_mb()
    start = time.perf_counter()
    if args.former:
        boxes = former_build(outputs, dataset, size)
    else:
        build_cache_file(out, dataset, outputs, size=size, key={}, device="cpu", workers=args.workers)
        boxes = _rows(out)
    seconds = time.perf_counter() - start
    how = "former" if args.former else f"workers={args.workers}"
    print(
        f"build {args.cache} {how}: {boxes} boxes in {seconds:.1f} s = {boxes / seconds:.1f} boxes/s; "
        f"peak RSS {peak_rss_mb():.0f} MB (before the build {before:.0f} MB), RssAnon at the end "
        f"{rss_parts_mb()['RssAnon']:.0f} MB ({boxes} rows of {row_kb:.1f} kB: {boxes * row_kb / 1024:.0f} MB)"
    )


def _rows(path: Path) -> int:
    from cls2det.engine.cache_file import read_header

    entries, _, _ = read_header(path)
    return next(e["shape"][0] for name, e in entries.items() if name.startswith("table."))


def fake(args) -> None:
    """A soft-label cache file of ``--boxes`` rows ([M, 2, 80] float16), written a chunk at a time."""
    from cls2det.engine import cache_file

    rows, images = args.boxes, int(args.boxes / BOXES_PER_IMAGE)
    counts = np.full(images, rows // images)
    counts[: rows - counts.sum()] += 1
    specs = {
        "image_ids": (np.int64, (images,)),
        "offsets": (np.int64, (images,)),
        "table.logits": (np.float16, (rows, 2, CLASSES)),
    }
    out = cache_file.create(args.out, specs, {})
    out.write("image_ids", 0, np.arange(1, images + 1))
    out.write("offsets", 0, np.cumsum(counts) - counts)
    rng = np.random.default_rng(0)
    for a in range(0, rows, 65536):
        out.write("table.logits", a, rng.standard_normal((min(65536, rows - a), 2, CLASSES)))
    out.close()
    print(f"{args.out}: {rows} boxes, {images} images, {os.path.getsize(args.out) / 2**20:.0f} MB")


def read(args) -> None:
    from cls2det.engine.teacher_cache import SoftLabelCache

    before = peak_rss_mb()
    start = time.perf_counter()
    cache = SoftLabelCache.load(args.file)
    load_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    images = len(cache.image_ids)
    counts = torch.diff(cache.offsets, append=torch.tensor([len(cache.logits)]))
    start = time.perf_counter()
    for _ in range(args.lookups):
        index = torch.randint(0, images, (args.batch,), generator=g)
        ids = cache.image_ids[index]
        gt = (torch.rand(args.batch, generator=g) * counts[index]).long()
        cache.lookup(ids, gt, torch.rand(args.batch, generator=g) < 0.5)
    lookup_s = time.perf_counter() - start
    parts = rss_parts_mb()
    print(
        f"read {args.file} ({os.path.getsize(args.file) / 2**20:.0f} MB, {len(cache.logits)} boxes): load "
        f"{load_s * 1000:.0f} ms, {args.lookups} lookups of {args.batch} in {lookup_s:.2f} s; peak RSS "
        f"{peak_rss_mb():.0f} MB (after imports {before:.0f} MB); RssAnon {parts['RssAnon']:.0f} MB, "
        f"RssFile {parts['RssFile']:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("build")
    p.add_argument("--data", required=True)
    p.add_argument("--cache", choices=("soft", "gt", "crops"), default="soft")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--former", action="store_true", help="the former single-process in-RAM build")
    p.add_argument("--out", default="/tmp/bench_cache.safetensors")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--teacher-size", type=int, default=112)
    p.add_argument("--sample-size", type=int, default=112)
    p.add_argument("--taps", default="obj,l0")
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the main process (the probe: 1)")
    p = sub.add_parser("fake")
    p.add_argument("--out", required=True)
    p.add_argument("--boxes", type=int, default=860_001)
    p = sub.add_parser("read")
    p.add_argument("--file", required=True)
    p.add_argument("--lookups", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    commands = {"data": lambda a: make_data(a.out, a.images, a.seed), "build": build, "fake": fake, "read": read}
    commands[args.command](args)


if __name__ == "__main__":
    main()
