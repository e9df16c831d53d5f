"""How big is each weighted distillation term against the detector's own box loss, early and late in training?

Reads each run's ``metrics.csv`` (one line per optimizer step: every loss term unweighted, and ``w_<term>`` for the
weighted distillation terms) and prints, for the first and the last ``--steps`` steps, the mean of the box loss
(``bbox_regression`` for SSD / RetinaNet / FCOS, ``loss_box_reg`` for Faster R-CNN's box head) and of each ``w_*``
term, and the term's share of the box loss. This is the number to match when choosing ``distill.lambda_kd_loc`` for a
new detector (README: "The KD_loc weight").

    python benchmarks/loss_shares.py RUN [RUN ...] [--steps 20]
"""

import argparse
import csv
import math
from pathlib import Path

BOX_LOSSES = ("bbox_regression", "loss_box_reg")


def mean(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(values) / len(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print("| run | steps | box loss | term | weighted term | share of the box loss |")
    print("|---|---|---:|---|---:|---:|")
    for run in args.runs:
        with open(run / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step")]
        box = next((k for k in BOX_LOSSES if rows and k in rows[0]), None)
        if box is None:
            raise SystemExit(f"error: {run}/metrics.csv has none of the box losses {', '.join(BOX_LOSSES)}")
        terms = [k for k in rows[0] if k.startswith("w_")]
        for label, part in (("first", rows[: args.steps]), ("last", rows[-args.steps :])):
            box_mean = mean(part, box)
            for term in terms:
                weighted = mean(part, term)
                print(
                    f"| {run} | {label} {len(part)} | {box} {box_mean:.3f} | {term[2:]} | {weighted:.3f} "
                    f"| {weighted / box_mean:.1%} |"
                )


if __name__ == "__main__":
    main()
