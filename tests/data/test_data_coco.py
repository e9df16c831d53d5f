"""Loading COCO-format splits, the category mapping, crowd handling, clipping and the detection dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cls2det.data import CocoDetection, DatasetError, collate, load_split


def test_load_split_orders_and_maps_non_contiguous_category_ids(make_dataset):
    split = load_split(make_dataset(), "train")
    assert [im["id"] for im in split.images] == [3, 7, 9]
    assert split.label_to_cat_id == [5, 17, 90]  # labels follow increasing category id
    assert split.cat_id_to_label == {5: 0, 17: 1, 90: 2}
    assert split.class_names == ["cat", "dog", "zebra"] and split.num_classes == 3
    for label, cat_id in enumerate(split.label_to_cat_id):  # both directions agree
        assert split.cat_id_to_label[cat_id] == label
    assert [a["id"] for a in split.annotations[7]] == [11, 12, 13]  # crowd kept here, for evaluation
    assert split.annotations[9] == []  # empty image allowed
    assert split.images_dir.name == "images" and split.annotation_file.name == "train.json"


def test_defaults_filled_for_evaluation(make_dataset, coco):
    for ann in coco["annotations"]:
        ann.pop("area")
        ann.pop("iscrowd")
    split = load_split(make_dataset(coco))
    anns = {a["id"]: a for a in split.coco["annotations"]}
    assert anns[12]["area"] == 15 * 20 and anns[12]["iscrowd"] == 0
    assert split.coco["info"] == {} and split.coco["licenses"] == []


def test_clip_within_tolerance(make_dataset, coco):
    coco["annotations"][0]["bbox"] = [-0.75, 3, 10, 8]  # 0.75 px left of a 40x30 image
    coco["annotations"][1]["bbox"] = [20, 5, 20.5, 25.9]  # right edge 40.5 > 40, bottom 30.9 > 30
    root = make_dataset(coco)
    split = load_split(root, clip_tolerance=1.0)
    anns = {a["id"]: a for a in split.annotations[7]}
    assert anns[11]["bbox"] == [0.0, 3.0, 9.25, 8.0]
    assert anns[12]["bbox"] == [20.0, 5.0, 20.0, 25.0]
    assert split.clipped == 2
    assert {a["id"]: a["bbox"] for a in split.coco["annotations"]}[11] == [0.0, 3.0, 9.25, 8.0]
    with pytest.raises(DatasetError, match="annotation id 11 .*clip_tolerance=0.5"):
        load_split(root, clip_tolerance=0.5)
    assert json.loads((root / "annotations" / "train.json").read_text())["annotations"][0]["bbox"][0] == -0.75


def test_box_entirely_outside_within_tolerance_is_an_error(make_dataset, coco):
    coco["annotations"][0]["bbox"] = [40.2, 3, 0.5, 8]  # inside the tolerance band, but right of the image
    with pytest.raises(DatasetError, match="annotation id 11 box is empty after clipping"):
        load_split(make_dataset(coco))


def test_data_yaml_layout(make_dataset):
    """COCO-2017-like layout: images and annotations anywhere, paths relative to the YAML's folder."""
    root = make_dataset()
    (root / "images").rename(root / "val2017")
    (root / "annotations" / "val.json").rename(root / "annotations" / "instances_val2017.json")
    data = root / "coco.yaml"
    data.write_text("val:\n  images: val2017\n  annotations: annotations/instances_val2017.json\n")
    split = load_split(data, "val")
    assert split.images_dir == root / "val2017" and split.name == "val"
    image, _ = CocoDetection(split)[1]
    assert image.shape == (3, 30, 40)


def test_detection_item_matches_pixels_and_targets(make_dataset):
    root = make_dataset()
    dataset = CocoDetection(load_split(root))
    image, target = dataset[1]  # image id 7 (sorted ids 3, 7, 9)
    expected = np.asarray(Image.open(root / "images" / "a.png").convert("RGB"), dtype=np.float32) / 255
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    torch.testing.assert_close(image, torch.from_numpy(expected).permute(2, 0, 1))
    # ann 11: zebra (cat 90 -> label 2) [2, 3, 10, 8]; ann 12: cat (5 -> 0) [20, 5, 15, 20]; crowd 13 dropped
    assert target["boxes"].dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 11.0], [20.0, 5.0, 35.0, 25.0]]))
    assert target["labels"].tolist() == [2, 0] and target["labels"].dtype == torch.int64
    assert target["image_id"].dim() == 0 and int(target["image_id"]) == 7


def test_empty_and_crowd_only_images_have_empty_targets(make_dataset, coco):
    coco["annotations"] = [a for a in coco["annotations"] if a["iscrowd"]]  # image 7: crowd only
    dataset = CocoDetection(load_split(make_dataset(coco)))
    for i in range(3):
        _, target = dataset[i]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_grayscale_image_converted_to_rgb(make_dataset):
    root = make_dataset()
    Image.fromarray(np.full((30, 40), 128, np.uint8)).save(root / "images" / "a.png")
    image, _ = CocoDetection(load_split(root))[1]
    assert image.shape == (3, 30, 40)
    torch.testing.assert_close(image, torch.full((3, 30, 40), 128 / 255))


def test_image_size_mismatch_at_load(make_dataset, write_image):
    root = make_dataset()
    write_image(root / "images" / "a.png", 30, 30)
    with pytest.raises(DatasetError, match="image id 7: JSON size 40x30 differs"):
        CocoDetection(load_split(root))[1]


def test_hflip_moves_boxes_with_pixels(make_dataset, coco):
    """Paint each box's region a distinct colour; after the flip the new boxes must cover the same colours."""
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == 7 and not a["iscrowd"]]
    root = make_dataset(coco)
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[3:11, 2:12] = (255, 0, 0)  # ann 11, xywh [2, 3, 10, 8]
    pixels[5:25, 20:35] = (0, 255, 0)  # ann 12, xywh [20, 5, 15, 20]
    Image.fromarray(pixels).save(root / "images" / "a.png")
    split = load_split(root)
    plain_image, plain = CocoDetection(split, train=False, hflip=1.0)[1]  # hflip only applies with train=True
    flip_image, flipped = CocoDetection(split, train=True, hflip=1.0)[1]
    torch.testing.assert_close(plain["boxes"], torch.tensor([[2.0, 3.0, 12.0, 11.0], [20.0, 5.0, 35.0, 25.0]]))
    # x' = W - x with W = 40: [2, 12] -> [28, 38], [20, 35] -> [5, 20]
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[28.0, 3.0, 38.0, 11.0], [5.0, 5.0, 20.0, 25.0]]))
    assert flipped["labels"].tolist() == plain["labels"].tolist()
    torch.testing.assert_close(flip_image, plain_image.flip(-1))
    for (x1, y1, x2, y2), colour in zip(flipped["boxes"].int().tolist(), ([1.0, 0, 0], [0, 1.0, 0])):
        region = flip_image[:, y1:y2, x1:x2]
        assert torch.equal(region, torch.tensor(colour).view(3, 1, 1).expand_as(region))
    areas = ((flipped["boxes"][:, 2:] - flipped["boxes"][:, :2]).prod(-1)).sum()
    assert flip_image.sum() == areas  # nothing painted outside the flipped boxes


def test_hflip_probability(make_dataset):
    dataset = CocoDetection(load_split(make_dataset()), train=True, hflip=0.5)
    torch.manual_seed(0)
    flips = sum(bool(dataset[1][1]["boxes"][0, 0] == 28.0) for _ in range(100))  # ann 11 x1: 2 -> 28 when flipped
    assert 30 <= flips <= 70
    never = CocoDetection(load_split(make_dataset()), train=True, hflip=0.0)
    assert all(never[1][1]["boxes"][0, 0] == 2.0 for _ in range(10))
    with pytest.raises(ValueError, match="hflip"):
        CocoDetection(dataset.split, train=True, hflip=1.5)


def test_collate_keeps_lists(make_dataset):
    dataset = CocoDetection(load_split(make_dataset()))
    images, targets = collate([dataset[0], dataset[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [tuple(im.shape) for im in images] == [(3, 20, 20), (3, 30, 40)]
    assert [int(t["image_id"]) for t in targets] == [3, 7]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate)
    images, targets = next(iter(loader))
    assert len(images) == 3 and targets[2]["boxes"].shape == (0, 4)


# ----------------------------------------------------------------------------------------------- the lean split


def test_split_holds_numpy_arrays_and_drops_segmentation(make_dataset, coco):
    coco["annotations"][0]["segmentation"] = [[2, 3, 12, 3, 12, 11]]
    coco["annotations"][2]["segmentation"] = {"counts": [0, 1200], "size": [30, 40]}
    root = make_dataset(coco)
    split = load_split(root)
    assert split.image_ids.dtype == np.int64 and split.image_ids.tolist() == [3, 7, 9]
    assert split.bboxes.dtype == np.float64 and split.bboxes.shape == (4, 4)
    assert split.labels.dtype == np.int64 and split.ann_ids.tolist() == [14, 11, 12, 13]  # by image, then id
    assert split.ann_start.tolist() == [0, 1, 4, 4] and split.is_crowd.tolist() == [False, False, False, True]
    assert split.segmentations is None
    assert all("segmentation" not in a for a in split.coco["annotations"])
    assert all("segmentation" not in a for a in split.annotations[7])
    kept = load_split(root, keep_segmentation=True)
    assert {a["id"]: a.get("segmentation") for a in kept.annotations[7]} == {
        11: [[2, 3, 12, 3, 12, 11]],
        12: None,
        13: {"counts": [0, 1200], "size": [30, 40]},
    }
    assert [a["id"] for a in kept.coco["annotations"]] == [11, 12, 13, 14]  # the JSON's order
    with pytest.raises(KeyError):
        split.annotations[8]


def test_split_coco_evaluates_like_the_json(synth_root):
    """The evaluator's GT built from the arrays gives the same metrics as the JSON file with its polygons."""
    from cls2det.evaluation import evaluate_coco

    split = load_split(synth_root, "val")
    rng = np.random.default_rng(0)
    detections = []
    for ann in split.coco["annotations"]:
        if rng.random() < 0.8:
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
            box = [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]
            record = {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": box, "score": 0.9}
            detections.append(record)
    assert detections
    ours = evaluate_coco(split.coco, detections)
    reference = evaluate_coco(synth_root / "annotations" / "val.json", detections)
    assert json.dumps(ours, sort_keys=True) == json.dumps(reference, sort_keys=True)  # exactly, nan included


def test_targets_from_arrays_match_the_json(synth_root):
    split = load_split(synth_root, "train")
    dataset = CocoDetection(split)
    coco = json.loads((synth_root / "annotations" / "train.json").read_text())
    image = split.images[4]
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
    anns.sort(key=lambda a: a["id"])
    target = dataset.target(4)
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
    assert torch.equal(target["boxes"], expected.reshape(-1, 4))
    assert target["labels"].tolist() == [split.cat_id_to_label[a["category_id"]] for a in anns]
    assert int(target["image_id"]) == image["id"]
