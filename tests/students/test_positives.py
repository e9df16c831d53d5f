"""Properties every adapter's Positives share, whatever the family."""

import pytest
import torch

from cls2det.config import StudentConfig
from cls2det.students import create_student

SIZES = {"ssd300_vgg16": 270, "fasterrcnn_resnet50": 96, "retinanet_resnet50": 96, "fcos_resnet50": 96}


@pytest.mark.parametrize(
    "name",
    [
        "fasterrcnn_mobilenet_v3",
        "ssdlite320_mobilenet_v3",
        "retinanet_resnet50",
        "retinanet_mobilenet_v3",
        "fcos_resnet50",
    ],
)
def test_gt_index_points_at_the_assigned_box(name, batch_with_empty_image, num_classes):
    """gt_index (used by the soft-label cache) selects each positive's GT box and label in its image's targets."""
    torch.manual_seed(0)
    images, targets = batch_with_empty_image
    size = SIZES.get(name, 128)
    student = create_student(name, num_classes, StudentConfig(detector=name, image_size=size)).train()
    positives = student(images, targets).positives
    assert len(positives) > 0 and positives.gt_index.shape == positives.labels.shape
    for image in range(len(images)):
        mine = positives.image_index == image
        gt = positives.gt_index[mine]
        assert torch.equal(positives.labels[mine], targets[image]["labels"][gt])
        # boxes are in the transformed batch's pixels: the same GT box scaled by the resize of that image
        scale = positives.gt_boxes[mine] / targets[image]["boxes"][gt].clamp(min=1e-6)
        assert torch.allclose(scale[:, 0], scale[:, 2], rtol=1e-4) and torch.allclose(
            scale[:, 1], scale[:, 3], rtol=1e-4
        )
    assert not (positives.image_index == 2).any()  # the image without boxes has no positives
    subset = positives.subset(torch.tensor([0]))
    assert subset.gt_index.tolist() == positives.gt_index[:1].tolist()
