"""Optimizers and learning-rate schedules for student training."""

from __future__ import annotations

import math

import torch
from torch import nn

from cls2det.config import OptimConfig
from cls2det.lr import capped_warmup


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over trainable parameters; no weight decay on norms and biases (as timm does)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    The warm-up is ``config.warmup_steps`` long, but at most 10% of the run (:func:`cls2det.lr.capped_warmup`).
    """
    warmup = capped_warmup(config.warmup_steps, total_steps)
    if step < warmup:
        return 0.001 + 0.999 * step / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":  # torchvision's references: x0.1 at 2/3 and 8/9 of training
        return 0.1 ** sum(step >= total_steps * f for f in (2 / 3, 8 / 9))
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
