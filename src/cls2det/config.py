"""Typed configuration: dataclasses, loaded from YAML, with ``key=value`` overrides, validated once.

Every run saves the resolved config next to its outputs (``config.yaml``), so a run can be reproduced
from its folder alone. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cls2det.errors import Cls2detError


class ConfigError(Cls2detError, ValueError):
    """A config file or override that does not fit the typed schema."""


TEACHER_TAPS = ("obj", "l0", "l1", "l2", "l3", "l4")
KD_TERMS = ("cls", "loc", "kd_loc")
DET_METHODS = ("logit", "fgfi", "pkd")  # det2det baselines, named "det:<method>" in distill.kd
DET_TERMS = tuple(f"det:{method}" for method in DET_METHODS)
TEACHER_PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")  # distill.teacher_precision
KD_LOC_GAP_SIZE = 4  # the authors' release: KD_loc pools the obj level to 4x4 and teacher layer j to 4·2^(j+1)
# keys that existed once: a config that still sets one fails with the reason instead of "unknown key"
REMOVED_KEYS = {
    ("TeacherConfig", "context"): "it enlarged the crops the teacher trained on but not the crops it sees during "
    "distillation; the paper and its release crop the box itself",
    ("DistillConfig", "pool"): "it pooled every KD_loc tap to one size; use distill.pools (one size per tap; "
    "default: the release's rule, obj 4, l_j 4·2^(j+1))",
}


def det_methods(kd: Sequence[str]) -> list[str]:
    """The det2det methods a ``distill.kd`` list names: ``[cls, det:pkd]`` -> ``[pkd]``."""
    return [term.split(":", 1)[1] for term in kd if term.startswith("det:")]


@dataclass
class TeacherConfig:
    """How the classifier teacher is built and trained on D_cls (the GT crops of the train split)."""

    arch: str = "resnet18"  # torchvision or timm model name
    pretrained: str | None = None  # None, "imagenet" (timm/torchvision hub weights) or a local weights file
    input_size: int = 112  # crops are resized to input_size x input_size (paper: 112)
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    # 0: KD_cls distils this network's logits and smoothing flattens them (the release ships no teacher-training code
    # that would say otherwise)
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.5
    # "ce" (softmax), "bce" (per-class sigmoid) or "ce+bce" (both jointly: the paper's teacher, whose logits suit
    # softmax and sigmoid students alike); recorded in teacher.json, checked against the student's head
    loss: str = "ce+bce"
    # flip half the crops left-right; None = what the dataset says (its annotations' info.hflip_preserves_labels,
    # true when absent: natural objects; the demo's digits say false). A student that flips needs a teacher that did.
    hflip: bool | None = None
    workers: int | str = "auto"  # DataLoader worker processes (train, val and the crop cache); auto: min(8, cores)
    # the network in channels_last memory format: faster convolutions on CPU (a step on 48 px crops, one thread:
    # MobileNetV3-Large 4.6x, ResNet-18 1.3x); the saved weights are the same either way
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = False  # deterministic kernels only (an op without one is an error): see cls2det.determinism

    def __post_init__(self) -> None:
        _check_choice("teacher.loss", self.loss, ("ce", "bce", "ce+bce"))
        self.workers = _check_workers("teacher.workers", self.workers)
        _check_positive("teacher.input_size", self.input_size)
        _check_positive("teacher.epochs", self.epochs)
        _check_positive("teacher.batch_size", self.batch_size)
        _check_positive("teacher.lr", self.lr)
        _check_at_least("teacher.weight_decay", self.weight_decay, 0)
        _check_at_least("teacher.warmup_epochs", self.warmup_epochs, 0)
        _check_at_least("teacher.seed", self.seed, 0)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"teacher.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class StudentConfig:
    """Which torchvision detector is the student, and its input geometry."""

    detector: str = "fasterrcnn_mobilenet_v3"
    image_size: int | None = (
        None  # min_size/max_size of the detector's transform (SSD: fixed size); None = family default
    )
    backbone_weights: str | None = None  # local state-dict file for the backbone (the ImageNet analogue), or "imagenet"
    trainable_backbone_layers: int | None = None
    anchor_sizes: list[int] | None = None  # override the anchor sizes where the family has anchors
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the torchvision builder,
    # e.g. {rpn_post_nms_top_n_train: 300, box_batch_size_per_image: 128} for a fast Faster R-CNN

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _check_positive("student.image_size", self.image_size)
        if self.trainable_backbone_layers is not None:
            _check_at_least("student.trainable_backbone_layers", self.trainable_backbone_layers, 0)
        for size in self.anchor_sizes or ():
            _check_positive("student.anchor_sizes", size)


@dataclass
class DistillConfig:
    """The paper's extra losses and their hyper-parameters (defaults: the paper's best), and the det2det baselines
    that distill a trained detector of the student's family (``det:logit``, ``det:fgfi``, ``det:pkd``)."""

    kd: list[str] = field(default_factory=list)  # subset of KD_TERMS + DET_TERMS; [] = plain baseline
    temperature: float = 2.0  # T in eq. (2)-(7)
    lambda_kd_cls: float = 0.4
    # KD_loc's one weight (eq. 12 lambda_kl), on the sum of the obj level and the mean of the teacher layers. The obj
    # level is the teacher's input crop, i.e. pixels in the teacher's normalisation ((x - mean) / std of 0..1 pixels,
    # ImageNet std ~0.226): the release's 0.15 on 0..255 pixels is 0.15·255·0.226 ~ 8.6 here (38 in 0..1 units).
    # The box losses of torchvision detectors are not mmdet's: measured on the demo generator's tuning set (seed 1,
    # 3 seeds, configs/ablations/kd_loc_weight.yaml), 0.3 was the best of 0.1 / 0.3 / 1 / 3 / 8.6 and 8.6 (the
    # release's) cost mAP; at the start of training 0.3 * KD_loc is ~9% of SSDlite's box loss (README).
    lambda_kd_loc: float = 0.3
    lambda_loc: float = 1.0  # loc (eq. 11) on 0..1 pixels
    sample_size: int = 112  # s, the spatial-transformer output size of eq. (8)-(9)
    taps: list[str] = field(default_factory=lambda: ["obj", "l0"])  # teacher layers for KD_loc (paper's best: obj+l0)
    # KD_loc's adaptive average-pool output size per tap, in ``taps`` order; None = the release's rule: obj 4, l_j
    # 4·2^(j+1) (l0 8, l1 16, ...)
    pools: list[int] | None = None
    loc_pool: int = 8  # pooling for the teacher-free loc loss, eq. (11)
    # cap K per batch (random subset) for the terms whose cost grows with K: KD_loc, loc (two s x s crops per
    # positive) and KD_cls when its teacher runs online; KD_cls from the soft-label cache uses every positive
    max_positives: int = 256
    # sigmoid students (RetinaNet, FCOS) need a teacher trained with ce+bce for KD_cls; true accepts a "ce" teacher
    allow_ce_teacher: bool = False
    # KD_cls on negatives too (an ablation beyond the paper, whose KD_cls sees positives only): at most this many
    # anchors / proposals the detector labels background per batch, each against the teacher's logits on its crop
    # (online, never cached); logged as kd_cls_neg, weighted by lambda_kd_cls like the positives' term. 0 = off
    kd_cls_negatives: int = 0
    soft_label_cache: bool = True  # KD_cls teacher logits computed once per GT box (and flip), not every step
    # det2det: the teacher is a detector run of the student's family and input size (`cls2det train --kd none`)
    det_teacher: str | None = None  # its run folder (--det-teacher); needed by every det:* term
    det_temperature: float = 1.0  # T of det:logit; 1 = the detectors' own softmax / sigmoid (our choice, not tuned)
    lambda_det_logit: float = 1.0  # Chen et al. 2017: L_cls = 0.5 L_hard + 0.5 L_soft, i.e. soft weighted as hard
    lambda_det_fgfi: float = 0.01  # Wang et al. 2019's imitation loss weight (their code's default)
    lambda_det_pkd: float = 6.0  # Cao et al. 2022's weight per feature level (their Faster R-CNN FPN recipe)
    fgfi_psi: float = 0.5  # FGFI's threshold factor psi (paper: 0.5)
    # KD_loc's GT branch (pooled teacher taps of the GT crops) computed once per GT box and flip, not every step;
    # 4 * sum_l(M_l * P_l^2) bytes per box on disk, float16 x 2 flips (taps obj,l0 at 4, 8 with a ResNet stem: 17 KB;
    # COCO's 860k boxes: ~14 GB), memory-mapped: a step reads its own rows only
    gt_feature_cache: bool = False  # off by default: the disk above, and photometric augmentation needs it off
    # autocast of the teacher's passes (KD_loc's predicted crops, online GT crops): "auto" = the training step's own
    # (train.precision), or one of 32-true / bf16-mixed / 16-mixed for the teacher alone, e.g. bf16-mixed where the
    # hardware has it (CUDA; CPUs with AVX512-BF16 or AMX) while the student trains in float32
    teacher_precision: str = "auto"

    def __post_init__(self) -> None:
        for term in self.kd:
            _check_choice("distill.kd", term, KD_TERMS + DET_TERMS)
        for tap in self.taps:
            _check_choice("distill.taps", tap, TEACHER_TAPS)
        if self.pools is not None:
            if len(self.pools) != len(self.taps):
                raise ConfigError(
                    f"distill.pools needs one size per tap of distill.taps=[{','.join(self.taps)}], "
                    f"got [{','.join(map(str, self.pools))}]"
                )
            for size in self.pools:
                _check_positive("distill.pools", size)
        _check_positive("distill.loc_pool", self.loc_pool)
        _check_positive("distill.max_positives", self.max_positives)
        _check_positive("distill.sample_size", self.sample_size)
        for name in ("lambda_kd_cls", "lambda_kd_loc", "lambda_loc", "lambda_det_logit", "lambda_det_fgfi"):
            _check_at_least(f"distill.{name}", getattr(self, name), 0)
        _check_at_least("distill.lambda_det_pkd", self.lambda_det_pkd, 0)
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.det_temperature <= 0:
            raise ConfigError(f"distill.det_temperature must be > 0, got {self.det_temperature}")
        if not 0 < self.fgfi_psi <= 1:
            raise ConfigError(f"distill.fgfi_psi must be in (0, 1], got {self.fgfi_psi}")
        _check_choice("distill.teacher_precision", self.teacher_precision, TEACHER_PRECISIONS)
        if self.kd_cls_negatives < 0:
            raise ConfigError(f"distill.kd_cls_negatives must be >= 0, got {self.kd_cls_negatives}")
        if self.kd_cls_negatives and "cls" not in self.kd:
            raise ConfigError(
                f"distill.kd_cls_negatives={self.kd_cls_negatives} needs cls in distill.kd (it is "
                f"KD_cls on negatives), got distill.kd=[{','.join(self.kd)}]"
            )

    def tap_pools(self) -> list[int]:
        """KD_loc's pooled size per tap of ``taps``: ``pools``, or the release's rule (obj 4, l_j 4·2^(j+1))."""
        if self.pools is not None:
            return list(self.pools)
        return [KD_LOC_GAP_SIZE if tap == "obj" else KD_LOC_GAP_SIZE * 2 ** (int(tap[1:]) + 1) for tap in self.taps]


@dataclass
class OptimConfig:
    name: str = "sgd"  # "sgd" or "adamw"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine", "step" or "constant"
    grad_clip: float | None = 10.0

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("sgd", "adamw"))
        _check_choice("optim.schedule", self.schedule, ("cosine", "step", "constant"))
        _check_positive("optim.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        _check_at_least("optim.weight_decay", self.weight_decay, 0)
        _check_at_least("optim.warmup_steps", self.warmup_steps, 0)
        if self.grad_clip is not None:
            _check_positive("optim.grad_clip", self.grad_clip)


@dataclass
class TrainConfig:
    """A student training run: data, student, distillation, optimisation and the machine."""

    data: str = ""  # dataset directory or data YAML
    teacher: str | None = None  # teacher run directory (needed when distill.kd is not empty)
    out: str = "runs/train"
    epochs: int = 12
    batch_size: int = 8
    seed: int = 0
    deterministic: bool = False  # deterministic kernels only (an op without one is an error): see cls2det.determinism
    workers: int | str = "auto"  # DataLoader worker processes (train and evaluation); auto: min(8, cores)
    eval_every: int = 1  # epochs between COCO evaluations on val
    checkpoint_every: int = 1  # epochs between checkpoints (and at SIGINT/SIGTERM)
    # flip half the student's images left-right (and their boxes); None = what the dataset says (its annotations'
    # info.hflip_preserves_labels, true when absent: natural objects as COCO; false for glyphs, whose mirror is no
    # glyph). KD_cls / KD_loc then need a teacher trained with flips too; the teacher caches are keyed by it.
    hflip: bool | None = None
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    accelerator: str = "auto"  # Fabric accelerator: auto, cpu, cuda, mps
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"  # Fabric strategy: auto, ddp, ...
    # seconds a collective may wait for a slow or dead rank before it fails (strategies with a process-group timeout:
    # ddp*, fsdp*, deepspeed*); rank 0 evaluates alone while the others wait, so keep it above one evaluation
    dist_timeout_s: float = 1800.0
    precision: str = "32-true"  # Fabric precision: 32-true, bf16-mixed, 16-mixed
    channels_last: bool = False  # student and teachers in channels_last memory format (faster convolutions on CPU)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        self.workers = _check_workers("workers", self.workers)
        # a run of 0 steps would "finish" at once: the mAP of an untrained model and no checkpoint
        for name in ("epochs", "batch_size", "eval_every", "checkpoint_every", "max_nonfinite_steps", "num_nodes"):
            _check_positive(name, getattr(self, name))
        if self.max_steps is not None:
            _check_positive("max_steps", self.max_steps)
        _check_at_least("seed", self.seed, 0)  # Fabric would replace a negative seed by a random one
        if isinstance(self.devices, int):
            _check_at_least("devices", self.devices, -1)  # Fabric: -1 = every device, N > 0 = N of them
            if self.devices == 0:
                raise ConfigError("devices must be >= 1, -1 (all) or 'auto', got 0")
        if not 0 < self.dist_timeout_s <= 1e9:  # NaN and inf fail too (timedelta cannot hold them)
            raise ConfigError(f"dist_timeout_s must be > 0 and <= 1e9 seconds, got {self.dist_timeout_s}")


@dataclass
class DemoDataConfig:
    """Size of the embedded demo dataset (``cls2det data demo``)."""

    seed: int = 0
    train_images: int = 600
    val_images: int = 200
    image_size: int = 256
    # (min, max) longer side of a digit's box, fraction of image_size (log-uniform): COCO's small / medium / large
    object_size: list[float] = field(default_factory=lambda: [0.1, 0.6])
    source_px: int | None = None  # glyphs rendered at this em and upscaled (a diagnosis knob); None = native

    def __post_init__(self) -> None:
        for name in ("train_images", "val_images", "image_size"):
            _check_positive(f"demo_data.{name}", getattr(self, name))


@dataclass
class StudyConfig:
    """A grid of training runs (detectors x rows x seeds) that share data, teacher and schedule, and its report.

    ``rows`` maps a row name to ``key=value`` overrides of ``train`` (e.g. ``distill.kd=[cls]``); every row of a
    seed uses the same seed, data and schedule. Finished runs are skipped, so a study is resumable.
    """

    name: str = "study"
    out: str = "runs/study"
    data: str | None = None  # dataset folder or data YAML; None = generate the demo dataset into out/data
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)
    teacher_run: str | None = None  # an existing teacher run; None = train one into out/teacher
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The ImageNet stand-in: pre-train the student's backbone once as a classifier on the train split's GT crops
    # (same weights for every row); None = use train.student.backbone_weights as given.
    backbone_pretrain: TeacherConfig | None = None
    # The det2det rows' teacher (rows whose distill.kd has det:*): each detector trained once without KD, from
    # ``train`` plus these key=value overrides (e.g. [epochs=24, seed=100]), into out/<detector>/det_teacher.
    # None = the det rows name their own distill.det_teacher.
    det_teacher: list[str] | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    detectors: list[str] = field(default_factory=lambda: ["fasterrcnn_mobilenet_v3"])
    # Per-detector key=value overrides of ``train``, applied before the row's (e.g. anchor sizes, RPN options):
    # {detector: [student.anchor_sizes=[12,24,48,96,192], ...]}; keys are detector names (entries for detectors the
    # study does not run are kept, so ``detectors=[...]`` can run a subset of a grid).
    detector_overrides: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rows: dict[str, list[str]] = field(default_factory=dict)
    # Per-detector subsets of ``rows`` (names, in ``rows``' order), for a grid too costly in full:
    # {detector: [baseline, kd_cls, ...]}; a detector not named runs every row.
    detector_rows: dict[str, list[str]] = field(default_factory=dict)
    # Per-detector seeds replacing ``seeds`` (e.g. more seeds for a cheap detector whose CI is wide):
    # {detector: [0, 1, 2, 3, 4]}; a detector not named runs ``seeds``.
    detector_seeds: dict[str, list[int]] = field(default_factory=dict)
    # runs trained at once, each a process with cores/jobs intra-op threads: on a CPU, two 1-thread runs of a small
    # detector finish sooner than the same two one after the other with 2 threads each
    jobs: int = 1
    baseline_row: str = "baseline"
    # [row, reference] pairs whose Δ, paired by seed, the report also shows (e.g. [kd_cls+kd_loc, kd_cls]: what
    # KD_loc adds on top of KD_cls)
    comparisons: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines printed under the report's table

    def rows_of(self, detector: str) -> list[str]:
        """The rows ``detector`` runs, in ``rows``' order."""
        names = self.detector_rows.get(detector)
        return [row for row in self.rows if names is None or row in names]

    def seeds_of(self, detector: str) -> list[int]:
        """The seeds ``detector`` runs: ``detector_seeds[detector]`` if given, else ``seeds``."""
        return self.detector_seeds.get(detector, self.seeds)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ConfigError("study.rows is empty: name at least one row")
        if not self.seeds:
            raise ConfigError("study.seeds is empty")
        if self.jobs < 1:
            raise ConfigError(f"study.jobs must be >= 1, got {self.jobs}")
        for detector, seeds in self.detector_seeds.items():
            if not seeds or len(set(seeds)) != len(seeds):
                raise ConfigError(f"study.detector_seeds.{detector} must be a non-empty list of distinct seeds")
        # detector_overrides / detector_rows / detector_seeds may name detectors the study does not run
        # (``detectors=[...]`` picks a subset of a grid); their names are checked against the registry by the study
        # runner (check_study).
        for detector, names in self.detector_rows.items():
            unknown = [name for name in names if name not in self.rows]
            if unknown or not names:
                raise ConfigError(
                    f"study.detector_rows.{detector}: {unknown[0] if unknown else 'no row'!r} is not one of the rows "
                    f"({', '.join(self.rows)})"
                )
        for pair in self.comparisons:
            if len(pair) != 2 or any(row not in self.rows for row in pair):
                raise ConfigError(
                    f"study.comparisons: {pair!r} must be [row, reference], two of the rows ({', '.join(self.rows)})"
                )
        if "det_teacher" in self.rows:
            raise ConfigError("study.rows: 'det_teacher' names the detector teacher's run folder; rename the row")


# ----------------------------------------------------------------------------------------------- loading


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise :class:`ConfigError`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        reason = REMOVED_KEYS.get((cls.__name__, key))
        if reason is not None:
            raise ConfigError(f"{prefix}{key} was removed: {reason}")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict, in place, and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else None
    return values


def load_config(
    cls: type,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    flags: dict[str, Any] | None = None,
    **base: Any,
) -> Any:
    """Defaults <- ``base`` values <- YAML file ``path`` <- ``flags`` (explicit command-line flags) <- ``overrides``
    (``key=value`` strings); ``None`` values in ``base`` and ``flags`` are skipped. Returns a validated ``cls``."""
    values: dict[str, Any] = {k: v for k, v in base.items() if v is not None}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _deep_update(values, loaded)
    _deep_update(values, {k: v for k, v in (flags or {}).items() if v is not None})
    apply_overrides(values, overrides)
    return from_dict(cls, values)


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given when it is a file, else the recipe of that name shipped in the package (``cls2det/configs``,
    e.g. ``train/ssdlite320_mobilenet_v3_all.yaml`` or ``configs/demo.yaml``), so an installed cls2det finds its
    recipes from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = shipped_config(path.as_posix().removeprefix("configs/"))
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {path} (neither a file nor a recipe shipped in cls2det/configs)")


def shipped_config(name: str) -> Path:
    """Where the recipe ``name`` (e.g. ``demo.yaml``, ``train/fcos_resnet50_all.yaml``) lies in the installed package
    (the path may not exist)."""
    from importlib import resources

    return Path(str(resources.files("cls2det") / "configs" / name))


def save_config(config: Any, path: str | Path) -> None:
    """Write ``config`` as YAML atomically (a reader never sees half a file)."""
    from cls2det.files import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------------------------- helpers


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a simple type hint (int, float, str, bool, list[...], X | None, int | str)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):  # "cls,loc" on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is Any:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, f"{name}.")
    raise ConfigError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def resolve_workers(workers: int | str) -> int:
    """DataLoader worker processes for a config's ``workers``: ``"auto"`` = min(8, the CPU cores this process may
    use), enough to keep one GPU fed with decoded JPEGs."""
    if workers != "auto":
        return int(workers)
    return min(8, usable_cores())


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_workers(name: str, value: int | str) -> int | str:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ConfigError(f"{name} must be 'auto' or an integer >= 0, got {value!r}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: unknown value {value!r}; valid: {', '.join(choices)}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # NaN fails too
        raise ConfigError(f"{name} must be > 0, got {value}")


def _check_at_least(name: str, value: float, least: float) -> None:
    if not value >= least:  # NaN fails too
        raise ConfigError(f"{name} must be >= {least}, got {value}")
