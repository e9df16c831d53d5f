"""TIDE error breakdown: hand-built cases whose dAP is known by hand, and equality with the reference ``tidecv``."""

import math
import random

import pytest

from cls2det.evaluation.errors import ERROR_TYPES, error_breakdown, fixed_ap50

# 101-point interpolation: precision 1 up to recall 0.5 and nothing after covers 51 of the 101 recall points.
HALF = 100.0 * 51 / 101
A, B = 1, 2  # category ids


def gt_dict(anns, num_images=1):
    """anns: [(image_id, xywh, category_id[, iscrowd])] -> COCO dict."""
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 400, "height": 400} for i in range(1, num_images + 1)],
        "annotations": [
            {
                "id": k + 1,
                "image_id": a[0],
                "bbox": list(a[1]),
                "category_id": a[2],
                "iscrowd": a[3] if len(a) > 3 else 0,
            }
            for k, a in enumerate(anns)
        ],
        "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}],
    }


def det(xywh, cat, score, image_id=1):
    return {"image_id": image_id, "category_id": cat, "bbox": list(xywh), "score": score}


BOX = (0, 0, 100, 100)
FAR = (250, 250, 100, 100)
IOU_04 = (0, 0, 40, 100)  # IoU 0.4 with BOX: right place, badly localised
OTHER = (0, 0, 105, 100)  # IoU 0.95 with BOX


def only(result, **expected):
    """Every error type not named is 0."""
    for kind in ERROR_TYPES:
        assert result[kind] == pytest.approx(expected.get(kind, 0.0), abs=1e-9), kind


def test_wrong_class_loses_everything_to_cls():
    r = error_breakdown(gt_dict([(1, BOX, A)]), [det(BOX, B, 0.9)])
    assert r["AP50"] == 0.0
    only(r, cls=100.0)  # fixed: the detection becomes class a's true positive; its GT is not also a miss


def test_badly_localised_detection_is_loc():
    r = error_breakdown(gt_dict([(1, BOX, A)]), [det(IOU_04, A, 0.9)])
    assert r["AP50"] == 0.0
    only(r, loc=100.0)


def test_lower_scored_duplicate_is_dupe():
    # GT X and Y of class a; dets: X (0.9), a duplicate of X (0.8), Y (0.7): TP, FP, TP
    # precision [1, 1/2, 2/3] at recall [1/2, 1/2, 1]: envelope 1 up to recall 0.5 (51 points), 2/3 after (50 points)
    gt = gt_dict([(1, BOX, A), (1, FAR, A)])
    r = error_breakdown(gt, [det(BOX, A, 0.9), det(OTHER, A, 0.8), det(FAR, A, 0.7)])
    base = 100.0 * (51 + 50 * 2 / 3) / 101
    assert r["AP50"] == pytest.approx(base)
    only(r, dupe=100.0 - base)


def test_detection_far_from_every_gt_is_bkg():
    # a background box scored above the true positive: precision 1/2 at every recall point
    r = error_breakdown(gt_dict([(1, BOX, A)]), [det(FAR, A, 0.9), det(BOX, A, 0.5)])
    assert r["AP50"] == pytest.approx(50.0)
    only(r, bkg=50.0)


def test_gt_with_nothing_near_is_miss():
    r = error_breakdown(gt_dict([(1, BOX, A), (1, FAR, A)]), [det(BOX, A, 0.9)])
    assert r["AP50"] == pytest.approx(HALF)
    only(r, miss=100.0 - HALF)


def test_wrong_class_and_badly_localised_is_both():
    # class a: BOX hit exactly (AP 100); class b: FAR hit (0.4) under a class-b box at IoU 0.4 with the class-a GT
    # (0.9): precision [0, 1/2] -> AP 50; mean 75. Removing the "both" box makes class b 100.
    gt = gt_dict([(1, BOX, A), (1, FAR, B)])
    r = error_breakdown(gt, [det(BOX, A, 0.5), det(FAR, B, 0.4), det(IOU_04, B, 0.9)])
    assert r["AP50"] == pytest.approx(75.0)
    only(r, both=25.0)


def test_detection_in_a_crowd_region_is_ignored():
    gt = gt_dict([(1, BOX, A), (1, FAR, A, 1)])
    r = error_breakdown(gt, [det(BOX, A, 0.5), det(FAR, A, 0.9)])
    assert r["AP50"] == pytest.approx(100.0)
    only(r)


def test_fixing_every_error_gives_100():
    # two images, every error type at once
    gt = gt_dict([(1, BOX, A), (1, FAR, A), (2, BOX, B), (2, (150, 0, 50, 50), A), (2, FAR, A)], num_images=2)
    dets = [
        det(BOX, A, 0.9),  # TP
        det(OTHER, A, 0.8),  # dupe
        det((120, 120, 30, 30), B, 0.95),  # bkg
        det(BOX, A, 0.7, image_id=2),  # cls (GT is b)
        det((150, 0, 20, 50), A, 0.6, image_id=2),  # loc
    ]
    r = error_breakdown(gt, dets)
    assert 0.0 < r["AP50"] < 100.0
    # alone, the dupe and bkg fixes recover nothing here (each sits below or in a class without a true positive)
    assert r["cls"] > 0.0 and r["loc"] > 0.0 and r["miss"] > 0.0
    assert fixed_ap50(gt, dets) == pytest.approx(100.0)
    assert fixed_ap50(gt, dets, ()) == pytest.approx(r["AP50"])
    assert fixed_ap50(gt, dets, ["loc"]) == pytest.approx(r["AP50"] + r["loc"])
    with pytest.raises(ValueError, match="unknown error type"):
        fixed_ap50(gt, dets, ["nope"])


def test_missed_class_counts_in_the_mean():
    # class a found, class b missed entirely: AP50 = (100 + 0) / 2; fixing the miss drops class b from the mean
    r = error_breakdown(gt_dict([(1, BOX, A), (1, FAR, B)]), [det(BOX, A, 0.9)])
    assert r["AP50"] == pytest.approx(50.0)
    only(r, miss=50.0)


def test_no_detections_recovers_nothing():
    # TIDE's miss fix only removes GT: with no detection every class ends up empty, and the mean over none is 0 here
    r = error_breakdown(gt_dict([(1, BOX, A), (1, FAR, B)]), [])
    assert r["AP50"] == 0.0
    only(r)


# ----------------------------------------------------------------------------------------------- the reference


def random_set(seed):
    rng = random.Random(seed)
    anns, dets = [], []
    for image_id in range(1, 16):
        for k in range(rng.randint(0, 6)):
            w, h = rng.uniform(10, 120), rng.uniform(10, 120)
            x, y = rng.uniform(0, 400 - w), rng.uniform(0, 400 - h)
            cat = rng.choice([A, B])
            anns.append((image_id, (x, y, w, h), cat, int(k == 0 and image_id % 5 == 0)))
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                j = [rng.uniform(-0.6, 0.6) * s for s in (w, h, w, h)]
                box = (x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3]))
                dets.append(det(box, cat if rng.random() > 0.25 else rng.choice([A, B]), rng.random(), image_id))
        for _ in range(rng.randint(0, 4)):
            dets.append(
                det((rng.uniform(0, 300), rng.uniform(0, 300), 50, 50), rng.choice([A, B]), rng.random(), image_id)
            )
    return gt_dict(anns, num_images=15), dets


@pytest.mark.parametrize("seed", range(5))
def test_equals_tidecv(seed):
    tidecv = pytest.importorskip("tidecv")  # the reference implementation; not a dependency (see errors.py)
    gt, dets = random_set(seed)
    gt_data, pred_data = tidecv.Data("gt"), tidecv.Data("pred")
    for image in gt["images"]:
        gt_data.add_image(image["id"], image["file_name"])
    for a in gt["annotations"]:
        add = gt_data.add_ignore_region if a["iscrowd"] else gt_data.add_ground_truth
        add(a["image_id"], a["category_id"], a["bbox"])
    for d in dets:
        pred_data.add_detection(d["image_id"], d["category_id"], d["score"], d["bbox"])
    tide = tidecv.TIDE()
    run = tide.evaluate(gt_data, pred_data, mode=tidecv.TIDE.BOX)
    expected = {k.lower(): v for k, v in tide.get_main_errors()["pred"].items()}
    ours = error_breakdown(gt, dets)
    assert ours["AP50"] == pytest.approx(run.ap, abs=1e-9)
    for kind in ERROR_TYPES:
        assert ours[kind] == pytest.approx(expected[kind], abs=1e-9), kind
    assert not math.isnan(ours["AP50"])


def test_evaluator_errors_uses_the_processed_images():
    import torch

    from cls2det.evaluation import CocoEvaluator
    from cls2det.evaluation.errors import evaluator_errors, format_errors

    # image 1: class a's GT found by a class-b box (cls); image 2: a GT missed entirely
    gt = gt_dict([(1, BOX, A), (2, BOX, A)], num_images=2)
    ev = CocoEvaluator(gt, label_to_cat_id=[A, B])
    xyxy = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    ev.process([1], [{"boxes": xyxy, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}])
    only(evaluator_errors(ev), cls=100.0)  # image 2 was not processed: its GT is not a miss
    nothing = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    ev.process([2], [nothing])
    r = evaluator_errors(ev)
    assert r["AP50"] == 0.0
    only(r, cls=HALF)  # fixed: 1 of the 2 GT found at precision 1
    assert format_errors(r).splitlines()[0].split() == "AP50 | cls | loc | both | dupe | bkg | miss".split()
