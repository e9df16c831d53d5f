"""Add the paper's full method, KD_cls + KD_loc, to a plain PyTorch loop over a torchvision detector, on the demo data.

    python examples/own_loop.py --out runs/own_loop --steps 50        # makes the data and a teacher first
    python examples/own_loop.py --out runs/own_loop --teacher runs/teacher --data mydata

Prints one line per step: the detector's own losses and the KD terms (unweighted).
"""

import argparse
from pathlib import Path

import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from cls2det import DistillConfig, Distiller, TeacherConfig, generate_demo, load_teacher, train_teacher, wrap_detector
from cls2det.data import CocoDetection, collate, load_split

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path("runs/own_loop"))
parser.add_argument("--data", type=Path, default=None, help="a COCO-format dataset (default: generate the demo set)")
parser.add_argument("--teacher", type=Path, default=None, help="a teacher run (default: train one)")
parser.add_argument("--train-images", type=int, default=64, help="demo images to generate")
parser.add_argument("--teacher-epochs", type=int, default=2)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch-size", type=int, default=4)
args = parser.parse_args()

# 1. Data and the classifier teacher, trained on the crops of the train split's GT boxes.
data = args.data or generate_demo(args.out / "data", train_images=args.train_images, val_images=8, image_size=96)
teacher_run = args.teacher
if teacher_run is None:
    teacher_run = args.out / "teacher"
    train_teacher(data, teacher_run, TeacherConfig(input_size=32, epochs=args.teacher_epochs), progress=False)
teacher = load_teacher(teacher_run)  # frozen, eval mode
split = load_split(data, "train")  # targets: boxes xyxy in pixels, labels in [0, C)

# 2. Your own torchvision detector (C + 1 outputs: torchvision counts the background), wrapped in its adapter.
detector = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=split.num_classes + 1)
student = wrap_detector(detector)  # the same nn.Module inside: its parameters are the detector's
distiller = Distiller(teacher, DistillConfig(kd=["cls", "kd_loc"], sample_size=32, max_positives=64))

# 3. A plain loop: the KD terms are added to the detector's own loss dict.
loader = torch.utils.data.DataLoader(CocoDetection(split), batch_size=args.batch_size, shuffle=True, collate_fn=collate)
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
student.train()
step = 0
while step < args.steps:
    for images, targets in loader:
        output = student(images, targets)  # .losses: {"bbox_regression", "classification"}; .positives
        kd = distiller.losses(output)  # {"kd_cls", "kd_loc"}, unweighted
        loss = distiller.total(output, kd)  # sum(detector losses) + sum(lambda * kd term), eq. (12)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        terms = " ".join(f"{k}={v.item():.4f}" for k, v in {**output.losses, **kd}.items())
        print(f"step {step} loss={loss.item():.4f} {terms}", flush=True)
        if step == args.steps:
            break
