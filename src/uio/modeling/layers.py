"""Transformer building blocks of the Unified-IO network (T5 v1.1 flavour).

- :class:`RMSNorm`: T5's LayerNorm -- no mean subtraction, no bias, computed in float32, eps 1e-6.
- :class:`MlpBlock`: gated GELU, ``wo(gelu_tanh(wi_0 x) * wi_1 x)``, no biases (Flax ``nn.gelu`` is
  the tanh approximation by default; the exact erf GELU measurably breaks parity).
- :class:`Attention`: multi-head attention with ``head_dim`` independent of ``d_model``, no biases
  and **no** 1/sqrt(head_dim) scaling of the logits (T5 folds it into the query initialisation).
  It runs through :func:`torch.nn.functional.scaled_dot_product_attention` with an additive bias
  (masks as -1e10 plus position biases) and ``scale=1``, except on CPU where cache-sized chunks
  of plain matmuls are faster (:func:`chunked_attention`, :class:`BiasAttention`; same numbers).
- :class:`KVCache`: preallocated static key/value cache for incremental decoding.

Parameter names follow the Flax modules (``query/key/value/out``, ``wi_0/wi_1/wo``); PyTorch
``Linear.weight`` is the transpose of the Flax ``kernel``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = -1e10  # additive mask value of the original (a fully masked row stays finite: uniform)
SMALL_QUERY = 16  # up to this many queries, CPU attention runs as matmuls instead of SDPA
CHUNK_SCORES = 1 << 21  # CPU attention: float32 scores per chunk of batch rows (8 MiB, cache-sized)


class RMSNorm(nn.Module):
    """T5 LayerNorm: ``x / sqrt(mean(x^2) + eps) * weight`` in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(dtype) * self.weight.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ---- packed weights for CPU decoding ---------------------------------------------------------
def can_pack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be multiplied through a oneDNN-packed copy: a 2-D bf16 CPU tensor
    (bf16 only: measured faster there with identical results; in float32 the packed kernel sums in
    another order)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedWeight:
    """A oneDNN-blocked copy of ``weight[start:end]`` (out, in) for ``x @ W^T``, valid for that very
    weight tensor while its storage, version counter, dtype and shape are unchanged (an optimizer
    step, ``load_state_dict`` or ``.to()`` invalidates it).

    On this project's CPU the packed bf16 product of one (or a few) rows reads the weight about
    twice as fast as ``F.linear`` (measured, with identical results), and decoding one token at a
    time is bound by reading weights.
    """

    def __init__(self, weight: torch.Tensor, start: int | None = None, end: int | None = None):
        self._ref = weakref.ref(weight)
        self.key = self._key(weight)
        part = weight.detach() if start is None else weight.detach()[start:end]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(part.contiguous(), 1)

    @staticmethod
    def _key(w: torch.Tensor) -> tuple:
        return (w.data_ptr(), w._version, w.dtype, tuple(w.shape))

    def valid_for(self, weight: torch.Tensor) -> bool:
        return self._ref() is weight and self.key == self._key(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies through a :class:`PackedWeight` when one was made by
    :func:`pack_linears` and is still valid, gradients are off and ``x`` has the weight's dtype."""

    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed
        if (p is not None and self.bias is None and not torch.is_grad_enabled() and x.dtype == self.weight.dtype
                and p.valid_for(self.weight)):
            return p(x)
        return F.linear(x, self.weight, self.bias)


def pack_linears(module: nn.Module) -> int:
    """Give every bias-free :class:`Linear` under ``module`` with a packable weight a fresh
    :class:`PackedWeight` (stale ones are replaced); returns how many are packed."""
    n = 0
    for m in module.modules():
        if isinstance(m, Linear) and m.bias is None and can_pack(m.weight):
            if m.packed is None or not m.packed.valid_for(m.weight):
                m.packed = PackedWeight(m.weight)
            n += 1
    return n


class MlpBlock(nn.Module):
    """Gated-GELU feed-forward block: ``wo(gelu_tanh(wi_0 x) * wi_1 x)``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.wi_0 = Linear(d_model, d_ff, bias=False)
        self.wi_1 = Linear(d_model, d_ff, bias=False)
        self.wo = Linear(d_ff, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, d_ff)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, True)
        return self.wo(h)


@dataclass
class KVCache:
    """Static per-layer key/value cache: ``keys[i]``/``values[i]`` are (B, H, L_max, Dh).

    Written in place at Python-int slots, so a decoding step does no host synchronisation.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, num_layers: int, batch: int, heads: int, length: int, head_dim: int,
              dtype: torch.dtype, device: torch.device) -> "KVCache":
        # zeros, not empty: unwritten slots are masked, but NaN garbage would survive the mask
        shape = (batch, heads, length, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)])

    def reorder(self, index: torch.Tensor, upto: int) -> None:
        """Beam search: row ``r`` takes the first ``upto`` slots of row ``index[r]``."""
        for t in self.keys + self.values:
            t[:, :, :upto] = t[index, :, :upto]



def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q k^T + bias)`` (B, H, Lq, Lk) in float32 (or float64): scores in the compute dtype
    (matmuls accumulate in float32), bias and softmax in float32; a bool bias marks allowed keys."""
    s = torch.matmul(q, k.transpose(-1, -2))  # a fresh tensor: safe to update in place
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    if bias is not None:
        in_place = torch.broadcast_shapes(s.shape, bias.shape) == s.shape
        if bias.dtype == torch.bool:
            s = s.masked_fill_(~bias, NEG_INF) if in_place else s.masked_fill(~bias, NEG_INF)
        else:
            s = s.add_(bias) if in_place else s + bias
    return torch.softmax(s, dim=-1)


def _row_chunks(q: torch.Tensor, k: torch.Tensor) -> list[tuple[int, int]]:
    """Batch-row ranges whose float32 scores fit :data:`CHUNK_SCORES` elements (at least one row)."""
    b, h, lq, _ = q.shape
    rows = max(1, CHUNK_SCORES // max(1, h * lq * k.shape[2]))
    return [(i, min(i + rows, b)) for i in range(0, b, rows)]


def _bias_rows(bias: torch.Tensor | None, i: int, j: int) -> torch.Tensor | None:
    if bias is None or bias.shape[0] == 1:
        return bias
    return bias[i:j]


def _as_4d(bias: torch.Tensor | None) -> torch.Tensor | None:
    return bias if bias is None or bias.dim() == 4 else bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                      keep_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(q k^T + bias) v`` (B, H, Lq, Dh) a few batch rows at a time, so that the float32
    scores stay in cache (on this project's CPU 2-5x faster in bf16 than SDPA's flash kernel and
    than one unchunked pass). Returns the output and, with ``keep_probs``, the probabilities
    (B, H, Lq, Lk) in the compute dtype."""
    bias = _as_4d(bias)
    chunks = _row_chunks(q, k)
    if len(chunks) == 1:
        probs = attention_probs(q, k, bias).to(v.dtype)
        return torch.matmul(probs, v), (probs if keep_probs else None)
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    kept = q.new_empty(q.shape[:-1] + k.shape[2:3], dtype=v.dtype) if keep_probs else None
    for i, j in chunks:
        p32 = attention_probs(q[i:j], k[i:j], _bias_rows(bias, i, j))
        if kept is not None:
            probs = kept[i:j]
            probs.copy_(p32)  # converts while copying
        else:
            probs = p32.to(v.dtype)
        torch.matmul(probs, v[i:j], out=out[i:j])
    return out, kept


class BiasAttention(torch.autograd.Function):
    """``softmax(q k^T + bias) v`` with gradients for q, k, v and the additive bias.

    What SDPA's math fallback computes (the CPU flash kernel is not used when the bias needs a
    gradient), with less memory traffic: batch-row chunks keep the float32 scores in cache, only
    the probabilities (in the compute dtype) are kept for backward, and the bias gradient is the
    score gradient summed over the bias's broadcast dimensions. Inputs: q (B, H, Lq, Dh), k/v
    (B, H, Lk, Dh), bias float broadcastable to (B, H, Lq, Lk), bool (True = attend) or None.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out, probs = chunked_attention(q, k, v, bias, keep_probs=True)  # (B, H, Lq, Dh), (B, H, Lq, Lk)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, probs, out = ctx.saved_tensors
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad
        need_bias = need_bias and ctx.bias_meta is not None
        g_all = grad_out.to(v.dtype)
        acc = torch.promote_types(probs.dtype, torch.float32)
        chunks = _row_chunks(q, k)
        whole = len(chunks) == 1
        grad_q = torch.empty_like(q) if need_q and not whole else None
        grad_k = torch.empty_like(k) if need_k and not whole else None
        grad_v = torch.empty_like(v) if need_v and not whole else None
        grad_bias = None
        if need_bias:
            bias_shape, bias_dtype = ctx.bias_meta
            shape4 = (1,) * (4 - len(bias_shape)) + tuple(bias_shape)
            if not whole:  # summed over batch rows, or one slice per chunk
                grad_bias = (torch.zeros if shape4[0] == 1 else torch.empty)(shape4, dtype=acc, device=q.device)
        for i, j in chunks:
            p, g = probs[i:j], g_all[i:j]
            if need_v:
                if whole:
                    grad_v = torch.matmul(p.transpose(-1, -2), g)
                else:
                    torch.matmul(p.transpose(-1, -2), g, out=grad_v[i:j])
            # d scores = P * (dP - rowsum(dO * O)), in float32
            dp = torch.matmul(g, v[i:j].transpose(-1, -2)).to(acc)  # (rows, H, Lq, Lk)
            dp.sub_((g.to(acc) * out[i:j].to(acc)).sum(-1, keepdim=True))
            ds = dp.mul_(p)
            if need_bias:
                if whole:
                    grad_bias = ds.sum_to_size(shape4)
                elif shape4[0] == 1:
                    grad_bias += ds.sum_to_size(shape4)
                else:
                    grad_bias[i:j] = ds.sum_to_size((j - i,) + shape4[1:])
            ds = ds.to(q.dtype)
            if need_q:
                if whole:
                    grad_q = torch.matmul(ds, k[i:j])
                else:
                    torch.matmul(ds, k[i:j], out=grad_q[i:j])
            if need_k:
                if whole:
                    grad_k = torch.matmul(ds.transpose(-1, -2), q[i:j])
                else:
                    torch.matmul(ds.transpose(-1, -2), q[i:j], out=grad_k[i:j])
        if grad_bias is not None:
            grad_bias = grad_bias.reshape(bias_shape).to(bias_dtype)
        return grad_q, grad_k, grad_v, grad_bias


class Attention(nn.Module):
    """Multi-head attention without biases or logit scaling, through SDPA with an additive bias.

    ``query/key/value``: d_model -> heads*head_dim; ``out``: heads*head_dim -> d_model.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.query = Linear(d_model, inner, bias=False)
        self.key = Linear(d_model, inner, bias=False)
        self.value = Linear(d_model, inner, bias=False)
        self.out = Linear(inner, d_model, bias=False)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, L, Dh) of ``x`` (B, L, d)."""
        return self._heads(self.key(x)), self._heads(self.value(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, Lq, Dh), k/v (B, H, Lk, Dh), bias broadcastable to (B, H, Lq, Lk) -> (B, Lq, H*Dh).

        CUDA (and dropout): SDPA. CPU, where cache-sized batch-row chunks of plain matmuls beat
        SDPA's kernels (measured): training through :class:`BiasAttention`, bf16/fp16 inference
        and decoding steps (at most :data:`SMALL_QUERY` queries) through
        :func:`chunked_attention`, float32 inference over longer queries through SDPA's flash
        kernel (faster there in float32).
        """
        p = self.dropout if self.training else 0.0
        b, _, lq, _ = q.shape
        if q.device.type == "cpu" and p == 0.0:
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
                o = BiasAttention.apply(q, k, v, bias)  # (B, H, Lq, Dh)
                return o.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim)
            if lq <= SMALL_QUERY or q.dtype in (torch.bfloat16, torch.float16):
                o, _ = chunked_attention(q, k, v, bias)  # (B, H, Lq, Dh)
                return o.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim)
        if bias is not None and bias.dtype not in (q.dtype, torch.bool) and (
                q.device.type != "cpu" or bias.dtype != torch.float32):
            bias = bias.to(q.dtype)  # CUDA's fused kernels take only a bias of the query's dtype
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=1.0)  # (B, H, Lq, Dh)
        return o.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Self-attention over ``x`` (B, L, d) with an additive ``bias`` (B|1, H|1, L, L)."""
        q = self._heads(self.query(x))
        k, v = self.project_kv(x)
        return self.out(self.attend(q, k, v, bias))

    def cross(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention of ``x`` (B*G, Lq, d) to precomputed k/v (B, H, Lk, Dh).

        ``G`` rows of ``x`` (beams, answer options) share one encoder row: their queries are
        stacked along the query axis, so the encoder keys are neither copied nor re-projected.
        ``bias``: (B|1, 1|H, 1|Lq|Lq*G, Lk); a per-query bias of Lq rows is shared by the G rows.
        """
        b = k.shape[0]
        bg, lq, _ = x.shape
        if bg % b:
            raise ValueError(f"cross-attention: {bg} query rows do not group over {b} encoder rows")
        g = bg // b
        if bias is not None and g > 1 and lq > 1 and bias.shape[-2] == lq:
            bias = bias.repeat(1, 1, g, 1)
        q = self._heads(self.query(x))  # (B*G, H, Lq, Dh)
        if g > 1:
            q = q.view(b, g, self.num_heads, lq, self.head_dim).transpose(1, 2).reshape(
                b, self.num_heads, g * lq, self.head_dim)
        o = self.attend(q, k, v, bias)  # (B, G*Lq, H*Dh)
        if g > 1:
            o = o.view(b, g, lq, -1).reshape(bg, lq, -1)
        return self.out(o)

    def prefill(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
                bias: torch.Tensor) -> torch.Tensor:
        """Positions ``[start, start+L)`` at once (teacher forcing into the cache); ``bias`` is
        (B|1, H|1, L, start+L)."""
        n = x.shape[1]
        q = self._heads(self.query(x))
        k, v = self.project_kv(x)
        cache_k[:, :, start : start + n] = k
        cache_v[:, :, start : start + n] = v
        return self.out(self.attend(q, cache_k[:, :, : start + n], cache_v[:, :, : start + n], bias))


# ---- initialisers (Flax / Mesh-TF conventions) -----------------------------------------------
def trunc_normal_fan_in_(w: torch.Tensor, fan_in: int, scale: float = 1.0) -> torch.Tensor:
    """``variance_scaling(scale, 'fan_in', 'truncated_normal')``: truncated at 2 std, with the
    std corrected so the truncated distribution has variance ``scale / fan_in``."""
    std = math.sqrt(scale / fan_in) / 0.87962566103423978
    # inverse-CDF sampling (torch's trunc_normal_ rejection loop is ~20x slower on CPU)
    cdf = 0.5 * (1.0 + math.erf(-2.0 / math.sqrt(2.0)))  # Phi(-2)
    with torch.no_grad():
        return w.uniform_(2 * cdf - 1, 1 - 2 * cdf).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2 * std, 2 * std)


def normal_fan_in_(w: torch.Tensor, fan_in: int, scale: float = 1.0) -> torch.Tensor:
    """``variance_scaling(scale, 'fan_in', 'normal')`` (plain normal)."""
    return nn.init.normal_(w, 0.0, math.sqrt(scale / fan_in))


def uniform_fan_avg_(w: torch.Tensor, fan_in: int, fan_out: int, scale: float = 1.0) -> torch.Tensor:
    """``variance_scaling(scale, 'fan_avg', 'uniform')``."""
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2))
    return nn.init.uniform_(w, -limit, limit)


def init_attention_(attn: Attention) -> None:
    """T5X attention init: fan-in normal for q/k/v/out, the query divided by sqrt(head_dim)."""
    d_model = attn.query.in_features
    inner = attn.out.in_features
    normal_fan_in_(attn.query.weight, d_model)
    with torch.no_grad():
        attn.query.weight.div_(math.sqrt(attn.head_dim))
    normal_fan_in_(attn.key.weight, d_model)
    normal_fan_in_(attn.value.weight, d_model)
    normal_fan_in_(attn.out.weight, inner)


def init_mlp_(mlp: MlpBlock) -> None:
    """T5X MLP init: truncated-normal fan-in for wi_0, wi_1 and wo."""
    for lin in (mlp.wi_0, mlp.wi_1, mlp.wo):
        trunc_normal_fan_in_(lin.weight, lin.in_features)
