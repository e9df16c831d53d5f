"""Errors a user can cause end as one ``error: ...`` line and exit 2, never a traceback: ImageNet backbone weights
offline, an accelerator the machine does not have, a missing optional extra (onnx for export)."""

from __future__ import annotations

import urllib.error

import pytest

from cls2det.cli import main


def _train(demo_data, out, tiny_overrides, *extra) -> list[str]:
    return ["train", str(demo_data), "--out", str(out), "--kd", "none", "--no-progress", *tiny_overrides(), *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_imagenet_backbone_offline(demo_data, tiny_overrides, tmp_path, capsys, monkeypatch, one_thread):
    import torchvision.models._api

    def offline(url, *args, **kwargs):  # what urllib raises without a network (and no torch hub cache)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    # was: the RuntimeError escaped main: a 29-line traceback
    code = main(_train(demo_data, tmp_path / "run", tiny_overrides, "student.backbone_weights=imagenet"))
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: student.backbone_weights='imagenet': could not load torchvision's")
    assert "Temporary failure in name resolution" in line and "pass a local state-dict file instead" in line
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_accelerator_the_machine_lacks(demo_data, tiny_overrides, tmp_path, capsys, monkeypatch):
    from lightning_fabric.accelerators.cuda import CUDAAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))  # also on a GPU machine
    # was: Fabric's RuntimeError escaped main: a 21-line traceback
    argv = [a for a in _train(demo_data, tmp_path / "run", tiny_overrides) if a != "accelerator=cpu"]
    assert main([*argv, "--accelerator", "cuda"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: cannot train with accelerator='cuda', devices=1, strategy='auto'")
    assert "`CUDAAccelerator` can not run on your system" in line
    assert not (tmp_path / "run").exists()  # nothing was touched


@pytest.mark.parametrize(
    "devices,error",
    [
        ("0", "error: devices must be >= 1, -1 (all) or 'auto', got 0"),  # the config's own check, before Fabric
        ("two", "error: cannot train with accelerator='cpu', devices='two',"),
    ],
)
def test_devices_fabric_refuses(demo_data, tiny_overrides, tmp_path, capsys, devices, error):
    assert main([*_train(demo_data, tmp_path / "run", tiny_overrides), "--devices", devices]) == 2
    assert _one_error_line(capsys).startswith(error)


# (this one already ended in one line: export.py turns the ImportError into an ExportError; tested here through the
# real import, where tests/test_cli.py replaces export_student)
def test_export_without_the_onnx_extra(demo_data, tiny_overrides, tmp_path, capsys, monkeypatch, one_thread):
    import sys

    run = tmp_path / "run"
    overrides = [*tiny_overrides("ssdlite320_mobilenet_v3"), "max_steps=1"]
    assert main(["train", str(demo_data), "--out", str(run), "--kd", "none", "--no-progress", *overrides]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError, as without cls2det[export]
    assert main(["export", str(run), "--format", "onnx"]) == 2
    line = _one_error_line(capsys)
    assert line == "error: ONNX export needs the 'onnx' package: pip install 'cls2det[export]'"
    assert not (run / "export" / "student.onnx").exists()
