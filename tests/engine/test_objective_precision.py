"""``distill.teacher_precision``: the teacher's passes run in the asked autocast (bf16 features, float32 losses close
to the float32 teacher's, gradients still reaching the predicted boxes), "32-true" opts out of an enclosing autocast,
"auto" keeps it; bad values are refused by name."""

from __future__ import annotations

import pytest
import torch

from cls2det.config import ConfigError, DistillConfig
from cls2det.engine.objective import classifier_losses, precision_autocast
from cls2det.students import Positives, StudentOutput
from cls2det.teacher import build_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingTeacher:
    """A real (untrained, frozen) ResNet-18 teacher that records the dtype of its logits and of its deepest tap (the
    stem's output; "obj" is the normalised crop itself, float32 in any precision)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.teacher, self.dtypes = build_teacher("resnet18", 3, input_size=32).freeze(), []
        self.input_size = self.teacher.input_size

    def __call__(self, crops):
        logits = self.teacher(crops)
        self.dtypes.append(logits.dtype)
        return logits

    def forward_taps(self, crops, taps):
        feats = self.teacher.forward_taps(crops, taps)
        self.dtypes.append(feats[-1].dtype)
        return feats


def make_output(seed: int = 0, k: int = 6) -> StudentOutput:
    """2 random 64x64 images (mean 0 / std 1: pixels = images), K positives with predicted boxes near their GT."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 64, 64, generator=g)
    xy = torch.rand(k, 2, generator=g) * 30
    gt = torch.cat([xy, xy + 8 + torch.rand(k, 2, generator=g) * 24], 1)  # [K, 4]
    pred = (gt + torch.randn(k, 4, generator=g) * 2).requires_grad_()
    positives = Positives(
        torch.arange(k) % 2,
        gt,
        torch.randint(0, 3, (k,), generator=g),
        torch.randn(k, 4, generator=g, requires_grad=True),
        pred,
        "softmax",
    )
    return StudentOutput({}, positives, images, torch.zeros(3), torch.ones(3), image_sizes=[(64, 64)] * 2)


def losses_in(precision: str, outer: str = "auto"):
    """The three paper terms, the dtypes the teacher returned and d kd_loc / d pred_boxes."""
    output, teacher = make_output(), RecordingTeacher()
    config = DistillConfig(kd=["cls", "loc", "kd_loc"], taps=["obj", "l0"], sample_size=32, teacher_precision=precision)
    with precision_autocast(outer, torch.device("cpu")):
        losses = classifier_losses(output, output.positives, teacher, config)
    (grad,) = torch.autograd.grad(losses["kd_loc"], output.positives.pred_boxes)
    return losses, set(teacher.dtypes), grad


def test_bf16_teacher_gives_bf16_features_and_float32_losses_close_to_float32():
    exact, dtypes, grad = losses_in("32-true")
    assert dtypes == {torch.float32}
    fast, fast_dtypes, fast_grad = losses_in("bf16-mixed")
    assert fast_dtypes == {torch.bfloat16}
    for term in ("kd_cls", "loc", "kd_loc"):
        assert fast[term].dtype == torch.float32, term
    # loc has no teacher: untouched; the teacher's terms within bfloat16's ~3 significant digits, and not equal
    assert fast["loc"].item() == exact["loc"].item()
    assert fast["kd_loc"].item() == pytest.approx(exact["kd_loc"].item(), rel=2e-2)
    assert fast["kd_loc"] != exact["kd_loc"]
    assert fast["kd_cls"].item() == pytest.approx(exact["kd_cls"].item(), rel=5e-2, abs=1e-3)
    assert grad.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(fast_grad.flatten(), grad.flatten(), dim=0)
    assert cosine > 0.99, cosine


def test_32_true_opts_out_of_the_steps_autocast_and_auto_keeps_it():
    _, dtypes, _ = losses_in("32-true", outer="bf16-mixed")
    assert dtypes == {torch.float32}
    _, dtypes, _ = losses_in("auto", outer="bf16-mixed")
    assert dtypes == {torch.bfloat16}
    _, dtypes, _ = losses_in("auto")
    assert dtypes == {torch.float32}


def test_unknown_teacher_precision_is_refused_by_name():
    with pytest.raises(ConfigError, match="distill.teacher_precision.*'fp8'"):
        DistillConfig(teacher_precision="fp8")


def test_subsampled_positives_keep_their_image_order():
    """max_positives draws a uniform subset and keeps the adapters' image-by-image order, so crop_boxes need not
    reorder its crops; the subset follows the generator (seeded) and is all of them when K <= max_count."""
    from cls2det.engine.objective import subsample_positives

    positives = make_output(k=40).positives  # image_index 0, 1, 0, 1, ...
    positives = positives.subset(torch.argsort(positives.image_index, stable=True))  # as adapters list them
    picked = subsample_positives(positives, 10, torch.Generator().manual_seed(1))
    keep = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:10].sort().values
    assert torch.equal(picked.pred_boxes, positives.pred_boxes[keep])
    assert (picked.image_index[1:] >= picked.image_index[:-1]).all()
    assert subsample_positives(positives, 40) is positives
