"""Shared machinery for the task metrics: a torchmetrics base class and input checking.

Every metric takes ``update(preds: list[dict], targets: list[dict])`` (one dict per example, the
formats are documented on each class) and ``compute() -> dict[str, float]`` with flat keys.

Two kinds of state are used, both safe under DDP:

* per-example scores (``_add_score``): lists of float64 tensors reduced with ``"cat"`` — the
  standard torchmetrics route;
* per-example records (``_add_records``) for corpus-level protocols (COCO AP, CIDEr's document
  frequencies, corpus BLEU): lists of plain Python/numpy objects, gathered across ranks with
  ``torch.distributed.all_gather_object`` (the route torchmetrics' own ``MeanAveragePrecision``
  takes for its mask states).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors


class MetricInputError(ValueError):
    """A prediction or target does not have the documented format."""


class UIOMetric(Metric):
    """Base class: validates the batch, dispatches per example, keeps scores and records.

    Subclasses set ``name`` (the registry key), implement ``_update_one(pred, target)`` and
    ``compute()``.
    """

    name: str = ""
    full_state_update = False
    is_differentiable = False
    higher_is_better = None  # mixed: each metric reports several keys

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._score_names: list[str] = []
        self._record_names: list[str] = []

    # -- state helpers -------------------------------------------------------------------------
    def _add_score(self, *names: str) -> None:
        """Per-example float scores, concatenated across updates and ranks."""
        for n in names:
            self.add_state(f"s_{n}", default=[], dist_reduce_fx="cat")
            self._score_names.append(n)

    def _add_records(self, *names: str) -> None:
        """Per-example Python objects (no tensors inside), gathered across ranks as objects."""
        for n in names:
            self.add_state(n, default=[], dist_reduce_fx=None)
            self._record_names.append(n)

    def _push(self, **scores: float) -> None:
        for n, v in scores.items():
            getattr(self, f"s_{n}").append(torch.tensor([float(v)], dtype=torch.float64, device=self.device))

    def _scores(self, n: str) -> np.ndarray:
        """All per-example values of score ``n`` (after sync), as float64 numpy."""
        vals = getattr(self, f"s_{n}")
        if isinstance(vals, list):
            if not vals:
                return np.zeros((0,), dtype=np.float64)
            vals = dim_zero_cat(vals)
        return vals.detach().to("cpu", torch.float64).numpy().reshape(-1)

    def _mean(self, n: str) -> float:
        v = self._scores(n)
        return float(v.mean()) if v.size else math.nan

    # -- update / sync -------------------------------------------------------------------------
    def update(self, preds: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: ``preds[i]`` is scored against ``targets[i]``."""
        if isinstance(preds, Mapping) or isinstance(targets, Mapping):
            raise MetricInputError(
                f"{self.name}: update(preds, targets) takes two lists of dicts (one per example), "
                f"got {type(preds).__name__} and {type(targets).__name__}"
            )
        preds, targets = list(preds), list(targets)
        if len(preds) != len(targets):
            raise MetricInputError(
                f"{self.name}: got {len(preds)} predictions but {len(targets)} targets; expected the same number"
            )
        for i, (p, t) in enumerate(zip(preds, targets)):
            if not isinstance(p, Mapping) or not isinstance(t, Mapping):
                raise MetricInputError(
                    f"{self.name}: example {i}: prediction and target must be dicts, "
                    f"got {type(p).__name__} and {type(t).__name__}"
                )
            try:
                self._update_one(p, t)
            except MetricInputError as e:
                raise MetricInputError(f"{self.name}: example {i}: {e}") from None

    def _update_one(self, pred: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        # tensor states the torchmetrics way; record states as Python objects.
        # A rank without examples would otherwise send torchmetrics' empty placeholder in the
        # default dtype (float32) while the others send float64: give it an empty float64 tensor.
        for n in self._score_names:
            if not getattr(self, f"s_{n}"):
                getattr(self, f"s_{n}").append(torch.zeros(0, dtype=torch.float64, device=self.device))
        saved = {n: self._reductions.pop(n) for n in self._record_names}
        try:
            super()._sync_dist(dist_sync_fn=dist_sync_fn, process_group=process_group)
        finally:
            self._reductions.update(saved)
        if not self._record_names:
            return
        import torch.distributed as dist

        group = process_group or self.process_group
        world = dist.get_world_size(group=group)
        for n in self._record_names:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, list(getattr(self, n)), group=group)
            setattr(self, n, [r for part in gathered for r in part])

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        # records hold numpy/Python objects: never move or cast them
        return super()._apply(fn, exclude_state=tuple(exclude_state) + tuple(self._record_names))


# ----------------------------------------------------------------------------------------------
# input checking: clear errors naming the field and the expected format
# ----------------------------------------------------------------------------------------------
def get_field(d: Mapping[str, Any], key: str, what: str, *alternatives: str) -> Any:
    """``d[key]`` (or the first alternative key present), else a clear error."""
    for k in (key, *alternatives):
        if k in d:
            return d[k]
    keys = " or ".join(repr(k) for k in (key, *alternatives))
    raise MetricInputError(f"{what} has no {keys} key (keys present: {sorted(map(str, d))})")


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def as_float_array(x: Any, field: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """A float64 array with the given shape (``None`` = any size); empty lists become ``(0, ...)``."""
    try:
        a = to_numpy(x)
        if a.dtype == object:
            raise ValueError
        a = a.astype(np.float64)
    except (TypeError, ValueError):
        raise MetricInputError(
            f"{field} must be numeric with shape {_fmt_shape(shape)}, got {type(x).__name__}"
        ) from None
    if a.size == 0 and shape and shape[0] is None:
        return np.zeros((0, *[s or 0 for s in shape[1:]]), dtype=np.float64)
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        raise MetricInputError(f"{field} must have shape {_fmt_shape(shape)}, got {tuple(a.shape)}")
    return a


def as_mask(x: Any, field: str) -> np.ndarray:
    """A 2-D boolean mask ``(H, W)``."""
    a = to_numpy(x)
    if a.ndim != 2:
        raise MetricInputError(f"{field} must be a 2-D mask (H, W), got shape {tuple(a.shape)}")
    if a.dtype != np.bool_:
        if not np.issubdtype(a.dtype, np.number):
            raise MetricInputError(f"{field} must be a boolean mask, got dtype {a.dtype}")
        a = a != 0
    return a


def as_mask_list(x: Any, field: str) -> list[np.ndarray]:
    """A list of ``(H, W)`` masks; also accepts one ``(N, H, W)`` array or a single ``(H, W)`` mask."""
    if x is None:
        return []
    if isinstance(x, (np.ndarray, torch.Tensor)):
        a = to_numpy(x)
        if a.ndim == 2:
            return [as_mask(a, field)]
        if a.ndim == 3:
            return [as_mask(m, f"{field}[{i}]") for i, m in enumerate(a)]
        raise MetricInputError(f"{field} must be a list of (H, W) masks or an (N, H, W) array, got shape {a.shape}")
    if not isinstance(x, Sequence):
        raise MetricInputError(f"{field} must be a list of (H, W) boolean masks, got {type(x).__name__}")
    return [as_mask(m, f"{field}[{i}]") for i, m in enumerate(x)]


def as_text(x: Any, field: str) -> str:
    if x is None:
        return ""
    if not isinstance(x, str):
        raise MetricInputError(f"{field} must be a string, got {type(x).__name__}")
    return x


def as_text_list(x: Any, field: str, allow_empty: bool = True) -> list[str]:
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, Sequence) or not all(isinstance(s, str) for s in x):
        raise MetricInputError(f"{field} must be a list of strings, got {x!r:.80}")
    if not allow_empty and len(x) == 0:
        raise MetricInputError(f"{field} must hold at least one string, got an empty list")
    return list(x)


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("N" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# ----------------------------------------------------------------------------------------------
# geometry shared by several metrics
# ----------------------------------------------------------------------------------------------
def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box pair: ``a`` (N, 4), ``b`` (M, 4) xyxy -> (N, M). Degenerate boxes have area 0."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (N,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (M,)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def mask_iou_matrix(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """IoU of every mask pair -> (len(a), len(b)); two empty masks have IoU 0 here."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    fa = np.stack([m.reshape(-1) for m in a]).astype(np.float32)  # (N, HW)
    fb = np.stack([m.reshape(-1) for m in b]).astype(np.float32)  # (M, HW)
    inter = fa @ fb.T  # (N, M)
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0).astype(np.float64)


def grit_matched_score(sim: np.ndarray) -> float:
    """GRIT's per-image instance score from a (num_pred, num_gt) similarity matrix (IoU or OKS).

    Hungarian assignment maximising the total similarity, pairs with similarity > 0 kept; the score
    is ``sum(similarity of pairs) / (num_pred + num_gt - num_pairs)``. Empty/empty scores 1, one
    side empty scores 0 (GRIT ``loc_metric`` / ``seg_metric`` / ``kp_metric``).
    """
    from scipy.optimize import linear_sum_assignment

    n_pred, n_gt = sim.shape
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    rows, cols = linear_sum_assignment(-sim)
    vals = sim[rows, cols]
    vals = vals[vals > 0]
    return float(vals.sum() / (n_pred + n_gt - len(vals)))
