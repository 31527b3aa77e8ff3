"""The Unified-IO network: a T5 v1.1 encoder-decoder over text tokens, image patches and image codes.

Built exactly like the released model (``allenai/unified-io-inference``, ``uio/network.py``) so that
its weights load by renaming alone:

- encoder input: text ids (positions 0..Lt-1, segment 0) followed by the image's 16x16 patches,
  flattened in (row, col, channel) order and projected without bias (positions offset by
  ``encoder_max_text_len``, segment 1); separate RMSNorms for the text and image embeddings;
  masked patches (padding, inpainting) are excluded by the attention mask;
- decoder input: ``[text slots] + [image slots]``; text positions 0..Ld-1 (segment 0), image
  positions ``decoder_max_text_len + i`` (segment 1); then one RMSNorm (``pre_ln``);
- attention logits get: the -1e10 masks, the relative biases (:mod:`uio.modeling.position`) and the
  absolute-position bias; the decoder's cross-attention gets only the padding mask (the original's
  ``cross_position_{q,k}_linear`` are computed but never applied -- kept here as dead parameters so
  the checkpoint loads). That is a bug of the original (the bias is built, then dropped because its
  cross-attention passes ``bias=None``); ``ModelConfig.cross_position_bias=True`` applies it -- the
  decoder's normalised position embeddings against the encoder's, as in self-attention -- which
  gives every decoder image slot a learnable, content-free route to the encoder's patches. The
  released weights were trained without it, so it stays off for them;
- logits through the tied token table, divided by sqrt(d_model); text slots may only emit text
  ids (< ``text_vocab_size``), image slots only image ids (:meth:`UnifiedIONetwork.logits`).

Parameter names (PyTorch <-> Flax; every ``Linear.weight`` is the transposed Flax ``kernel``, every
RMSNorm ``weight`` the Flax ``scale``, every table ``weight`` the Flax ``embedding``)::

    token_embedder.weight                          token_embedder/embedding
    encoder.segment_embedding.weight               encoder/segment_embedding/embedding
    encoder.position_embedding.weight              encoder/position_embedding/embedding
    encoder.relpos_bias.rel_embedding              encoder/relpos_bias/rel_embedding
    encoder.relpos_bias.image_rel_embedding        encoder/relpos_bias/image_rel_embedding
    encoder.image_projection.weight                encoder/image_projection/kernel
    encoder.{txt_emb,img_emb,pe}_pre_ln.weight     encoder/{txt_emb,img_emb,pe}_pre_ln/scale
    encoder.position_{q,k}_linear.weight           encoder/position_{q,k}_linear/kernel
    encoder.layers.{i}.pre_attention_layer_norm    encoder/layers_{i}/pre_attention_layer_norm
    encoder.layers.{i}.attention.{query,key,value,out}   encoder/layers_{i}/attention/{...}
    encoder.layers.{i}.pre_mlp_layer_norm          encoder/layers_{i}/pre_mlp_layer_norm
    encoder.layers.{i}.mlp.{wi_0,wi_1,wo}          encoder/layers_{i}/mlp/{wi_0,wi_1,wo}
    encoder.encoder_norm.weight                    encoder/encoder_norm/scale
    decoder.relpos_bias.{rel,image_rel}_embedding  decoder/relpos_bias/...
    decoder.position_embedding.weight              decoder/position_embedding/embedding
    decoder.segments_embedding.weight              decoder/segments_embedding/embedding  (with an "s")
    decoder.{pre_ln,pe_pre_ln}.weight              decoder/{pre_ln,pe_pre_ln}/scale
    decoder.self_position_{q,k}_linear.weight      decoder/self_position_{q,k}_linear/kernel
    decoder.cross_position_{q,k}_linear.weight     decoder/cross_position_{q,k}_linear/kernel (dead)
    decoder.layers.{i}.pre_self_attention_layer_norm, .self_attention.{query,key,value,out},
    .pre_cross_attention_layer_norm, .encoder_decoder_attention.{...}, .pre_mlp_layer_norm,
    .mlp.{wi_0,wi_1,wo}                            decoder/layers_{i}/... (same names)
    decoder.decoder_norm.weight                    decoder/decoder_norm/scale

Construction allocates only; :meth:`UnifiedIONetwork.init_weights` initialises (so ``xl`` can be
built on the meta device). Deviation from the original: the query-side half of its padding masks
is dropped (a padded query row is never read), which lets the masks broadcast as (B, 1, 1, L).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uio.config import ModelConfig
from uio.modeling.layers import (NEG_INF, Attention, KVCache, MlpBlock, PackedWeight, RMSNorm, can_pack,
                                 init_attention_, init_mlp_, pack_linears, trunc_normal_fan_in_)
from uio.modeling.position import (RelativePositionBiases, absolute_position_bias, grid_sincos_table,
                                   init_embedding_, resize_position_embeddings, sincos_table)


def mask_to_bias(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask (True = attend) -> float32 additive bias (0 / -1e10)."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, NEG_INF)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, True) if p and training else x


# ================================================================================================
# Layers
# ================================================================================================
class EncoderLayer(nn.Module):
    """Pre-norm self-attention + gated-GELU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_attention_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attention = Attention(cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.dropout)
        self.pre_mlp_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.mlp = MlpBlock(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), bias (B, H, L, L) -> (B, L, d)."""
        h = self.attention(self.pre_attention_layer_norm(x), bias)
        x = x + _dropout(h, self.dropout, self.training)
        h = self.mlp(self.pre_mlp_layer_norm(x))
        return x + _dropout(h, self.dropout, self.training)


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, gated-GELU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, dh, p = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.dropout
        self.pre_self_attention_layer_norm = RMSNorm(d, cfg.layer_norm_eps)
        self.self_attention = Attention(d, h, dh, p)
        self.pre_cross_attention_layer_norm = RMSNorm(d, cfg.layer_norm_eps)
        self.encoder_decoder_attention = Attention(d, h, dh, p)
        self.pre_mlp_layer_norm = RMSNorm(d, cfg.layer_norm_eps)
        self.mlp = MlpBlock(d, cfg.d_ff, p)
        self.dropout = p

    def _cross_and_mlp(self, x: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
                       cross_bias: torch.Tensor) -> torch.Tensor:
        h = self.encoder_decoder_attention.cross(self.pre_cross_attention_layer_norm(x), cross_k, cross_v, cross_bias)
        x = x + _dropout(h, self.dropout, self.training)
        h = self.mlp(self.pre_mlp_layer_norm(x))
        return x + _dropout(h, self.dropout, self.training)

    def forward(self, y: torch.Tensor, self_bias: torch.Tensor, encoded: torch.Tensor,
                cross_bias: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass: y (B*G, L, d), self_bias (B*G, H, L, L), encoded (B, Le, d),
        cross_bias (B, 1, 1, Le) -> (B*G, L, d)."""
        h = self.self_attention(self.pre_self_attention_layer_norm(y), self_bias)
        y = y + _dropout(h, self.dropout, self.training)
        k, v = self.encoder_decoder_attention.project_kv(encoded)
        return self._cross_and_mlp(y, k, v, cross_bias)

    def forward_cached(self, y: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
                       self_bias: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
                       cross_bias: torch.Tensor) -> torch.Tensor:
        """Positions ``[start, start+n)`` of y (B*G, n, d) through the KV cache."""
        h = self.self_attention.prefill(self.pre_self_attention_layer_norm(y), cache_k, cache_v, start, self_bias)
        return self._cross_and_mlp(y + h, cross_k, cross_v, cross_bias)


# ================================================================================================
# Stacks
# ================================================================================================
@dataclass
class EncoderOutput:
    """``hidden`` (B, Lt+Li, d); ``mask`` (B, Lt+Li) bool (True = a real token/visible patch);
    ``image_ids`` (1|B, Li) the patch ids that were kept (None: all, in order); ``pos`` (1|B, Lt+Li, d)
    the normalised position embeddings of the tokens (for the cross-attention position bias)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    text_len: int
    image_ids: torch.Tensor | None = None
    pos: torch.Tensor | None = None


class Encoder(nn.Module):
    """Text + image-patch encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        d, inner = cfg.d_model, cfg.inner_dim
        self.segment_embedding = nn.Embedding(cfg.num_segments, d)
        self.position_embedding = nn.Embedding(cfg.encoder_max_text_len + cfg.encoder_max_image_len, d)
        self.relpos_bias = RelativePositionBiases(cfg.num_heads, cfg.rel_num_buckets, cfg.rel_max_distance,
                                                  cfg.img_rel_num_buckets, cfg.img_rel_max_distance)
        self.image_projection = nn.Linear(3 * cfg.patch_size**2, d, bias=False)
        self.txt_emb_pre_ln = RMSNorm(d, cfg.layer_norm_eps)
        self.img_emb_pre_ln = RMSNorm(d, cfg.layer_norm_eps)
        self.pe_pre_ln = RMSNorm(d, cfg.layer_norm_eps)
        self.position_q_linear = nn.Linear(d, inner, bias=False)
        self.position_k_linear = nn.Linear(d, inner, bias=False)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.encoder_norm = RMSNorm(d, cfg.layer_norm_eps)

    def image_position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """(gh*gw, d) image position embeddings, bicubically resized if ``grid`` differs from the
        configured patch grid."""
        cfg = self.config
        start = cfg.encoder_max_text_len
        table = self.position_embedding.weight[start : start + cfg.encoder_max_image_len]
        return resize_position_embeddings(table, cfg.patch_grid, tuple(grid))

    def forward(self, token_embedder: nn.Embedding, text_ids: torch.Tensor, patches: torch.Tensor,
                image_mask: torch.Tensor, image_ids: torch.Tensor | None, grid: tuple[int, int],
                text_emb: torch.Tensor | None = None) -> EncoderOutput:
        """text_ids (B, Lt), patches (B, Li, 3p^2), image_mask (B, Li) bool, image_ids (1|B, Li) row-major
        patch ids within ``grid`` (None = all patches in order); ``text_emb`` (B, Lt, d): the token
        embeddings of ``text_ids`` if already looked up."""
        cfg = self.config
        b, nt = text_ids.shape
        ni = patches.shape[1]
        seg = self.segment_embedding.weight
        pos_txt = self.position_embedding.weight[:nt][None]  # (1, Lt, d)
        x_txt = (token_embedder(text_ids) if text_emb is None else text_emb) + seg[0]
        x_txt = self.txt_emb_pre_ln(x_txt + pos_txt)
        if ni:
            table = self.image_position_table(grid)
            pos_img = table[None] if image_ids is None else table[image_ids]  # (1|B, Li, d)
            x_img = self.image_projection(patches) + seg[1]
            x_img = self.img_emb_pre_ln(x_img + pos_img)
            x = torch.cat([x_txt, x_img.to(x_txt.dtype)], dim=1)  # (B, Lt+Li, d)
            bp = pos_img.shape[0]
            pe = torch.cat([pos_txt.expand(bp, -1, -1), pos_img], dim=1)
        else:
            x, pe = x_txt, pos_txt
        mask = torch.cat([text_ids != 0, image_mask], dim=1)  # (B, L)
        pe = self.pe_pre_ln(pe)
        rel = self.relpos_bias(nt, image_ids, grid, bidirectional=True)  # (1|B, H, L, L)
        pos_bias = rel + absolute_position_bias(pe, self.position_q_linear, self.position_k_linear,
                                                cfg.num_heads, cfg.d_model)
        bias = mask_to_bias(mask)[:, None, None, :] + pos_bias  # (B, H, L, L)
        x = _dropout(x, cfg.dropout, self.training)
        for layer in self.layers:
            x = layer(x, bias)
        x = _dropout(self.encoder_norm(x), cfg.dropout, self.training)
        return EncoderOutput(x, mask, nt, image_ids, pe)


@dataclass
class DecoderState:
    """Everything incremental decoding keeps between steps (see :meth:`Decoder.init_state`)."""

    cache: KVCache
    cross_k: list[torch.Tensor]  # per layer (B, H, Le, Dh), shared by the G rows of a group
    cross_v: list[torch.Tensor]
    cross_bias: torch.Tensor  # (B, 1, 1, Le), or (B|1, H, L, Le) with the cross-attention position bias
    layout_bias: torch.Tensor  # (1, H, L, L) relative + absolute position bias of the slot layout
    positions: torch.Tensor  # (L,) position ids of the slots
    segments: torch.Tensor  # (L,) segment ids of the slots
    key_valid: torch.Tensor  # (B*G, L) bool: slots that later positions may attend to
    text_len: int
    length: int

    def reorder(self, index: torch.Tensor, upto: int) -> None:
        """Beam search: every row takes the state of row ``index[row]`` (first ``upto`` slots)."""
        self.cache.reorder(index, upto)
        self.key_valid[:, :upto] = self.key_valid[index, :upto]


class Decoder(nn.Module):
    """Text + image-code decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        d, inner = cfg.d_model, cfg.inner_dim
        self.relpos_bias = RelativePositionBiases(cfg.num_heads, cfg.rel_num_buckets, cfg.rel_max_distance,
                                                  cfg.img_rel_num_buckets, cfg.img_rel_max_distance)
        self.position_embedding = nn.Embedding(cfg.decoder_max_text_len + cfg.decoder_max_image_len, d)
        self.segments_embedding = nn.Embedding(cfg.num_segments, d)
        self.pre_ln = RMSNorm(d, cfg.layer_norm_eps)
        self.pe_pre_ln = RMSNorm(d, cfg.layer_norm_eps)
        self.self_position_q_linear = nn.Linear(d, inner, bias=False)
        self.self_position_k_linear = nn.Linear(d, inner, bias=False)
        # dead in the original (computed, never added to the logits); kept so checkpoints load
        self.cross_position_q_linear = nn.Linear(d, inner, bias=False)
        self.cross_position_k_linear = nn.Linear(d, inner, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.decoder_norm = RMSNorm(d, cfg.layer_norm_eps)

    # ---- slot layout --------------------------------------------------------------------------
    def layout(self, text_len: int, image_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Position and segment ids (L,) of ``text_len`` text slots followed by ``image_len`` image slots."""
        cfg = self.config
        positions = torch.cat([torch.arange(text_len, device=device),
                               cfg.decoder_max_text_len + torch.arange(image_len, device=device)])
        segments = torch.cat([torch.zeros(text_len, dtype=torch.long, device=device),
                              torch.ones(image_len, dtype=torch.long, device=device)])
        return positions, segments

    def layout_bias(self, text_len: int, image_len: int) -> torch.Tensor:
        """(1, H, L, L): causal-text relative buckets, 2-D image buckets, absolute position bias."""
        cfg = self.config
        device = self.position_embedding.weight.device
        positions, _ = self.layout(text_len, image_len, device)
        pe = self.pe_pre_ln(self.position_embedding(positions)[None])  # (1, L, d)
        grid = cfg.image_target_grid
        ids = None if image_len == grid[0] * grid[1] else torch.arange(image_len, device=device)[None]
        rel = self.relpos_bias(text_len, ids, grid, bidirectional=False)
        return rel + absolute_position_bias(pe, self.self_position_q_linear, self.self_position_k_linear,
                                            cfg.num_heads, cfg.d_model)

    def embed(self, token_embedder: nn.Embedding, ids: torch.Tensor, positions: torch.Tensor,
              segments: torch.Tensor, token_emb: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, n) -> pre_ln(token + position + segment) (B, n, d)."""
        y = (token_embedder(ids) if token_emb is None else token_emb) + self.position_embedding(positions)
        y = self.pre_ln(y + self.segments_embedding(segments))
        return _dropout(y, self.config.dropout, self.training)

    def cross_bias(self, enc: EncoderOutput, positions: torch.Tensor) -> torch.Tensor:
        """Cross-attention logit bias for decoder slots at ``positions`` (L,): the padding mask
        (B, 1, 1, Le), plus with ``cross_position_bias`` the absolute position bias (B|1, H, L, Le)."""
        bias = mask_to_bias(enc.mask)[:, None, None, :]
        cfg = self.config
        if not cfg.cross_position_bias:
            return bias
        if enc.pos is None:
            raise ValueError("cross_position_bias needs the encoder's position embeddings (EncoderOutput.pos)")
        pe = self.pe_pre_ln(self.position_embedding(positions)[None])  # (1, L, d)
        return bias + absolute_position_bias(pe, self.cross_position_q_linear, self.cross_position_k_linear,
                                             cfg.num_heads, cfg.d_model, kv_pos_emb=enc.pos.to(pe.dtype))

    # ---- teacher forcing ----------------------------------------------------------------------
    def forward(self, token_embedder: nn.Embedding, input_ids: torch.Tensor, text_len: int,
                key_valid: torch.Tensor, enc: EncoderOutput, input_emb: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B*G, L) with ``text_len`` text slots first; key_valid (B*G, L) bool.

        The G decoder rows of a group share encoder row ``b`` (answer options, beams).
        Returns final hidden states (B*G, L, d).
        """
        bg, length = input_ids.shape
        device = input_ids.device
        positions, segments = self.layout(text_len, length - text_len, device)
        y = self.embed(token_embedder, input_ids, positions, segments, input_emb)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril_()
        self_bias = mask_to_bias(causal[None] & key_valid[:, None, :])[:, None]  # (B*G, 1, L, L)
        self_bias = self_bias + self.layout_bias(text_len, length - text_len)  # (B*G, H, L, L)
        cross_bias = self.cross_bias(enc, positions)  # (B, 1, 1, Le) or (B|1, H, L, Le)
        for layer in self.layers:
            y = layer(y, self_bias, enc.hidden, cross_bias)
        return _dropout(self.decoder_norm(y), self.config.dropout, self.training)

    # ---- incremental decoding -----------------------------------------------------------------
    def init_state(self, enc: EncoderOutput, rows: int, text_len: int, image_len: int) -> DecoderState:
        """A zeroed static cache for ``rows`` (= B*G) sequences of ``text_len + image_len`` slots,
        with the cross-attention keys/values of ``enc`` projected once."""
        cfg = self.config
        b = enc.hidden.shape[0]
        if rows % b:
            raise ValueError(f"{rows} decoding rows do not group over {b} encoder rows")
        length = text_len + image_len
        device = enc.hidden.device
        w = self.layers[0].self_attention.key.weight
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else w.dtype
        cache = KVCache.empty(len(self.layers), rows, cfg.num_heads, length, cfg.head_dim, dtype, device)
        # contiguous (B, H, Le, Dh): every step reads them as batched matrices, and the head-transposed
        # views of project_kv would be copied at every step
        cross = [tuple(t.contiguous() for t in layer.encoder_decoder_attention.project_kv(enc.hidden))
                 for layer in self.layers]
        positions, segments = self.layout(text_len, image_len, device)
        return DecoderState(
            cache=cache, cross_k=[k for k, _ in cross], cross_v=[v for _, v in cross],
            cross_bias=self.cross_bias(enc, positions), layout_bias=self.layout_bias(text_len, image_len),
            positions=positions, segments=segments,
            key_valid=torch.zeros(rows, length, dtype=torch.bool, device=device), text_len=text_len, length=length)

    def forward_cached(self, token_embedder: nn.Embedding, state: DecoderState, ids: torch.Tensor, start: int,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ids (B*G, n) into slots ``[start, start+n)``; returns hidden (B*G, n, d).

        ``valid`` (B*G, n) bool marks which of these slots later positions may attend to (a text
        slot fed after the row's EOS is not); default all.
        """
        n = ids.shape[1]
        end = start + n
        if end > state.length:
            raise ValueError(f"decoder slots [{start}, {end}) exceed the cache length {state.length}")
        if valid is None:
            state.key_valid[:, start:end] = True
        else:
            state.key_valid[:, start:end] = valid
        y = self.embed(token_embedder, ids, state.positions[start:end], state.segments[start:end])
        allowed = state.key_valid[:, None, None, :end]  # (B*G, 1, 1, end)
        if n > 1:
            q_pos = torch.arange(start, end, device=ids.device)[:, None]
            allowed = allowed & (torch.arange(end, device=ids.device)[None, :] <= q_pos)  # (B*G, 1, n, end)
        bias = mask_to_bias(allowed) + state.layout_bias[:, :, start:end, :end]
        cross_bias = state.cross_bias
        if cross_bias.shape[2] > 1:  # per-slot position bias: these slots' rows
            cross_bias = cross_bias[:, :, start:end]
        for i, layer in enumerate(self.layers):
            y = layer.forward_cached(y, state.cache.keys[i], state.cache.values[i], start, bias,
                                     state.cross_k[i], state.cross_v[i], cross_bias)
        return self.decoder_norm(y)


class _RowSliceLinear(torch.autograd.Function):
    """``F.linear(x, weight[start:end])`` whose weight gradient is built in one full-size buffer
    (zeroing only the rows outside the slice) instead of slice-backward's zero-fill of the whole
    table plus a copy: the tied table is the largest tensor of the model."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        w = weight[start:end]
        with torch.autocast(device, enabled=False):
            if dtype is not None:  # cast once and keep the cast table for backward
                x, w = x.to(dtype), w.to(dtype)
            else:
                dtype = torch.promote_types(x.dtype, w.dtype)
                x, w = x.to(dtype), w.to(dtype)
            out = F.linear(x, w)
        ctx.save_for_backward(x, w)
        ctx.meta = (start, end, weight.shape, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors  # both in the compute dtype
        start, end, shape, wdtype = ctx.meta
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w).view(*x.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty(shape, dtype=wdtype, device=w.device)
            grad_w[:start].zero_()
            grad_w[end:].zero_()
            part = g.t() @ x.reshape(-1, x.shape[-1])  # (end-start, d)
            grad_w[start:end].copy_(part)
        return grad_x, grad_w, None, None


# ================================================================================================
# The network
# ================================================================================================
class UnifiedIONetwork(nn.Module):
    """Token table + encoder + decoder. Inputs are tensors; :class:`uio.Model` handles batches."""

    block_classes = (EncoderLayer, DecoderLayer)  # FSDP / activation-checkpointing units

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vocab = config.vocab
        self.token_embedder = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self._packed_head: dict[tuple[int, int], PackedWeight] = {}  # see pack_for_decoding

    # ---- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """T5X / Mesh-TF initialisation (separate from construction, so meta-device builds work):
        tables N(0, 1); attention fan-in normal with the query divided by sqrt(head_dim); MLP,
        image projection and position q/k projections fan-in truncated normal; relative tables
        fan-avg uniform; norms 1."""
        for emb in (self.token_embedder, self.encoder.segment_embedding, self.encoder.position_embedding,
                    self.decoder.segments_embedding, self.decoder.position_embedding):
            init_embedding_(emb.weight)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()
            elif isinstance(m, RelativePositionBiases):
                m.reset_parameters()
            elif isinstance(m, Attention):
                init_attention_(m)
            elif isinstance(m, MlpBlock):
                init_mlp_(m)
        for lin in (self.encoder.image_projection, self.encoder.position_q_linear, self.encoder.position_k_linear,
                    self.decoder.self_position_q_linear, self.decoder.self_position_k_linear,
                    self.decoder.cross_position_q_linear, self.decoder.cross_position_k_linear):
            trunc_normal_fan_in_(lin.weight, lin.in_features)
        if self.config.sincos_init:
            self.init_sincos_()

    @torch.no_grad()
    def init_sincos_(self) -> None:
        """Overwrite three tables with sin-cos codes in location-bin units (``sincos_init``):

        - the encoder's image position rows: :func:`grid_sincos_table` of the patch grid;
        - the decoder's image-slot position rows: the same of the image-target grid (the slot over a
          patch starts with that patch's code, which the cross-attention position bias can match);
        - the location tokens: bin ``b`` gets ``[s(b), s(b)]`` with ``s`` the 1-D code of each half,
          so a patch code and the bins of its x (or y) coordinate start correlated.

        The original draws all three N(0, 1), so nothing but the embedding of a position ties a
        patch to a bin: from scratch, a model learns that link for each patch and each of the 1000
        bins separately, slowly (README, Training). Sin-cos codes are smooth in the coordinate, so
        what is learnt about one bin carries to its neighbours."""
        cfg, vocab = self.config, self.vocab
        d, span = cfg.d_model, float(vocab.num_loc_bins)
        if d % 4:
            raise ValueError(f"sincos_init needs d_model divisible by 4, got {d}")
        enc = self.encoder.position_embedding.weight
        start = cfg.encoder_max_text_len
        enc[start : start + cfg.encoder_max_image_len] = grid_sincos_table(cfg.patch_grid, d, span).to(enc)
        dec = self.decoder.position_embedding.weight
        start = cfg.decoder_max_text_len
        dec[start : start + cfg.decoder_max_image_len] = grid_sincos_table(cfg.image_target_grid, d, span).to(dec)
        bins = torch.arange(vocab.num_loc_bins)
        half = sincos_table(bins, d // 2, span)
        tok = self.token_embedder.weight
        tok[vocab.loc_id(bins)] = torch.cat([half, half], dim=1).to(tok)

    # ---- encoder ------------------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> (B, gh*gw, p*p*3) patches in the original's (row, col, channel) order."""
        p = self.config.patch_size
        b, c, h, w = images.shape
        if h % p or w % p:
            raise ValueError(f"image height and width must be multiples of the patch size {p}, got {h}x{w}")
        gh, gw = h // p, w // p
        x = images.view(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
        return x.reshape(b, gh * gw, p * p * c), (gh, gw)

    @staticmethod
    def select_patches(mask: torch.Tensor, num_patches: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Which patches enter the encoder: (1|B, n) sorted patch ids, or None for all of them.

        Without ``num_patches``: every patch visible in at least one row (dropping patches that
        are masked in every row changes no valid output, because masked keys get exactly zero
        attention). With ``num_patches``: per row, a random subset of that many patches, drawn
        from the visible ones first (training-time subsampling; ids keep their positions).
        """
        b, total = mask.shape
        if num_patches is not None:
            if not 0 < num_patches <= total:
                raise ValueError(f"num_patches must be in [1, {total}] (the number of patches), got {num_patches}")
            device = generator.device if generator is not None else mask.device
            scores = torch.rand(b, total, generator=generator, device=device).to(mask.device)
            scores = scores + (~mask).float() * 2.0  # invisible patches only when visible ones run out
            ids = scores.topk(num_patches, dim=1, largest=False).indices
            return ids.sort(dim=1).values
        keep = mask.any(0)
        if bool(keep.all()):
            return None
        return keep.nonzero().flatten()[None]

    def encode(self, text_inputs: torch.Tensor, image_inputs: torch.Tensor | None = None,
               image_input_masks: torch.Tensor | None = None, num_patches: int | None = None,
               generator: torch.Generator | None = None, text_emb: torch.Tensor | None = None) -> EncoderOutput:
        """text_inputs (B, Lt) int64 (0 = pad), image_inputs (B, 3, H, W) normalised or None,
        image_input_masks (B, P) bool (None = all visible); ``text_emb``: precomputed token embeddings."""
        b = text_inputs.shape[0]
        if image_inputs is None:
            patches = self.token_embedder.weight.new_zeros(b, 0, 3 * self.config.patch_size**2)
            mask = torch.zeros(b, 0, dtype=torch.bool, device=text_inputs.device)
            return self.encoder(self.token_embedder, text_inputs, patches, mask, None, (0, 0), text_emb)
        patches, grid = self.patchify(image_inputs)
        if image_input_masks is None:
            image_input_masks = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        ids = self.select_patches(image_input_masks, num_patches, generator)
        if ids is not None:
            if ids.shape[0] == 1:
                patches, image_input_masks = patches[:, ids[0]], image_input_masks[:, ids[0]]
            else:
                patches = torch.gather(patches, 1, ids[:, :, None].expand(-1, -1, patches.shape[-1]))
                image_input_masks = torch.gather(image_input_masks, 1, ids)
        return self.encoder(self.token_embedder, text_inputs, patches, image_input_masks, ids, grid, text_emb)

    # ---- decoder ------------------------------------------------------------------------------
    def decode(self, enc: EncoderOutput, input_ids: torch.Tensor, text_len: int,
               key_valid: torch.Tensor, input_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced decoder hidden states (B*G, L, d); see :meth:`Decoder.forward`."""
        return self.decoder(self.token_embedder, input_ids, text_len, key_valid, enc, input_emb)

    def embed_tokens(self, *ids: torch.Tensor) -> list[torch.Tensor]:
        """Token embeddings of several id tensors through one lookup. The table is tied to the
        logits, so every separate lookup costs a full-table gradient buffer in backward; one
        lookup for the encoder and decoder inputs saves one."""
        flat = torch.cat([i.reshape(-1) for i in ids])
        emb = self.token_embedder(flat)
        out, start = [], 0
        for i in ids:
            out.append(emb[start : start + i.numel()].view(*i.shape, -1))
            start += i.numel()
        return out

    def logits(self, hidden: torch.Tensor, modality: str | None = None, scaled: bool = True) -> torch.Tensor:
        """Float32 logits ``hidden @ E^T / sqrt(d_model)``.

        ``modality="text"``: only the text ids (size ``text_vocab_size``), ``"image"``: only the
        image ids (index = code), None: the whole vocabulary (unmasked). ``scaled=False``: the raw
        ``hidden @ E^T`` in the compute dtype (for fused losses that scale in float32 themselves).
        """
        w = self.token_embedder.weight
        if modality == "text":
            start, end = 0, self.vocab.text_vocab_size
        elif modality == "image":
            start, end = self.vocab.image_offset, w.shape[0]
        elif modality is None:
            start, end = 0, w.shape[0]
        else:
            raise ValueError(f"modality must be 'text', 'image' or None, got {modality!r}")
        if torch.is_grad_enabled() and w.requires_grad and (start, end) != (0, w.shape[0]):
            logits = _RowSliceLinear.apply(hidden, w, start, end)
        else:
            packed = self._packed_head.get((start, end))
            if packed is not None and not torch.is_grad_enabled() and hidden.dtype == w.dtype and packed.valid_for(w):
                logits = packed(hidden)
            else:
                logits = F.linear(hidden, w[start:end])
        if not scaled:
            return logits
        return logits.float() / math.sqrt(self.config.d_model)

    def pack_for_decoding(self) -> bool:
        """Make (or refresh) oneDNN-packed copies of the decoder's projections and of the text and
        image logit tables, used by no-grad calls (:class:`uio.modeling.layers.PackedWeight`).
        Only for bf16 weights on CPU, where it about halves the time of a batch-1 decoding step;
        returns False (nothing packed) otherwise. Costs one extra copy of those weights."""
        w = self.token_embedder.weight
        if not can_pack(w):
            return False
        pack_linears(self.decoder)
        for start, end in ((0, self.vocab.text_vocab_size), (self.vocab.image_offset, w.shape[0])):
            packed = self._packed_head.get((start, end))
            if packed is None or not packed.valid_for(w):
                self._packed_head[(start, end)] = PackedWeight(w, start, end)
        return True

    def drop_packed(self) -> None:
        """Free the packed copies made by :meth:`pack_for_decoding` (the next ``generate`` remakes them)."""
        self._packed_head.clear()
        for m in self.modules():
            if getattr(m, "packed", None) is not None:
                m.packed = None

    def masked_logits(self, hidden: torch.Tensor, text_len: int) -> torch.Tensor:
        """Full-vocabulary logits (B, L, V) with the modality masks: slots ``< text_len`` get -1e10
        on image ids, later slots -1e10 on text ids (the original ``Transformer.decode``)."""
        logits = self.logits(hidden)
        split = self.vocab.image_offset
        logits[:, :text_len, split:] = NEG_INF
        logits[:, text_len:, :split] = NEG_INF
        return logits

    def forward(self, text_inputs: torch.Tensor, image_inputs: torch.Tensor | None,
                image_input_masks: torch.Tensor | None, decoder_inputs: torch.Tensor, text_len: int,
                decoder_masks: torch.Tensor | None = None) -> torch.Tensor:
        """End-to-end teacher forcing: masked logits (B, L, V) for ``decoder_inputs`` (B, L) whose
        first ``text_len`` slots are text. ``decoder_masks`` (B, L) bool: valid decoder slots."""
        enc = self.encode(text_inputs, image_inputs, image_input_masks)
        if decoder_masks is None:
            decoder_masks = torch.ones_like(decoder_inputs, dtype=torch.bool)
        return self.masked_logits(self.decode(enc, decoder_inputs, text_len, decoder_masks), text_len)
