"""cls2det.teacher.train: augmentation, losses, LR schedule, and training that demonstrably learns."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from cls2det.config import TeacherConfig
from cls2det.lr import lr_factor
from cls2det.teacher import Augment, TeacherError, build_teacher, classification_loss, evaluate_top1, fit_teacher


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny training runs are latency-bound: on shared CPU cores, 2 intra-op threads ran them ~4x slower than 1
    (a 5-epoch ResNet-18 demo fit: 81 s vs 22 s). Restored afterwards; the library never changes thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NO_AUG = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0)


def shapes(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    """D_cls stand-in, items (crop [3, size, size] in 0..1, label): 0 = square, 1 = disc, 2 = plus sign.

    Random bright colour on a dark noisy background, random size and position: the label is in the shape only.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, labels = [], []
    for i in range(n):
        label = i % 3
        r = size * (0.28 + 0.1 * torch.rand((), generator=g))
        cx, cy = size / 2 + (torch.rand(2, generator=g) - 0.5) * size * 0.1
        dx, dy = (xx - cx).abs(), (yy - cy).abs()
        mask = [(dx < r) & (dy < r), dx**2 + dy**2 < r**2, ((dx < r) & (dy < r / 3)) | ((dy < r) & (dx < r / 3))][label]
        fg, bg = 0.6 + 0.4 * torch.rand(3, 1, 1, generator=g), 0.3 * torch.rand(3, size, size, generator=g)
        images.append(torch.where(mask, fg, bg))
        labels.append(label)
    return TensorDataset(torch.stack(images), torch.tensor(labels))


# ----------------------------------------------------------------------------------------------- augmentation


def test_augment_without_ranges_is_the_identity():
    x = torch.rand(5, 3, 16, 16)
    torch.testing.assert_close(Augment(**NO_AUG)(x, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)


def test_augment_hflip_is_an_option_off_by_default():
    x = torch.rand(64, 3, 8, 8)
    assert Augment().hflip is False
    y = Augment(**NO_AUG, hflip=True)(x, torch.Generator().manual_seed(0))
    same = [(y[i] - x[i]).abs().max() < 1e-5 for i in range(64)]
    flipped = [(y[i] - x[i].flip(-1)).abs().max() < 1e-5 for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped)) and 10 < sum(flipped) < 54


def test_augment_brightness_and_contrast_by_hand():
    x = 0.25 + 0.5 * torch.rand(32, 3, 8, 8)  # away from 0 and 1: no clamping for factors in 0.8..1.2
    y = Augment(**{**NO_AUG, "brightness": 0.2})(x, torch.Generator().manual_seed(1))
    factor = y / x  # one factor per crop, within 1 +- 0.2
    torch.testing.assert_close(factor, factor[:, :1, :1, :1].expand_as(factor), rtol=1e-4, atol=1e-5)
    assert factor.min() >= 0.8 - 1e-5 and factor.max() <= 1.2 + 1e-5 and factor.std() > 0.01
    y = Augment(**{**NO_AUG, "contrast": 0.2})(x, torch.Generator().manual_seed(1))
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    ratio = (y - grey) / (x - grey)  # deviation from the crop's mean grey is scaled by 1 +- 0.2
    assert torch.allclose(y.mean(dim=(1, 2, 3)), grey.flatten(), atol=1e-5)
    assert ratio.min() >= 0.8 - 1e-3 and ratio.max() <= 1.2 + 1e-3


def test_augment_crops_and_shifts_within_range_and_is_seeded():
    x = torch.rand(16, 3, 24, 24)
    aug = Augment(scale=(0.6, 0.6), ratio=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0)
    a, b = aug(x, torch.Generator().manual_seed(3)), aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x, atol=1e-2)  # a zoom of sqrt(0.6) ~ 0.77 of the side
    # a pure crop: the zoomed crop lies inside the source, so no zero padding appears
    assert (a.amin(dim=(1, 2, 3)) > 0).all()
    shifted = Augment(**{**NO_AUG, "translate": 0.25})(torch.ones(64, 3, 24, 24), torch.Generator().manual_seed(0))
    zero_cols = (shifted[:, 0] < 1e-6).all(dim=1).sum(dim=1)  # [64] whole columns of zero padding per crop
    assert zero_cols.max() >= 3 and zero_cols.max() <= math.ceil(0.25 * 24) + 1


# ----------------------------------------------------------------------------------------------- losses, schedule


def test_classification_losses_by_hand():
    logits, labels = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]]), torch.tensor([0, 2])
    ce = -sum(torch.log_softmax(logits[i], 0)[labels[i]] for i in range(2)) / 2
    torch.testing.assert_close(classification_loss(logits, labels, "ce"), ce)
    target = torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    s = torch.sigmoid(logits)
    bce = -(target * s.log() + (1 - target) * (1 - s).log()).sum() / 2  # summed over classes, mean over crops
    torch.testing.assert_close(classification_loss(logits, labels, "bce"), bce)
    torch.testing.assert_close(classification_loss(logits, labels, "ce+bce"), ce + bce)
    smoothed = target * 0.9 + 0.1 / 3
    torch.testing.assert_close(
        classification_loss(logits, labels, "bce", 0.1),
        F.binary_cross_entropy_with_logits(logits, smoothed, reduction="sum") / 2,
    )
    with pytest.raises(TeacherError, match="unknown teacher loss 'focal'"):
        classification_loss(logits, labels, "focal")


def test_the_teachers_lr_warms_up_linearly_then_decays_by_cosine_to_one_percent():
    """The teacher's schedule is the student's rule (cls2det.lr) with a floor: 1% of the peak at the end."""
    warmup, total = 10, 110
    assert lr_factor(0, total, warmup, floor=0.01) == pytest.approx(0.001)
    assert lr_factor(5, total, warmup, floor=0.01) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, total, warmup, floor=0.01) == pytest.approx(1.0)
    assert lr_factor(60, total, warmup, floor=0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(110, total, warmup, floor=0.01) == pytest.approx(0.01)
    assert lr_factor(1, 20, 100, floor=0.01) == pytest.approx(0.5005)  # 100 warm-up steps capped at 10% of 20


# ----------------------------------------------------------------------------------------------- training


def test_fit_is_seeded_and_leaves_the_global_rng_alone():
    data = shapes(24, size=16)
    config = TeacherConfig(arch="test_resnet", input_size=16, epochs=1, batch_size=8, loss="ce+bce")
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        teacher = build_teacher("test_resnet", 3, input_size=16)
        before = torch.get_rng_state()
        metrics = fit_teacher(teacher, data, data, config, progress=False)
        runs.append((teacher, metrics))
        assert torch.equal(torch.get_rng_state(), before)  # fit forks the RNG: the caller's stream is untouched
    (a, ma), (b, mb) = runs
    for (name, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(p, q), name
    assert ma["history"] == mb["history"] and a.loss == "ce+bce"
    assert ma["steps"] == 3 and ma["num_train"] == 24 and ma["epochs"] == 1 and ma["wall_s"] > 0


def test_fit_does_not_depend_on_the_number_of_workers():
    """One loader per run with persistent workers, its own generator: 0 or 2 workers train the same weights."""
    data = shapes(24, size=16)
    weights = []
    for workers in (0, 2):
        config = TeacherConfig(arch="test_resnet", input_size=16, epochs=2, batch_size=8, workers=workers)
        teacher = build_teacher("test_resnet", 3, input_size=16)
        torch.manual_seed(0)
        teacher = build_teacher("test_resnet", 3, input_size=16)
        metrics = fit_teacher(teacher, data, data, config, progress=False)
        weights.append((teacher.net.state_dict(), metrics["history"]))
    (a, ha), (b, hb) = weights
    assert ha == hb and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_refuses_an_empty_training_set_and_a_frozen_teacher():
    empty = TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(TeacherError, match="training set is empty"):
        fit_teacher(build_teacher("test_resnet", 3), empty, None, TeacherConfig(), progress=False)
    with pytest.raises(TeacherError, match="teacher 'test_resnet' is frozen"):
        fit_teacher(build_teacher("test_resnet", 3).freeze(), shapes(6, 16), None, TeacherConfig(), progress=False)


def test_fit_reports_each_epoch_with_progress_on(capsys):
    config = TeacherConfig(arch="test_resnet", input_size=16, epochs=2, batch_size=4)
    metrics = fit_teacher(build_teacher("test_resnet", 3, input_size=16), shapes(8, 16), shapes(6, 16, seed=1), config)
    out = capsys.readouterr().out
    for h in metrics["history"]:
        assert f"teacher epoch {h['epoch']}: train loss {h['loss']:.4f}, val top-1 {h['top1']:.2f}%" in out


def test_a_backbone_pre_training_reports_under_its_own_name_without_a_val_column(capsys):
    """The study's backbone pre-training (no val split) logged as "teacher epoch 1 ... val top-1 n/a"."""
    config = TeacherConfig(arch="test_resnet", input_size=16, epochs=1, batch_size=4)
    teacher = build_teacher("test_resnet", 3, input_size=16)
    metrics = fit_teacher(teacher, shapes(8, 16), None, config, label="ssdlite320_mobilenet_v3 backbone pre-training")
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if "epoch 1:" in line]
    loss = metrics["history"][0]["loss"]
    assert lines == [f"ssdlite320_mobilenet_v3 backbone pre-training epoch 1: train loss {loss:.4f}"]


def test_training_learns_shapes_and_keeps_the_best_epoch():
    """Proof of learning: chance is 33%; a tiny ResNet from scratch reaches > 90% top-1 in 60 steps."""
    train, val = shapes(240, seed=0), shapes(150, seed=1)
    teacher = build_teacher("test_resnet", 3, input_size=32)
    config = TeacherConfig(arch="test_resnet", input_size=32, epochs=4, batch_size=16, lr=5e-3, seed=1)
    metrics = fit_teacher(teacher, train, val, config, progress=False)
    top1s = [h["top1"] for h in metrics["history"]]
    assert metrics["top1"] == max(top1s) > 90.0 and metrics["best_epoch"] == 1 + top1s.index(max(top1s))
    assert evaluate_top1(teacher, val) == pytest.approx(metrics["top1"])  # the best epoch's weights were kept
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]


@pytest.mark.slow
def test_train_teacher_on_the_demo_dataset(tmp_path):
    """End to end: demo detection set -> D_cls crops -> ResNet-18 at 32 px -> run folder that load_teacher reads.

    32 px: the demo digits are 8x8 scans, upscaled; 32 px is as good as 112 px here at a tenth of the cost.
    """
    from cls2det.data import ClassificationCrops, generate_demo, load_split
    from cls2det.teacher import load_teacher, train_teacher

    data = generate_demo(tmp_path / "demo", train_images=200, val_images=80, image_size=128)
    config = TeacherConfig(arch="resnet18", input_size=32, epochs=5, batch_size=32, lr=3e-3)
    metrics = train_teacher(data, tmp_path / "teacher", config, progress=False)
    assert metrics["top1"] > 50.0  # ten digit classes: chance is 10%; measured 70% (5 epochs, 736 crops)
    meta = json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["input_size"] == 32
    assert meta["metrics"]["top1"] == metrics["top1"] and meta["config"]["lr"] == 3e-3
    teacher = load_teacher(tmp_path / "teacher")
    val = ClassificationCrops(load_split(data, "val"), size=32)
    assert evaluate_top1(teacher, val) == pytest.approx(metrics["top1"])
