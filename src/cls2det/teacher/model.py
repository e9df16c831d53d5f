"""The classifier teacher: a torchvision or timm classifier that owns its normalisation, input size and feature taps.

Its feature taps (where KD_loc reads the network) are laid out in :mod:`cls2det.teacher.taps`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast, overload

import timm
import torch
import torchvision
from torch import Tensor, nn

from cls2det.errors import Cls2detError
from cls2det.files import read_state_dict
from cls2det.teacher.taps import Library, Tap, run_segment, tap_layout

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherError(Cls2detError, ValueError):
    """Bad teacher input (unknown arch, unusable weights, broken checkpoint); a one-line message naming the culprit."""


class Teacher(nn.Module):
    """Frozen-able classifier wrapper. Input: RGB pixels in 0..1, [K, 3, S, S] (S = ``input_size``, any S works)."""

    _mean: Tensor  # buffers, registered in __init__
    _std: Tensor

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        library: Library,
        class_names: Sequence[str],
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        loss: str = "ce",
    ) -> None:
        super().__init__()
        self.net = net
        self.arch, self.library, self.loss = arch, library, loss
        self.hflip: bool | None = None  # whether it was trained on flipped crops too (None: not recorded)
        self.class_names = list(class_names)
        self.input_size = int(input_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # Not persistent: the checkpoint's JSON is the one source of mean/std; weights stay a plain state dict.
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.layout = tap_layout(net, library)
        self.is_frozen = False
        self.pretrained_report: dict[str, list[str]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def available_taps(self) -> tuple[Tap, ...]:
        return self.layout.available if self.layout is not None else ("obj",)

    def normalize(self, pixels: Tensor) -> Tensor:
        """[K, 3, S, S] in 0..1 -> (pixels - mean) / std, the input the network expects."""
        return (pixels - self._mean) / self._std

    def forward(self, pixels: Tensor) -> Tensor:
        """[K, 3, S, S] RGB in 0..1 -> logits [K, C]."""
        return self.net(self.normalize(pixels))

    @overload
    def forward_taps(
        self, pixels: Tensor, taps: Sequence[str], *, return_logits: Literal[False] = False
    ) -> list[Tensor]: ...

    @overload
    def forward_taps(
        self, pixels: Tensor, taps: Sequence[str], *, return_logits: Literal[True]
    ) -> tuple[list[Tensor], Tensor]: ...

    @overload
    def forward_taps(
        self, pixels: Tensor, taps: Sequence[str], *, return_logits: bool
    ) -> list[Tensor] | tuple[list[Tensor], Tensor]: ...

    def forward_taps(
        self, pixels: Tensor, taps: Sequence[str], *, return_logits: bool = False
    ) -> list[Tensor] | tuple[list[Tensor], Tensor]:
        """Feature maps [K, M_l, H_l, W_l] for ``taps`` (in the order asked), from pixels [K, 3, S, S] in 0..1.

        Runs the network only as deep as the deepest tap asked; with ``return_logits`` it runs one full pass and also
        returns the logits [K, C]. Gradients flow to ``pixels`` even when the teacher is frozen.
        """
        taps = tuple(taps)
        for tap in taps:
            if tap not in self.available_taps:
                raise TeacherError(
                    f"teacher {self.arch!r} has no tap {tap!r}; available: {', '.join(self.available_taps)}"
                )
        x = self.normalize(pixels)  # [K, 3, S, S]
        found: dict[str, Tensor] = {"obj": x}
        levels = sorted({int(t[1]) for t in taps if t != "obj"})
        logits = None
        if self.layout is None:  # only "obj" can have been asked
            logits = self.net(x) if return_logits else None
        elif self.layout.kind == "timm":
            logits = self._timm_taps(x, levels, found, return_logits)
        elif return_logits:
            logits = self._hooked_full_pass(x, levels, found)
        else:
            for level in range(levels[-1] + 1 if levels else 0):
                modules = [self.net.get_submodule(path) for path in self.layout.segments[level]]
                x = run_segment(modules, x, fuse=self.is_frozen and not self.training)
                found[f"l{level}"] = x
        feats = [found[t] for t in taps]
        return (feats, cast(Tensor, logits)) if return_logits else feats  # return_logits: a Tensor

    def _timm_taps(self, x: Tensor, levels: list[int], found: dict[str, Tensor], return_logits: bool) -> Tensor | None:
        net: Any = self.net  # a timm model (forward_intermediates, forward_head)
        indices = [self.layout.feature_indices[level] for level in levels]  # type: ignore[union-attr]
        if return_logits:
            final, inter = net.forward_intermediates(x, indices=indices or [0], intermediates_only=False)
            logits = net.forward_head(final)
        elif indices:
            inter = net.forward_intermediates(x, indices=indices, stop_early=True, intermediates_only=True)
            logits = None
        else:
            return None
        found.update({f"l{level}": feat for level, feat in zip(levels, inter)})
        return logits

    def _hooked_full_pass(self, x: Tensor, levels: list[int], found: dict[str, Tensor]) -> Tensor:
        """One pass of the model's own forward; forward hooks on each segment's last module record the taps."""
        handles = []
        for level in levels:
            module = self.net.get_submodule(self.layout.segments[level][-1])  # type: ignore[union-attr]
            handles.append(module.register_forward_hook(lambda m, i, o, key=f"l{level}": found.__setitem__(key, o)))
        try:
            return self.net(x)
        finally:
            for handle in handles:
                handle.remove()

    def freeze(self) -> Teacher:
        """Eval mode for good (``train()`` is ignored afterwards) and no parameter gradients: a distillation teacher."""
        self.is_frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        # A parent module's .train() must not switch a frozen teacher's BatchNorm back to batch statistics.
        return super().train(False if self.is_frozen else mode)


# ----------------------------------------------------------------------------------------------- building


def build_teacher(
    arch: str,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    input_size: int = 112,
    pretrained: str | Path | None = None,
    library: Library | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Teacher:
    """A ``num_classes``-way classifier ``arch`` (torchvision name first, else timm), not frozen.

    ``pretrained``: None (random init), ``"imagenet"`` (torchvision's DEFAULT / timm's weights, needs network; the
    classifier head is re-initialised) or a local ``.safetensors`` / ``.pth`` / ``.pt`` state dict (a classifier head
    of another shape is skipped and reported in ``teacher.pretrained_report``). ``mean``/``std`` default to ImageNet's
    (timm: the model's ``pretrained_cfg``).
    """
    if num_classes < 1:
        raise TeacherError(f"num_classes must be >= 1, got {num_classes}")
    class_names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise TeacherError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
    library = _library_of(arch, library)
    is_imagenet = pretrained is not None and str(pretrained).lower() == "imagenet"
    if library == "torchvision":
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    else:
        net = _timm_model(arch, num_classes, download=is_imagenet)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        default_mean, default_std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    report: dict[str, list[str]] = {}
    if is_imagenet and library == "torchvision":
        report = load_matching_state_dict(net, _download_torchvision(arch), f"ImageNet weights of {arch}")
    elif pretrained is not None and not is_imagenet:
        report = load_matching_state_dict(net, read_state_dict(pretrained), str(pretrained))
    teacher = Teacher(
        net,
        arch=arch,
        library=library,
        class_names=class_names,
        input_size=input_size,
        mean=mean or default_mean,
        std=std or default_std,
    )
    teacher.pretrained_report = report
    return teacher


def _library_of(arch: str, library: str | None = None) -> Library:
    """The library that builds ``arch``: torchvision first, else timm (or check the one given)."""
    if library not in (None, "torchvision", "timm"):
        raise TeacherError(f"unknown model library {library!r}; valid: torchvision, timm")
    if library in (None, "torchvision") and arch in torchvision.models.list_models(module=torchvision.models):
        return "torchvision"
    if library in (None, "timm") and timm.is_model(arch):
        return "timm"
    names = list(dict.fromkeys(torchvision.models.list_models(module=torchvision.models) + timm.list_models()))
    close = difflib.get_close_matches(arch, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TeacherError(
        f"unknown teacher arch {arch!r}; {hint}valid examples: resnet18, resnet50, resnext50_32x4d, "
        "mobilenet_v3_large (torchvision), resnet10t, convnext_nano (timm)"
    )


def _timm_model(arch: str, num_classes: int, *, download: bool) -> nn.Module:
    if not download:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    try:  # timm loads the ImageNet weights and re-initialises the head for num_classes itself
        return timm.create_model(arch, pretrained=True, num_classes=num_classes)
    except Exception as err:  # noqa: BLE001 - any failure here means "no weights"; report it in one line
        raise _download_error(arch, err) from None


def _download_torchvision(arch: str) -> dict[str, Tensor]:
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # noqa: BLE001
        raise _download_error(arch, err) from None


def _download_error(arch: str, err: BaseException) -> TeacherError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return TeacherError(
        f"could not download ImageNet weights for {arch!r} ({type(err).__name__}: {reason}); "
        "download them on a machine with network access and pass the local file: "
        "pretrained=/path/to/weights.safetensors"
    )


# ----------------------------------------------------------------------------------------------- local weights


def load_matching_state_dict(net: nn.Module, state: dict[str, Tensor], source: str) -> dict[str, list[str]]:
    """Load ``state`` into ``net``; classifier-head tensors that are missing, extra or of another shape are skipped.

    Any other missing, extra or mis-shaped tensor means the file is for another architecture: :class:`TeacherError`.
    Returns ``{"skipped": [...], "unexpected": [...]}`` (keys: the model's head tensors left at their initialisation,
    the file's head tensors that have no place in the model) and logs them.
    """
    own = net.state_dict()
    head = _head_prefix(net)
    is_head = lambda key: head is not None and key.startswith(head + ".")  # noqa: E731
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    for key in mismatched + missing + unexpected:
        if is_head(key):
            continue
        if key in mismatched:
            what = f"has shape {tuple(state[key].shape)}, expected {tuple(own[key].shape)}"
        else:
            what = "missing" if key in missing else f"has no place in {type(net).__name__}"
        raise TeacherError(f"{source}: tensor {key!r} {what}; are these weights for another architecture?")
    skipped = [k for k in own if k in mismatched or k in missing]
    net.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
    if skipped or unexpected:
        skipped_all = ", ".join(skipped + unexpected)
        log.info("%s: skipped classifier head %s (new shape for this class count)", source, skipped_all)
    return {"skipped": skipped, "unexpected": unexpected}


def _head_prefix(net: nn.Module) -> str | None:
    """Module path of the classifier: timm's ``pretrained_cfg['classifier']``, else the last ``nn.Linear``."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if isinstance(cfg.get("classifier"), str):
        return cfg["classifier"]
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]
