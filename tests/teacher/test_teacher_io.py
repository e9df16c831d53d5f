"""cls2det.teacher.io: save/load round trip, atomic files, and clear errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from cls2det.config import TeacherConfig
from cls2det.teacher import TeacherError, build_teacher, load_teacher, read_teacher_meta, save_teacher


@pytest.fixture()
def saved(tmp_path):
    """A trained-looking teacher (non-default BN statistics) saved in tmp_path/run; returns (teacher, run_dir)."""
    torch.manual_seed(0)
    teacher = build_teacher(
        "test_resnet", 3, class_names=["zero", "one", "two"], input_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
    )
    teacher.train()
    with torch.no_grad():  # move the BatchNorm running statistics away from their init, so loading must restore them
        teacher(torch.rand(8, 3, 32, 32))
    teacher.loss = "ce+bce"
    run = save_teacher(teacher.eval(), tmp_path / "run", {"top1": 97.5, "epochs": 2}, config=TeacherConfig(epochs=2))
    return teacher, run


def test_round_trip_gives_identical_logits_and_taps(saved):
    teacher, run = saved
    assert sorted(p.name for p in run.iterdir()) == ["teacher.json", "teacher.safetensors"]  # no temp files left
    loaded = load_teacher(run)
    teacher.freeze()  # as loaded: a frozen teacher runs its stem fused (conv + BN folded), bit-equal only to another
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), teacher(x))
    for a, b in zip(loaded.forward_taps(x, ["obj", "l0", "l3"]), teacher.forward_taps(x, ["obj", "l0", "l3"])):
        assert torch.equal(a, b)
    assert (loaded.arch, loaded.class_names, loaded.input_size) == ("test_resnet", ["zero", "one", "two"], 32)
    assert (loaded.mean, loaded.std, loaded.loss) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "ce+bce")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_json_records_what_reproduces_the_run(saved):
    _, run = saved
    meta = json.loads((run / "teacher.json").read_text())
    assert meta["metrics"] == {"top1": 97.5, "epochs": 2}
    assert meta["config"]["epochs"] == 2 and meta["config"]["arch"] == "resnet18"  # the config as given
    assert meta["num_classes"] == 3 and meta["taps"] == ["obj", "l0", "l1", "l2", "l3", "l4"]
    assert read_teacher_meta(run / "teacher.json")["sha256"] == meta["sha256"]  # the file path works too


def test_load_accepts_either_file_path_and_a_device(saved):
    _, run = saved
    assert load_teacher(run / "teacher.safetensors", device="cpu")._mean.device.type == "cpu"


def test_weights_file_is_a_plain_state_dict_usable_as_pretrained(saved):
    teacher, run = saved
    other = build_teacher("test_resnet", 5, pretrained=run / "teacher.safetensors")  # new class count: head skipped
    assert other.pretrained_report["skipped"] == ["fc.weight", "fc.bias"]
    key = "layer1.0.conv1.weight"
    assert torch.equal(other.net.state_dict()[key], teacher.net.state_dict()[key])


def test_tampered_weights_are_refused(saved):
    _, run = saved
    path = run / "teacher.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF  # one flipped byte inside a tensor: still a valid safetensors file, wrong weights
    path.write_bytes(bytes(blob))
    with pytest.raises(TeacherError, match=r"teacher.safetensors: checksum does not match teacher.json"):
        load_teacher(run)


def test_truncated_weights_are_refused(saved):
    _, run = saved
    path = run / "teacher.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(TeacherError, match=r"teacher.safetensors: checksum .*\(file truncated or modified\)"):
        load_teacher(run)


def test_corrupt_weights_with_a_matching_checksum_are_refused(saved):
    """Someone rewrote both files: the safetensors parser (not pickle) must still fail cleanly."""
    import hashlib

    _, run = saved
    junk = b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{broken header" + b" " * 18
    (run / "teacher.safetensors").write_bytes(junk)
    meta = json.loads((run / "teacher.json").read_text())
    meta["sha256"] = hashlib.sha256(junk).hexdigest()
    (run / "teacher.json").write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match=r"teacher.safetensors: not a valid safetensors file"):
        load_teacher(run)


def test_weights_for_another_arch_are_refused(saved, tmp_path):
    _, run = saved
    meta = json.loads((run / "teacher.json").read_text())
    meta["arch"] = "test_efficientnet"
    (run / "teacher.json").write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match=r"teacher.safetensors: does not fit 'test_efficientnet' \(Error"):
        load_teacher(run)


@pytest.mark.parametrize("key", ["arch", "class_names", "mean", "sha256"])
def test_json_missing_a_key_is_refused(saved, key):
    _, run = saved
    meta = json.loads((run / "teacher.json").read_text())
    del meta[key]
    (run / "teacher.json").write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match=rf"teacher.json: missing key '{key}'"):
        load_teacher(run)


def test_bad_json_values_are_refused(saved):
    _, run = saved
    path = run / "teacher.json"
    good = json.loads(path.read_text())
    for change, message in [
        ({"class_names": ["a"]}, "class_names must be a list of num_classes \\(3\\)"),
        ({"std": [1, 2]}, "std must be a list of 3 numbers"),
        ({"format": 99}, "unsupported format 99"),
        ({"arch": "resnet19"}, "teacher.json: unknown teacher arch 'resnet19'"),
    ]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(TeacherError, match=message):
            load_teacher(run)
    path.write_text('{"arch": "resnet18",')  # truncated JSON
    with pytest.raises(TeacherError, match="teacher.json: not valid JSON"):
        load_teacher(run)


def test_missing_files_are_refused(saved, tmp_path):
    _, run = saved
    with pytest.raises(TeacherError, match="teacher checkpoint not found: .*nowhere/teacher.json"):
        load_teacher(tmp_path / "nowhere")
    (run / "teacher.safetensors").unlink()
    with pytest.raises(TeacherError, match="teacher weights not found: .*run/teacher.safetensors"):
        load_teacher(run)


def test_errors_are_value_errors_on_one_line(saved):
    _, run = saved
    (run / "teacher.json").write_text("[]")
    with pytest.raises(ValueError) as info:
        load_teacher(run)
    assert "\n" not in str(info.value) and "teacher.json: top level must be an object" in str(info.value)
