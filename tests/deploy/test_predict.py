"""``cls2det predict``: sources, the COCO-results JSON and drawings of a tiny trained run, broken files skipped,
the ONNX export giving the same detections as the PyTorch student, and one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cls2det.cli import main
from cls2det.data import CocoDetection, load_split
from cls2det.deploy.export import export_student
from cls2det.deploy.predict import (
    IMAGES,
    PREDICTIONS,
    PredictError,
    class_colour,
    draw_detections,
    find_images,
    predict_images,
    read_rgb,
)


@pytest.fixture(scope="module")
def run(make_train_config, tiny_overrides, demo_data, tmp_path_factory):
    """A Faster R-CNN run trained 2 steps, whose detector keeps 20 detections per image whatever their score.

    Its BatchNorm statistics are then set from one batch (as in test_export): after 2 steps they are still near
    mean 0 / var 1, the untrained MobileNetV3's activations vanish, and every detection would get the same class
    and score (~1/11), nothing worth comparing between ONNX and torch. Calibrated: 10 classes, distinct scores.
    """
    from cls2det.engine.checkpoint import load_state, save_checkpoint
    from cls2det.engine.fit import fit
    from cls2det.engine.loading import load_student

    options = next(o for o in tiny_overrides("fasterrcnn_mobilenet_v3") if o.startswith("student.options="))
    options = options[:-1] + ", box_score_thresh: 0.0, box_detections_per_img: 20}"
    out = tmp_path_factory.mktemp("predict") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(make_train_config(out, overrides=["distill.kd=[]", "max_steps=2", options]), progress=False)
        adapter, _ = load_student(out, checkpoint="last")
        det = adapter.detector
        for m in det.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0
        split = load_split(demo_data, "train")
        images = [CocoDetection(split)[i][0] for i in range(4)]
        det.backbone.train()
        with torch.no_grad():
            det.backbone(det.transform(images)[0].tensors)
        save_checkpoint(out / "last", adapter.eval().state_dict(), load_state(out / "last"))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def photos(demo_data, tmp_path_factory):
    """Four val images (two in a subfolder), a truncated JPEG and a text file named .jpg."""
    split = load_split(demo_data, "val")
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    for i, image in enumerate(split.images[:4]):
        shutil.copy(split.image_path(image), folder / ("sub" if i >= 2 else "") / f"img{i}.png")
    Image.open(folder / "img0.png").convert("RGB").save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "notes.jpg").write_text("not an image")
    return folder


def test_find_images_expands_folders_globs_and_files(tmp_path):
    for name in ("a/x.jpg", "a/b/y.PNG", "a/readme.txt", "c/x.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    files = find_images([tmp_path / "a", str(tmp_path / "c" / "*.jpg"), tmp_path / "a" / "x.jpg"])
    assert [f.path for f in files] == [tmp_path / "a/b/y.PNG", tmp_path / "a/x.jpg", tmp_path / "c/x.jpg"]
    assert [f.name for f in files] == ["b/y.PNG", "x.jpg", "x_1.jpg"]  # the same name twice made unique
    with pytest.raises(PredictError, match="no such file or folder"):
        find_images([tmp_path / "missing"])
    with pytest.raises(PredictError, match="no images found"):
        find_images([str(tmp_path / "*.gif")])


def test_predict_cli_writes_coco_results_and_drawings(run, photos, demo_data, run_cli, tmp_path):
    out = tmp_path / "out"
    flags = ["--save-images", "--json-threshold", "0", "--score-threshold", "0.1", "--no-progress"]
    done = run_cli("predict", run, photos, "--out", out, *flags)
    assert done.returncode == 0, done.stderr
    # the two broken files are named on stderr and counted, the run goes on
    assert "truncated.jpg" in done.stderr and "notes.jpg" in done.stderr
    assert "4 images" in done.stdout and "2 skipped" in done.stdout
    records = json.loads((out / PREDICTIONS).read_text())
    meta = json.loads((out / IMAGES).read_text())
    assert len(meta["images"]) == 4 and len(meta["skipped"]) == 2 and meta["model"]["checkpoint"] == "last"
    split = load_split(demo_data, "val")
    assert len(records) == 4 * 20  # box_detections_per_img, json threshold 0
    sizes = {im["id"]: (im["width"], im["height"]) for im in meta["images"]}
    for r in records:
        assert set(r) == {"image_id", "file_name", "category_id", "category_name", "bbox", "score"}
        label = split.label_to_cat_id.index(r["category_id"])  # the dataset's own ids
        assert r["category_name"] == split.class_names[label]
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
    # drawings: the same size as the originals, under the names relative to the folder, and boxes were drawn
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert names == ["img0.png", "img1.png", "sub/img2.png", "sub/img3.png"]
    changed = []
    for name in names:
        original = np.asarray(Image.open(photos / name).convert("RGB"))
        drawn = np.asarray(Image.open(out / name))
        assert original.shape == drawn.shape
        top = max(r["score"] for r in records if r["file_name"].endswith(name))
        assert (original != drawn).any() == (top >= 0.1), name  # drawn above --score-threshold only
        changed.append(top >= 0.1)
    assert any(changed)
    assert len({r["category_id"] for r in records}) > 1  # not a degenerate net: the JSON maps several classes


def test_draw_detections_draws_above_the_threshold_in_class_colours():
    image = Image.new("RGB", (200, 160), (128, 128, 128))
    det = {
        "boxes": torch.tensor([[10.0, 40, 90, 150], [100, 20, 190, 100], [20, 20, 30, 30]]),
        "scores": torch.tensor([0.9, 0.5, 0.1]),
        "labels": torch.tensor([3, 7, 1]),
    }
    draw_detections(image, det, [f"c{i}" for i in range(10)], threshold=0.3)
    pixels = np.asarray(image)
    assert tuple(pixels[100, 10]) == class_colour(3) and tuple(pixels[60, 190]) == class_colour(7)  # box edges
    assert class_colour(3) != class_colour(7)
    assert (pixels[26:30, 26:30] == 128).all()  # the 0.1 box is below the threshold: not drawn
    assert tuple(pixels[36, 10]) == class_colour(3)  # its label's background, above the box


def test_checkpoint_defaults_to_best_when_the_run_has_one(run, tmp_path):
    from cls2det.deploy.predict import torch_model

    assert not (run / "best").exists() and torch_model(run, None, "cpu")[2]["checkpoint"] == "last"
    copy = shutil.copytree(run, tmp_path / "run")
    shutil.copytree(copy / "last", copy / "best")
    assert torch_model(copy, None, "cpu")[2]["checkpoint"] == "best"
    assert torch_model(copy, "last", "cpu")[2]["checkpoint"] == "last"
    shutil.rmtree(copy / "last")
    with pytest.raises(PredictError, match="has no 'last' checkpoint"):
        torch_model(copy, "last", "cpu")


@pytest.mark.slow
def test_onnx_export_gives_the_torch_detections(run, photos, tmp_path):
    onnx_file = export_student(run, fmt="onnx", checkpoint="last")
    sources = [photos / "img0.png", photos / "sub"]
    common = {"json_threshold": 0.0, "progress": False}
    torch_summary = predict_images(sources, tmp_path / "torch", run=run, checkpoint="last", **common)
    onnx_summary = predict_images(sources, tmp_path / "onnx", onnx=onnx_file, run=run, **common)
    assert torch_summary["images"] == onnx_summary["images"] == 3
    assert "onnx" in onnx_summary["model"] and onnx_summary["model"]["onnx"] == str(onnx_file)
    by_torch = json.loads((tmp_path / "torch" / PREDICTIONS).read_text())
    by_onnx = json.loads((tmp_path / "onnx" / PREDICTIONS).read_text())
    assert len(by_torch) == len(by_onnx) == 3 * 20
    assert len({t["category_id"] for t in by_torch}) > 1 and len({t["score"] for t in by_torch}) > 20  # not degenerate
    free = list(range(len(by_onnx)))
    for t in by_torch:  # pair one-to-one: an untrained net can tie scores, so rows are not matched by position
        match = [
            j
            for j in free
            if by_onnx[j]["image_id"] == t["image_id"]
            and by_onnx[j]["category_id"] == t["category_id"]
            and abs(by_onnx[j]["score"] - t["score"]) <= 1e-4
            and np.allclose(by_onnx[j]["bbox"], t["bbox"], atol=0.02)
        ]
        assert match, f"no ONNX detection matches {t}"
        free.remove(match[0])


def test_predict_errors_are_one_line(run, photos, tmp_path, capsys, monkeypatch):
    def error(*argv) -> str:
        assert main(["predict", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    assert "no such run folder" in error(tmp_path / "nope", photos, "--out", tmp_path / "o")
    assert "is not a training run" in error(photos, photos, "--out", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    assert "no images found" in error(run, tmp_path / "empty", "--out", tmp_path / "o")
    assert "no such file or folder" in error(run, tmp_path / "nothing.jpg", "--out", tmp_path / "o")
    assert "at least one image" in error(run, "--out", tmp_path / "o")
    assert "overwrite the input image" in error(run, photos, "--out", photos, "--save-images")
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # as if not installed
    assert "needs onnxruntime" in error(photos, "--onnx", tmp_path / "student.onnx", "--out", tmp_path / "o")


def test_read_rgb_turns_a_photo_upright_by_its_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; a red top-left corner
    pixels[:5, :5] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: the camera was turned, show it rotated 90 degrees clockwise
    image.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    image.save(tmp_path / "plain.png")
    upright = np.asarray(read_rgb(tmp_path / "turned.jpg"))
    assert upright.shape == (40, 20, 3)  # 20 wide, 40 high, as a photo viewer shows it
    assert upright[:4, -4:, 0].mean() > 200 and upright[:4, :4, 0].mean() < 50  # the red corner is now top-right
    assert np.asarray(read_rgb(tmp_path / "plain.png")).shape == (20, 40, 3)  # no EXIF: as stored


def test_predict_on_a_teacher_run_says_so_as_eval_and_export_do(run, teacher_run, photos, tmp_path, capsys):
    lines = []
    for argv in (["predict", teacher_run, photos, "--out", tmp_path / "o"], ["export", teacher_run]):
        assert main([*map(str, argv)]) == 2
        lines.append(capsys.readouterr().err.strip())
    expected = (
        f"error: run {teacher_run} is a teacher run (cls2det teacher), not a student run (cls2det train): "
        "pass a student run"
    )
    assert lines == [expected, expected]


def test_an_onnx_export_carries_its_own_classes(run, photos, tmp_path, capsys):
    """The ONNX file holds its metadata: a sidecar of another model beside it cannot mislabel its detections."""
    from cls2det.deploy.export import read_onnx_metadata

    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "X")]) == 0, capsys.readouterr()
    model = tmp_path / "X" / "student.onnx"  # `--out X`: a folder, not an extensionless model file
    classes = json.loads((run / "classes.json").read_text())
    meta = read_onnx_metadata(model)
    assert meta is not None and meta["detector"] == "fasterrcnn_mobilenet_v3"
    assert meta["class_names"] == classes["class_names"] and meta["exports"]["onnx"]["file"] == "student.onnx"
    # another model's export overwrote the sidecar (another detector, other class names, no label offset)
    other = {**meta, "detector": "ssdlite320_mobilenet_v3", "class_names": [f"c{i}" for i in range(10)]}
    (tmp_path / "X" / "student.json").write_text(json.dumps({**other, "label_offset": 0}))
    summary = predict_images([photos / "img0.png"], tmp_path / "p", onnx=model, progress=False)
    assert summary["model"]["detector"] == "fasterrcnn_mobilenet_v3"
    names = {r["category_name"] for r in json.loads((tmp_path / "p" / PREDICTIONS).read_text())}
    assert names and names <= set(classes["class_names"])


def test_an_onnx_file_without_metadata_takes_only_its_own_sidecar(run, photos, tmp_path):
    import onnx

    from cls2det.deploy.export import METADATA_KEY

    export_student(run, fmt="onnx", out=tmp_path / "model.onnx")
    assert (tmp_path / "model.json").is_file()  # the sidecar is named after the model
    stripped = onnx.load(str(tmp_path / "model.onnx"))  # as exported before the metadata was embedded
    kept = [p for p in stripped.metadata_props if p.key != METADATA_KEY]
    del stripped.metadata_props[:]
    stripped.metadata_props.extend(kept)
    onnx.save(stripped, str(tmp_path / "old.onnx"))
    shutil.copy(tmp_path / "model.json", tmp_path / "old.json")  # a sidecar that describes model.onnx
    with pytest.raises(PredictError) as caught:
        predict_images([photos / "img0.png"], tmp_path / "p", onnx=tmp_path / "old.onnx", progress=False)
    assert str(caught.value) == (
        f"{tmp_path / 'old.onnx'} holds no cls2det metadata and {tmp_path / 'old.json'} describes model.onnx, not "
        "old.onnx: export it again (`cls2det export RUN --format onnx`)"
    )
