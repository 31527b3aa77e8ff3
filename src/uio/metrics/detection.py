"""Box and keypoint metrics: COCO detection mAP, COCO keypoint OKS AP (pycocotools), box accuracy.

The COCO protocols run pycocotools' own ``COCOeval`` on ground truth and detections built in
memory from the gathered per-image records, so the numbers are those of the official evaluation
(the tests check this against ``COCOeval`` run on COCO-format files).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from uio.metrics.base import (
    MetricInputError,
    UIOMetric,
    as_float_array,
    box_iou_matrix,
    get_field,
    grit_matched_score,
    to_numpy,
)

# COCO person keypoints, in the order of the annotations (and of contract 1 in docs/design.md)
COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# per-keypoint OKS constants of the COCO keypoint evaluation (pycocotools Params.kpt_oks_sigmas)
COCO_KEYPOINT_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
) / 10.0


def normalize_label(label: Any, field: str) -> str:
    """Class names are compared after lower-casing and collapsing white space."""
    if not isinstance(label, str):
        raise MetricInputError(f"{field} must be a string class name, got {type(label).__name__}")
    return " ".join(label.lower().split())


def _labels(x: Any, n: int, field: str) -> list[str]:
    if isinstance(x, str) or not hasattr(x, "__len__"):
        raise MetricInputError(f"{field} must be a list of {n} class names, got {type(x).__name__}")
    labels = [normalize_label(s, f"{field}[{i}]") for i, s in enumerate(x)]
    if len(labels) != n:
        raise MetricInputError(f"{field} has {len(labels)} names but there are {n} boxes; expected one per box")
    return labels


def _xywh(b: np.ndarray) -> list[float]:
    """xyxy -> COCO xywh; a flipped box becomes an empty one (it overlaps nothing)."""
    return [float(b[0]), float(b[1]), max(0.0, float(b[2] - b[0])), max(0.0, float(b[3] - b[1]))]


def run_cocoeval(gt: dict, dets: list[dict], iou_type: str) -> np.ndarray:
    """Run pycocotools ``COCOeval`` quietly on an in-memory dataset; returns its ``stats`` vector.

    ``dets`` must already carry what ``COCO.loadRes`` would add (``id``, ``area``, ``bbox``);
    building the result set by hand also covers the empty-detections case ``loadRes`` rejects.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": dets}
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)


def _nan_if_undefined(v: float) -> float:
    """COCOeval reports -1 when a quantity is undefined (no ground truth in range): use NaN."""
    return math.nan if v < 0 else float(v)


class DetectionMAP(UIOMetric):
    """COCO box mAP (``COCOeval``, iouType ``bbox``, maxDets 100).

    pred ``{"boxes": (N, 4) xyxy pixels, "labels": list[str], "scores": (N,)}``;
    target ``{"boxes": (M, 4), "labels": list[str]}`` with optional ``"areas"`` (M,) (the COCO
    annotation area used for the small/medium/large split; default box area) and ``"iscrowd"`` (M,).
    Class names are mapped to category ids after gathering, from the sorted union of all names,
    so ids agree on every rank. Returns ``map, map_50, map_75, map_small, map_medium, map_large,
    mar_1, mar_10, mar_100`` (NaN when undefined, e.g. no ground truth at all).
    """

    name = "detection_map"
    _KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_records("records")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        pb = as_float_array(get_field(pred, "boxes", "prediction"), "pred['boxes']", (None, 4))
        pl = _labels(get_field(pred, "labels", "prediction"), len(pb), "pred['labels']")
        ps = as_float_array(pred.get("scores", np.ones(len(pb))), "pred['scores']", (len(pb),))
        ok = np.isfinite(pb).all(1) & np.isfinite(ps)  # a non-finite guess cannot match anything: drop it
        pb, ps, pl = pb[ok], ps[ok], [n for n, k in zip(pl, ok) if k]
        gb = as_float_array(get_field(target, "boxes", "target"), "target['boxes']", (None, 4))
        gl = _labels(get_field(target, "labels", "target"), len(gb), "target['labels']")
        area = target.get("areas")
        ga = None if area is None else as_float_array(area, "target['areas']", (len(gb),))
        crowd = target.get("iscrowd")
        gc = np.zeros(len(gb), bool) if crowd is None else to_numpy(crowd).astype(bool).reshape(-1)
        if len(gc) != len(gb):
            raise MetricInputError(f"target['iscrowd'] has {len(gc)} entries for {len(gb)} boxes")
        self.records.append(
            {"pb": pb, "pl": pl, "ps": ps, "gb": gb, "gl": gl, "ga": ga, "gc": gc}
        )

    def compute(self) -> dict[str, float]:
        recs = self.records
        names = sorted({n for r in recs for n in (*r["pl"], *r["gl"])})
        if not recs or not names:
            return {k: math.nan for k in self._KEYS}
        cat = {n: i + 1 for i, n in enumerate(names)}
        images, gts, dets = [], [], []
        for img_id, r in enumerate(recs, start=1):
            images.append({"id": img_id})
            for j, (b, n) in enumerate(zip(r["gb"], r["gl"])):
                area = float(r["ga"][j]) if r["ga"] is not None else (b[2] - b[0]) * (b[3] - b[1])
                gts.append({"id": len(gts) + 1, "image_id": img_id, "category_id": cat[n], "bbox": _xywh(b),
                            "area": float(area), "iscrowd": int(r["gc"][j])})
            for b, n, s in zip(r["pb"], r["pl"], r["ps"]):
                xywh = _xywh(b)
                dets.append({"id": len(dets) + 1, "image_id": img_id, "category_id": cat[n], "bbox": xywh,
                             "area": xywh[2] * xywh[3], "score": float(s), "iscrowd": 0})
        gt = {"images": images, "annotations": gts, "categories": [{"id": i, "name": n} for n, i in cat.items()]}
        stats = run_cocoeval(gt, dets, "bbox")
        idx = (0, 1, 2, 3, 4, 5, 6, 7, 8)
        return {k: _nan_if_undefined(stats[i]) for k, i in zip(self._KEYS, idx)}


def _keypoint_sets(d: Mapping[str, Any], field: str) -> np.ndarray:
    """``(17, 3)``, ``(51,)`` or ``(K, 17, 3)`` keypoints -> ``(K, 17, 3)`` float64.

    Predictions may omit the visibility column (``(17, 2)`` / ``(K, 17, 2)``): COCO ignores it.
    """
    a = to_numpy(get_field(d, "keypoints", field))
    try:
        a = a.astype(np.float64)
    except (TypeError, ValueError):
        raise MetricInputError(f"{field}['keypoints'] must be numeric (17, 3) x, y, v rows") from None
    if a.size == 0:
        return np.zeros((0, 17, 3))
    if field == "prediction" and a.shape[-2:] == (17, 2):
        a = np.concatenate([a, np.ones((*a.shape[:-1], 1))], axis=-1)
    if a.shape in ((17, 3), (51,)):
        return a.reshape(1, 17, 3)
    if a.ndim == 3 and a.shape[1:] == (17, 3):
        return a
    raise MetricInputError(f"{field}['keypoints'] must have shape (17, 3) or (K, 17, 3), got {tuple(a.shape)}")


class KeypointOKSAP(UIOMetric):
    """COCO keypoint AP (``COCOeval`` iouType ``keypoints``: OKS with the COCO sigmas, maxDets 20).

    One update pair is one image. pred ``{"keypoints": (17, 3) x, y, v, "score": float}`` or, for
    several people, ``{"keypoints": (K, 17, 3), "scores": (K,)}``; the predicted visibility is
    ignored, as in COCO. target ``{"keypoints": (17, 3), "box": xyxy}`` (optional ``"area"``,
    default the box area) or ``{"keypoints": (M, 17, 3), "boxes": (M, 4), "areas": (M,)}``;
    v = 0 marks an unlabelled joint and people with none labelled are ignored, as in COCO.
    Returns ``ap, ap50, ap75, ap_medium, ap_large, ar`` and ``grit_kp`` — GRIT's per-image score
    (Hungarian matching on OKS, area from the extent of the labelled joints, averaged over images).
    """

    name = "keypoint_oks_ap"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_records("records")
        self._add_score("grit_kp")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        pk = _keypoint_sets(pred, "prediction")
        if "scores" in pred:
            ps = as_float_array(pred["scores"], "pred['scores']", (len(pk),))
        else:
            s = to_numpy(pred.get("score", 1.0)).reshape(-1)
            if s.size != 1:
                raise MetricInputError(f"pred['score'] must be one number, got shape {s.shape}")
            ps = as_float_array(s, "pred['score']", (1,)).repeat(len(pk))
        gk = _keypoint_sets(target, "target")
        if "boxes" in target:
            gb = as_float_array(target["boxes"], "target['boxes']", (len(gk), 4))
        else:
            gb = as_float_array(get_field(target, "box", "target", "boxes"), "target['box']", (4,)).reshape(1, 4)
            if len(gk) != 1:
                raise MetricInputError(f"target has {len(gk)} people but one 'box'; use 'boxes' (M, 4)")
        area = target.get("areas", target.get("area"))
        if area is None:
            ga = (gb[:, 2] - gb[:, 0]) * (gb[:, 3] - gb[:, 1])
        else:
            ga = as_float_array(area, "target['area']", (len(gk),) if np.ndim(area) else ()).reshape(-1)
            if len(ga) != len(gk):
                raise MetricInputError(f"target['areas'] has {len(ga)} entries for {len(gk)} people")
        self.records.append({"pk": pk, "ps": ps, "gk": gk, "gb": gb, "ga": ga})
        self._push(grit_kp=grit_keypoint_score(pk, gk))

    def compute(self) -> dict[str, float]:
        keys = ("ap", "ap50", "ap75", "ap_medium", "ap_large", "ar")
        out = {k: math.nan for k in keys}
        out["grit_kp"] = self._mean("grit_kp")
        if not self.records:
            return out
        images, gts, dets = [], [], []
        for img_id, r in enumerate(self.records, start=1):
            images.append({"id": img_id})
            for k, b, a in zip(r["gk"], r["gb"], r["ga"]):
                gts.append({"id": len(gts) + 1, "image_id": img_id, "category_id": 1, "iscrowd": 0,
                            "keypoints": k.reshape(-1).tolist(), "num_keypoints": int((k[:, 2] > 0).sum()),
                            "bbox": _xywh(b), "area": float(a)})
            for k, s in zip(r["pk"], r["ps"]):
                x0, x1, y0, y1 = k[:, 0].min(), k[:, 0].max(), k[:, 1].min(), k[:, 1].max()
                # what COCO.loadRes derives for keypoint results: the extent of all joints
                dets.append({"id": len(dets) + 1, "image_id": img_id, "category_id": 1, "score": float(s),
                             "keypoints": k.reshape(-1).tolist(), "area": float((x1 - x0) * (y1 - y0)),
                             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
        gt = {"images": images, "annotations": gts,
              "categories": [{"id": 1, "name": "person", "keypoints": list(COCO_KEYPOINT_NAMES), "skeleton": []}]}
        stats = run_cocoeval(gt, dets, "keypoints")
        out.update({k: _nan_if_undefined(stats[i]) for k, i in zip(keys, (0, 1, 2, 3, 4, 5))})
        return out


def oks_matrix(pred: np.ndarray, gt: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """OKS of every (pred, gt) person pair: ``pred`` (K, 17, 3), ``gt`` (M, 17, 3), ``areas`` (M,).

    Only labelled ground-truth joints (v > 0) count, with the COCO sigmas
    (``exp(-d^2 / (2 * area * (2 sigma)^2))`` averaged over them).
    """
    var = (2 * COCO_KEYPOINT_SIGMAS) ** 2  # (17,)
    out = np.zeros((len(pred), len(gt)))
    for j, (g, a) in enumerate(zip(gt, areas)):
        vis = g[:, 2] > 0
        if not vis.any():
            continue
        d2 = ((pred[:, :, :2] - g[None, :, :2]) ** 2).sum(-1)  # (K, 17)
        e = d2 / var / (a + np.spacing(1)) / 2
        out[:, j] = np.exp(-e[:, vis]).mean(1)
    return np.nan_to_num(out, nan=0.0)  # a non-finite predicted joint matches nothing


def grit_keypoint_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """GRIT ``kp_metric`` for one image: people without labelled joints are dropped first."""
    gt = gt[(gt[:, :, 2] > 0).any(1)] if len(gt) else gt
    areas = []
    for g in gt:
        lab = g[g[:, 2] > 0, :2]
        areas.append((lab[:, 0].max() - lab[:, 0].min()) * (lab[:, 1].max() - lab[:, 1].min()))
    return grit_matched_score(oks_matrix(pred, gt, np.asarray(areas, dtype=np.float64)))


class BoxAccuracy(UIOMetric):
    """Localisation / referring-expression accuracy.

    pred ``{"boxes": (N, 4) xyxy}``, target ``{"boxes": (M, 4)}`` (or ``{"box": (4,)}``).
    ``acc``: a hit when the first predicted box has IoU >= ``iou_threshold`` with some ground-truth
    box; with no ground truth (localising an absent class) a hit iff nothing is predicted.
    ``grit_loc``: GRIT's localisation score — Hungarian matching of all predicted to all
    ground-truth boxes, ``sum(IoU of matched pairs) / (#pred + #gt - #pairs)`` per image
    (empty/empty = 1; allenai/grit_official ``metrics/localization.py``), averaged over images.
    ``match50``: the largest number of one-to-one pairs with IoU >= ``iou_threshold``, divided by
    ``max(#pred, #gt)`` (empty/empty = 1), averaged over images.
    """

    name = "box_accuracy"

    def __init__(self, iou_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"box_accuracy: iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = float(iou_threshold)
        self._add_score("acc", "grit_loc", "match50")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        pb = _boxes(pred, "prediction")
        gb = _boxes(target, "target")
        iou = box_iou_matrix(pb, gb)  # (N, M)
        if len(gb) == 0:
            hit = len(pb) == 0
        else:
            hit = len(pb) > 0 and bool(iou[0].max() >= self.iou_threshold)
        self._push(acc=float(hit), grit_loc=grit_matched_score(iou), match50=self._match_fraction(iou))

    def _match_fraction(self, iou: np.ndarray) -> float:
        from scipy.optimize import linear_sum_assignment

        n = max(iou.shape)
        if n == 0:
            return 1.0
        if min(iou.shape) == 0:
            return 0.0
        ok = (iou >= self.iou_threshold).astype(np.float64)
        rows, cols = linear_sum_assignment(-ok)  # maximum number of qualifying pairs
        return float(ok[rows, cols].sum() / n)

    def compute(self) -> dict[str, float]:
        return {k: self._mean(k) for k in ("acc", "grit_loc", "match50")}


def _boxes(d: Mapping[str, Any], what: str) -> np.ndarray:
    if "boxes" in d:
        return as_float_array(d["boxes"], f"{what}['boxes']", (None, 4))
    if "box" in d:
        b = d["box"]
        if b is None:
            return np.zeros((0, 4))
        return as_float_array(b, f"{what}['box']", (4,)).reshape(1, 4)
    raise MetricInputError(f"{what} has no 'boxes' key (keys present: {sorted(map(str, d))})")
