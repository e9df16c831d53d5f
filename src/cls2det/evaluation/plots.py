"""Paper-style figures for a study: AP vs IoU threshold, training-loss and val curves, prediction grids (PNG, dpi 150).

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) rather than ``pyplot``: no global backend switch,
no figure registry to leak, safe in worker threads.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .coco_eval import IOU_THRESHOLDS
from .errors import ERROR_TYPES
from .report import summarize

__all__ = [
    "plot_ap_vs_iou",
    "plot_error_breakdown",
    "plot_loss_curves",
    "plot_prediction_grid",
    "plot_val_curves",
    "smooth",
]

DPI = 150
_SKIP_COLUMNS = {"step", "epoch", "lr"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    return path


def _is_summary(items: Sequence[dict]) -> bool:
    return bool(items) and all("ap_per_iou" in e and "mean" in e for e in items)


def plot_ap_vs_iou(summary_or_results: Sequence[dict], path: str | Path, *, baseline_row: str = "baseline") -> Path:
    """AP at each IoU threshold 0.50..0.95, one line per row, mean over seeds with a 95% CI band; one row of panels
    per detector, a row keeping its colour in every detector's panels.

    ``summary_or_results`` is either :func:`summarize`'s output or the raw per-seed results it takes. When some row has
    a paired baseline, a second panel shows ΔAP vs the baseline at each threshold (the paper's Table 5 analysis:
    KD_cls mostly lifts AP at low IoU, KD_loc at high IoU).
    """
    items = list(summary_or_results)
    if not items:
        raise ValueError("plot_ap_vs_iou: no results to plot")
    summary = items if _is_summary(items) else summarize(items, baseline_row=baseline_row)
    detectors = list(dict.fromkeys(e["detector"] for e in summary))
    colours = {row: f"C{i % 10}" for i, row in enumerate(dict.fromkeys(e["row"] for e in summary))}
    has_delta = any(not e["is_baseline"] and e.get("delta_n", 0) > 0 for e in summary)

    fig = Figure(figsize=(10.0 if has_delta else 5.5, 4.0 * len(detectors)), layout="constrained")
    grid = fig.subplots(len(detectors), 2 if has_delta else 1, squeeze=False, sharex=True)
    x = np.array(IOU_THRESHOLDS)
    for axes, detector in zip(grid, detectors):
        for e in (e for e in summary if e["detector"] == detector):
            colour, row = colours[e["row"]], e["row"]
            y = np.array([e["ap_per_iou"][iou] for iou in IOU_THRESHOLDS])
            ci = np.array([e["ap_per_iou_ci"][iou] for iou in IOU_THRESHOLDS])
            style = "--" if e["is_baseline"] else "-"
            axes[0].plot(x, y, marker="o", markersize=3, label=row, color=colour, linestyle=style)
            if np.isfinite(ci).any():
                axes[0].fill_between(x, y - ci, y + ci, color=colour, alpha=0.15, linewidth=0)
            if has_delta and not e["is_baseline"] and e.get("delta_n", 0) > 0:
                d = np.array([e["ap_per_iou_delta"][iou] for iou in IOU_THRESHOLDS])
                axes[1].plot(x, d, marker="o", markersize=3, color=colour, label=row)
        suffix = f": {detector}" if len(detectors) > 1 else ""
        xlabel = "IoU threshold" if detector == detectors[-1] else ""  # the panels share their x axis
        axes[0].set(xlabel=xlabel, ylabel="AP (%)", title=f"AP vs IoU threshold{suffix}", xticks=x[::2])
        axes[0].grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        if has_delta:
            axes[1].axhline(0.0, color="black", linewidth=0.8)
            axes[1].set(
                xlabel=xlabel,
                ylabel=f"ΔAP vs {baseline_row} (points)",
                title=f"Gain over baseline{suffix}",
                xticks=x[::2],
            )
            axes[1].grid(alpha=0.3)
            if axes[1].get_legend_handles_labels()[0]:
                axes[1].legend(fontsize=8)
    return _save(fig, path)


ERROR_LABELS = {
    "cls": "Classification",
    "loc": "Localisation",
    "both": "Cls + loc",
    "dupe": "Duplicate",
    "bkg": "Background",
    "miss": "Missed GT",
}


def plot_error_breakdown(
    summary_or_results: Sequence[dict], path: str | Path, *, baseline_row: str = "baseline"
) -> Path:
    """TIDE error breakdown: one group of bars per error type, one bar per (detector, row), height = mean dAP50 lost
    over seeds with its 95% CI as an error bar (rows without ``errors`` are left out).

    ``summary_or_results`` is :func:`summarize`'s output or the raw per-seed results carrying ``result["errors"]``.
    """
    items = list(summary_or_results)
    summary = items if _is_summary(items) else summarize(items, baseline_row=baseline_row) if items else []
    entries = [e for e in summary if e.get("errors_n")]
    if not entries:
        raise ValueError("plot_error_breakdown: no result carries an error breakdown ('errors')")
    multi_detector = len({e["detector"] for e in entries}) > 1

    fig = Figure(figsize=(max(6.0, 1.1 * len(ERROR_TYPES) + 0.25 * len(entries) * len(ERROR_TYPES)), 3.8))
    ax = fig.subplots()
    x = np.arange(len(ERROR_TYPES))
    width = 0.8 / len(entries)
    for i, e in enumerate(entries):
        label = f"{e['detector']} / {e['row']}" if multi_detector else e["row"]
        y = np.array([e["errors"][k] for k in ERROR_TYPES])
        ci = np.array([e["errors_ci"][k] for k in ERROR_TYPES])
        yerr = np.where(np.isfinite(ci), ci, 0.0) if np.isfinite(ci).any() else None
        offset = (i - (len(entries) - 1) / 2) * width
        ax.bar(x + offset, y, width, yerr=yerr, capsize=2, label=f"{label} (n={e['errors_n']})")
    ax.set_xticks(x, [ERROR_LABELS[k] for k in ERROR_TYPES])
    ax.set(ylabel="ΔAP50 lost (points)", title="Error breakdown (TIDE, IoU$_f$ 0.5, IoU$_b$ 0.1)")
    ax.set_ylim(bottom=0.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def smooth(values: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing; 0 = none). NaNs are carried over."""
    out = np.empty_like(values, dtype=np.float64)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            acc = alpha * acc + (1 - alpha) * v
            weight = alpha * weight + (1 - alpha)
        out[i] = acc / weight if weight > 0 else float("nan")
    return out


def _read_log(path: Path) -> dict[str, np.ndarray]:
    """Training CSV log -> {column: float array}, sorted by step; empty / non-numeric cells become nan."""
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{path}: no 'step' column (or no rows)")

    def number(cell: str | None) -> float:
        try:
            return float(cell) if cell not in (None, "") else float("nan")
        except ValueError:
            return float("nan")

    columns = {name: np.array([number(r.get(name)) for r in rows]) for name in rows[0] if name is not None}
    order = np.argsort(columns["step"], kind="stable")
    return {name: col[order] for name, col in columns.items()}


def plot_loss_curves(csv_paths: Mapping[str, str | Path], path: str | Path, *, smoothing: float = 0.4) -> Path:
    """One subplot per loss term found in the training CSV logs, one line per row (study row -> its log).

    Every numeric column except ``step``/``epoch``/``lr`` is a term (``loss``, ``loss_classifier``, ``kd_cls``,
    ``w_kd_cls``, ...). Raw values are drawn faint, an EMA (``smoothing``) on top; the x axis is the step.
    """
    if not csv_paths:
        raise ValueError("plot_loss_curves: no training logs given")
    logs = {row: _read_log(Path(p)) for row, p in csv_paths.items()}
    terms: list[str] = []
    for log in logs.values():
        terms += [c for c in log if c not in _SKIP_COLUMNS and c not in terms and np.isfinite(log[c]).any()]
    if not terms:
        raise ValueError(f"plot_loss_curves: no loss columns in {', '.join(str(p) for p in csv_paths.values())}")

    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {row: f"C{i % 10}" for i, row in enumerate(logs)}
    for ax, term in zip(axes, terms):
        for row, log in logs.items():
            if term not in log or not np.isfinite(log[term]).any():
                continue
            keep = np.isfinite(log[term])
            step, y = log["step"][keep], log[term][keep]
            ax.plot(step, y, color=colors[row], alpha=0.25, linewidth=0.8)
            ax.plot(
                step,
                smooth(y, smoothing),
                color=colors[row],
                linewidth=1.5,
                label=row,
                marker="o" if len(y) == 1 else None,
            )  # a one-point log would be invisible as a line
        ax.set(xlabel="step", ylabel=term, title=term)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(terms) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def plot_val_curves(runs: Mapping[str, Sequence[str | Path]], path: str | Path, *, metric: str = "mAP") -> Path:
    """Val ``metric`` against the epoch during training, one line per row: the mean over its runs (seeds) at the
    epochs they all evaluated, their range as a band; one panel per detector when labels are ``detector / row``.

    ``runs``: label -> the ``val.csv`` files of its runs (columns step, epoch, mAP, AP50, AP75), which show where a
    schedule's val curve flattens (the plateau a converged comparison needs).
    """
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for label, paths in runs.items():
        logs = [_read_log(Path(p)) for p in paths]
        common = sorted(set.intersection(*(set(log["epoch"].tolist()) for log in logs))) if logs else []
        if not common:
            continue
        values = np.array([[log[metric][log["epoch"] == e][-1] for e in common] for log in logs])  # [seeds, epochs]
        curves[label] = (np.array(common), values)
    if not curves:
        raise ValueError("plot_val_curves: no run evaluated on val during training")
    panels = list(dict.fromkeys(label.split(" / ")[0] if " / " in label else "" for label in curves))
    fig = Figure(figsize=(5.5 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = {row: f"C{i % 10}" for i, row in enumerate(dict.fromkeys(lb.split(" / ")[-1] for lb in curves))}
    for ax, panel in zip(axes, panels):
        for label, (epochs, values) in curves.items():
            if (label.split(" / ")[0] if " / " in label else "") != panel:
                continue
            row = label.split(" / ")[-1]
            seeds = f" ({len(values)} seeds)" if len(values) > 1 else ""
            ax.plot(epochs, values.mean(0), marker="o", color=colours[row], label=f"{row}{seeds}")
            if len(values) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=colours[row], alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"val {metric}")
        ax.set_title(panel or f"val {metric} during training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _class_color(label: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["tab10" if label < 10 else "tab20"](label % 20)


def plot_prediction_grid(
    images: Sequence,
    predictions: Mapping[str, Sequence[dict]],
    targets: Sequence[dict],
    class_names: Sequence[str],
    path: str | Path,
    score_thresh: float = 0.3,
) -> Path:
    """Grid of detections: one grid row per study row (e.g. baseline vs distilled), one column per image.

    Args:
        images: N tensors [3, H, W] RGB in 0..1.
        predictions: study row -> N torchvision outputs (``boxes`` [K, 4] xyxy pixels, ``scores`` [K], ``labels`` [K]
            0-based); boxes scoring below ``score_thresh`` are not drawn.
        targets: N targets (``boxes`` [M, 4] xyxy, ``labels`` [M]) drawn as dashed green boxes.
        class_names: C names indexed by label.
    """
    n = len(images)
    if n == 0 or not predictions:
        raise ValueError("plot_prediction_grid: need at least one image and one row of predictions")
    if len(targets) != n:
        raise ValueError(f"plot_prediction_grid: {n} images but {len(targets)} targets")
    for row, preds in predictions.items():
        if len(preds) != n:
            raise ValueError(f"plot_prediction_grid: row {row!r} has {len(preds)} predictions for {n} images")

    def name(label: int) -> str:
        if not 0 <= label < len(class_names):
            raise ValueError(f"plot_prediction_grid: label {label} outside [0, {len(class_names)})")
        return class_names[label]

    rows = list(predictions)
    fig = Figure(figsize=(3.0 * n, 3.0 * len(rows)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for j, image in enumerate(images):
        pixels = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()  # [H, W, 3]
        gt_boxes = targets[j]["boxes"].detach().cpu().reshape(-1, 4).tolist()
        for i, row in enumerate(rows):
            ax = axes[i, j]
            ax.imshow(pixels)
            for x1, y1, x2, y2 in gt_boxes:
                ax.add_patch(
                    Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linestyle="--", linewidth=1.2)
                )
            out = predictions[row][j]
            boxes = out["boxes"].detach().cpu().reshape(-1, 4).tolist()
            for (x1, y1, x2, y2), score, label in zip(boxes, out["scores"].tolist(), out["labels"].tolist()):
                if score < score_thresh:
                    continue
                color = _class_color(int(label))
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5))
                # label above the box, or just inside it when the box touches the image top
                ax.text(
                    x1,
                    y1,
                    f"{name(int(label))} {score:.2f}",
                    color="white",
                    fontsize=6,
                    clip_on=True,
                    va="bottom" if y1 > 0.1 * pixels.shape[0] else "top",
                    bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "linewidth": 0},
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row, fontsize=10)
            if i == 0:
                image_id = targets[j].get("image_id")
                ax.set_title(f"image {int(image_id)}" if image_id is not None else f"image {j}", fontsize=9)
    fig.suptitle(f"Predictions (score ≥ {score_thresh:g}); dashed green = ground truth", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
