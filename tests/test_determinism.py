"""``deterministic=true``: the same seed gives bit-identical weights in separate processes (2 threads each)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load, load_file, save

from cls2det.config import TeacherConfig, TrainConfig, load_config
from cls2det.determinism import deterministic_algorithms
from cls2det.teacher.io import sorted_metadata


def test_flag_is_on_inside_and_restored_after():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    with deterministic_algorithms(False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]


def test_config_key_for_teacher_and_student():
    assert not TeacherConfig().deterministic and not TrainConfig().deterministic
    assert load_config(TeacherConfig, None, ["deterministic=true"]).deterministic
    assert load_config(TrainConfig, None, ["deterministic=true"]).deterministic


def _teacher(demo_data, out, *overrides) -> dict[str, torch.Tensor]:
    """``cls2det teacher`` in a fresh process with 2 intra-op threads; its weights."""
    subprocess.run(
        [sys.executable, "-m", "cls2det", "teacher", str(demo_data), "--out", str(out), "--epochs", "1",
         "input_size=32", "batch_size=16", *overrides],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=300,
    )  # fmt: skip
    return load_file(str(out / "teacher.safetensors"))


@pytest.mark.slow
def test_two_teacher_processes_give_identical_weights(demo_data, tmp_path):
    # was: the head's initial weights came from the unseeded global RNG, so every process trained a different teacher
    first = _teacher(demo_data, tmp_path / "a", "deterministic=true")
    second = _teacher(demo_data, tmp_path / "b", "deterministic=true")
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different
    # the files too (was: the metadata's key order followed a per-process hash seed, so the SHA-256 differed)
    files = [(tmp_path / run / "teacher.safetensors").read_bytes() for run in "ab"]
    assert files[0] == files[1]
    assert [json.loads((tmp_path / run / "teacher.json").read_text())["sha256"] for run in "ab"] == [
        hashlib.sha256(files[0]).hexdigest()
    ] * 2


def test_sorted_metadata_is_a_valid_file_with_sorted_keys():
    state = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.int64)}
    blob = sorted_metadata(save(state, metadata={"z": "1", "arch": "x", "format": "1"}))
    size = int.from_bytes(blob[:8], "little")
    assert size % 8 == 0  # the tensors' data stays 8-byte aligned
    header = json.loads(blob[8 : 8 + size])
    assert list(header["__metadata__"]) == ["arch", "format", "z"]
    loaded = load(blob)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert sorted_metadata(blob) == blob
