"""The classifier teacher: build (torchvision / timm), train on D_cls, feature taps, checkpoint I/O."""

from cls2det.teacher.heads import check_teacher_for_head, teacher_loss
from cls2det.teacher.io import load_teacher, read_teacher_meta, save_teacher
from cls2det.teacher.model import Teacher, TeacherError, build_teacher
from cls2det.teacher.protocol import TeacherLike
from cls2det.teacher.taps import TAPS, Tap, TapLayout
from cls2det.teacher.train import Augment, classification_loss, evaluate_top1, fit_teacher, train_teacher

__all__ = [
    "TAPS",
    "Tap",
    "TapLayout",
    "Teacher",
    "TeacherError",
    "TeacherLike",
    "build_teacher",
    "check_teacher_for_head",
    "teacher_loss",
    "train_teacher",
    "fit_teacher",
    "load_teacher",
    "save_teacher",
    "read_teacher_meta",
    "Augment",
    "classification_loss",
    "evaluate_top1",
]
