"""Registry of every Unified-IO task (paper Table 1 / appendix A.1).

    from uio.tasks import get_task
    task = get_task("depth")
    sample = task.encode(example, processor, rng, train=True)   # design.md contract 2
    pred = task.decode(text_tokens, image, sample["meta"], processor)

See docs/tasks.md for the table of prompts, output formats and metrics.
"""
from __future__ import annotations

from uio.tasks.base import GROUPS, GenerationConfig, Task
from uio.tasks.captioning import ImageCaptioningTask, RegionCaptioningTask
from uio.tasks.classification import ImageClassificationTask, RegionClassificationTask
from uio.tasks.dense import DepthTask, ObjectSegmentationTask, SurfaceNormalsTask
from uio.tasks.image_synthesis import ImageGenerationTask, ImageInpaintingTask, SegmentationToImageTask
from uio.tasks.nlp import QuestionAnsweringTask, SummarizationTask, TextClassificationTask
from uio.tasks.pretraining import MaskedImageDenoisingTask, SpanCorruptionTask
from uio.tasks.sparse import (
    DetectionTask, KeypointsTask, ObjectLocalizationTask, ReferringExpressionTask, no_coordinates_id,
)
from uio.tasks.vision_language import GroundedVQATask, RelationshipTask, VQATask

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        ImageGenerationTask(), ImageInpaintingTask(), SegmentationToImageTask(),
        DetectionTask(), ObjectLocalizationTask(), ReferringExpressionTask(), KeypointsTask(),
        ObjectSegmentationTask(), DepthTask(), SurfaceNormalsTask(),
        ImageClassificationTask(), RegionClassificationTask(),
        ImageCaptioningTask(), RegionCaptioningTask(),
        VQATask(), RelationshipTask(), GroundedVQATask(),
        TextClassificationTask(), QuestionAnsweringTask(), SummarizationTask(),
        SpanCorruptionTask(), MaskedImageDenoisingTask(),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; ValueError listing the known names otherwise."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def list_tasks(group: str | None = None) -> list[str]:
    """Task names, optionally only those of one group."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown task group {group!r}; known groups: {', '.join(GROUPS)}")
    return [n for n, t in TASKS.items() if group is None or t.group == group]


__all__ = ["TASKS", "GROUPS", "GenerationConfig", "Task", "get_task", "list_tasks", "no_coordinates_id"]
