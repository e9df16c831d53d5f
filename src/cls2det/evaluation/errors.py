"""Detection error breakdown in the TIDE sense (Bolya et al., ECCV 2020, "TIDE: A General Toolbox for Identifying
Object Detection Errors"): how many AP50 points each error type costs.

Every detection that is not a true positive at IoU t_f = 0.5 (greedy matching by descending score, at most 100
detections per image) gets exactly one type, tested in this order (IoU_c = the max IoU with a GT of the detection's
class, IoU_o = with a GT of another class, both over all non-crowd GT of the image):

=====  ==========================================================================================================
loc    right class, mislocalised: t_b <= IoU_c <= t_f (t_b = 0.1)
cls    wrong class, well localised: IoU_o >= t_f
dupe   right class, IoU_c >= t_f with a GT already matched by a higher-scoring detection
bkg    background: IoU <= t_b with every GT of the image (or the image has none)
both   wrong class and mislocalised: anything else (in practice t_b < IoU_o < t_f)
miss   a GT matched by nothing and not the target of any loc / cls error
=====  ==========================================================================================================

dAP of a type = AP50 with only that type fixed by TIDE's oracle, minus the base AP50 (clamped at 0, as TIDE does):
loc / cls errors whose GT is still unmatched become true positives (with the GT's class for cls; of the errors aimed
at one GT only the highest-scoring one, the rest are removed); dupe, bkg and both detections are removed; a miss is
removed from the GT count. AP50 is TIDE's own: 101-point interpolated AP per class, averaged over every class that has
a GT or a (non-ignored) detection, so a class with only false positives counts as 0. Crowd GT (``iscrowd=1``) are
ignore regions: an unmatched detection of the same class with crowd IoU > t_f is left out of the AP.

This is a port of the reference implementation (``tidecv`` 1.0.1, ``quantify.py`` / ``errors/``), not a new
definition: ``tests/evaluation/test_errors.py`` checks hand-built cases and, where ``tidecv`` is importable, equality
with it on generated data. ``tidecv`` itself is not a dependency: it imports OpenCV, pandas, seaborn and
``matplotlib.pyplot`` at import time.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from .coco_eval import check_detections, load_gt

__all__ = ["ERROR_TYPES", "error_breakdown", "evaluator_errors", "fixed_ap50", "format_errors"]

ERROR_TYPES: tuple[str, ...] = ("cls", "loc", "both", "dupe", "bkg", "miss")


@dataclass
class _Error:
    kind: str
    original: tuple | None  # (class, det id, score, is_tp) as pushed into the AP data, None if not in it
    fixed: tuple | None  # the same after the oracle's fix, None if the fix removes it; ("gt", class) for a miss


@dataclass
class _GTState:
    is_used: bool = False
    is_usable: bool = False  # the target of a loc / cls error while unmatched: its miss is counted there
    best_score: float = -1.0
    best_id: int = -1


@dataclass
class _Run:
    points: dict[int, list[tuple[int, float, bool]]] = field(default_factory=dict)  # class -> [(det id, score, tp)]
    num_gt: dict[int, int] = field(default_factory=dict)
    errors: list[_Error] = field(default_factory=list)

    def push(self, cls: int, det_id: int, score: float, is_tp: bool) -> None:
        self.points.setdefault(cls, []).append((det_id, score, is_tp))
        self.num_gt.setdefault(cls, 0)


def _ap(points: list[tuple[int, float, bool]], num_gt: int) -> float:
    """TIDE's AP (percent): COCO's 101-point interpolation of the precision envelope, 0 without GT."""
    if num_gt == 0:
        return 0.0
    scores = np.array([-p[1] for p in points], dtype=np.float64)
    is_tp = np.array([p[2] for p in points], dtype=bool)[np.argsort(scores, kind="stable")]  # [P] by score desc
    tp = np.cumsum(is_tp)
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # envelope: max over higher recalls
    idx = np.searchsorted(recall, np.arange(101) / 100, side="left")  # [101]
    y = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0) if len(precision) else 0.0
    return float(np.mean(y) * 100.0)


def _map(points: dict[int, list], num_gt: dict[int, int]) -> float:
    classes = [c for c in num_gt if points.get(c) or num_gt[c] != 0]
    return sum(_ap(points.get(c, []), num_gt[c]) for c in classes) / len(classes) if classes else 0.0


def _best_match(state: _GTState, det_id: int, score: float) -> None:
    if not state.is_used:
        state.is_usable = True
        if state.best_score < score:
            state.best_score, state.best_id = score, det_id


def _eval_image(run: _Run, dets: list[dict], gts: list[dict], crowds: list[dict], t_f: float, t_b: float) -> None:
    for gt in gts:
        run.num_gt[gt["category_id"]] = run.num_gt.get(gt["category_id"], 0) + 1
    states = [_GTState() for _ in gts]
    pending: list[tuple[_Error, int, tuple]] = []  # loc / cls errors: (error, gt index, its point if fixed)
    if dets:
        boxes = [d["bbox"] for d in dets]
        det_cls = np.array([d["category_id"] for d in dets])
        is_tp: list[bool | None] = [False] * len(dets)  # None = ignored (inside a crowd region)
        if gts:
            iou = np.asarray(mask_utils.iou(boxes, [g["bbox"] for g in gts], [0] * len(gts)))  # [P, G]
            same = det_cls[:, None] == np.array([g["category_id"] for g in gts])[None, :]  # [P, G]
            cls_iou, other_iou = iou * same, iou * ~same
            buffer = cls_iou.copy()
            for p in range(len(dets)):
                g = int(np.argmax(buffer[p]))
                if buffer[p, g] >= t_f:
                    is_tp[p], states[g].is_used = True, True
                    buffer[:, g] = 0.0
        for region in crowds:
            crowd_iou = np.asarray(mask_utils.iou(boxes, [region["bbox"]], [1]))[:, 0]  # [P]
            inside = ((crowd_iou > t_f) & (det_cls == region["category_id"])).tolist()
            is_tp = [None if (t is False and i) else t for t, i in zip(is_tp, inside)]
        if gts:  # per detection: its best GT of its class / of another class, and the IoUs the tests below need
            rows = np.arange(len(dets))
            used = np.array([s.is_used for s in states])  # [G], final once matching is done
            cls_g, other_g = cls_iou.argmax(1), other_iou.argmax(1)  # [P]
            cls_max, other_max = cls_iou[rows, cls_g].tolist(), other_iou[rows, other_g].tolist()
            dupe_max, any_max = (cls_iou * used).max(1).tolist(), iou.max(1).tolist()
            cls_g, other_g = cls_g.tolist(), other_g.tolist()
        for p, d in enumerate(dets):
            cls, det_id, score = d["category_id"], d["_id"], d["score"]
            if is_tp[p] is not None:
                run.push(cls, det_id, score, bool(is_tp[p]))
            if is_tp[p]:
                continue
            original = None if is_tp[p] is None else (cls, det_id, score, False)
            if not gts:
                run.errors.append(_Error("bkg", original, None))
                continue
            g = cls_g[p]
            if t_b <= cls_max[p] <= t_f:
                _best_match(states[g], det_id, score)
                run.errors.append(_Error("loc", original, None))
                pending.append((run.errors[-1], g, (cls, det_id, score, True)))
                continue
            g = other_g[p]
            if other_max[p] >= t_f:
                _best_match(states[g], det_id, score)
                run.errors.append(_Error("cls", original, None))
                pending.append((run.errors[-1], g, (gts[g]["category_id"], det_id, score, True)))
                continue
            if dupe_max[p] >= t_f:
                kind = "dupe"
            elif any_max[p] <= t_b:
                kind = "bkg"
            else:
                kind = "both"
            run.errors.append(_Error(kind, original, None))
    # loc / cls fixes are resolved once every detection of the image has had its say on a GT's best score
    for error, g, point in pending:
        if not states[g].is_used and states[g].best_id == point[1]:
            error.fixed = point  # the highest-scoring error aimed at a still unmatched GT becomes its true positive
    for gt, state in zip(gts, states):
        if not state.is_used and not state.is_usable:
            run.errors.append(_Error("miss", None, ("gt", gt["category_id"])))


def _fixed_map(run: _Run, kinds: Collection[str]) -> float:
    num_gt = dict(run.num_gt)
    points: dict[int, list] = {}
    for e in run.errors:
        point = e.fixed if e.kind in kinds else e.original
        if point is None:
            continue
        if point[0] == "gt":
            num_gt[point[1]] -= 1
            continue
        points.setdefault(point[0], []).append(point[1:])
        num_gt.setdefault(point[0], 0)
    for cls, pts in run.points.items():  # the true positives, unchanged
        points.setdefault(cls, []).extend(p for p in pts if p[2])
    return _map(points, num_gt)


def _run(gt, detections: Sequence[dict], pos_thresh: float, bg_thresh: float, max_dets: int) -> _Run:
    coco = load_gt(gt)
    dets = check_detections(coco, detections)
    for i, d in enumerate(dets):
        d["_id"] = i
    by_image: dict[int, list[dict]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    run = _Run()
    for image in coco.dataset["images"]:
        anns = coco.imgToAnns.get(image["id"], [])
        image_dets = sorted(by_image.get(image["id"], []), key=lambda d: -d["score"])[:max_dets]
        gts = [a for a in anns if not a["iscrowd"]]
        crowds = [a for a in anns if a["iscrowd"]]
        _eval_image(run, image_dets, gts, crowds, pos_thresh, bg_thresh)
    return run


def error_breakdown(
    gt: dict | str | Path,
    detections: Sequence[dict],
    *,
    pos_thresh: float = 0.5,
    bg_thresh: float = 0.1,
    max_dets: int = 100,
) -> dict[str, float]:
    """TIDE's main-error breakdown of ``detections`` against ``gt`` (see the module docstring), in AP50 points.

    Args:
        gt: COCO ground truth (dict or path; not modified); every image in it is evaluated.
        detections: COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
        pos_thresh / bg_thresh: t_f and t_b. max_dets: detections kept per image, highest scores first.

    Returns:
        ``{"AP50": TIDE's base AP50, "cls": dAP, "loc": .., "both": .., "dupe": .., "bkg": .., "miss": ..}``, percent
        points; each dAP >= 0 and fixes only its own type (the six do not add up to 100 - AP50 in general).
    """
    run = _run(gt, detections, pos_thresh, bg_thresh, max_dets)
    base = _map(run.points, run.num_gt)
    out = {"AP50": base}
    for kind in ERROR_TYPES:
        out[kind] = max(_fixed_map(run, {kind}) - base, 0.0)
    return out


def fixed_ap50(
    gt: dict | str | Path,
    detections: Sequence[dict],
    kinds: Collection[str] = ERROR_TYPES,
    *,
    pos_thresh: float = 0.5,
    bg_thresh: float = 0.1,
    max_dets: int = 100,
) -> float:
    """TIDE's AP50 with every error of the types ``kinds`` fixed together (all six: 100 whenever there is a GT)."""
    unknown = set(kinds) - set(ERROR_TYPES)
    if unknown:
        raise ValueError(f"unknown error type {sorted(unknown)[0]!r}; valid: {', '.join(ERROR_TYPES)}")
    return _fixed_map(_run(gt, detections, pos_thresh, bg_thresh, max_dets), set(kinds))


def evaluator_errors(evaluator, **kwargs) -> dict[str, float]:
    """:func:`error_breakdown` of what a :class:`~cls2det.evaluation.CocoEvaluator` gathered (its ``results`` over its
    processed images' ``ground_truth``): ``metrics["errors"] = evaluator_errors(evaluator)`` after ``evaluate()``."""
    return error_breakdown(evaluator.ground_truth, evaluator.results, **kwargs)


def format_errors(errors: dict[str, float], title: str = "") -> str:
    """A two-line table like the CLI's metrics: TIDE's base AP50, then the AP50 points lost to each error type."""
    keys = ["AP50", *ERROR_TYPES]
    head = " | ".join(f"{k:>6}" for k in keys)
    row = " | ".join(f"{errors.get(k, float('nan')):6.2f}" for k in keys)
    return f"{title}\n{head}\n{row}" if title else f"{head}\n{row}"
