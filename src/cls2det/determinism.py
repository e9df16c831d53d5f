"""``deterministic=true`` (teacher and student configs): the same seed gives bit-identical weights across processes.

What the flag switches on, for the duration of one training run (the previous settings come back afterwards):

* ``torch.use_deterministic_algorithms(True)``: an op without a deterministic kernel on the run's device raises
  instead of silently adding in a varying order (on CUDA: ``index_add`` / scatter in torchvision's RoI ops'
  backward, ``grid_sample`` backward, ...);
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS needs it for deterministic matmuls; set only if unset) and
  cuDNN without autotuning (``benchmark=False``, ``deterministic=True``).

Seeding is not the flag's job: every run seeds its initial weights, data order and augmentation from ``seed``
whether or not ``deterministic`` is set. On CPU at a fixed thread count the runs are already bit-identical
(measured, README "Reliability"); the flag is the guard that makes a non-deterministic op an error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within the block, deterministic kernels only (``enabled``) or torch's settings left as they are."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    set_cublas = "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    if set_cublas:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]
        if set_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
