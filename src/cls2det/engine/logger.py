"""What a student run shows and records while it trains: per-step losses in metrics.csv and TensorBoard (the
writer lives in :mod:`cls2det.files`, shared with the teacher), a progress bar with ETA, the peak memory."""

from __future__ import annotations

import resource

import torch

from cls2det.files import MetricsLogger, truncate_metrics

__all__ = ["MetricsLogger", "ProgressBar", "peak_memory_mb", "truncate_metrics"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class ProgressBar:
    """A rich progress bar with ETA (or nothing), called as ``bar(step, epoch)``."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled, self.total, self.completed = enabled, total, completed

    def __enter__(self):
        if not self.enabled:
            return lambda step, epoch: None
        from rich import progress

        self.bar = progress.Progress(
            progress.TextColumn("{task.description}"),
            progress.BarColumn(),
            progress.MofNCompleteColumn(),
            progress.TimeElapsedColumn(),
            progress.TimeRemainingColumn(),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("train", total=self.total, completed=self.completed)
        return lambda step, epoch: self.bar.update(task, completed=step, description=f"train epoch {epoch}")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
