"""Evaluation: a model on a task's held-out examples, next to the task's trivial baseline.

``uio-eval`` (:mod:`uio.cli.eval`) is a thin layer over these functions:

>>> model = load_model("runs/tiny_multitask/model")
>>> examples = load_examples(None, "vqa", "val", max_examples=200)        # the toy world's held-out split
>>> baseline = fit_baseline("vqa", load_examples(None, "vqa", "train", 1000))
>>> result = evaluate_task(model, "vqa", examples, baseline=baseline)
>>> print(format_table(primary_rows([result])))

Each task is run the way it was trained to be used: examples are encoded with ``train=False``
(the original prompt), generated with the task's generation config (constrained by its allowed
tokens; sampling seeded), or -- for classification tasks -- answered by scoring the candidate
labels; outputs are decoded by the task and scored by its metrics against the ground truth kept in
the encoded sample's meta. Two deliberate protocol choices: question answering over a context
longer than the encoder reads every window and keeps the most confident answer (the window
containing the answer is never picked for the model); inpainting is scored with the known pixels
kept (the generated region pasted into the input), for the model and the baseline alike.
"""
from __future__ import annotations

import html
import json
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from uio.baselines import Baseline
    from uio.model import Model
    from uio.processing import Processor

log = logging.getLogger(__name__)

__all__ = [
    "PRIMARY", "GRIT_ORDER", "TaskEvaluation", "load_model", "resolve_data", "load_examples", "evaluate_task",
    "image_use", "primary_rows", "format_table", "grit_table", "format_grit", "save_predictions", "tasks_table",
    "to_jsonable",
]

# The number(s) each task is judged by: (metric, key, higher is better).
PRIMARY: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "image_generation": (("image_similarity", "psnr", True),),
    "image_inpainting": (("image_similarity", "psnr", True),),
    "segmentation_to_image": (("image_similarity", "psnr", True),),
    "masked_image_denoising": (("image_similarity", "psnr", True),),
    "detection": (("detection_map", "map_50", True),),
    "object_localization": (("box_accuracy", "acc", True),),
    "referring_expression": (("box_accuracy", "acc", True),),
    "keypoints": (("keypoint_oks_ap", "ap", True),),
    "object_segmentation": (("mask_iou", "iou", True),),
    "depth": (("depth", "rmse", False),),
    "surface_normals": (("surface_normals", "mean", False),),
    "image_classification": (("accuracy", "acc", True),),
    "region_classification": (("accuracy", "acc", True),),
    "image_captioning": (("captioning", "cider", True),),
    "region_captioning": (("captioning", "cider", True),),
    "vqa": (("vqa_accuracy", "acc", True),),
    "relationship": (("relationship_accuracy", "acc", True),),
    "grounded_vqa": (("grounded_vqa", "acc", True), ("grounded_vqa", "mask_iou", True)),
    "text_classification": (("accuracy", "acc", True),),
    "question_answering": (("squad", "f1", True),),
    "summarization": (("rouge", "rougeL", True),),
}
# GRIT's seven tasks, in the leaderboard's column order, as uio task names
GRIT_ORDER: tuple[str, ...] = ("region_classification", "object_localization", "vqa", "referring_expression",
                               "object_segmentation", "keypoints", "surface_normals")


# ================================================================================================
# Loading a model
# ================================================================================================
def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               text_tokenizer: str | Path | None = None) -> "Model":
    """A :class:`uio.Model` from a ``save_pretrained`` directory, a Lightning ``.ckpt`` written by
    ``uio-train``, a run directory (its exported ``model/``, else ``checkpoints/last.ckpt``) or a
    released Flax checkpoint. ``dtype`` casts the network (the image tokenizer keeps its precision);
    ``text_tokenizer`` (a directory with ``spiece.model`` or a ``.model`` file) replaces the one
    recorded in a ``.ckpt``."""
    from uio.model import CONFIG_NAME, Model

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}: expected a Model.save_pretrained directory, a uio-train .ckpt, "
                                "a run directory (runs/<name>) or a released *_1000k.bin; train one with "
                                "`uio-train +experiment=tiny_multitask` (it exports runs/tiny_multitask/model)")
    if p.is_dir() and not (p / CONFIG_NAME).is_file():
        for candidate in (p / "model", p / "checkpoints" / "last.ckpt"):
            if candidate.exists():
                return load_model(candidate, device, dtype, text_tokenizer)
        raise FileNotFoundError(f"{p} is a directory without {CONFIG_NAME}, model/ or checkpoints/last.ckpt; "
                                "expected a Model.save_pretrained directory or a uio-train run directory")
    if p.is_file() and p.suffix == ".ckpt":
        model = _load_lightning_checkpoint(p, text_tokenizer)
    else:
        model = Model.from_pretrained(p)
        if text_tokenizer is not None:
            model.text_tokenizer = _text_tokenizer(text_tokenizer, model.config.image_vocab)
    if dtype is not None:
        model.network.to(dtype)
    return model.to(device).eval()


def _text_tokenizer(path: str | Path, image_vocab: int):
    from uio.text_tokenizer import TextTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"text tokenizer {p} not found (a directory with spiece.model or a .model file)")
    return TextTokenizer.from_dir(p, image_vocab=image_vocab) if p.is_dir() else TextTokenizer(p, image_vocab=image_vocab)


def _load_lightning_checkpoint(path: Path, text_tokenizer: str | Path | None) -> "Model":
    """Rebuild the model of a ``uio-train`` checkpoint from its hyperparameters and weights (the
    image tokenizer's weights are in the checkpoint; its ``weights`` path is not needed)."""
    import pickle

    from uio.config import ModelConfig
    from uio.image_tokenizer import build_image_tokenizer
    from uio.model import Model

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s holds objects beyond tensors; loading it with weights_only=False (only do this for "
                    "checkpoints you made)", path)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, Mapping) or "model" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a uio-train checkpoint (no hyper_parameters['model'] / state_dict); "
                         "for a sharded (FSDP) checkpoint use the exported model directory instead")
    spec = hp.get("image_tokenizer")
    spec = None if spec is None else {k: v for k, v in dict(spec).items() if k != "weights"}
    config = ModelConfig.from_dict({**dict(hp["model"]), "image_tokenizer": spec})
    tok_path = text_tokenizer if text_tokenizer is not None else hp.get("text_tokenizer")
    if tok_path is None:
        raise ValueError(f"{path} records no text tokenizer; pass text_tokenizer=<dir with spiece.model>")
    if not Path(str(tok_path)).expanduser().exists():
        raise FileNotFoundError(f"the text tokenizer {tok_path} recorded in {path} does not exist any more; pass "
                                "text_tokenizer=<dir with spiece.model> (uio-eval: text_tokenizer=...)")
    tok = _text_tokenizer(tok_path, config.image_vocab)
    with torch.device("meta"):
        image_tok = build_image_tokenizer(spec) if spec is not None else None
        model = Model(config, image_tokenizer=image_tok, text_tokenizer=tok, init=False)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the recorded config (missing {sorted(missing)[:6]}, "
                         f"unexpected {sorted(unexpected)[:6]})")
    if image_tok is not None:
        image_tok.freeze()
    return model


# ================================================================================================
# Data
# ================================================================================================
def resolve_data(data: str | Path | Sequence[str] | None, task: str, split: str,
                 toyworld: Mapping[str, Any] | None = None) -> list[list[str]]:
    """Shard URLs of ``task``'s ``split``, one list per dataset.

    ``data``: None (the toy world under ``$UIO_HOME/toyworld``, built with ``toyworld`` keywords
    when missing), a shard root (``<root>/<task>/<dataset>/manifest.json``), one dataset's folder
    or ``manifest.json``, or tar URLs / a brace pattern (read as ``task``'s examples).
    """
    from uio.data.shards import discover, expand_urls, load_manifest, manifest_splits, manifest_urls

    if data is None:
        from uio.data.toyworld import build_toyworld, read_info
        from uio.paths import toyworld_dir

        root = toyworld_dir()
        if read_info(root) is None:
            log.info("no toy world at %s: building it (%s)", root, dict(toyworld or {}))
            build_toyworld(root, **dict(toyworld or {}))
        data = root
    if isinstance(data, (str, Path)) and Path(str(data)).expanduser().exists():
        p = Path(str(data)).expanduser()
        manifest = p if p.is_file() and p.name.endswith(".json") else p / "manifest.json"
        if manifest.is_file():
            m = load_manifest(manifest)
            if m.get("task") != task:
                raise ValueError(f"{manifest} holds task {m.get('task')!r}, not {task!r}")
            if split not in manifest_splits(m):
                raise KeyError(f"{manifest} has no {split!r} split (it has {sorted(manifest_splits(m))})")
            return [u for u in [manifest_urls(manifest, split)] if u]  # a split may hold no shards
        if p.is_dir() and not list(p.glob("*.tar")):
            found = discover(p, split=split, tasks=[task])
            if not found:
                raise FileNotFoundError(f"no {task}/<dataset>/manifest.json with a {split!r} split under {p}")
            return [u for u in (manifest_urls(f["dir"], split) for f in found) if u]
        if p.is_dir():
            return [sorted(str(t) for t in p.glob("*.tar"))]
    return [expand_urls(data)]  # tar files, brace patterns, pipe: URLs


def load_examples(data: str | Path | Sequence[str] | None, task: str, split: str = "val",
                  max_examples: int | None = None, toyworld: Mapping[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
    """The first ``max_examples`` raw examples of ``task``'s ``split`` (datasets interleaved
    round-robin, in a fixed order; corrupt samples are skipped and logged by the reader)."""
    from uio.data.shards import ShardSource

    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    its: list[Iterator[dict[str, Any]]] = [iter(ShardSource(urls, rank=0, world_size=1))
                                           for urls in resolve_data(data, task, split, toyworld)]
    out: list[dict[str, Any]] = []
    while its and (max_examples is None or len(out) < max_examples):
        for it in list(its):
            ex = next(it, None)
            if ex is None:
                its.remove(it)
                continue
            out.append(ex)
            if max_examples is not None and len(out) >= max_examples:
                break
    return out


# ================================================================================================
# Running a task
# ================================================================================================
@dataclass
class TaskEvaluation:
    """One task's results: ``metrics`` is ``{metric: {key: value}}`` (the metrics' ``compute()``);
    ``baseline`` is ``{"name", "description", "metrics", "train_examples"}`` or None."""

    task: str
    num_examples: int
    metrics: dict[str, dict[str, float]]
    seconds: float
    baseline: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)
    ceiling: dict[str, dict[str, float]] | None = None  # metrics of the ground truth through the image tokenizer
    image_use: dict[str, float] | None = None  # see image_use()

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"task": self.task, "num_examples": self.num_examples, "seconds": round(self.seconds, 2),
                          "metrics": self.metrics, "baseline": self.baseline, "tokenizer_ceiling": self.ceiling,
                          "image_use": self.image_use})


def to_jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    return x


def _generation_kwargs(task, model: "Model", overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    kw = task.generation_config.to_kwargs()
    kw["max_text_len"] = min(kw["max_text_len"], model.config.decoder_max_text_len)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k == "max_text_len":  # a cap on every task's own length
            kw[k] = min(kw[k], int(v))
        elif k in ("method", "num_beams", "top_p", "temperature"):
            kw[k] = v
        elif k == "num_samples":  # image-only outputs: the pixel mean of that many samples
            if task.output == "image" and kw.get("image_output"):
                kw[k] = int(v)
        else:
            raise KeyError(f"unknown generation option {k!r}; expected max_text_len, method, num_beams, top_p, "
                           "temperature or num_samples")
    return kw


def encode_examples(task: str, examples: Sequence[Mapping[str, Any]], processor: "Processor", seed: int = 0,
                    train: bool = False) -> list[dict[str, Any]]:
    """Evaluation-mode encoding (``train=False``: ground truth kept in ``meta["gt"]``), or with
    ``train=True`` the training targets (image targets as pixels), with the same per-example seeds."""
    from uio.tasks import get_task

    t = get_task(task)
    return [t.encode(ex, processor, np.random.default_rng([seed, 7, i]), train=train) for i, ex in enumerate(examples)]


@torch.no_grad()
def predict(model: "Model", task: str, samples: Sequence[dict[str, Any]], examples: Sequence[Mapping[str, Any]],
            batch_size: int = 16, generation: Mapping[str, Any] | None = None, seed: int = 0
            ) -> list[dict[str, Any]]:
    """The model's decoded prediction for every encoded sample (see the module docstring)."""
    from uio.tasks import get_task

    t = get_task(task)
    proc = model.processor
    preds: list[dict[str, Any] | None] = [None] * len(samples)
    if t.scoring:
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            cands = tuple(s["meta"].get("candidates") or ())
            if not cands:
                raise ValueError(f"{task}: example {s['meta'].get('id')!r} has no candidates to score; the data "
                                 "must list them (raw example key 'candidates')")
            groups[cands].append(i)
        for cands, idx in groups.items():
            options = t.candidate_tokens(list(cands), proc)
            for k in range(0, len(idx), batch_size):
                rows = idx[k : k + batch_size]
                scores = model.score_options(model.batch_inputs([samples[i] for i in rows]), options).float().cpu()
                for j, i in enumerate(rows):
                    preds[i] = t.decode_scores(scores[j], samples[i]["meta"])
        return preds  # type: ignore[return-value]
    kw = _generation_kwargs(t, model, generation)
    gen = torch.Generator(model.device).manual_seed(int(seed))
    todo = list(range(len(samples)))
    if task == "question_answering":  # contexts longer than the encoder: every window, best answer
        from uio.tasks.pipelines import answer_with_windows

        long = [i for i in todo if samples[i]["meta"].get("num_windows", 1) > 1]
        for i in long:
            r = answer_with_windows(model, examples[i], proc, batch_size=batch_size, generator=gen, **kw)
            preds[i] = {"answer": r["answer"]}
        todo = [i for i in todo if i not in set(long)]
    allowed = t.allowed_tokens(proc)
    for k in range(0, len(todo), batch_size):
        rows = todo[k : k + batch_size]
        out = model.generate(model.batch_inputs([samples[i] for i in rows]), allowed_tokens=allowed, generator=gen, **kw)
        for j, i in enumerate(rows):
            image = out.images[j].float() if out.images is not None else None
            preds[i] = t.decode(out.text_tokens[j].cpu(), image, samples[i]["meta"], proc)
    _keep_known_pixels(task, preds, examples)
    return preds  # type: ignore[return-value]


def _keep_known_pixels(task: str, preds: list[dict[str, Any] | None], examples: Sequence[Mapping[str, Any]]) -> None:
    """Inpainting: only the box is predicted; the known pixels stay (see the module docstring)."""
    if task != "image_inpainting":
        return
    from uio.inference import paste_region
    from uio.processing import to_float_image, to_uint8

    for i in range(len(preds)):
        p = preds[i]
        if p is not None and p.get("valid", True):
            orig = to_uint8(to_float_image(examples[i]["image"]))
            if p["image"].shape == orig.shape:
                p["image"] = paste_region(p["image"], orig, examples[i]["box"])


@torch.no_grad()
def tokenizer_ceiling_predictions(model: "Model", task: str, samples: Sequence[dict[str, Any]],
                                  examples: Sequence[Mapping[str, Any]], batch_size: int = 16, seed: int = 0
                                  ) -> list[dict[str, Any]] | None:
    """What a perfect network would output for an image-output task: each example's ground-truth
    target (text and image, encoded as for training) with the image round-tripped through the
    image tokenizer (codes -> pixels), decoded like a generation. Its score is the best any model
    can reach with this tokenizer, which tells a tokenizer limit from a network one. None for
    tasks without image outputs or a model without an image tokenizer."""
    from uio.data.collate import collate
    from uio.tasks import get_task

    t = get_task(task)
    if not t.generation_config.image_output or model.image_tokenizer is None:
        return None
    proc = model.processor
    train = encode_examples(task, examples, proc, seed, train=True)
    preds: list[dict[str, Any] | None] = []
    for k in range(0, len(samples), batch_size):
        rows = range(k, min(k + batch_size, len(samples)))
        batch = collate([train[i] for i in rows])
        codes = model.encode_image_targets(batch["image_targets"].to(model.device))
        images = model.decode_image_codes(codes).float().cpu()
        for i in rows:
            ids = torch.as_tensor(np.asarray(train[i]["text_targets"]), dtype=torch.long)
            preds.append(t.decode(ids, images[i - k], samples[i]["meta"], proc))
    _keep_known_pixels(task, preds, examples)
    return preds  # type: ignore[return-value]


@torch.no_grad()
def image_use(model: "Model", task: str, examples: Sequence[Mapping[str, Any]], batch_size: int = 16,
              seed: int = 0) -> dict[str, float] | None:
    """How much the model reads the input image for ``task``: the teacher-forced loss of the
    ground-truth targets (nats per target token, encoded as for training) with each example's own
    image, ``nll``, and with the next example's image in its place, ``nll_other_image``; ``gain``
    is their difference. A gain near 0 means the outputs do not depend on the image: the model
    answers from the prompt and the label prior alone (what a trivial baseline does), so only
    learning to look can move it past the baseline. None for tasks without an input image or with
    fewer than two examples."""
    from uio.data.collate import collate

    proc = model.processor
    if len(examples) < 2:
        return None
    samples = encode_examples(task, examples, proc, seed, train=True)
    if not any(np.asarray(s["image_input_mask"]).any() for s in samples):
        return None
    n = len(samples)
    swapped = [dict(s, image_input=samples[(i + 1) % n]["image_input"],
                    image_input_mask=samples[(i + 1) % n]["image_input_mask"]) for i, s in enumerate(samples)]
    totals = {"nll": 0.0, "nll_other_image": 0.0}
    tokens = 0
    with model._eval():
        for k in range(0, n, batch_size):
            for key, rows in (("nll", samples[k : k + batch_size]), ("nll_other_image", swapped[k : k + batch_size])):
                batch = collate([dict(r, meta={}) for r in rows], proc.max_input_len, proc.max_target_len)
                batch = {name: v.to(model.device) if isinstance(v, torch.Tensor) else v for name, v in batch.items()}
                batch = dict(model.tokenize_image_targets(batch))
                batch.pop("image_targets", None)  # a model without an image tokenizer: text targets only
                out = model(batch)
                count = int(out.num_text_tokens + out.num_image_tokens)
                totals[key] += float(out.loss) * count
                if key == "nll":
                    tokens += count
    if tokens == 0:
        return None
    res = {k: v / tokens for k, v in totals.items()}
    res["gain"] = res["nll_other_image"] - res["nll"]
    return res


def evaluate_task(model: "Model", task: str, examples: Sequence[Mapping[str, Any]], batch_size: int = 16,
                  generation: Mapping[str, Any] | None = None, seed: int = 0, baseline: "Baseline | None" = None,
                  keep_predictions: bool = False, ceiling: bool = False, measure_image_use: bool = False
                  ) -> TaskEvaluation:
    """Run ``model`` on ``examples`` and score it with the task's metrics; with a fitted
    ``baseline``, score it on the same examples and targets too; with ``ceiling``, also score the
    image tokenizer's ceiling (:func:`tokenizer_ceiling_predictions`) for image-output tasks; with
    ``measure_image_use``, also measure how much the model reads the image (:func:`image_use`)."""
    from uio.baselines import score_predictions
    from uio.tasks import get_task

    t = get_task(task)
    if not t.metrics:
        raise ValueError(f"task {task!r} has no metrics to evaluate (it is a pre-training objective)")
    if not examples:
        raise ValueError(f"{task}: no examples to evaluate")
    start = time.perf_counter()
    samples = encode_examples(task, examples, model.processor, seed)
    targets = [t.targets_for_metrics(s["meta"]) for s in samples]
    preds = predict(model, task, samples, examples, batch_size, generation, seed)
    metrics = score_predictions(task, preds, targets)
    result = TaskEvaluation(task, len(examples), metrics, time.perf_counter() - start)
    if baseline is not None:
        bpreds = [baseline.predict(ex, s["meta"]) for ex, s in zip(examples, samples)]
        result.baseline = {"name": baseline.name, "description": baseline.description,
                           "metrics": score_predictions(task, bpreds, targets),
                           "train_examples": getattr(baseline, "num_train_examples", None)}
    if ceiling:
        cpreds = tokenizer_ceiling_predictions(model, task, samples, examples, batch_size, seed)
        if cpreds is not None:
            result.ceiling = score_predictions(task, cpreds, targets)
    if measure_image_use:
        result.image_use = image_use(model, task, examples, batch_size, seed)
    if keep_predictions:
        result.predictions = [{"example": ex, "meta": s["meta"], "prediction": p, "target": tg}
                              for ex, s, p, tg in zip(examples, samples, preds, targets)]
    return result


# ================================================================================================
# Tables
# ================================================================================================
def primary_rows(results: Sequence[TaskEvaluation]) -> list[dict[str, Any]]:
    """One row per (task, headline number): model, baseline, margin (in the better direction) and
    the model / baseline ratio."""
    rows = []
    for r in results:
        for metric, key, higher in PRIMARY.get(r.task, ()):
            model_v = r.metrics.get(metric, {}).get(key, math.nan)
            base_v = math.nan
            if r.baseline is not None:
                base_v = r.baseline["metrics"].get(metric, {}).get(key, math.nan)
            margin = (model_v - base_v) if higher else (base_v - model_v)
            ratio = model_v / base_v if base_v and math.isfinite(base_v) and base_v != 0 else math.nan
            ceil_v = r.ceiling.get(metric, {}).get(key, math.nan) if r.ceiling is not None else math.nan
            use_v = r.image_use["gain"] if r.image_use is not None else math.nan
            rows.append({"task": r.task, "metric": f"{metric}.{key}", "higher_is_better": higher, "model": model_v,
                         "baseline": base_v, "margin": margin, "ratio": ratio, "tokenizer_ceiling": ceil_v,
                         "image_use": use_v,
                         "beats_baseline": bool(math.isfinite(margin) and margin > 0),
                         "baseline_rule": None if r.baseline is None else r.baseline["name"],
                         "num_examples": r.num_examples})
    return rows


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.{digits}f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`primary_rows` as a markdown table ("image use": :func:`image_use`'s gain)."""
    head = ("| task | metric | n | model | baseline | margin | model / baseline | baseline rule | tokenizer ceiling "
            "| image use |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    lines = [head]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        margin = _fmt(r["margin"])
        if margin != "–" and not margin.startswith("-"):
            margin = "+" + margin
        ratio = "–" if not math.isfinite(r["ratio"]) else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['task']} | {r['metric']} {arrow} | {r['num_examples']} | {_fmt(r['model'])} | "
                     f"{_fmt(r['baseline'])} | {margin} | {ratio} | {r['baseline_rule'] or '–'} | "
                     f"{_fmt(r.get('tokenizer_ceiling', math.nan))} | {_fmt(r.get('image_use', math.nan))} |")
    return "\n".join(lines)


def grit_table(results: Sequence[TaskEvaluation], baseline: bool = False) -> dict[str, float] | None:
    """GRIT scores (x100, ``overall`` = mean over the seven, a missing task counting 0) of the
    evaluated GRIT tasks, for the model or (``baseline=True``) the baselines; None if none ran."""
    from uio.metrics.grit import GRIT_TASKS, UIO_TO_GRIT, grit_scores

    found = {}
    for r in results:
        if r.task not in UIO_TO_GRIT:
            continue
        metrics = r.metrics if not baseline else (r.baseline or {}).get("metrics")
        if metrics is None:
            continue
        found[r.task] = metrics[GRIT_TASKS[UIO_TO_GRIT[r.task]][0]]
    return grit_scores(found) if found else None


def format_grit(model_scores: Mapping[str, float], baseline_scores: Mapping[str, float] | None = None) -> str:
    """GRIT scores as the leaderboard's row: the seven tasks and their average."""
    from uio.metrics.grit import GRIT_TASKS

    cols = list(GRIT_TASKS) + ["overall"]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, s in (("model", model_scores), ("baseline", baseline_scores)):
        if s is not None:
            lines.append(f"| {name} | " + " | ".join(_fmt(s.get(c, math.nan), 1) if c in s else "–" for c in cols)
                         + " |")
    return "\n".join(lines)


def tasks_table() -> str:
    """Every task with its group, output and the number it is judged by (for a bare ``uio-eval``)."""
    from uio.baselines import BASELINES
    from uio.tasks import TASKS

    lines = [f"{'task':<24}{'group':<22}{'output':<12}{'metric (primary)':<32}baseline"]
    for name, t in TASKS.items():
        prim = ", ".join(f"{m}.{k}" for m, k, _ in PRIMARY.get(name, ())) or "(no metric: pre-training)"
        lines.append(f"{name:<24}{t.group:<22}{t.output:<12}{prim:<32}{'yes' if name in BASELINES else '-'}")
    return "\n".join(lines)


# ================================================================================================
# Saving predictions
# ================================================================================================
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _stem(i: int, meta: Mapping[str, Any]) -> str:
    return f"{i:05d}_" + _SAFE.sub("_", str(meta.get("id") or "example"))[:80]


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _text_of(pred: Mapping[str, Any]) -> str:
    for k in ("text", "answer", "label", "predicate"):
        if k in pred and isinstance(pred[k], str):
            return pred[k]
    return ""


def _gt_text(target: Mapping[str, Any]) -> str:
    for k in ("captions", "answers"):
        if k in target:
            return " | ".join(target[k][:3])
    for k in ("label", "predicate", "summary"):
        if k in target and isinstance(target[k], str):
            return target[k]
    return ""


def _picture(task: str, image: Any, value: Mapping[str, Any], meta: Mapping[str, Any], gt: bool):
    """A PIL picture of a prediction (or of the ground truth) for the HTML grid; None for text."""
    from uio import plotting

    try:
        if "boxes" in value and image is not None:
            labels = value.get("labels")
            boxes = np.asarray(value["boxes"], dtype=np.float64).reshape(-1, 4)
            return plotting.draw_boxes(image, boxes, labels if labels is not None and len(labels) == len(boxes)
                                       else None, None if gt else value.get("scores"))
        if "keypoints" in value and image is not None:
            box = value.get("box", meta.get("box"))
            return plotting.draw_keypoints(image, value["keypoints"], boxes=None if box is None else [box])
        if ("masks" in value or "mask" in value) and image is not None:
            masks = value.get("masks", value.get("mask"))
            return plotting.draw_masks(image, [] if masks is None else masks)
        if "depth" in value:
            return plotting.colorize_depth(value["depth"], meta.get("max_depth"))
        if "normals" in value:
            return plotting.colorize_normals(value["normals"])
        if "image" in value:
            return plotting.to_pil(value["image"])
    except (ValueError, TypeError) as e:  # a malformed prediction is shown as missing, never fatal
        log.debug("%s: cannot draw %s: %s", task, "ground truth" if gt else "prediction", e)
    return None


def save_predictions(out_dir: str | Path, result: TaskEvaluation, num_html: int = 24) -> Path:
    """Write ``result.predictions`` (``evaluate_task(..., keep_predictions=True)``) under
    ``out_dir/<task>/``: ``predictions.jsonl`` (one record per example), COCO results JSON for
    boxes (``coco_results.json`` + ``categories.json``) and keypoints (``coco_keypoints.json``),
    PNG files for dense maps (depth in millimetres as 16-bit PNG, normals as ``(n + 1) / 2`` RGB,
    instance masks as 8-bit index maps, images) and ``index.html``, a grid of the first
    ``num_html`` examples (input, prediction, ground truth, texts)."""
    from uio.tasks import get_task

    task = result.task
    d = Path(out_dir) / task
    d.mkdir(parents=True, exist_ok=True)
    records, coco, coco_kp = [], [], []
    categories: dict[str, int] = {}
    for i, r in enumerate(result.predictions):
        meta, pred = r["meta"], r["prediction"]
        stem = _stem(i, meta)
        rec: dict[str, Any] = {"index": i, "id": meta.get("id"), "task": task, "prompt": meta.get("prompt")}
        text = _text_of(pred)
        if text or get_task(task).output in ("text", "label", "text+image"):
            rec["prediction"] = text
        if "boxes" in pred:
            boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
            labels = list(pred.get("labels") or [meta.get("label") or meta.get("prompt") or "object"] * len(boxes))
            scores = np.asarray(pred.get("scores", np.ones(len(boxes))), dtype=np.float64).reshape(-1)
            rec.update(boxes=boxes.tolist(), labels=labels, scores=scores.tolist())
            for b, lab, s in zip(boxes, labels, scores):
                cat = categories.setdefault(str(lab), len(categories) + 1)
                coco.append({"image_id": i + 1, "uio_id": meta.get("id"), "category_id": cat,
                             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                             "score": float(s)})
        if "keypoints" in pred:
            k = np.asarray(pred["keypoints"], dtype=np.float64).reshape(-1, 17, 3)
            scores = np.asarray(pred.get("scores", [pred.get("score", 1.0)] * len(k)), dtype=np.float64).reshape(-1)
            rec.update(keypoints=k.tolist(), score=scores.tolist())
            for kk, s in zip(k, scores):
                coco_kp.append({"image_id": i + 1, "uio_id": meta.get("id"), "category_id": 1,
                                "keypoints": [float(v) for v in kk.reshape(-1)], "score": float(s)})
        if "depth" in pred:
            mm = np.clip(np.round(np.asarray(pred["depth"], dtype=np.float64) * 1000.0), 0, 65535).astype(np.uint16)
            _png(d / "depth" / f"{stem}.png", mm)
            rec["file"] = f"depth/{stem}.png"
            rec["units"] = "millimetres (uint16)"
        if "normals" in pred:
            n = np.asarray(pred["normals"], dtype=np.float32)
            _png(d / "normals" / f"{stem}.png", np.round(np.clip((n + 1) / 2, 0, 1) * 255).astype(np.uint8))
            rec["file"] = f"normals/{stem}.png"
        if "masks" in pred:
            hw = tuple(meta.get("target_hw") or meta.get("image_hw") or (0, 0))
            masks = [np.asarray(m, dtype=bool) for m in pred["masks"]]
            index = np.zeros(masks[0].shape if masks else hw, np.uint8)
            for k, m in enumerate(masks[:255], start=1):
                index[m] = k
            if index.size:
                _png(d / "masks" / f"{stem}.png", index)
                rec["file"] = f"masks/{stem}.png"
            rec["num_instances"] = len(masks)
            if pred.get("colors") is not None:
                rec["colors"] = list(pred["colors"])  # colour of each instance in the mask PNG (1, 2, ...)
        if "image" in pred and isinstance(pred["image"], np.ndarray):
            _png(d / "images" / f"{stem}.png", np.asarray(pred["image"], dtype=np.uint8))
            rec["file"] = f"images/{stem}.png"
        if "label" in pred and "scores" in pred and task not in ("detection", "object_localization",
                                                                    "referring_expression"):
            rec["candidate_scores"] = np.asarray(pred["scores"], dtype=np.float64).tolist()
        records.append(to_jsonable(rec))
    with open(d / "predictions.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    if coco or categories:
        (d / "coco_results.json").write_text(json.dumps(coco))
        (d / "categories.json").write_text(json.dumps([{"id": v, "name": k} for k, v in categories.items()], indent=1))
    if coco_kp:
        (d / "coco_keypoints.json").write_text(json.dumps(coco_kp))
    _write_html(d, result, num_html)
    return d


def _write_html(d: Path, result: TaskEvaluation, num: int) -> None:
    from uio import plotting

    rows = []
    for i, r in enumerate(result.predictions[:num]):
        ex, meta, pred, target = r["example"], r["meta"], r["prediction"], r["target"]
        image = ex.get("image")
        cells = []
        for kind, pic in (("input", plotting.to_pil(image) if image is not None else None),
                          ("prediction", _picture(result.task, image, pred, meta, gt=False)),
                          ("ground truth", _picture(result.task, image, target, meta, gt=True))):
            if pic is None:
                cells.append("<td></td>")
                continue
            name = f"html/{_stem(i, meta)}_{kind.replace(' ', '_')}.png"
            (d / "html").mkdir(exist_ok=True)
            pic.thumbnail((256, 256))
            pic.save(d / name)
            cells.append(f'<td><img src="{name}" title="{kind}"></td>')
        texts = (f"<b>prompt</b>: {html.escape(str(meta.get('prompt', '')))}<br>"
                 f"<b>prediction</b>: {html.escape(_text_of(pred))}<br>"
                 f"<b>ground truth</b>: {html.escape(_gt_text(target))}")
        rows.append(f"<tr><td>{i}</td>{''.join(cells)}<td class=t>{texts}</td></tr>")
    page = (f"<!doctype html><meta charset=utf-8><title>uio-eval {result.task}</title>"
            "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}td.t{max-width:420px}"
            "img{image-rendering:pixelated;width:256px}</style>"
            f"<h2>{result.task}: {result.num_examples} examples</h2>"
            f"<pre>{html.escape(json.dumps(to_jsonable(result.metrics), indent=1))}</pre>"
            "<table><tr><th>#</th><th>input</th><th>prediction</th><th>ground truth</th><th>text</th></tr>"
            + "".join(rows) + "</table>")
    (d / "index.html").write_text(page)
