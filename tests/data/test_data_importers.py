"""Pascal VOC and YOLO importers: round trips on tiny generated sets, and errors naming file and line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cls2det.data import CocoDetection, DatasetError, check_dataset, import_voc, import_yolo, load_split

# ------------------------------------------------------------------------------------------------------ VOC

# image id -> (width, height, objects (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based inclusive pixels)
VOC_IMAGES = {
    "000001": (48, 32, [("cat", 1, 1, 10, 12, 0), ("dog", 20, 5, 48, 32, 0)]),
    "000002": (40, 40, [("dog", 5, 6, 15, 16, 1)]),
    "000003": (36, 30, []),
}


def voc_xml(name: str, width: int, height: int, objects: list) -> str:
    body = "".join(
        f"<object><name>{cls}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>\n"
        for cls, x1, y1, x2, y2, difficult in objects
    )
    return (
        f"<annotation>\n<folder>VOC2007</folder>\n<filename>{name}.jpg</filename>\n"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n{body}</annotation>\n"
    )


@pytest.fixture
def voc_dir(tmp_path: Path, write_image) -> Path:
    root = tmp_path / "VOC2007"
    for k, (name, (width, height, objects)) in enumerate(VOC_IMAGES.items()):
        write_image(root / "JPEGImages" / f"{name}.jpg", width, height, seed=k, fmt="JPEG")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(name, width, height, objects))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000003\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000002\n")
    return root


def test_voc_round_trip(voc_dir, tmp_path):
    out = tmp_path / "coco"
    summary = import_voc(voc_dir, out)
    assert summary["class_names"] == ["cat", "dog"]  # the names in the XML files (was: Pascal's 20 always)
    assert summary["splits"]["train"]["images"] == 2
    train = load_split(out, "train")
    assert [im["file_name"] for im in train.images] == ["train/000001.jpg", "train/000003.jpg"]
    assert (train.images[0]["width"], train.images[0]["height"]) == (48, 32)
    # 1-based inclusive [xmin, ymin, xmax, ymax] -> 0-based xywh [xmin-1, ymin-1, xmax-xmin+1, ymax-ymin+1]
    anns = train.annotations[train.images[0]["id"]]
    assert [a["bbox"] for a in anns] == [[0.0, 0.0, 10.0, 12.0], [19.0, 4.0, 29.0, 28.0]]
    assert [train.class_names[train.cat_id_to_label[a["category_id"]]] for a in anns] == ["cat", "dog"]
    assert train.annotations[train.images[1]["id"]] == []  # image without objects
    val = load_split(out, "val")
    (difficult,) = val.annotations[val.images[0]["id"]]
    assert difficult["iscrowd"] == 1 and difficult["bbox"] == [4.0, 5.0, 11.0, 11.0]
    _, target = CocoDetection(val)[0]
    assert target["boxes"].shape == (0, 4)  # difficult objects never reach training targets
    image, target = CocoDetection(train)[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 10.0, 12.0], [19.0, 4.0, 48.0, 32.0]]))
    source = np.asarray(Image.open(voc_dir / "JPEGImages" / "000001.jpg"), np.float32) / 255
    torch.testing.assert_close(image, torch.from_numpy(source).permute(2, 0, 1))
    assert (out / "images" / "train" / "000001.jpg").read_bytes() == (
        voc_dir / "JPEGImages" / "000001.jpg"
    ).read_bytes()


def test_voc_custom_splits_and_classes(voc_dir, tmp_path):
    lists = tmp_path / "mine.txt"
    lists.write_text("000002\n")
    summary = import_voc(
        voc_dir, tmp_path / "c", splits={"train": "trainval", "val": str(lists)}, class_names=["cat", "dog"]
    )
    assert summary["class_names"] == ["cat", "dog"] and summary["splits"]["val"]["crowd"] == 1


def test_voc_unknown_class_of_a_given_list(voc_dir, tmp_path):
    (voc_dir / "Annotations" / "000001.xml").write_text(voc_xml("000001", 48, 32, [("cow!", 1, 1, 5, 5, 0)]))
    with pytest.raises(DatasetError, match=r"000001.xml: object 1: unknown class 'cow!' \(classes: cat, dog\)"):
        import_voc(voc_dir, tmp_path / "out", class_names=["cat", "dog"])
    with pytest.raises(DatasetError, match="image list not found: nope"):
        import_voc(voc_dir, tmp_path / "out", splits={"train": "nope"})


def test_voc_pascal_classes_on_request(voc_dir, tmp_path):
    from cls2det.data.importers import VOC_CLASSES

    assert import_voc(voc_dir, tmp_path / "p", class_names=VOC_CLASSES)["num_classes"] == 20


@pytest.fixture
def custom_voc(tmp_path: Path, write_image) -> Path:
    """A VOC export of a label tool: its own classes, train.txt / val.txt beside Annotations/ (no ImageSets)."""
    root = tmp_path / "export"
    images = {
        "img_a": (40, 30, [("widget", 2, 2, 12, 12, 0), ("bolt", 15, 3, 30, 20, 0)]),
        "img_b": (32, 32, [("nut", 4, 4, 20, 20, 0)]),
        "img_c": (36, 24, [("widget", 1, 1, 10, 10, 0)]),
    }
    for k, (name, (width, height, objects)) in enumerate(images.items()):
        write_image(root / "JPEGImages" / f"{name}.jpg", width, height, seed=k, fmt="JPEG")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(name, width, height, objects))
    (root / "train.txt").write_text("img_a\nimg_b\n")
    (root / "val.txt").write_text("img_c\n")
    return root


def test_voc_custom_export_classes_from_the_xml_files(custom_voc, tmp_path):
    summary = import_voc(custom_voc, tmp_path / "out")
    assert summary["class_names"] == ["bolt", "nut", "widget"]  # sorted; the 20 Pascal classes would refuse them
    assert {name: s["images"] for name, s in summary["splits"].items()} == {"train": 2, "val": 1}
    assert summary["splits"]["train"]["per_class"] == {"bolt": 1, "nut": 1, "widget": 1}
    val = load_split(tmp_path / "out", "val")
    assert val.class_names == ["bolt", "nut", "widget"]  # val's categories are train's, though val has one class


def test_voc_import_cli_splits_and_classes(custom_voc, tmp_path, capsys):
    from cls2det.cli import main

    (custom_voc / "ImageSets" / "Main").mkdir(parents=True)
    (custom_voc / "ImageSets" / "Main" / "mine.txt").write_text("img_a\nimg_c\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("widget\nbolt\nnut\nscrew\n")
    out = tmp_path / "cli"
    argv = ["data", "import", "voc", str(custom_voc), "--out", str(out), "--splits", "train=mine,val=val.txt"]
    assert main([*argv, "--classes", str(classes)]) == 0
    train = load_split(out, "train")
    assert train.class_names == ["widget", "bolt", "nut", "screw"] and len(train.images) == 2
    assert main([*argv, "--classes", "widget,bolt,nut"]) == 0
    assert load_split(out, "train").class_names == ["widget", "bolt", "nut"]
    capsys.readouterr()
    assert main([*argv, "--classes", "widget"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "img_a.xml: object 2: unknown class 'bolt' (classes: widget)" in line
    assert main([*argv, "--classes", str(tmp_path / "clases.txt")]) == 2  # a typo is not a class named so
    assert capsys.readouterr().err == f"error: --classes: file not found: {tmp_path / 'clases.txt'}\n"


def test_voc_without_known_lists_says_what_it_found(custom_voc, tmp_path, capsys):
    from cls2det.cli import main

    (custom_voc / "val.txt").rename(custom_voc / "test_list.txt")
    with pytest.raises(DatasetError, match=r"no image lists for the default splits .* found: test_list.txt, train.txt"):
        import_voc(custom_voc, tmp_path / "out")
    assert main(["data", "import", "voc", str(custom_voc), "--out", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "--splits train=FILE,val=FILE" in line
    # named explicitly, any list works
    summary = import_voc(custom_voc, tmp_path / "out", splits={"train": "train.txt", "val": "test_list.txt"})
    assert summary["splits"]["val"]["images"] == 1


XML_1 = "Annotations/000001.xml"
# (file to overwrite, its new text or None to delete it, fragments the error must contain)
VOC_ERRORS = {
    "malformed": (XML_1, "<annotation>\n<filename>x</filename>\n<size>", ["000001.xml:3:", "malformed XML"]),
    "not-a-number": (XML_1, voc_xml("000001", 48, 32, [("cat", 1, 1, "a", 5, 0)]), ["<bndbox/xmax> is not a num"]),
    "outside": (XML_1, voc_xml("000001", 48, 32, [("cat", 1, 1, 60, 5, 0)]), ["object 1", "leaves the 48x32"]),
    "missing-size": (XML_1, "<annotation><filename>a.jpg</filename></annotation>", ["missing <size/width>"]),
    "missing-xml": ("ImageSets/Main/trainval.txt", "000001\n\n000009\n", ["trainval.txt:3", "no annotation file"]),
    "missing-image": ("JPEGImages/000003.jpg", None, ["000003.xml", "image file not found"]),
    "missing-list": ("ImageSets/Main/test.txt", None, ["no image lists", "found: ImageSets/Main/trainval.txt"]),
    # a wrong <size> is caught by the final check_dataset, against the real image
    "wrong-size": ("Annotations/000003.xml", voc_xml("000003", 37, 30, []), ["image id 2", "JSON size 37x30"]),
}


@pytest.mark.parametrize("case", VOC_ERRORS.values(), ids=VOC_ERRORS.keys())
def test_voc_errors_name_file(voc_dir, tmp_path, case):
    path, text, fragments = case
    if text is None:
        (voc_dir / path).unlink()
    else:
        (voc_dir / path).write_text(text)
    with pytest.raises(DatasetError) as info:
        import_voc(voc_dir, tmp_path / "out")
    for fragment in fragments:
        assert fragment in str(info.value)


# ----------------------------------------------------------------------------------------------------- YOLO


@pytest.fixture
def yolo_dir(tmp_path: Path, write_image) -> Path:
    """train: a.png 64x48 with two boxes, b.jpg 32x32 without a label file; val: c.png 50x40 with one box."""
    root = tmp_path / "yolo"
    write_image(root / "images" / "train" / "a.png", 64, 48, seed=1)
    write_image(root / "images" / "train" / "b.jpg", 32, 32, seed=2, fmt="JPEG")
    write_image(root / "images" / "val" / "c.png", 50, 40, seed=3)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    # box 1: cx 0.25, cy 0.5, w 0.25, h 0.5 of 64x48 -> x 8..24, y 12..36 (xywh [8, 12, 16, 24])
    (root / "labels" / "train" / "a.txt").write_text("0 0.25 0.5 0.25 0.5\n\n2 0.875 0.125 0.25 0.25\n")
    (root / "labels" / "val" / "c.txt").write_text("1 0.5 0.5 0.2 0.5\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: car, 1: bus, 2: van}\n")
    return root


def test_yolo_round_trip(yolo_dir, tmp_path):
    summary = import_yolo(yolo_dir, tmp_path / "coco")
    assert summary["class_names"] == ["car", "bus", "van"]
    train = load_split(tmp_path / "coco", "train")
    assert [im["file_name"] for im in train.images] == ["train/a.png", "train/b.jpg"]
    anns = train.annotations[train.images[0]["id"]]
    # box 2: cx 56, cy 6, w 16, h 12 -> [48, 0, 16, 12]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
    torch.testing.assert_close(boxes, torch.tensor([[8, 12, 16, 24], [48, 0, 16, 12]], dtype=torch.float64))
    assert [a["category_id"] for a in anns] == [1, 3]
    assert train.annotations[train.images[1]["id"]] == []  # no label file: an image without objects
    val = load_split(tmp_path / "coco", "val")
    assert val.annotations[val.images[0]["id"]][0]["bbox"] == pytest.approx([20, 10, 10, 20])
    assert val.annotations[val.images[0]["id"]][0]["category_id"] == 2


def test_yolo_names_from_classes_txt_or_argument(yolo_dir, tmp_path):
    (yolo_dir / "data.yaml").unlink()
    (yolo_dir / "classes.txt").write_text("a\nb\nc\n")
    assert import_yolo(yolo_dir, tmp_path / "one")["class_names"] == ["a", "b", "c"]
    assert import_yolo(yolo_dir, tmp_path / "two", names=["x", "y", "z"])["class_names"] == ["x", "y", "z"]
    (yolo_dir / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="no class names"):
        import_yolo(yolo_dir, tmp_path / "three")


@pytest.mark.parametrize(
    "label,fragments",
    [
        ("0 0.5 0.5 0.2\n", ["a.txt:1", "expected 5 values"]),
        ("0 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.1 0.1 0.2 0.2 0.3\n", ["a.txt:2", "polygons"]),
        ("5 0.5 0.5 0.2 0.2\n", ["a.txt:1", "class 5 out of range 0..2"]),
        ("0 0.5 x 0.2 0.2\n", ["a.txt:1", "not numbers"]),
        ("0 0.5 0.5 0 0.2\n", ["a.txt:1", "non-positive"]),
        ("0 0.95 0.5 0.2 0.2\n", ["a.txt:1", "leaves the 64x48 image"]),
    ],
    ids=["short", "polygon", "class-range", "nan", "zero-width", "outside"],
)
def test_yolo_label_errors_name_file_and_line(yolo_dir, tmp_path, label, fragments):
    (yolo_dir / "labels" / "train" / "a.txt").write_text(label)
    with pytest.raises(DatasetError) as info:
        import_yolo(yolo_dir, tmp_path / "out")
    for fragment in fragments:
        assert fragment in str(info.value)


def test_yolo_structure_errors(yolo_dir, tmp_path):
    (yolo_dir / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="orphan.txt: no image"):
        import_yolo(yolo_dir, tmp_path / "a")
    (yolo_dir / "labels" / "train" / "orphan.txt").unlink()
    (yolo_dir / "images" / "train" / "b.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="b.jpg: unreadable image"):
        import_yolo(yolo_dir, tmp_path / "b")
    with pytest.raises(DatasetError, match="split 'test' missing"):
        import_yolo(yolo_dir, tmp_path / "c", splits=("test",))


# ------------------------------------------------------------------------------------------ layouts, all or nothing


@pytest.fixture
def roboflow_dir(yolo_dir: Path, tmp_path: Path) -> Path:
    """``yolo_dir`` in the layout Roboflow and Ultralytics export: {train,valid}/{images,labels} and a data.yaml whose
    paths start with ``../``."""
    root = tmp_path / "rf"
    for source, split in (("train", "train"), ("val", "valid")):
        for kind in ("images", "labels"):
            shutil.copytree(yolo_dir / kind / source, root / split / kind)
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\nnc: 3\nnames: ['car', 'bus', 'van']\n"
    )
    return root


def test_yolo_reads_the_roboflow_ultralytics_export_layout(roboflow_dir, yolo_dir, tmp_path):
    """Was: "no rf/images/train"."""
    summary = import_yolo(roboflow_dir, tmp_path / "coco")
    assert summary["class_names"] == ["car", "bus", "van"]
    reference = import_yolo(yolo_dir, tmp_path / "ref")
    assert summary["splits"] == reference["splits"]
    for split in ("train", "val"):
        assert (
            load_split(tmp_path / "coco", split).coco["annotations"]
            == load_split(tmp_path / "ref", split).coco["annotations"]
        )


def test_yolo_without_a_yaml_finds_split_folders_and_valid(roboflow_dir, tmp_path):
    (roboflow_dir / "data.yaml").unlink()
    summary = import_yolo(roboflow_dir, tmp_path / "coco", names=["car", "bus", "van"])
    assert summary["splits"]["val"]["images"] == 1 and summary["splits"]["train"]["annotations"] == 2


def test_split_names_cls2det_would_not_read_are_refused(yolo_dir, voc_dir, tmp_path, capsys):
    """Was: `--splits training,val` reported success and the result failed `data check`."""
    from cls2det.cli import main

    expected = (
        "error: --splits: output split 'training' is not one of train, val, test (cls2det train reads train and "
        "val); map the source's split onto one, e.g. train=training\n"
    )
    argv = ["data", "import", "yolo", str(yolo_dir), "--out", str(tmp_path / "y"), "--splits", "training,val"]
    assert main(argv) == 2 and capsys.readouterr().err == expected
    argv = ["data", "import", "voc", str(voc_dir), "--out", str(tmp_path / "v"), "--splits", "training=trainval"]
    assert main(argv) == 2 and capsys.readouterr().err == expected
    assert not (tmp_path / "y").exists() and not (tmp_path / "v").exists()
    (yolo_dir / "images" / "training").mkdir()
    (yolo_dir / "images" / "train").rename(yolo_dir / "images" / "training")
    (yolo_dir / "labels" / "train").rename(yolo_dir / "labels" / "training")
    (yolo_dir / "data.yaml").write_text("names: [car, bus, van]\n")
    argv[2:6] = ["yolo", str(yolo_dir), "--out", str(tmp_path / "y")]
    assert main([*argv[:6], "--splits", "train=training,val"]) == 0
    assert check_dataset(tmp_path / "y")["splits"]["train"]["images"] == 2


def test_a_refused_import_leaves_nothing_and_keeps_an_earlier_one(voc_dir, tmp_path):
    """Was: a VOC import refused at its last image left a partial images/train behind."""
    out = tmp_path / "out"
    import_voc(voc_dir, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    (voc_dir / "JPEGImages" / "000003.jpg").unlink()  # found missing after the first image was placed
    with pytest.raises(DatasetError, match="image file not found"):
        import_voc(voc_dir, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC2007", "out"]  # no new/, no hidden partial folder
    with pytest.raises(DatasetError, match="image file not found"):
        import_voc(voc_dir, out)  # over the earlier import: it stays whole
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="holds other files than a dataset's annotations/ and images/"):
        import_voc(voc_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
