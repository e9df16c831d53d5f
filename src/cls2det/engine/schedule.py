"""Optimizers and learning-rate schedules for student training."""

from __future__ import annotations

import torch
from torch import nn

from cls2det.config import OptimConfig
from cls2det.lr import lr_factor as shared_lr_factor


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
    """Multiplier of the base LR at optimizer step ``step`` (0-based): :func:`cls2det.lr.lr_factor` with
    ``config``'s warm-up (at most 10% of the run) and schedule."""
    return shared_lr_factor(step, total_steps, config.warmup_steps, schedule=config.schedule)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
