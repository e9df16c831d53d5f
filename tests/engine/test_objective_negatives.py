"""KD_cls on negatives (``kd_cls_negatives_loss``, the ``kd_cls_neg`` term): values against a hand computation for
both heads, the background column left out, the teacher's crops clipped to each image, the wiring and weighting in
the objective."""

from __future__ import annotations

import math

import pytest
import torch

from cls2det.config import DistillConfig
from cls2det.distill import crop_boxes
from cls2det.engine.objective import classifier_losses, kd_cls_negatives_loss, loss_weights, total_loss
from cls2det.students import Negatives, StudentOutput
from cls2det.students.base import empty_positives

T = 2.0
TEACHER = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]  # [M=2, C=3] the stub teacher's logits for the two negatives


class StubTeacher:
    """A frozen classifier stand-in: fixed logits, records the crops it is shown."""

    input_size = 4

    def __init__(self, logits) -> None:
        self.logits, self.crops = torch.tensor(logits), None

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        self.crops = crops
        return self.logits


def make_output(logits: torch.Tensor, head: str) -> StudentOutput:
    """2 images of 8x8 batch pixels, mean 0 / std 1 (so pixels = images). Image 0 is 8x6 px (columns 6-7 padding):
    0.25 left of x=4, 0.75 right of it; image 1 is 8x8 px of 0.5. Negative 0: the box [4, 2, 10, 6] of image 0 (it
    reaches into the padding and past the batch); negative 1: [-3, -3, 3, 3] of image 1."""
    images = torch.zeros(2, 3, 8, 8)
    images[0, :, :, :4], images[0, :, :, 4:6], images[1] = 0.25, 0.75, 0.5
    negatives = Negatives(
        torch.tensor([0, 1]), torch.tensor([[4.0, 2.0, 10.0, 6.0], [-3.0, -3.0, 3.0, 3.0]]), logits, head
    )
    return StudentOutput(
        {},
        empty_positives(torch.device("cpu"), torch.float32, logits.shape[1], head),
        images,
        torch.zeros(3),
        torch.ones(3),
        image_sizes=[(8, 6), (8, 8)],
        negatives=negatives,
    )


def log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def hand_softmax(student, teacher) -> float:
    """T² KL(softmax(z_t/T) || softmax(z_s[1:]/T)), mean over the negatives, in plain floats."""
    total = 0.0
    for z_s, z_t in zip(student, teacher):
        log_ps = log_softmax([v / T for v in z_s[1:]])  # the C foreground logits, renormalised
        log_pt = log_softmax([v / T for v in z_t])
        total += T**2 * sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps))
    return total / len(student)


def hand_sigmoid(student, teacher) -> float:
    """T² · mean over classes of the binary KL of sigmoid(z/T), mean over the negatives, in plain floats."""
    total = 0.0
    for z_s, z_t in zip(student, teacher):
        kl = 0.0
        for s, t in zip(z_s, z_t):
            qs, qt = 1 / (1 + math.exp(-s / T)), 1 / (1 + math.exp(-t / T))
            kl += qt * math.log(qt / qs) + (1 - qt) * math.log((1 - qt) / (1 - qs))
        total += T**2 * kl / len(z_s)
    return total / len(student)


@pytest.mark.parametrize(
    "head, student, hand",
    [
        ("softmax", [[3.0, 1.0, -0.5, 0.25], [-2.0, 0.0, 2.0, 1.0]], hand_softmax),
        ("sigmoid", [[1.0, -0.5, 0.25], [0.0, 2.0, 1.0]], hand_sigmoid),
    ],
)
def test_loss_against_hand_computation(head, student, hand):
    logits = torch.tensor(student, requires_grad=True)
    teacher = StubTeacher(TEACHER)
    output = make_output(logits, head)
    loss = kd_cls_negatives_loss(output, output.images, teacher, T)
    expected = hand(student, TEACHER)
    assert expected > 0.05 and loss.item() == pytest.approx(expected, rel=1e-5)
    # the teacher saw each negative's box clipped to its own image (8x6 px, 8x8 px), not the padding or beyond
    index = output.negatives.image_index
    clipped = crop_boxes(output.images, torch.tensor([[4.0, 2.0, 6.0, 6.0], [0.0, 0.0, 3.0, 3.0]]), index, size=4)
    torch.testing.assert_close(teacher.crops, clipped, rtol=0, atol=1e-6)
    assert not torch.allclose(clipped, crop_boxes(output.images, output.negatives.boxes, index, size=4))
    loss.backward()
    if head == "softmax":  # the background column is left to the detector's own loss
        assert torch.equal(logits.grad[:, 0], torch.zeros(2)) and logits.grad[:, 1:].abs().min() > 0
    else:
        assert logits.grad.abs().min() > 0


def test_softmax_background_logit_does_not_change_the_loss():
    """Renormalised over the foreground: any background score gives the same value."""
    teacher = StubTeacher(TEACHER)
    values = [
        kd_cls_negatives_loss(
            make_output(torch.tensor([[bg, 1.0, -0.5, 0.25], [bg, 0.0, 2.0, 1.0]]), "softmax"),
            torch.zeros(2, 3, 8, 8),
            teacher,
            T,
        ).item()
        for bg in (-5.0, 0.0, 9.0)
    ]
    assert values[0] == pytest.approx(values[1], abs=1e-6) == pytest.approx(values[2], abs=1e-6)


def test_no_negatives_gives_an_attached_zero_and_none_is_an_error():
    logits = torch.zeros(0, 4, requires_grad=True)
    output = make_output(torch.zeros(2, 4), "softmax")
    output.negatives = Negatives(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), logits, "softmax")
    teacher = StubTeacher(TEACHER)
    loss = kd_cls_negatives_loss(output, output.images, teacher, T)
    assert loss.item() == 0 and loss.requires_grad and teacher.crops is None  # the teacher did not run
    loss.backward()
    output.negatives = None
    with pytest.raises(ValueError, match="distill.kd_cls_negatives > 0 but the student returned no negatives"):
        kd_cls_negatives_loss(output, output.images, teacher, T)


def test_objective_adds_kd_cls_neg_weighted_by_lambda_kd_cls():
    student = [[1.0, -0.5, 0.25], [0.0, 2.0, 1.0]]
    output = make_output(torch.tensor(student), "sigmoid")
    config = DistillConfig(kd=["cls"], kd_cls_negatives=2, temperature=T, lambda_kd_cls=0.3)
    losses = classifier_losses(
        output, output.positives, StubTeacher(TEACHER), config, soft_labels=lambda positives: torch.zeros(0, 3)
    )
    assert set(losses) == {"kd_cls", "kd_cls_neg"} and losses["kd_cls"].item() == 0  # no positives here
    assert losses["kd_cls_neg"].item() == pytest.approx(hand_sigmoid(student, TEACHER), rel=1e-5)
    det = {"classification": torch.tensor(1.0)}
    assert total_loss(det, losses, loss_weights(config)).item() == pytest.approx(
        1.0 + 0.3 * losses["kd_cls_neg"].item(), rel=1e-6
    )
    # off (the paper's setting): no term, the teacher never sees a negative
    teacher = StubTeacher(TEACHER)
    off = classifier_losses(
        output, output.positives, teacher, DistillConfig(kd=["cls"]), soft_labels=lambda positives: torch.zeros(0, 3)
    )
    assert set(off) == {"kd_cls"} and teacher.crops is None
