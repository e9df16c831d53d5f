"""cls2det.run_folder: what a run folder holds, what kind of run it is, and what --resume may change."""

from __future__ import annotations

import json

import pytest

from cls2det.run_folder import (
    ANY,
    UP,
    RunDirError,
    check_run_kind,
    prepare_run_dir,
    resume_changes,
    run_kind,
    short_list,
)


def test_kind_from_run_json_or_from_the_files_of_older_runs(tmp_path):
    assert run_kind(tmp_path / "nowhere") is None and run_kind(tmp_path) is None
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.yaml").write_text("epochs: 1\n")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "teacher.json").write_text("{}")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "run.json").write_text(json.dumps({"kind": "teacher"}))
    (tmp_path / "m" / "config.yaml").write_text("epochs: 1\n")  # a teacher run has a config.yaml too
    assert [run_kind(tmp_path / n) for n in "stm"] == ["student", "teacher", "teacher"]
    with pytest.raises(RunDirError, match=r"--teacher .*/s is a student run \(cls2det train\), not a teacher run"):
        check_run_kind(tmp_path / "s", "teacher", role="--teacher")
    with pytest.raises(RunDirError, match=r"holds a teacher run \(cls2det teacher\); cls2det train writes student"):
        prepare_run_dir(tmp_path / "t", resume=False, overwrite=True, kind="student")
    with pytest.raises(RunDirError, match=r"holds a student run \(cls2det train\); cls2det teacher writes teacher"):
        prepare_run_dir(tmp_path / "s", resume=False, overwrite=False, kind="teacher")


def test_an_unfinished_start_is_reused_by_a_plain_rerun_and_named_on_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.yaml", "classes.json", "metrics.csv"):  # what a run killed before its checkpoint leaves
        (out / name).write_text("x")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="stopped before its first checkpoint; run again without --resume"):
        prepare_run_dir(out, resume=True, overwrite=False)
    start = prepare_run_dir(out, resume=False, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and start.replaced is None


def test_a_failed_start_removes_what_it_wrote_and_nothing_else(tmp_path):
    new = prepare_run_dir(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "new" / "config.yaml").write_text("x")
    new.failed()
    assert not (tmp_path / "new").exists()  # no empty folder left behind

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    start = prepare_run_dir(mine, resume=False, overwrite=False)
    (mine / "metrics.csv").write_text("x")
    (mine / "tb").mkdir()
    start.failed()
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    kept = tmp_path / "kept"
    start = prepare_run_dir(kept, resume=False, overwrite=False)
    start.started()  # the inputs were valid: what it writes from now on stays, to show how far it got
    (kept / "metrics.csv").write_text("x")
    start.failed()
    assert (kept / "metrics.csv").is_file()
    prepare_run_dir(kept, resume=False, overwrite=False)  # an unfinished start: a plain rerun takes the folder
    assert not (kept / "metrics.csv").exists()


def test_overwrite_puts_the_old_run_back_when_the_new_one_fails_to_start(tmp_path):
    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    (out / "results.json").write_text('{"old": 1}')
    with pytest.raises(
        RunDirError,
        match="holds a finished run: train it longer with --resume and more epochs, or replace it with --overwrite",
    ):
        prepare_run_dir(out, resume=False, overwrite=False)
    start = prepare_run_dir(out, resume=False, overwrite=True)
    assert not (out / "results.json").exists()
    start.failed()
    assert (out / "results.json").read_text() == '{"old": 1}'
    start = prepare_run_dir(out, resume=False, overwrite=True)
    start.started(step=0)
    assert not start.out.with_name("run.replaced").exists()
    assert json.loads((out / "run.json").read_text())["kind"] == "student"
    assert json.loads((out / "history.jsonl").read_text().splitlines()[0])["event"] == "start"


def test_resume_changes_refuse_the_recipe_and_take_the_safe_keys(tmp_path):
    saved = {"epochs": 2, "max_steps": None, "workers": 0, "data": str(tmp_path / "d"), "student": {"image_size": 320}}
    safe = {"epochs": UP, "max_steps": UP, "workers": ANY}
    same = {**saved, "data": str(tmp_path / "x" / ".." / "d")}  # the same dataset spelled another way
    assert resume_changes(tmp_path, saved, same, safe, paths=("data",)) == {}
    more = {**saved, "epochs": 4, "workers": 2}
    assert resume_changes(tmp_path, saved, more, safe) == {"epochs": (2, 4), "workers": (0, 2)}
    with pytest.raises(RunDirError, match=r"was run with student.image_size=320; --resume cannot change it to 128"):
        resume_changes(tmp_path, saved, {**saved, "student": {"image_size": 128}}, safe)
    with pytest.raises(RunDirError, match=r"epochs=2; --resume cannot change it to 1 \(it may only grow\)"):
        resume_changes(tmp_path, saved, {**saved, "epochs": 1}, safe)
    with pytest.raises(RunDirError, match=r"max_steps=null; --resume cannot change it to 5"):
        resume_changes(tmp_path, saved, {**saved, "max_steps": 5}, safe)


def test_short_list():
    assert short_list(["cat", "bird"]) == "[cat, bird]"
    assert short_list([str(i) for i in range(80)]) == "[0, 1, 2, 3, ..., 79] (80 classes)"


def test_an_interrupted_run_is_named_as_such_with_both_ways_on(tmp_path):
    """Rerunning a run stopped at its checkpoint (no results yet) says to resume it, not that it "holds another run"."""
    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    (out / "config.yaml").write_text("epochs: 2\n")
    with pytest.raises(RunDirError) as caught:
        prepare_run_dir(out, resume=False, overwrite=False)
    assert str(caught.value) == (
        f"{out} holds an interrupted run (a 'last' checkpoint, no final results): continue it with --resume, "
        "or start it over with --overwrite"
    )
