"""check_teacher_for_head: a softmax-only ("ce") teacher is refused for sigmoid students unless opted in."""

from __future__ import annotations

import json

import pytest

from cls2det.teacher import (
    TeacherError,
    build_teacher,
    check_teacher_for_head,
    load_teacher,
    save_teacher,
    teacher_loss,
)


def _saved(tmp_path, loss: str | None):
    teacher = build_teacher("test_resnet", 2, class_names=["a", "b"], input_size=16)
    if loss is not None:
        teacher.loss = loss
    run = save_teacher(teacher.eval(), tmp_path / str(loss), {"top1": 50.0})
    if loss is None:  # a run written before teacher.json recorded the loss
        meta = json.loads((run / "teacher.json").read_text())
        del meta["loss"]
        (run / "teacher.json").write_text(json.dumps(meta))
    return run


def test_ce_teacher_with_a_sigmoid_head_is_a_one_line_error_naming_the_fixes(tmp_path):
    teacher = load_teacher(_saved(tmp_path, "ce"))
    with pytest.raises(TeacherError) as info:
        check_teacher_for_head(teacher, "sigmoid")
    message = str(info.value)
    assert "\n" not in message and "'ce'" in message
    assert "--loss ce+bce" in message and "distill.allow_ce_teacher=true" in message
    check_teacher_for_head(teacher, "sigmoid", allow_ce_teacher=True)  # the explicit opt-in
    check_teacher_for_head(teacher, "softmax")  # softmax students distil a CE teacher's softmax as the paper does


@pytest.mark.parametrize(("loss", "head"), [("ce+bce", "sigmoid"), ("ce+bce", "softmax"), ("bce", "sigmoid")])
def test_teachers_with_sigmoid_logits_pass(tmp_path, loss, head):
    teacher = load_teacher(_saved(tmp_path, loss))
    assert teacher.loss == loss
    check_teacher_for_head(teacher, head)


def test_old_runs_without_the_key_count_as_ce(tmp_path):
    run = _saved(tmp_path, None)
    meta = json.loads((run / "teacher.json").read_text())
    assert "loss" not in meta and teacher_loss(meta) == "ce"
    assert load_teacher(run).loss == "ce"
    with pytest.raises(TeacherError, match="trained with loss 'ce'"):
        check_teacher_for_head(meta, "sigmoid")  # the metadata dict works as well as the teacher


def test_metadata_round_trip_of_the_loss(tmp_path):
    run = _saved(tmp_path, "ce+bce")
    assert json.loads((run / "teacher.json").read_text())["loss"] == "ce+bce"
    assert teacher_loss(load_teacher(run)) == "ce+bce"


def test_unknown_head_is_refused():
    with pytest.raises(TeacherError, match="head must be 'softmax' or 'sigmoid', got 'tanh'"):
        check_teacher_for_head({"loss": "ce+bce"}, "tanh")
