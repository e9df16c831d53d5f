"""Horizontal flips follow the dataset: a split says whether a mirror keeps its labels (glyphs: no; COCO: yes, the
default), and the student's batches, the teacher's training and the teacher caches all honour it; a cache built for
one flip policy cannot be read under the other."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil

import pytest
import torch

from cls2det.config import TeacherConfig
from cls2det.data import CocoDetection, DatasetError, load_split
from cls2det.engine.run_dir import SOFT_LABELS, TrainingError
from cls2det.engine.teacher_cache import (
    SoftLabelCache,
    StaleCacheError,
    build_soft_label_cache,
    read_key,
    soft_label_key,
)
from cls2det.teacher import load_teacher, read_teacher_meta, train_teacher

fit_module = importlib.import_module("cls2det.engine.fit")


def with_flip_statement(data, out, value):
    """A copy of dataset ``data`` whose annotation files state ``info.hflip_preserves_labels = value`` (absent for
    ``...``)."""
    shutil.copytree(data, out)
    for split in ("train", "val"):
        path = out / "annotations" / f"{split}.json"
        coco = json.loads(path.read_text())
        coco["info"].pop("hflip_preserves_labels", None)
        if value is not ...:
            coco["info"]["hflip_preserves_labels"] = value
        path.write_text(json.dumps(coco))
    return out


def test_the_demo_data_says_a_mirror_changes_its_labels_and_coco_data_keeps_them(demo_data, tmp_path):
    assert load_split(demo_data, "train").hflip_preserves_labels is False
    assert load_split(with_flip_statement(demo_data, tmp_path / "coco", ...), "train").hflip_preserves_labels is True
    bad = load_split(with_flip_statement(demo_data, tmp_path / "bad", "no"), "train")
    with pytest.raises(DatasetError, match=r"train\.json: info.hflip_preserves_labels must be true or false, got 'no'"):
        _ = bad.hflip_preserves_labels


def flips_seen(monkeypatch, config):
    """Train ``config`` and return, per step, how many of the batch's images the student saw flipped."""
    seen = []
    real = fit_module.hflip_batch

    def spy(images, targets, generator, p=0.5):
        out = real(images, targets, generator, p=p)
        seen.append(int(out[2].sum()))
        return out

    monkeypatch.setattr(fit_module, "hflip_batch", spy)
    fit_module.fit(config, progress=False)
    return seen


@pytest.mark.slow
def test_the_student_flips_only_where_the_dataset_allows_it(make_train_config, demo_data, tmp_path, monkeypatch):
    overrides = ["distill.kd=[]", "max_steps=3", "teacher=null"]
    glyphs = make_train_config(tmp_path / "glyphs", "ssdlite320_mobilenet_v3", overrides)
    assert flips_seen(monkeypatch, glyphs) == [0, 0, 0]
    coco_like = dataclasses.replace(
        make_train_config(tmp_path / "coco", "ssdlite320_mobilenet_v3", overrides),
        data=str(with_flip_statement(demo_data, tmp_path / "coco_data", ...)),
    )
    assert sum(flips_seen(monkeypatch, coco_like)) > 0  # 12 images, p = 0.5 each
    forced = make_train_config(tmp_path / "forced", "ssdlite320_mobilenet_v3", [*overrides, "hflip=true"])
    assert sum(flips_seen(monkeypatch, forced)) > 0  # train.hflip overrides the dataset


@pytest.mark.slow
def test_the_teacher_trains_with_the_students_flip_rule_and_records_it(demo_data, teacher_run, tmp_path):
    assert read_teacher_meta(teacher_run)["hflip"] is False  # the session's teacher, on the demo data
    assert load_teacher(teacher_run).hflip is False
    coco_like = with_flip_statement(demo_data, tmp_path / "coco", ...)
    config = TeacherConfig(arch="resnet18", input_size=32, epochs=1, batch_size=32, workers=0)
    train_teacher(coco_like, tmp_path / "teacher", config, progress=False)
    assert read_teacher_meta(tmp_path / "teacher")["hflip"] is True
    assert load_teacher(tmp_path / "teacher").hflip is True


def test_a_student_that_flips_refuses_a_teacher_trained_without_flips(make_train_config, tmp_path):
    config = make_train_config(tmp_path / "run", "ssdlite320_mobilenet_v3", ["distill.kd=[cls]", "hflip=true"])
    with pytest.raises(TrainingError, match=r"student flips its images .* was trained without flips: retrain it with"):
        fit_module.fit(config, progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run started


def test_a_cache_built_without_flips_holds_one_variant_and_is_stale_for_a_run_that_flips(
    teacher_run, demo_data, tmp_path
):
    teacher = load_teacher(teacher_run)
    dataset = CocoDetection(load_split(demo_data, "train"))
    path = tmp_path / SOFT_LABELS
    plain = build_soft_label_cache(teacher, dataset, path=path, flips=False)
    assert plain.logits.shape[1] == 1 and read_key(path)["hflip"] == "false"
    both = build_soft_label_cache(teacher, dataset, flips=True)
    assert both.logits.shape[1] == 2
    torch.testing.assert_close(plain.logits[:, 0], both.logits[:, 0], rtol=0, atol=0)  # the same unflipped rows
    with pytest.raises(StaleCacheError, match=r"hflip='false' \(asked 'true'\)"):
        SoftLabelCache.load(path, key=soft_label_key(teacher, dataset, flips=True))
    image_ids = torch.tensor([int(dataset.target(0)["image_id"])])
    with pytest.raises(StaleCacheError, match="built without flipped crops"):
        plain.lookup(image_ids, torch.tensor([0]), torch.tensor([True]))


@pytest.mark.slow
def test_a_run_folders_cache_follows_the_flip_rule(make_train_config, teacher_run, demo_data, tmp_path, capsys):
    """A run that does not flip builds the unflipped rows only; the same folder's caches opened for a run that flips
    find the file stale and rebuild it with both variants."""
    out = tmp_path / "run"
    fit_module.fit(
        make_train_config(out, "ssdlite320_mobilenet_v3", ["distill.kd=[cls]", "max_steps=1"]), progress=False
    )
    assert read_key(out / SOFT_LABELS)["hflip"] == "false"
    assert SoftLabelCache.load(out / SOFT_LABELS).logits.shape[1] == 1

    from lightning_fabric import Fabric

    from cls2det.config import DistillConfig
    from cls2det.engine.run_caches import open_teacher_caches

    dataset = CocoDetection(load_split(demo_data, "train"))
    capsys.readouterr()
    soft_labels, _ = open_teacher_caches(
        Fabric(accelerator="cpu", devices=1), out, load_teacher(teacher_run), dataset, DistillConfig(kd=["cls"]),
        flips=True, workers=0, progress=False,
    )  # fmt: skip
    assert "soft_labels.safetensors was computed with" in capsys.readouterr().out
    assert read_key(out / SOFT_LABELS)["hflip"] == "true" and soft_labels.logits.shape[1] == 2
