"""faster-coco-eval vs pycocotools: every reported number identical on a generated set that exercises crowd regions,
the three area ranges, duplicates, wrong classes and images without detections; backend selection and fallback."""

import math
import random

import pytest

from cls2det.evaluation import IOU_THRESHOLDS, METRIC_KEYS, CocoEvaluator, coco_eval, evaluate_coco, per_class_ap

CATEGORIES = [{"id": cid, "name": f"c{cid}"} for cid in (1, 3, 7, 18)]  # non-contiguous ids, as in COCO


def generated_set(seed: int = 0, num_images: int = 20):
    """COCO GT + results: ~5 GT per image (sides 8..220 px: small, medium and large), 1 crowd region in every third
    image, per GT a jittered hit (sometimes with the wrong class), a lower-scored duplicate every other GT, plus
    background boxes; 300-odd detections. Scores are distinct (ties make the two backends' sort orders a coin flip)."""
    rng = random.Random(seed)
    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 480})
        for k in range(rng.randint(3, 7)):
            side = rng.choice([8, 20, 30, 40, 70, 90, 120, 220])
            w, h = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = rng.choice(CATEGORIES)["id"]
            is_crowd = int(image_id % 3 == 0 and k == 0)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": is_crowd,
                }
            )
            for _ in range(rng.choice([1, 1, 2, 3])):  # the hit, then duplicates
                jitter = [rng.uniform(-0.25, 0.25) * s for s in (w, h, w, h)]
                box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
                wrong = rng.random() < 0.15
                dets.append(
                    {
                        "image_id": image_id,
                        "category_id": rng.choice(CATEGORIES)["id"] if wrong else cat,
                        "bbox": box,
                        "score": rng.random(),
                    }
                )
        if image_id % 4 == 0:
            continue  # no background boxes on these
        for _ in range(rng.randint(5, 15)):
            w, h = rng.uniform(5, 150), rng.uniform(5, 150)
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": rng.choice(CATEGORIES)["id"],
                    "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h],
                    "score": rng.random(),
                }
            )
    images.append({"id": num_images + 1, "file_name": "empty.jpg", "width": 640, "height": 480})  # GT, no dets
    return {"images": images, "annotations": anns, "categories": CATEGORIES}, dets


def assert_same(a: float, b: float) -> None:
    """Equal up to float summation order: the C++ and numpy means differ in the last bits (measured: 4e-15 points)."""
    assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9, (a, b)


def assert_same_metrics(fast: dict, ref: dict) -> None:
    for key in METRIC_KEYS:
        assert_same(fast[key], ref[key])
    for iou in IOU_THRESHOLDS:
        assert_same(fast["AP_per_iou"][iou], ref["AP_per_iou"][iou])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_and_pycocotools_report_identical_numbers(seed):
    gt, dets = generated_set(seed)
    assert 200 <= len(dets) <= 700
    assert any(a["iscrowd"] for a in gt["annotations"])
    areas = [a["area"] for a in gt["annotations"]]
    assert min(areas) < 32**2 and max(areas) > 96**2 and any(32**2 < x < 96**2 for x in areas)

    ref = evaluate_coco(gt, dets, backend="pycocotools")
    assert_same_metrics(evaluate_coco(gt, dets, backend="faster"), ref)
    assert 5.0 < ref["mAP"] < 95.0  # a set with errors of every kind, not a degenerate 0 or 100

    fast_cls = per_class_ap(gt, dets, backend="faster")
    ref_cls = per_class_ap(gt, dets, backend="pycocotools")
    assert fast_cls.keys() == ref_cls.keys() == {c["name"] for c in CATEGORIES}
    for name in ref_cls:
        assert_same(fast_cls[name], ref_cls[name])

    # a subset of images (what CocoEvaluator evaluates) agrees too
    subset = [1, 2, 3, 5, 8]
    assert_same_metrics(
        evaluate_coco(gt, dets, image_ids=subset, backend="faster"),
        evaluate_coco(gt, dets, image_ids=subset, backend="pycocotools"),
    )


def test_empty_detections_agree():
    gt, _ = generated_set(0, num_images=3)
    ref = evaluate_coco(gt, [], backend="pycocotools")
    assert_same_metrics(evaluate_coco(gt, [], backend="faster"), ref)
    assert ref["mAP"] == 0.0


def test_backend_selection_and_fallback(monkeypatch):
    assert coco_eval.resolve_backend("pycocotools") == "pycocotools"
    assert coco_eval.resolve_backend("auto") == "faster"  # installed in the test environment
    with pytest.raises(ValueError, match="backend must be one of"):
        coco_eval.resolve_backend("detectron2")

    monkeypatch.setattr(coco_eval, "_has_faster_coco_eval", lambda: False)
    assert coco_eval.resolve_backend("auto") == "pycocotools"
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        coco_eval.resolve_backend("faster")
    gt, dets = generated_set(0, num_images=3)
    ev = CocoEvaluator(gt, label_to_cat_id=[c["id"] for c in CATEGORIES])
    assert ev.backend == "pycocotools"  # falls back without faster-coco-eval and still evaluates
    assert evaluate_coco(gt, dets)["mAP"] == evaluate_coco(gt, dets, backend="pycocotools")["mAP"]


def test_evaluator_ground_truth_is_the_processed_images():
    gt, _ = generated_set(0, num_images=4)
    ev = CocoEvaluator(gt, label_to_cat_id=[c["id"] for c in CATEGORIES])
    assert [img["id"] for img in ev.ground_truth["images"]] == [1, 2, 3, 4, 5]  # nothing processed: all images
    ev.process([2, 4], [{"boxes": [], "scores": [], "labels": []}] * 2)
    sub = ev.ground_truth
    assert [img["id"] for img in sub["images"]] == [2, 4]
    expected = [a for a in gt["annotations"] if a["image_id"] in (2, 4)]
    assert [a["bbox"] for a in sub["annotations"]] == [a["bbox"] for a in expected]
    assert [a["iscrowd"] for a in sub["annotations"]] == [a["iscrowd"] for a in expected]
