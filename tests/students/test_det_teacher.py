"""Adapters as det2det teachers: ``StudentAdapter.teach`` (features and class logits of a frozen detector on a
student's batch), the det2det fields of ``StudentOutput`` and ``check_det_teacher``."""

from __future__ import annotations

import copy

import pytest
import torch

from cls2det.config import StudentConfig
from cls2det.students import create_student

DENSE = ["ssdlite320_mobilenet_v3", "retinanet_resnet50", "fcos_resnet50"]
SIZES = {"ssdlite320_mobilenet_v3": 128, "fasterrcnn_mobilenet_v3": 128, "retinanet_resnet50": 96, "fcos_resnet50": 96}


FAST_RCNN = {
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
}


def build(name: str, num_classes: int, seed: int = 0, **config):
    torch.manual_seed(seed)
    config = {"image_size": SIZES[name], "options": FAST_RCNN if name.startswith("fasterrcnn") else {}, **config}
    return create_student(name, num_classes, StudentConfig(detector=name, **config))


def frozen(adapter):
    return adapter.eval().requires_grad_(False)


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """||a - b|| <= rel * ||b||: an untrained SSDlite in eval mode has logits of ~1e-20 (and all-zero last maps), so
    absolute tolerances say nothing."""
    return bool((a - b).norm() <= rel * b.norm())


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3", *DENSE])
def test_a_copy_of_the_student_teaches_exactly_its_own_outputs(name, num_classes, tiny_batch):
    """The teacher path (re-run backbone, gather at anchor_index / box head on the proposals) reproduces what the
    student's own training forward computed, when the teacher is the student (both in eval mode)."""
    student = build(name, num_classes).eval()
    teacher = frozen(copy.deepcopy(student))
    torch.manual_seed(1)
    output = student.forward_train(*tiny_batch)
    positives = output.positives
    assert len(positives) > 0
    taught = teacher.teach(output, positives)
    assert torch.equal(taught.logits, positives.logits)
    assert len(taught.features) == len(output.features) >= 3
    assert all(torch.equal(t, s) for t, s in zip(taught.features, output.features))
    assert not taught.logits.requires_grad and all(not f.requires_grad for f in taught.features)
    # the positives' order is the caller's: a shuffled subset gets its own rows back
    order = torch.randperm(len(positives), generator=torch.Generator().manual_seed(0))[: max(1, len(positives) // 2)]
    # (equal up to float rounding: Faster R-CNN's box head then runs its matmuls on another number of rows, which
    # may take another blocking in the BLAS)
    subset_logits = teacher.teach(output, positives.subset(order)).logits
    torch.testing.assert_close(subset_logits, positives.logits[order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DENSE)
def test_teacher_logits_are_its_own_head_at_the_students_anchors(name, num_classes, tiny_batch):
    """An independently initialised teacher: its gathered logits equal the rows its own forward reads off for the
    same matched anchors (same anchors and targets, so the same matches)."""
    student, teacher = build(name, num_classes, seed=0).train(), frozen(build(name, num_classes, seed=1))
    output = student(*tiny_batch)
    taught = teacher.teach(output, output.positives)
    own = teacher.forward_train(*tiny_batch).positives  # eval mode: BatchNorm running statistics, as in teach
    assert torch.equal(own.anchor_index, output.positives.anchor_index)
    assert torch.equal(own.image_index, output.positives.image_index)
    assert close(taught.logits, own.logits, 1e-5)
    gap_to_own = (taught.logits - own.logits).abs().max()
    gap_to_student = (taught.logits - output.positives.logits.detach()).abs().max()
    assert gap_to_student > 100 * gap_to_own and gap_to_student > 0  # the teacher's logits, not the student's


def test_faster_rcnn_teacher_runs_its_box_head_on_the_students_proposals(num_classes, tiny_batch):
    student, teacher = (
        build("fasterrcnn_mobilenet_v3", num_classes).train(),
        frozen(build("fasterrcnn_mobilenet_v3", num_classes, seed=1)),
    )
    output = student(*tiny_batch)
    positives = output.positives
    taught = teacher.teach(output, positives)
    # direct: the teacher's RoI head on the proposals, one image at a time
    heads = teacher.detector.roi_heads
    features = teacher.detector.backbone(output.images)
    for image in range(output.images.shape[0]):
        mine = positives.image_index == image
        pooled = heads.box_roi_pool(features, [positives.proposals[mine]], [output.image_sizes[image]] * 1)
        expected, _ = heads.box_predictor(heads.box_head(pooled))
        assert close(taught.logits[mine], expected, 1e-5)
    assert taught.logits.shape == positives.logits.shape


def test_teacher_renormalises_the_students_batch_to_its_own_mean_and_std(num_classes, tiny_batch):
    student = build("ssdlite320_mobilenet_v3", num_classes).eval()
    teacher = frozen(copy.deepcopy(student))
    teacher.detector.transform.image_mean = [0.485, 0.456, 0.406]  # SSDlite's own is 0.5 / 0.5
    teacher.detector.transform.image_std = [0.229, 0.224, 0.225]
    output = student.forward_train(*tiny_batch)
    own = teacher.forward_train(*tiny_batch)  # the teacher normalising the raw images itself
    taught = teacher.teach(output, output.positives)
    assert close(taught.logits, own.positives.logits, 1e-5)
    assert all(close(t, o, 1e-5) for t, o in zip(taught.features, own.features))
    assert not close(taught.logits, output.positives.logits, 0.1)  # the renormalisation matters


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3", "fasterrcnn_mobilenet_v3", "fcos_resnet50"])
def test_outputs_carry_features_anchors_and_gt_boxes(name, num_classes, tiny_batch):
    student = build(name, num_classes).train()
    output = student(*tiny_batch)
    images, targets = tiny_batch
    assert len(output.gt_boxes) == len(output.image_sizes) == len(images)
    assert [len(b) for b in output.gt_boxes] == [len(t["boxes"]) for t in targets]
    assert output.features[0].requires_grad and output.features[0].shape[0] == len(images)
    if name == "fcos_resnet50":
        assert output.level_anchors == [] and not student.has_anchors
        return
    assert len(output.level_anchors) == len(output.features)
    for anchors, feature in zip(output.level_anchors, output.features):
        assert anchors.shape[:2] == feature.shape[-2:] and anchors.shape[-1] == 4
    if name == "ssdlite320_mobilenet_v3":  # the matched anchor of every positive is the box it was decoded from
        flat = torch.cat([a.reshape(-1, 4) for a in output.level_anchors])
        anchors = flat[output.positives.anchor_index]  # [K, 4]
        regression = student.detector.head(output.features)["bbox_regression"]
        decoded = student.detector.box_coder.decode_single(
            regression[output.positives.image_index, output.positives.anchor_index], anchors
        )
        assert torch.allclose(decoded, output.positives.pred_boxes, atol=1e-4)


def test_check_det_teacher_names_what_does_not_fit(num_classes):
    lite = build("ssdlite320_mobilenet_v3", num_classes)
    lite.check_det_teacher(build("ssdlite320_mobilenet_v3", num_classes, seed=1), ["logit", "fgfi", "pkd"])
    cases = [
        (build("fasterrcnn_mobilenet_v3", num_classes), ["pkd"], "a FasterRCNNAdapter, the student a SSDAdapter"),
        (build("ssdlite320_mobilenet_v3", num_classes + 1), ["pkd"], "4 classes, the student 3"),
        (build("ssdlite320_mobilenet_v3", num_classes, image_size=96), ["pkd"], "resizes images with"),
    ]
    for teacher, methods, message in cases:
        with pytest.raises(ValueError, match=message):
            lite.check_det_teacher(teacher, methods)
    # other default boxes: the feature methods still fit, logit KD at "the same anchors" does not
    other_anchors = build("ssdlite320_mobilenet_v3", num_classes, anchor_sizes=[10, 90])
    lite.check_det_teacher(other_anchors, ["pkd", "fgfi"])
    with pytest.raises(ValueError, match="det:logit needs the same anchors"):
        lite.check_det_teacher(other_anchors, ["logit"])
    fcos = build("fcos_resnet50", num_classes)
    with pytest.raises(ValueError, match="det:fgfi needs anchors and FCOSAdapter is anchor-free"):
        fcos.check_det_teacher(fcos, ["fgfi"])
    assert lite.training  # the probe restored the student's mode


def test_a_bigger_faster_rcnn_teaches_logits_but_not_features(num_classes, tiny_batch):
    """Chen et al.'s case: a ResNet-50 Faster R-CNN teaching a MobileNetV3 one. Its box head runs on the student's
    proposals whatever its maps; its 5 FPN maps do not match the student's 3, so PKD / FGFI are refused."""
    student = build("fasterrcnn_mobilenet_v3", num_classes)
    teacher = frozen(
        create_student(
            "fasterrcnn_resnet50", num_classes, StudentConfig(detector="fasterrcnn_resnet50", image_size=128)
        )
    )
    student.check_det_teacher(teacher, ["logit"])
    with pytest.raises(ValueError, match="need equal feature maps"):
        student.check_det_teacher(teacher, ["pkd"])
    output = student(*tiny_batch)
    taught = teacher.teach(output, output.positives)
    assert taught.logits.shape == output.positives.logits.shape and len(taught.features) == 5
