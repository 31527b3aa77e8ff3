"""Trivial baselines for every task: what a model scores without looking at the input.

Each baseline is fitted on training examples (the toy world's TRAIN split by default) and predicts
in the task's own prediction format, so it is scored with the task's metrics on exactly the
held-out examples the model is scored on (:func:`uio.evaluation.evaluate_task`). Where several
trivial rules exist, the one that scores best *on the training examples* is kept, so the
baseline is the strongest trivial one without ever seeing the evaluation data.

| task(s)                                   | baseline                                                        |
|-------------------------------------------|-----------------------------------------------------------------|
| vqa                                       | the majority answer of the question's type ("per Q-type prior") |
| question_answering                        | the majority answer                                             |
| relationship                              | the majority predicate                                          |
| image/region/text classification          | the majority label                                              |
| grounded_vqa                              | the question type's majority answer + the best constant mask    |
| image_captioning, region_captioning       | the single train caption with the best CIDEr-D on train         |
| summarization                             | the input's first sentence or the best constant summary         |
| detection                                 | every class's mean box, scored by how often the class appears   |
| object_localization                       | per class: its mean box, or nothing when that scores better     |
| referring_expression                      | the mean box                                                    |
| keypoints                                 | the mean pose within the given person box                       |
| object_segmentation                       | per class: the best constant mask, or nothing                   |
| depth / surface_normals                   | the mean depth map / mean normal map                            |
| image_generation, segmentation_to_image,  | the mean image                                                  |
| masked_image_denoising                    |                                                                 |
| image_inpainting                          | the input with the region filled from the mean image            |

Positions (boxes, poses, maps) are fitted in coordinates normalised by the image size and scaled
back to each example's size.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from uio.processing import resize, to_float_image, to_uint8

__all__ = ["Baseline", "BASELINES", "build_baseline", "fit_baseline", "score_predictions"]

GRID = 64  # resolution of the mean maps / constant masks
MAX_FIT_CANDIDATES = 30  # constant texts tried when choosing the best one
MAX_FIT_REFS = 120  # training examples the text choices are scored on


def score_predictions(task: str, preds: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]
                      ) -> dict[str, dict[str, float]]:
    """The task's metrics (``{metric: compute()}``) of ``preds`` against ``targets``."""
    from uio.tasks import get_task

    out = {}
    for name, metric in get_task(task).build_metrics().items():
        metric.update(list(preds), list(targets))
        out[name] = {k: float(v) for k, v in metric.compute().items()}
    return out


def _hw(example: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> tuple[int, int]:
    for key in ("target_hw", "image_hw"):
        v = (meta or {}).get(key)
        if v is not None:
            return int(v[0]), int(v[1])
    img = example.get("image")
    if img is None:
        raise ValueError("this baseline needs the example's image (or meta['image_hw']) for its size")
    shape = getattr(img, "shape", None)
    if shape is not None:
        return int(shape[0]), int(shape[1])
    w, h = img.size  # PIL
    return int(h), int(w)


def _norm_box(box: Any, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    return np.asarray(box, dtype=np.float64).reshape(4) / np.array([w, h, w, h], dtype=np.float64)


def _pixel_box(nbox: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    return np.asarray(nbox, dtype=np.float64) * np.array([w, h, w, h], dtype=np.float64)


def _grid(arr: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    return resize(np.asarray(arr, dtype=np.float32), (GRID, GRID), mode=mode)


class Baseline:
    """Base class: ``fit(train examples)`` then ``predict(example, meta)`` in the task's prediction
    format (``meta``: the encoded sample's meta, for sizes)."""

    task: str = ""
    name: str = ""
    description: str = ""

    def __init__(self, task: str):
        self.task = task
        self.fitted = False
        self.num_train_examples = 0

    def fit(self, examples: Sequence[Mapping[str, Any]]) -> "Baseline":
        examples = list(examples)
        if not examples:
            raise ValueError(f"{self.task}: cannot fit the {self.name!r} baseline on zero training examples")
        self._fit(examples)
        self.fitted = True
        self.num_train_examples = len(examples)
        return self

    def predict(self, example: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if not self.fitted:
            raise RuntimeError(f"the {self.task} baseline is not fitted; call fit(train_examples) first")
        return self._predict(example, meta or {})

    def _fit(self, examples: list[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def _predict(self, example: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, name={self.name!r})"


# ---- text ---------------------------------------------------------------------------------------
def _majority(values: Sequence[str]) -> str:
    """Most frequent value; ties go to the value seen first."""
    counts = Counter(values)
    first = {v: i for i, v in reversed(list(enumerate(values)))}
    return max(counts, key=lambda v: (counts[v], -first[v]))


def _example_answer(ex: Mapping[str, Any]) -> str:
    return _majority(list(ex["answers"]))


class MajorityText(Baseline):
    """The most frequent training answer / label, for every example."""

    name = "majority"

    def __init__(self, task: str, value: Callable[[Mapping[str, Any]], str], keys: Sequence[str], what: str):
        super().__init__(task)
        self.value, self.keys = value, tuple(keys)
        self.name = f"majority {what}"
        self.answer = ""

    def _fit(self, examples):
        self.answer = _majority([self.value(ex) for ex in examples])
        self.description = f"always {self.answer!r}"

    def _predict(self, example, meta):
        return {k: self.answer for k in self.keys}


def _question_words(question: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", question.lower()).split()


class QuestionTypePrior(Baseline):
    """The most frequent training answer among questions of the same type: the "per Q-type prior"
    of the VQA paper (Antol et al., 2015), which answers from the question alone. A question's type
    is its ``question_type`` field where the data has one (VQA v2's annotations do), else its
    longest opening of at most ``max_words`` words that begins at least ``min_count`` training
    questions; questions of no known type get the overall majority answer."""

    def __init__(self, task: str, max_words: int = 4, min_count: int = 5):
        super().__init__(task)
        self.max_words, self.min_count = max_words, min_count
        self.name = "majority answer per question type"
        self.answers: dict[str, str] = {}
        self.overall = ""

    def _types(self, example: Mapping[str, Any]) -> list[str]:
        """The example's candidate types, most specific first."""
        words = _question_words(str(example.get("question", "")))
        keys = [" ".join(words[:k]) for k in range(min(self.max_words, len(words)), 0, -1)]
        qt = example.get("question_type")
        return ([f"type:{qt}"] if isinstance(qt, str) and qt else []) + keys

    def _fit(self, examples):
        by_type: dict[str, list[str]] = defaultdict(list)
        answers = []
        for ex in examples:
            a = _example_answer(ex)
            answers.append(a)
            for t in self._types(ex):
                by_type[t].append(a)
        self.overall = _majority(answers)
        self.answers = {t: _majority(v) for t, v in by_type.items() if len(v) >= self.min_count}
        self.description = (f"the majority answer of {len(self.answers)} question types seen >= {self.min_count} "
                            f"times, else {self.overall!r}")

    def _predict(self, example, meta):
        answer = next((self.answers[t] for t in self._types(example) if t in self.answers), self.overall)
        return {"answer": answer}


class ConstantText(Baseline):
    """The one training text that scores best (the task's metric) against the training references."""

    name = "best constant text"

    def __init__(self, task: str, refs: Callable[[Mapping[str, Any]], list[str]], key: str, target_key: str,
                 metric: tuple[str, str], lead: bool = False):
        super().__init__(task)
        self.refs, self.key, self.target_key, self.metric, self.lead = refs, key, target_key, metric, lead
        self.text, self.use_lead = "", False

    def _score(self, preds: list[dict], targets: list[dict]) -> float:
        return score_predictions(self.task, preds, targets)[self.metric[0]][self.metric[1]]

    def _fit(self, examples):
        exs = examples[:MAX_FIT_REFS]
        refs = [self.refs(ex) for ex in exs]
        targets = [{self.target_key: r} for r in refs]
        counts = Counter(t for ex in examples for t in self.refs(ex))
        cands = [t for t, _ in counts.most_common(MAX_FIT_CANDIDATES)]
        scored = [(self._score([{self.key: c}] * len(exs), targets), c) for c in cands]
        best_score, self.text = max(scored, key=lambda sc: sc[0])
        self.name, self.description = "best constant text", f"always {self.text!r}"
        if self.lead:
            lead = self._score([{self.key: _first_sentence(ex["text"])} for ex in exs], targets)
            if lead > best_score:
                self.use_lead = True
                self.name, self.description = "lead sentence", "the input's first sentence"

    def _predict(self, example, meta):
        return {self.key: _first_sentence(example["text"]) if self.use_lead else self.text}


def _first_sentence(text: str) -> str:
    for i, c in enumerate(text):
        if c in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            return text[: i + 1]
    return text


# ---- boxes --------------------------------------------------------------------------------------
class MeanBoxPerClass(Baseline):
    """Detection: each class's mean box, scored by the fraction of training images that hold it."""

    name = "mean box per class"

    def _fit(self, examples):
        boxes, images_with = defaultdict(list), Counter()
        for ex in examples:
            hw = _hw(ex)
            for b, lab in zip(ex["boxes"], ex["labels"]):
                boxes[lab].append(_norm_box(b, hw))
            images_with.update(set(ex["labels"]))
        self.classes = sorted(boxes, key=lambda c: (-images_with[c], c))
        self.mean = {c: np.mean(boxes[c], 0) for c in self.classes}
        self.freq = {c: images_with[c] / len(examples) for c in self.classes}
        self.description = f"{len(self.classes)} classes, one mean box each"

    def _predict(self, example, meta):
        hw = _hw(example, meta)
        boxes = np.array([_pixel_box(self.mean[c], hw) for c in self.classes]).reshape(-1, 4)
        return {"boxes": boxes, "labels": list(self.classes), "scores": np.array([self.freq[c] for c in self.classes])}


class LocalizationPrior(Baseline):
    """Object localisation: per queried class, its mean box or no box, whichever is right more often
    on the training examples (classes never seen use the choice fitted over all of them)."""

    name = "mean box or nothing, per class"

    def _fit(self, examples):
        from uio.metrics.base import box_iou_matrix

        by_label: dict[str, list[Mapping]] = defaultdict(list)
        for ex in examples:
            by_label[ex["label"]].append(ex)

        def choose(exs: list[Mapping]) -> np.ndarray | None:
            found = [_norm_box(b, _hw(ex)) for ex in exs for b in ex["boxes"]]
            if not found:
                return None
            mean = np.mean(found, 0)
            hits_mean = hits_empty = 0
            for ex in exs:
                hw = _hw(ex)
                gt = np.asarray(ex["boxes"], dtype=np.float64).reshape(-1, 4)
                if len(gt) == 0:
                    hits_empty += 1
                elif box_iou_matrix(_pixel_box(mean, hw)[None], gt).max() >= 0.5:
                    hits_mean += 1
            return mean if hits_mean > hits_empty else None

        self.per_label = {lab: choose(exs) for lab, exs in by_label.items()}
        self.default = choose(list(examples))
        n_box = sum(v is not None for v in self.per_label.values())
        self.description = f"{n_box} of {len(self.per_label)} classes get their mean box, the rest nothing"

    def _predict(self, example, meta):
        box = self.per_label.get(example.get("label"), self.default)
        if box is None:
            return {"boxes": np.zeros((0, 4)), "labels": [], "scores": np.zeros(0)}
        return {"boxes": _pixel_box(box, _hw(example, meta))[None], "labels": [example.get("label", "")],
                "scores": np.ones(1)}


class MeanBox(Baseline):
    """Referring expressions: the mean target box."""

    name = "mean box"

    def _fit(self, examples):
        self.mean = np.mean([_norm_box(ex["box"], _hw(ex)) for ex in examples], 0)
        self.description = "normalised xyxy " + ", ".join(f"{v:.2f}" for v in self.mean)

    def _predict(self, example, meta):
        return {"boxes": _pixel_box(self.mean, _hw(example, meta))[None], "scores": np.ones(1)}


class MeanPose(Baseline):
    """Keypoints: every joint at its mean position relative to the given person box."""

    name = "mean pose in the box"

    def _fit(self, examples):
        from uio.tasks.sparse import NUM_KEYPOINTS

        sums, counts = np.zeros((NUM_KEYPOINTS, 2)), np.zeros(NUM_KEYPOINTS)
        for ex in examples:
            x1, y1, x2, y2 = np.asarray(ex["box"], dtype=np.float64)
            kp = np.asarray(ex["keypoints"], dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
            vis = kp[:, 2] > 0
            rel = (kp[:, :2] - [x1, y1]) / np.maximum([x2 - x1, y2 - y1], 1e-6)
            sums[vis] += rel[vis]
            counts += vis
        self.rel = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.5)
        self.description = f"fitted on {len(examples)} people"

    def _predict(self, example, meta):
        x1, y1, x2, y2 = np.asarray(example["box"], dtype=np.float64)
        xy = self.rel * [x2 - x1, y2 - y1] + [x1, y1]
        return {"keypoints": np.concatenate([xy, np.full((len(xy), 1), 2.0)], 1), "score": 1.0}


# ---- masks and dense maps -------------------------------------------------------------------------
def _mask_union(masks: Sequence[Any], hw: tuple[int, int]) -> np.ndarray:
    out = np.zeros(hw, bool)
    for m in masks:
        out |= np.asarray(m, dtype=bool)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


class ConstantMask(Baseline):
    """Segmentation / grounding: the pixel-frequency map of the training masks thresholded at the
    level with the best mean IoU on them; with ``allow_empty`` each class may instead predict
    nothing, when that scores better for it."""

    name = "best constant mask"

    def __init__(self, task: str, masks: Callable[[Mapping[str, Any]], list[Any]], allow_empty: bool,
                 answer: Baseline | None = None):
        super().__init__(task)
        self.masks, self.allow_empty, self.answer = masks, allow_empty, answer
        if answer is not None:
            self.name = f"{answer.name} + best constant mask"

    def _fit(self, examples):
        unions = [_grid(_mask_union(self.masks(ex), _hw(ex)).astype(np.float32), "nearest") > 0.5 for ex in examples]
        freq = np.mean(unions, 0)
        best = (-1.0, None)
        levels = np.unique(np.quantile(freq[freq > 0], np.linspace(0, 1, 41))) if (freq > 0).any() else [1.0]
        for t in levels:
            m = freq >= t
            score = float(np.mean([_iou(m, u) for u in unions]))
            if score > best[0]:
                best = (score, m)
        self.mask = best[1]
        self.per_label: dict[str, bool] = {}
        if self.allow_empty:
            by_label: dict[str, list[int]] = defaultdict(list)
            for i, ex in enumerate(examples):
                by_label[str(ex.get("label", ""))].append(i)
            for lab, idx in by_label.items():
                with_mask = np.mean([_iou(self.mask, unions[i]) for i in idx])
                empty = np.mean([float(not unions[i].any()) for i in idx])
                self.per_label[lab] = bool(with_mask >= empty)
        self.default = True
        if self.answer is not None:
            self.answer.fit(examples)
        self.description = f"{self.mask.mean():.0%} of the image" + (
            f" for {sum(self.per_label.values())} of {len(self.per_label)} classes, nothing for the others"
            if self.allow_empty else "")

    def _predict(self, example, meta):
        hw = _hw(example, meta)
        use = self.per_label.get(str(example.get("label", "")), self.default)
        mask = resize(self.mask.astype(np.float32), hw, mode="nearest") > 0.5
        out = {"masks": [mask] if use and mask.any() else []}
        if self.answer is not None:
            out.update(self.answer.predict(example, meta))
        return out


class MeanDepth(Baseline):
    """The per-pixel mean of the training depth maps (valid pixels only), in their units."""

    name = "mean depth map"

    def _fit(self, examples):
        s = np.zeros((GRID, GRID))
        n = np.zeros((GRID, GRID))
        for ex in examples:
            d = np.asarray(ex["depth"], dtype=np.float32)
            valid = (np.isfinite(d) & (d > 0)).astype(np.float32)
            s += _grid(np.where(valid > 0, d, 0) * 1.0)
            n += _grid(valid)
        self.map = np.where(n > 1e-6, s / np.maximum(n, 1e-6), s.sum() / max(n.sum(), 1e-6)).astype(np.float32)
        self.description = f"mean {self.map.mean():.2f}"

    def _predict(self, example, meta):
        return {"depth": resize(self.map, _hw(example, meta), mode="bilinear")}


class MeanNormals(Baseline):
    """The per-pixel mean of the training normal maps, renormalised to unit length."""

    name = "mean normal map"

    def _fit(self, examples):
        s = np.zeros((GRID, GRID, 3))
        for ex in examples:
            nm = np.asarray(ex["normals"], dtype=np.float32)
            norm = np.linalg.norm(nm, axis=-1, keepdims=True)
            unit = np.where(norm > 1e-6, nm / np.maximum(norm, 1e-6), 0.0)
            if ex.get("valid") is not None:
                unit = unit * np.asarray(ex["valid"], dtype=np.float32)[..., None]
            s += _grid(unit)
        norm = np.linalg.norm(s, axis=-1, keepdims=True)
        self.map = np.where(norm > 1e-9, s / np.maximum(norm, 1e-9), [0.0, 0.0, 1.0]).astype(np.float32)
        self.description = "unit mean per pixel"

    def _predict(self, example, meta):
        m = resize(self.map, _hw(example, meta), mode="bilinear")
        return {"normals": m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-6)}


class MeanImage(Baseline):
    """Image outputs: the per-pixel mean training image; for inpainting the input with its region
    filled from the mean image."""

    name = "mean image"

    def __init__(self, task: str, inpaint: bool = False):
        super().__init__(task)
        self.inpaint = inpaint
        if inpaint:
            self.name = "region filled with the mean image"

    def _fit(self, examples):
        self.mean = np.mean([_grid(to_float_image(ex["image"])) for ex in examples], 0).astype(np.float32)
        self.description = "mean colour " + ", ".join(f"{v:.2f}" for v in self.mean.mean((0, 1)))

    def _predict(self, example, meta):
        hw = _hw(example, meta)
        img = to_uint8(resize(self.mean, hw, mode="bilinear"))
        if self.inpaint:
            from uio.inference import paste_region

            img = paste_region(img, to_uint8(to_float_image(example["image"])), example["box"])
        return {"image": img}


# ---- the registry -----------------------------------------------------------------------------------
def _mask_list(ex: Mapping[str, Any]) -> list[Any]:
    return list(ex.get("masks") or [])


BASELINES: dict[str, Callable[[], Baseline]] = {
    "vqa": lambda: QuestionTypePrior("vqa"),
    "question_answering": lambda: MajorityText("question_answering", lambda ex: ex["answers"][0], ["answer"],
                                               "answer"),
    "relationship": lambda: MajorityText("relationship", lambda ex: ex["predicate"], ["predicate", "label"],
                                         "predicate"),
    "image_classification": lambda: MajorityText("image_classification", lambda ex: ex["label"], ["label"], "label"),
    "region_classification": lambda: MajorityText("region_classification", lambda ex: ex["label"], ["label"],
                                                  "label"),
    "text_classification": lambda: MajorityText("text_classification", lambda ex: ex["label"], ["label"], "label"),
    "grounded_vqa": lambda: ConstantMask("grounded_vqa", lambda ex: [ex["mask"]], allow_empty=False,
                                         answer=QuestionTypePrior("grounded_vqa")),
    "image_captioning": lambda: ConstantText("image_captioning", lambda ex: list(ex["captions"]), "text", "captions",
                                             ("captioning", "cider")),
    "region_captioning": lambda: ConstantText("region_captioning", lambda ex: [ex["caption"]], "text", "captions",
                                              ("captioning", "cider")),
    "summarization": lambda: ConstantText("summarization", lambda ex: [ex["summary"]], "text", "summary",
                                          ("rouge", "rougeL"), lead=True),
    "detection": lambda: MeanBoxPerClass("detection"),
    "object_localization": lambda: LocalizationPrior("object_localization"),
    "referring_expression": lambda: MeanBox("referring_expression"),
    "keypoints": lambda: MeanPose("keypoints"),
    "object_segmentation": lambda: ConstantMask("object_segmentation", _mask_list, allow_empty=True),
    "depth": lambda: MeanDepth("depth"),
    "surface_normals": lambda: MeanNormals("surface_normals"),
    "image_generation": lambda: MeanImage("image_generation"),
    "segmentation_to_image": lambda: MeanImage("segmentation_to_image"),
    "masked_image_denoising": lambda: MeanImage("masked_image_denoising"),
    "image_inpainting": lambda: MeanImage("image_inpainting", inpaint=True),
}


def build_baseline(task: str) -> Baseline:
    """An unfitted baseline for ``task`` (KeyError listing the tasks that have one)."""
    if task not in BASELINES:
        raise KeyError(f"no trivial baseline for task {task!r}; tasks with one: {sorted(BASELINES)}")
    return BASELINES[task]()


def fit_baseline(task: str, train_examples: Sequence[Mapping[str, Any]]) -> Baseline:
    """``build_baseline(task).fit(train_examples)``."""
    return build_baseline(task).fit(train_examples)
