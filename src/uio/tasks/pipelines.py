"""Multi-step inference that the paper builds out of single tasks.

* :func:`keypoints_two_step` (paper A.1.2): localize the people with the object-localization
  prompt, then ask for the 17 joints of each detected region.
* :func:`answer_with_windows` (paper A.1.7): question answering over a context longer than the
  encoder, one generation per sliding window, keeping the most confident answer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from uio.processing import Processor
from uio.tasks.base import clean_tokens
from uio.tasks.sparse import NUM_KEYPOINTS

if TYPE_CHECKING:  # pragma: no cover
    from uio.model import Model


def _collate(samples: list[dict[str, Any]], processor: Processor) -> dict[str, Any]:
    from uio.data.collate import collate

    return collate(samples, processor.max_input_len, processor.max_target_len)


def _to_device(batch: dict[str, Any], model: "Model") -> dict[str, Any]:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def keypoints_two_step(model: "Model", image: Any, processor: Processor, label: str = "person",
                       max_people: int = 20, batch_size: int = 16, generator: torch.Generator | None = None,
                       loc_kwargs: Mapping[str, Any] | None = None, kp_kwargs: Mapping[str, Any] | None = None
                       ) -> dict[str, np.ndarray]:
    """All people's keypoints in ``image``: ``{"keypoints": (K, 17, 3) x y v, "scores": (K,),
    "boxes": (K, 4)}`` (the format ``keypoint_oks_ap`` takes for several people). A person's score is
    its localization rank score (earlier boxes are more confident). ``loc_kwargs`` / ``kp_kwargs``
    override the two tasks' generation settings."""
    from uio.tasks import get_task

    loc, kp = get_task("object_localization"), get_task("keypoints")
    s = loc.encode({"image": image, "boxes": [], "label": label}, processor, train=False)
    gen = model.generate(_to_device(_collate([s], processor), model), allowed_tokens=loc.allowed_tokens(processor),
                         generator=generator, **{**loc.generation_config.to_kwargs(), **(loc_kwargs or {})})
    found = loc.decode(gen.text_tokens[0].cpu(), None, s["meta"], processor)
    boxes = found["boxes"][:max_people]
    scores = found["scores"][:max_people]
    # degenerate boxes (zero width or height) cannot hold a person
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores = boxes[keep], scores[keep]
    out = {"keypoints": np.zeros((0, NUM_KEYPOINTS, 3)), "scores": np.zeros(0), "boxes": np.zeros((0, 4))}
    if not len(boxes):
        return out
    placeholder = [[0.0, 0.0, 0]] * NUM_KEYPOINTS  # no ground truth at inference; only the inputs are used
    samples = [kp.encode({"image": image, "box": b, "keypoints": placeholder}, processor, train=False) for b in boxes]
    points = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        g = model.generate(_to_device(_collate(chunk, processor), model), allowed_tokens=kp.allowed_tokens(processor),
                           generator=generator, **{**kp.generation_config.to_kwargs(), **(kp_kwargs or {})})
        points += [kp.decode(g.text_tokens[j].cpu(), None, c["meta"], processor)["keypoints"] for j, c in enumerate(chunk)]
    return {"keypoints": np.stack(points), "scores": np.asarray(scores, dtype=np.float64), "boxes": boxes}


def answer_with_windows(model: "Model", example: Mapping[str, Any], processor: Processor, batch_size: int = 8,
                        generator: torch.Generator | None = None, **generate_kwargs: Any) -> dict[str, Any]:
    """Answer ``example["question"]`` over every window of ``example["context"]``; returns
    ``{"answer", "window", "score"}`` for the answer of highest mean token log-likelihood (a
    non-empty answer beats an empty one), plus every window's ``answers`` and ``scores``.
    ``example["answers"]`` may be absent; ``generate_kwargs`` override the task's generation settings."""
    from uio.tasks import get_task

    task = get_task("question_answering")
    ex = dict(example)
    ex.setdefault("answers", ["?"])  # not used for inference
    samples = task.encode_windows(ex, processor)
    kw = {**task.generation_config.to_kwargs(), **generate_kwargs}
    results: list[tuple[bool, float, int, str]] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        gen = model.generate(_to_device(_collate(chunk, processor), model), generator=generator, **kw)
        for j, s in enumerate(chunk):
            answer = task.decode(gen.text_tokens[j].cpu(), None, s["meta"], processor)["answer"]
            n = len(clean_tokens(gen.text_tokens[j].cpu(), processor.vocab)) + 1  # + EOS
            score = float(gen.scores[j]) / n if gen.scores is not None else 0.0
            results.append((bool(answer), score, s["meta"]["window"], answer))
    best = max(results, key=lambda r: (r[0], r[1]))
    return {"answer": best[3], "window": best[2], "score": best[1], "answers": [r[3] for r in results],
            "scores": [r[1] for r in results]}
