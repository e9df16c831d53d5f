"""Student adapters, one per torchvision detector family, behind a small registry.

``create_student(name, num_classes, **kwargs)`` builds a torchvision detector (``weights=None``; backbone
weights from a local file or ImageNet where asked) and wraps it in its family's adapter.
"""

from cls2det.students.base import Negatives, Positives, StudentAdapter, StudentOutput
from cls2det.students.registry import STUDENTS, create_student, list_students, wrap_detector

__all__ = [
    "Negatives",
    "Positives",
    "StudentAdapter",
    "StudentOutput",
    "STUDENTS",
    "create_student",
    "list_students",
    "wrap_detector",
]
