"""``uio-eval``: evaluate a checkpoint on Unified-IO tasks, next to each task's trivial baseline.

    uio-eval                                           # list the tasks
    uio-eval task=depth describe=true                  # one task: prompts, output, metrics, decoding
    uio-eval task=vqa ckpt=runs/tiny_multitask/model   # one task on the toy world's held-out split
    uio-eval task=all                                  # every task: the model-vs-baseline table (markdown)
    uio-eval task=grit                                 # GRIT's seven task types and their average
    uio-eval task=detection shards=/data/shards save_predictions=true

Writes ``<output_dir>/report.json`` (every metric of the model and of the baseline) and
``report.md`` (the table), and prints the table. See ``conf/eval.yaml`` for every option and
:mod:`uio.evaluation` for the protocol. During training the same per-task inference runs as
validation and is logged as ``val/<task>/<metric>``.
"""
from __future__ import annotations

import difflib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from uio.cli import conf_dir

KEYS = {"name", "task", "describe", "ckpt", "text_tokenizer", "shards", "split", "max_examples", "batch_size", "seed",
        "device", "dtype", "generation", "baselines", "tokenizer_ceiling", "image_use", "train_split",
        "baseline_train_examples", "save_predictions", "num_html_examples", "output_dir", "all_tasks", "toyworld", "paths"}
GENERATION_KEYS = {"max_text_len", "method", "num_beams", "top_p", "temperature", "num_samples"}
DTYPES = ("float32", "bfloat16", "float16")


class EvalConfigError(ValueError):
    """A composed eval config has an unknown key or a bad value."""


def _say(msg: str) -> None:
    print(f"[uio-eval] {msg}", flush=True)


def _unknown(keys, allowed, where: str) -> None:
    for k in keys:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = f" Did you mean '{where}{close[0]}'?" if close else ""
            raise EvalConfigError(f"unknown config key '{where}{k}'.{hint} Allowed keys: {sorted(allowed)}")


def check_config(cfg: DictConfig) -> None:
    """Reject unknown keys and impossible values with a message naming them."""
    _unknown(cfg.keys(), KEYS, "")
    _unknown((cfg.get("generation") or {}).keys(), GENERATION_KEYS, "generation.")
    if cfg.dtype not in DTYPES:
        raise EvalConfigError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    for key in ("batch_size", "baseline_train_examples", "num_html_examples"):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise EvalConfigError(f"{key} must be a positive int, got {v!r}")
    me = cfg.get("max_examples")
    if me is not None and (not isinstance(me, int) or isinstance(me, bool) or me < 1):
        raise EvalConfigError(f"max_examples must be a positive int or null (the whole split), got {me!r}")


def _known_task(name: Any) -> str:
    from uio.tasks import TASKS

    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS) + ["grit", "all"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise EvalConfigError(f"unknown task {name!r}.{hint} Run `uio-eval` to list the tasks.")
    return str(name)


def resolve_tasks(cfg: DictConfig) -> tuple[list[str], str]:
    """(task names, mode) for ``task=<name>|grit|all|[names]``; mode is "grit", "all" or "tasks"."""
    from uio.evaluation import GRIT_ORDER, PRIMARY

    t = cfg.task
    if isinstance(t, str) and t == "grit":
        return list(GRIT_ORDER), "grit"
    if isinstance(t, str) and t == "all":
        names, mode = list(cfg.all_tasks), "all"
    else:
        names = [t] if isinstance(t, str) else list(t)
        mode = "tasks"
    for n in names:
        _known_task(n)
        if n not in PRIMARY:
            raise EvalConfigError(f"task {n!r} has no evaluation metric (a pre-training objective); "
                                  f"`uio-eval task={n} describe=true` describes it")
    return names, mode


def describe(name: str) -> str:
    """A task's group, output, metrics, decoding and prompts."""
    from uio.baselines import BASELINES
    from uio.evaluation import PRIMARY
    from uio.tasks import get_task

    t = get_task(_known_task(name))
    g = t.generation_config
    prim = ", ".join(f"{m}.{k} ({'higher' if hi else 'lower'} is better)" for m, k, hi in PRIMARY.get(t.name, ()))
    parts = [f"task: {t.name}", f"group: {t.group}",
             f"output: {t.output}" + (f" ({t.output_format})" if t.output_format else ""),
             f"metrics: {', '.join(t.metrics) or '-'}", f"reported: {prim or '-'}",
             "decoding: " + ("scores the candidates (Model.score_options)" if t.scoring else
                             f"{g.method}, max_text_len={g.max_text_len}, image_output={g.image_output}"),
             f"baseline: {BASELINES[t.name]().name if t.name in BASELINES else '-'}",
             "prompts:"] + [f"  {p}" for p in t.prompts]
    return "\n".join(parts)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return dev


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Evaluate according to a composed ``eval`` config; returns the report (None when listing or
    describing)."""
    check_config(cfg)
    from uio.evaluation import tasks_table

    if cfg.task is None:
        print(tasks_table())
        print("\nuio-eval task=<name> [describe=true] | task=grit (GRIT's seven tasks) | task=all (every task + the "
              "baseline table); ckpt=<dir|.ckpt> shards=<shard root> (default: the toy world's val split). "
              "See conf/eval.yaml.")
        return None
    if cfg.describe:
        if not isinstance(cfg.task, str) or cfg.task in ("all", "grit"):
            raise EvalConfigError(f"describe=true needs one task name, got task={cfg.task}")
        print(describe(cfg.task))
        return None
    import torch

    from uio.baselines import fit_baseline
    from uio.evaluation import (evaluate_task, format_grit, format_table, grit_table, load_examples, load_model,
                                primary_rows, save_predictions, to_jsonable)

    tasks, mode = resolve_tasks(cfg)
    device = _device(str(cfg.device))
    dtype = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
    toyworld = OmegaConf.to_container(cfg.toyworld, resolve=True) if cfg.get("toyworld") else None
    data = OmegaConf.to_container(cfg.shards, resolve=True) if OmegaConf.is_config(cfg.shards) else cfg.shards
    model = load_model(str(cfg.ckpt), device=device, dtype=dtype, text_tokenizer=cfg.text_tokenizer)
    _say(f"model {cfg.ckpt} ({model.config.name}, {model.num_parameters() / 1e6:.1f}M parameters) on {device}")
    generation = OmegaConf.to_container(cfg.generation, resolve=True) if cfg.get("generation") else {}
    out_dir = Path(str(cfg.output_dir))
    results, skipped = [], {}
    t0 = time.time()
    for name in tasks:
        try:
            examples = load_examples(data, name, str(cfg.split), cfg.max_examples, toyworld)
        except (FileNotFoundError, KeyError, ValueError) as e:
            if mode == "tasks":
                raise
            skipped[name] = f"no {cfg.split} data: {e}"
            _say(f"{name}: skipped ({skipped[name]})")
            continue
        if not examples:
            skipped[name] = f"the {cfg.split} split is empty"
            _say(f"{name}: skipped ({skipped[name]})")
            continue
        baseline = None
        if cfg.baselines:
            try:
                train = load_examples(data, name, str(cfg.train_split), cfg.baseline_train_examples, toyworld)
                baseline = fit_baseline(name, train) if train else None
            except (FileNotFoundError, KeyError, ValueError) as e:
                _say(f"{name}: no baseline ({e})")
        r = evaluate_task(model, name, examples, batch_size=cfg.batch_size, generation=generation, seed=cfg.seed,
                          baseline=baseline, keep_predictions=bool(cfg.save_predictions),
                          ceiling=bool(cfg.tokenizer_ceiling), measure_image_use=bool(cfg.image_use))
        results.append(r)
        summary = ", ".join(f"{x['metric']} {x['model']:.3f}" + (f" (baseline {x['baseline']:.3f})"
                                                                  if x["baseline_rule"] else "")
                            + (f" (tokenizer ceiling {x['tokenizer_ceiling']:.3f})"
                               if math.isfinite(x["tokenizer_ceiling"]) else "")
                            + (f" (image use {x['image_use']:.3f} nats/token)" if math.isfinite(x["image_use"]) else "")
                            for x in primary_rows([r]))
        _say(f"{name}: {r.num_examples} examples in {r.seconds:.1f}s: {summary}")
        if cfg.save_predictions:
            where = save_predictions(out_dir / "predictions", r, cfg.num_html_examples)
            _say(f"{name}: predictions in {where} (index.html)")
            r.predictions = []
    rows = primary_rows(results)
    argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name.startswith("uio-eval") else None
    report: dict[str, Any] = {
        "ckpt": str(cfg.ckpt), "data": "toy world" if data is None else data, "split": str(cfg.split),
        "max_examples": cfg.max_examples, "seed": cfg.seed, "device": str(device), "dtype": cfg.dtype,
        "generation": generation, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - t0, 1), "command": None if argv is None else " ".join(["uio-eval", *argv]),
        "tasks": {r.task: r.to_dict() for r in results}, "skipped": skipped, "table": rows,
    }
    text = format_table(rows)
    grit = grit_table(results)
    if grit is not None and mode in ("grit", "all"):
        gb = grit_table(results, baseline=True) if cfg.baselines else None
        report["grit"] = {"model": grit, "baseline": gb}
        text += "\n\nGRIT (x100; overall = mean of the seven, a missing task counts 0)\n\n" + format_grit(grit, gb)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    (out_dir / "report.md").write_text(text + "\n")
    print("\n" + text + "\n", flush=True)
    _say(f"report: {out_dir / 'report.json'} and {out_dir / 'report.md'}")
    return report


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="eval")
def _app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (EvalConfigError, FileNotFoundError) as e:
        print(f"uio-eval: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
