"""Datasets: COCO-format detection splits (load + validate), D_cls crops, the embedded demo set, importers."""

from cls2det.data.coco import CocoDetection, DetectionSplit, check_dataset, collate, load_split
from cls2det.data.crops import ClassificationCrops
from cls2det.data.demo import generate_demo
from cls2det.data.importers import import_voc, import_yolo
from cls2det.data.validate import DatasetError

__all__ = [
    "ClassificationCrops",
    "CocoDetection",
    "DatasetError",
    "DetectionSplit",
    "check_dataset",
    "collate",
    "generate_demo",
    "import_voc",
    "import_yolo",
    "load_split",
]
