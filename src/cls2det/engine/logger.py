"""Per-step loss logging to a CSV file and TensorBoard (rank 0 only)."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLogger:
    """Appends one row per logged step to ``csv_path`` and mirrors scalars to TensorBoard under ``tb_dir``.

    Columns are fixed by the first row written (a resumed run keeps the existing header); keys seen later that
    are not columns go to TensorBoard only.
    """

    def __init__(self, csv_path: Path, tb_dir: Path | None = None) -> None:
        self.csv_path = csv_path
        self.columns: list[str] | None = None
        if csv_path.is_file() and csv_path.stat().st_size:
            with open(csv_path, newline="") as f:
                self.columns = next(csv.reader(f))
        self.tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tb_dir))
            except ImportError:  # tensorboard is a dependency, but a stripped install still trains
                self.tb = None

    def log(self, row: dict[str, float], step: int) -> None:
        if self.columns is None:
            self.columns = list(row)
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in self.columns])
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
