"""What ``uio-train`` runs: artefacts, data, model, trainer, fit, export, summary.

``run(cfg)`` takes the composed Hydra config (``conf/train.yaml`` + an experiment):

1. checks every key (:func:`uio.training.config.check_config`);
2. makes sure the artefacts exist, building the embedded default's when missing (under a file lock,
   so ranks and concurrent jobs never build twice): the toy world's shards, its SentencePiece
   model, and the toy VQ-GAN (trained by the recipe named in ``artefacts.image_tokenizer_recipe``);
3. builds the :class:`~uio.data.datamodule.UIODataModule`, the :class:`UIOLitModule` and the
   ``lightning.Trainer`` (strategy from :mod:`uio.training.strategies`, atomic checkpoint IO);
4. fits (``resume=...`` continues a run exactly: optimizer, schedule, step, data position);
5. exports the model with ``uio.Model.save_pretrained`` and writes ``summary.json`` with the
   first/last training losses of every task group.
"""
from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from uio.training.config import ConfigError, check_config, to_dict, trainer_kwargs

__all__ = ["run", "build_components", "prepare_artefacts", "model_config_from", "resolve_resume"]


# ---- artefacts ------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """An exclusive lock ``$UIO_HOME/locks/<name>.lock`` (held across processes and ranks)."""
    from uio.paths import uio_home

    d = uio_home() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(msg: str) -> None:
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        print(f"[uio-train] {msg}", flush=True)


def prepare_text_tokenizer(cfg: DictConfig):
    """The ``TextTokenizer`` named by ``text_tokenizer.path`` ("toy": built if missing)."""
    from uio.text_tokenizer import TextTokenizer

    tcfg = cfg.text_tokenizer
    path = tcfg.path
    if path is None:
        raise ConfigError("text_tokenizer.path is required: a SentencePiece model (T5's spiece.model for the "
                          "released vocabulary) or 'toy'")
    if str(path) == "toy":
        from uio.data.text_corpus import ensure_toy_text_tokenizer, toy_tokenizer_dir

        with file_lock("toy_text_tokenizer"):
            if not (toy_tokenizer_dir() / "spiece.model").is_file():
                _log(f"training the toy text tokenizer ({tcfg.train_vocab_size} pieces) -> {toy_tokenizer_dir()}")
            tok = ensure_toy_text_tokenizer(vocab_size=int(tcfg.train_vocab_size))
    else:
        p = Path(str(path)).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"text_tokenizer.path={str(p)!r} does not exist; expected a SentencePiece .model "
                                    "file or a directory with spiece.model")
        tok = TextTokenizer.from_dir(p) if p.is_dir() else TextTokenizer(p)
    want = tcfg.vocab_size
    if want is not None and int(want) != tok.vocab.text_vocab:
        raise ConfigError(f"text_tokenizer.vocab_size={want} but {tok.model_file} has {tok.vocab.text_vocab} pieces")
    return tok


def prepare_image_tokenizer(cfg: DictConfig) -> dict[str, Any] | None:
    """The image-tokenizer spec (``tokenizer`` group), its weights trained first if missing and a
    recipe is configured (``artefacts.image_tokenizer_recipe``)."""
    if cfg.get("tokenizer") is None:
        return None
    spec = dict(to_dict(cfg.tokenizer))
    weights = spec.get("weights")
    if weights is None:
        return spec
    from uio.paths import uio_home

    path = Path(str(weights)).expanduser()
    path = path if path.is_absolute() else uio_home() / path
    recipe = cfg.artefacts.get("image_tokenizer_recipe")
    with file_lock("image_tokenizer"):
        if not path.exists():
            if recipe is None:
                raise FileNotFoundError(f"image tokenizer weights {path} not found and artefacts.image_tokenizer_recipe "
                                        "is null; train them with `uio-train +experiment=vqgan_toyworld`")
            _train_image_tokenizer(cfg, recipe, path)
    spec["weights"] = str(path)
    return spec


def _train_image_tokenizer(cfg: DictConfig, recipe: str, path: Path) -> None:
    """Train the image tokenizer with the ``vqgan`` node of ``conf/experiment/<recipe>.yaml``."""
    from uio.cli import conf_dir
    from uio.image_tokenizer.training import VQGANTrainConfig, train_vqgan

    f = Path(conf_dir()) / "experiment" / f"{recipe}.yaml"
    if not f.is_file():
        raise FileNotFoundError(f"artefacts.image_tokenizer_recipe={recipe!r}: {f} not found")
    node = OmegaConf.load(f).get("vqgan")
    if node is None:
        raise ConfigError(f"{f} has no 'vqgan' node to train an image tokenizer with")
    # resolve the recipe's interpolations (${tokenizer.config}, ${seed}, ...) against this run's config
    ctx = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(ctx, False)
    ctx["_image_tokenizer_recipe"] = node
    d = to_dict(ctx["_image_tokenizer_recipe"])
    d.update(to_dict(cfg.artefacts.get("image_tokenizer_overrides") or {}))
    d["output_dir"] = str(path)
    _log(f"image tokenizer {path} missing: training it with experiment/{recipe}.yaml "
         f"({', '.join(f'{k}={v}' for k, v in sorted(to_dict(cfg.artefacts.image_tokenizer_overrides or {}).items()))})")
    t0 = time.time()
    metrics = train_vqgan(VQGANTrainConfig.from_dict(d))
    _log(f"image tokenizer trained in {time.time() - t0:.0f}s: PSNR {metrics.get('psnr')} dB, "
         f"codebook usage {metrics.get('codebook_usage')}")


def prepare_data_root(cfg: DictConfig) -> None:
    """Build the toy world's shards when the data config asks for them and they are missing."""
    tw = cfg.data.get("toyworld")
    if tw is None or cfg.data.get("roots") is not None:
        return
    from uio.data.toyworld import ensure_toyworld, read_info
    from uio.paths import toyworld_dir

    kw = to_dict(tw)
    with file_lock("toyworld"):
        if read_info() is None:
            _log(f"building the toy world -> {toyworld_dir()} ({kw})")
        t0 = time.time()
        ensure_toyworld(**kw)
        if time.time() - t0 > 1:
            _log(f"toy world ready in {time.time() - t0:.0f}s")


def prepare_artefacts(cfg: DictConfig):
    """(text tokenizer, image-tokenizer spec), building the embedded default's pieces if missing."""
    text_tok = prepare_text_tokenizer(cfg)
    image_spec = prepare_image_tokenizer(cfg)
    prepare_data_root(cfg)
    return text_tok, image_spec


# ---- the model config -----------------------------------------------------------------------------
def model_config_from(cfg: DictConfig, text_vocab: int, image_spec: Mapping[str, Any] | None):
    """``ModelConfig`` from ``cfg.model`` with the vocabulary / target geometry of the tokenizers."""
    from uio.config import ModelConfig

    d = dict(to_dict(cfg.model))
    derived: dict[str, Any] = {"text_vocab": int(text_vocab)}
    if image_spec is not None:
        for key, field in (("num_codes", "image_vocab"), ("grid", "image_target_grid"),
                           ("image_size", "image_target_size")):
            if key not in image_spec:
                raise ConfigError(f"the image tokenizer spec (tokenizer group) must declare '{key}' so the model's "
                                  f"{field} can be set; got keys {sorted(image_spec)}")
            derived[field] = image_spec[key]
    for k, v in derived.items():
        if k in d and d[k] is not None and _norm(d[k]) != _norm(v):
            raise ConfigError(f"model.{k}={d[k]} disagrees with the tokenizers ({v}); leave it unset")
        d[k] = v
    return ModelConfig.from_dict(d)


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


# ---- data, module, trainer ------------------------------------------------------------------------
DATA_KEYS = {"roots", "val_roots", "train_split", "val_split", "batch_size", "val_batch_size",
             "val_examples_per_task", "num_workers", "shuffle_buffer", "pin_memory", "max_input_len",
             "max_target_len"}
MIXTURE_KEYS = {"tasks", "val_tasks", "temperature", "group_rates"}


def build_datamodule(cfg: DictConfig, model_config, text_tok):
    from uio.data.datamodule import UIODataModule
    from uio.processing import Processor

    data = dict(to_dict(cfg.data))
    data.pop("toyworld", None)
    data.pop("global_batch_size", None)
    mix = dict(to_dict(cfg.mixture))
    for section, d, allowed in (("data", data, DATA_KEYS), ("mixture", mix, MIXTURE_KEYS)):
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ConfigError(f"unknown config key(s) {[f'{section}.{k}' for k in unknown]}; allowed: "
                              f"{sorted(allowed | ({'toyworld', 'global_batch_size'} if section == 'data' else set()))}")
    processor = Processor.from_config(model_config, text_tok)
    return UIODataModule(processor, seed=int(cfg.seed), **data, **mix)


def build_module(cfg: DictConfig, model_config, image_spec, text_tok):
    from uio.training.module import UIOLitModule

    model = model_config.to_dict()
    model.pop("image_tokenizer", None)
    tok_dir = Path(text_tok.model_file).parent
    return UIOLitModule(model=model, image_tokenizer=image_spec, text_tokenizer=str(tok_dir),
                        optim=to_dict(cfg.optim), train=_train_opts(cfg), val=to_dict(cfg.val),
                        init_from=cfg.get("init_from"), seed=int(cfg.seed), max_steps=int(cfg.trainer.max_steps))


def _train_opts(cfg: DictConfig) -> dict[str, Any]:
    t = dict(to_dict(cfg.train))
    for k in ("export", "export_dir"):
        t.pop(k, None)
    return t


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None, max_seconds: float | None = None):
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from uio.training.checkpointing import AtomicCheckpointIO
    from uio.training.strategies import build_strategy

    kw = trainer_kwargs(cfg.trainer)
    kw["strategy"] = build_strategy(kw.get("strategy"), accelerator=str(kw.get("accelerator")),
                                    activation_checkpointing=bool(cfg.train.activation_checkpointing))
    if kw.get("val_check_interval") is None:
        kw["limit_val_batches"] = 0
    if max_seconds is not None:  # the job's time budget caps training (whichever limit comes first)
        import datetime

        cap = datetime.timedelta(seconds=max(1.0, max_seconds))
        if kw.get("max_time") is not None:
            from lightning.pytorch.callbacks import Timer

            given = datetime.timedelta(seconds=Timer(duration=kw["max_time"])._duration)  # Lightning's parsing
            cap = min(cap, given)
        kw["max_time"] = cap
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if kw.get("enable_progress_bar") is False:  # `trainer.enable_progress_bar=false` wins over the callback
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = pl.Trainer(**kw, callbacks=callbacks + list(extra_callbacks or []), logger=loggers or False,
                         plugins=[AtomicCheckpointIO()])
    gbs = cfg.data.get("global_batch_size")
    if gbs:
        per_step = int(cfg.data.batch_size) * trainer.world_size
        if int(gbs) % per_step:
            raise ConfigError(f"data.global_batch_size={gbs} is not a multiple of data.batch_size x world size "
                              f"= {cfg.data.batch_size} x {trainer.world_size}")
        trainer.accumulate_grad_batches = int(gbs) // per_step
    return trainer


def build_components(cfg: DictConfig, artefacts: tuple[Any, Any] | None = None):
    """(datamodule, module, model_config) for a checked config; artefacts built if missing
    (``artefacts``: what :func:`prepare_artefacts` returned, when the caller already ran it)."""
    text_tok, image_spec = artefacts if artefacts is not None else prepare_artefacts(cfg)
    model_config = model_config_from(cfg, text_tok.vocab.text_vocab, image_spec)
    dm = build_datamodule(cfg, model_config, text_tok)
    module = build_module(cfg, model_config, image_spec, text_tok)
    return dm, module, model_config


def _even_validation(trainer, dm) -> None:
    """FSDP1 gathers each block in every forward: all ranks must run the same number of
    validation forwards, so each rank gets the same number of examples per task."""
    from uio.training.strategies import is_fsdp1

    w = trainer.world_size
    if is_fsdp1(trainer.strategy) and w > 1 and dm.val_examples_per_task % w:
        n = max(w, dm.val_examples_per_task - dm.val_examples_per_task % w)
        _log(f"FSDP: data.val_examples_per_task {dm.val_examples_per_task} -> {n} (a multiple of the {w} ranks)")
        dm.val_examples_per_task = n


def resolve_resume(cfg: DictConfig) -> str | None:
    """``resume``: None, a path, or "last" (``<run_dir>/checkpoints/last.ckpt`` when it exists)."""
    r = cfg.get("resume")
    if r is None:
        return None
    if str(r) == "last":
        p = Path(str(cfg.paths.run_dir)) / "checkpoints" / "last.ckpt"
        if p.exists():
            return str(p)
        _log(f"resume=last: no {p} yet, starting from scratch")
        return None
    p = Path(str(r)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"resume={str(p)!r}: no such checkpoint (a .ckpt file or a sharded checkpoint dir)")
    return str(p)


# ---- export and summary ----------------------------------------------------------------------------
def export_model(trainer, module, directory: str | Path) -> Path | None:
    """``uio.Model.save_pretrained(directory)`` from rank 0 (sharded weights are gathered first)."""
    from uio.training.strategies import is_fsdp1, is_fsdp2

    directory = Path(directory).resolve()
    sharded = is_fsdp2(trainer.strategy) or is_fsdp1(trainer.strategy)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not trainer.is_global_zero:
            return None
        from uio.model import Model

        m = module.model
        fresh = Model(m.config, image_tokenizer=None if m.image_tokenizer is None else _clone_tok(m.image_tokenizer),
                      text_tokenizer=m.text_tokenizer, init=False)
        fresh.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
        fresh.save_pretrained(directory)
        return directory
    if not trainer.is_global_zero:
        return None
    module.model.save_pretrained(directory)
    return directory


def _clone_tok(tok):
    import copy

    return copy.deepcopy(tok).cpu()


def summarize(module, trainer, run_dir: Path, export_dir: Path | None, seconds: float) -> dict[str, Any]:
    """First vs last training loss per task group (means over the first/last 10% of steps)."""
    out: dict[str, Any] = {"steps": int(trainer.global_step), "max_steps": int(trainer.max_steps),
                           "world_size": int(trainer.world_size),
                           "seconds": round(seconds, 1),
                           "checkpoint_dir": None, "export_dir": str(export_dir) if export_dir else None,
                           "groups": {}, "val": {}}
    for k, v in sorted(trainer.callback_metrics.items()):  # the last validation's losses and task metrics
        if k.startswith("val/") and isinstance(v, torch.Tensor) and v.numel() == 1 and math.isfinite(float(v)):
            out["val"][k] = round(float(v), 4)
    ck = getattr(trainer, "checkpoint_callback", None)
    if ck is not None and getattr(ck, "dirpath", None):
        out["checkpoint_dir"] = str(ck.dirpath)
        out["last_checkpoint"] = ck.last_model_path or None
    for name, hist in sorted(module.loss_history.items()):
        if len(hist) < 2:
            continue
        k = max(1, len(hist) // 10)
        first = sum(v for _, v in hist[:k]) / k
        last = sum(v for _, v in hist[-k:]) / k
        out["groups"][name] = {"first": round(first, 4), "last": round(last, 4), "points": len(hist),
                               "fell": bool(last < first)}
    return out


def _print_summary(s: Mapping[str, Any]) -> None:
    lines = [f"trained {s['steps']} steps in {s['seconds']:.0f}s"
             + (" (stopped by trainer.max_time)" if 0 < s["steps"] < s["max_steps"] else "")]
    lines.append(f"{'loss':<26}{'first 10%':>10}{'last 10%':>10}")
    for g, r in s["groups"].items():
        lines.append(f"{g:<26}{r['first']:>10.3f}{r['last']:>10.3f}{'' if r['fell'] else '   (did not fall)'}")
    if s.get("last_checkpoint"):
        lines.append(f"checkpoint: {s['last_checkpoint']}")
    if s.get("export_dir"):
        lines.append(f"exported model (uio.Model.from_pretrained): {s['export_dir']}")
    print("[uio-train] " + "\n[uio-train] ".join(lines), flush=True)


# ---- entry ------------------------------------------------------------------------------------------
def run(cfg: DictConfig, callbacks: list | None = None, start_time: float | None = None) -> dict[str, Any]:
    """Train according to a composed config; returns the summary (rank 0) or {}.

    ``callbacks``: extra Lightning callbacks (objects) besides the configured ones. ``start_time``:
    when the job started (``time.time()``; default now), for ``train.time_budget``."""
    if cfg.get("job", "multitask") == "vqgan":
        from uio.image_tokenizer.training import run as run_vqgan

        return run_vqgan(cfg)
    check_config(cfg)
    import warnings

    import lightning.pytorch as pl

    # the frozen image tokenizer is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    t0 = start_time if start_time is not None else time.time()
    t_art = time.time()
    artefacts = prepare_artefacts(cfg)
    art_seconds = time.time() - t_art
    if art_seconds > 30:
        _log(f"artefacts built in {art_seconds / 60:.1f} min (once: they are cached under $UIO_HOME)")
    dm, module, _ = build_components(cfg, artefacts)
    max_seconds = None
    budget = cfg.train.get("time_budget")
    if budget:  # minutes for the job less the one-off artefact building, minus the final validation/export
        spent = time.time() - t0 - art_seconds
        max_seconds = float(budget) * 60 - spent - float(cfg.train.get("time_reserve") or 0) * 60
        _log(f"time budget {budget} min: at most {max_seconds / 60:.1f} min of training")
    trainer = build_trainer(cfg, callbacks, max_seconds)
    _even_validation(trainer, dm)
    ckpt = resolve_resume(cfg)
    if ckpt:
        _log(f"resuming from {ckpt}")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    export_dir = None
    if cfg.train.export and not trainer.interrupted:
        export_dir = export_model(trainer, module, cfg.train.export_dir)
    summary: dict[str, Any] = {}
    if trainer.is_global_zero:
        run_dir = Path(str(cfg.paths.run_dir))
        summary = summarize(module, trainer, run_dir, export_dir, time.time() - t0)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary)
    finish_distributed(trainer)
    return summary


def finish_distributed(trainer) -> None:
    """End a multi-process run cleanly (see docs: gloo threads can abort at interpreter exit).

    Every rank destroys the process group; rank 0 waits for the ranks it launched and fails if one
    failed. FSDP2 ranks then leave with ``os._exit`` after flushing, which avoids the abort.
    """
    import torch.distributed as dist

    if trainer.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return
    from uio.training.strategies import is_fsdp2

    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    launcher = getattr(trainer.strategy, "launcher", None)
    failed = []
    for p in getattr(launcher, "procs", []) or []:
        rc = p.wait()
        if rc != 0:
            failed.append(rc)
    sys.stdout.flush()
    sys.stderr.flush()
    if failed:
        raise RuntimeError(f"{len(failed)} training process(es) failed with exit codes {failed}")
    if is_fsdp2(trainer.strategy):
        os._exit(0)
