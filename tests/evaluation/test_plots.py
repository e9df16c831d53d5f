"""Plots: each writes a readable PNG of the expected size; bad input raises a one-line error."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from cls2det.evaluation import IOU_THRESHOLDS, METRIC_KEYS, summarize
from cls2det.evaluation.plots import (
    plot_ap_vs_iou,
    plot_loss_curves,
    plot_prediction_grid,
    plot_val_curves,
    smooth,
)


def png_size(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


def results():
    out = []
    for row, gain in (("baseline", 0.0), ("kd_cls", 1.0), ("kd_all", 2.0)):
        for seed in range(2):
            m = 20.0 + gain + seed
            metrics = {key: m for key in METRIC_KEYS}
            metrics["AP_per_iou"] = {t: m + 20 - 40 * (t - 0.5) + gain * t for t in IOU_THRESHOLDS}
            out.append(
                {"row": row, "seed": seed, "detector": "ssd", "metrics": metrics, "wall_s": 1.0, "peak_mem_mb": 1.0}
            )
    return out


def test_plot_ap_vs_iou_from_results_and_summary(tmp_path):
    w, h = png_size(plot_ap_vs_iou(results(), tmp_path / "a.png"))
    # two panels (AP, ΔAP) of a 10 x 4 inch figure at dpi 150, cropped tight: about 1500 x 600 px
    assert 1100 < w < 1700 and 450 < h < 700
    baseline_only = [r for r in results() if r["row"] == "baseline"]
    w1, _ = png_size(plot_ap_vs_iou(summarize(baseline_only), tmp_path / "b.png"))  # one panel, 5.5 in wide
    assert 600 < w1 < 950
    with pytest.raises(ValueError, match="no results"):
        plot_ap_vs_iou([], tmp_path / "c.png")
    # two detectors: a row of panels each, so twice as tall
    two = results() + [{**r, "detector": "retinanet"} for r in results() if r["row"] != "kd_all"]
    w2, h2 = png_size(plot_ap_vs_iou(two, tmp_path / "d.png"))
    assert abs(w2 - w) < 0.1 * w and 1.6 * h < h2 < 2.2 * h


def write_log(path, columns, steps=30, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "epoch", "lr", *columns])
        for step in range(steps):
            values = [f"{2.0 * np.exp(-step / 10) + 0.1 * rng.random():.4f}" for _ in columns]
            writer.writerow([step, step // 10, 1e-3, *values])
    return path


def test_plot_loss_curves_one_panel_per_term(tmp_path):
    logs = {
        "baseline": write_log(tmp_path / "base.csv", ["loss", "loss_classifier", "loss_box_reg"]),
        "kd_all": write_log(
            tmp_path / "kd.csv", ["loss", "loss_classifier", "loss_box_reg", "kd_cls", "w_kd_cls"], seed=1
        ),
    }
    w, h = png_size(plot_loss_curves(logs, tmp_path / "loss.png"))
    # 5 terms (step/epoch/lr skipped) -> 2 x 3 grid of 4 x 3 inch panels at dpi 150: about 1800 x 900 px
    assert 1500 < w < 1950 and 750 < h < 1000
    w1, h1 = png_size(plot_loss_curves({"baseline": logs["baseline"]}, tmp_path / "one.png"))
    assert 1500 < w1 < 1950 and h1 < 500  # 3 terms -> one row of panels
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        plot_loss_curves({"x": tmp_path / "missing.csv"}, tmp_path / "x.png")
    (tmp_path / "bad.csv").write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(ValueError, match="bad.csv: no 'step' column"):
        plot_loss_curves({"x": tmp_path / "bad.csv"}, tmp_path / "x.png")


def test_smooth_is_a_bias_corrected_ema():
    y = np.array([1.0, 3.0, float("nan"), 5.0])
    s = smooth(y, alpha=0.5)
    # weights: 1 -> 1; (0.5*1*0.5 + 0.5*3) / 0.75 = 2.333; nan keeps 2.333; (0.5*1.75 + 2.5) / 0.875 = 3.857
    assert s == pytest.approx([1.0, 7 / 3, 7 / 3, 27 / 7])
    assert smooth(y, alpha=0.0)[[0, 1, 3]] == pytest.approx([1.0, 3.0, 5.0])


def test_plot_prediction_grid(tmp_path):
    torch.manual_seed(0)
    images = [torch.rand(3, 48, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([0]), "image_id": torch.tensor(7)},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1]), "image_id": torch.tensor(9)},
    ]
    preds = {
        "baseline": [
            {
                "boxes": torch.tensor([[6.0, 4.0, 28.0, 41.0], [0.0, 0.0, 10.0, 10.0]]),
                "scores": torch.tensor([0.9, 0.1]),
                "labels": torch.tensor([0, 1]),
            },
            {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        ],
        "distilled": [
            {
                "boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]),
                "scores": torch.tensor([0.95]),
                "labels": torch.tensor([0]),
            },
            {
                "boxes": torch.tensor([[11.0, 9.0, 50.0, 52.0]]),
                "scores": torch.tensor([0.7]),
                "labels": torch.tensor([1]),
            },
        ],
    }
    w, h = png_size(plot_prediction_grid(images, preds, targets, ["cat", "dog"], tmp_path / "grid.png"))
    # 2 rows x 2 columns of 3 inch cells at dpi 150: about 900 x 900 px
    assert 700 < w < 1000 and 700 < h < 1000
    with pytest.raises(ValueError, match="row 'distilled' has 1 predictions for 2 images"):
        plot_prediction_grid(
            images, {**preds, "distilled": preds["distilled"][:1]}, targets, ["cat", "dog"], tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="label 1 outside"):
        plot_prediction_grid(images, preds, targets, ["cat"], tmp_path / "x.png")


def test_plot_error_breakdown(tmp_path):
    from matplotlib.image import imread

    from cls2det.evaluation.plots import plot_error_breakdown

    with_errors = []
    for i, r in enumerate(results()):
        errors = {"AP50": 40.0, "cls": 5.0 + i, "loc": 3.0, "both": 1.0, "dupe": 0.5, "bkg": 2.0, "miss": 10.0 - i}
        with_errors.append({**r, "errors": errors})
    path = plot_error_breakdown(with_errors, tmp_path / "errors.png")
    image = imread(path)  # [H, W, 4] RGBA floats
    # 3 rows x 6 types: a 11.1 x 3.8 inch figure at dpi 150, cropped tight: about 1660 x 570 px
    assert image.ndim == 3 and image.shape[2] == 4
    assert 1300 < image.shape[1] < 1800 and 450 < image.shape[0] < 700
    assert image[..., :3].std() > 0.05  # not blank
    png_size(plot_error_breakdown(summarize(with_errors), tmp_path / "from_summary.png"))
    with pytest.raises(ValueError, match="no result carries an error breakdown"):
        plot_error_breakdown(results(), tmp_path / "none.png")


def test_plot_val_curves_one_panel_per_detector_and_refuses_empty_logs(tmp_path):
    def log(name, values, epochs=(4, 8, 12)):
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "epoch", "mAP", "AP50", "AP75"])
            for k, (epoch, v) in enumerate(zip(epochs, values)):
                writer.writerow([10 * (k + 1), epoch, v, v + 20, v - 5])
        return path

    runs = {
        "ssd / baseline": [log("b0", [10, 20, 25]), log("b1", [12, 21, 24])],
        "ssd / full": [log("f0", [14, 24, 28])],
        "frcnn / baseline": [log("r0", [5, 15, 30])],
    }
    width, height = png_size(plot_val_curves(runs, tmp_path / "val.png"))
    one = png_size(plot_val_curves({"ssd / baseline": runs["ssd / baseline"]}, tmp_path / "one.png"))
    assert width > 1.6 * one[0] and height == pytest.approx(one[1], rel=0.1)  # two panels side by side
    empty = tmp_path / "empty.csv"
    empty.write_text("step,epoch,mAP,AP50,AP75\n")
    with pytest.raises(ValueError, match="no 'step' column|no run evaluated"):
        plot_val_curves({"x": [empty]}, tmp_path / "none.png")
