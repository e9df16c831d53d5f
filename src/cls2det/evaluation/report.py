"""Study summaries: aggregate per-seed COCO metrics into means, 95% CIs and paired deltas; write report.md/.csv.

A study result is a list of per-run dicts::

    {"row": "kd_cls", "seed": 0, "detector": "fasterrcnn_mobilenet_v3", "metrics": evaluate_coco(...),
     "wall_s": 312.5, "peak_mem_mb": 2048.0,
     "errors": error_breakdown(...)}   # optional: TIDE dAP50 per error type (cls2det.evaluation.errors)

The breakdown may also sit inside the metrics (``metrics["errors"]``, as ``cls2det eval --errors`` writes it).

Statistics (``summarize``): for each (detector, row), over its seeds, the mean and the 95% confidence half-width of the
mean, ``t_{0.975, n-1} * sd / sqrt(n)`` (Student t, sample sd with ddof=1; nan when n = 1). The delta of a row is the
mean of its *paired* differences to the baseline row of the same detector, over the seeds both have, with the same CI
formula applied to the differences (pairing removes the seed-to-seed variance shared by both rows).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from .coco_eval import IOU_THRESHOLDS, METRIC_KEYS
from .errors import ERROR_TYPES

__all__ = ["summarize", "paired_deltas", "write_report", "mean_ci"]

_REQUIRED = ("row", "seed", "detector", "metrics")
_NA = "—"


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95% CI half-width) of ``values``; half-width = t.ppf(0.975, n-1) * sd(ddof=1) / sqrt(n), nan if n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def _check(results: Sequence[dict]) -> None:
    seen = set()
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise TypeError(f"result #{i}: expected a dict, got {type(r).__name__}")
        for key in _REQUIRED:
            if key not in r:
                raise ValueError(f"result #{i}: missing key '{key}'")
        for key in METRIC_KEYS:
            if key not in r["metrics"]:
                raise ValueError(f"result #{i} (row {r['row']!r}, seed {r['seed']}): metrics lack '{key}'")
        errors = _errors(r)
        if errors is not None:
            missing = [k for k in ERROR_TYPES if k not in errors]
            if missing:
                raise ValueError(f"result #{i} (row {r['row']!r}, seed {r['seed']}): errors lack '{missing[0]}'")
        ident = (r["detector"], r["row"], r["seed"])
        if ident in seen:
            raise ValueError(f"result #{i}: duplicate run detector={ident[0]!r} row={ident[1]!r} seed={ident[2]}")
        seen.add(ident)


def _errors(r: dict) -> dict | None:
    """The run's TIDE breakdown: ``r["errors"]``, else ``r["metrics"]["errors"]``, else None."""
    errors = r.get("errors")
    return errors if errors is not None else r["metrics"].get("errors")


def _ap_per_iou(r: dict) -> dict[float, float]:
    per_iou = r["metrics"].get("AP_per_iou") or {}
    # JSON round-trips turn the float keys into strings; accept both.
    by_key = {round(float(k), 2): float(v) for k, v in per_iou.items()}
    return {iou: by_key.get(iou, float("nan")) for iou in IOU_THRESHOLDS}


def summarize(results: Sequence[dict], baseline_row: str = "baseline") -> list[dict]:
    """Aggregate ``results`` per (detector, row) over seeds.

    Returns one dict per (detector, row), detectors in order of first appearance, the baseline row first within its
    detector, then the other rows in order of first appearance::

        {"detector", "row", "seeds": [int], "n": int, "is_baseline": bool,
         "mean": {metric: float}, "ci": {metric: float},                  # over seeds, percent points
         "delta": {metric: float}, "delta_ci": {metric: float}, "delta_n": int,   # paired vs baseline (nan if none)
         "ap_per_iou": {iou: float}, "ap_per_iou_ci": {iou: float}, "ap_per_iou_delta": {iou: float},
         "wall_s": float, "peak_mem_mb": float,                           # means over seeds (nan if absent)
         "errors": {type: float}, "errors_ci": {type: float}, "errors_n": int}  # TIDE dAP50 ("AP50" = its base)

    ``errors`` averages ``result["errors"]`` over the seeds that carry it (``errors_n`` of them; empty dicts if none).
    ``metric`` ranges over ``METRIC_KEYS``. A metric that is nan in any seed (no GT of that size) has a nan mean.
    Deltas are nan for the baseline row itself and for rows sharing no seed with the baseline.
    """
    groups = _runs_by_row(results)
    detectors = list(dict.fromkeys(d for d, _ in groups))
    keys = [k for d in detectors for k in groups if k[0] == d and k[1] == baseline_row]
    keys += [k for d in detectors for k in groups if k[0] == d and k[1] != baseline_row]
    keys.sort(key=lambda k: detectors.index(k[0]))  # stable: keeps baseline-first within each detector

    summary = []
    for detector, row in keys:
        runs = groups[(detector, row)]
        seeds = sorted(runs)
        base = groups.get((detector, baseline_row), {}) if row != baseline_row else {}
        paired = [s for s in seeds if s in base]
        entry: dict = {
            "detector": detector,
            "row": row,
            "seeds": seeds,
            "n": len(seeds),
            "is_baseline": row == baseline_row,
            "mean": {},
            "ci": {},
            "delta": {},
            "delta_ci": {},
            "delta_n": len(paired),
        }
        for key in METRIC_KEYS:
            entry["mean"][key], entry["ci"][key] = mean_ci([runs[s]["metrics"][key] for s in seeds])
        entry["delta"], entry["delta_ci"] = _metric_deltas(runs, base, paired)
        per_iou = {s: _ap_per_iou(runs[s]) for s in seeds}
        base_iou = {s: _ap_per_iou(base[s]) for s in paired}
        entry["ap_per_iou"], entry["ap_per_iou_ci"], entry["ap_per_iou_delta"] = {}, {}, {}
        for iou in IOU_THRESHOLDS:
            entry["ap_per_iou"][iou], entry["ap_per_iou_ci"][iou] = mean_ci([per_iou[s][iou] for s in seeds])
            entry["ap_per_iou_delta"][iou] = mean_ci([per_iou[s][iou] - base_iou[s][iou] for s in paired])[0]
        for key in ("wall_s", "peak_mem_mb"):
            entry[key] = mean_ci([float(runs[s].get(key, float("nan"))) for s in seeds])[0]
        with_errors = [e for e in (_errors(runs[s]) for s in seeds) if e is not None]
        entry["errors"], entry["errors_ci"], entry["errors_n"] = {}, {}, len(with_errors)
        if with_errors:
            for key in ("AP50", *ERROR_TYPES):
                values = [float(e.get(key, float("nan"))) for e in with_errors]
                entry["errors"][key], entry["errors_ci"][key] = mean_ci(values)
        summary.append(entry)
    return summary


def paired_deltas(results: Sequence[dict], row: str, reference: str) -> list[dict]:
    """Δ of ``row`` over ``reference`` (e.g. the full method over +KD_cls), paired by seed within each detector.

    Returns one dict per detector that has both rows, in order of first appearance::

        {"detector", "row", "reference", "n": int,                         # seeds both rows have
         "delta": {metric: float}, "delta_ci": {metric: float}}            # mean of the paired differences ± 95% CI
    """
    runs = _runs_by_row(results)
    found = []
    for detector in dict.fromkeys(r["detector"] for r in results):
        ours, theirs = runs.get((detector, row), {}), runs.get((detector, reference), {})
        seeds = sorted(set(ours) & set(theirs))
        if not seeds:
            continue
        delta, delta_ci = _metric_deltas(ours, theirs, seeds)
        found.append(
            {
                "detector": detector,
                "row": row,
                "reference": reference,
                "n": len(seeds),
                "delta": delta,
                "delta_ci": delta_ci,
            }
        )
    return found


def _runs_by_row(results: Sequence[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """``results`` checked and grouped: {(detector, row): {seed: result}}, in order of first appearance."""
    _check(results)
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        groups.setdefault((r["detector"], r["row"]), {})[r["seed"]] = r
    return groups


def _metric_deltas(ours: dict[int, dict], theirs: dict[int, dict], seeds: Sequence[int]) -> tuple[dict, dict]:
    """({metric: mean}, {metric: 95% CI half-width}) of the paired differences ours - theirs over ``seeds``."""
    delta, delta_ci = {}, {}
    for key in METRIC_KEYS:
        delta[key], delta_ci[key] = mean_ci([ours[s]["metrics"][key] - theirs[s]["metrics"][key] for s in seeds])
    return delta, delta_ci


# ---------------------------------------------------------------------------------------------------- formatting


def _num(x: float, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return _NA
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _with_ci(mean: float, ci: float, n: int, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return _NA
    if n < 2:
        return f"{_num(mean, signed)} (n=1)"
    return f"{_num(mean, signed)} ± {_num(ci)}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return _NA
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _memory(mb: float) -> str:
    if not math.isfinite(mb):
        return _NA
    return f"{mb:.1f} MB" if mb < 1024 else f"{mb / 1024:.1f} GB"


_COLUMNS = [
    "row",
    "mAP ± CI",
    "Δ mAP",
    "AP50",
    "Δ AP50",
    "AP75",
    "Δ AP75",
    "APs",
    "APm",
    "APl",
    "mAR",
    "seeds",
    "wall time",
    "peak memory",
]


def _table_row(e: dict) -> list[str]:
    def delta(key: str) -> str:
        return _NA if e["is_baseline"] else _with_ci(e["delta"][key], e["delta_ci"][key], e["delta_n"], signed=True)

    m = e["mean"]
    return [
        f"`{e['row']}`",
        _with_ci(m["mAP"], e["ci"]["mAP"], e["n"]),
        delta("mAP"),
        _num(m["AP50"]),
        delta("AP50"),
        _num(m["AP75"]),
        delta("AP75"),
        _num(m["APs"]),
        _num(m["APm"]),
        _num(m["APl"]),
        _num(m["mAR"]),
        str(e["n"]),
        _duration(e["wall_s"]),
        _memory(e["peak_mem_mb"]),
    ]


def _markdown_table(entries: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(_table_row(e)) + " |" for e in entries]
    return lines


def _error_table(entries: list[dict]) -> list[str]:
    columns = ["row", "TIDE AP50", *ERROR_TYPES, "seeds"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for e in entries:
        if not e["errors_n"]:
            continue
        cells = [f"`{e['row']}`"]
        cells += [_with_ci(e["errors"][k], e["errors_ci"][k], e["errors_n"]) for k in ("AP50", *ERROR_TYPES)]
        lines.append("| " + " | ".join([*cells, str(e["errors_n"])]) + " |")
    return lines


def _comparison_table(entries: list[dict]) -> list[str]:
    keys = ("mAP", "AP50", "AP75")
    columns = ["detector", "row − reference", *(f"Δ {k}" for k in keys), "seeds"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) - 2)) + "|"]
    for e in entries:
        cells = [e["detector"], f"`{e['row']}` − `{e['reference']}`"]
        cells += [_with_ci(e["delta"][k], e["delta_ci"][k], e["n"], signed=True) for k in keys]
        lines.append("| " + " | ".join([*cells, str(e["n"])]) + " |")
    return lines


def _csv_value(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def write_report(
    results: Sequence[dict],
    out_dir: str | Path,
    *,
    title: str,
    teacher_top1: float | None = None,
    notes: Sequence[str] = (),
    plots: Sequence[str | Path] = (),
    baseline_row: str = "baseline",
    comparisons: Sequence[Sequence[str]] = (),
) -> Path:
    """Write ``out_dir/report.md`` (summary table per detector, teacher top-1, notes, plots) and ``out_dir/report.csv``
    (one line per row x seed with every metric). Returns the path of report.md.

    Args:
        teacher_top1: the teacher's top-1 accuracy on the held-out D_cls split, in percent.
        plots: image files to embed; paths inside ``out_dir`` are linked relative to it.
        comparisons: ``(row, reference)`` pairs whose paired Δ (:func:`paired_deltas`) gets its own table.
    """
    summary = summarize(results, baseline_row=baseline_row)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    md = [
        f"# {title}",
        "",
        "COCO box metrics in percent: mean over seeds ± 95% CI half-width (Student t; `n=1`: a single seed, no CI). "
        f"Δ = mean of the paired same-seed differences to the `{baseline_row}` row of the same detector "
        "± its 95% CI. "
        f"{_NA} = not applicable (the baseline itself, no paired seed, or no ground truth of that size). "
        "Wall time and peak memory are means over seeds.",
        "",
    ]
    for detector in dict.fromkeys(e["detector"] for e in summary):
        md += [f"## {detector}", ""]
        md += _markdown_table([e for e in summary if e["detector"] == detector]) + [""]
    compared = [e for row, reference in comparisons for e in paired_deltas(results, row, reference)]
    if compared:
        md += [
            "## Paired comparisons",
            "",
            "Δ of a row over another row than the baseline, paired by seed within each detector, ± 95% CI.",
            "",
            *_comparison_table(compared),
            "",
        ]
    has_errors = any(e["errors_n"] for e in summary)
    if has_errors:
        md += [
            "## Error breakdown (TIDE)",
            "",
            "AP50 points lost to each error type (Bolya et al. 2020: dAP50 when only that type is fixed; IoU "
            "t_f = 0.5, t_b = 0.1), mean over seeds ± 95% CI half-width; TIDE AP50 is its base AP50 (mean over "
            "classes with a GT or a detection). cls = right box, wrong class; loc = right class, 0.1 ≤ IoU ≤ 0.5; "
            "both = wrong class and 0.1 < IoU < 0.5; dupe = duplicate of a matched GT; bkg = IoU ≤ 0.1 with every "
            "GT; miss = GT never detected.",
            "",
        ]
        for detector in dict.fromkeys(e["detector"] for e in summary):
            entries = [e for e in summary if e["detector"] == detector and e["errors_n"]]
            if entries:
                md += [f"### {detector}", ""] + _error_table(entries) + [""]
    if teacher_top1 is not None:
        md += ["## Teacher", "", f"Teacher top-1 accuracy (held-out D_cls): {_num(float(teacher_top1))}%", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    if plots:
        md += ["## Plots", ""]
        for p in plots:
            p = Path(p)
            try:
                link = Path(os.path.relpath(p.resolve(), out.resolve())).as_posix()
            except ValueError:  # another drive on Windows
                link = p.resolve().as_posix()
            if link.startswith(".."):
                link = p.resolve().as_posix()
            md += [f"![{p.stem}]({link})", ""]
    report_md = out / "report.md"
    report_md.write_text("\n".join(md))

    header = [
        "detector",
        "row",
        "seed",
        *METRIC_KEYS,
        *(f"AP@{iou:.2f}" for iou in IOU_THRESHOLDS),
        "wall_s",
        "peak_mem_mb",
    ]
    if has_errors:
        header += ["tide_AP50", *(f"dAP50_{k}" for k in ERROR_TYPES)]
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in results:
            per_iou = _ap_per_iou(r)
            values = [
                r["detector"],
                r["row"],
                r["seed"],
                *(float(r["metrics"][k]) for k in METRIC_KEYS),
                *(per_iou[iou] for iou in IOU_THRESHOLDS),
                float(r.get("wall_s", float("nan"))),
                float(r.get("peak_mem_mb", float("nan"))),
            ]
            if has_errors:
                errors = _errors(r) or {}
                values += [float(errors.get(k, float("nan"))) for k in ("AP50", *ERROR_TYPES)]
            writer.writerow([_csv_value(v) for v in values])
    return report_md
