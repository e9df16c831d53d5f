"""Two-process DDP on CPU (gloo) through the CLI: Fabric's subprocess launcher re-runs ``python -m cls2det ...`` as
rank 1; the run finishes, rank 0 alone writes the outputs, and both ranks end with the same weights. A rank that
fails, hangs or loaded another teacher ends every rank with a non-zero exit and its one-line error."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from lightning_fabric.strategies import DDPStrategy
from safetensors.torch import load_file

from cls2det.engine.distributed import fabric_strategy
from cls2det.engine.run_dir import LAST, METRICS_CSV, RESULTS, SOFT_LABELS


@pytest.mark.slow
def test_two_cpu_processes_train_in_step(demo_data, teacher_run, tiny_overrides, cli_env, tmp_path, read_metrics):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "cls2det",
        "train",
        str(demo_data),
        "--out",
        str(out),
        "--teacher",
        str(teacher_run),
        "--devices",
        "2",
        "--accelerator",
        "cpu",
        "--strategy",
        "ddp",
        "--kd",
        "cls,loc,kd_loc",
        "--no-progress",
        *tiny_overrides("fasterrcnn_mobilenet_v3"),
        "batch_size=2",
        "max_steps=2",
    ]
    # its own session: on a hang, the whole group (rank 0 and the rank 1 it launched) is killed
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env, start_new_session=True
    )
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


# ----------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "name, options", [("ddp", {}), ("ddp_find_unused_parameters_true", {"find_unused_parameters": True})]
)
def test_ddp_strategies_get_the_collective_timeout(name, options):
    strategy = fabric_strategy(name, 12.5)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._timeout == timedelta(seconds=12.5) and strategy._ddp_kwargs == options  # (no public getter)
    assert fabric_strategy("auto", 12.5) == "auto" and fabric_strategy("dp", 12.5) == "dp"  # Fabric resolves them


# A rank that fails must end every rank with its error, quickly, never a hang. The failure is injected by a small
# script that patches the trainer and then runs the CLI; Fabric re-runs the same script (and so the same patch) for
# rank 1, and the patch picks its rank from the trainer's fabric.

FAULTY_CLI = """
import os, sys, time
import torch
from cls2det.cli import main
from cls2det.engine import fit
from cls2det.engine.run_dir import TrainingError
import cls2det.teacher

kind, rank, step = os.environ["FAULT"].split(":")
rank, step = int(rank), int(step)
train_step, load_teacher = fit._Trainer._train_step, cls2det.teacher.load_teacher

def faulty_train_step(self, images, targets):
    if kind in ("raise", "hang") and self.fabric.global_rank == rank and self.step == step:
        print(f"fault at {time.time()}", file=sys.stderr, flush=True)
        if kind == "hang":
            time.sleep(3600)
        raise TrainingError(f"injected failure on rank {rank} at step {step}")
    return train_step(self, images, targets)

def other_teacher(*args, **kwargs):
    teacher = load_teacher(*args, **kwargs)
    if int(os.environ["LOCAL_RANK"]) == rank:
        with torch.no_grad():
            next(teacher.parameters()).view(-1)[0] += 1e-3  # as if trained again on that node
    return teacher

fit._Trainer._train_step = faulty_train_step
cls2det.teacher.load_teacher = other_teacher
sys.exit(main())
"""


def run_faulty_ddp(tmp_path, fault: str, args: list[str], env: dict, limit: float = 120):
    """``FAULTY_CLI train ARGS`` on 2 CPU processes with ``FAULT=kind:rank:step``.

    Returns (exit code, stderr, seconds from the fault to the end of the last rank or None without a fault)."""
    script = tmp_path / "faulty_cli.py"
    script.write_text(FAULTY_CLI)
    command = [
        sys.executable,
        str(script),
        "train",
        *args,
        "--devices",
        "2",
        "--accelerator",
        "cpu",
        "--strategy",
        "ddp",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "FAULT": fault},
        start_new_session=True,
    )
    try:
        # both ranks hold the pipes: communicate() returns once every rank has exited
        _, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the DDP run with {fault} did not end within {limit} s: {stderr[-2000:]}")
    end = time.time()
    fault = [float(line.split()[-1]) for line in stderr.splitlines() if line.startswith("fault at ")]
    return proc.returncode, stderr, end - fault[0] if fault else None


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_failing_rank_ends_every_rank_with_its_error(rank, demo_data, tiny_overrides, cli_env, tmp_path):
    args = [str(demo_data), "--out", str(tmp_path / "run"), "--kd", "none", *tiny_overrides(), "batch_size=2"]
    code, stderr, seconds = run_faulty_ddp(tmp_path, f"raise:{rank}:1", args, cli_env)
    # 2: the CLI's exit code of an error; SIGKILL: Fabric's launcher ends rank 0 once a rank it launched has died
    # (rank 1 failed, or rank 0 killed it), which can come before rank 0 has finished exiting
    assert code in (2, -signal.SIGKILL), stderr[-3000:]
    lines = stderr.splitlines()
    assert f"error: injected failure on rank {rank} at step 1" in lines, stderr[-3000:]
    assert "Traceback" not in stderr  # the other rank is killed, or says in one line whose error to read
    assert seconds < 20  # gloo sees the closed connection at once; a failing rank 0 kills rank 1 itself
    if rank == 1 and code == 2:  # rank 0 lost its peer in the gradient all-reduce and was not killed first
        assert any(
            line.startswith("error: rank 1 failed (exit code 2, its error is above); rank 0 stopped") for line in lines
        ), stderr[-3000:]
    print(f"rank {rank} failed: every rank ended {seconds:.1f} s later")


@pytest.mark.slow
def test_a_hanging_rank_ends_at_the_collective_timeout(demo_data, tiny_overrides, cli_env, tmp_path):
    # the timeout also bounds the start-up rendezvous: 5 s was too short for rank 1 to import torch on a busy CI box
    args = [
        str(demo_data),
        "--out",
        str(tmp_path / "run"),
        "--kd",
        "none",
        *tiny_overrides(),
        "batch_size=2",
        "dist_timeout_s=15",
    ]
    code, stderr, seconds = run_faulty_ddp(tmp_path, "hang:1:1", args, cli_env)
    # rank 0 waits 15 s in the all-reduce, fails, gives rank 1 (asleep) 10 s to exit, then kills it
    assert code != 0
    assert "Timed out waiting 15000ms" in stderr, stderr[-3000:]
    assert 15 <= seconds < 40
    print(f"rank 1 hung: every rank ended {seconds:.1f} s later")


@pytest.mark.slow
def test_ranks_with_different_teachers_refuse_to_train(demo_data, teacher_run, tiny_overrides, cli_env, tmp_path):
    out = tmp_path / "run"
    args = [
        str(demo_data),
        "--out",
        str(out),
        "--teacher",
        str(teacher_run),
        "--kd",
        "cls,kd_loc",
        *tiny_overrides(),
        "batch_size=2",
    ]
    code, stderr, _ = run_faulty_ddp(tmp_path, "teacher:1:0", args, cli_env)
    assert code in (2, -signal.SIGKILL), stderr[-3000:]  # every rank raises; rank 0 kills rank 1 (see above)
    assert (
        f"error: the teacher differs across ranks: rank 1 loaded other weights from {teacher_run} than rank 0" in stderr
    ), stderr[-3000:]
    assert not (out / "config.yaml").exists() and not (out / SOFT_LABELS).exists()  # checked before any work
