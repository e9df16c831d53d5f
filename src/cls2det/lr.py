"""The one learning-rate rule the student's schedule (``engine.schedule``) and the teacher's share.

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
