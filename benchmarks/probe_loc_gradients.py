"""Do loc and KD_loc pull a box towards its GT box, and how hard against the detector's own box loss?

For every GT box of the first ``--images`` images of ``--split``, boxes at IoU u with it are drawn in random
directions (``cls2det.distill.gradient_probe.boxes_at_iou``) and each loss's gradient with respect to the box is
compared with the direction to the GT box (``gradient_alignment``): the mean cosine (1 = straight at it, 0 = no
signal), the share of boxes whose IoU rises after a 0.5 px step along the descent direction, and the pull: the median
over boxes of |d(weight·L)/dB| / |d(box loss)/dB|, where the box loss (``--box-loss``) is torchvision SSD's (``ssd``:
smooth L1, beta 1, on the offsets encoded with weights 10, 10, 5, 5, here against an anchor equal to the GT box) or
RetinaNet v2's / FCOS's (``giou``: 1 - GIoU of the box with its GT box); both losses are means over the positives, so
the ratio compares one box's pulls. Losses: ``loc`` (pixels, pool 4, weight ``--loc-weight``) and
``KD_loc`` with the teacher of ``teacher_run`` at the taps obj / l0 / obj+l0 (the release's pools 4 / 8, weight
``--kd-loc-weight``), exactly as training calls them (``cls2det.distill.losses``), at crop side(s) ``--sizes``.

    python benchmarks/probe_loc_gradients.py DATA TEACHER_RUN [--images 100] [--sizes 32 112] [--seed 0] \
        [--box-loss ssd|giou] [--kd-loc-weight 0.3]
"""

import argparse

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from cls2det.config import KD_LOC_GAP_SIZE, DistillConfig
from cls2det.data import CocoDetection, load_split
from cls2det.distill.gradient_probe import boxes_at_iou, gradient_alignment
from cls2det.distill.losses import kd_loc_loss, loc_loss
from cls2det.teacher import load_teacher

IOUS = [0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
SSD_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's SSD BoxCoder


def ssd_box_loss(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """torchvision SSD's box loss of ``boxes`` [K, 4] xyxy against target offsets 0 at ``anchors`` [K, 4] (the GT
    boxes): smooth L1 (beta 1) of the encoded offsets, summed over the 4 offsets, mean over the K boxes."""
    wx, wy, ww, wh = SSD_BOX_WEIGHTS
    size, anchor_size = boxes[:, 2:] - boxes[:, :2], anchors[:, 2:] - anchors[:, :2]
    centre, anchor_centre = boxes[:, :2] + size / 2, anchors[:, :2] + anchor_size / 2
    offsets = torch.cat(
        [
            (centre - anchor_centre) / anchor_size * torch.tensor([wx, wy]),
            torch.log(size / anchor_size) * torch.tensor([ww, wh]),
        ],
        dim=1,
    )  # [K, 4]
    return F.smooth_l1_loss(offsets, torch.zeros_like(offsets), beta=1.0, reduction="sum") / len(boxes)


def giou_box_loss(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """torchvision RetinaNet v2's / FCOS's box loss of ``boxes`` [K, 4] xyxy against ``gt`` [K, 4]: 1 - GIoU, mean
    over the K boxes."""
    return generalized_box_iou_loss(boxes, gt, reduction="mean")


BOX_LOSSES = {"ssd": ("SSD box loss (reference)", ssd_box_loss), "giou": ("GIoU box loss (reference)", giou_box_loss)}
TAPS = {"KD_loc obj": ["obj"], "KD_loc l0": ["l0"], "KD_loc obj+l0": ["obj", "l0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("teacher_run")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 112])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kd-loc-weight", type=float, default=DistillConfig().lambda_kd_loc)
    parser.add_argument("--loc-weight", type=float, default=DistillConfig().lambda_loc)
    parser.add_argument("--box-loss", choices=sorted(BOX_LOSSES), default="ssd")
    args = parser.parse_args()
    torch.set_num_threads(1)

    dataset = CocoDetection(load_split(args.data, args.split))
    samples = [dataset[i] for i in range(min(args.images, len(dataset)))]
    images = torch.stack([pixels for pixels, _ in samples])  # [N, 3, H, W] in 0..1 (the demo's images share a size)
    gt = torch.cat([target["boxes"] for _, target in samples])  # [K, 4]
    index = torch.cat([torch.full((len(t["boxes"]),), i, dtype=torch.long) for i, (_, t) in enumerate(samples)])
    teacher = load_teacher(args.teacher_run).eval()
    teacher.freeze()

    box_name, box_loss = BOX_LOSSES[args.box_loss]

    def losses(size: int) -> dict:
        found = {
            box_name: lambda b: box_loss(b, gt),
            f"{args.loc_weight:g}·loc": lambda b: (
                args.loc_weight * loc_loss(images, b, gt, index, size=size, pool=KD_LOC_GAP_SIZE)
            ),
        }
        for name, taps in TAPS.items():
            pools = DistillConfig(taps=taps).tap_pools()  # the release's: obj 4, l0 8

            def kd_loc(b: torch.Tensor, taps: list[str] = taps, pools: list[int] = pools) -> torch.Tensor:
                def features(crops: torch.Tensor) -> list[torch.Tensor]:
                    return teacher.forward_taps(crops, taps)

                pixel = [t == "obj" for t in taps]
                return kd_loc_loss(features, images, b, gt, index, size=size, pools=pools, is_pixel_level=pixel)

            found[f"{args.kd_loc_weight:g}·{name}"] = lambda b, kd_loc=kd_loc: args.kd_loc_weight * kd_loc(b)
        return found

    print(f"{len(gt)} GT boxes of {len(samples)} {args.split} images; teacher {teacher.arch}; seed {args.seed}")
    print(
        "cell: mean cos(-dL/dB, B* - B) / share of boxes whose IoU rises after a 0.5 px descent step / pull "
        "(median |dL/dB| / |d box loss/dB|)\n"
    )
    # the displaced boxes and the box loss's gradient norm depend on the IoU only: once per IoU, for every loss
    displaced = {u: boxes_at_iou(gt, u, generator=torch.Generator().manual_seed(args.seed)) for u in IOUS}
    box_norm = {u: gradient_alignment(lambda b: box_loss(b, gt), displaced[u], gt)["grad_norm"] for u in IOUS}
    print("| loss | s | " + " | ".join(f"IoU {u}" for u in IOUS) + " |")
    print("|---|---:|" + "---:|" * len(IOUS))
    for size in args.sizes:
        for name, loss_fn in losses(size).items():
            cells = []
            for u in IOUS:
                out = gradient_alignment(loss_fn, displaced[u], gt)
                pull = (out["grad_norm"] / box_norm[u]).median()
                cells.append(f"{out['cosine'].mean():.2f} / {(out['iou_gain'] > 0).float().mean():.0%} / {pull:.2g}")
            print(f"| {name} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
