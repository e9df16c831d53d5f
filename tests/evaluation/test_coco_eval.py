"""COCO evaluation: known answers, crowd handling, label mapping, parity with raw pycocotools."""

import contextlib
import copy
import io
import json
import math
import random

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cls2det.evaluation import IOU_THRESHOLDS, METRIC_KEYS, CocoEvaluator, evaluate_coco, per_class_ap

# 101-point interpolation: recall 0.5 reached at precision 1 covers recall thresholds 0.00..0.50 = 51 of 101 points.
HALF_RECALL_AP = 100.0 * 51 / 101


def make_gt(boxes_per_image, categories=((1, "a"),), size=(200, 200)):
    """boxes_per_image: {image_id: [(xywh, category_id[, iscrowd])]} -> COCO dict (ids from 1, area = w*h)."""
    images, anns = [], []
    for image_id, boxes in boxes_per_image.items():
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": size[0], "height": size[1]})
        for box in boxes:
            xywh, cat = box[0], box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": list(xywh),
                    "area": xywh[2] * xywh[3],
                    "iscrowd": box[2] if len(box) > 2 else 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for i, n in categories]}


def det(image_id, xywh, score, cat=1):
    return {"image_id": image_id, "category_id": cat, "bbox": list(xywh), "score": score}


def pycocotools_stats(gt, dets):
    """Reference: pycocotools called directly, as in its README."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


# one object of each COCO size class: small (< 32²), medium, large (> 96²)
SIZED_GT = make_gt(
    {1: [((10, 10, 20, 20), 1), ((50, 50, 60, 40), 2)], 2: [((0, 0, 150, 120), 1)]}, categories=((1, "a"), (2, "b"))
)


def test_perfect_detections_give_100():
    dets = [det(a["image_id"], a["bbox"], 0.9, a["category_id"]) for a in SIZED_GT["annotations"]]
    m = evaluate_coco(SIZED_GT, dets)
    for key in METRIC_KEYS:
        assert m[key] == pytest.approx(100.0), key
    assert all(v == pytest.approx(100.0) for v in m["AP_per_iou"].values())


def test_empty_detections_give_zero_and_nan_for_absent_sizes():
    m = evaluate_coco(SIZED_GT, [])
    for key in METRIC_KEYS:
        assert m[key] == 0.0, key
    assert list(m["AP_per_iou"]) == list(IOU_THRESHOLDS)
    assert all(v == 0.0 for v in m["AP_per_iou"].values())
    # only small objects: medium/large metrics have nothing to average -> nan, as for a non-empty run
    m = evaluate_coco(make_gt({1: [((0, 0, 10, 10), 1)]}), [])
    assert m["mAP"] == 0.0 and m["APs"] == 0.0 and m["ARs"] == 0.0
    assert math.isnan(m["APm"]) and math.isnan(m["APl"]) and math.isnan(m["ARm"]) and math.isnan(m["ARl"])


def test_known_answer_one_of_two_found_at_iou_062():
    gt = make_gt({1: [((0, 0, 10, 10), 1)], 2: [((20, 20, 10, 10), 1)]})
    # IoU = (10 * 6.2) / (10 * 10) = 0.62: a true positive at thresholds .50, .55, .60, a false positive above
    m = evaluate_coco(gt, [det(1, (0, 0, 10, 6.2), 0.9)])
    per_iou = [HALF_RECALL_AP] * 3 + [0.0] * 7
    assert [m["AP_per_iou"][t] for t in IOU_THRESHOLDS] == pytest.approx(per_iou)
    assert m["AP50"] == pytest.approx(HALF_RECALL_AP)  # 50.495
    assert m["AP75"] == 0.0
    assert m["mAP"] == pytest.approx(3 * HALF_RECALL_AP / 10)  # 15.149
    assert m["APs"] == pytest.approx(m["mAP"])  # both objects are small
    assert m["mAR"] == pytest.approx(100 * 3 * 0.5 / 10)  # recall 1/2 at 3 of 10 thresholds
    assert math.isnan(m["APm"]) and math.isnan(m["APl"])


def test_crowd_region_detection_is_neither_tp_nor_fp():
    person = ((0, 0, 10, 10), 1)
    crowd = ((50, 50, 40, 40), 1, 1)
    dets = [det(1, (55, 55, 20, 20), 0.95), det(1, (0, 0, 10, 10), 0.9)]  # highest score inside the crowd
    with_crowd = evaluate_coco(make_gt({1: [person, crowd]}), dets)
    assert with_crowd["mAP"] == pytest.approx(100.0)  # ignored, not a false positive
    assert with_crowd["mAR"] == pytest.approx(100.0)  # and the crowd is not a missed object
    # reference: without the crowd region the same detection is a false positive ranked first ->
    # precision 1/2 at every recall threshold -> AP 50
    without = evaluate_coco(make_gt({1: [person]}), dets)
    assert without["mAP"] == pytest.approx(50.0)


def test_gt_not_mutated_path_input_and_annotation_id_zero(tmp_path):
    gt = make_gt({1: [((0, 0, 50, 50), 1)]})
    del gt["annotations"][0]["area"], gt["annotations"][0]["iscrowd"]  # optional in COCO files
    gt["annotations"][0]["id"] = 0  # raw pycocotools counts a match to GT id 0 as a false positive
    before = copy.deepcopy(gt)
    dets = [det(1, (0, 0, 50, 50), 0.9)]
    assert evaluate_coco(gt, dets)["mAP"] == pytest.approx(100.0)
    assert gt == before
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert evaluate_coco(path, dets)["mAP"] == pytest.approx(100.0)
    assert evaluate_coco(str(path), dets)["mAP"] == pytest.approx(100.0)


def test_bad_input_errors_name_the_culprit(tmp_path):
    gt = make_gt({1: [((0, 0, 10, 10), 1)]})
    with pytest.raises(ValueError, match="image_id 99 is not in the ground truth"):
        evaluate_coco(gt, [det(99, (0, 0, 10, 10), 0.5)])
    with pytest.raises(ValueError, match="category_id 5 is not in the ground truth"):
        evaluate_coco(gt, [det(1, (0, 0, 10, 10), 0.5, cat=5)])
    with pytest.raises(ValueError, match="detection #0: missing key 'score'"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_coco(tmp_path / "nope.json", [])
    with pytest.raises(ValueError, match="missing list 'categories'"):
        evaluate_coco({"images": [], "annotations": []}, [])


def random_case(seed):
    rng = random.Random(seed)
    cats = ((1, "a"), (2, "b"), (4, "d"))
    boxes = {}
    for image_id in range(1, 9):
        boxes[image_id] = []
        for _ in range(rng.randint(0, 5)):
            w, h = rng.uniform(4, 150), rng.uniform(4, 150)
            boxes[image_id].append(((rng.uniform(0, 200 - w), rng.uniform(0, 200 - h), w, h), rng.choice(cats)[0]))
    boxes[1] += [((5, 5, 20, 25), 2), ((40, 40, 50, 60), 4), ((60, 20, 120, 110), 1)]  # one object of each size
    boxes[3].append(((0, 0, 100, 100), 1, 1))  # one crowd region
    gt = make_gt(boxes, categories=cats)
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.8:
            x, y, w, h = a["bbox"]
            jitter = [rng.gauss(0, 0.1 * w), rng.gauss(0, 0.1 * h), rng.gauss(0, 0.1 * w), rng.gauss(0, 0.1 * h)]
            cat = a["category_id"] if rng.random() < 0.85 else rng.choice(cats)[0]
            dets.append(
                det(
                    a["image_id"],
                    (x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])),
                    rng.random(),
                    cat,
                )
            )
    for _ in range(15):  # false positives
        dets.append(
            det(
                rng.randint(1, 8),
                (rng.uniform(0, 150), rng.uniform(0, 150), rng.uniform(3, 50), rng.uniform(3, 50)),
                rng.random() * 0.6,
                rng.choice(cats)[0],
            )
        )
    return gt, dets


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_raw_pycocotools_and_per_iou_consistency(seed):
    gt, dets = random_case(seed)
    stats = pycocotools_stats(gt, dets)
    m = evaluate_coco(gt, dets)
    index = {"mAP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "mAR": 8, "ARs": 9, "ARm": 10, "ARl": 11}
    for key, i in index.items():
        assert stats[i] >= 0, "the random case should have objects of every size"
        assert m[key] == pytest.approx(100 * stats[i], abs=0.01), key
    assert 5 < m["mAP"] < 95  # a non-trivial case
    assert m["AP_per_iou"][0.5] == pytest.approx(m["AP50"], abs=1e-9)
    assert m["AP_per_iou"][0.75] == pytest.approx(m["AP75"], abs=1e-9)
    assert sum(m["AP_per_iou"].values()) / 10 == pytest.approx(m["mAP"], abs=1e-9)
    assert all(m["AP_per_iou"][a] >= m["AP_per_iou"][b] - 1e-9 for a, b in zip(IOU_THRESHOLDS, IOU_THRESHOLDS[1:]))
    per_class = per_class_ap(gt, dets)
    assert set(per_class) == {"a", "b", "d"}
    assert sum(per_class.values()) / 3 == pytest.approx(m["mAP"], abs=1e-9)


NONCONTIG_GT = make_gt(
    {1: [((10, 10, 30, 30), 3), ((60, 60, 50, 40), 7)], 2: [((5, 5, 100, 120), 90)]},
    categories=((90, "zebra"), (3, "cat"), (7, "dog")),
)


def outputs(boxes_xyxy, labels, scores=None):
    return {
        "boxes": torch.as_tensor(boxes_xyxy, dtype=torch.float32),
        "labels": torch.tensor(labels),
        "scores": torch.tensor(scores if scores is not None else [0.9] * len(labels)),
    }


def test_evaluator_maps_labels_to_noncontiguous_category_ids():
    ev = CocoEvaluator(NONCONTIG_GT, label_to_cat_id=[3, 7, 90])
    ev.process([torch.tensor(1)], [outputs([[10, 10, 40, 40], [60, 60, 110, 100]], [0, 1])])  # 0-dim tensor ids
    ev.process([2], [outputs([[5, 5, 105, 125]], [2])])
    assert [(r["category_id"], r["bbox"]) for r in ev.results] == [
        (3, [10, 10, 30, 30]),
        (7, [60, 60, 50, 40]),
        (90, [5, 5, 100, 120]),
    ]  # xyxy -> xywh
    assert ev.evaluate()["mAP"] == pytest.approx(100.0)
    assert ev.per_class_ap() == pytest.approx({"cat": 100.0, "dog": 100.0, "zebra": 100.0})
    # a wrong mapping (cat <-> dog swapped) makes those two classes pure false positives: mAP = (0 + 0 + 100) / 3
    swapped = CocoEvaluator(NONCONTIG_GT, label_to_cat_id=[7, 3, 90])
    swapped.process([1, 2], [outputs([[10, 10, 40, 40], [60, 60, 110, 100]], [0, 1]), outputs([[5, 5, 105, 125]], [2])])
    assert swapped.evaluate()["mAP"] == pytest.approx(100.0 / 3)
    ev.reset()
    assert ev.results == [] and ev.evaluate()["mAP"] == 0.0


def test_evaluator_scores_only_processed_images_and_checks_input():
    ev = CocoEvaluator(NONCONTIG_GT, label_to_cat_id=[3, 7, 90])
    ev.process([1], [outputs([[10, 10, 40, 40]], [0])])  # image 1: one of its two objects found
    m = ev.evaluate()
    assert m["mAR"] == pytest.approx(50.0)  # cat found, dog missed; zebra (image 2) not evaluated
    ev.process([2], [outputs(torch.zeros(0, 4), [])])  # image 2 processed with no detections: zebra now missed
    assert ev.evaluate()["mAR"] == pytest.approx(100.0 / 3)
    with pytest.raises(ValueError, match="label 3 outside"):
        ev.process([1], [outputs([[0, 0, 5, 5]], [3])])
    with pytest.raises(ValueError, match="image id 42 is not in the ground truth"):
        ev.process([42], [outputs([[0, 0, 5, 5]], [0])])
    with pytest.raises(ValueError, match="2 image ids but 1 outputs"):
        ev.process([1, 2], [outputs([[0, 0, 5, 5]], [0])])
    with pytest.raises(ValueError, match="category id 5 is not in the ground truth"):
        CocoEvaluator(NONCONTIG_GT, label_to_cat_id=[3, 5, 90])
