"""COCO box evaluation (mAP / mAR / AP per IoU threshold) with faster-coco-eval or pycocotools inside.

Matching, interpolation and area ranges are pycocotools' own (``COCOeval`` with ``iouType="bbox"``); this module only
prepares the inputs, silences the backend's prints and turns its arrays into a flat dict of percentages.

Backends (``backend=`` of every entry point): ``"faster"`` = faster-coco-eval's ``COCOeval_faster`` (C++ matching and
accumulation: 5,000 images x 100 detections in seconds instead of a minute, with numbers identical to pycocotools',
checked by ``tests/evaluation/test_coco_eval_backends.py`` and ``benchmarks/bench_eval.py``); ``"pycocotools"`` = the
reference ``COCOeval``; ``"auto"`` (default) = faster-coco-eval when it is importable, else pycocotools.

=========  ===========================================================================
key        meaning (pycocotools name)
=========  ===========================================================================
mAP        AP @ IoU .50:.05:.95, area all, maxDets 100 (``stats[0]``)
AP50/AP75  AP @ IoU .50 / .75 (``stats[1]`` / ``stats[2]``)
APs/m/l    AP for small (< 32²) / medium / large (> 96²) objects (``stats[3:6]``)
mAR        AR @ 100 detections per image (``stats[8]``)
ARs/m/l    AR @ 100 for small / medium / large objects (``stats[9:12]``)
AP_per_iou {0.5: AP@.50, 0.55: AP@.55, ..., 0.95: AP@.95}; mean of the ten == mAP
=========  ===========================================================================

All values are percent (0..100). pycocotools reports -1 when there is nothing to average (e.g. no ground-truth object
of that size); such a metric is ``float("nan")`` here, so it is never mistaken for a real score.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "METRIC_KEYS",
    "IOU_THRESHOLDS",
    "BACKENDS",
    "resolve_backend",
    "evaluate_coco",
    "per_class_ap",
    "CocoEvaluator",
]

# The scalar metrics, in report order, and the pycocotools ``stats`` index each one comes from.
_STATS_INDEX = {"mAP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "mAR": 8, "ARs": 9, "ARm": 10, "ARl": 11}
METRIC_KEYS: tuple[str, ...] = tuple(_STATS_INDEX)
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
BACKENDS: tuple[str, ...] = ("auto", "faster", "pycocotools")


def _has_faster_coco_eval() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """``"faster"`` or ``"pycocotools"``, the backend ``backend`` names (``"auto"``: faster-coco-eval if importable).

    Raises ValueError for an unknown name and ImportError when ``"faster"`` is asked for but not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "faster" if _has_faster_coco_eval() else "pycocotools"
    if backend == "faster" and not _has_faster_coco_eval():
        raise ImportError("backend='faster' needs faster-coco-eval: pip install faster-coco-eval")
    return backend


def _percent(value: float) -> float:
    """pycocotools value in 0..1 (or -1 for 'nothing to average') -> percent, or nan."""
    return float("nan") if value < 0 else 100.0 * float(value)


def load_gt(gt: str | Path | dict) -> COCO:
    """Build a pycocotools ``COCO`` index from a path or dict without touching the caller's dict.

    The copy gets what pycocotools needs but COCO files may omit: ``info``/``licenses``, per-annotation ``iscrowd``
    (default 0) and ``area`` (default box w*h). Annotation ids are renumbered 1..N because pycocotools treats a matched
    ground-truth id of 0 as "unmatched" (its ``dtm`` array uses 0 for no match), which would turn a true positive on
    annotation id 0 into a false positive; detections never refer to GT annotation ids, so renumbering is safe.
    """
    if isinstance(gt, (str, Path)):
        path = Path(gt)
        if not path.is_file():
            raise FileNotFoundError(f"COCO ground-truth file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        where = str(path)
    elif isinstance(gt, dict):
        data, where = gt, "ground-truth dict"
    else:
        raise TypeError(f"gt must be a path or a COCO dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{where}: missing list '{key}'")

    annotations = []
    for i, ann in enumerate(data["annotations"]):
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{where}: annotation id {ann.get('id', f'#{i}')} has no 4-number 'bbox'")
        annotations.append(
            {
                **ann,
                "id": i + 1,
                "iscrowd": int(ann.get("iscrowd", 0)),
                "area": float(ann.get("area", bbox[2] * bbox[3])),
            }
        )
    dataset = {
        "info": data.get("info", {}),
        "licenses": data.get("licenses", []),
        "images": list(data["images"]),
        "annotations": annotations,
        "categories": list(data["categories"]),
    }
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _as_int(value) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def check_detections(coco_gt: COCO, detections: Sequence[dict]) -> list[dict]:
    """Validate COCO results and return fresh dicts (``loadRes`` writes ``id``/``area``/``segmentation`` into them)."""
    image_ids, cat_ids = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    out = []
    for i, det in enumerate(detections):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise ValueError(f"detection #{i}: missing key '{key}'")
        image_id, cat_id = _as_int(det["image_id"]), _as_int(det["category_id"])
        if image_id not in image_ids:
            raise ValueError(f"detection #{i}: image_id {image_id} is not in the ground truth")
        if cat_id not in cat_ids:
            raise ValueError(f"detection #{i}: category_id {cat_id} is not in the ground truth")
        bbox = [float(v) for v in det["bbox"]]
        if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"detection #{i}: bbox must be 4 finite numbers [x, y, w, h], got {det['bbox']}")
        out.append({"image_id": image_id, "category_id": cat_id, "bbox": bbox, "score": float(det["score"])})
    return out


def _empty_results(coco_cls, coco_gt: COCO):
    """An evaluable result set without detections (pycocotools' ``loadRes([])`` raises: it reads anns[0])."""
    coco_dt = coco_cls()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "annotations": [],
        "categories": list(coco_gt.dataset["categories"]),
    }
    coco_dt.createIndex()
    return coco_dt


def _quiet(*_args, **_kwargs) -> None:
    pass


def _run_cocoeval(
    coco_gt: COCO, detections: Sequence[dict], image_ids: Iterable[int] | None = None, backend: str = "auto"
):
    """Run evaluate + accumulate + summarize quietly; returns the evaluator with ``eval`` and ``stats`` filled.

    Both backends' evaluators expose the same ``params``, ``eval["precision"]`` [T, R, K, A, M] and ``stats`` [12].
    """
    backend = resolve_backend(backend)
    dets = check_detections(coco_gt, detections)
    ids = None
    if image_ids is not None:
        ids = sorted({int(i) for i in image_ids})
        unknown = set(ids) - set(coco_gt.getImgIds())
        if unknown:
            raise ValueError(f"image id {min(unknown)} is not in the ground truth")
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster":
            import faster_coco_eval

            gt = faster_coco_eval.COCO(print_function=_quiet)
            gt.dataset = coco_gt.dataset  # already validated and renumbered by load_gt; read only
            gt.createIndex()
            coco_dt = gt.loadRes(dets) if dets else _empty_results(faster_coco_eval.COCO, coco_gt)
            ev = faster_coco_eval.COCOeval_faster(gt, coco_dt, iouType="bbox", print_function=_quiet)
        else:
            coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(COCO, coco_gt)
            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if ids is not None:
            ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _metrics(ev) -> dict:
    metrics: dict = {key: _percent(ev.stats[i]) for key, i in _STATS_INDEX.items()}
    # precision: [T iou, R recall points, K classes, A areas, M maxDets]; area "all" = 0, maxDets 100 = last.
    # Entries of -1 mark classes without GT; that mask is the same for every IoU threshold, so the mean of the ten
    # per-threshold values equals pycocotools' mAP.
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_iou = {}
    for t, iou in enumerate(IOU_THRESHOLDS):
        p = precision[t]
        per_iou[iou] = 100.0 * float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    metrics["AP_per_iou"] = per_iou
    return metrics


def _per_class(ev, coco_gt: COCO) -> dict[str, float]:
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        out[coco_gt.cats[cat_id]["name"]] = 100.0 * float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return out


def evaluate_coco(
    gt: str | Path | dict,
    detections: list[dict],
    *,
    image_ids: Iterable[int] | None = None,
    backend: str = "auto",
) -> dict:
    """COCO box metrics of ``detections`` against ``gt``.

    Args:
        gt: COCO annotation file or dict (not modified). Crowd annotations (``iscrowd=1``) are handled by pycocotools:
            a detection matched to a crowd region counts as neither true nor false positive.
        detections: COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}``; may be empty.
        image_ids: evaluate on these images only (default: every image of ``gt``).
        backend: ``"auto"`` | ``"faster"`` | ``"pycocotools"`` (see the module docstring); same numbers either way.

    Returns:
        ``{"mAP", "AP50", "AP75", "APs", "APm", "APl", "mAR", "ARs", "ARm", "ARl"}`` in percent (nan where
        pycocotools has nothing to average, e.g. no small objects) and ``"AP_per_iou": {0.5: .., ..., 0.95: ..}``.
        With no detections every metric with ground truth is 0.0.
    """
    return _metrics(_run_cocoeval(load_gt(gt), detections, image_ids, backend))


def per_class_ap(
    gt: str | Path | dict,
    detections: list[dict],
    *,
    image_ids: Iterable[int] | None = None,
    backend: str = "auto",
) -> dict[str, float]:
    """AP@[.5:.95] per category name, in percent (nan for a category without ground truth in the images)."""
    coco_gt = load_gt(gt)
    return _per_class(_run_cocoeval(coco_gt, detections, image_ids, backend), coco_gt)


class CocoEvaluator:
    """Accumulates torchvision detections batch by batch, then evaluates them (faster-coco-eval or pycocotools).

    Usage (Detectron2-style)::

        ev = CocoEvaluator(split.coco, split.label_to_cat_id)
        ev.reset()
        for images, targets in loader:
            ev.process([t["image_id"] for t in targets], model(images))
        metrics = ev.evaluate()

    Only the processed images are evaluated (an image processed with no detections still counts, with all its
    ground truth missed), so evaluating a subset of a split gives that subset's metrics.
    """

    def __init__(self, gt: dict | str | Path, label_to_cat_id: list[int], *, backend: str = "auto"):
        self.backend = resolve_backend(backend)
        self._coco_gt = load_gt(gt)
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        missing = set(self.label_to_cat_id) - set(self._coco_gt.getCatIds())
        if missing:
            raise ValueError(f"label_to_cat_id: category id {min(missing)} is not in the ground truth")
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []
        self._image_ids: set[int] = set()

    def process(self, image_ids: list[int], outputs: list[dict]) -> None:
        """Add one batch.

        Args:
            image_ids: COCO image id per image (int or 0-dim tensor, e.g. ``target["image_id"]``).
            outputs: torchvision detections per image: ``boxes`` [N, 4] xyxy in original-image pixels, ``scores`` [N],
                ``labels`` [N] int64 in [0, C) (0-based, mapped to COCO ids through ``label_to_cat_id``).
        """
        if len(image_ids) != len(outputs):
            raise ValueError(f"process: {len(image_ids)} image ids but {len(outputs)} outputs")
        num_classes = len(self.label_to_cat_id)
        for image_id, out in zip(image_ids, outputs):
            image_id = _as_int(image_id)
            if image_id not in self._coco_gt.imgs:
                raise ValueError(f"process: image id {image_id} is not in the ground truth")
            boxes = torch.as_tensor(out["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)  # [N, 4] xyxy
            scores = torch.as_tensor(out["scores"]).detach().to("cpu", torch.float64).reshape(-1)  # [N]
            labels = torch.as_tensor(out["labels"]).detach().to("cpu", torch.int64).reshape(-1)  # [N]
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(f"process: image id {image_id}: boxes/scores/labels lengths differ")
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
                raise ValueError(f"process: image id {image_id}: label {bad} outside [0, {num_classes})")
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # [N, 4]
            for box, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
                self._results.append(
                    {"image_id": image_id, "category_id": self.label_to_cat_id[label], "bbox": box, "score": score}
                )
            self._image_ids.add(image_id)

    @property
    def results(self) -> list[dict]:
        """The COCO results gathered so far (e.g. to dump as ``detections.json``)."""
        return list(self._results)

    @property
    def ground_truth(self) -> dict:
        """The COCO ground truth the results are scored against, restricted to the processed images (all images if
        none were processed): a fresh dict, e.g. for :func:`cls2det.evaluation.errors.error_breakdown`."""
        data = self._coco_gt.dataset
        keep = self._image_ids or {int(img["id"]) for img in data["images"]}
        return {
            "images": [img for img in data["images"] if int(img["id"]) in keep],
            "annotations": [ann for ann in data["annotations"] if int(ann["image_id"]) in keep],
            "categories": list(data["categories"]),
        }

    def evaluate(self) -> dict:
        """Same dict as :func:`evaluate_coco`, over the processed images (all GT images if none were processed)."""
        image_ids = self._image_ids if self._image_ids else None
        return _metrics(_run_cocoeval(self._coco_gt, self._results, image_ids, self.backend))

    def per_class_ap(self) -> dict[str, float]:
        """AP@[.5:.95] per category name over the processed images, in percent."""
        image_ids = self._image_ids if self._image_ids else None
        return _per_class(_run_cocoeval(self._coco_gt, self._results, image_ids, self.backend), self._coco_gt)
