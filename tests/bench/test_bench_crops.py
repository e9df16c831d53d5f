"""The crop benchmark (benchmarks/bench_crops.py, `cls2det bench`) runs end to end on a tiny case."""

import pytest

from cls2det.bench import crops as bench


@pytest.mark.slow
def test_crop_benchmark_tiny_case():
    result = bench.run_crop_benchmark(boxes=8, images=2, size=256, crop=16, repeats=1, threads=1)
    # same kernel; the sampling positions differ by float rounding only (ours builds the grid by broadcasting, the
    # reference with F.affine_grid): 1.5e-5 measured on these random 0..1 images, whose neighbours differ by up to 1
    diff = result["max_abs_diff"]
    assert diff["crops"] < 5e-5 and diff["box_grad"] < 1e-6, diff
    for name in ("ours", "naive"):
        assert result[name]["time_s"] > 0 and result[name]["peak_mib"] >= 0
    # the naive variant holds 8 copies of a 256x256x3 float image (6 MiB) that ours never makes
    assert result["naive"]["peak_mib"] > result["ours"]["peak_mib"]
    assert result["speedup"] == pytest.approx(result["naive"]["time_s"] / result["ours"]["time_s"])
    table = bench.format_table(result)
    assert "K=8 boxes from 2 images of 256x256, s=16" in table and "ours" in table and "naive" in table
