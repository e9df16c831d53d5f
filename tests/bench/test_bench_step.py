"""`cls2det bench`'s training-step benchmark on a tiny case: every variant is timed, the cached variants take the
teacher's GT branch from the caches (zero teacher passes for KD_cls, the predicted crops only for KD_loc) and give
the online losses; the memory column and channels_last rows; the CLI passes its options through."""

from __future__ import annotations

import pytest
import torch

from cls2det.bench import step as bench
from cls2det.bench.step import StepBench, Variant, format_step_table, time_train_steps, variants
from cls2det.cli import main
from cls2det.engine.objective import distillation_losses

# SSDlite at 96 px: its fixed-size resize is the identity, so the caches see the online crops' pixels
TINY = dict(batch_size=2, image_size=96, teacher_size=32, sample_size=32)
# teacher forward passes per step: KD_cls's GT crops (1), KD_loc's predicted and GT crops (2); cached: predicted only
TEACHER_CALLS = {
    "baseline": 0,
    "+kd_cls online": 1,
    "+kd_cls cached": 0,
    "+kd_loc online": 2,
    "+kd_loc cached": 1,
    "+all online": 3,
    "+all cached": 1,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_every_variant_is_timed_and_cached_ones_skip_the_teachers_gt_branch():
    steps = time_train_steps("ssdlite320_mobilenet_v3", repeats=2, memory=False, **TINY)
    assert list(steps) == list(TEACHER_CALLS) == [v.name for v in variants()]
    assert all(row["time_s"] > 0 and row["peak_mib"] is None for row in steps.values())
    assert {name: row["teacher_calls"] for name, row in steps.items()} == TEACHER_CALLS


def test_cached_variant_gives_the_online_losses():
    """The bench's caches (built from the original images) hold what the online path computes from the detector's
    batch: same KD terms within float16 tolerance, with one teacher pass (KD_loc's predicted crops) instead of 3."""
    setup = StepBench("ssdlite320_mobilenet_v3", device="cpu", **TINY)
    student, teacher, _ = setup.nets[False]
    output = student(setup.images, setup.targets)
    assert len(output.positives) > 0
    losses = {}
    for cached in (False, True):
        variant, before = Variant("+all", cached=cached), teacher.calls
        losses[cached] = distillation_losses(output, teacher, setup.config(variant), **setup.lookups(variant))
        assert teacher.calls - before == (1 if cached else 3)
    assert set(losses[True]) == {"kd_cls", "kd_loc"}  # +all: the full method, KD_cls + KD_loc(obj + l0)
    for term, online in losses[False].items():
        assert losses[True][term].item() == pytest.approx(online.item(), rel=2e-3), term


@pytest.mark.slow
def test_memory_and_channels_last_rows_and_the_table():
    steps = time_train_steps("ssdlite320_mobilenet_v3", repeats=1, channels_last=True, **TINY)
    names = [v.name for v in variants(channels_last=True)]
    assert list(steps) == names and len(names) == 14 and names[7] == "baseline channels_last"
    assert all(row["time_s"] > 0 and row["peak_mib"] > 0 for row in steps.values())
    # the online teacher's activations (crops, taps, KD_loc's backward through the stem) come on top of the baseline's
    assert steps["+all online"]["peak_mib"] > steps["baseline"]["peak_mib"]
    assert steps["+kd_cls cached channels_last"]["teacher_calls"] == 0
    table = format_step_table(steps, "tiny").splitlines()
    # the README's side-by-side table: a header, the alignment row, 7 variants, then the channels_last ratios
    assert table[0] == "tiny" and len(table) == 1 + 2 + 7 + 1
    assert table[1] == (
        "| variant | contiguous s/step | x base | channels_last s/step | x base | peak MiB | x base | "
        "teacher passes/step |"
    )
    cached_cl, base_cl = steps["+kd_cls cached channels_last"]["time_s"], steps["baseline channels_last"]["time_s"]
    assert table[5].strip("| ").split(" | ") == [
        "+kd_cls cached",
        f"{steps['+kd_cls cached']['time_s']:.3f}",
        f"{steps['+kd_cls cached']['time_s'] / steps['baseline']['time_s']:.2f}",
        f"{cached_cl:.3f}",
        f"{cached_cl / base_cl:.2f}",  # against the baseline of the same memory format
        f"{steps['+kd_cls cached']['peak_mib']:.1f}",
        f"{steps['+kd_cls cached']['peak_mib'] / steps['baseline']['peak_mib']:.2f}",
        "0",
    ]
    assert table[-1].startswith("channels_last time / contiguous time: baseline ")


def test_the_table_without_channels_last_has_one_time_column():
    steps = {
        "baseline": {"time_s": 0.5, "teacher_calls": 0, "peak_mib": None},
        "+kd_cls online": {"time_s": 1.0, "teacher_calls": 1, "peak_mib": None},
    }
    assert format_step_table(steps, "t").splitlines() == [
        "t",
        "| variant | s/step | x base | peak MiB | x base | teacher passes/step |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        "| baseline | 0.500 | 1.00 | - | - | 0 |",
        "| +kd_cls online | 1.000 | 2.00 | - | - | 1 |",
    ]


def test_cli_passes_its_options_through(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run_benchmarks", lambda **kwargs: seen.update(kwargs))
    assert (
        main(
            [
                "bench",
                "--detector",
                "ssdlite320_mobilenet_v3",
                "--batch-size",
                "16",
                "--image-size",
                "128",
                "--repeats",
                "3",
                "--channels-last",
                "--no-memory",
                "--teacher-size",
                "48",
                "--sample-size",
                "32",
                "--teacher-precision",
                "bf16-mixed",
                "--precision",
                "16-mixed",
            ]
        )
        == 0
    )
    assert seen == {
        "detector": "ssdlite320_mobilenet_v3",
        "batch_size": 16,
        "image_size": 128,
        "repeats": 3,
        "device": "cpu",
        "channels_last": True,
        "memory": False,
        "teacher_size": 48,
        "sample_size": 32,
        "teacher_precision": "bf16-mixed",
        "precision": "16-mixed",
    }
    seen.clear()
    assert main(["bench", "--detector", "ssdlite320_mobilenet_v3"]) == 0
    assert seen["teacher_precision"] is None and seen["precision"] == "32-true" and seen["sample_size"] == 112


def test_teacher_precision_rows_run_the_teacher_in_that_precision(monkeypatch):
    """--teacher-precision adds the cached KD_loc modes (the ones still running the teacher) in that precision, in
    each memory format; their teacher really runs in bfloat16 and their losses stay close to float32's."""
    rows = variants(channels_last=True, teacher_precision="bf16-mixed")
    extra = [v.name for v in rows if v.teacher_precision != "auto"]
    assert extra == [
        "+kd_loc cached teacher bf16-mixed",
        "+all cached teacher bf16-mixed",
        "+kd_loc cached teacher bf16-mixed channels_last",
        "+all cached teacher bf16-mixed channels_last",
    ]
    assert len(rows) == 2 * 7 + 4
    setup = StepBench("ssdlite320_mobilenet_v3", device="cpu", **TINY)
    student, teacher, _ = setup.nets[False]
    dtypes, forward_taps = [], teacher.teacher.forward_taps

    def spy(*args, **kwargs):  # the dtype of the deepest tap, l0 (obj is the crop itself, float32 in any precision)
        feats = forward_taps(*args, **kwargs)
        dtypes.append(feats[-1].dtype)
        return feats

    monkeypatch.setattr(teacher.teacher, "forward_taps", spy)
    output = student(setup.images, setup.targets)
    losses = {
        v.teacher_precision: distillation_losses(output, teacher, setup.config(v), **setup.lookups(v))
        for v in (Variant("+all", True), Variant("+all", True, teacher_precision="bf16-mixed"))
    }
    assert dtypes == [torch.float32, torch.bfloat16]  # one pass per cached variant: the predicted crops
    assert losses["bf16-mixed"]["kd_loc"].item() == pytest.approx(losses["auto"]["kd_loc"].item(), rel=2e-2)
    assert setup.step(Variant("+all", True, teacher_precision="bf16-mixed")) > 0


def test_teacher_throughput_rows_and_table():
    from cls2det.bench.teacher import format_throughput, teacher_throughput

    result = teacher_throughput("resnet18", input_size=16, batch_size=4, repeats=1)
    assert list(result) == ["infer", "train"]
    assert all(set(row) == {"ours", "bare"} and min(row.values()) > 0 for row in result.values())
    table = format_throughput({"infer": {"ours": 90.0, "bare": 100.0}, "train": {"ours": 50.0, "bare": 40.0}}, "t")
    assert table.splitlines()[2:] == [
        f"{'infer':<8}{'90.0':>14}{'100.0':>14}{'0.900':>13}",
        f"{'train':<8}{'50.0':>14}{'40.0':>14}{'1.250':>13}",
    ]
