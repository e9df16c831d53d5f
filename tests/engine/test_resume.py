"""Resume reproduces the uninterrupted run exactly: a ``cls2det train`` process killed (SIGKILL) after its first
checkpoint, or stopped (SIGTERM) mid-epoch, then resumed, ends with the same weights, tensor by tensor, and the same
metrics.csv rows as a run that was never interrupted.

Faster R-CNN is the student: its RPN / RoI samplers draw from the global RNG, on top of the flips and the positives'
subsample, so every source of randomness has to be restored. 12 train images, batch 4: 3 steps per epoch, 2 epochs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cls2det.config import TrainConfig, load_config
from cls2det.engine import load_state
from cls2det.engine.fit import fit
from cls2det.engine.logger import truncate_metrics
from cls2det.engine.run_dir import CONFIG, LAST, METRICS_CSV, RESULTS

STEPS = 6
RECIPE = """\
epochs: 2
batch_size: 4
checkpoint_every: 1
eval_every: 100
accelerator: cpu
student:
  detector: fasterrcnn_mobilenet_v3
  image_size: 96
  options: {rpn_pre_nms_top_n_train: 200, rpn_post_nms_top_n_train: 100, rpn_pre_nms_top_n_test: 100,
            rpn_post_nms_top_n_test: 50, box_batch_size_per_image: 64}
distill: {kd: [cls, loc, kd_loc], sample_size: 32, max_positives: 8}
optim: {warmup_steps: 2}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def run_a(recipe, demo_data, teacher_run) -> Path:
    """The uninterrupted run, in this process with one thread (the subprocesses get OMP_NUM_THREADS=1)."""
    out = recipe.parent / "A"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = fit(
            load_config(TrainConfig, recipe, [], data=str(demo_data), teacher=str(teacher_run), out=str(out)),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert results["steps"] == STEPS and results["epochs"] == 2
    return out


def start_train(out: Path, recipe: Path, demo_data: Path, teacher_run: Path, env: dict) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "cls2det",
        "train",
        str(demo_data),
        "--out",
        str(out),
        "--config",
        str(recipe),
        "--teacher",
        str(teacher_run),
        "--no-progress",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def logged_steps(out: Path) -> int:
    """Complete data rows in ``out``/metrics.csv so far."""
    path = out / METRICS_CSV
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines(keepends=True)[1:] if line.endswith("\n"))


def wait_until(proc: subprocess.Popen, condition, what: str, timeout: float = 240) -> None:
    """Poll ``condition()`` while ``proc`` runs; fail (killing it) if it ends first or takes too long."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_same_run(run: Path, reference: Path, load_weights) -> None:
    ours, theirs = load_weights(run), load_weights(reference)
    assert set(ours) == set(theirs)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    rows, reference_rows = ((p / METRICS_CSV).read_text().splitlines() for p in (run, reference))
    assert len(reference_rows) == STEPS + 1 and rows == reference_rows
    assert load_state(run / LAST)["step"] == STEPS and (run / RESULTS).is_file()


@pytest.mark.slow
def test_sigkill_after_the_first_checkpoint_then_resume(
    run_a, recipe, demo_data, teacher_run, cli_env, tmp_path, load_weights, one_thread
):
    out = tmp_path / "B"
    proc = start_train(out, recipe, demo_data, teacher_run, cli_env)
    # the epoch-1 checkpoint is in place and step 4 is logged: the kill lands between checkpoints, so the resumed
    # run must also drop the rows logged after its checkpoint
    wait_until(
        proc,
        lambda: (out / LAST / "model.safetensors").is_file() and logged_steps(out) >= 4,
        "the epoch-1 checkpoint and step 4",
    )
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert load_state(out / LAST)["step"] == 3 and not (out / RESULTS).exists()

    results = fit(load_config(TrainConfig, out / CONFIG), resume=True, progress=False)
    assert results["steps"] == STEPS
    assert_same_run(out, run_a, load_weights)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_then_resume_from_the_cli(
    run_a, recipe, demo_data, teacher_run, cli_env, run_cli, tmp_path, load_weights
):
    out = tmp_path / "C"
    proc = start_train(out, recipe, demo_data, teacher_run, cli_env)
    wait_until(proc, lambda: logged_steps(out) >= 1, "step 1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    interrupted = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(interrupted) == 1 and "--resume" in interrupted[0] and "Traceback" not in err
    stopped_at = load_state(out / LAST)["step"]
    assert 1 <= stopped_at < STEPS and logged_steps(out) == stopped_at and not (out / RESULTS).exists()

    resumed = run_cli("train", demo_data, "--out", out, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "mAP" in resumed.stdout
    assert_same_run(out, run_a, load_weights)


def test_truncate_metrics_keeps_complete_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / METRICS_CSV
    # as csv.writer writes it (\r\n), killed while writing step 5's row
    path.write_bytes(b"step,loss,kd_cls\r\n1,0.5,0.1\r\n2,0.4,\r\n3,0.3,0.2\r\n4,0.2,0.1\r\n5,0.")
    truncate_metrics(path, 3)
    assert path.read_bytes() == b"step,loss,kd_cls\r\n1,0.5,0.1\r\n2,0.4,\r\n3,0.3,0.2\r\n"
    truncate_metrics(path, 3)  # nothing to drop: unchanged
    assert path.read_bytes() == b"step,loss,kd_cls\r\n1,0.5,0.1\r\n2,0.4,\r\n3,0.3,0.2\r\n"
    truncate_metrics(tmp_path / "absent.csv", 3)  # a run killed before its first row
    assert not (tmp_path / "absent.csv").exists()
