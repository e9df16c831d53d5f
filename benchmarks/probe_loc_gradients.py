"""Do loc and KD_loc pull a box towards its GT box? Their gradient on the GT boxes of a split, displaced to IoU u.

For every GT box of the first ``--images`` images of ``--split``, boxes at IoU u with it are drawn in random
directions (``cls2det.distill.gradient_probe.boxes_at_iou``) and each loss's gradient with respect to the box is
compared with the direction to the GT box: mean cosine (1 = straight at it, 0 = no signal) and the share of boxes
whose IoU rises after a 0.5 px step along the descent direction. Losses: an L1 on the box coordinates (the kind
of signal a detector's box loss gives, for reference), ``loc`` (pixels, pool 4) and ``KD_loc``
with the teacher of ``teacher_run`` at the taps obj / l0 / obj+l0 (the release's pools 4 / 8), exactly as training
calls them (``cls2det.distill.losses``), at crop side(s) ``--sizes``.

    python benchmarks/probe_loc_gradients.py DATA TEACHER_RUN [--images 100] [--sizes 32 112] [--seed 0]
"""

import argparse

import torch

from cls2det.config import KD_LOC_GAP_SIZE, DistillConfig
from cls2det.data import CocoDetection, load_split
from cls2det.distill.gradient_probe import boxes_at_iou, gradient_alignment
from cls2det.distill.losses import kd_loc_loss, loc_loss
from cls2det.teacher import load_teacher

IOUS = [0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
TAPS = {"KD_loc obj": ["obj"], "KD_loc l0": ["l0"], "KD_loc obj+l0": ["obj", "l0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("teacher_run")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 112])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    dataset = CocoDetection(load_split(args.data, args.split))
    samples = [dataset[i] for i in range(min(args.images, len(dataset)))]
    images = torch.stack([pixels for pixels, _ in samples])  # [N, 3, H, W] in 0..1 (the demo's images share a size)
    gt = torch.cat([target["boxes"] for _, target in samples])  # [K, 4]
    index = torch.cat([torch.full((len(t["boxes"]),), i, dtype=torch.long) for i, (_, t) in enumerate(samples)])
    teacher = load_teacher(args.teacher_run).eval()
    teacher.freeze()

    def losses(size: int) -> dict:
        found = {
            "L1 on the box coordinates (reference)": lambda b: (b - gt).abs().sum(),  # what a box loss sees
            "loc": lambda b: loc_loss(images, b, gt, index, size=size, pool=KD_LOC_GAP_SIZE),
        }
        for name, taps in TAPS.items():
            pools = DistillConfig(taps=taps).tap_pools()  # the release's: obj 4, l0 8
            found[name] = lambda b, taps=taps, pools=pools: kd_loc_loss(
                lambda crops: teacher.forward_taps(crops, taps), images, b, gt, index, size=size, pools=pools,
                is_pixel_level=[t == "obj" for t in taps],
            )  # fmt: skip
        return found

    print(f"{len(gt)} GT boxes of {len(samples)} {args.split} images; teacher {teacher.arch}; seed {args.seed}")
    print("cell: mean cos(-dL/dB, B* - B) / share of boxes whose IoU rises after a 0.5 px descent step\n")
    print("| loss | s | " + " | ".join(f"IoU {u}" for u in IOUS) + " |")
    print("|---|---:|" + "---:|" * len(IOUS))
    for size in args.sizes:
        for name, loss_fn in losses(size).items():
            cells = []
            for u in IOUS:
                boxes = boxes_at_iou(gt, u, generator=torch.Generator().manual_seed(args.seed))
                out = gradient_alignment(loss_fn, boxes, gt)
                cells.append(f"{out['cosine'].mean():.2f} / {(out['iou_gain'] > 0).float().mean():.0%}")
            print(f"| {name} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
