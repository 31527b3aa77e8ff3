"""Optimisers and learning-rate schedules for training Unified-IO.

The paper (UIO §3.3 / appendix A.2): Adafactor (Shazeer & Stern, 2018), learning rate 1e-2 for the
first 10,000 steps then decayed as 1/sqrt(k), beta1 = 0.9, beta2 = 1 - k^-0.8 (k = step number),
global-norm gradient clipping at 1.0 (done by the Trainer, ``gradient_clip_val``), no dropout.

:class:`Adafactor` is written here rather than taken from ``torch.optim.Adafactor`` because the
paper uses momentum (beta1 = 0.9), which torch's version does not have, and because the Mesh-TF/T5X
conventions it follows (update clipping, parameter-scale relative step sizes) are explicit options
here. AdamW (``torch.optim.AdamW``) is the alternative.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["Adafactor", "rsqrt_schedule", "build_optimizer", "build_scheduler", "param_groups"]


class Adafactor(torch.optim.Optimizer):
    """Adafactor with factored second moments, update clipping, optional momentum.

    For step ``k`` (1-based) and gradient ``g``:

    * ``beta2_k = 1 - k ** -decay_rate``;
    * matrices (``ndim >= 2``, last two dims) keep row and column means of ``g**2 + eps1`` and
      use their outer product (divided by the row mean) as the second moment ``v``; other tensors
      keep the full ``v``;
    * ``u = g / sqrt(v)``, then ``u /= max(1, rms(u) / clip_threshold)``;
    * with ``beta1``: ``m = beta1 m + (1 - beta1) u`` and ``u = m``;
    * step size ``lr * max(eps2, rms(p))`` if ``scale_parameter`` else ``lr``;
    * ``p -= step * (u + weight_decay * p)``.

    The paper's recipe is ``lr=1e-2`` (scheduled by :func:`rsqrt_schedule`), ``beta1=0.9``,
    ``decay_rate=0.8``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        beta1: float | None = 0.9,
        decay_rate: float = 0.8,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float = 1.0,
        scale_parameter: bool = True,
        weight_decay: float = 0.0,
        factored: bool = True,
    ):
        if not lr > 0:
            raise ValueError(f"Adafactor lr must be > 0, got {lr}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Adafactor beta1 must be in [0, 1) or None, got {beta1}")
        if not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"Adafactor decay_rate must be in (0, 1], got {decay_rate}")
        if not clip_threshold > 0:
            raise ValueError(f"Adafactor clip_threshold must be > 0, got {clip_threshold}")
        if weight_decay < 0:
            raise ValueError(f"Adafactor weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps1=eps1, eps2=eps2,
                        clip_threshold=clip_threshold, scale_parameter=scale_parameter,
                        weight_decay=weight_decay, factored=factored)
        super().__init__(params, defaults)

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.square().mean().sqrt()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad.float()
        state = self.state[p]
        factored = group["factored"] and p.dim() >= 2
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            if factored:
                state["row_var"] = torch.zeros_like(grad.mean(dim=-1))  # (..., R)
                state["col_var"] = torch.zeros_like(grad.mean(dim=-2))  # (..., C)
            else:
                state["var"] = torch.zeros_like(grad)
            if group["beta1"] is not None:
                state["momentum"] = torch.zeros_like(grad)
        state["step"] += 1
        k = float(state["step"])
        beta2 = 1.0 - k ** (-group["decay_rate"])  # 0 at k = 1: the first step uses g**2 alone

        sq = grad.square() + group["eps1"]
        if factored:
            row, col = state["row_var"], state["col_var"]
            row.lerp_(sq.mean(dim=-1), 1.0 - beta2)  # (..., R)
            col.lerp_(sq.mean(dim=-2), 1.0 - beta2)  # (..., C)
            # v ~= row col^T / mean(row): the rank-1 reconstruction of the second moment
            r = row / row.mean(dim=-1, keepdim=True)
            update = grad * r.rsqrt().unsqueeze(-1) * col.rsqrt().unsqueeze(-2)
        else:
            var = state["var"]
            var.lerp_(sq, 1.0 - beta2)
            update = grad * var.rsqrt()
        update = update / (self._rms(update) / group["clip_threshold"]).clamp(min=1.0)
        if group["beta1"] is not None:
            m = state["momentum"]
            m.lerp_(update, 1.0 - group["beta1"])
            update = m

        step_size = group["lr"]
        if group["scale_parameter"]:
            step_size = self._rms(p.detach().float()).clamp(min=group["eps2"]) * step_size
        if group["weight_decay"]:
            update = update + group["weight_decay"] * p.detach().float()
        p.add_((-step_size * update).to(p.dtype))


def rsqrt_schedule(constant_steps: int = 10_000, warmup_steps: int = 0) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``k`` (0-based, as ``LambdaLR`` counts).

    Linear warm-up over ``warmup_steps`` (0 in the paper), then constant until ``constant_steps``,
    then ``sqrt(constant_steps / k)`` — with base lr 1e-2 and 10k steps that is the paper's
    ``1 / sqrt(k)`` (T5's inverse-square-root schedule: 1/sqrt(max(k, 10^4))).
    """
    if constant_steps < 1:
        raise ValueError(f"constant_steps must be >= 1, got {constant_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        k = step + 1
        if warmup_steps and k <= warmup_steps:
            return k / warmup_steps
        return 1.0 if k <= constant_steps else math.sqrt(constant_steps / k)

    return factor


def _decay_schedule(name: str, total_steps: int, warmup_steps: int, time_progress: Callable[[], float] | None,
                    shape: Callable[[float], float]) -> Callable[[int], float]:
    """Linear warm-up, then ``shape(t)`` of the progress ``t`` in [0, 1] past warm-up: the step
    fraction, or the time fraction when a time limit is further along."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 for a {name} schedule, got {total_steps}")

    def factor(step: int) -> float:
        k = step + 1
        if warmup_steps and k <= warmup_steps:
            return k / warmup_steps
        t = min(1.0, (k - warmup_steps) / max(1, total_steps - warmup_steps))
        if time_progress is not None:
            t = min(1.0, max(t, float(time_progress())))
        return shape(t)

    return factor


def cosine_schedule(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0,
                    time_progress: Callable[[], float] | None = None) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``min_ratio`` at ``total_steps``.

    ``time_progress``: the fraction of a time limit already spent (0..1). The decay then follows
    whichever is further along, steps or time, so a run that a time budget stops early still ends
    with a decayed learning rate instead of being cut off at a high one."""
    return _decay_schedule("cosine", total_steps, warmup_steps, time_progress,
                           lambda t: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def wsd_schedule(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, decay_fraction: float = 0.2,
                 time_progress: Callable[[], float] | None = None) -> Callable[[int], float]:
    """Warm-up, stable, decay: linear warm-up, the full rate, then a linear decay to ``min_ratio``
    over the last ``decay_fraction`` of the run (MiniCPM, Hu et al. 2024; Hägele et al. 2024).

    Progress is measured as in :func:`cosine_schedule`: steps or ``time_progress``, whichever is
    further along. Against cosine it keeps the full rate for longer, which matters for what a short
    run learns late."""
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")

    return _decay_schedule("wsd", total_steps, warmup_steps, time_progress,
                           lambda t: 1.0 - (1.0 - min_ratio) * max(0.0, t - (1.0 - decay_fraction)) / decay_fraction)


def constant_schedule(warmup_steps: int = 0) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed matrices, and undecayed norms/biases/embeddings (the usual AdamW split)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "norm" in name or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "cosine", "wsd", "constant")


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    adafactor: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """``name`` in :data:`OPTIMIZERS`. Only parameters with ``requires_grad`` are optimised (the
    frozen image tokenizer is not)."""
    if name == "adafactor":
        kw = dict(adafactor or {})
        params = [p for p in model.parameters() if p.requires_grad]
        return Adafactor(params, lr=lr, weight_decay=weight_decay, **kw)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {list(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, *, constant_steps: int = 10_000,
                    warmup_steps: int = 0, total_steps: int | None = None,
                    min_ratio: float = 0.0, time_progress: Callable[[], float] | None = None,
                    decay_fraction: float = 0.2) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``; ``name`` in :data:`SCHEDULES` (``time_progress``: see
    :func:`cosine_schedule`; the other schedules depend on the step only)."""
    if name == "rsqrt":
        fn = rsqrt_schedule(constant_steps, warmup_steps)
    elif name in ("cosine", "wsd"):
        if total_steps is None or total_steps < 1:
            raise ValueError(f"the {name} schedule needs total_steps >= 1 (trainer.max_steps), got {total_steps}")
        fn = cosine_schedule(total_steps, warmup_steps, min_ratio, time_progress) if name == "cosine" else \
            wsd_schedule(total_steps, warmup_steps, min_ratio, decay_fraction, time_progress)
    elif name == "constant":
        fn = constant_schedule(warmup_steps)
    else:
        raise ValueError(f"unknown schedule {name!r}; expected one of {list(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
