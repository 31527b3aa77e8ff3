"""GRIT-style aggregate: the seven GRIT task scores and their average (Gupta et al. 2022).

GRIT scores every sample in [0, 1], averages per task, reports x100, and ranks by the mean over
its seven tasks, a task without predictions counting 0 (``evaluate.py`` of allenai/grit_official).
Here each GRIT task reads the per-sample GRIT score of one of our metrics:

| GRIT task      | uio task               | metric            | key        |
|----------------|------------------------|-------------------|------------|
| categorization | region_classification  | accuracy          | acc        |
| localization   | object_localization    | box_accuracy      | grit_loc   |
| vqa            | vqa                    | vqa_accuracy      | grit_acc   |
| refexp         | referring_expression   | box_accuracy      | acc        |
| segmentation   | object_segmentation    | mask_iou          | grit_seg   |
| keypoint       | keypoints              | keypoint_oks_ap   | grit_kp    |
| normal         | surface_normals        | surface_normals   | grit_sn    |

GRIT's own splits (same/new source, concept groups, distortions) need its sample metadata and are
not reproduced; on GRIT data, the "agg" partition is the mean of the sameSrc and newSrc means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from uio.metrics import build_metric

GRIT_TASKS: dict[str, tuple[str, str]] = {
    "categorization": ("accuracy", "acc"),
    "localization": ("box_accuracy", "grit_loc"),
    "vqa": ("vqa_accuracy", "grit_acc"),
    "refexp": ("box_accuracy", "acc"),
    "segmentation": ("mask_iou", "grit_seg"),
    "keypoint": ("keypoint_oks_ap", "grit_kp"),
    "normal": ("surface_normals", "grit_sn"),
}
UIO_TO_GRIT: dict[str, str] = {
    "region_classification": "categorization",
    "object_localization": "localization",
    "vqa": "vqa",
    "referring_expression": "refexp",
    "object_segmentation": "segmentation",
    "keypoints": "keypoint",
    "surface_normals": "normal",
}


def grit_task(name: str) -> str:
    """The GRIT task for a GRIT or uio task name."""
    if name in GRIT_TASKS:
        return name
    if name in UIO_TO_GRIT:
        return UIO_TO_GRIT[name]
    raise KeyError(
        f"{name!r} is not a GRIT task; expected one of {sorted(GRIT_TASKS)} or the uio tasks {sorted(UIO_TO_GRIT)}"
    )


def grit_scores(results: Mapping[str, Mapping[str, float] | float], missing_as_zero: bool = True) -> dict[str, float]:
    """Per-task GRIT scores (x100) and ``overall``, their mean over the seven tasks.

    ``results`` maps a GRIT or uio task name to that task's ``compute()`` dict (the GRIT key is
    read from it) or directly to a score in [0, 1]. Missing tasks count 0 in ``overall`` when
    ``missing_as_zero`` (GRIT's rule), otherwise ``overall`` averages the tasks present.
    """
    out: dict[str, float] = {}
    for name, res in results.items():
        task = grit_task(name)
        if task in out:
            raise ValueError(f"GRIT task {task!r} given twice (as {name!r})")
        key = GRIT_TASKS[task][1]
        if isinstance(res, Mapping):
            if key not in res:
                raise KeyError(f"results for {name!r} have no {key!r} (keys: {sorted(res)}); "
                               f"expected the output of the {GRIT_TASKS[task][0]!r} metric")
            res = res[key]
        out[task] = 100.0 * float(res)
    present = [v for v in out.values() if not math.isnan(v)]
    if missing_as_zero:
        out["overall"] = sum(present) / len(GRIT_TASKS)
    else:
        out["overall"] = sum(present) / len(present) if present else math.nan
    return out


class GritEvaluator(torch.nn.Module):
    """Collects the seven GRIT task metrics; ``compute()`` returns :func:`grit_scores`."""

    def __init__(self, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        names = [grit_task(t) for t in (tasks or GRIT_TASKS)]
        self.metrics = torch.nn.ModuleDict({t: build_metric(GRIT_TASKS[t][0]) for t in names})

    def update(self, task: str, preds: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        t = grit_task(task)
        if t not in self.metrics:
            raise KeyError(f"GRIT task {t!r} is not evaluated here; evaluating {sorted(self.metrics)}")
        self.metrics[t].update(preds, targets)

    def compute(self, missing_as_zero: bool = True) -> dict[str, float]:
        done = {t: m.compute() for t, m in self.metrics.items() if m.update_count > 0}
        return grit_scores(done, missing_as_zero=missing_as_zero)

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
