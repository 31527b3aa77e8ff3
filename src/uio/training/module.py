"""The LightningModule that trains :class:`uio.Model`.

Training step: the model's cross-entropy over the decoder targets (text slots and image slots,
each restricted to its modality's logits), with the input image's visible patches randomly
subsampled (UIO §A.2: 128 of 576 in pre-training, 256 in multi-task training). Logged every step:
``train/loss``, ``train/loss/<task group>``, ``train/tokens_per_s`` and the learning rate.

Validation: the loss, and per task the task's own inference — generation with its generation
config (or candidate scoring for classification tasks), decoding, and its metrics — logged as
``val/<task>/<metric>``.

Hyperparameters are plain dicts (the ModelConfig, the image-tokenizer spec, the text-tokenizer
directory, the optimiser / training / validation sections), so a checkpoint rebuilds the module
without Hydra or pickled objects.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from uio.training.optim import build_optimizer, build_scheduler

__all__ = ["UIOLitModule", "select_rows", "count_tokens", "training_loss"]

LOSS_NORMALIZATIONS = ("tokens", "rows", "sqrt")


def training_loss(out, normalization: str = "tokens") -> torch.Tensor:
    """The loss a step minimises, from a :class:`uio.model.ModelOutput`.

    ``tokens``: the mean negative log-likelihood over all target tokens of the batch, so a row with a
    64-code image target weighs 64 times a row with a one-token answer. ``rows``: the mean over rows of
    each row's mean, so every example weighs the same whatever its length. ``sqrt``: in between, each
    row's mean weighted by the square root of its token count (the 64-code row weighs 8 times)."""
    if normalization == "tokens":
        return out.loss
    if normalization == "rows":
        return out.per_example_loss.mean()
    if normalization == "sqrt":
        w = out.per_example_tokens.float().sqrt()
        return (out.per_example_loss * w).sum() / w.sum().clamp(min=1e-6)
    raise ValueError(f"loss normalization must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}")


def select_rows(batch: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The sub-batch of ``rows`` (tensors and per-row lists indexed along dim 0)."""
    idx = list(rows)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[torch.as_tensor(idx, dtype=torch.long, device=v.device)]
        elif isinstance(v, (list, tuple)):
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out


def count_tokens(batch: Mapping[str, Any], num_patches: int | None) -> int:
    """Tokens the network processes for a batch: encoder text + visible patches + decoder targets."""
    n = int((batch["text_inputs"] != 0).sum()) + int((batch["text_targets"] != 0).sum())
    masks = batch.get("image_input_masks")
    if masks is not None:
        visible = masks.sum(dim=1)
        if num_patches is not None:
            visible = visible.clamp(max=num_patches)
        n += int(visible.sum())
    tmasks = batch.get("image_target_masks")
    if tmasks is not None:
        n += int(tmasks.sum())
    return n


def _step_seed(seed: int, step: int, rank: int) -> int:
    """A seed that depends only on (run seed, global step, rank): patch subsampling is then the
    same whether or not the run was interrupted and resumed."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class UIOLitModule(pl.LightningModule):
    """Train :class:`uio.Model` with the paper's recipe.

    Args:
        model: ``ModelConfig.to_dict()``.
        image_tokenizer: the image-tokenizer spec for ``uio.image_tokenizer.build_image_tokenizer``
            (None: the model takes pre-tokenised ``image_target_codes`` only).
        text_tokenizer: directory (or ``.model`` file) of the SentencePiece tokenizer (needed for
            validation decoding and for the exported model); None to train without one.
        optim: the ``optim`` config section (see ``conf/optim/*.yaml``).
        train: the ``train`` section: ``num_patches``, ``activation_checkpointing``, ``compile``,
            ``log_group_losses``, ``step_seed``, ``group_rows``, ``loss_normalization``,
            ``loc_label_sigma`` (training only: validation losses stay the plain cross-entropy).
        val: the ``val`` section: ``enabled``, ``tasks``, ``max_text_len``, ``num_beams``, ``image_output``.
        init_from: a ``uio.Model.save_pretrained`` directory whose weights initialise the network.
        seed: run seed (patch subsampling is seeded by (seed, step, rank)).
    """

    def __init__(self, model: dict[str, Any], image_tokenizer: dict[str, Any] | None = None,
                 text_tokenizer: str | None = None, optim: dict[str, Any] | None = None,
                 train: dict[str, Any] | None = None, val: dict[str, Any] | None = None,
                 init_from: str | None = None, seed: int = 0, max_steps: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.optim_cfg = dict(optim or {"name": "adafactor", "lr": 1e-2})
        self.train_cfg = {"num_patches": None, "activation_checkpointing": False, "compile": False,
                          "log_group_losses": True, "step_seed": True, "group_rows": True,
                          "loss_normalization": "tokens", "loc_label_sigma": 0.0, **(train or {})}
        if self.train_cfg["loss_normalization"] not in LOSS_NORMALIZATIONS:
            raise ValueError(f"train.loss_normalization must be one of {LOSS_NORMALIZATIONS}, "
                             f"got {self.train_cfg['loss_normalization']!r}")
        from uio.model import check_loc_sigma

        self.train_cfg["loc_label_sigma"] = check_loc_sigma(self.train_cfg["loc_label_sigma"])
        self.val_cfg = {"enabled": True, "max_text_len": None, "num_beams": None,
                        "image_output": True, **(val or {})}
        self.model = self._build_model(model, image_tokenizer, text_tokenizer, init_from)
        self._configured = False
        self._last_time: float | None = None
        self._val_metrics: dict[str, dict[str, Any]] = {}
        self._processor = None
        self._val_loss: dict[str, tuple[float, int]] = {}
        self._fsdp1 = False
        self.loss_history: dict[str, list[tuple[int, float]]] = {}
        self._group_acc: dict[str, tuple[float, int]] = {}  # group -> (loss sum, rows) since the last log

    # ---- construction ----------------------------------------------------------------------------
    @staticmethod
    def _build_model(model_cfg: dict[str, Any], image_tokenizer: dict[str, Any] | None,
                     text_tokenizer: str | None, init_from: str | None):
        from uio.config import ModelConfig
        from uio.model import Model

        config = ModelConfig.from_dict({**model_cfg, "image_tokenizer": image_tokenizer})
        tok = None
        if text_tokenizer is not None:
            from pathlib import Path

            from uio.text_tokenizer import TextTokenizer

            p = Path(text_tokenizer)
            tok = TextTokenizer.from_dir(p) if p.is_dir() else TextTokenizer(p, image_vocab=config.image_vocab)
            if tok.vocab.text_vocab != config.text_vocab:
                raise ValueError(f"the text tokenizer {text_tokenizer} has {tok.vocab.text_vocab} pieces but "
                                 f"model.text_vocab is {config.text_vocab}")
        img_tok = None
        if image_tokenizer is not None:
            from uio.image_tokenizer import build_image_tokenizer

            img_tok = build_image_tokenizer(dict(image_tokenizer))
        m = Model(config, image_tokenizer=img_tok, text_tokenizer=tok)  # initialised (T5X init) unless on meta
        if init_from is not None:
            src = Model.from_pretrained(init_from)
            missing, unexpected = m.load_state_dict(src.state_dict(), strict=False)
            if unexpected or [k for k in missing if not k.startswith("image_tokenizer.")]:
                raise ValueError(f"init_from={init_from}: weights do not fit this model "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return m

    def configure_model(self) -> None:
        """Activation checkpointing, FSDP2 sharding and ``torch.compile``, applied once."""
        if self._configured:
            return
        self._configured = True
        from uio.training.strategies import (apply_activation_checkpointing, apply_fsdp2, is_fsdp1, is_fsdp2,
                                             transformer_blocks)

        net = self.model.network
        strategy = self._trainer.strategy if self._trainer is not None else None
        fsdp1 = is_fsdp1(strategy)  # wraps and checkpoints the blocks itself (see build_strategy)
        if self.train_cfg["activation_checkpointing"] and not fsdp1:
            apply_activation_checkpointing(net)
        if self.train_cfg["compile"]:
            for block in transformer_blocks(net):
                block.compile()
        if strategy is not None and is_fsdp2(strategy):
            skip = [self.model.image_tokenizer] if self.model.image_tokenizer is not None else []
            apply_fsdp2(self.model, self.device_mesh["data_parallel"], skip=skip,
                        **dict(getattr(strategy, "fsdp_kwargs", {})))

    def configure_optimizers(self):
        o = self.optim_cfg
        opt = build_optimizer(self.model, o.get("name", "adafactor"), lr=float(o.get("lr", 1e-2)),
                              weight_decay=float(o.get("weight_decay", 0.0)),
                              betas=tuple(o.get("betas", (0.9, 0.999))), eps=float(o.get("eps", 1e-8)),
                              adafactor=o.get("adafactor") or None)
        total = self.hparams.max_steps if self.hparams.max_steps and self.hparams.max_steps > 0 else None
        sched = build_scheduler(opt, o.get("schedule", "rsqrt"), constant_steps=int(o.get("constant_steps", 10_000)),
                                warmup_steps=int(o.get("warmup_steps", 0)), total_steps=total,
                                min_ratio=float(o.get("min_ratio", 0.0)), time_progress=self._time_progress,
                                decay_fraction=float(o.get("decay_fraction", 0.2)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Global-norm clipping (``trainer.gradient_clip_val``) under every strategy.

        Lightning's FSDP1 precision plugin refuses ``gradient_clip_algorithm='norm'`` (seen on an
        H100: "not supported for FSDPPrecision"; Lightning issue #19235): each rank holds a shard of
        the gradients, so the norm must come from the root FSDP module, which reduces it across ranks."""
        from uio.training.strategies import is_fsdp1

        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and is_fsdp1(self.trainer.strategy):
            self.trainer.model.clip_grad_norm_(float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _time_progress(self) -> float:
        """Fraction of the trainer's time limit (``trainer.max_time``, which ``train.time_budget``
        sets) spent training so far; 0 without one. Lightning's Timer keeps its elapsed time in
        checkpoints, so a resumed run continues the same schedule."""
        from lightning.pytorch.callbacks import Timer

        trainer = self._trainer
        timer = next((c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, Timer)), None)
        if timer is None or not timer._duration:
            return 0.0
        return min(1.0, timer.time_elapsed("train") / timer._duration)

    # ---- training --------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any], num_patches: int | None = None):
        return self.model(batch, num_patches=num_patches)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        n = self.train_cfg["num_patches"]
        gen = None
        if self.train_cfg["step_seed"]:  # same subsampling with or without an interruption
            gen = torch.Generator().manual_seed(_step_seed(self.hparams.seed, self.global_step, self.global_rank))
        # Grouping runs in one process only: under DDP / FSDP a rank whose batch has, e.g., no input
        # image would skip the patch projection while another rank uses it, and the gradient
        # all-reduce then waits for a bucket that never fills (measured: the DDP test hung).
        group = bool(self.train_cfg["group_rows"]) and self.trainer.world_size == 1
        out = self.model(self.model.tokenize_image_targets(batch), num_patches=n, generator=gen, group_rows=group,
                         loc_sigma=self.train_cfg["loc_label_sigma"])
        bsz = len(batch["tasks"])
        out.loss = training_loss(out, self.train_cfg["loss_normalization"])
        loss = out.loss.detach().float()
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=bsz)
        self._record("all", float(loss))
        if self.train_cfg["log_group_losses"]:
            self._log_group_losses(batch["tasks"], out.per_example_loss)
        self._tokens = count_tokens(batch, n) * self.trainer.world_size
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # As in the original JAX training, a parameter that took no part in this step (e.g. the
        # decoder's image positions for a text-only batch, or the release's dead cross-attention
        # position projections) gets a zero gradient rather than none: its optimizer state exists
        # from the first step (every checkpoint holds the full state; sharded resume needs it) and
        # its momentum keeps acting.
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)

    def _record(self, name: str, value: float) -> None:
        """Keep (step, loss) on rank 0 for the end-of-run summary (first vs last losses)."""
        if self.global_rank == 0:
            self.loss_history.setdefault(name, []).append((int(self.global_step), value))

    def _log_group_losses(self, tasks: Sequence[str], per_example: torch.Tensor) -> None:
        """``train/loss/<group>``: the mean per-example loss of each task group over the rows of
        every rank since the last logging step (groups absent from that window are not logged;
        Lightning's ``self.log`` would repeat their stale values)."""
        from uio.tasks.base import GROUPS

        for group, value, count in self._group_losses(tasks, per_example):
            s, n = self._group_acc.get(group, (0.0, 0))
            self._group_acc[group] = (s + float(value) * count, n + count)
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        if (self.global_step + 1) % every:
            return
        acc = self._group_acc
        if self.trainer.world_size > 1:
            t = torch.tensor([[acc.get(g, (0.0, 0))[0], acc.get(g, (0.0, 0))[1]] for g in GROUPS],
                             dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            acc = {g: (float(t[i, 0]), int(t[i, 1])) for i, g in enumerate(GROUPS) if t[i, 1] > 0}
        self._group_acc = {}
        means = {g: s / n for g, (s, n) in sorted(acc.items()) if n}
        for g, v in means.items():
            self._record(g, v)
        if self.global_rank == 0 and means:
            for lg in self.loggers:
                lg.log_metrics({f"train/loss/{g}": v for g, v in means.items()}, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["uio_training"] = {"loss_history": self.loss_history, "group_acc": self._group_acc}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("uio_training") or {}
        self.loss_history = {k: [tuple(x) for x in v] for k, v in state.get("loss_history", {}).items()}
        self._group_acc = dict(state.get("group_acc", {}))

    @staticmethod
    def _group_losses(tasks: Sequence[str], per_example: torch.Tensor):
        """Mean per-example loss of each task group in the batch: (group, mean, count)."""
        from uio.tasks import get_task

        rows: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(tasks):
            rows[get_task(t).group].append(i)
        pel = per_example.detach().float()
        for group in sorted(rows):
            idx = rows[group]
            yield group, pel[idx].mean(), len(idx)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_time is not None and getattr(self, "_tokens", None):
            dt = now - self._last_time
            if dt > 0:
                self.log("train/tokens_per_s", self._tokens / dt, on_step=True, prog_bar=True)
                self.log("train/examples_per_s", len(batch["tasks"]) * self.trainer.world_size / dt, on_step=True)
        self._last_time = now

    # ---- validation ------------------------------------------------------------------------------
    @property
    def processor(self):
        if self._processor is None:
            from uio.processing import Processor

            tok = getattr(self.model, "text_tokenizer", None)
            if tok is None:
                raise RuntimeError("validation with decoding needs a text tokenizer (model built without one)")
            self._processor = Processor.from_config(self.model.config, tok)
        return self._processor

    def on_validation_epoch_start(self) -> None:
        from uio.training.strategies import fsdp2_gathered, is_fsdp1, is_fsdp2

        if is_fsdp2(self.trainer.strategy):  # full weights for validation: no collectives per forward
            self._gathered = fsdp2_gathered(self.model)
            self._gathered.__enter__()
        # FSDP1 gathers each block per forward, and generation lengths differ between ranks:
        # validation is the teacher-forced loss only (use trainer=fsdp2 for the task metrics)
        self._fsdp1 = is_fsdp1(self.trainer.strategy)
        if self._fsdp1 and self.val_cfg["enabled"] and not getattr(self, "_warned_fsdp1", False):
            self._warned_fsdp1 = True
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("trainer=fsdp (FSDP1): validation logs the losses only; trainer=fsdp2 also "
                           "generates and computes the task metrics")
        self._val_metrics = {}
        self._val_loss: dict[str, tuple[float, int]] = {}  # task -> (sum of per-example losses, count)

    def _metrics_for(self, name: str) -> dict[str, Any]:
        if name not in self._val_metrics:
            from uio.tasks import get_task

            self._val_metrics[name] = get_task(name).build_metrics()
        return self._val_metrics[name]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.model(self.model.tokenize_image_targets(batch))
        pel = out.per_example_loss.detach().float()
        rows: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(batch["tasks"]):
            rows[t].append(i)
        for name, idx in sorted(rows.items()):
            s, n = self._val_loss.get(name, (0.0, 0))
            self._val_loss[name] = (s + float(pel[idx].sum()), n + len(idx))
            if self.val_cfg["enabled"] and not self._fsdp1:
                self._evaluate_task(name, select_rows(batch, idx))

    @torch.no_grad()
    def _evaluate_task(self, name: str, batch: Mapping[str, Any]) -> None:
        """The task's inference on a sub-batch of its rows: predict, decode, update its metrics."""
        from uio.tasks import get_task

        task = get_task(name)
        proc = self.processor
        metas = list(batch["meta"])
        if task.scoring:
            preds = [None] * len(metas)
            by_cands: dict[tuple[str, ...], list[int]] = defaultdict(list)
            for i, m in enumerate(metas):
                by_cands[tuple(m.get("candidates") or ())].append(i)
            for cands, idx in by_cands.items():
                if not cands:
                    raise ValueError(f"{name}: a validation example has no meta['candidates'] to score")
                options = task.candidate_tokens(list(cands), proc)
                scores = self.model.score_options(select_rows(batch, idx), options)  # (b, K)
                for j, i in enumerate(idx):
                    preds[i] = task.decode_scores(scores[j], metas[i])
        else:
            kw = task.generation_config.to_kwargs()
            if self.val_cfg.get("max_text_len"):
                kw["max_text_len"] = min(kw["max_text_len"], int(self.val_cfg["max_text_len"]))
            if self.val_cfg.get("num_beams") and kw.get("method") == "beam":
                kw["num_beams"] = int(self.val_cfg["num_beams"])
            if kw.get("image_output") and not self.val_cfg.get("image_output", True):
                return
            g = torch.Generator(self.device).manual_seed(int(self.hparams.seed))  # reproducible sampling
            gen = self.model.generate(batch, allowed_tokens=task.allowed_tokens(proc), generator=g, **kw)
            preds = []
            for i, m in enumerate(metas):
                image = gen.images[i].float() if gen.images is not None else None
                preds.append(task.decode(gen.text_tokens[i].cpu(), image, m, proc))
        targets = [task.targets_for_metrics(m) for m in metas]
        for metric in self._metrics_for(name).values():
            metric.update(preds, targets)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss``, ``val/<task>/loss`` and ``val/<task>/<metric>`` (reduced over ranks)."""
        gathered, self._gathered = getattr(self, "_gathered", None), None
        if gathered is not None:
            gathered.__exit__(None, None, None)
        losses, names = dict(self._val_loss), sorted(self._val_metrics)
        if self.trainer.world_size > 1:  # every rank must compute the same metrics, in the same order
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (losses, names))
            losses, all_names = {}, set()
            for part_losses, part_names in gathered:
                for k, (s, n) in part_losses.items():
                    s0, n0 = losses.get(k, (0.0, 0))
                    losses[k] = (s0 + s, n0 + n)
                all_names.update(part_names)
            names = sorted(all_names)
        total = sum(s for s, _ in losses.values()), sum(n for _, n in losses.values())
        if total[1]:
            self.log("val/loss", total[0] / total[1], sync_dist=True)  # identical on every rank already
        for name, (s, n) in sorted(losses.items()):
            self.log(f"val/{name}/loss", s / max(n, 1), sync_dist=True)  # identical on every rank already
        for name in names:
            for metric_name, metric in self._metrics_for(name).items():
                value = metric.compute()  # torchmetrics gathers the states of every rank
                for key, v in _flatten(metric_name, value).items():
                    if math.isfinite(v):
                        self.log(f"val/{name}/{key}", v, sync_dist=True)  # identical on every rank already
                metric.reset()
        self._val_metrics = {}

def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    """A metric's ``compute()`` result -> {name: number}. Dicts give ``<key>`` names."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return {prefix: float(value)}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                out[str(k)] = float(v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[str(k)] = float(v)
        return out
    return {}
