"""Task metrics of Unified-IO (issue 4, item 4): a registry of torchmetrics metrics.

``build_metric(name, **kwargs)`` builds one; every metric takes
``update(preds: list[dict], targets: list[dict])`` and returns flat float dicts from ``compute()``.
States are per-example tensors (``"cat"``) or object records gathered across ranks, so metrics work
under DDP. Scores in [0, 1] unless named ``pct_*`` (percent), ``psnr`` (dB), ``cider`` (x10 scale)
or errors in the data's unit (depth metres, normal degrees).

| name                    | prediction / target keys                      | keys returned                       |
|-------------------------|-----------------------------------------------|-------------------------------------|
| detection_map           | boxes, labels, scores / boxes, labels         | map, map_50, map_75, ...            |
| box_accuracy            | boxes / boxes                                 | acc, grit_loc                       |
| keypoint_oks_ap         | keypoints, score / keypoints, box             | ap, ap50, ap75, ..., grit_kp        |
| mask_iou                | masks / masks                                 | iou, instance_iou, grit_seg         |
| depth                   | depth / depth (max_depth)                     | rmse, abs_rel, delta1, ...          |
| surface_normals         | normals / normals (valid)                     | mean, median, pct_11.25, ...        |
| vqa_accuracy            | answer / answers                              | acc, grit_acc                       |
| captioning              | text / captions                               | cider, bleu4                        |
| accuracy                | label / label                                 | acc                                 |
| squad                   | answer / answers                              | em, f1                              |
| rouge                   | text / summary                                | rouge1, rouge2, rougeL              |
| image_similarity        | image / image                                 | psnr, l1                            |
| grounded_vqa            | answer, masks / answers, mask                 | acc, mask_iou                       |
| relationship_accuracy   | predicate / predicate                         | acc                                 |

``uio.metrics.grit`` aggregates the GRIT task scores.
"""

from __future__ import annotations

from typing import Any

from uio.metrics.base import MetricInputError, UIOMetric
from uio.metrics.captioning import CaptionMetric, caption_tokenize, cider_d, corpus_bleu
from uio.metrics.dense import DepthMetric, ImageSimilarity, MaskIoU, SurfaceNormalMetric
from uio.metrics.detection import BoxAccuracy, DetectionMAP, KeypointOKSAP
from uio.metrics.text import (
    Accuracy,
    GroundedVQA,
    RelationshipAccuracy,
    RougeMetric,
    SquadMetric,
    VQAAccuracy,
    squad_normalize,
    vqa_accuracy,
    vqa_normalize,
)

METRICS: dict[str, type[UIOMetric]] = {
    cls.name: cls
    for cls in (
        DetectionMAP,
        BoxAccuracy,
        KeypointOKSAP,
        MaskIoU,
        DepthMetric,
        SurfaceNormalMetric,
        VQAAccuracy,
        CaptionMetric,
        Accuracy,
        SquadMetric,
        RougeMetric,
        ImageSimilarity,
        GroundedVQA,
        RelationshipAccuracy,
    )
}


def build_metric(name: str, **kwargs: Any) -> UIOMetric:
    """A fresh metric by registry name; unknown names list the known ones."""
    try:
        cls = METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None
    return cls(**kwargs)


def list_metrics() -> list[str]:
    return sorted(METRICS)


__all__ = [
    "METRICS",
    "MetricInputError",
    "UIOMetric",
    "build_metric",
    "list_metrics",
    "caption_tokenize",
    "cider_d",
    "corpus_bleu",
    "squad_normalize",
    "vqa_accuracy",
    "vqa_normalize",
    *(c.__name__ for c in METRICS.values()),
]
