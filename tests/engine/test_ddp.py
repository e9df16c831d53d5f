"""Two-process DDP on CPU (gloo) through the CLI: Fabric's subprocess launcher re-runs ``python -m cls2det ...`` as
rank 1; the run finishes, rank 0 alone writes the outputs, and both ranks end with the same weights."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from cls2det.engine.run_dir import LAST, METRICS_CSV, RESULTS


@pytest.mark.slow
def test_two_cpu_processes_train_in_step(demo_data, teacher_run, tiny_overrides, cli_env, tmp_path, read_metrics):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "cls2det", "train", str(demo_data), "--out", str(out), "--teacher", str(teacher_run),
        "--devices", "2", "--accelerator", "cpu", "--strategy", "ddp", "--kd", "cls,loc,kd_loc", "--no-progress",
        *tiny_overrides("fasterrcnn_mobilenet_v3"), "batch_size=2", "max_steps=2",
    ]
    # its own session: on a hang, the whole group (rank 0 and the rank 1 it launched) is killed
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)  # ~25 s normally
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the DDP run hung: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]

    results = json.loads((out / RESULTS).read_text())
    assert results["world_size"] == 2 and results["steps"] == 2
    # ranks see different images (order[rank::2]): equal weights after 2 steps means the gradients were averaged
    assert results["ranks_agree"] is True
    assert all(math.isfinite(results["metrics"][k]) for k in ("mAP", "AP50", "AP75"))
    assert stdout.count("mAP |") == 1  # rank 1 has no metrics and prints no table

    columns, rows = read_metrics(out / METRICS_CSV)  # written by rank 0 only: one row per step
    assert [r["step"] for r in rows] == [1, 2]
    assert {"kd_cls", "loc", "kd_loc"} <= set(columns)
    assert all(math.isfinite(v) for r in rows for v in r.values())
    weights = load_file(str(out / LAST / "model.safetensors"))
    assert weights and not any(k.startswith("module.") for k in weights)  # the plain student's keys, not DDP's
