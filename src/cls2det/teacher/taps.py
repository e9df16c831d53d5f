"""Feature taps of a classifier teacher: the layers KD_loc compares (paper, sec. 3.2), and how to run up to them.

``"obj"`` is the input crop, ``"l0"`` the stem (first conv block) and ``"l1"``..``"l4"`` the four stages. Where each
tap comes from is written once, in :class:`TapLayout` (the table below and :func:`tap_layout`), never as string paths
elsewhere. :func:`run_segment` runs the modules between two taps, with conv+BN folded for a frozen teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tap = Literal["obj", "l0", "l1", "l2", "l3", "l4"]
TAPS: tuple[Tap, ...] = ("obj", "l0", "l1", "l2", "l3", "l4")
Library = Literal["torchvision", "timm"]


@dataclass(frozen=True)
class TapLayout:
    """Where taps ``l0``..``l4`` come from in one model family.

    ``kind="sequential"``: ``segments[i]`` are the dotted module paths that, run in order on the output of tap
    ``l{i-1}`` (or on the normalised input for ``i == 0``), produce tap ``l{i}``; the model's own ``forward`` must run
    the same modules in the same order (checked by the tests for every family in the table).
    ``kind="timm"``: ``feature_indices[i]`` indexes timm's ``feature_info`` / ``forward_intermediates`` for tap
    ``l{i}``; ``None`` where the model has no such level.
    """

    kind: Literal["sequential", "timm"]
    segments: tuple[tuple[str, ...], ...] = ()
    feature_indices: tuple[int | None, ...] = ()

    @property
    def available(self) -> tuple[Tap, ...]:
        levels = self.segments if self.kind == "sequential" else self.feature_indices
        return ("obj",) + tuple(f"l{i}" for i, level in enumerate(levels) if level is not None)  # type: ignore


_RESNET_STAGES = (("layer1",), ("layer2",), ("layer3",), ("layer4",))
# Families whose stages are named attributes. Key: (library, model class name).
_LAYOUTS: dict[tuple[str, str], TapLayout] = {
    ("torchvision", "ResNet"): TapLayout("sequential", (("conv1", "bn1", "relu", "maxpool"),) + _RESNET_STAGES),
    ("timm", "ResNet"): TapLayout("sequential", (("conv1", "bn1", "act1", "maxpool"),) + _RESNET_STAGES),
    ("torchvision", "RegNet"): TapLayout(
        "sequential", (("stem",),) + tuple((f"trunk_output.block{i}",) for i in range(1, 5))
    ),
}


def tap_layout(net: nn.Module, library: Library) -> TapLayout | None:
    """The tap layout of ``net``: from the table, from the stride pattern of ``net.features`` (torchvision
    MobileNet/EfficientNet/ConvNeXt/VGG), or from timm's ``feature_info``. None if taps are not supported."""
    layout = _LAYOUTS.get((library, type(net).__name__))
    if layout is not None:
        return layout
    if library == "timm":
        return _timm_layout(net)
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential) and len(features) >= 5:
        return _features_layout(features)
    return None


def _timm_layout(net: nn.Module) -> TapLayout | None:
    if not hasattr(net, "forward_intermediates"):
        return None
    reductions = [int(info["reduction"]) for info in getattr(net, "feature_info", [])]
    if len(reductions) == 5 and reductions == sorted(set(reductions)):  # stem + 4 stages (ResNet, MobileNet, ...)
        return TapLayout("timm", feature_indices=(0, 1, 2, 3, 4))
    if len(reductions) == 4 and reductions == sorted(set(reductions)):  # 4 stages, stem not exposed (ConvNeXt, ...)
        return TapLayout("timm", feature_indices=(None, 0, 1, 2, 3))
    return None


@torch.no_grad()
def _features_layout(features: nn.Sequential) -> TapLayout | None:
    """l0 = ``features[0]`` (the stem); l1..l4 = the blocks up to the last one at each of the 4 coarsest strides."""
    was_training = features.training
    features.eval()
    x, sizes = torch.zeros(1, 3, 64, 64), []
    for block in features:
        x = block(x)
        sizes.append(x.shape[-1])
    features.train(was_training)
    ends = [i for i in range(1, len(sizes)) if i == len(sizes) - 1 or sizes[i + 1] != sizes[i]]  # last of each stride
    if len(ends) < 4:
        return None
    ends = ends[-4:]
    starts = [1] + [e + 1 for e in ends[:-1]]
    stages = tuple(tuple(f"features.{j}" for j in range(s, e + 1)) for s, e in zip(starts, ends))
    return TapLayout("sequential", (("features.0",),) + stages)


def run_segment(modules: Sequence[nn.Module], x: Tensor, *, fuse: bool) -> Tensor:
    """Run ``modules`` in order on ``x``. With ``fuse`` (a frozen teacher in eval mode: BatchNorm on running statistics,
    no weight gradients) a Conv2d followed by a BatchNorm2d runs as one convolution with the BN folded into its weights,
    and a ReLU followed by a MaxPool2d runs after it (max and ReLU commute): the same values up to float rounding and
    the same gradients, with two fewer passes over a stem's largest feature map (KD_loc's predicted crops go
    through the stem forward and backward every step). Plain ``nn.Sequential`` s of leaf layers are opened, so deep
    stems fuse too."""
    modules = list(_sequential_leaves(modules))
    i = 0
    while i < len(modules):
        module, after = modules[i], modules[i + 1] if i + 1 < len(modules) else None
        if (
            fuse
            and isinstance(module, nn.Conv2d)
            and isinstance(after, nn.BatchNorm2d)
            and module.padding_mode == "zeros"
            and after.running_mean is not None
            and after.running_var is not None
        ):
            weight, bias = nn.utils.fuse_conv_bn_weights(
                module.weight, module.bias, after.running_mean, after.running_var, after.eps, after.weight, after.bias
            )
            x = F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
            i += 2
        elif fuse and isinstance(module, nn.ReLU) and isinstance(after, nn.MaxPool2d):
            x = F.relu(after(x))
            i += 2
        else:
            x = module(x)
            i += 1
    return x


def _sequential_leaves(modules: Sequence[nn.Module]):
    """``modules`` with each plain ``nn.Sequential`` of leaf layers (a deep stem, a conv-norm-act block) opened."""
    for module in modules:
        if (
            isinstance(module, nn.Sequential)
            and type(module).forward is nn.Sequential.forward
            and not any(any(True for _ in child.children()) for child in module)
        ):
            yield from module
        else:
            yield module


# ----------------------------------------------------------------------------------------------- the teacher
