import math

import pytest
import torch

from cls2det.config import OptimConfig
from cls2det.engine.schedule import build_optimizer, lr_factor


def test_warmup_then_cosine():
    config = OptimConfig(warmup_steps=10, schedule="cosine")
    assert lr_factor(0, 110, config) == pytest.approx(0.001)
    assert lr_factor(5, 110, config) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, 110, config) == pytest.approx(1.0)
    assert lr_factor(60, 110, config) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(110, 110, config) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule():
    config = OptimConfig(warmup_steps=0, schedule="step")
    assert [lr_factor(s, 90, config) for s in (0, 59, 60, 79, 80)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3])] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    assert math.isclose(optimizer.defaults["lr"], OptimConfig().lr)


def test_warmup_is_capped_to_a_tenth_of_a_short_run():
    config = OptimConfig(warmup_steps=100, schedule="constant")
    # 20 steps: the warm-up takes 2 (10%), not 100 (at step 20 the LR was 0.4% of its target)
    assert [lr_factor(s, 20, config) for s in (0, 1, 2, 19)] == pytest.approx([0.001, 0.5005, 1.0, 1.0])
    assert lr_factor(50, 2000, config) == pytest.approx(0.001 + 0.999 * 0.5)  # a long run keeps its 100 steps
