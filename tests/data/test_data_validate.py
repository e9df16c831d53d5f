"""Every bad input gives a one-line DatasetError naming the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cls2det.data import DatasetError, check_dataset, load_split
from cls2det.data.validate import validate_coco


def raises(call, *fragments: str) -> str:
    """Run ``call``, expect DatasetError whose one-line message contains every fragment; return the message."""
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _ann(coco: dict, ann_id: int) -> dict:
    return next(a for a in coco["annotations"] if a["id"] == ann_id)


# (name, edit of base_coco, fragments the message must contain)
JSON_CASES = [
    ("missing-top-key", lambda c: c.pop("annotations"), ["train.json", "missing key 'annotations'"]),
    ("not-a-list", lambda c: c.update(images={}), ["'images' must be a list"]),
    ("image-missing-key", lambda c: c["images"][1].pop("file_name"), ["image id 3", "missing key 'file_name'"]),
    ("ann-missing-key", lambda c: _ann(c, 12).pop("bbox"), ["annotation id 12", "missing key 'bbox'"]),
    ("cat-missing-key", lambda c: c["categories"][0].pop("name"), ["category id 90", "missing key 'name'"]),
    ("dup-image", lambda c: c["images"].append(dict(c["images"][0])), ["duplicate image id 7"]),
    ("dup-ann", lambda c: c["annotations"].append(dict(_ann(c, 11))), ["duplicate annotation id 11"]),
    ("dup-cat", lambda c: c["categories"].append({"id": 5, "name": "x"}), ["duplicate category id 5"]),
    ("unknown-image", lambda c: _ann(c, 12).update(image_id=99), ["annotation id 12", "unknown image id 99"]),
    ("unknown-cat", lambda c: _ann(c, 12).update(category_id=4), ["annotation id 12", "unknown category id 4"]),
    ("zero-width", lambda c: _ann(c, 14).update(bbox=[4, 4, 0, 10]), ["annotation id 14", "non-positive"]),
    ("neg-height", lambda c: _ann(c, 11).update(bbox=[2, 3, 5, -1]), ["annotation id 11", "non-positive"]),
    ("bad-bbox", lambda c: _ann(c, 11).update(bbox=[2, 3, 5]), ["annotation id 11", "bbox must be 4"]),
    ("nan-bbox", lambda c: _ann(c, 11).update(bbox=[2, 3, 5, "x"]), ["annotation id 11", "bbox must be 4"]),
    # 40x30 image: right edge 35 + 6.5 = 41.5 > 40 + 1; top -1.5 < -1
    ("outside-right", lambda c: _ann(c, 12).update(bbox=[35, 5, 6.5, 5]), ["annotation id 12", "leaves image id 7"]),
    ("outside-top", lambda c: _ann(c, 11).update(bbox=[2, -1.5, 5, 5]), ["annotation id 11", "clip_tolerance=1"]),
    ("bad-size", lambda c: c["images"][0].update(width=0), ["image id 7", "invalid width/height"]),
    ("bad-crowd", lambda c: _ann(c, 11).update(iscrowd=2), ["annotation id 11", "iscrowd"]),
    ("no-categories", lambda c: c.update(categories=[]), ["'categories' is empty"]),
]


@pytest.mark.parametrize("edit,fragments", [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_bad_json_content_names_culprit(make_dataset, coco, edit, fragments):
    edit(coco)
    root = make_dataset(coco)
    raises(lambda: load_split(root, "train"), *fragments)
    raises(lambda: check_dataset(root), *fragments)  # check_dataset runs the same JSON checks


def test_malformed_json_names_file_line_and_column(make_dataset):
    text = '{"images": [],\n "annotations": [],\n "categories": [{"id": 1 "name": "a"}]\n}'
    root = make_dataset(text)
    raises(lambda: load_split(root, "val"), "val.json:3:", "malformed JSON")


def test_top_level_not_an_object(make_dataset):
    raises(lambda: load_split(make_dataset("[1, 2]")), "top level must be a JSON object")


def test_missing_split_and_missing_root(make_dataset, tmp_path):
    root = make_dataset(splits=("train",))
    assert load_split(root, "train").num_classes == 3
    raises(lambda: load_split(root, "val"), "split 'val' missing", "val.json")
    raises(lambda: check_dataset(root), "split 'val' missing")
    raises(lambda: load_split(tmp_path / "nope"), "nope", "not found")


def test_missing_image_file_only_checked_by_check_dataset(make_dataset):
    root = make_dataset()
    (root / "images" / "sub" / "b.png").unlink()
    assert len(load_split(root, "train").images) == 3  # load_split never opens image files
    raises(lambda: check_dataset(root), "image id 3", "sub/b.png", "not found")
    raises(lambda: check_dataset(root, check_images=False), "image id 3", "not found")  # existence still checked


def test_truncated_image_file(make_dataset):
    root = make_dataset()
    path = root / "images" / "a.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raises(lambda: check_dataset(root), "image id 7", "unreadable image file", "a.png")
    check_dataset(root, check_images=False)  # only decoding finds it


def test_garbage_image_file(make_dataset):
    root = make_dataset()
    (root / "images" / "empty.png").write_bytes(b"not an image at all")
    raises(lambda: check_dataset(root), "image id 9", "unreadable image file")


def test_json_size_differs_from_real_image(make_dataset, write_image):
    root = make_dataset()
    write_image(root / "images" / "a.png", 41, 30)
    raises(lambda: check_dataset(root), "image id 7", "JSON size 40x30", "real image size 41x30")


def test_categories_must_match_between_splits(make_dataset, coco):
    root = make_dataset(splits=("train",))
    coco["categories"][0]["name"] = "horse"
    (root / "annotations" / "val.json").write_text(json.dumps(coco))
    raises(lambda: check_dataset(root), "val.json", "categories differ")


def test_data_yaml_errors(make_dataset):
    root = make_dataset()
    bad = root / "bad.yaml"
    bad.write_text("train:\n  images: images\n  annotations: [oops\n")
    raises(lambda: load_split(bad), "bad.yaml:", "malformed YAML")
    partial = root / "partial.yaml"
    partial.write_text("train: {images: images, annotations: annotations/train.json}\n")
    assert load_split(partial, "train").num_classes == 3
    raises(lambda: load_split(partial, "val"), "partial.yaml", "split 'val' missing")
    no_images = root / "no_images.yaml"
    no_images.write_text("train: {annotations: annotations/train.json}\n")
    raises(lambda: load_split(no_images), "no_images.yaml", "'images' and 'annotations'")
    raises(lambda: load_split(root / "absent.yaml"), "absent.yaml", "not found")


def test_valid_dataset_summary(make_dataset):
    summary = check_dataset(make_dataset())
    train = summary["splits"]["train"]
    assert summary["class_names"] == ["cat", "dog", "zebra"]
    assert train["images"] == 3 and train["annotations"] == 4 and train["crowd"] == 1
    assert train["empty_images"] == 1  # image 9 has no annotation at all
    assert train["per_class"] == {"cat": 1, "dog": 1, "zebra": 1}  # crowd not counted per class
    assert train["sizes"] == {"small": 3, "medium": 0, "large": 0}
    assert set(summary["splits"]) == {"train", "val"}


def test_summary_counts_image_with_only_crowd_as_empty(make_dataset, coco):
    coco["annotations"] = [a for a in coco["annotations"] if a["id"] == 13]
    # (a train split like that is refused: nothing to train on; see test_train_split_without_boxes_is_refused)
    assert check_dataset(make_dataset(coco), splits=("val",))["splits"]["val"]["empty_images"] == 3


def test_images_dir_missing(make_dataset):
    root: Path = make_dataset()
    (root / "images").rename(root / "pictures")
    raises(lambda: load_split(root), "images directory not found")


def test_validate_coco_copies_unless_inplace(coco):
    coco["annotations"][0]["bbox"] = [-0.5, 3, 10, 8]
    fixed, clipped = validate_coco(coco, source="mem.json")
    assert clipped == 1 and fixed["annotations"][0]["bbox"] == [0.0, 3.0, 9.5, 8.0]
    assert coco["annotations"][0]["bbox"] == [-0.5, 3, 10, 8]  # input untouched
    same, _ = validate_coco(coco, source="mem.json", inplace=True)
    assert same is coco and coco["annotations"][0]["bbox"] == [0.0, 3.0, 9.5, 8.0]


# ----------------------------------------------------------------------------------------------- every problem


def test_check_dataset_collects_every_problem(make_dataset, coco):
    _ann(coco, 11).update(bbox=[2, 3, 5])
    _ann(coco, 12).update(category_id=4)
    coco["images"][1]["width"] = 0  # image 3: its annotation 14 is not reported again
    coco["categories"].append({"id": 6, "name": "cat"})
    root = make_dataset(coco)
    (root / "images" / "empty.png").unlink()
    with pytest.raises(DatasetError) as info:
        check_dataset(root, splits=("train",))
    source = root / "annotations" / "train.json"
    assert info.value.problems == [
        f"{source}: image id 3 has invalid width/height 0/20",
        f"{source}: category ids 5 and 6 share the name 'cat' (their classes would merge in per-class reports)",
        f"{source}: annotation id 11 bbox must be 4 finite numbers [x, y, w, h], got [2, 3, 5]",
        f"{source}: annotation id 12 points to unknown category id 4",
        f"{source}: image id 9 (empty.png): image file not found: {root / 'images' / 'empty.png'}",
    ]  # the image files are checked beside the JSON's problems (the broken image 3 is not reported again)
    assert str(info.value) == f"{info.value.problems[0]} (and 4 more problems)"
    # load_split raises the same collected list (str: the first problem and the count, one line)
    raises(lambda: load_split(root, "train"), "image id 3 has invalid width/height", "(and 3 more problems)")


def test_problems_of_every_split_and_image_file(make_dataset, coco):
    root = make_dataset(coco)
    (root / "images" / "empty.png").unlink()
    val = json.loads((root / "annotations" / "val.json").read_text())
    val["categories"][0]["name"] = "horse"
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    with pytest.raises(DatasetError) as info:
        check_dataset(root)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert "train.json: image id 9 (empty.png): image file not found" in problems[0]
    assert "val.json: image id 9 (empty.png): image file not found" in problems[1]
    assert "val.json: categories differ from those of split 'train'" in problems[2]


def test_a_missing_root_is_one_problem_not_one_per_split(tmp_path):
    with pytest.raises(DatasetError) as info:
        check_dataset(tmp_path / "nowhere")
    message = "dataset directory not found (expected a directory or a data YAML)"
    assert info.value.problems == [f"{tmp_path / 'nowhere'}: {message}"]  # was: once for train, once for val


def test_duplicate_category_names_are_refused(make_dataset, coco):
    coco["categories"][2]["name"] = "zebra"  # ids 90 and 17 would both print as "zebra"
    raises(lambda: load_split(make_dataset(coco)), "category ids 90 and 17 share the name 'zebra'")


def test_train_split_without_boxes_is_refused(make_dataset, coco):
    coco["annotations"] = []
    root = make_dataset(coco)
    assert load_split(root, "train").num_classes == 3  # loading alone does not judge
    raises(lambda: check_dataset(root), "train.json: split 'train' has 3 images but no (non-crowd) annotations")
    assert check_dataset(root, splits=("val",))["splits"]["val"]["annotations"] == 0  # a val split may be empty


def test_data_check_cli_prints_every_problem_then_a_count(make_dataset, coco, capsys):
    from cls2det.cli import MAX_PROBLEMS, main

    for k in range(MAX_PROBLEMS + 5):
        coco["annotations"].append({"id": 100 + k, "image_id": 7, "category_id": 90, "bbox": [1, 1, -1, 1]})
    root = make_dataset(coco)
    assert main(["data", "check", str(root), "--splits", "train", "--no-images"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == MAX_PROBLEMS + 1
    assert all(line.startswith("error: ") and "non-positive box width/height" in line for line in lines[:-1])
    assert "annotation id 100 " in lines[0] and f"annotation id {100 + MAX_PROBLEMS - 1} " in lines[-2]
    assert lines[-1] == "error: ... and 5 more problems"


def test_check_lists_box_errors_and_missing_images_together(make_dataset, coco):
    """Bad boxes and missing image files in one pass (before, the missing files appeared once the JSON was clean)."""
    coco["annotations"][0]["bbox"] = [2, 3, -10, 8]  # a negative width
    coco["annotations"][1]["bbox"] = [20, 5, 0, 20]  # a zero width
    root = make_dataset(coco, splits=("train",))
    (root / "images" / "sub" / "b.png").unlink()
    (root / "images" / "empty.png").unlink()
    with pytest.raises(DatasetError) as caught:
        check_dataset(root, splits=("train",))
    problems = caught.value.problems
    assert sum("annotation id 11" in p for p in problems) == 1 and sum("annotation id 12" in p for p in problems) == 1
    missing = [p for p in problems if "image file not found" in p]
    assert len(missing) == 2 and "sub/b.png" in missing[0] and "empty.png" in missing[1]
