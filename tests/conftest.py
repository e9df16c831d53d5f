"""Suite-wide settings: the CI machine has 2 cores; torch's intra-op threads fight pytest for them."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------- end-to-end fixtures
# A tiny demo dataset and teacher, built once per session, for the training / resume / DDP / CLI tests.

DEMO_SIZE = 96  # px, square demo images
TEACHER_INPUT = 32  # px, the tiny teacher's crop size
# The light detectors train at batch 4; the ResNet-50 / VGG ones at batch 2. SSD300 needs >= 268 px (its
# fixed-size transform), SSDlite's fixed size is set to the images' 96 px so its resize is the identity.
HEAVY = ("fasterrcnn_resnet50", "retinanet_resnet50", "fcos_resnet50", "ssd300_vgg16")
# Fewer proposals / sampled RoIs than torchvision's defaults (2000 / 512): a step took 1.8 s, 1.0 s with these; the
# RoI sampler still draws from the global RNG (64 of ~100 proposals), which the determinism tests need.
FAST_RCNN = (
    "{rpn_pre_nms_top_n_train: 200, rpn_post_nms_top_n_train: 100, rpn_pre_nms_top_n_test: 100, "
    "rpn_post_nms_top_n_test: 50, box_batch_size_per_image: 64}"
)


def tiny_overrides(detector: str = "fasterrcnn_mobilenet_v3") -> list[str]:
    """``key=value`` overrides of TrainConfig for a seconds-long CPU run of ``detector``."""
    size = 270 if detector == "ssd300_vgg16" else DEMO_SIZE
    overrides = [
        f"student.detector={detector}",
        f"student.image_size={size}",
        f"batch_size={2 if detector in HEAVY else 4}",
        "epochs=1",
        "optim.warmup_steps=1",
        "distill.sample_size=32",
        "distill.max_positives=16",
        "eval_every=100",
        "accelerator=cpu",
    ]
    if detector.startswith("fasterrcnn"):
        overrides.append(f"student.options={FAST_RCNN}")
    return overrides


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The embedded demo dataset, 12 train / 6 val images of 96x96 px (10 digit classes)."""
    from cls2det.data import generate_demo

    return generate_demo(
        tmp_path_factory.mktemp("e2e") / "data", seed=0, train_images=12, val_images=6, image_size=DEMO_SIZE
    )


@pytest.fixture(scope="session")
def teacher_run(demo_data, tmp_path_factory):
    """A ResNet-18 teacher (32 px crops) trained for one epoch on ``demo_data``; its run folder."""
    from cls2det.config import TeacherConfig
    from cls2det.teacher import train_teacher

    out = tmp_path_factory.mktemp("e2e") / "teacher"
    config = TeacherConfig(arch="resnet18", input_size=TEACHER_INPUT, epochs=1, batch_size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on the 2 shared cores made this 1 s job take 7 s
    try:
        train_teacher(demo_data, out, config, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def make_train_config(demo_data, teacher_run):
    """``make(out, detector, overrides=()) -> TrainConfig``: :func:`tiny_overrides` then ``overrides``, with
    the session's data and teacher (``teacher=null`` in overrides drops it)."""
    from cls2det.config import TrainConfig, load_config

    def make(out, detector: str = "fasterrcnn_mobilenet_v3", overrides=()):
        return load_config(
            TrainConfig,
            None,
            [*tiny_overrides(detector), *overrides],
            data=str(demo_data),
            teacher=str(teacher_run),
            out=str(out),
        )

    return make


@pytest.fixture(scope="session", name="tiny_overrides")
def tiny_overrides_fixture():
    """:func:`tiny_overrides`, for test modules (they cannot import conftest under --import-mode=importlib)."""
    return tiny_overrides


def cli_env() -> dict[str, str]:
    """The environment of ``python -m cls2det`` subprocesses: one intra-op thread (the in-process runs of the tests
    use one too, so results compare bit for bit; and two cores are shared by everything on the CI machine)."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, timeout=300) -> CompletedProcess``: ``python -m cls2det ARGS`` with text output captured."""
    import subprocess
    import sys

    def run(*args, timeout: float = 300):
        return subprocess.run(
            [sys.executable, "-m", "cls2det", *map(str, args)],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session", name="cli_env")
def cli_env_fixture():
    """:func:`cli_env`, for test modules that start ``cls2det`` themselves (Popen, signals)."""
    return cli_env()


@pytest.fixture
def one_thread():
    """One intra-op thread for in-process training: the ``cls2det`` subprocesses of the tests use one too
    (``OMP_NUM_THREADS=1``), so in-process and subprocess runs compare bit for bit; and on the 2 shared cores a
    ResNet-50 step with competing OpenMP threads ran many times slower. Restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
