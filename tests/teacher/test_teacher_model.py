"""cls2det.teacher.model: building, normalisation, feature taps (shapes, truncation, consistency), pretrained files."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from cls2det.errors import WeightsError
from cls2det.teacher import TAPS, Teacher, TeacherError, build_teacher
from cls2det.teacher.model import IMAGENET_MEAN, IMAGENET_STD
from cls2det.teacher.taps import tap_layout

S = 32  # crop size used throughout: small, but every stage of a stride-32 net still has >= 1x1 outputs


def _pixels(k: int = 2, size: int = S, seed: int = 0) -> torch.Tensor:
    return torch.rand(k, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _executed(module: nn.Module, names: list[str]) -> tuple[dict[str, int], list]:
    """Counters of forward calls of the named submodules, and the hook handles (caller removes them)."""
    counts = dict.fromkeys(names, 0)
    handles = [
        module.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: counts.__setitem__(n, counts[n] + 1))
        for n in names
    ]
    return counts, handles


# ----------------------------------------------------------------------------------------------- building


def test_torchvision_resnet18_taps_shapes():
    teacher = build_teacher("resnet18", 4, class_names=list("abcd"), input_size=S).eval()
    assert teacher.library == "torchvision" and teacher.num_classes == 4 and teacher.input_size == S
    assert (teacher.mean, teacher.std) == (IMAGENET_MEAN, IMAGENET_STD)
    feats = teacher.forward_taps(_pixels(3), TAPS)
    shapes = [tuple(f.shape) for f in feats]
    assert shapes == [
        (3, 3, S, S),
        (3, 64, S // 4, S // 4),
        (3, 64, S // 4, S // 4),
        (3, 128, S // 8, S // 8),
        (3, 256, S // 16, S // 16),
        (3, 512, S // 32, S // 32),
    ]


def test_timm_resnet_taps_shapes_and_mean_from_pretrained_cfg():
    teacher = build_teacher("test_resnet", 3, input_size=S).eval()  # timm's tiny ResNet, built without download
    assert teacher.library == "timm"
    assert teacher.mean == tuple(teacher.net.pretrained_cfg["mean"])
    feats = teacher.forward_taps(_pixels(), ["l4", "obj", "l0"])  # order as asked, not sorted
    assert [tuple(f.shape) for f in feats] == [(2, 96, 1, 1), (2, 3, S, S), (2, 32, S // 4, S // 4)]


def test_unknown_arch_lists_valid_names():
    with pytest.raises(TeacherError, match=r"unknown teacher arch 'resnet19'.*resnet18"):
        build_teacher("resnet19", 3)


def test_class_names_must_match_num_classes():
    with pytest.raises(TeacherError, match="class_names has 2 names but num_classes is 3"):
        build_teacher("test_resnet", 3, class_names=["a", "b"])


# ----------------------------------------------------------------------------------------------- forward / taps


def test_forward_normalises_inside():
    mean, std = (0.2, 0.5, 0.7), (0.1, 0.3, 0.9)
    teacher = build_teacher("test_resnet", 3, mean=mean, std=std).eval()
    x = _pixels()
    naive = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], 1)  # per-channel, by hand
    torch.testing.assert_close(teacher(x), teacher.net(naive))
    torch.testing.assert_close(teacher.forward_taps(x, ["obj"])[0], naive)


def test_resnet_taps_run_only_as_deep_as_the_deepest_tap():
    teacher = build_teacher("resnet18", 3).eval()
    stages = ["maxpool", "layer1", "layer2", "layer3", "layer4", "fc"]  # (conv1 + bn1 run fused in eval mode)
    counts, handles = _executed(teacher.net, stages)
    teacher.forward_taps(_pixels(), ["obj", "l0"])
    assert counts == {"maxpool": 1, "layer1": 0, "layer2": 0, "layer3": 0, "layer4": 0, "fc": 0}
    teacher.forward_taps(_pixels(), ["obj"])  # the input alone: the network does not run at all
    assert counts["maxpool"] == 1
    teacher.forward_taps(_pixels(), ["l2", "l0"])
    assert counts == {"maxpool": 2, "layer1": 1, "layer2": 1, "layer3": 0, "layer4": 0, "fc": 0}
    teacher.forward_taps(_pixels(), ["obj", "l0"], return_logits=True)  # one full pass
    assert counts == {"maxpool": 3, "layer1": 2, "layer2": 2, "layer3": 1, "layer4": 1, "fc": 1}
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("arch", ["resnet18", "test_resnet"])
def test_frozen_stem_runs_fused_with_the_modules_values_and_gradients(arch):
    """A frozen teacher runs its stem's conv + BN as one folded convolution and ReLU after the max-pool: the l0 tap
    and the gradient it sends back to the pixels equal the module-by-module stem's (BN with non-trivial statistics).
    A teacher that is only in eval mode (not frozen) runs its modules, so its weights still get gradients."""
    torch.manual_seed(0)
    teacher = build_teacher(arch, 3)
    bn = teacher.net.bn1
    bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_(), bn.bias.data.normal_()
    conv = "conv1" if arch == "resnet18" else "conv1.0"  # timm's test_resnet has a deep stem: a Sequential
    counts, handles = _executed(teacher.net, [conv])
    weights = torch.randn(6, bn.num_features, S // 4, S // 4)
    results = []
    for frozen in (False, True):
        if frozen:
            teacher.freeze()
        else:
            teacher.eval()
        x = _pixels(k=6, seed=2).requires_grad_()
        l0 = teacher.forward_taps(x, ["l0"])[0]
        (l0 * weights).sum().backward()
        results.append((l0.detach(), x.grad))
        assert counts[conv] == 1  # the frozen pass did not run the conv module
        if not frozen:
            assert teacher.net.get_submodule(conv).weight.grad.abs().sum() > 0
    (reference, reference_grad), (l0, grad) = results
    torch.testing.assert_close(l0, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-5)
    assert reference.abs().max() > 0.5 and (reference == 0).any()  # the ReLU clipped some windows
    for handle in handles:
        handle.remove()


def test_timm_forward_intermediates_taps_stop_early():
    teacher = build_teacher("test_efficientnet", 3).eval()  # generic timm path (forward_intermediates)
    assert tap_layout(teacher.net, "timm").kind == "timm"
    blocks = [f"blocks.{i}" for i in range(len(teacher.net.blocks))]
    counts, handles = _executed(teacher.net, blocks + ["conv_head"])
    feats = teacher.forward_taps(_pixels(), ["l1"])
    assert feats[0].shape[-1] == S // 4
    assert counts["blocks.0"] == 1 and counts[blocks[-1]] == 0 and counts["conv_head"] == 0
    for handle in handles:
        handle.remove()


FAMILIES = ["resnet18", "mobilenet_v3_small", "test_resnet", "test_efficientnet", "test_convnext"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_truncated_taps_equal_full_pass_and_logits_equal_forward(arch):
    """The layout table must reproduce the model's own forward: truncated taps == taps recorded in a full pass."""
    teacher = build_teacher(arch, 3).eval()
    x = _pixels(seed=1)
    taps = teacher.available_taps
    assert taps[0] == "obj" and set(taps) <= set(TAPS) and len(taps) >= 5
    with torch.no_grad():
        truncated = teacher.forward_taps(x, taps)
        full, logits = teacher.forward_taps(x, taps, return_logits=True)
        torch.testing.assert_close(logits, teacher(x))
    for tap, a, b in zip(taps, truncated, full):
        torch.testing.assert_close(a, b, msg=f"{arch} tap {tap}")
    sizes = [f.shape[-1] for f in truncated[1:]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == S // 32  # deeper taps are coarser, l4 at stride 32


def test_missing_tap_is_a_clear_error():
    teacher = build_teacher("test_convnext", 3)  # timm ConvNeXt exposes 4 stages, no stem feature
    assert teacher.available_taps == ("obj", "l1", "l2", "l3", "l4")
    with pytest.raises(TeacherError, match=r"'test_convnext' has no tap 'l0'; available: obj, l1"):
        teacher.forward_taps(_pixels(), ["obj", "l0"])
    with pytest.raises(TeacherError, match="no tap 'l5'"):
        teacher.forward_taps(_pixels(), ["l5"])


def test_freeze_keeps_eval_and_passes_gradients_to_the_input():
    teacher = build_teacher("test_resnet", 3).freeze()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    parent = nn.ModuleDict({"teacher": teacher}).train()  # a parent's train() must not wake BatchNorm up
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = _pixels().requires_grad_()
    feats = teacher.forward_taps(x, ["obj", "l0"])
    (feats[0].abs().sum() + feats[1].abs().sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    del parent


# ----------------------------------------------------------------------------------------------- pretrained weights


def test_local_safetensors_loads_and_skips_the_other_head(tmp_path, caplog):
    source = torchvision.models.resnet18(num_classes=7)  # "another model": same backbone, 7-way head
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with caplog.at_level("INFO", logger="cls2det.teacher.model"):
        teacher = build_teacher("resnet18", 3, pretrained=path)
    assert teacher.pretrained_report["skipped"] == ["fc.weight", "fc.bias"]
    assert "skipped classifier head fc.weight, fc.bias" in caplog.text
    got, want = teacher.net.state_dict(), source.state_dict()
    torch.testing.assert_close(got["layer3.1.conv2.weight"], want["layer3.1.conv2.weight"])
    torch.testing.assert_close(got["bn1.running_var"], want["bn1.running_var"])
    assert got["fc.weight"].shape == (3, 512)
    source.eval(), teacher.eval()
    x = _pixels()
    stem = nn.Sequential(*list(source.children())[:-2])  # everything up to the head agrees
    torch.testing.assert_close(teacher.forward_taps(x, ["l4"])[0], stem(teacher.normalize(x)))


def test_local_pth_loads_with_weights_only(tmp_path):
    source = torchvision.models.resnet18(num_classes=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "r18.pth")
    teacher = build_teacher("resnet18", 3, pretrained=tmp_path / "r18.pth").eval()
    torch.testing.assert_close(teacher(_pixels()), source.eval()(teacher.normalize(_pixels())))
    assert teacher.pretrained_report == {"skipped": [], "unexpected": []}


def test_weights_of_another_arch_are_refused(tmp_path):
    path = tmp_path / "r34.safetensors"
    save_file(torchvision.models.resnet34(num_classes=3).state_dict(), str(path))
    with pytest.raises(TeacherError, match=r"r34.safetensors: tensor 'layer1\.2\.[^']+' has no place in ResNet"):
        build_teacher("resnet18", 3, pretrained=path)  # every resnet18 tensor is in resnet34: only extras tell
    path = tmp_path / "mnv3.safetensors"
    save_file(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), str(path))
    with pytest.raises(TeacherError, match=r"mnv3.safetensors: tensor 'conv1.weight' missing; .*another architecture"):
        build_teacher("resnet18", 3, pretrained=path)


def test_unreadable_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nope.safetensors"):
        build_teacher("test_resnet", 3, pretrained=tmp_path / "nope.safetensors")
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    with pytest.raises(WeightsError, match=r"w.bin: unknown weights format '.bin'"):
        build_teacher("test_resnet", 3, pretrained=tmp_path / "w.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="junk.safetensors: cannot read weights"):
        build_teacher("test_resnet", 3, pretrained=tmp_path / "junk.safetensors")
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a pickled module: weights_only refuses it
    with pytest.raises(WeightsError, match="pickled.pt: cannot read weights"):
        build_teacher("test_resnet", 3, pretrained=tmp_path / "pickled.pt")


def test_imagenet_torchvision_without_network_is_a_one_line_error(monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):  # what torch.hub does without DNS, minus the wait
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(TeacherError) as info:
        build_teacher("resnet18", 3, pretrained="imagenet")
    message = str(info.value)
    assert calls and calls[0].startswith("https://download.pytorch.org/models/resnet18")  # the real loading path
    assert "\n" not in message
    assert "could not download ImageNet weights for 'resnet18'" in message and "Name or service not known" in message
    assert "pretrained=/path/to/weights.safetensors" in message


def test_imagenet_timm_without_network_is_a_one_line_error(monkeypatch):
    import timm.models._builder as builder

    calls = []

    def offline(model, *args, **kwargs):  # timm's download + load step; real one retries for ~50 s offline
        calls.append(model.pretrained_cfg["architecture"])
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nsecond line")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(TeacherError, match=r"^could not download ImageNet weights for 'resnet10t' \(OSError: We co"):
        build_teacher("resnet10t", 3, pretrained="imagenet")
    assert calls == ["resnet10t"]


def test_teacher_is_a_module_with_the_interface_attributes():
    teacher = build_teacher("test_resnet", 2, class_names=["cat", "dog"], input_size=48)
    assert isinstance(teacher, Teacher) and isinstance(teacher, nn.Module)
    assert (teacher.arch, teacher.class_names, teacher.input_size) == ("test_resnet", ["cat", "dog"], 48)
    assert teacher(_pixels(size=48)).shape == (2, 2)
