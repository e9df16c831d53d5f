"""The one learning-rate schedule of the student (``engine.schedule``) and the teacher (``teacher.train``).

Neutral ground: imported by the engine and by the teacher package, imports neither.
"""

from __future__ import annotations

import math

WARMUP_FRACTION = 0.1  # the warm-up takes at most this fraction of a run's steps


def capped_warmup(warmup_steps: int, total_steps: int, fraction: float = WARMUP_FRACTION) -> int:
    """The warm-up length a run of ``total_steps`` uses: ``warmup_steps``, but at most ``fraction`` of the run
    (rounded up, so a run that asks for a warm-up keeps at least one step of it).

    A fixed warm-up that suits a long run swallows a short one: ``warmup_steps=100`` in a 20-step run ended it at
    0.4% of the target LR.
    """
    if warmup_steps <= 0 or total_steps <= 0:
        return max(0, warmup_steps)
    return min(warmup_steps, math.ceil(fraction * total_steps))


def lr_factor(step: int, total_steps: int, warmup_steps: int, *, schedule: str = "cosine", floor: float = 0.0) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): a linear warm-up from 0.001 over
    :func:`capped_warmup` steps, then ``schedule``: "cosine" (down to ``floor`` at ``total_steps``), "step"
    (torchvision's references: x0.1 at 2/3 and 8/9 of the run) or "constant"."""
    warmup = capped_warmup(warmup_steps, total_steps)
    if step < warmup:
        return 0.001 + 0.999 * step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 ** sum(step >= total_steps * f for f in (2 / 3, 8 / 9))
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def continue_schedule(scheduler) -> None:
    """Set every parameter group's LR to what ``scheduler`` (a torch ``LambdaLR``, its state just loaded) gives at the
    step it was saved at.

    The optimizer's saved LR is the one the *old* schedule reached: a finished cosine run saved 0 (the student) or
    its floor (the teacher), so a run extended by ``--resume`` (more epochs, a larger max_steps) trained its first new
    step at that LR. Its schedule is now laid over the new length, and the next step must use that schedule's LR.
    """
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
