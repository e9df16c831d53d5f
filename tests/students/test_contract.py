"""The contract every student adapter keeps, whatever the family: positives that point at their GT box, predicted
boxes differentiable into the box regression only, and a training step that an extra term on positives can drive."""

import pytest
import torch

from cls2det.config import StudentConfig
from cls2det.students import create_student, list_students

SIZES = {"ssd300_vgg16": 270, "fasterrcnn_resnet50": 96, "retinanet_resnet50": 96, "fcos_resnet50": 96}


FAMILIES = [
    "fasterrcnn_mobilenet_v3",
    "ssdlite320_mobilenet_v3",
    "retinanet_resnet50",
    "retinanet_mobilenet_v3",
    "fcos_resnet50",
    "fcos_mobilenet_v3",
]


def build(name: str, num_classes: int):
    torch.manual_seed(0)
    return create_student(name, num_classes, StudentConfig(detector=name, image_size=SIZES.get(name, 128))).train()


def heads(adapter) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(class-score layers, box-regression layers) of the adapter's detector."""
    det = adapter.detector
    if hasattr(det, "roi_heads"):  # Faster R-CNN: the box predictor on the sampled proposals
        return det.roi_heads.box_predictor.cls_score, det.roi_heads.box_predictor.bbox_pred
    return det.head.classification_head, det.head.regression_head


@pytest.mark.parametrize("name", FAMILIES)
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


@pytest.mark.parametrize("name", FAMILIES)
def test_pred_boxes_are_differentiable_into_the_box_regression_only(name, tiny_batch, num_classes):
    adapter = build(name, num_classes)
    pos = adapter(*tiny_batch).positives
    assert len(pos) > 0 and not pos.gt_boxes.requires_grad and pos.pred_boxes.requires_grad
    pos.pred_boxes.sum().backward()
    cls_layers, reg_layers = heads(adapter)
    assert sum(p.grad.abs().sum() for p in reg_layers.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in cls_layers.parameters())  # the boxes do not depend on the class scores


@pytest.mark.parametrize("name", FAMILIES)
def test_an_extra_term_on_positives_drives_a_training_step(name, tiny_batch, num_classes):
    """A loss on the positives alone (what KD_cls / KD_loc are) reaches both heads, and one SGD step on it lowers it."""
    adapter = build(name, num_classes)
    optimizer = torch.optim.SGD([p for p in adapter.parameters() if p.requires_grad], lr=1e-3)
    size = SIZES.get(name, 128)

    def extra_term() -> torch.Tensor:
        pos = adapter(*tiny_batch).positives
        box = (pos.pred_boxes - pos.gt_boxes).abs().mean() / size
        if pos.head == "softmax":
            return box + torch.nn.functional.cross_entropy(pos.logits, pos.labels + 1)
        onehot = torch.nn.functional.one_hot(pos.labels, num_classes).float()
        return box + torch.nn.functional.binary_cross_entropy_with_logits(pos.logits, onehot)

    layers = [p for module in heads(adapter) for p in module.parameters()]
    start = [p.detach().clone() for p in layers]
    torch.manual_seed(1)  # Faster R-CNN samples its proposals: the same sample before and after the step
    before = extra_term()
    before.backward()
    for module in heads(adapter):  # both heads (a level without positives gets no gradient: any layer will do)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    optimizer.step()
    assert any(not torch.equal(p0, p) for p0, p in zip(start, layers))
    torch.manual_seed(1)
    with torch.no_grad():
        assert extra_term().item() < before.item()


@pytest.mark.parametrize("name", list_students())
def test_a_run_is_rebuilt_in_its_own_layout_without_its_backbone_file(name, tmp_path):
    """load_student builds a run started from a local backbone file without that file (CHECKPOINT_WEIGHTS): the same
    modules (frozen BatchNorm, frozen stages), so the checkpoint loads strictly."""
    from safetensors.torch import save_file

    from cls2det.students.backbones import CHECKPOINT_WEIGHTS
    from cls2det.students.registry import backbone_classifier

    save_file(backbone_classifier(name, 3).state_dict(), str(tmp_path / "backbone.safetensors"))
    size = 300 if name == "ssd300_vgg16" else 128
    local = StudentConfig(detector=name, image_size=size, backbone_weights=str(tmp_path / "backbone.safetensors"))
    trained = create_student(name, 3, local)
    rebuilt = create_student(
        name, 3, StudentConfig(detector=name, image_size=size, backbone_weights=CHECKPOINT_WEIGHTS)
    )
    assert rebuilt.load_state_dict(trained.state_dict(), strict=True)  # raises on any missing / unexpected key
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in rebuilt.named_parameters() if p.requires_grad}
