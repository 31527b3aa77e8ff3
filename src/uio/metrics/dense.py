"""Dense-output metrics: mask IoU, depth (NYU protocol), surface normals, image similarity."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from uio.metrics.base import (
    MetricInputError,
    UIOMetric,
    as_float_array,
    as_mask_list,
    get_field,
    grit_matched_score,
    mask_iou_matrix,
    to_numpy,
)


class MaskIoU(UIOMetric):
    """Mask IoU for object segmentation.

    pred ``{"masks": list[bool (H, W)]}`` (instances; ``"mask"`` for a single one), target
    ``{"masks": list[bool (H, W)]}`` (or ``"mask"``), optional ``"stuff": bool``. Per example:
    ``iou`` — IoU of the union of predicted vs. union of ground-truth masks (both empty = 1, the
    correct answer for a class that is absent); ``instance_iou`` — GRIT's instance score (Hungarian
    matching on IoU, ``sum(IoU of pairs) / (#pred + #gt - #pairs)``); ``grit_seg`` — GRIT's
    segmentation score (the union form for "stuff" targets, else the instance form). Means over
    examples.
    """

    name = "mask_iou"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_score("iou", "instance_iou", "grit_seg")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        pm = as_mask_list(get_field(pred, "masks", "prediction", "mask"), "pred['masks']")
        gm = as_mask_list(get_field(target, "masks", "target", "mask"), "target['masks']")
        shapes = {m.shape for m in pm + gm}
        if len(shapes) > 1:
            raise MetricInputError(
                f"all masks of an example must have the same (H, W); got {sorted(shapes)} "
                "(predictions are expected at the input image's size)"
            )
        pu = np.logical_or.reduce(pm) if pm else None
        gu = np.logical_or.reduce(gm) if gm else None
        self._push(
            iou=union_iou(pu, gu),
            instance_iou=grit_matched_score(mask_iou_matrix(pm, gm)),
            grit_seg=self._grit(pm, gm, pu, gu, bool(target.get("stuff", False))),
        )

    @staticmethod
    def _grit(pm: list, gm: list, pu: Any, gu: Any, stuff: bool) -> float:
        if stuff:  # GRIT merges "stuff" instances into one mask on both sides
            pm = [pu] if pm else []
            gm = [gu] if gm else []
        return grit_matched_score(mask_iou_matrix(pm, gm))

    def compute(self) -> dict[str, float]:
        return {k: self._mean(k) for k in ("iou", "instance_iou", "grit_seg")}


def union_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """IoU of two masks (``None`` = empty); two empty masks score 1."""
    na = 0 if a is None else int(a.sum())
    nb = 0 if b is None else int(b.sum())
    if na == 0 and nb == 0:
        return 1.0
    if a is None or b is None:
        return 0.0
    inter = int(np.logical_and(a, b).sum())
    return inter / (na + nb - inter)


# NYU Depth v2 evaluation crop of Eigen et al. (2014), for 480 x 640 maps: rows 45:471, cols 41:601
EIGEN_CROP = (45, 471, 41, 601)


def _depth_map(x: Any, field: str) -> np.ndarray:
    a = to_numpy(x)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return as_float_array(a, field, (None, None))


class DepthMetric(UIOMetric):
    """Monocular depth errors, NYU protocol (Eigen et al.; as in the BTS / AdaBins evaluations).

    pred ``{"depth": float (H, W) metres}``, target ``{"depth": (H, W)}`` (0 = invalid) with an
    optional ``"max_depth"``. Valid pixels: finite ground truth with ``min_depth < gt <= max_depth``
    (``max_depth``: this metric's argument, else the target's, else unbounded), inside the Eigen crop
    when ``crop="eigen"``; predictions are clipped to ``[min_depth, max_depth]``. Errors are computed
    per image and averaged over images (images without valid pixels are skipped):
    ``rmse, abs_rel, sq_rel, rmse_log, log10, delta1, delta2, delta3`` (delta_k: fraction with
    ``max(p/g, g/p) < 1.25**k``).
    """

    name = "depth"
    _KEYS = ("rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "delta1", "delta2", "delta3")

    def __init__(self, min_depth: float = 1e-3, max_depth: float | None = None, crop: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if crop not in (None, "eigen"):
            raise ValueError(f"depth: crop must be None or 'eigen', got {crop!r}")
        if min_depth <= 0 or (max_depth is not None and max_depth <= min_depth):
            raise ValueError(f"depth: need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth, self.max_depth, self.crop = float(min_depth), max_depth, crop
        self._add_score(*self._KEYS)

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        p = _depth_map(get_field(pred, "depth", "prediction"), "pred['depth']")
        g = _depth_map(get_field(target, "depth", "target"), "target['depth']")
        if p.shape != g.shape:
            raise MetricInputError(f"pred['depth'] has shape {p.shape} but target['depth'] has {g.shape}; "
                                   "predictions must be resized to the ground truth's size")
        max_d = self.max_depth if self.max_depth is not None else target.get("max_depth")
        max_d = math.inf if max_d is None else float(max_d)
        valid = np.isfinite(g) & (g > self.min_depth) & (g <= max_d)
        if self.crop == "eigen":
            if g.shape != (480, 640):
                raise MetricInputError(f"crop='eigen' needs 480 x 640 NYU depth maps, got {g.shape}")
            crop = np.zeros_like(valid)
            r0, r1, c0, c1 = EIGEN_CROP
            crop[r0:r1, c0:c1] = True
            valid &= crop
        if not valid.any():
            return
        hi = max_d if math.isfinite(max_d) else np.finfo(np.float64).max
        p = np.clip(np.nan_to_num(p[valid], nan=self.min_depth, posinf=hi, neginf=self.min_depth), self.min_depth, hi)
        g = g[valid]
        ratio = np.maximum(p / g, g / p)
        self._push(
            rmse=np.sqrt(np.mean((p - g) ** 2)),
            abs_rel=np.mean(np.abs(p - g) / g),
            sq_rel=np.mean((p - g) ** 2 / g),
            rmse_log=np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
            log10=np.mean(np.abs(np.log10(p) - np.log10(g))),
            delta1=np.mean(ratio < 1.25),
            delta2=np.mean(ratio < 1.25**2),
            delta3=np.mean(ratio < 1.25**3),
        )

    def compute(self) -> dict[str, float]:
        return {k: self._mean(k) for k in self._KEYS}


_BIN_DEG = 0.01  # histogram resolution of the pooled angular errors (the median is exact to this)
_N_BINS = int(round(180 / _BIN_DEG)) + 1


class SurfaceNormalMetric(UIOMetric):
    """Surface-normal angular errors in degrees, pooled over all valid pixels of all images.

    pred ``{"normals": float (H, W, 3)}``, target ``{"normals": (H, W, 3)}`` (unit vectors) with an
    optional ``"valid": bool (H, W)``; ground-truth vectors of zero length or non-finite are invalid.
    Both sides are normalised; a zero-length prediction counts as 90 degrees off.
    Returns ``mean, median, rmse`` and ``pct_11.25, pct_22.5, pct_30`` (percent of pixels with
    error below the threshold), as in the NYU normal benchmarks (Fouhey et al.), plus ``grit_sn``:
    GRIT's per-image fraction under 11.25 degrees after the best rotation of the prediction onto
    the ground truth, averaged over images (an image with no valid pixel scores 1).
    The pooled statistics are kept as a 0.01-degree histogram, so they reduce across ranks by
    summation; the thresholds fall on bin edges (exact), the median is exact to 0.01 degree.
    """

    name = "surface_normals"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("hist", default=torch.zeros(_N_BINS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("err_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("err_sq_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self._add_score("grit_sn")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        p = as_float_array(get_field(pred, "normals", "prediction"), "pred['normals']", (None, None, 3))
        g = as_float_array(get_field(target, "normals", "target"), "target['normals']", (None, None, 3))
        if p.shape != g.shape:
            raise MetricInputError(f"pred['normals'] has shape {p.shape} but target['normals'] has {g.shape}")
        gn = np.linalg.norm(g, axis=-1)  # (H, W)
        valid = np.isfinite(gn) & (gn > 1e-6)
        if target.get("valid") is not None:
            v = to_numpy(target["valid"]).astype(bool)
            if v.shape != valid.shape:
                raise MetricInputError(f"target['valid'] must have shape {valid.shape}, got {v.shape}")
            valid &= v
        p = np.nan_to_num(p[valid], nan=0.0, posinf=0.0, neginf=0.0)  # (n, 3)
        g = g[valid] / gn[valid][:, None]
        err = angular_error_deg(p, g)
        idx = np.minimum((err / _BIN_DEG).astype(np.int64), _N_BINS - 1)
        self.hist += torch.from_numpy(np.bincount(idx, minlength=_N_BINS).astype(np.float64)).to(self.hist.device)
        self.err_sum += float(err.sum())
        self.err_sq_sum += float((err**2).sum())
        self._push(grit_sn=grit_normal_score(p, g))

    def compute(self) -> dict[str, float]:
        hist = self.hist.detach().cpu().numpy()
        n = float(hist.sum())
        if n == 0:
            return {k: math.nan for k in ("mean", "median", "rmse", "pct_11.25", "pct_22.5", "pct_30", "grit_sn")}
        cum = np.cumsum(hist)
        out = {
            "mean": float(self.err_sum) / n,
            "median": _hist_median(hist, cum, n),
            "rmse": math.sqrt(float(self.err_sq_sum) / n),
        }
        for t in (11.25, 22.5, 30.0):
            out[f"pct_{t:g}"] = 100.0 * float(cum[int(round(t / _BIN_DEG)) - 1]) / n
        out["grit_sn"] = self._mean("grit_sn")
        return out


def angular_error_deg(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Angle in degrees between rows of ``p`` (n, 3) and unit rows of ``g`` (n, 3); |p| = 0 -> 90."""
    pn = np.linalg.norm(p, axis=-1)
    cos = np.where(pn > 0, (p * g).sum(-1) / np.where(pn > 0, pn, 1.0), 0.0)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def grit_normal_score(p: np.ndarray, g: np.ndarray) -> float:
    """GRIT ``sn_metric``: fraction of pixels under 11.25 degrees after aligning ``p`` to ``g``."""
    from scipy.spatial.transform import Rotation

    if len(g) == 0:
        return 1.0
    pn = np.linalg.norm(p, axis=-1)
    ok = pn > 0
    if ok.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal rotation is not uniquely defined" for flat scenes
            rot, _ = Rotation.align_vectors(g[ok], p[ok] / pn[ok][:, None])
        p = rot.apply(p)
    return float(np.mean(angular_error_deg(p, g) < 11.25))


def _hist_median(hist: np.ndarray, cum: np.ndarray, n: float) -> float:
    """Median of the pooled errors (mean of the two middle order statistics for even n)."""

    def quantile_at(rank: float) -> float:  # value of the rank-th (0-based) order statistic
        b = int(np.searchsorted(cum, rank + 1, side="left"))
        before = cum[b - 1] if b > 0 else 0.0
        return (b + (rank - before + 0.5) / hist[b]) * _BIN_DEG

    lo, hi = math.floor((n - 1) / 2), math.ceil((n - 1) / 2)
    return float(0.5 * (quantile_at(lo) + quantile_at(hi)))


class ImageSimilarity(UIOMetric):
    """Pixel agreement of generated images with the reference.

    pred ``{"image": uint8 (H, W, 3)}``, target ``{"image": uint8 (H, W, 3)}`` (same size).
    Per image ``psnr`` (dB on the 0..255 range, capped at ``max_psnr`` so identical images don't
    give infinity) and ``l1`` (mean absolute difference on a 0..1 scale), averaged over images.
    """

    name = "image_similarity"

    def __init__(self, max_psnr: float = 100.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_psnr = float(max_psnr)
        self._add_score("psnr", "l1")

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        a = _uint8_image(get_field(pred, "image", "prediction"), "pred['image']")
        b = _uint8_image(get_field(target, "image", "target"), "target['image']")
        if a.shape != b.shape:
            raise MetricInputError(f"pred['image'] has shape {a.shape} but target['image'] has {b.shape}")
        d = a.astype(np.float64) - b.astype(np.float64)
        mse = float(np.mean(d**2))
        psnr = self.max_psnr if mse == 0 else min(self.max_psnr, 10 * math.log10(255.0**2 / mse))
        self._push(psnr=psnr, l1=float(np.mean(np.abs(d))) / 255.0)

    def compute(self) -> dict[str, float]:
        return {"psnr": self._mean("psnr"), "l1": self._mean("l1")}


def _uint8_image(x: Any, field: str) -> np.ndarray:
    a = to_numpy(x)
    if a.dtype != np.uint8:
        raise MetricInputError(f"{field} must be a uint8 (H, W, 3) image, got dtype {a.dtype}")
    if a.ndim not in (2, 3):
        raise MetricInputError(f"{field} must be a uint8 (H, W, 3) image, got shape {a.shape}")
    return a
