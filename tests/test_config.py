from pathlib import Path

import pytest

from cls2det.config import (
    ConfigError,
    DistillConfig,
    StudyConfig,
    TeacherConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "cls2det" / "configs"


def test_defaults_are_the_papers():
    d = DistillConfig()
    assert (d.temperature, d.lambda_kd_cls, d.taps, d.sample_size) == (2.0, 0.4, ["obj", "l0"], 112)
    assert d.pools is None and d.tap_pools() == [4, 8]  # the release: gap_size 4, layer 0 at 4·2


def test_kd_loc_pools_follow_the_release_rule_unless_given():
    assert DistillConfig(taps=["obj", "l0", "l1"]).tap_pools() == [4, 8, 16]
    assert DistillConfig(taps=["l1", "obj", "l2"]).tap_pools() == [16, 4, 32]  # per tap, in the taps' order
    config = load_config(TrainConfig, None, ["distill.taps=[obj,l0]", "distill.pools=[2,4]"])
    assert config.distill.tap_pools() == [2, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.pools=[4]"], r"distill.pools needs one size per tap of distill.taps=\[obj,l0\], got \[4\]"),
        (["distill.pools=[4,0]"], "distill.pools must be > 0, got 0"),
        (["distill.pools=[4,x]"], "distill.pools must be int, got 'x'"),
        (["distill.pool=8"], r"distill.pool was removed: it pooled every KD_loc tap to one size; use distill.pools"),
    ],
)
def test_bad_pools_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(TrainConfig, None, overrides)
    assert "\n" not in str(info.value)


def test_removed_teacher_context_says_why(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("rows: {baseline: []}\nteacher: {arch: resnet18, context: 0.1}\n")
    for load in (lambda: load_config(StudyConfig, path), lambda: load_config(TeacherConfig, None, ["context=0.1"])):
        with pytest.raises(ConfigError, match=r"context was removed: it enlarged the crops .* crop the box itself$"):
            load()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\ndistill:\n  kd: [cls]\n  temperature: 4\n")
    config = load_config(TrainConfig, path, ["distill.kd=cls,loc", "optim.lr=0.5", "student.image_size=128"], epochs=9)
    assert config.epochs == 3  # the file wins over base values
    assert config.distill.kd == ["cls", "loc"] and config.distill.temperature == 4.0
    assert config.optim.lr == 0.5 and config.student.image_size == 128


def test_explicit_flags_win_over_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: from_yaml\nepochs: 3\nstudent: {detector: ssd300_vgg16, image_size: 300}\n")
    flags = {"out": "from_flag", "epochs": None, "student": {"detector": "fcos_resnet50"}}
    config = load_config(TrainConfig, path, ["epochs=5"], flags=flags)
    assert (config.out, config.epochs, config.student.detector, config.student.image_size) == (
        "from_flag",
        5,
        "fcos_resnet50",
        300,
    )


def test_round_trip(tmp_path):
    config = load_config(TrainConfig, None, ["distill.kd=[cls,kd_loc]", "devices=2"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(TrainConfig, tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochz=3", "unknown key epochz; valid keys:"),
        ("distill.tau=3", "unknown key distill.tau; valid keys:"),
        ("distill.kd=[cls,foo]", "distill.kd: unknown value 'foo'; valid: cls, loc, kd_loc"),
        ("distill.taps=[l9]", "distill.taps: unknown value 'l9'"),
        ("epochs=three", "epochs must be int, got 'three'"),
        ("distill.temperature=0", "distill.temperature must be > 0"),
        ("optim.name=adam", "optim.name: unknown value 'adam'; valid: sgd, adamw"),
        ("nokey", "is not of the form key=value"),
        ("dist_timeout_s=0", "dist_timeout_s must be > 0 and <= 1e9 seconds, got 0.0"),
        ("dist_timeout_s=.nan", "dist_timeout_s must be > 0 and <= 1e9 seconds, got nan"),
        ("distill.kd_cls_negatives=-1", "distill.kd_cls_negatives must be >= 0, got -1"),
    ],
)
def test_bad_values_name_the_culprit(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(TrainConfig, None, [override])


def test_kd_cls_negatives_needs_kd_cls():
    with pytest.raises(
        ConfigError, match=r"kd_cls_negatives=8 needs cls in distill.kd .*got distill.kd=\[loc,kd_loc\]"
    ):
        load_config(TrainConfig, None, ["distill.kd=[loc,kd_loc]", "distill.kd_cls_negatives=8"])
    config = load_config(TrainConfig, None, ["distill.kd=[cls,loc]", "distill.kd_cls_negatives=8"])
    assert config.distill.kd_cls_negatives == 8 and DistillConfig().kd_cls_negatives == 0  # off by default


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML") as info:
        load_config(TrainConfig, path)
    assert "\n" not in str(info.value)


def test_teacher_config_checks():
    with pytest.raises(ConfigError, match="teacher.loss"):
        TeacherConfig(loss="hinge")
    with pytest.raises(ConfigError, match=r"teacher.label_smoothing must be in \[0, 1\), got 1.0"):
        TeacherConfig(label_smoothing=1.0)
    # the paper's teacher: softmax CE and per-class BCE jointly, no label smoothing (KD_cls distils its logits)
    assert (TeacherConfig().loss, TeacherConfig().label_smoothing) == ("ce+bce", 0.0)


def test_apply_overrides_nested():
    assert apply_overrides({}, ["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    """Each recipe in configs/ loads into its typed config (studies, then every row of them and, for det2det
    rows, the detector teacher's run)."""
    from cls2det.study.runner import check_study

    if path.parent.name in ("ablations", "diagnosis") or path.name == "demo.yaml" or path.name.startswith("study_"):
        check_study(load_config(StudyConfig, path), Path("runs"))
    elif path.parent.name == "teacher":
        load_config(TeacherConfig, path)
    else:
        load_config(TrainConfig, path)


def test_workers_auto_by_default_and_checked(monkeypatch):
    from cls2det.config import ConfigError, TeacherConfig, TrainConfig, resolve_workers

    assert TrainConfig().workers == "auto" and TeacherConfig().workers == "auto"
    assert TrainConfig(workers="3").workers == 3 and resolve_workers(3) == 3 and resolve_workers(0) == 0
    for bad in (-1, "many", True):
        with pytest.raises(ConfigError, match="workers must be 'auto' or an integer >= 0"):
            TrainConfig(workers=bad)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert resolve_workers("auto") == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert resolve_workers("auto") == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=0", "epochs must be > 0, got 0"),
        ("epochs=-1", "epochs must be > 0, got -1"),
        ("batch_size=0", "batch_size must be > 0, got 0"),
        ("max_steps=0", "max_steps must be > 0, got 0"),
        ("eval_every=0", "eval_every must be > 0, got 0"),
        ("checkpoint_every=-2", "checkpoint_every must be > 0, got -2"),
        ("devices=0", "devices must be >= 1, -1 (all) or 'auto', got 0"),
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("optim.lr=.nan", "optim.lr must be > 0, got nan"),
        ("optim.momentum=1", "optim.momentum must be in [0, 1), got 1.0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0, got -1"),
        ("optim.grad_clip=0", "optim.grad_clip must be > 0, got 0.0"),
        ("distill.lambda_kd_loc=-0.1", "distill.lambda_kd_loc must be >= 0, got -0.1"),
        ("distill.sample_size=0", "distill.sample_size must be > 0, got 0"),
        ("student.image_size=0", "student.image_size must be > 0, got 0"),
        ("student.anchor_sizes=[16,0]", "student.anchor_sizes must be > 0, got 0"),
        ("seed=-1", "seed must be >= 0, got -1"),
    ],
)
def test_every_number_is_checked_with_its_name(override, message):
    """`--epochs 0` used to exit 0 with the mAP of an untrained model and no checkpoint."""
    with pytest.raises(ConfigError) as caught:
        load_config(TrainConfig, None, [override])
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "cls, override, message",
    [
        (TeacherConfig, "epochs=0", "teacher.epochs must be > 0, got 0"),
        (TeacherConfig, "batch_size=-1", "teacher.batch_size must be > 0, got -1"),
        (TeacherConfig, "lr=0", "teacher.lr must be > 0, got 0.0"),
        (TeacherConfig, "warmup_epochs=-1", "teacher.warmup_epochs must be >= 0, got -1.0"),
        (TeacherConfig, "seed=-3", "teacher.seed must be >= 0, got -3"),
        (StudyConfig, "demo_data.train_images=0", "demo_data.train_images must be > 0, got 0"),
    ],
)
def test_teacher_and_study_numbers_are_checked(cls, override, message):
    base = ["rows={baseline: []}"] if cls is StudyConfig else []
    with pytest.raises(ConfigError) as caught:
        load_config(cls, None, [*base, override])
    assert str(caught.value) == message
