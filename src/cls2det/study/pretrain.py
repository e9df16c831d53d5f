"""Pre-train a student's backbone as a classifier on the GT crops: the stand-in for ImageNet pre-training.

Detectors trained from scratch learn slowly; every practical student starts from a classification backbone.
Offline, and on a small dataset, the closest analogue is to train that backbone once as a classifier on the
train split's object crops (D_cls) and give the same weights to every row of a study.
"""

from __future__ import annotations

from pathlib import Path

from cls2det.config import StudentConfig, TeacherConfig, resolve_workers
from cls2det.files import save_safetensors
from cls2det.students import create_student
from cls2det.students.registry import backbone_classifier


def pretrain_backbone(
    data: str | Path, detector: str, out_file: str | Path, config: TeacherConfig, *, progress: bool = True
) -> dict:
    """Train ``detector``'s backbone classifier on ``data``'s train crops; save its state dict to ``out_file``.

    The crops are normalised with the detector's own transform mean/std, so the backbone sees what it will see
    inside the detector. No val split is used (the last epoch's weights are kept): the val split stays unseen.
    """
    from cls2det.data import ClassificationCrops, load_split
    from cls2det.teacher.model import Teacher
    from cls2det.teacher.train import Augment, fit_teacher

    split = load_split(data, "train")
    transform = create_student(detector, split.num_classes, StudentConfig(detector=detector)).detector.transform
    net = backbone_classifier(detector, split.num_classes)
    classifier = Teacher(
        net,
        arch=f"{detector}-backbone",
        library="torchvision",
        class_names=split.class_names,
        input_size=config.input_size,
        mean=transform.image_mean,
        std=transform.image_std,
    )
    crops = ClassificationCrops(split, size=config.input_size, workers=resolve_workers(config.workers))
    flips = split.hflip_preserves_labels if config.hflip is None else config.hflip  # the student's rule
    metrics = fit_teacher(
        classifier,
        crops,
        None,
        config,
        progress=progress,
        augment=Augment(hflip=flips),
        label=f"{detector} backbone pre-training",
    )
    save_safetensors(out_file, net.state_dict())
    return metrics
