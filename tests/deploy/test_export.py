"""Export: the ONNX / TorchScript files reproduce the PyTorch detector, and a run folder exports with its sidecar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cls2det.config import ConfigError, StudentConfig, TrainConfig, save_config
from cls2det.deploy.export import (
    ONNX_INPUT,
    ONNX_OUTPUTS,
    SIDECAR,
    ExportError,
    export_detector,
    export_student,
    write_sidecar,
)
from cls2det.engine.checkpoint import CheckpointError, save_checkpoint
from cls2det.students import create_student

DETECTOR = "fasterrcnn_mobilenet_v3"
SIZE = 128
CLASS_NAMES = ["cat", "dog", "bird"]
CATEGORY_IDS = [3, 7, 11]


def tiny_adapter(seed: int = 0):
    torch.manual_seed(seed)
    return create_student(DETECTOR, len(CLASS_NAMES), StudentConfig(detector=DETECTOR, image_size=SIZE)).eval()


def images() -> list[torch.Tensor]:
    """Two images of different sizes (dynamic H/W), RGB in 0..1."""
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 96, 128, generator=g), torch.rand(3, 120, 80, generator=g)]


def calibrate_batchnorm(det) -> None:
    """Set every BatchNorm's running stats to one batch's statistics.

    With weights=None the backbone's BatchNorms hold mean 0 / var 1, and the untrained MobileNetV3's activations
    shrink to ~1e-8 by its last stage: every RoI then gets the same features, scores tie and labels are all equal,
    so there would be nothing to compare. One train-mode pass with momentum 1 makes the eval-mode network normalise.
    """
    norms = [m for m in det.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    det.backbone.train()
    with torch.no_grad():
        det.backbone(det.transform(images())[0].tensors)
    det.eval()


@pytest.fixture(scope="module")
def detector():
    """An untrained Faster R-CNN that outputs 20 detections of several classes with distinct scores."""
    det = tiny_adapter().detector
    calibrate_batchnorm(det)
    det.roi_heads.score_thresh = 0.0  # keep the top 20 (class, box) pairs whatever their score
    det.roi_heads.detections_per_img = 20
    with torch.no_grad():
        det.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))  # a background bias
    return det


def reference(det, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = det([image])[0]
    assert len(out["scores"]) >= 5 and len(out["labels"].unique()) >= 2  # something worth comparing
    return out


def assert_same_detections(boxes, labels, scores, ref: dict[str, torch.Tensor]) -> float:
    """Same detections as ``ref`` (boxes within 1e-3 px / relative, identical labels, scores within 1e-5).

    Both lists are sorted by score, but two proposals can pool the same features and tie exactly (an untrained
    net), so rows are paired one-to-one by label, score and box rather than by position. Returns the max box error.
    """
    boxes, labels, scores = (torch.as_tensor(np.asarray(a)) for a in (boxes, labels, scores))
    assert boxes.shape == ref["boxes"].shape and labels.dtype == torch.int64
    torch.testing.assert_close(scores, ref["scores"], rtol=1e-4, atol=1e-5)  # sorted, so ties do not matter here
    free = list(range(len(labels)))
    worst = 0.0
    for box, label, score in zip(ref["boxes"], ref["labels"], ref["scores"]):
        match = [
            j
            for j in free
            if labels[j] == label
            and abs(scores[j] - score) <= 1e-5
            and torch.allclose(boxes[j], box, rtol=1e-3, atol=1e-3)
        ]
        assert match, f"no exported detection matches label {int(label)} score {float(score):.6f} box {box.tolist()}"
        free.remove(match[0])
        worst = max(worst, float((boxes[match[0]] - box).abs().max()))
    return worst


@pytest.fixture(scope="module")
def onnx_file(detector, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "det.onnx"
    return export_detector(detector, path, "onnx", image_size=SIZE)


@pytest.mark.slow
def test_onnx_matches_pytorch_on_two_sizes(detector, onnx_file):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == ONNX_INPUT and inp.shape == [3, "height", "width"]
    assert [o.name for o in session.get_outputs()] == list(ONNX_OUTPUTS)
    for image in images():
        ref = reference(detector, image)
        boxes, labels, scores = session.run(None, {ONNX_INPUT: image.numpy()})
        worst = assert_same_detections(boxes, labels, scores, ref)
        print(f"ONNX vs PyTorch, {tuple(image.shape)}: max box difference {worst:.2e} px")
        # boxes are in the input image's pixels (the transform's resize is undone inside the graph)
        assert boxes[:, 2].max() <= image.shape[2] + 1e-3 and boxes[:, 3].max() <= image.shape[1] + 1e-3


@pytest.mark.slow
def test_onnx_traced_on_an_empty_image_still_detects(detector, tmp_path):
    """The example image has no detection above the threshold: the graph must not bake in 'no boxes'."""
    ort = pytest.importorskip("onnxruntime")
    g = torch.Generator().manual_seed(3)
    candidates = [torch.zeros(3, 96, 96)] + [torch.rand(3, 96, 96, generator=g) * s for s in (0.2, 0.5, 1.0)]
    with torch.no_grad():
        scores = [detector([c])[0]["scores"] for c in candidates]
    top = torch.tensor([float(s.max()) if len(s) else 0.0 for s in scores])
    low, high = int(top.argmin()), int(top.argmax())  # best score of each image (0 when it has no detection)
    assert top[high] - top[low] > 1e-3
    det = tiny_adapter().detector  # same weights as `detector`, a threshold of its own
    det.load_state_dict(detector.state_dict())
    det.roi_heads.detections_per_img = 20
    det.roi_heads.score_thresh = float(top[low] + top[high]) / 2
    with torch.no_grad():
        assert len(det([candidates[low]])[0]["boxes"]) == 0
        ref = det([candidates[high]])[0]
    assert len(ref["boxes"]) > 0
    path = export_detector(det, tmp_path / "det.onnx", "onnx", image_size=96, example=candidates[low])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert_same_detections(*session.run(None, {ONNX_INPUT: candidates[high].numpy()}), ref)
    boxes, _, _ = session.run(None, {ONNX_INPUT: candidates[low].numpy()})
    assert boxes.shape == (0, 4)


@pytest.mark.slow
def test_torchscript_matches_pytorch(detector, tmp_path):
    path = export_detector(detector, tmp_path / "det.pt", "torchscript", image_size=SIZE)
    assert not (tmp_path / "det.pt.tmp").exists()
    scripted = torch.jit.load(str(path))
    for image in images():
        ref = reference(detector, image)
        with torch.no_grad():
            losses, detections = scripted([image])
        assert losses == {}
        out = detections[0]
        assert_same_detections(out["boxes"], out["labels"], out["scores"], ref)


def make_run(tmp_path, *, checkpoint: bool = True):
    """A fake training run folder: config.yaml, classes.json and last/model.safetensors of a seeded student."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(TrainConfig(student=StudentConfig(detector=DETECTOR, image_size=SIZE)), run / "config.yaml")
    (run / "classes.json").write_text(json.dumps({"class_names": CLASS_NAMES, "category_ids": CATEGORY_IDS}))
    adapter = tiny_adapter(seed=5)
    if checkpoint:
        save_checkpoint(run / "last", adapter.state_dict(), {"epoch": 1})
    return run, adapter


@pytest.mark.slow
def test_export_student_writes_model_and_sidecar(tmp_path):
    run, adapter = make_run(tmp_path)
    path = export_student(run, fmt="torchscript")
    assert path == run / "export" / "student.torchscript.pt"
    # the exported weights are the checkpoint's (the student was built from scratch with another seed first)
    scripted = torch.jit.load(str(path))
    expected = adapter.detector.state_dict()
    exported = scripted.state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)

    card = json.loads((run / "export" / SIDECAR).read_text())
    assert card["class_names"] == CLASS_NAMES and card["category_ids"] == CATEGORY_IDS
    assert card["label_offset"] == 1 and card["detector"] == DETECTOR
    entry = card["exports"]["torchscript"]
    assert entry["file"] == "student.torchscript.pt" and entry["checkpoint"] == "last"
    assert entry["input"]["image_size"] == SIZE and entry["input"]["resize"]["max_size"] == SIZE
    assert entry["input"]["image_mean"] == pytest.approx([0.485, 0.456, 0.406])

    onnx_path = export_student(run, fmt="onnx", out=run / "export" / "student.onnx")
    assert onnx_path.is_file()
    card = json.loads((run / "export" / SIDECAR).read_text())
    assert set(card["exports"]) == {"onnx", "torchscript"}  # one sidecar describes both files
    assert card["exports"]["onnx"]["input_names"] == [ONNX_INPUT]
    assert card["exports"]["onnx"]["output_names"] == list(ONNX_OUTPUTS)


def test_sidecar_of_another_student_is_replaced(tmp_path):
    sidecar = tmp_path / SIDECAR
    (tmp_path / "a.pt").write_bytes(b"x")
    header = {"class_names": ["a"], "label_offset": 1}
    write_sidecar(sidecar, header, "torchscript", {"file": "a.pt"})
    kept = write_sidecar(sidecar, header, "onnx", {"file": "a.onnx"})
    assert set(kept["exports"]) == {"torchscript", "onnx"}
    replaced = write_sidecar(sidecar, {"class_names": ["b"], "label_offset": 1}, "onnx", {"file": "b.onnx"})
    assert replaced == {"class_names": ["b"], "label_offset": 1, "exports": {"onnx": {"file": "b.onnx"}}}
    assert json.loads(sidecar.read_text()) == replaced


def test_missing_run_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a training run: config.yaml not found"):
        export_student(tmp_path / "nope")


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    run, _ = make_run(tmp_path, checkpoint=False)
    with pytest.raises(CheckpointError, match=r"^checkpoint weights not found: .*run[/\\]best$"):
        export_student(run, checkpoint="best")
    assert not (run / "export").exists()


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; valid: onnx, torchscript"):
        export_student(tmp_path, fmt="tflite")


def test_export_failure_is_one_line_and_leaves_no_file(tmp_path):
    class NotScriptable(torch.nn.Module):
        def forward(self, x, *args):  # varargs are not supported by torch.jit.script
            return x

    with pytest.raises(ExportError, match=r"^TorchScript export of NotScriptable failed: [^\n]+$"):
        export_detector(NotScriptable(), tmp_path / "m.pt", "torchscript", image_size=8)
    assert list(tmp_path.iterdir()) == []
