"""Does the teacher see the same objects in training and in distillation? Its top-1 on both kinds of GT crops.

The teacher trains on D_cls crops (``ClassificationCrops``: the box rounded outward to whole pixels, resized with
an antialiased bilinear filter, stored as uint8); distillation crops the float box with ``grid_sample``
(``crop_boxes``, eq. 8-9, no antialiasing). This prints, on the GT boxes of ``--split``, the teacher's top-1 on
both, how often the two predictions agree, and the mean KL(D_cls || grid_sample) of the softened outputs at
``--temperature`` (softmax; what KD_cls would distil), at the teacher's input size.

    python benchmarks/teacher_crop_paths.py DATA TEACHER_RUN [--split val] [--temperature 2]
"""

import argparse

import torch
import torch.nn.functional as F

from cls2det.data import ClassificationCrops, CocoDetection, load_split
from cls2det.distill import crop_boxes
from cls2det.teacher import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("teacher_run")
    parser.add_argument("--split", default="val")
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    split = load_split(args.data, args.split)
    teacher = load_teacher(args.teacher_run).eval()
    d_cls = ClassificationCrops(split, size=teacher.input_size, storage="memory")
    detection = CocoDetection(split)
    logits_dcls, logits_grid, labels = [], [], []
    with torch.no_grad():
        start = 0
        for i in range(len(detection)):
            pixels, target = detection[i]
            boxes = target["boxes"]  # [n, 4], the same non-crowd boxes in the same order as D_cls
            n = len(boxes)
            if n == 0:
                continue
            crops = torch.stack([d_cls[j][0] for j in range(start, start + n)])  # [n, 3, S, S]
            labels.append(d_cls.labels[start : start + n])
            start += n
            grid = crop_boxes(pixels[None], boxes, torch.zeros(n, dtype=torch.long), size=teacher.input_size)
            logits_dcls.append(teacher(crops))
            logits_grid.append(teacher(grid))
    a, b, y = torch.cat(logits_dcls), torch.cat(logits_grid), torch.cat(labels)
    t = args.temperature
    kl = F.kl_div(F.log_softmax(b / t, 1), F.log_softmax(a / t, 1), log_target=True, reduction="batchmean")
    print(f"{len(y)} GT crops of {args.split} at {teacher.input_size} px; teacher {teacher.arch} ({teacher.loss})")
    print(f"top-1, D_cls crops (antialiased integer windows): {100 * (a.argmax(1) == y).float().mean():.2f}%")
    print(f"top-1, distillation crops (grid_sample of the box): {100 * (b.argmax(1) == y).float().mean():.2f}%")
    print(f"same prediction: {100 * (a.argmax(1) == b.argmax(1)).float().mean():.2f}%")
    print(f"mean KL(D_cls || grid_sample) of the softened outputs at T = {t:g}: {kl:.4f} nats")


if __name__ == "__main__":
    main()
