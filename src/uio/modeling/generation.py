"""Decoding for the Unified-IO network: greedy, beam search and top-p sampling, answer scoring.

As in the original (``uio/model.py``, ``uio/decoding.py``), one autoregressive pass emits the text
segment first (stopping at EOS or ``max_text_len``), then -- for image outputs -- the image segment,
whose first input is the image BOS (``text_vocab_size - 1``) whatever the text ended with. Text
steps may only emit text ids, image steps only image ids; an extra per-step ``allowed_tokens`` mask
(bool (V,), (B, V) or ``callable(step, prefix) -> mask``) narrows the text steps further (e.g. to
location tokens). A text slot fed after the row's EOS is masked for later positions, as in training
(the original's ``decoder_masks``), so stopping early changes no image token. Text steps never
emit the pad id 0 (never a training target; the original could, and then kept decoding).

The step loops keep everything on the device: a static KV cache written at Python-int slots, no
``.item()`` per step; the only host synchronisation is an "all rows finished?" check every
``check_every`` steps. ``use_cache=False`` recomputes the whole prefix at every step instead (slow;
it exists to prove the cache exact).

Deliberate differences from the original: beam search finishes a hypothesis at EOS (the original's
``end_marker`` of 10000000 can never be produced, so its beams ran to the full length and were
ranked including tokens after EOS); the brevity penalty ``((5 + len) / 6) ** alpha`` uses the same
length and alpha defaults to 0 as the runner used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from uio.modeling.network import DecoderState, EncoderOutput, UnifiedIONetwork

NEG = -1e30  # beam bookkeeping: "impossible" score (finite, so sums never produce NaN)
SAMPLE_NEG = -1e7  # logits removed by top-p filtering (the original's NEG_INF)
ROW_BLOCK_ELEMS = 1 << 23  # TargetLogProb: float32 logits per row block (32 MiB: few blocks, few ops)

AllowedTokens = Union[torch.Tensor, Callable[[int, torch.Tensor], torch.Tensor], None]


@dataclass
class GenerationOutput:
    """``text_tokens`` (B, L) int64, EOS included, 0-padded after it; ``image_codes`` (B, Ni) codes in
    ``[0, image_vocab)`` (None without image output); ``images`` (B, 3, Ht, Wt) in [-1, 1] when the
    model has an image tokenizer; ``scores`` (B,) the log-likelihood of the returned text (beam
    search: of the hypothesis, divided by the brevity penalty)."""

    text_tokens: torch.Tensor
    image_codes: torch.Tensor | None = None
    images: torch.Tensor | None = None
    scores: torch.Tensor | None = None


# ================================================================================================
# Steppers: the same decoding loop runs on the KV cache or by recomputing the prefix
# ================================================================================================
class CachedStepper:
    """Feeds decoder slots through a static KV cache."""

    def __init__(self, network: UnifiedIONetwork, enc: EncoderOutput, rows: int, text_len: int, image_len: int):
        self.network = network
        self.state: DecoderState = network.decoder.init_state(enc, rows, text_len, image_len)

    def __call__(self, ids: torch.Tensor, start: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """ids (R, n) into slots [start, start+n) -> hidden (R, n, d)."""
        return self.network.decoder.forward_cached(self.network.token_embedder, self.state, ids, start, valid)

    def reorder(self, index: torch.Tensor, upto: int) -> None:
        self.state.reorder(index, upto)


class UncachedStepper:
    """Re-runs the teacher-forced decoder over the whole prefix at every step (reference path)."""

    def __init__(self, network: UnifiedIONetwork, enc: EncoderOutput, rows: int, text_len: int, image_len: int):
        self.network, self.enc, self.text_len = network, enc, text_len
        length = text_len + image_len
        device = enc.hidden.device
        self.ids = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.valid = torch.zeros(rows, length, dtype=torch.bool, device=device)
        self.filled = 0

    def __call__(self, ids: torch.Tensor, start: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        n = ids.shape[1]
        end = start + n
        self.ids[:, start:end] = ids
        self.valid[:, start:end] = True if valid is None else valid
        self.filled = max(self.filled, end)
        hidden = self.network.decode(self.enc, self.ids[:, :end], min(end, self.text_len), self.valid[:, :end])
        return hidden[:, start:end]

    def reorder(self, index: torch.Tensor, upto: int) -> None:
        self.ids[:, :upto] = self.ids[index, :upto]
        self.valid[:, :upto] = self.valid[index, :upto]


# ================================================================================================
# Token choice
# ================================================================================================
def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities reach ``top_p`` (the original's rule:
    the cutoff is the first sorted logit at which the cumulative probability reaches top_p)."""
    if not 0.0 < top_p < 1.0:
        return logits
    sorted_logits = logits.sort(dim=-1, descending=True).values
    cum = sorted_logits.softmax(-1).cumsum(-1)
    cutoff_index = (cum < top_p).sum(-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    cutoff = sorted_logits.gather(-1, cutoff_index)
    return logits.masked_fill(logits < cutoff, SAMPLE_NEG)


def sample_tokens(logits: torch.Tensor, top_p: float, temperature: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Top-p then temperature sampling over the last axis (exponential race: ``argmax p / E``,
    which draws from ``p`` without a host round trip)."""
    probs = (top_p_filter(logits, top_p) / temperature).softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


def _check_mask(m: torch.Tensor, rows: int, batch: int, group: int, vocab_size: int, what: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        m = torch.as_tensor(m)
    if m.dtype != torch.bool:
        raise TypeError(f"{what} must be a bool tensor, got dtype {m.dtype}")
    if m.dim() == 1 and m.shape[0] == vocab_size:
        return m
    if m.dim() == 2 and m.shape[1] == vocab_size:
        if m.shape[0] == rows:
            return m
        if m.shape[0] == batch:
            return m.repeat_interleave(group, 0)
    raise ValueError(f"{what} must have shape ({vocab_size},), ({batch}, {vocab_size}) or ({rows}, {vocab_size}) "
                     f"(the full vocabulary), got {tuple(m.shape)}")


class _MaskSource:
    """Resolves ``allowed_tokens`` into a (V_text,) or (R, V_text) mask per text step."""

    def __init__(self, allowed: AllowedTokens, rows: int, batch: int, group: int, network: UnifiedIONetwork,
                 device: torch.device):
        self.allowed, self.rows, self.batch, self.group = allowed, rows, batch, group
        self.vocab_size = network.vocab.size
        self.text_size = network.vocab.text_vocab_size
        self.device = device
        self.static = None
        if allowed is not None and not callable(allowed):
            self.static = self._fix(allowed, "allowed_tokens")

    def _fix(self, m, what: str) -> torch.Tensor:
        m = _check_mask(m, self.rows, self.batch, self.group, self.vocab_size, what)
        return m.to(self.device)[..., : self.text_size]

    def __call__(self, step: int, prefix: torch.Tensor) -> torch.Tensor | None:
        if self.allowed is None:
            return None
        if self.static is not None:
            return self.static
        return self._fix(self.allowed(step, prefix), f"allowed_tokens({step}, prefix)")


# ================================================================================================
# Loops
# ================================================================================================
def _step_logits(network: UnifiedIONetwork, hidden: torch.Tensor, modality: str,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """Float32 logits (R, V_modality) of one step. Text steps never emit pad (id 0): it is never a
    training target, and a 0 in the output means "nothing" (after EOS)."""
    logits = network.logits(hidden, modality)
    if modality == "text":
        logits[:, network.vocab.pad_id] = -1e10
    if mask is not None:
        logits = logits.masked_fill(~mask, -1e10)
    return logits


def _sequential(stepper, network: UnifiedIONetwork, rows: int, start: int, steps: int, first: torch.Tensor,
                modality: str, method: str, masks: _MaskSource | None, eos_id: int | None, top_p: float,
                temperature: float, generator: torch.Generator | None, check_every: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy / sampled decoding of ``steps`` slots from ``start``; returns (tokens (R, n), log-probs (R,)).

    Text tokens are vocabulary ids; image tokens are codes (index into the image part).
    """
    device = first.device
    offset = network.vocab.image_offset if modality == "image" else 0
    out = torch.zeros(rows, steps, dtype=torch.long, device=device)
    score = torch.zeros(rows, dtype=torch.float32, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    cur = first
    n = steps
    for t in range(steps):
        valid = None if eos_id is None else ~finished[:, None]
        hidden = stepper(cur[:, None], start + t, valid)[:, 0]  # (R, d)
        logits = _step_logits(network, hidden, modality, masks(t, out[:, :t]) if masks is not None else None)
        if method == "greedy":
            tok = logits.argmax(-1)
        else:
            tok = sample_tokens(logits, top_p, temperature, generator)
        logp = logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
        if eos_id is not None:
            tok = tok.masked_fill(finished, 0)
            score = score + logp.masked_fill(finished, 0.0)
            finished = finished | (tok == eos_id)
        else:
            score = score + logp
        out[:, t] = tok
        cur = tok + offset
        if eos_id is not None and (t + 1) % check_every == 0 and t + 1 < steps and bool(finished.all()):
            n = t + 1
            break
    return out[:, :n], score


def _beam(stepper, network: UnifiedIONetwork, batch: int, beams: int, start: int, steps: int, first: torch.Tensor,
          modality: str, masks: _MaskSource | None, eos_id: int | None, alpha: float, check_every: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over ``steps`` slots from ``start`` (rows = batch * beams, row b*K + k).

    Returns the best sequence per batch row (B, n) and its score (B,). ``stepper`` is left holding
    the live beams, reordered so that row b*K holds row b's best live beam.
    """
    device = first.device
    k = beams
    rows = batch * k
    offset = network.vocab.image_offset if modality == "image" else 0

    def penalty(length: int) -> float:
        return ((5.0 + length) / 6.0) ** alpha

    live_seqs = torch.zeros(batch, k, steps, dtype=torch.long, device=device)
    live_logp = torch.full((batch, k), NEG, device=device)
    live_logp[:, 0] = 0.0
    fin_seqs = torch.zeros(batch, k, steps, dtype=torch.long, device=device)
    fin_scores = torch.full((batch, k), NEG, device=device)
    fin_flags = torch.zeros(batch, k, dtype=torch.bool, device=device)
    base = (torch.arange(batch, device=device) * k)[:, None]  # (B, 1)
    cur = first
    n = steps
    for t in range(steps):
        hidden = stepper(cur[:, None], start + t)[:, 0]  # (R, d)
        mask = masks(t, live_seqs.view(rows, steps)[:, :t]) if masks is not None else None
        logits = _step_logits(network, hidden, modality, mask)
        vsize = logits.shape[-1]
        cand = logits.log_softmax(-1).view(batch, k, vsize) + live_logp[:, :, None]
        top_s, top_i = cand.view(batch, k * vsize).topk(min(2 * k, k * vsize), dim=1)  # (B, 2K)
        src = top_i // vsize
        tok = top_i % vsize
        seqs2 = live_seqs.gather(1, src[:, :, None].expand(-1, -1, steps)).clone()
        seqs2[:, :, t] = tok
        is_eos = (tok == eos_id) if eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
        alive_s = top_s.masked_fill(is_eos, NEG)
        keep = alive_s.topk(k, dim=1).indices  # (B, K)
        live_seqs = seqs2.gather(1, keep[:, :, None].expand(-1, -1, steps))
        live_logp = alive_s.gather(1, keep)
        stepper.reorder((base + src.gather(1, keep)).view(rows), start + t + 1)
        cur = tok.gather(1, keep).view(rows) + offset
        if eos_id is not None:
            new_s = (top_s / penalty(t + 1)).masked_fill(~is_eos, NEG)
            all_s = torch.cat([fin_scores, new_s], 1)
            best = all_s.topk(k, dim=1).indices
            fin_scores = all_s.gather(1, best)
            fin_seqs = torch.cat([fin_seqs, seqs2], 1).gather(1, best[:, :, None].expand(-1, -1, steps))
            fin_flags = torch.cat([fin_flags, is_eos], 1).gather(1, best)
            if (t + 1) % check_every == 0 and t + 1 < steps:
                # stop when no live beam can beat the worst finished one (log-probs only decrease)
                best_live = live_logp[:, 0] / penalty(steps)
                worst_fin = torch.where(fin_flags.all(1), fin_scores.min(1).values, torch.full_like(best_live, NEG))
                if bool((worst_fin > best_live).all()):
                    n = t + 1
                    break
    if eos_id is None:
        return live_seqs[:, 0, :n], live_logp[:, 0]
    any_fin = fin_flags.any(1)
    seqs = torch.where(any_fin[:, None], fin_seqs[:, 0, :n], live_seqs[:, 0, :n])
    scores = torch.where(any_fin, fin_scores[:, 0], live_logp[:, 0])
    return seqs, scores


def used_length(ids: torch.Tensor) -> int:
    """Columns of a (B, L) id tensor up to the last non-pad (id 0) one of any row; at least 1."""
    used = (ids != 0).any(0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 1


def _text_inputs(text: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs (shift right, 0 start) and slot validity for generated text (R, n)."""
    inputs = torch.cat([torch.zeros_like(text[:, :1]), text[:, :-1]], dim=1)
    # a slot is valid while no EOS has been fed, i.e. up to and including the EOS target
    seen_eos = (inputs == eos_id).long().cumsum(1) > 0
    return inputs, ~seen_eos


@torch.no_grad()
def generate(network: UnifiedIONetwork, enc: EncoderOutput, max_text_len: int = 32, image_output: bool = False,
             method: str = "greedy", num_beams: int = 1, top_p: float = 0.9, temperature: float = 1.0,
             allowed_tokens: AllowedTokens = None, generator: torch.Generator | None = None, alpha: float = 0.0,
             use_cache: bool = True, check_every: int = 4) -> GenerationOutput:
    """Decode text (and then an image) for every encoder row. See the module docstring."""
    cfg = network.config
    vocab = network.vocab
    if method not in ("greedy", "beam", "sample"):
        raise ValueError(f"method must be 'greedy', 'beam' or 'sample', got {method!r}")
    if not isinstance(max_text_len, int) or not 1 <= max_text_len <= cfg.decoder_max_text_len:
        raise ValueError(f"max_text_len must be an int in [1, {cfg.decoder_max_text_len}] "
                         f"(decoder_max_text_len), got {max_text_len!r}")
    if method == "beam" and (not isinstance(num_beams, int) or num_beams < 1):
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if method == "sample":
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    batch = enc.hidden.shape[0]
    device = enc.hidden.device
    image_len = cfg.decoder_max_image_len if image_output else 0
    if use_cache:
        network.pack_for_decoding()  # bf16 on CPU: packed weights for the one-token steps
    make = CachedStepper if use_cache else UncachedStepper
    k = num_beams if method == "beam" else 1
    rows = batch * k
    masks = _MaskSource(allowed_tokens, rows, batch, k, network, device) if allowed_tokens is not None else None
    start_tok = torch.zeros(rows, dtype=torch.long, device=device)
    stepper = make(network, enc, rows, max_text_len, image_len)

    if method == "beam":
        text, scores = _beam(stepper, network, batch, k, 0, max_text_len, start_tok, "text", masks, vocab.eos_id,
                             alpha, check_every)
    else:
        text, scores = _sequential(stepper, network, rows, 0, max_text_len, start_tok, "text", method, masks,
                                   vocab.eos_id, top_p, temperature, generator, check_every)
    text = text[:, : used_length(text)]  # drop all-padding columns at the end
    codes = None
    if image_output:
        bos = torch.full((rows,), vocab.image_bos_id, dtype=torch.long, device=device)
        if method == "beam":
            # finished hypotheses are not in the cache: rebuild it from each row's best text
            stepper = make(network, enc, rows, max_text_len, image_len)
            inputs, valid = _text_inputs(text.repeat_interleave(k, 0), vocab.eos_id)
            stepper(inputs, 0, valid)
            codes, _ = _beam(stepper, network, batch, k, max_text_len, image_len, bos, "image", None, None, alpha,
                             check_every)
        else:
            codes, _ = _sequential(stepper, network, rows, max_text_len, image_len, bos, "image", method, None, None,
                                   top_p, temperature, generator, check_every)
    return GenerationOutput(text_tokens=text, image_codes=codes, scores=scores)


# ================================================================================================
# Answer scoring
# ================================================================================================
Options = Union[Sequence[Sequence[int]], Sequence[Sequence[Sequence[int]]]]


def _normalise_options(options: Options, batch: int, network: UnifiedIONetwork) -> list[list[list[int]]]:
    """Per-row lists of K options, each ending with EOS (appended if missing)."""
    vocab = network.vocab
    if not isinstance(options, (list, tuple)) or not options:
        raise ValueError("options must be a non-empty list of token-id lists (shared) or one such list per row")
    per_row = isinstance(options[0], (list, tuple)) and len(options[0]) > 0 and isinstance(options[0][0], (list, tuple))
    rows = [list(options)] * batch if not per_row else [list(r) for r in options]
    if len(rows) != batch:
        raise ValueError(f"per-row options must have one list per batch row ({batch}), got {len(rows)}")
    k = len(rows[0])
    out: list[list[list[int]]] = []
    for b, row in enumerate(rows):
        if len(row) != k or k == 0:
            raise ValueError(f"every row must have the same, non-zero number of options ({k}); row {b} has {len(row)}")
        fixed = []
        for j, opt in enumerate(row):
            ids = [int(i) for i in (opt.tolist() if isinstance(opt, torch.Tensor) else opt)]
            if ids and ids[-1] == vocab.eos_id:
                ids = ids[:-1]
            if any(i <= 0 or i >= vocab.text_vocab_size or i == vocab.eos_id for i in ids):
                raise ValueError(f"option {j} of row {b} must contain text ids in [2, {vocab.text_vocab_size}) "
                                 f"before its EOS (no pad 0, no EOS inside), got {ids}")
            ids.append(vocab.eos_id)
            if len(ids) > network.config.decoder_max_text_len:
                raise ValueError(f"option {j} of row {b} has {len(ids)} tokens with EOS, more than "
                                 f"decoder_max_text_len={network.config.decoder_max_text_len}")
            fixed.append(ids)
        out.append(fixed)
    return out


@torch.no_grad()
def score_options(network: UnifiedIONetwork, enc: EncoderOutput, options: Options, average: bool = False,
                  max_rows: int = 256, max_logit_elems: int = 1 << 25) -> torch.Tensor:
    """Log-likelihood (B, K) of each answer option (token ids, EOS appended if missing) given each
    encoder row: summed over the option's tokens, or averaged with ``average=True``. The encoder
    runs once; options are teacher-forced in batches of at most ``max_rows`` decoder rows."""
    batch = enc.hidden.shape[0]
    device = enc.hidden.device
    opts = _normalise_options(options, batch, network)
    k = len(opts[0])
    chunk = max(1, max_rows // batch)
    result = torch.zeros(batch, k, dtype=torch.float32, device=device)
    for c0 in range(0, k, chunk):
        sub = [row[c0 : c0 + chunk] for row in opts]
        g = len(sub[0])
        length = max(len(o) for row in sub for o in row)
        targets = torch.zeros(batch * g, length, dtype=torch.long)
        for b, row in enumerate(sub):
            for j, o in enumerate(row):
                targets[b * g + j, : len(o)] = torch.tensor(o)
        targets = targets.to(device)
        valid = targets != 0
        inputs = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], 1)
        hidden = network.decode(enc, inputs, length, valid)  # (B*G, L, d)
        logp = token_log_probs(network, hidden[valid], targets[valid], "text", max_logit_elems)
        per_tok = torch.zeros(batch * g, length, dtype=torch.float32, device=device)
        per_tok[valid] = logp
        total = per_tok.sum(1)
        if average:
            total = total / valid.sum(1)
        result[:, c0 : c0 + g] = total.view(batch, g)
    return result


class TargetLogProb(torch.autograd.Function):
    """``log_softmax(logits / scale)[target]`` per row from raw (compute-dtype) logits (N, V).

    Equal to ``gather - logsumexp`` on the float32 scaled logits, but it keeps only the raw logits
    and the (N,) log-normalisers for backward, writes the logit gradient
    ``(onehot - softmax) * grad / scale`` straight into the compute dtype, and works on row blocks
    of :data:`ROW_BLOCK_ELEMS` so that no float32 temporary is as large as the logits.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)
        n, v = logits.shape
        lse = torch.empty(n, dtype=acc, device=logits.device)
        out = torch.empty(n, dtype=acc, device=logits.device)
        rows = max(1, ROW_BLOCK_ELEMS // max(v, 1))
        for i in range(0, n, rows):
            x = logits[i : i + rows].to(acc, copy=True).div_(scale)  # (rows, V)
            torch.logsumexp(x, dim=-1, out=lse[i : i + rows])
            out[i : i + rows] = x.gather(-1, targets[i : i + rows, None])[:, 0] - lse[i : i + rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        n, v = logits.shape
        g_all = (grad.to(lse.dtype) / ctx.scale)[:, None]  # (N, 1)
        out = torch.empty_like(logits)
        rows = max(1, ROW_BLOCK_ELEMS // max(v, 1))
        for i in range(0, n, rows):
            j = min(i + rows, n)
            g = g_all[i:j]
            x = logits[i:j].to(lse.dtype, copy=True).div_(ctx.scale).sub_(lse[i:j, None]).exp_()  # softmax
            x.mul_(-g).scatter_add_(1, targets[i:j, None], g)
            out[i:j] = x
        return out, None, None


def token_log_probs(network: UnifiedIONetwork, hidden: torch.Tensor, targets: torch.Tensor, modality: str,
                    max_logit_elems: int = 1 << 25) -> torch.Tensor:
    """log p(target) for hidden states (N, d) under the modality's masked softmax; targets are
    vocabulary ids for text, codes for images. Computed in chunks to bound the (N, V) float32
    buffers, through :class:`TargetLogProb`."""
    vsize = network.vocab.text_vocab_size if modality == "text" else network.vocab.image_vocab
    step = max(1, max_logit_elems // vsize)
    scale = math.sqrt(network.config.d_model)
    out = []
    for i in range(0, hidden.shape[0], step):
        logits = network.logits(hidden[i : i + step], modality, scaled=False)
        out.append(TargetLogProb.apply(logits, targets[i : i + step], scale))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


__all__ = ["GenerationOutput", "generate", "score_options", "token_log_probs", "top_p_filter", "sample_tokens",
           "used_length",
           "CachedStepper", "UncachedStepper", "TargetLogProb"]
