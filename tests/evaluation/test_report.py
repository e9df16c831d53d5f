"""Study summaries and reports: hand-computed means, Student-t CIs, paired deltas, Markdown/CSV output."""

import csv
import json
import math

import pytest

from cls2det.evaluation import IOU_THRESHOLDS, METRIC_KEYS, summarize, write_report
from cls2det.evaluation.report import paired_deltas

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (statistical tables: 4.303)


def metrics(m):
    """A metrics dict derived from mAP = m: AP50 = m + 20, AP75 = m - 5, AP@t = m + 10 - 20 (t - 0.5) / 0.45 ...;
    APl is nan (as if the dataset had no large objects)."""
    out = {key: m + 1.0 for key in METRIC_KEYS}
    out.update(mAP=m, AP50=m + 20, AP75=m - 5, APl=float("nan"))
    out["AP_per_iou"] = {t: m + 10 - 20 * (t - 0.5) / 0.45 for t in IOU_THRESHOLDS}
    return out


def run(row, seed, m, detector="frcnn", wall_s=100.0, peak_mem_mb=512.0):
    return {
        "row": row,
        "seed": seed,
        "detector": detector,
        "metrics": metrics(m),
        "wall_s": wall_s,
        "peak_mem_mb": peak_mem_mb,
    }


RESULTS = [
    run("kd", 0, 21.0),
    run("kd", 1, 24.0),
    run("kd", 2, 24.0),  # listed before the baseline on purpose
    run("baseline", 0, 20.0, wall_s=90.0),
    run("baseline", 1, 22.0, wall_s=100.0),
    run("baseline", 2, 24.0, wall_s=110.0),
    run("loc", 0, 25.0),  # a single seed
    run("extra", 7, 30.0),  # no seed in common with the baseline
    run("baseline", 0, 10.0, detector="retina"),
]


def by_row(summary, detector="frcnn"):
    return {e["row"]: e for e in summary if e["detector"] == detector}


def test_summarize_means_cis_and_paired_deltas():
    summary = summarize(RESULTS)
    assert [(e["detector"], e["row"]) for e in summary] == [
        ("frcnn", "baseline"),
        ("frcnn", "kd"),
        ("frcnn", "loc"),
        ("frcnn", "extra"),
        ("retina", "baseline"),
    ]
    rows = by_row(summary)

    base = rows["baseline"]
    assert base["is_baseline"] and base["seeds"] == [0, 1, 2] and base["n"] == 3
    assert base["mean"]["mAP"] == pytest.approx(22.0)  # (20 + 22 + 24) / 3
    assert base["ci"]["mAP"] == pytest.approx(T_975_DF2 * 2.0 / math.sqrt(3))  # sd = 2
    assert base["mean"]["AP50"] == pytest.approx(42.0)
    assert math.isnan(base["delta"]["mAP"]) and base["delta_n"] == 0
    assert base["wall_s"] == pytest.approx(100.0) and base["peak_mem_mb"] == pytest.approx(512.0)
    assert math.isnan(base["mean"]["APl"])  # nan in every seed stays nan

    kd = rows["kd"]
    assert kd["mean"]["mAP"] == pytest.approx(23.0)
    assert kd["ci"]["mAP"] == pytest.approx(T_975_DF2 * math.sqrt(3.0) / math.sqrt(3))  # sd of 21, 24, 24 = sqrt 3
    # paired differences per seed: 21-20, 24-22, 24-24 = 1, 2, 0 -> mean 1, sd 1
    assert kd["delta_n"] == 3
    assert kd["delta"]["mAP"] == pytest.approx(1.0)
    assert kd["delta_ci"]["mAP"] == pytest.approx(T_975_DF2 * 1.0 / math.sqrt(3))
    assert kd["delta"]["AP75"] == pytest.approx(1.0)
    assert kd["ap_per_iou"][0.5] == pytest.approx(33.0) and kd["ap_per_iou"][0.95] == pytest.approx(13.0)
    assert kd["ap_per_iou_delta"][0.75] == pytest.approx(1.0)

    loc = rows["loc"]
    assert loc["n"] == 1 and math.isnan(loc["ci"]["mAP"])
    assert loc["delta"]["mAP"] == pytest.approx(5.0) and loc["delta_n"] == 1 and math.isnan(loc["delta_ci"]["mAP"])

    extra = rows["extra"]
    assert extra["delta_n"] == 0 and math.isnan(extra["delta"]["mAP"])
    retina = by_row(summary, "retina")["baseline"]  # deltas never cross detectors
    assert retina["mean"]["mAP"] == pytest.approx(10.0) and retina["is_baseline"]


def test_summarize_accepts_json_round_tripped_results():
    # json turns AP_per_iou's float keys into strings ("0.5"); the summary must not lose them
    kd = by_row(summarize(json.loads(json.dumps(RESULTS))))["kd"]
    assert kd["ap_per_iou"][0.5] == pytest.approx(33.0) and kd["ap_per_iou_delta"][0.75] == pytest.approx(1.0)


def test_summarize_rejects_bad_results():
    with pytest.raises(ValueError, match="duplicate run detector='frcnn' row='kd' seed=0"):
        summarize([run("kd", 0, 1.0), run("kd", 0, 2.0)])
    with pytest.raises(ValueError, match="result #1: missing key 'seed'"):
        summarize([run("kd", 0, 1.0), {"row": "kd", "detector": "x", "metrics": {}}])
    bad = run("kd", 0, 1.0)
    del bad["metrics"]["AP75"]
    with pytest.raises(ValueError, match="metrics lack 'AP75'"):
        summarize([bad])


def test_write_report_markdown_and_csv(tmp_path):
    plot = tmp_path / "out" / "ap_vs_iou.png"
    plot.parent.mkdir()
    plot.write_bytes(b"png")
    path = write_report(
        RESULTS, tmp_path / "out", title="Demo study", teacher_top1=80.34, notes=["3 seeds per row"], plots=[plot]
    )
    assert path == tmp_path / "out" / "report.md"
    md = path.read_text()
    assert md.startswith("# Demo study\n")
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| row"))
    assert header.split(" | ")[1:4] == ["mAP ± CI", "Δ mAP", "AP50"]
    frcnn = lines[lines.index("## frcnn") : lines.index("## retina")]
    cells = {line.split(" | ")[0][2:].strip("`"): line.split(" | ") for line in frcnn if line.startswith("| `")}
    assert list(cells) == ["baseline", "kd", "loc", "extra"]
    # baseline: 22.0 ± 5.0 (4.3027 * 2 / sqrt 3 = 4.968), no delta, AP50 42.0, APl nan -> "—", 3 seeds, 100 s, 512 MB
    assert cells["baseline"][1:4] == ["22.0 ± 5.0", "—", "42.0"]
    assert cells["baseline"][9] == "—"
    assert cells["baseline"][-3:] == ["3", "100.0 s", "512.0 MB |"]
    assert cells["kd"][1:3] == ["23.0 ± 4.3", "+1.0 ± 2.5"]
    assert cells["loc"][1:3] == ["25.0 (n=1)", "+5.0 (n=1)"]
    assert cells["extra"][2] == "—"
    assert "Teacher top-1 accuracy (held-out D_cls): 80.3%" in md
    assert "- 3 seeds per row" in md
    assert "![ap_vs_iou](ap_vs_iou.png)" in md

    with open(tmp_path / "out" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(RESULTS)
    first = rows[0]
    assert (first["detector"], first["row"], first["seed"]) == ("frcnn", "kd", "0")
    assert float(first["mAP"]) == 21.0 and float(first["AP50"]) == 41.0 and first["APl"] == "nan"
    assert float(first["AP@0.50"]) == pytest.approx(31.0) and float(first["AP@0.95"]) == pytest.approx(11.0)
    assert float(first["wall_s"]) == 100.0 and float(first["peak_mem_mb"]) == 512.0


# ------------------------------------------------------------------------------------------ TIDE error breakdown


def with_errors(result, **errors):
    """``errors``: the six dAP50 values and AP50, any left out = 0."""
    keys = ("AP50", "cls", "loc", "both", "dupe", "bkg", "miss")
    return {**result, "errors": {k: float(errors.get(k, 0.0)) for k in keys}}


ERROR_RESULTS = [
    with_errors(run("baseline", 0, 20.0), AP50=40.0, cls=6.0, loc=3.0, miss=10.0),
    with_errors(run("baseline", 1, 22.0), AP50=42.0, cls=4.0, loc=5.0, miss=12.0),
    with_errors(run("baseline", 2, 24.0), AP50=44.0, cls=5.0, loc=4.0, miss=11.0, bkg=3.0),
    with_errors(run("kd", 0, 21.0), AP50=41.0, cls=2.0, loc=3.0),
    run("kd", 1, 23.0),  # a seed without the breakdown: left out of the error means
    run("loc", 0, 25.0),  # a row without any breakdown
]


def test_summarize_error_means_over_the_seeds_that_carry_them():
    rows = by_row(summarize(ERROR_RESULTS))
    base = rows["baseline"]
    assert base["errors_n"] == 3
    assert base["errors"]["AP50"] == pytest.approx(42.0)
    assert base["errors"]["cls"] == pytest.approx(5.0) and base["errors"]["loc"] == pytest.approx(4.0)
    assert base["errors"]["miss"] == pytest.approx(11.0) and base["errors"]["bkg"] == pytest.approx(1.0)
    assert base["errors"]["dupe"] == 0.0
    assert base["errors_ci"]["cls"] == pytest.approx(T_975_DF2 * 1.0 / math.sqrt(3))  # sd of (6, 4, 5) = 1
    assert rows["kd"]["errors_n"] == 1 and rows["kd"]["errors"]["cls"] == pytest.approx(2.0)
    assert math.isnan(rows["kd"]["errors_ci"]["cls"])
    assert rows["loc"]["errors_n"] == 0 and rows["loc"]["errors"] == {}
    # the breakdown nested in the metrics (as `cls2det eval --errors --json` writes it) counts the same
    nested = [
        {**{k: v for k, v in r.items() if k != "errors"}, "metrics": {**r["metrics"], "errors": r["errors"]}}
        for r in ERROR_RESULTS[:3]
    ]
    assert all("errors" not in r for r in nested)
    assert by_row(summarize(nested))["baseline"]["errors"] == base["errors"]
    bad = with_errors(run("kd", 0, 1.0))
    del bad["errors"]["dupe"]
    with pytest.raises(ValueError, match="errors lack 'dupe'"):
        summarize([bad])


def test_write_report_error_table_and_csv(tmp_path):
    md = write_report(ERROR_RESULTS, tmp_path, title="errors").read_text()
    lines = md.splitlines()
    start = lines.index("## Error breakdown (TIDE)")
    table = [line for line in lines[start:] if line.startswith("| ")]
    assert table[0] == "| row | TIDE AP50 | cls | loc | both | dupe | bkg | miss | seeds |"
    cells = {line.split(" | ")[0][2:].strip("`"): line.split(" | ") for line in table[1:]}
    assert list(cells) == ["baseline", "kd"]  # "loc" carries no breakdown
    # baseline: AP50 42 ± 5.0 (sd 2), cls 5 ± 2.5 (sd 1), loc 4 ± 2.5, both/dupe 0 ± 0, bkg 1 ± 4.3 (sd 1.73), miss 11
    assert cells["baseline"][1:9] == [
        "42.0 ± 5.0",
        "5.0 ± 2.5",
        "4.0 ± 2.5",
        "0.0 ± 0.0",
        "0.0 ± 0.0",
        "1.0 ± 4.3",
        "11.0 ± 2.5",
        "3 |",
    ]
    assert cells["kd"][1:3] == ["41.0 (n=1)", "2.0 (n=1)"]
    with open(tmp_path / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["dAP50_cls"] == "6.0000" and rows[0]["tide_AP50"] == "40.0000"
    assert rows[4]["dAP50_cls"] == "nan"  # kd seed 1 has none


def test_write_report_without_errors_has_no_error_section(tmp_path):
    md = write_report(RESULTS, tmp_path, title="plain").read_text()
    assert "Error breakdown" not in md
    with open(tmp_path / "report.csv", newline="") as f:
        assert "dAP50_cls" not in next(csv.reader(f))


def test_paired_deltas_of_one_row_over_another():
    # loc has seed 0 only: loc - kd over seed 0 = 25 - 21; retina has neither row
    (entry,) = paired_deltas(RESULTS, "loc", "kd")
    assert (entry["detector"], entry["n"]) == ("frcnn", 1)
    assert entry["delta"]["mAP"] == pytest.approx(4.0) and math.isnan(entry["delta_ci"]["mAP"])
    # kd - baseline, paired over seeds 0, 1, 2: 1, 2, 0 (what summarize's delta is)
    (entry,) = paired_deltas(RESULTS, "kd", "baseline")
    assert entry["delta"]["AP75"] == pytest.approx(1.0)
    assert entry["delta_ci"]["mAP"] == pytest.approx(T_975_DF2 * 1.0 / math.sqrt(3))
    assert paired_deltas(RESULTS, "extra", "baseline") == []  # no common seed


def test_write_report_comparison_table(tmp_path):
    md = write_report(RESULTS, tmp_path, title="t", comparisons=[("kd", "baseline"), ("loc", "kd")]).read_text()
    lines = md.splitlines()
    table = lines[lines.index("## Paired comparisons") :]
    rows = [line.split(" | ") for line in table if line.startswith("| frcnn")]
    assert [r[1] for r in rows] == ["`kd` − `baseline`", "`loc` − `kd`"]
    assert rows[0][2:] == ["+1.0 ± 2.5", "+1.0 ± 2.5", "+1.0 ± 2.5", "3 |"]  # mAP, AP50, AP75 move together here
    assert rows[1][2] == "+4.0 (n=1)"
    assert "## Paired comparisons" not in write_report(RESULTS, tmp_path, title="t").read_text()
