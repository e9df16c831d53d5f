"""COCO evaluation at COCO val scale: faster-coco-eval vs pycocotools, in one run (issue #17).

Synthetic and COCO-like: 5,000 images of 640x480, 80 categories with COCO's ids, ~7.3 GT boxes per image (Poisson;
~1% crowd regions), 100 detections per image (jittered copies of the GT, some with the wrong class, plus background
boxes). Each backend runs in its own child process so its peak RSS is its own; the parent prints seconds (evaluate +
accumulate + summarize, as ``cls2det.evaluation.evaluate_coco`` runs them), peak RSS and the max abs difference over
the 10 scalar metrics and the 10 per-IoU APs (percent points).

PYTHONPATH=src python benchmarks/bench_eval.py --images 5000 --dets 100
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]  # the 80 in use


def build(num_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 640, "height": 480})
        n = int(rng.poisson(7.3))
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=n))  # [n] small, medium and large objects
        wh = np.stack([side * rng.uniform(0.6, 1.4, n), side * rng.uniform(0.6, 1.4, n)], 1).clip(2, [640, 480])
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([640, 480]) - wh)  # [n, 2]
        cats = rng.choice(COCO_IDS, n)
        for k in range(n):
            box = [*xy[k].tolist(), *wh[k].tolist()]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(cats[k]),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
        m = 0
        for k in range(n):  # 1-4 jittered hits per object
            for _ in range(int(rng.integers(1, 5))):
                if m == dets_per_image:
                    break
                j = rng.uniform(-0.3, 0.3, 4) * np.r_[wh[k], wh[k]]
                box = [xy[k, 0] + j[0], xy[k, 1] + j[1], max(1.0, wh[k, 0] + j[2]), max(1.0, wh[k, 1] + j[3])]
                cat = int(cats[k]) if rng.random() > 0.2 else int(rng.choice(COCO_IDS))
                dets.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": float(rng.random())})
                m += 1
        for _ in range(dets_per_image - m):  # background up to dets_per_image
            w, h = rng.uniform(4, 300, 2)
            box = [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), float(w), float(h)]
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice(COCO_IDS)),
                    "bbox": box,
                    "score": float(rng.random()),
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": i, "name": str(i)} for i in COCO_IDS]}, dets


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(backend: str, num_images: int, dets_per_image: int) -> None:
    from cls2det.evaluation import evaluate_coco

    gt, dets = build(num_images, dets_per_image)
    rss_data = _rss_mb()
    t0 = time.perf_counter()
    metrics = evaluate_coco(gt, dets, backend=backend)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "peak_rss_mb": _rss_mb(), "rss_after_data_mb": rss_data, "metrics": metrics}
    out["num_gt"], out["num_dets"] = len(gt["annotations"]), len(dets)
    print(json.dumps(out, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--backends", nargs="+", default=["faster", "pycocotools"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images, args.dets)
        return

    runs = {}
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--child", backend, "--images", str(args.images), "--dets", str(args.dets)]
        runs[backend] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    first = runs[args.backends[0]]
    per_image = first["num_gt"] / args.images
    print(f"{args.images} images, {first['num_gt']} GT ({per_image:.2f}/image), {first['num_dets']} detections")
    print(f"{'backend':<12} {'seconds':>8} {'peak RSS':>10} {'RSS after data':>15} {'mAP':>7} {'AP50':>7}")
    for backend, r in runs.items():
        m = r["metrics"]
        peak, data = r["peak_rss_mb"] / 1024, r["rss_after_data_mb"] / 1024
        print(f"{backend:<12} {r['seconds']:8.2f} {peak:8.2f} GB {data:12.2f} GB {m['mAP']:7.3f} {m['AP50']:7.3f}")
    if len(runs) == 2:
        a, b = (runs[k]["metrics"] for k in args.backends)
        keys = [k for k in a if k != "AP_per_iou"]
        diffs = [abs(a[k] - b[k]) for k in keys] + [
            abs(a["AP_per_iou"][k] - b["AP_per_iou"][k]) for k in a["AP_per_iou"]
        ]
        ratio = runs[args.backends[1]]["seconds"] / runs[args.backends[0]]["seconds"]
        print(
            f"max abs diff over {len(diffs)} numbers: {max(diffs):.3g} points; {args.backends[0]} {ratio:.1f}x faster"
        )


if __name__ == "__main__":
    main()
