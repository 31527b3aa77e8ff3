"""The :class:`Task` interface and the helpers every task shares.

A task turns a raw example (design.md contract 1) into an encoded sample (contract 2) and turns a
generation (text ids + optional image) back into a prediction in its metric's format. Decoding
never raises on malformed generations: garbage ids, truncated boxes and outputs of the wrong
modality give an empty or partial prediction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from uio.processing import ImageInput, ImageTarget, Processor
from uio.vocab import Vocab

GROUPS = (
    "image_synthesis", "sparse_labelling", "dense_labelling", "image_classification", "image_captioning",
    "vision_language", "nlp", "language_modelling", "pretraining",
)
OUTPUTS = ("text", "label", "boxes", "keypoints", "image", "text+image")


@dataclass(frozen=True)
class GenerationConfig:
    """How a task is decoded: keyword arguments of ``uio.Model.generate``."""

    max_text_len: int = 32
    image_output: bool = False
    method: str = "greedy"  # "greedy" | "beam" | "sample"
    num_beams: int = 1
    top_p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self):
        if self.method not in ("greedy", "beam", "sample"):
            raise ValueError(f"generation method must be 'greedy', 'beam' or 'sample', got {self.method!r}")
        if self.max_text_len < 1:
            raise ValueError(f"max_text_len must be >= 1, got {self.max_text_len}")

    def to_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Task:
    """Base class. Subclasses set the class attributes and implement ``_encode`` / ``_decode``."""

    name: str = ""
    group: str = ""
    prompts: tuple[str, ...] = ()  # prompts[0] is the original's exact string where one exists
    output: str = "text"  # one of OUTPUTS
    output_format: str = ""  # human description (docs/tasks.md)
    metrics: tuple[str, ...] = ()  # uio.metrics names
    generation_config: GenerationConfig = GenerationConfig()
    required_keys: tuple[str, ...] = ()
    scoring: bool = False  # evaluated by scoring candidates (Model.score_options), not generation

    # ---- public API ------------------------------------------------------------------------------
    def encode(self, example: Mapping[str, Any], processor: Processor, rng: np.random.Generator | None = None,
               train: bool = False) -> dict[str, Any]:
        """Raw example -> encoded sample (design.md contract 2). ``rng`` drives training randomness."""
        if not isinstance(example, Mapping):
            raise TypeError(f"{self.name}: an example must be a dict, got {type(example).__name__}")
        missing = [k for k in self.required_keys if k not in example]
        if missing:
            raise KeyError(f"{self.name} example is missing key(s) {missing}; required: {list(self.required_keys)}, "
                           f"got: {sorted(example)}")
        if rng is None:
            rng = np.random.default_rng()
        return self._encode(example, processor, rng, bool(train))

    def decode(self, text_tokens: Any, image: Any, meta: Mapping[str, Any], processor: Processor) -> dict[str, Any]:
        """Generated ids (+ image ``(3, Ht, Wt)`` in [-1, 1] or None) -> prediction dict. Never raises
        on malformed generations."""
        return self._decode(clean_tokens(text_tokens, processor.vocab), image,
                            dict(meta) if isinstance(meta, Mapping) else {}, processor)

    def prompt(self, rng: np.random.Generator | None, train: bool) -> str:
        """The original prompt at evaluation; a random paraphrase (or the original) in training."""
        if train and rng is not None and len(self.prompts) > 1:
            return self.prompts[int(rng.integers(len(self.prompts)))]
        return self.prompts[0]

    def allowed_tokens(self, processor: Processor):
        """Constraint for ``Model.generate(allowed_tokens=...)``: None, a bool ``(V,)`` mask, or a
        callable ``(step, prefix (B, step) int64) -> bool (B, V)``."""
        return None

    def candidates(self, example: Mapping[str, Any]) -> list[str] | None:
        """Candidate answers to score (scoring tasks only)."""
        return None

    def candidate_tokens(self, candidates: Sequence[str], processor: Processor) -> list[list[int]]:
        """Candidates as decoder target ids (EOS-terminated), ready for ``Model.score_options``."""
        return [processor.encode_target(c) for c in candidates]

    def decode_scores(self, scores: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Log-likelihoods of ``meta["candidates"]`` -> prediction (the best-scoring candidate)."""
        cands = list(meta.get("candidates") or [])
        s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).reshape(-1)
        if not cands or s.size != len(cands):
            return {"label": "", "scores": s}
        return {"label": cands[int(np.nanargmax(np.nan_to_num(s, nan=-np.inf)))] if np.isfinite(s).any() else "",
                "scores": s}

    def targets_for_metrics(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Ground truth in the metric's target format (encode with ``train=False`` to keep it)."""
        if "gt" not in meta:
            raise KeyError(f"{self.name}: meta has no ground truth; encode the example with train=False")
        return dict(meta["gt"])

    def build_metrics(self) -> dict[str, Any]:
        """Fresh metric objects by name (from ``uio.metrics``)."""
        from uio.metrics import build_metric

        return {name: build_metric(name) for name in self.metrics}

    def replace(self, **changes) -> "Task":
        """A copy with some attributes changed, e.g. ``get_task("depth").replace(max_depth=80.0)``."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for k, v in changes.items():
            if not hasattr(self, k):
                raise AttributeError(f"{self.name} has no attribute {k!r}")
            setattr(new, k, v)
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, group={self.group!r}, output={self.output!r})"

    # ---- for subclasses --------------------------------------------------------------------------
    def _encode(self, example, processor: Processor, rng: np.random.Generator, train: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _decode(self, ids: np.ndarray, image, meta: dict, processor: Processor) -> dict[str, Any]:
        raise NotImplementedError

    def sample(self, processor: Processor, example: Mapping[str, Any], prompt_ids: list[int],
               image_input: ImageInput | None = None, target_ids: list[int] | None = None,
               image_target: ImageTarget | None = None, **meta) -> dict[str, Any]:
        """Assemble a contract-2 sample; ``meta`` gets the task, id, dataset and the given fields."""
        if image_input is None:
            image_input = processor.empty_image_input()
        if image_target is None:
            image_target = processor.empty_image_target()
        if target_ids is None:
            target_ids = [processor.vocab.eos_id]
        info = {"task": self.name, "id": str(example.get("id", "")), "dataset": str(example.get("dataset", ""))}
        if image_input.info is not None:
            info["image_hw"] = tuple(int(v) for v in image_input.info.original_hw)
        info.update(meta)
        return {
            "text_inputs": list(prompt_ids),
            "image_input": image_input.image,
            "image_input_mask": image_input.mask,
            "text_targets": list(target_ids),
            "image_target": image_target.image,
            "image_target_mask": image_target.mask,
            "task": self.name,
            "meta": info,
        }


# ---- validation helpers ------------------------------------------------------------------------
def image_hw(example: Mapping[str, Any], task: str, key: str = "image") -> tuple[int, int]:
    img = example[key]
    shape = getattr(img, "shape", None)
    if shape is None and hasattr(img, "size") and not isinstance(img, np.ndarray):  # PIL
        w, h = img.size
        return int(h), int(w)
    if shape is None or len(shape) < 2:
        raise ValueError(f"{task}: example[{key!r}] must be an image array (H, W, 3), got {type(img).__name__}")
    if isinstance(img, torch.Tensor) and len(shape) == 3 and shape[0] in (1, 3, 4):
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def check_box(box: Any, task: str, key: str = "box") -> np.ndarray:
    """A pixel ``[x1, y1, x2, y2]`` box as float64 (4,), or a clear ValueError."""
    try:
        arr = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{task}: {key} must be 4 numbers [x1, y1, x2, y2], got {box!r}") from None
    if arr.shape != (4,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{task}: {key} must be 4 finite numbers [x1, y1, x2, y2], got {box!r}")
    if arr[2] < arr[0] or arr[3] < arr[1]:
        raise ValueError(f"{task}: {key} must have x1 <= x2 and y1 <= y2 (pixel [x1, y1, x2, y2]), got {arr.tolist()}")
    return arr


def check_boxes(boxes: Any, task: str, key: str = "boxes") -> np.ndarray:
    """A list (or (N, 4) array) of pixel boxes as float64 (N, 4); may be empty."""
    if isinstance(boxes, np.ndarray):
        if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4):
            raise ValueError(f"{task}: {key} must be (N, 4) [x1, y1, x2, y2] boxes, got shape {boxes.shape}")
        items = list(boxes) if boxes.size else []
    elif isinstance(boxes, (list, tuple)):
        items = list(boxes)
    else:
        raise ValueError(f"{task}: {key} must be a list of [x1, y1, x2, y2] boxes, got {type(boxes).__name__}")
    return np.stack([check_box(b, task, f"{key}[{i}]") for i, b in enumerate(items)]) if items else np.zeros((0, 4))


def check_mask(mask: Any, hw: tuple[int, int], task: str, key: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != tuple(hw):
        raise ValueError(f"{task}: {key} must be a bool mask of the image's size {tuple(hw)}, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{task}: {key} must be a bool mask (or 0/1), got values {np.unique(arr)[:5].tolist()}")
        arr = arr.astype(bool)
    return arr


def check_text(value: Any, task: str, key: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{task}: {key} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{task}: {key} must be a non-empty string")
    return value


def check_texts(values: Any, task: str, key: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{task}: {key} must be a non-empty list of strings, got {values!r}")
    return [check_text(v, task, f"{key}[{i}]") for i, v in enumerate(values)]


# ---- decoding helpers --------------------------------------------------------------------------
def clean_tokens(text_tokens: Any, vocab: Vocab) -> np.ndarray:
    """Any generation -> int64 ids up to (excluding) the first EOS/pad. Garbage gives an empty array."""
    if text_tokens is None:
        return np.zeros(0, np.int64)
    try:
        if isinstance(text_tokens, torch.Tensor):
            arr = text_tokens.detach().cpu().numpy()
        else:
            arr = np.asarray(text_tokens)
        arr = arr.reshape(-1)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
                                       or arr.dtype == bool):
            return np.zeros(0, np.int64)
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr[: np.argmin(np.isfinite(arr)) if not np.isfinite(arr).all() else arr.size]
        arr = arr.astype(np.int64)
    except (TypeError, ValueError, OverflowError):
        return np.zeros(0, np.int64)
    stop = np.nonzero((arr == vocab.eos_id) | (arr == vocab.pad_id))[0]
    return arr[: stop[0]] if stop.size else arr


def text_ids(ids: np.ndarray, vocab: Vocab) -> list[int]:
    """The plain SentencePiece ids of ``ids`` (drops specials, locations, sentinels, image codes)."""
    return [int(i) for i in ids if 2 < i < vocab.text_vocab]


def parse_located(ids: np.ndarray, vocab: Vocab, group: int, is_coord: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> list[tuple[list[int], list[int]]]:
    """Split ``[coord*group, text*]*`` sequences into (coord ids, text ids) items.

    Runs of coordinate ids shorter than ``group`` (truncated boxes) are dropped with the text that
    follows them; a run of several groups gives several items (only the last one gets the text).
    Text before the first coordinate and ids of other modalities are ignored.
    """
    coord = is_coord(ids) if is_coord is not None else vocab.is_loc(ids)
    items: list[tuple[list[int], list[int]]] = []
    i, n = 0, len(ids)
    while i < n:
        if not coord[i]:
            i += 1
            continue
        j = i
        while j < n and coord[j]:
            j += 1
        run = [int(t) for t in ids[i:j]]
        k = j
        while k < n and not coord[k]:
            k += 1
        label = text_ids(ids[j:k], vocab)
        full = len(run) // group
        complete = len(run) % group == 0
        for g in range(full):
            last = g == full - 1
            items.append((run[g * group : (g + 1) * group], label if (last and complete) else []))
        i = k
    return items


def tokens_to_box(loc_ids: Sequence[int], vocab: Vocab, image_hw: Sequence[int]) -> np.ndarray:
    """4 location ids -> pixel ``[x1, y1, x2, y2]`` ordered and clipped to the image."""
    box = vocab.tokens_to_box(loc_ids, tuple(image_hw))
    h, w = float(image_hw[0]), float(image_hw[1])
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    return np.array([np.clip(x1, 0, w), np.clip(y1, 0, h), np.clip(x2, 0, w), np.clip(y2, 0, h)])


def meta_hw(meta: Mapping[str, Any], key: str = "image_hw") -> tuple[int, int] | None:
    hw = meta.get(key)
    if hw is None:
        return None
    try:
        h, w = int(hw[0]), int(hw[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (h, w) if h > 0 and w > 0 else None


def loc_structure_mask(vocab: Vocab, group: int, after_group: str, extra_coord: Sequence[int] = (),
                       banned: Sequence[int] = ()) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A per-step constraint for ``[coord*group, text*]*`` outputs.

    The first id is a coordinate or EOS (an empty answer); inside a group only coordinate ids are
    allowed; right after a complete group ``after_group`` decides: ``"text"`` (a label must follow),
    ``"eos"`` (the sequence ends) or ``"any"``. ``banned`` ids are never allowed (e.g. the keypoint
    "no coordinates" token at inference).
    """
    if after_group not in ("text", "eos", "any"):
        raise ValueError(f"after_group must be 'text', 'eos' or 'any', got {after_group!r}")
    V = vocab.size
    coord = vocab.loc_mask()
    for t in extra_coord:
        coord[int(t)] = True
    text = vocab.text_mask() & ~coord
    text[vocab.pad_id] = False
    anything = vocab.text_mask()
    anything[vocab.pad_id] = False
    eos_only = torch.zeros(V, dtype=torch.bool)
    eos_only[vocab.eos_id] = True
    after = {"text": text.clone(), "eos": eos_only, "any": anything}[after_group]
    if after_group == "text":
        after[vocab.eos_id] = False
    coord_only = coord.clone()
    start = coord.clone()
    start[vocab.eos_id] = True
    for m in (coord_only, after, anything, start):
        for t in banned:
            m[int(t)] = False
    coord_ids = torch.tensor(sorted(set(range(vocab.loc_start, vocab.loc_end)) | {int(t) for t in extra_coord}))

    def allowed(step: int, prefix: torch.Tensor) -> torch.Tensor:
        p = prefix if prefix.ndim == 2 else prefix.reshape(1, -1)
        B = p.shape[0]
        if p.shape[1] == 0:
            return start.to(p.device).expand(B, V).clone()
        out = anything.to(p.device).expand(B, V).clone()
        is_c = torch.isin(p, coord_ids.to(p.device))  # (B, t)
        # length of the trailing run of coordinate ids
        rev = torch.flip(is_c, dims=[1]).long()
        run = torch.cumprod(rev, dim=1).sum(dim=1)  # (B,)
        pos = run % group
        in_group = (pos != 0)
        done_group = (pos == 0) & (run > 0)
        out[in_group] = coord_only.to(p.device)
        out[done_group] = after.to(p.device)
        return out

    return allowed
