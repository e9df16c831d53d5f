"""benchmarks/coco_synth.py: a valid COCO-shaped dataset with COCO's categories, crowd RLE, polygons, hard links."""

from __future__ import annotations

import json

from cls2det.data import check_dataset


def test_synth_is_valid_and_coco_shaped(coco_synth, synth_root):
    summary = check_dataset(synth_root)  # decodes every image and checks its size against the JSON
    assert summary["num_classes"] == 80
    assert summary["splits"]["train"]["images"] == 20 and summary["splits"]["val"]["images"] == 5
    coco = json.loads((synth_root / "annotations" / "train.json").read_text())
    ids = [c["id"] for c in coco["categories"]]
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90 and 12 not in ids and 83 not in ids  # COCO's gaps
    assert 4 <= len(coco["annotations"]) / 20 <= 11  # ~7.3 boxes per image
    polygons = [a for a in coco["annotations"] if not a["iscrowd"]]
    assert all(isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 40 for a in polygons)
    for image in coco["images"]:
        assert 360 <= image["width"] <= 640 and 360 <= image["height"] <= 640


def test_images_are_hard_links_and_crowd_is_rle(coco_synth, tmp_path):
    root = coco_synth.write_coco_synth(tmp_path, train=200, val=2, seed=1)
    coco = json.loads((root / "annotations" / "train.json").read_text())
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert crowd and all(set(a["segmentation"]) == {"counts", "size"} for a in crowd)
    for a in crowd:  # the RLE covers the whole image
        height, width = a["segmentation"]["size"]
        assert sum(a["segmentation"]["counts"]) == height * width
    files = sorted((root / "images" / "train2017").iterdir())
    assert len(files) == 200
    inodes = {f.stat().st_ino for f in files}
    assert len(inodes) <= len(coco_synth.IMAGE_SIZES)  # a handful of real JPEGs, linked
    again = coco_synth.write_coco_synth(tmp_path / "again", train=200, val=2, seed=1)
    assert (again / "annotations" / "train.json").read_text() == (root / "annotations" / "train.json").read_text()
