"""kd_cls_loss, eq. (1)-(7): hand cases, a literal per-element reference, gradients, edge cases."""

import math

import pytest
import torch

from cls2det.distill import kd_cls_loss


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def naive_kd_cls(student, teacher, labels, head, temperature):
    """Eq. (2)-(4) / (5)-(7) written out element by element in plain Python floats."""
    student, teacher, labels = student.tolist(), teacher.tolist(), labels.tolist()
    t2, total = temperature**2, 0.0
    for z_s, z_t, label in zip(student, teacher, labels):
        num_classes = len(z_t)
        if head == "softmax":
            log_ps = _log_softmax([v / temperature for v in z_s])  # C+1 entries, index 0 = background
            log_pt = [-math.inf] + _log_softmax([v / temperature for v in z_t])  # p_t(background) = 0
            kl = 0.0
            for c in range(num_classes + 1):
                p = math.exp(log_pt[c])
                if p > 0:  # 0 log 0 = 0
                    kl += p * (log_pt[c] - log_ps[c])
            total += t2 * kl
        else:
            kl = 0.0
            for c in range(num_classes):
                # eq. (6): [1-q, q] if c == label else [q, 1-q], for both networks
                def states(z, c=c, label=label):
                    log_q, log_1mq = _log_sigmoid(z / temperature), _log_sigmoid(-z / temperature)
                    return [log_1mq, log_q] if c == label else [log_q, log_1mq]

                for lpt, lps in zip(states(z_t[c]), states(z_s[c])):
                    if math.exp(lpt) > 0:
                        kl += math.exp(lpt) * (lpt - lps)
            total += t2 / num_classes * kl
    return total / len(labels)


def test_softmax_hand_case():
    # K=1, C=2: student [bg, c0, c1] = [0.5, 1.0, -1.0], teacher [2.0, 0.0], T=1
    s = torch.tensor([[0.5, 1.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    # p_t = [e^2, 1] / (e^2 + 1); p_s over 3 outputs = exp(z) / (e^0.5 + e^1 + e^-1)
    pt0, pt1 = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)
    z = math.exp(0.5) + math.exp(1.0) + math.exp(-1.0)
    ps1, ps2 = math.exp(1.0) / z, math.exp(-1.0) / z
    expected = pt0 * math.log(pt0 / ps1) + pt1 * math.log(pt1 / ps2)
    # = 0.8808 * log(0.8808 / 0.5741) + 0.1192 * log(0.1192 / 0.0777)
    assert expected == pytest.approx(0.42803, abs=1e-5)
    loss = kd_cls_loss(s, t, torch.tensor([0]), head="softmax", temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # T = 2: logits halved, result times T^2 = 4
    pt0, pt1 = math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)
    z = math.exp(0.25) + math.exp(0.5) + math.exp(-0.5)
    ps1, ps2 = math.exp(0.5) / z, math.exp(-0.5) / z
    expected_t2 = 4 * (pt0 * math.log(pt0 / ps1) + pt1 * math.log(pt1 / ps2))
    loss = kd_cls_loss(s, t, torch.tensor([0]), head="softmax", temperature=2.0)
    assert loss.item() == pytest.approx(expected_t2, rel=1e-12)


def test_sigmoid_hand_case():
    # K=1, C=2, label 1: student [0.3, -0.7], teacher [1.2, 0.4], T=1
    s = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    t = torch.tensor([[1.2, 0.4]], dtype=torch.float64)

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def binary_kl(qt, qs):
        return qt * math.log(qt / qs) + (1 - qt) * math.log((1 - qt) / (1 - qs))

    expected = (binary_kl(sig(1.2), sig(0.3)) + binary_kl(sig(0.4), sig(-0.7))) / 2  # T^2 / C with T=1, C=2
    # q_t = [0.7685, 0.5987], q_s = [0.5744, 0.3318]: (0.0827 + 0.1487) / 2
    assert expected == pytest.approx(0.11574, abs=1e-5)
    loss = kd_cls_loss(s, t, torch.tensor([1]), head="sigmoid", temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_matches_naive_loop(head, temperature):
    g = torch.Generator().manual_seed(int(temperature * 10) + (head == "sigmoid"))
    k, c = 6, 4
    s = torch.randn(k, c + (head == "softmax"), generator=g, dtype=torch.float64) * 3
    t = torch.randn(k, c, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (k,), generator=g)
    loss = kd_cls_loss(s, t, labels, head=head, temperature=temperature)
    assert loss.shape == () and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(naive_kd_cls(s, t, labels, head, temperature), rel=1e-10)


def test_sigmoid_zero_when_student_equals_teacher():
    t = torch.randn(5, 3, dtype=torch.float64) * 5
    loss = kd_cls_loss(t.clone(), t, torch.tensor([0, 1, 2, 0, 1]), head="sigmoid")
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("background", [-1e4, -math.inf])
def test_softmax_zero_when_fg_logits_equal_and_background_vanishes(background):
    t = torch.randn(5, 3, dtype=torch.float64) * 5
    s = torch.cat([torch.full((5, 1), background, dtype=torch.float64), t], dim=1).requires_grad_()
    loss = kd_cls_loss(s, t, torch.zeros(5, dtype=torch.int64), head="softmax", temperature=2.0)
    assert abs(loss.item()) < 1e-12
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # a real background logit makes the student put mass where the teacher has none: the loss turns positive
    s2 = torch.cat([torch.zeros(5, 1, dtype=torch.float64), t], dim=1)
    assert kd_cls_loss(s2, t, torch.zeros(5, dtype=torch.int64), head="softmax").item() > 1e-3


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradcheck(head, temperature):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 3 + (head == "softmax"), generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda x: kd_cls_loss(x, t, labels, head=head, temperature=temperature), (s,))


@pytest.mark.parametrize("head,width", [("softmax", 4), ("sigmoid", 3)])
def test_empty_positives(head, width):
    s = torch.zeros(0, width, requires_grad=True)
    loss = kd_cls_loss(s, torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), head=head)
    assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert s.grad.shape == (0, width)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_extreme_logits_stay_finite(head):
    s = torch.tensor([[1e4, -1e4, 1e4, -1e4][: 3 + (head == "softmax")]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, -1e4]])
    loss = kd_cls_loss(s, t, torch.tensor([1]), head=head)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(s.grad).all()


def test_teacher_is_detached_and_half_precision_keeps_dtype():
    t = torch.randn(3, 2, requires_grad=True)
    s = torch.randn(3, 3, requires_grad=True)
    kd_cls_loss(s, t, torch.tensor([0, 1, 0]), head="softmax").backward()
    assert t.grad is None and s.grad is not None
    ref = kd_cls_loss(s.detach(), t.detach(), torch.tensor([0, 1, 0]), head="softmax")
    low = kd_cls_loss(s.detach().bfloat16(), t.detach().bfloat16(), torch.tensor([0, 1, 0]), head="softmax")
    assert low.dtype == torch.bfloat16 and low.float().item() == pytest.approx(ref.item(), rel=0.05)


@pytest.mark.parametrize(
    "kwargs,shapes,message",
    [
        ({"head": "softmaxx"}, ((2, 4), (2, 3), (2,)), "head must be one of"),
        ({"head": "softmax", "temperature": 0.0}, ((2, 4), (2, 3), (2,)), "temperature must be > 0"),
        ({"head": "softmax"}, ((2, 3), (2, 3), (2,)), r"student_logits must be \[2, 4\] for head='softmax'"),
        ({"head": "sigmoid"}, ((2, 4), (2, 3), (2,)), r"student_logits must be \[2, 3\] for head='sigmoid'"),
        ({"head": "sigmoid"}, ((2, 3), (2, 3), (3,)), r"labels must be \[K\]=2"),
        ({"head": "sigmoid"}, ((3,), (2, 3), (2,)), "must be 2-D"),
    ],
)
def test_bad_inputs_raise(kwargs, shapes, message):
    s, t, labels = torch.zeros(shapes[0]), torch.zeros(shapes[1]), torch.zeros(shapes[2], dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        kd_cls_loss(s, t, labels, **kwargs)
