"""The inference API: one :class:`uio.Model` method per Unified-IO task.

>>> model = uio.Model.from_pretrained("runs/tiny_multitask/model")
>>> model.caption(photo)                                   # 'a red cube left of a person'
>>> dets = model.detect(photo)                             # Detections(boxes (N, 4) xyxy, labels, scores)
>>> model.vqa([img1, img2], "what color is the cube ?")    # one answer per image
>>> model.depth(photo).depth                               # float32 (H, W) metres
>>> model.to("cuda", torch.bfloat16).segment(photo, "person").masks   # bool (N, H, W)

Every image argument takes a PIL image, a numpy array (``(H, W, 3)`` / ``(H, W)`` uint8, or float
in [0, 1]) or a torch tensor (``(3, H, W)`` uint8 or float in [0, 1]); a list of those, a numpy
``(B, H, W, 3)`` array or a ``(B, 3, H, W)`` tensor is a batch, and the method then returns a list
(one result per image). Per-image arguments (questions, labels, boxes) are one value for every
image or one per image. Results are in the input image's pixels: boxes ``[x1, y1, x2, y2]``,
masks and dense maps at the input size.

Each method encodes its inputs with the task's own ``encode`` (the prompts the model was trained
with), decodes with the task's generation settings (``uio.tasks.get_task(name).generation_config``,
constrained by the task's allowed tokens) and parses the output with the task's ``decode``.
Keyword arguments of :meth:`uio.Model.generate` override the settings (``max_text_len``,
``method``, ``num_beams``, ``top_p``, ``temperature``, ``generator``); ``seed=`` makes the
sampling tasks (keypoints, dense maps, images) reproducible.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

import numpy as np
import torch

from uio.processing import Processor, to_float_image, to_uint8
from uio.tasks.sparse import COCO_KEYPOINTS, NUM_KEYPOINTS

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = [
    "InferenceMixin", "Detections", "Poses", "Segmentation", "DepthMap", "NormalMap", "Classification",
    "GroundedAnswer", "as_image_batch",
]

ImageLike = Union["Image.Image", np.ndarray, torch.Tensor]
GENERATE_KEYS = ("max_text_len", "method", "num_beams", "top_p", "temperature", "generator", "alpha", "use_cache",
                 "num_samples")
DEFAULT_BATCH = 16


# ================================================================================================
# Result types
# ================================================================================================
@dataclass
class Detections:
    """Boxes found in one image.

    ``boxes``: float64 ``(N, 4)`` ``[x1, y1, x2, y2]`` in input-image pixels; ``labels``: N class
    names (the query for :meth:`~InferenceMixin.locate`, the expression for
    :meth:`~InferenceMixin.refer`); ``scores``: ``(N,)`` in (0, 1], the model's generation order
    (the first box is the most confident); ``image_size``: ``(H, W)`` of the input.
    """

    boxes: np.ndarray
    labels: list[str]
    scores: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.boxes)

    def to_coco(self, image_id: int, category_ids: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
        """COCO results entries (``bbox`` = ``[x, y, w, h]``); labels map through ``category_ids``
        (default: every box in category 1)."""
        out = []
        for box, label, score in zip(self.boxes, self.labels, self.scores):
            x1, y1, x2, y2 = (float(v) for v in box)
            cat = 1 if category_ids is None else int(category_ids[label])
            out.append({"image_id": int(image_id), "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score)})
        return out


@dataclass
class Poses:
    """People and their 17 COCO joints in one image.

    ``keypoints``: float64 ``(K, 17, 3)`` rows ``[x, y, v]`` in input pixels (COCO order, see
    :attr:`JOINTS`; v: 0 not labelled, 1 occluded, 2 visible, as predicted); ``scores``: ``(K,)``;
    ``boxes``: ``(K, 4)`` xyxy, the person regions the joints were asked for.
    """

    keypoints: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    image_size: tuple[int, int]
    JOINTS: ClassVar[tuple[str, ...]] = COCO_KEYPOINTS

    def __len__(self) -> int:
        return len(self.keypoints)

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO keypoint results entries (category 1, ``keypoints`` flattened x, y, v)."""
        return [{"image_id": int(image_id), "category_id": 1, "keypoints": [float(v) for v in k.reshape(-1)],
                 "score": float(s)} for k, s in zip(self.keypoints, self.scores)]


@dataclass
class Segmentation:
    """Instances of one class: ``masks`` bool ``(N, H, W)`` at the input size, ``labels`` (the
    query, per instance), ``colors`` (the palette colour each instance was drawn in)."""

    masks: np.ndarray
    labels: list[str]
    colors: list[str]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def mask(self) -> np.ndarray:
        """The union of the instances, bool ``(H, W)``."""
        return self.masks.any(0) if len(self.masks) else np.zeros(self.image_size, bool)


@dataclass
class DepthMap:
    """``depth``: float32 ``(H, W)`` at the input size, in the units of ``max_depth`` (metres for
    NYU and the toy world); ``image``: the generated grey image (``depth / max_depth``)."""

    depth: np.ndarray
    max_depth: float
    image: "Image.Image"


@dataclass
class NormalMap:
    """``normals``: float32 ``(H, W, 3)`` unit vectors (x right, y up, z towards the camera) at the
    input size; ``image``: the generated RGB image (``(n + 1) / 2``)."""

    normals: np.ndarray
    image: "Image.Image"


@dataclass
class Classification:
    """The best-scoring candidate ``label`` and every candidate's log-likelihood in ``scores``."""

    label: str
    scores: dict[str, float]

    @property
    def probabilities(self) -> dict[str, float]:
        """Softmax of the log-likelihoods over the candidates."""
        names = list(self.scores)
        s = np.array([self.scores[n] for n in names], dtype=np.float64)
        p = np.exp(s - s.max())
        p /= p.sum()
        return dict(zip(names, p.tolist()))

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most probable candidates with their probabilities."""
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


@dataclass
class GroundedAnswer:
    """An answer and the region that grounds it: ``mask`` bool ``(H, W)`` at the input size."""

    answer: str
    mask: np.ndarray


# ================================================================================================
# Input handling
# ================================================================================================
def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


def as_image_batch(images: Any, what: str = "images") -> tuple[list[np.ndarray], bool]:
    """``images`` -> (float32 ``(H, W, 3)`` arrays in [0, 1], was it a single image).

    One image: PIL, numpy ``(H, W)`` / ``(H, W, C)``, tensor ``(C, H, W)`` / ``(H, W)``. A batch: a
    list/tuple of those, numpy ``(B, H, W, C)``, tensor ``(B, C, H, W)``.
    """
    if _is_pil(images):
        items, single = [images], True
    elif isinstance(images, np.ndarray):
        if images.ndim == 4:
            items, single = list(images), False
        elif images.ndim in (2, 3):
            items, single = [images], True
        else:
            raise ValueError(f"{what}: a numpy image must be (H, W), (H, W, 3) or a batch (B, H, W, 3), got shape "
                             f"{images.shape}")
    elif isinstance(images, torch.Tensor):
        if images.ndim == 4:
            items, single = list(images), False
        elif images.ndim in (2, 3):
            items, single = [images], True
        else:
            raise ValueError(f"{what}: a tensor image must be (3, H, W), (H, W) or a batch (B, 3, H, W), got shape "
                             f"{tuple(images.shape)}")
    elif isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{what}: got an empty list; pass at least one image")
        items, single = list(images), False
    else:
        raise TypeError(f"{what} must be a PIL image, a numpy array (H, W, 3), a torch tensor (3, H, W) or a list "
                        f"of them, got {type(images).__name__}")
    if not items:
        raise ValueError(f"{what}: got an empty batch; pass at least one image")
    out = []
    for i, img in enumerate(items):
        if not (_is_pil(img) or isinstance(img, (np.ndarray, torch.Tensor))):
            raise TypeError(f"{what}[{i}] must be a PIL image, numpy array or torch tensor, got {type(img).__name__}")
        try:
            out.append(to_float_image(img))
        except (TypeError, ValueError) as e:
            where = what if single else f"{what}[{i}]"
            raise type(e)(f"{where}: {e}") from None
    return out, single


def _per_image(value: Any, n: int, what: str, kind: type = str) -> list[Any]:
    """One value for all ``n`` images, or a list of ``n`` values."""
    if isinstance(value, kind):
        return [value] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {len(value)} {what} values for {n} image(s); pass one for all or one per image")
        for i, v in enumerate(value):
            if not isinstance(v, kind):
                raise TypeError(f"{what}[{i}] must be a {kind.__name__}, got {type(v).__name__}")
        return list(value)
    raise TypeError(f"{what} must be a {kind.__name__} or a list of {n} of them, got {type(value).__name__}")


def _check_text(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _boxes_for(box: Any, n: int, sizes: list[tuple[int, int]], what: str = "box") -> list[np.ndarray]:
    """One ``[x1, y1, x2, y2]`` for every image, or ``(n, 4)`` boxes; checked against each image."""
    if isinstance(box, torch.Tensor):
        box = box.detach().cpu().numpy()
    try:
        arr = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be [x1, y1, x2, y2] in pixels (or one per image), got {box!r:.80}") from None
    if arr.shape == (4,):
        arr = np.repeat(arr[None], n, 0)
    elif arr.shape != (n, 4):
        raise ValueError(f"{what} must be [x1, y1, x2, y2] in pixels, or ({n}, 4) for {n} images, got shape {arr.shape}")
    out = []
    for i, (b, (h, w)) in enumerate(zip(arr, sizes)):
        tag = what if n == 1 else f"{what}[{i}]"
        if not np.all(np.isfinite(b)):
            raise ValueError(f"{tag} must be finite numbers, got {b.tolist()}")
        if b[2] <= b[0] or b[3] <= b[1]:
            raise ValueError(f"{tag} must have x1 < x2 and y1 < y2 ([x1, y1, x2, y2] in pixels), got {b.tolist()}")
        if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
            raise ValueError(f"{tag} {b.tolist()} is outside the {w}x{h} (W x H) image; boxes are [x1, y1, x2, y2] "
                             "in the input image's pixels")
        out.append(b)
    return out


def _candidates(candidates: Any, what: str = "candidates") -> list[str]:
    if isinstance(candidates, str) or not isinstance(candidates, Sequence) or len(candidates) < 1:
        raise ValueError(f"{what} must be a non-empty list of label strings, got {candidates!r:.80}")
    out = []
    for i, c in enumerate(candidates):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{what}[{i}] must be a non-empty string, got {c!r}")
        out.append(c)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} has duplicates: {sorted({c for c in out if out.count(c) > 1})}")
    return out


def _pil(arr_u8: np.ndarray) -> "Image.Image":
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(arr_u8))


def _out(results: list[Any], single: bool) -> Any:
    return results[0] if single else results


# ================================================================================================
# The mixin
# ================================================================================================
class InferenceMixin:
    """Task methods of :class:`uio.Model` (see the module docstring). Needs ``config``,
    ``text_tokenizer``, ``device``, ``generate`` and ``score_options`` from the host class."""

    # ---- plumbing ---------------------------------------------------------------------------------
    @property
    def processor(self) -> Processor:
        """The :class:`~uio.processing.Processor` of this model (its config + text tokenizer)."""
        tok = getattr(self, "text_tokenizer", None)
        if tok is None:
            raise ValueError("this model has no text tokenizer, so it cannot read prompts; load one with "
                             "Model.from_pretrained(dir with spiece.model) or pass text_tokenizer= to Model(...)")
        cached = self.__dict__.get("_uio_processor")
        if cached is None or cached[0] is not tok or cached[1] is not self.config:
            cached = (tok, self.config, Processor.from_config(self.config, tok))
            self.__dict__["_uio_processor"] = cached
        return cached[2]

    def _generate_kwargs(self, task, overrides: Mapping[str, Any]) -> dict[str, Any]:
        kw = dict(overrides)
        seed = kw.pop("seed", None)
        unknown = sorted(set(kw) - set(GENERATE_KEYS))
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; expected some of {list(GENERATE_KEYS)} "
                            "(or seed=, batch_size=)")
        if seed is not None:
            if kw.get("generator") is not None:
                raise ValueError("pass either seed= or generator=, not both")
            kw["generator"] = torch.Generator(self.device).manual_seed(int(seed))
        out = task.generation_config.to_kwargs()
        # the task's default length, within what this model's decoder holds
        out["max_text_len"] = min(out["max_text_len"], self.config.decoder_max_text_len)
        out.update(kw)
        return out

    def batch_inputs(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Encoded samples -> the encoder half of a contract-3 batch on the model's device."""
        from uio.data.collate import collate

        proc = self.processor
        stripped = [{"text_inputs": s["text_inputs"], "image_input": s["image_input"],
                     "image_input_mask": s["image_input_mask"], "text_targets": [proc.vocab.eos_id],
                     "image_target_mask": np.zeros(proc.num_image_targets, bool), "task": s["task"],
                     "meta": {}} for s in samples]
        batch = collate(stripped, proc.max_input_len, proc.max_target_len)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _run_task(self, name: str, examples: list[dict[str, Any]], batch_size: int | None,
                  overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Encode (evaluation mode), generate, decode: one prediction dict per example."""
        from uio.tasks import get_task

        task = get_task(name)
        proc = self.processor
        samples = [task.encode(ex, proc, np.random.default_rng(0), train=False) for ex in examples]
        kw = self._generate_kwargs(task, overrides)
        bs = _batch_size(batch_size)
        preds: list[dict[str, Any]] = []
        allowed = task.allowed_tokens(proc)
        for i in range(0, len(samples), bs):
            chunk = samples[i : i + bs]
            gen = self.generate(self.batch_inputs(chunk), allowed_tokens=allowed, **kw)
            for j, s in enumerate(chunk):
                image = gen.images[j].float() if gen.images is not None else None
                preds.append(task.decode(gen.text_tokens[j].cpu(), image, s["meta"], proc))
        return preds

    def _score_task(self, name: str, examples: list[dict[str, Any]], candidates: list[str],
                    batch_size: int | None) -> list[Classification]:
        from uio.tasks import get_task

        task = get_task(name)
        proc = self.processor
        samples = [task.encode(ex, proc, np.random.default_rng(0), train=False) for ex in examples]
        options = task.candidate_tokens(candidates, proc)
        bs = _batch_size(batch_size)
        out = []
        for i in range(0, len(samples), bs):
            chunk = samples[i : i + bs]
            scores = self.score_options(self.batch_inputs(chunk), options).float().cpu().numpy()  # (b, K)
            for row in scores:
                pred = task.decode_scores(row, {"candidates": candidates})
                out.append(Classification(pred["label"], {c: float(v) for c, v in zip(candidates, row)}))
        return out

    # ---- image to text ----------------------------------------------------------------------------
    def caption(self, images: Any, batch_size: int | None = None, **generate_kwargs: Any) -> str | list[str]:
        """A caption per image."""
        imgs, single = as_image_batch(images)
        preds = self._run_task("image_captioning", [{"image": im, "captions": ["?"]} for im in imgs], batch_size,
                               generate_kwargs)
        return _out([p["text"] for p in preds], single)

    def vqa(self, images: Any, question: str | Sequence[str], batch_size: int | None = None,
            **generate_kwargs: Any) -> str | list[str]:
        """The answer to ``question`` (one for all images, or one per image)."""
        imgs, single = as_image_batch(images)
        qs = [_check_text(q, "question") for q in _per_image(question, len(imgs), "question")]
        preds = self._run_task("vqa", [{"image": im, "question": q, "answers": ["?"]} for im, q in zip(imgs, qs)],
                               batch_size, generate_kwargs)
        return _out([p["answer"] for p in preds], single)

    def region_caption(self, images: Any, box: Any, batch_size: int | None = None,
                       **generate_kwargs: Any) -> str | list[str]:
        """A description of the region ``box`` (``[x1, y1, x2, y2]`` pixels; one or one per image)."""
        imgs, single = as_image_batch(images)
        boxes = _boxes_for(box, len(imgs), [im.shape[:2] for im in imgs])
        preds = self._run_task("region_captioning", [{"image": im, "box": b, "caption": "?"}
                                                     for im, b in zip(imgs, boxes)], batch_size, generate_kwargs)
        return _out([p["text"] for p in preds], single)

    def relationship(self, images: Any, subject_box: Any, object_box: Any, subject: str | Sequence[str],
                     object: str | Sequence[str], batch_size: int | None = None,
                     **generate_kwargs: Any) -> str | list[str]:
        """The predicate relating the boxed ``subject`` to the boxed ``object`` (e.g. ``"left of"``)."""
        imgs, single = as_image_batch(images)
        sizes = [im.shape[:2] for im in imgs]
        sb = _boxes_for(subject_box, len(imgs), sizes, "subject_box")
        ob = _boxes_for(object_box, len(imgs), sizes, "object_box")
        ss = [_check_text(s, "subject") for s in _per_image(subject, len(imgs), "subject")]
        os_ = [_check_text(o, "object") for o in _per_image(object, len(imgs), "object")]
        exs = [{"image": im, "subject_box": a, "object_box": b, "subject": s, "object": o, "predicate": "?"}
               for im, a, b, s, o in zip(imgs, sb, ob, ss, os_)]
        preds = self._run_task("relationship", exs, batch_size, generate_kwargs)
        return _out([p["predicate"] for p in preds], single)

    def grounded_vqa(self, images: Any, question: str | Sequence[str], batch_size: int | None = None,
                     **generate_kwargs: Any) -> GroundedAnswer | list[GroundedAnswer]:
        """The answer to ``question`` and the mask of the region that holds it."""
        imgs, single = as_image_batch(images)
        qs = [_check_text(q, "question") for q in _per_image(question, len(imgs), "question")]
        exs = [{"image": im, "question": q, "answers": ["?"], "mask": np.zeros(im.shape[:2], bool)}
               for im, q in zip(imgs, qs)]
        preds = self._run_task("grounded_vqa", exs, batch_size, generate_kwargs)
        out = []
        for p, im in zip(preds, imgs):
            mask = p["masks"][0] if p["masks"] else np.zeros(im.shape[:2], bool)
            out.append(GroundedAnswer(p["answer"], mask.astype(bool)))
        return _out(out, single)

    # ---- classification (candidate scoring) -------------------------------------------------------
    def classify(self, images: Any, candidates: Sequence[str], batch_size: int | None = None
                 ) -> Classification | list[Classification]:
        """The most likely of ``candidates`` (class names) for each image, with every candidate's score."""
        imgs, single = as_image_batch(images)
        cands = _candidates(candidates)
        exs = [{"image": im, "label": cands[0], "candidates": cands} for im in imgs]
        return _out(self._score_task("image_classification", exs, cands, batch_size), single)

    def region_classify(self, images: Any, box: Any, candidates: Sequence[str], batch_size: int | None = None
                        ) -> Classification | list[Classification]:
        """The most likely of ``candidates`` for the object in ``box``."""
        imgs, single = as_image_batch(images)
        boxes = _boxes_for(box, len(imgs), [im.shape[:2] for im in imgs])
        cands = _candidates(candidates)
        exs = [{"image": im, "box": b, "label": cands[0], "candidates": cands} for im, b in zip(imgs, boxes)]
        return _out(self._score_task("region_classification", exs, cands, batch_size), single)

    # ---- sparse labelling -------------------------------------------------------------------------
    def _detections(self, preds: list[dict[str, Any]], imgs: list[np.ndarray], labels: list[list[str]] | None
                    ) -> list[Detections]:
        out = []
        for k, (p, im) in enumerate(zip(preds, imgs)):
            boxes = np.asarray(p["boxes"], dtype=np.float64).reshape(-1, 4)
            names = list(p.get("labels", [])) if labels is None else [labels[k][0]] * len(boxes)
            out.append(Detections(boxes, names, np.asarray(p["scores"], dtype=np.float64),
                                  tuple(int(v) for v in im.shape[:2])))
        return out

    def detect(self, images: Any, batch_size: int | None = None, **generate_kwargs: Any
               ) -> Detections | list[Detections]:
        """Every object: boxes with class labels."""
        imgs, single = as_image_batch(images)
        preds = self._run_task("detection", [{"image": im, "boxes": [], "labels": []} for im in imgs], batch_size,
                               generate_kwargs)
        return _out(self._detections(preds, imgs, None), single)

    def locate(self, images: Any, label: str | Sequence[str], batch_size: int | None = None,
               **generate_kwargs: Any) -> Detections | list[Detections]:
        """Every instance of the class ``label`` (empty when there is none)."""
        imgs, single = as_image_batch(images)
        labels = [_check_text(v, "label") for v in _per_image(label, len(imgs), "label")]
        preds = self._run_task("object_localization", [{"image": im, "boxes": [], "label": lab}
                                                       for im, lab in zip(imgs, labels)], batch_size, generate_kwargs)
        return _out(self._detections(preds, imgs, [[lab] for lab in labels]), single)

    def refer(self, images: Any, expression: str | Sequence[str], batch_size: int | None = None,
              **generate_kwargs: Any) -> Detections | list[Detections]:
        """The region a referring expression describes (one box)."""
        imgs, single = as_image_batch(images)
        exprs = [_check_text(v, "expression") for v in _per_image(expression, len(imgs), "expression")]
        exs = [{"image": im, "box": [0.0, 0.0, 1.0, 1.0], "expression": e} for im, e in zip(imgs, exprs)]
        preds = self._run_task("referring_expression", exs, batch_size, generate_kwargs)
        return _out(self._detections(preds, imgs, [[e] for e in exprs]), single)

    def keypoints(self, images: Any, box: Any = None, label: str = "person", max_people: int = 20,
                  batch_size: int | None = None, **generate_kwargs: Any) -> Poses | list[Poses]:
        """People's 17 COCO joints. With ``box`` (one person region per image, or one for all) the
        joints of that person; without, the paper's two-step pipeline: locate every ``label``
        (up to ``max_people``), then the joints of each."""
        imgs, single = as_image_batch(images)
        if box is not None:
            boxes = _boxes_for(box, len(imgs), [im.shape[:2] for im in imgs])
            placeholder = [[0.0, 0.0, 0]] * NUM_KEYPOINTS
            preds = self._run_task("keypoints", [{"image": im, "box": b, "keypoints": placeholder}
                                                 for im, b in zip(imgs, boxes)], batch_size, generate_kwargs)
            out = [Poses(p["keypoints"][None].astype(np.float64), np.array([float(p["score"])]), b[None].copy(),
                         tuple(int(v) for v in im.shape[:2])) for p, b, im in zip(preds, boxes, imgs)]
            return _out(out, single)
        from uio.tasks import get_task
        from uio.tasks.pipelines import keypoints_two_step

        _check_text(label, "label")
        if not isinstance(max_people, int) or max_people < 1:
            raise ValueError(f"max_people must be a positive int, got {max_people!r}")
        kp_kw = self._generate_kwargs(get_task("keypoints"), generate_kwargs)
        generator = kp_kw.pop("generator", None)
        loc_kw = self._generate_kwargs(get_task("object_localization"),
                                       {k: v for k, v in generate_kwargs.items() if k not in ("seed", "generator")})
        out = []
        for im in imgs:
            r = keypoints_two_step(self, im, self.processor, label=label, max_people=max_people,
                                   batch_size=_batch_size(batch_size), generator=generator,
                                   loc_kwargs=loc_kw, kp_kwargs=kp_kw)
            out.append(Poses(r["keypoints"].astype(np.float64), np.asarray(r["scores"], dtype=np.float64),
                             np.asarray(r["boxes"], dtype=np.float64).reshape(-1, 4),
                             tuple(int(v) for v in im.shape[:2])))
        return _out(out, single)

    # ---- dense labelling --------------------------------------------------------------------------
    def segment(self, images: Any, label: str | Sequence[str], batch_size: int | None = None,
                **generate_kwargs: Any) -> Segmentation | list[Segmentation]:
        """Instance masks of the class ``label`` (none when it is absent)."""
        imgs, single = as_image_batch(images)
        labels = [_check_text(v, "label") for v in _per_image(label, len(imgs), "label")]
        preds = self._run_task("object_segmentation", [{"image": im, "label": lab, "masks": []}
                                                       for im, lab in zip(imgs, labels)], batch_size, generate_kwargs)
        out = []
        for p, im, lab in zip(preds, imgs, labels):
            hw = tuple(int(v) for v in im.shape[:2])
            masks = np.stack(p["masks"]).astype(bool) if p["masks"] else np.zeros((0, *hw), bool)
            out.append(Segmentation(masks, [lab] * len(masks), list(p["colors"]), hw))
        return _out(out, single)

    def depth(self, images: Any, max_depth: float | None = None, batch_size: int | None = None,
              **generate_kwargs: Any) -> DepthMap | list[DepthMap]:
        """A depth map per image. ``max_depth`` is the depth of a white pixel, i.e. the range the
        model was trained with (default: the depth task's, 10 m as NYU Depth v2 and the toy world)."""
        from uio.tasks import get_task

        imgs, single = as_image_batch(images)
        md = get_task("depth").max_depth if max_depth is None else max_depth
        if isinstance(md, bool) or not isinstance(md, (int, float)) or not np.isfinite(md) or md <= 0:
            raise ValueError(f"max_depth must be a positive number, got {max_depth!r}")
        exs = [{"image": im, "depth": np.zeros(im.shape[:2], np.float32), "max_depth": float(md)} for im in imgs]
        preds = self._run_task("depth", exs, batch_size, generate_kwargs)
        out = []
        for p in preds:
            d = np.asarray(p["depth"], dtype=np.float32)
            out.append(DepthMap(d, float(md), _pil(to_uint8(np.clip(d / md, 0, 1)))))
        return _out(out, single)

    def surface_normals(self, images: Any, batch_size: int | None = None,
                        **generate_kwargs: Any) -> NormalMap | list[NormalMap]:
        """Surface normals per image (unit vectors; pixels the model left black are zero)."""
        imgs, single = as_image_batch(images)
        exs = [{"image": im, "normals": np.zeros((*im.shape[:2], 3), np.float32)} for im in imgs]
        preds = self._run_task("surface_normals", exs, batch_size, generate_kwargs)
        out = []
        for p in preds:
            n = np.asarray(p["normals"], dtype=np.float32)
            out.append(NormalMap(n, _pil(to_uint8(np.clip((n + 1) / 2, 0, 1)))))
        return _out(out, single)

    # ---- image synthesis --------------------------------------------------------------------------
    def generate_image(self, prompt: str | Sequence[str], size: tuple[int, int] | None = None,
                       batch_size: int | None = None, **generate_kwargs: Any) -> "Image.Image | list[Image.Image]":
        """An image for a text description (one per prompt). ``size`` ``(H, W)`` of the result
        (default: the image tokenizer's)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if prompts is None or not prompts:
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt[{i}] must be a string, got {type(p).__name__}")
            _check_text(p, "prompt")
        h, w = self.processor.image_target_size if size is None else _size(size)
        blank = np.zeros((h, w, 3), np.uint8)  # stands for the target: it only sets the output size
        preds = self._run_task("image_generation", [{"image": blank, "caption": p} for p in prompts], batch_size,
                               generate_kwargs)
        return _out([_pil(p["image"]) for p in preds], single)

    def inpaint(self, images: Any, box: Any, label: str | Sequence[str], paste: bool = True,
                batch_size: int | None = None, **generate_kwargs: Any) -> "Image.Image | list[Image.Image]":
        """Fill the region ``box`` with a ``label`` object. With ``paste`` (default) only the region
        is taken from the generated image and the rest stays the input's pixels; otherwise the whole
        generated image (at the input size) is returned."""
        imgs, single = as_image_batch(images)
        boxes = _boxes_for(box, len(imgs), [im.shape[:2] for im in imgs])
        labels = [_check_text(v, "label") for v in _per_image(label, len(imgs), "label")]
        preds = self._run_task("image_inpainting", [{"image": im, "box": b, "label": lab}
                                                    for im, b, lab in zip(imgs, boxes, labels)], batch_size,
                               generate_kwargs)
        out = []
        for p, im, b in zip(preds, imgs, boxes):
            gen = p["image"]
            out.append(_pil(paste_region(gen, to_uint8(im), b) if paste else gen))
        return _out(out, single)

    # ---- text only --------------------------------------------------------------------------------
    def classify_text(self, text: str | Sequence[str], candidates: Sequence[str],
                      text_pair: str | Sequence[str] | None = None, dataset: str = "",
                      batch_size: int | None = None) -> Classification | list[Classification]:
        """Text classification by candidate scoring. ``text_pair`` makes it a pair task (NLI,
        paraphrase); ``dataset`` picks the question appended to the input (e.g. ``"mnli"``)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if not texts:
            raise TypeError(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
        texts = [_check_text(t, "text") for t in _per_image(texts, len(texts), "text")]
        pairs = [None] * len(texts) if text_pair is None else \
            [_check_text(t, "text_pair") for t in _per_image(text_pair, len(texts), "text_pair")]
        cands = _candidates(candidates)
        exs = [{"text": t, "label": cands[0], "candidates": cands, "dataset": str(dataset),
                **({"text_pair": p} if p else {})} for t, p in zip(texts, pairs)]
        return _out(self._score_task("text_classification", exs, cands, batch_size), single)

    def answer_question(self, context: str | Sequence[str], question: str | Sequence[str],
                        batch_size: int | None = None, **generate_kwargs: Any) -> str | list[str]:
        """Extractive question answering; a context longer than the encoder is read in sliding
        windows and the most confident window's answer is returned (paper A.1.7)."""
        from uio.tasks.pipelines import answer_with_windows

        single = isinstance(context, str)
        ctxs = [context] if single else list(context) if isinstance(context, (list, tuple)) else None
        if not ctxs:
            raise TypeError(f"context must be a string or a non-empty list of strings, got {context!r:.80}")
        ctxs = [_check_text(c, "context") for c in _per_image(ctxs, len(ctxs), "context")]
        qs = [_check_text(q, "question") for q in _per_image(question, len(ctxs), "question")]
        from uio.tasks import get_task

        kw = self._generate_kwargs(get_task("question_answering"), generate_kwargs)
        generator = kw.pop("generator", None)
        out = [answer_with_windows(self, {"context": c, "question": q}, self.processor,
                                   batch_size=_batch_size(batch_size), generator=generator, **kw)["answer"]
               for c, q in zip(ctxs, qs)]
        return _out(out, single)

    def summarize(self, text: str | Sequence[str], batch_size: int | None = None,
                  **generate_kwargs: Any) -> str | list[str]:
        """A short summary of each text."""
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if not texts:
            raise TypeError(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
        texts = [_check_text(t, "text") for t in _per_image(texts, len(texts), "text")]
        preds = self._run_task("summarization", [{"text": t, "summary": "?"} for t in texts], batch_size,
                               generate_kwargs)
        return _out([p["text"] for p in preds], single)


# ================================================================================================
# helpers
# ================================================================================================
def _batch_size(batch_size: int | None) -> int:
    if batch_size is None:
        return DEFAULT_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _size(size: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (H, W), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (H, W), got {size!r}")
    return h, w


def paste_region(generated: np.ndarray, original: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """``original`` (uint8 ``(H, W, 3)``) with the pixels of ``box`` (xyxy, rounded outwards) taken
    from ``generated`` (same size)."""
    out = np.array(original, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    x1, y1 = int(np.floor(max(0.0, box[0]))), int(np.floor(max(0.0, box[1])))
    x2, y2 = int(np.ceil(min(float(w), box[2]))), int(np.ceil(min(float(h), box[3])))
    out[y1:y2, x1:x2] = np.asarray(generated)[y1:y2, x1:x2]
    return out
