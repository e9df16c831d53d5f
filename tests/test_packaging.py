"""The wheel ships every recipe, and an installed cls2det finds them from any folder (not only from the repo)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "cls2det" / "configs"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy without build outputs: setuptools' build/ folder keeps files that the source no longer has
    source = tmp_path_factory.mktemp("source") / "cls2det"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "runs", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("cls2det-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_ships_every_config(wheel):
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    in_repo = {f"cls2det/configs/{p.relative_to(CONFIGS).as_posix()}" for p in CONFIGS.rglob("*.yaml")}
    assert len(in_repo) > 40 and shipped == in_repo


@pytest.mark.slow
def test_an_installed_wheel_trains_from_a_shipped_recipe(wheel, tmp_path, demo_data, cli_env):
    """A fresh venv that sees this environment's dependencies but not the repo: `cls2det train --config
    train/<recipe>.yaml` resolves the recipe inside the installed package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies come from this environment (a path line, so its editable cls2det is not picked up) ...
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # ... and cls2det from the wheel alone
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}  # nothing but the venv decides what is imported
    where = subprocess.run(
        [str(python), "-c", "import cls2det; print(cls2det.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
    )
    assert where.stdout.startswith(site), where.stdout + where.stderr
    run = tmp_path / "run"
    train = subprocess.run(
        [
            str(python),
            "-m",
            "cls2det",
            "train",
            str(demo_data),
            "--config",
            "train/ssdlite320_mobilenet_v3_baseline.yaml",
        ]
        + ["--out", str(run), "--no-progress", "max_steps=1", "epochs=1", "batch_size=2", "student.image_size=96"]
        + ["eval_every=100", "accelerator=cpu", "optim.warmup_steps=1"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert (run / "results.json").is_file()
    assert "ssdlite320_mobilenet_v3" in (run / "config.yaml").read_text()
