"""The released Unified-IO parameter tree and its mapping onto :class:`uio.Model`.

The original (``allenai/unified-io-inference``, ``uio/network.py``) stores one Flax tree with four
top-level modules. Names and storage layouts (``/`` separates modules; ``d`` = emb_dim, ``I`` =
heads*head_dim, ``F`` = mlp_dim, ``V`` = 33152 + 16384)::

    token_embedder/embedding                          (V, d)      shared input table and logit head
    encoder/segment_embedding/embedding               (S, d)
    encoder/position_embedding/embedding              (256+576, d) text ids 0.., image ids 256..
    encoder/relpos_bias/{rel_embedding (H, 32), image_rel_embedding (H, 256)}
    encoder/image_projection/kernel                   (16*16*3, d) rows in space_to_depth order (ph, pw, c)
    encoder/{txt_emb_pre_ln,img_emb_pre_ln,pe_pre_ln,encoder_norm}/scale          (d,)
    encoder/position_{q,k}_linear/kernel              (d, I)
    encoder/layers_{i}/{pre_attention_layer_norm,pre_mlp_layer_norm}/scale
    encoder/layers_{i}/attention/{query,key,value}/kernel (d, I), out/kernel (I, d)
    encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel (d, F), wo/kernel (F, d)
    decoder/position_embedding/embedding              (256+256, d)
    decoder/segments_embedding/embedding              (S, d)      (with an "s", unlike the encoder)
    decoder/relpos_bias/...                           as in the encoder
    decoder/{pre_ln,pe_pre_ln,decoder_norm}/scale
    decoder/{self,cross}_position_{q,k}_linear/kernel (d, I)      cross_* are dead in the original
    decoder/layers_{i}/{pre_self_attention_layer_norm,pre_cross_attention_layer_norm,pre_mlp_layer_norm}/scale
    decoder/layers_{i}/{self_attention,encoder_decoder_attention}/{query,key,value,out}/kernel
    decoder/layers_{i}/mlp/...
    discrete_vae/{encoder,decoder}/...                taming's VQ-GAN, renamed (see _vqgan_key)
    discrete_vae/{quant_conv,post_quant_conv}/{kernel (1,1,in,out), bias}
    discrete_vae/quantize/embedding                   (16384, 256)

Layout changes on the way to PyTorch: every Dense kernel ``(in, out)`` is transposed into a
``Linear.weight`` ``(out, in)``; convolution kernels go HWIO -> OIHW; ``scale`` becomes ``weight``;
the patch projection's rows are reordered from the original ``(ph, pw, c)`` flattening to the
patch stem's layout; the VQ-GAN's ``down_{i}_block_{j}`` becomes ``down.{i}.block.{j}`` and its
decoder's ``up_{k}`` (k = 0 is the *lowest* resolution) becomes taming's ``up.{levels-1-k}``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from uio.config import SIZES, ModelConfig
from uio.convert.flax_msgpack import ArrayRef, FlaxMsgpackFile, iter_flat
from uio.image_tokenizer.vqgan import VQGANConfig
from uio.vocab import Vocab

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Layout transforms (source tensor in the original layout -> tensor in the uio layout)
# ------------------------------------------------------------------------------------------------
Transform = Callable[[torch.Tensor], torch.Tensor]


def t_copy(x: torch.Tensor) -> torch.Tensor:
    return x


def t_dense(x: torch.Tensor) -> torch.Tensor:
    """Flax Dense kernel (in, out) -> torch Linear weight (out, in)."""
    if x.dim() != 2:
        raise ValueError(f"a Dense kernel must be 2-D (in, out), got shape {tuple(x.shape)}")
    return x.t()


def t_conv(x: torch.Tensor) -> torch.Tensor:
    """Flax Conv kernel (kh, kw, in, out) -> torch Conv2d weight (out, in, kh, kw)."""
    if x.dim() != 4:
        raise ValueError(f"a Conv kernel must be 4-D (kh, kw, in, out), got shape {tuple(x.shape)}")
    return x.permute(3, 2, 0, 1)


@dataclass(frozen=True)
class Rule:
    """One target tensor: where it comes from in the original tree and how its layout changes."""

    target: str  # key in the uio model's state_dict
    source: str  # "/"-joined path in the original tree
    transform: Transform
    note: str = ""


# ------------------------------------------------------------------------------------------------
# The original tree: names and shapes for a configuration
# ------------------------------------------------------------------------------------------------
def original_vqgan_shapes(v: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Names (relative to ``discrete_vae``) and shapes of the original JAX VQ-GAN's parameters."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, k: int, cin: int, cout: int) -> None:
        out[f"{name}/kernel"] = (k, k, cin, cout)
        out[f"{name}/bias"] = (cout,)

    def norm(name: str, c: int) -> None:
        out[f"{name}/scale"] = (c,)
        out[f"{name}/bias"] = (c,)

    def resblock(name: str, cin: int, cout: int) -> None:
        norm(f"{name}/norm1", cin)
        conv(f"{name}/conv1", 3, cin, cout)
        norm(f"{name}/norm2", cout)
        conv(f"{name}/conv2", 3, cout, cout)
        if cin != cout:
            conv(f"{name}/nin_shortcut", 1, cin, cout)

    def attn(name: str, c: int) -> None:
        norm(f"{name}/norm", c)
        for m in ("q", "k", "v", "proj_out"):
            conv(f"{name}/{m}", 1, c, c)

    levels = len(v.ch_mult)
    in_mult = (1, *v.ch_mult)
    # encoder
    conv("encoder/conv_in", 3, v.in_channels, v.ch)
    res = v.resolution
    block_in = v.ch
    for i in range(levels):
        block_in, block_out = v.ch * in_mult[i], v.ch * v.ch_mult[i]
        for j in range(v.num_res_blocks):
            resblock(f"encoder/down_{i}_block_{j}", block_in, block_out)
            block_in = block_out
            if res in v.attn_resolutions:
                attn(f"encoder/down_{i}_attn_{j}", block_in)
        if i != levels - 1:
            conv(f"encoder/down_{i}_downsample/conv", 3, block_in, block_in)
            res //= 2
    resblock("encoder/mid_block_1", block_in, block_in)
    attn("encoder/mid_attn_1", block_in)
    resblock("encoder/mid_block_2", block_in, block_in)
    norm("encoder/norm_out", block_in)
    conv("encoder/conv_out", 3, block_in, v.z_channels)
    # quantiser
    conv("quant_conv", 1, v.z_channels, v.embed_dim)
    out["quantize/embedding"] = (v.n_embed, v.embed_dim)
    conv("post_quant_conv", 1, v.embed_dim, v.z_channels)
    # decoder (up_{k}: k = 0 is the lowest resolution, the first to run)
    block_in = v.ch * v.ch_mult[-1]
    res = v.resolution // 2 ** (levels - 1)
    conv("decoder/conv_in", 3, v.z_channels, block_in)
    resblock("decoder/mid_block_1", block_in, block_in)
    attn("decoder/mid_attn_1", block_in)
    resblock("decoder/mid_block_2", block_in, block_in)
    for i_level in reversed(range(levels)):
        k = levels - 1 - i_level
        block_out = v.ch * v.ch_mult[i_level]
        for j in range(v.num_res_blocks + 1):
            resblock(f"decoder/up_{k}_block_{j}", block_in, block_out)
            block_in = block_out
            if res in v.attn_resolutions:
                attn(f"decoder/up_{k}_attn_{j}", block_in)
        if i_level != 0:
            conv(f"decoder/up_{k}_upsample/conv", 3, block_in, block_in)
            res *= 2
    norm("decoder/norm_out", block_in)
    conv("decoder/conv_out", 3, block_in, v.out_ch)
    return out


def original_transformer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the original transformer's parameters (everything but ``discrete_vae``)."""
    d, inner, f, h = c.d_model, c.inner_dim, c.d_ff, c.num_heads
    img_buckets = 4 * c.img_rel_num_buckets**2
    out: dict[str, tuple[int, ...]] = {"token_embedder/embedding": (c.vocab_size, d)}
    e = "encoder"
    out[f"{e}/segment_embedding/embedding"] = (c.num_segments, d)
    out[f"{e}/position_embedding/embedding"] = (c.encoder_max_text_len + c.encoder_max_image_len, d)
    out[f"{e}/relpos_bias/rel_embedding"] = (h, c.rel_num_buckets)
    out[f"{e}/relpos_bias/image_rel_embedding"] = (h, img_buckets)
    out[f"{e}/image_projection/kernel"] = (c.patch_size * c.patch_size * 3, d)
    for n in ("txt_emb_pre_ln", "img_emb_pre_ln", "pe_pre_ln"):
        out[f"{e}/{n}/scale"] = (d,)
    out[f"{e}/position_q_linear/kernel"] = (d, inner)
    out[f"{e}/position_k_linear/kernel"] = (d, inner)

    def attention(prefix: str) -> None:
        for n in ("query", "key", "value"):
            out[f"{prefix}/{n}/kernel"] = (d, inner)
        out[f"{prefix}/out/kernel"] = (inner, d)

    def mlp(prefix: str) -> None:
        out[f"{prefix}/wi_0/kernel"] = (d, f)
        out[f"{prefix}/wi_1/kernel"] = (d, f)
        out[f"{prefix}/wo/kernel"] = (f, d)

    for i in range(c.num_encoder_layers):
        p = f"{e}/layers_{i}"
        out[f"{p}/pre_attention_layer_norm/scale"] = (d,)
        attention(f"{p}/attention")
        out[f"{p}/pre_mlp_layer_norm/scale"] = (d,)
        mlp(f"{p}/mlp")
    out[f"{e}/encoder_norm/scale"] = (d,)

    g = "decoder"
    out[f"{g}/relpos_bias/rel_embedding"] = (h, c.rel_num_buckets)
    out[f"{g}/relpos_bias/image_rel_embedding"] = (h, img_buckets)
    out[f"{g}/position_embedding/embedding"] = (c.decoder_max_text_len + c.decoder_max_image_len, d)
    out[f"{g}/segments_embedding/embedding"] = (c.num_segments, d)
    out[f"{g}/pre_ln/scale"] = (d,)
    out[f"{g}/pe_pre_ln/scale"] = (d,)
    for n in ("self_position_q_linear", "self_position_k_linear", "cross_position_q_linear",
              "cross_position_k_linear"):
        out[f"{g}/{n}/kernel"] = (d, inner)
    for i in range(c.num_decoder_layers):
        p = f"{g}/layers_{i}"
        out[f"{p}/pre_self_attention_layer_norm/scale"] = (d,)
        attention(f"{p}/self_attention")
        out[f"{p}/pre_cross_attention_layer_norm/scale"] = (d,)
        attention(f"{p}/encoder_decoder_attention")
        out[f"{p}/pre_mlp_layer_norm/scale"] = (d,)
        mlp(f"{p}/mlp")
    out[f"{g}/decoder_norm/scale"] = (d,)
    return out


def original_shapes(config: ModelConfig, vqgan: VQGANConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter of an original checkpoint for ``config`` (and its VQ-GAN), path -> shape."""
    out = original_transformer_shapes(config)
    if vqgan is not None:
        out.update({f"discrete_vae/{k}": s for k, s in original_vqgan_shapes(vqgan).items()})
    return out


# ------------------------------------------------------------------------------------------------
# VQ-GAN names: original -> taming
# ------------------------------------------------------------------------------------------------
_VQ_MODULE = [
    (re.compile(r"down_(\d+)_block_(\d+)"), lambda m, L: f"down.{m[1]}.block.{m[2]}"),
    (re.compile(r"down_(\d+)_attn_(\d+)"), lambda m, L: f"down.{m[1]}.attn.{m[2]}"),
    (re.compile(r"down_(\d+)_downsample"), lambda m, L: f"down.{m[1]}.downsample"),
    (re.compile(r"up_(\d+)_block_(\d+)"), lambda m, L: f"up.{L - 1 - int(m[1])}.block.{m[2]}"),
    (re.compile(r"up_(\d+)_attn_(\d+)"), lambda m, L: f"up.{L - 1 - int(m[1])}.attn.{m[2]}"),
    (re.compile(r"up_(\d+)_upsample"), lambda m, L: f"up.{L - 1 - int(m[1])}.upsample"),
    (re.compile(r"mid_(block_1|attn_1|block_2)"), lambda m, L: f"mid.{m[1]}"),
]


def _vqgan_key(rel: str, ndim: int, levels: int) -> tuple[str, Transform]:
    """``encoder/down_0_block_1/conv1/kernel`` -> (``encoder.down.0.block.1.conv1.weight``, HWIO->OIHW)."""
    *mods, leaf = rel.split("/")
    if rel == "quantize/embedding":
        return "quantize.embedding.weight", t_copy
    parts = []
    for m in mods:
        for pattern, fmt in _VQ_MODULE:
            hit = pattern.fullmatch(m)
            if hit:
                parts.append(fmt(hit, levels))
                break
        else:
            parts.append(m)
    if leaf == "kernel":
        return ".".join(parts + ["weight"]), t_conv
    if leaf == "scale":  # GroupNorm
        return ".".join(parts + ["weight"]), t_copy
    if leaf == "bias":
        return ".".join(parts + ["bias"]), t_copy
    raise KeyError(rel)


def vqgan_rules(source_shapes: Mapping[str, tuple[int, ...]], prefix: str = "discrete_vae",
                target_prefix: str = "") -> list[Rule]:
    """Rules for every ``discrete_vae/...`` tensor (paths in ``source_shapes``)."""
    levels = vqgan_levels(source_shapes, prefix)
    rules = []
    for path, shape in source_shapes.items():
        if not path.startswith(prefix + "/"):
            continue
        rel = path[len(prefix) + 1:]
        try:
            key, fn = _vqgan_key(rel, len(shape), levels)
        except KeyError:
            continue  # left for the unused-source check to report
        rules.append(Rule(target_prefix + key, path, fn))
    return rules


def vqgan_levels(source_shapes: Mapping[str, Any], prefix: str = "discrete_vae") -> int:
    """Number of resolution levels = number of distinct ``encoder/down_{i}_*`` indices."""
    pat = re.compile(re.escape(prefix) + r"/encoder/down_(\d+)_")
    found = {int(m[1]) for p in source_shapes if (m := pat.match(p))}
    if not found:
        raise ValueError(f"no '{prefix}/encoder/down_*' parameters: the checkpoint has no VQ-GAN encoder")
    if found != set(range(len(found))):
        raise ValueError(f"VQ-GAN encoder levels {sorted(found)} are not consecutive from 0")
    return len(found)


# ------------------------------------------------------------------------------------------------
# Configuration inference
# ------------------------------------------------------------------------------------------------
def _shape(shapes: Mapping[str, tuple[int, ...]], path: str) -> tuple[int, ...]:
    if path not in shapes:
        raise ValueError(f"the checkpoint has no '{path}'; is this a Unified-IO (v1) checkpoint? "
                         f"top-level modules found: {sorted({p.split('/')[0] for p in shapes})}")
    return tuple(shapes[path])


def infer_vqgan_config(shapes: Mapping[str, tuple[int, ...]], resolution: int,
                       prefix: str = "discrete_vae") -> VQGANConfig:
    """Read the VQ-GAN's architecture off its parameter shapes.

    ``resolution`` (the nominal image size, 256 in the release) is not stored in the weights; the
    attention levels are recovered as ``resolution / 2**level`` for levels that have ``down_*_attn``.
    """
    p = prefix + "/"
    levels = vqgan_levels(shapes, prefix)
    kh, kw, in_channels, ch = _shape(shapes, p + "encoder/conv_in/kernel")
    num_res_blocks = len({m[1] for s in shapes if (m := re.fullmatch(re.escape(p) + r"encoder/down_0_block_(\d+)/.*", s))})
    ch_mult = []
    for i in range(levels):
        cout = _shape(shapes, p + f"encoder/down_{i}_block_0/conv1/kernel")[3]
        if cout % ch:
            raise ValueError(f"VQ-GAN level {i} has {cout} channels, not a multiple of conv_in's {ch}")
        ch_mult.append(cout // ch)
    attn = tuple(resolution // 2**i for i in range(levels) if p + f"encoder/down_{i}_attn_0/norm/scale" in shapes)
    z_channels = _shape(shapes, p + "encoder/conv_out/kernel")[3]
    n_embed, embed_dim = _shape(shapes, p + "quantize/embedding")
    out_ch = _shape(shapes, p + "decoder/conv_out/kernel")[3]
    return VQGANConfig(ch=ch, out_ch=out_ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                       attn_resolutions=attn, in_channels=in_channels, resolution=resolution,
                       z_channels=z_channels, embed_dim=embed_dim, n_embed=n_embed)


def infer_config(shapes: Mapping[str, tuple[int, ...]], text_vocab: int | None = None,
                 encoder_max_text_len: int = 256, decoder_max_text_len: int = 256) -> ModelConfig:
    """Read a :class:`ModelConfig` (with its VQ-GAN spec) off the parameter shapes of an original tree.

    Widths, depths, heads, head_dim, MLP width, segments, bucket counts, patch size, the patch
    grid, the decoder's image grid and the VQ-GAN all follow from the shapes. Two things do not:
    the text/image split of the position tables (the release uses 256 text positions in both
    stacks; pass others if yours differ) and the SentencePiece size N inside the padded text
    vocabulary (T5's 32000 when it fits, else pass ``text_vocab`` -- e.g. from the spiece.model).
    """
    s = shapes
    v_total, d = _shape(s, "token_embedder/embedding")
    heads, rel_buckets = _shape(s, "encoder/relpos_bias/rel_embedding")
    img_buckets = _shape(s, "encoder/relpos_bias/image_rel_embedding")[1]
    nb = math.isqrt(img_buckets // 4)
    if 4 * nb * nb != img_buckets:
        raise ValueError(f"image_rel_embedding has {img_buckets} buckets; expected 4 * n^2")
    inner = _shape(s, "encoder/layers_0/attention/query/kernel")[1]
    if inner % heads:
        raise ValueError(f"attention width {inner} is not divisible by the {heads} heads of rel_embedding")
    d_ff = _shape(s, "encoder/layers_0/mlp/wi_0/kernel")[1]
    segments = _shape(s, "encoder/segment_embedding/embedding")[0]
    n_enc = _count_layers(s, "encoder")
    n_dec = _count_layers(s, "decoder")
    patch_dim = _shape(s, "encoder/image_projection/kernel")[0]
    patch = math.isqrt(patch_dim // 3)
    if 3 * patch * patch != patch_dim:
        raise ValueError(f"image_projection has {patch_dim} input rows; expected 3 * patch^2 (RGB patches)")
    enc_pos = _shape(s, "encoder/position_embedding/embedding")[0]
    g = _square_side(enc_pos - encoder_max_text_len, "encoder image positions", enc_pos, encoder_max_text_len)
    dec_pos = _shape(s, "decoder/position_embedding/embedding")[0]
    gd = _square_side(dec_pos - decoder_max_text_len, "decoder image positions", dec_pos, decoder_max_text_len)

    has_vae = any(p.startswith("discrete_vae/") for p in s)
    vq: VQGANConfig | None = None
    if has_vae:
        factor = 2 ** (vqgan_levels(s) - 1)
        vq = infer_vqgan_config(s, resolution=gd * factor)
        image_vocab = vq.n_embed
        text_size = v_total - image_vocab
        if text_vocab is None:
            text_vocab = _guess_text_vocab(text_size)
    else:
        if text_vocab is None:
            raise ValueError("the checkpoint has no 'discrete_vae' (VQ-GAN), so the image vocabulary cannot be "
                             "told apart from the text vocabulary: pass text_vocab (the spiece.model size) or a config")
        image_vocab = v_total - Vocab(text_vocab=text_vocab).text_vocab_size
        if image_vocab <= 0:
            raise ValueError(f"token table of {v_total} rows is too small for text_vocab={text_vocab}")
    cfg_vocab = Vocab(text_vocab=text_vocab, image_vocab=image_vocab)
    if cfg_vocab.size != v_total:
        raise ValueError(
            f"a SentencePiece model of {text_vocab} pieces gives a padded text vocabulary of "
            f"{cfg_vocab.text_vocab_size} ids, but the checkpoint's token table has {v_total - image_vocab} text rows "
            f"({v_total} in all, {image_vocab} image codes): wrong spiece.model for this checkpoint?")
    fields = dict(d_model=d, num_heads=heads, head_dim=inner // heads, d_ff=d_ff, num_encoder_layers=n_enc,
                  num_decoder_layers=n_dec, num_segments=segments)
    name = next((k for k, v in SIZES.items() if v == {k2: fields[k2] for k2 in v}), "original")
    image_tokenizer = None
    if vq is not None:
        image_tokenizer = {"name": "vqgan", "config": vq.to_dict(), "image_size": [vq.resolution, vq.resolution]}
    return ModelConfig(
        name=name, **fields, text_vocab=text_vocab, image_vocab=image_vocab,
        encoder_max_text_len=encoder_max_text_len, decoder_max_text_len=decoder_max_text_len,
        image_input_size=(g * patch, g * patch), patch_size=patch, image_target_grid=(gd, gd),
        image_target_size=(vq.resolution, vq.resolution) if vq is not None else (gd * 16, gd * 16),
        rel_num_buckets=rel_buckets, img_rel_num_buckets=nb, image_tokenizer=image_tokenizer)


def _count_layers(shapes: Mapping[str, Any], stack: str) -> int:
    pat = re.compile(rf"{stack}/layers_(\d+)/")
    found = {int(m[1]) for p in shapes if (m := pat.match(p))}
    if not found or found != set(range(len(found))):
        raise ValueError(f"{stack} layers {sorted(found)} are not consecutive from layers_0")
    return len(found)


def _square_side(n: int, what: str, rows: int, text_len: int) -> int:
    side = math.isqrt(max(n, 0))
    if n <= 0 or side * side != n:
        raise ValueError(f"{what}: the position table has {rows} rows; minus {text_len} text positions leaves {n}, "
                         "not a square grid. Pass the text length (encoder_max_text_len / decoder_max_text_len) or a "
                         "config")
    return side


def _guess_text_vocab(text_size: int) -> int:
    """N for a padded text vocabulary of ``text_size`` ids: T5's 32000 when it fits."""
    if Vocab(text_vocab=32000).text_vocab_size == text_size:
        return 32000
    base = Vocab()
    if text_size % base.pad_to or text_size <= base.num_extra_ids + 3:
        raise ValueError(f"a text vocabulary of {text_size} ids is not SentencePiece pieces + {base.num_extra_ids} "
                         f"extra ids padded to a multiple of {base.pad_to}")
    raise ValueError(
        f"the checkpoint's text vocabulary has {text_size} ids, not T5's 33152 (32000 pieces + 1100 extra ids, "
        "padded): the SentencePiece size cannot be read off the weights; pass the spiece.model (or text_vocab)")


# ------------------------------------------------------------------------------------------------
# Transformer names: original -> uio.modeling.network.UnifiedIONetwork
# ------------------------------------------------------------------------------------------------
# Computed by the original but never used (MultiHeadDotProductAttention adds ``abs_bias`` only
# together with a relative bias, and cross-attention passes none). Loaded when the target keeps
# them as parameters (uio's network does, so checkpoints round-trip); dropped with this note if not.
DEAD = {
    "decoder/cross_position_q_linear/kernel": "dead in the original: the cross-attention position bias is never applied",
    "decoder/cross_position_k_linear/kernel": "dead in the original: the cross-attention position bias is never applied",
}


def patch_permutation(patchify: Callable[[torch.Tensor], Any], patch_size: int) -> torch.Tensor:
    """``perm`` with ``stem_vector[j] = original_vector[perm[j]]`` for one patch.

    The original flattens each patch in space_to_depth order ``(ph, pw, c)`` (index
    ``(ph * p + pw) * 3 + c``). The permutation is read off the target's own ``patchify`` by
    feeding it an image whose pixels hold their original index, so a stem with any layout maps right.
    """
    p = patch_size
    ph, pw, c = torch.meshgrid(torch.arange(p), torch.arange(p), torch.arange(3), indexing="ij")
    index = ((ph * p + pw) * 3 + c).double()  # (p, p, 3): original flat index of every pixel
    image = index.permute(2, 0, 1)[None]  # (1, 3, p, p)
    out = patchify(image)
    patches = out[0] if isinstance(out, tuple) else out  # (1, 1, 3p^2)
    perm = patches.reshape(-1).round().long()
    if sorted(perm.tolist()) != list(range(3 * p * p)):
        raise ValueError("the patch stem's patchify does not return each pixel of a patch exactly once")
    return perm


def t_patch(perm: torch.Tensor) -> Transform:
    """image_projection kernel (3p^2 rows in (ph, pw, c) order, d) -> Linear weight (d, 3p^2) in stem order."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] != perm.numel():
            raise ValueError(f"image_projection kernel must be ({perm.numel()}, d), got {tuple(x.shape)}")
        return x.index_select(0, perm.to(x.device)).t()
    return fn


def _network_key(path: str, perm: torch.Tensor | None) -> tuple[str, Transform]:
    """``encoder/layers_3/mlp/wo/kernel`` -> (``encoder.layers.3.mlp.wo.weight``, transpose)."""
    *mods, leaf = path.split("/")
    mods = [f"layers.{m[7:]}" if re.fullmatch(r"layers_\d+", m) else m for m in mods]
    if not mods:
        raise KeyError(path)
    if leaf == "embedding":  # Embed tables (token, position, segment): same (rows, d) layout
        return ".".join(mods + ["weight"]), t_copy
    if leaf == "scale":  # T5 LayerNorm -> RMSNorm.weight
        return ".".join(mods + ["weight"]), t_copy
    if leaf in ("rel_embedding", "image_rel_embedding") and mods[-1] == "relpos_bias":
        return ".".join(mods + [leaf]), t_copy  # (heads, buckets) in both
    if leaf == "kernel":
        if mods == ["encoder", "image_projection"]:
            if perm is None:
                raise KeyError(path)
            return "encoder.image_projection.weight", t_patch(perm)
        return ".".join(mods + ["weight"]), t_dense
    raise KeyError(path)


# ------------------------------------------------------------------------------------------------
# The conversion
# ------------------------------------------------------------------------------------------------
class ConversionError(ValueError):
    """The checkpoint and the target model do not correspond one to one."""


@dataclass
class Plan:
    rules: list[Rule]
    dropped: dict[str, str]  # original path -> why it is not loaded


def _find(model: torch.nn.Module, cls: type) -> tuple[str, torch.nn.Module] | None:
    for name, m in model.named_modules():
        if isinstance(m, cls):
            return (name + "." if name else ""), m
    return None


def build_plan(shapes: Mapping[str, tuple[int, ...]], model: torch.nn.Module) -> Plan:
    """Match every tensor of the original tree to a parameter of ``model`` (a :class:`uio.Model`, a
    ``UnifiedIONetwork`` or a ``VQGAN``); raise :class:`ConversionError` naming every parameter left
    unfilled, every checkpoint tensor left unused and every shape that disagrees."""
    from uio.image_tokenizer.vqgan import VQGAN
    from uio.modeling.network import UnifiedIONetwork

    net = _find(model, UnifiedIONetwork)
    vq = _find(model, VQGAN)
    targets = model.state_dict()
    rules: list[Rule] = []
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    vae_paths = {p: sh for p, sh in shapes.items() if p.startswith("discrete_vae/")}
    if vae_paths:
        if vq is None:
            unknown += sorted(vae_paths)
        else:
            rules += vqgan_rules(vae_paths, target_prefix=vq[0])
    perm = None
    if net is not None:
        perm = patch_permutation(net[1].patchify, net[1].config.patch_size)
    for path in shapes:
        if path.startswith("discrete_vae/"):
            continue
        if net is None:
            unknown.append(path)
            continue
        try:
            key, fn = _network_key(path, perm)
        except KeyError:
            unknown.append(path)
            continue
        key = net[0] + key
        if path in DEAD and key not in targets:
            dropped[path] = DEAD[path]
            continue
        rules.append(Rule(key, path, fn))
    mapped = {r.source for r in rules}
    unknown += [p for p in vae_paths if p not in mapped and vq is not None]

    problems: list[str] = []
    for path in unknown:
        problems.append(f"  checkpoint tensor {path} {tuple(shapes[path])}: not part of the Unified-IO v1 layout "
                        "(or the target model has no module for it)")
    by_target: dict[str, Rule] = {}
    for r in rules:
        if r.target not in targets:
            problems.append(f"  checkpoint tensor {r.source} {tuple(shapes[r.source])} -> {r.target}: "
                            "no such parameter in the target model")
            continue
        if r.target in by_target:
            problems.append(f"  {r.target} would be filled twice ({by_target[r.target].source}, {r.source})")
            continue
        by_target[r.target] = r
        got = tuple(r.transform(torch.empty(shapes[r.source], device="meta")).shape)
        want = tuple(targets[r.target].shape)
        if got != want:
            problems.append(f"  {r.source} {tuple(shapes[r.source])} -> {r.target}: converts to {got}, "
                            f"model expects {want}")
    filled_storage = {_storage_key(targets[k]) for k in by_target}
    for key, t in targets.items():
        if key not in by_target and _storage_key(t) not in filled_storage:  # tied copies count as filled
            problems.append(f"  model parameter {key} {tuple(t.shape)}: missing from the checkpoint")
    if problems:
        shown = problems[:60] + ([f"  ... and {len(problems) - 60} more"] if len(problems) > 60 else [])
        raise ConversionError(f"the checkpoint does not match the model ({len(problems)} problem(s)):\n"
                              + "\n".join(shown))
    return Plan(list(by_target.values()), dropped)


def _storage_key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _array_leaves(tree: Mapping[str, Any]) -> dict[str, ArrayRef]:
    """Flat ``path -> ArrayRef`` of the parameter tree; a lone ``params`` wrapper is unwrapped."""
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    flat = dict(iter_flat(tree))
    other = {p: v for p, v in flat.items() if not isinstance(v, ArrayRef)}
    if other:
        listed = ", ".join(f"{p}={v!r}" for p, v in list(other.items())[:10])
        raise ConversionError(f"the checkpoint holds non-array leaves ({listed}); expected a parameter tree "
                              "(a Unified-IO v1 *_1000k.bin file)")
    return flat  # type: ignore[return-value]


@torch.no_grad()
def convert_checkpoint(source: FlaxMsgpackFile | str | os.PathLike, model: torch.nn.Module) -> Plan:
    """Fill every parameter of ``model`` from an original checkpoint, one tensor at a time.

    Each tensor is read as a view of the memory-mapped file, re-laid out, copied into its
    parameter (converting dtype) and its pages released, so peak memory is the model plus one
    tensor. Returns the plan (rules applied and tensors dropped, with reasons).
    """
    own = not isinstance(source, FlaxMsgpackFile)
    f = FlaxMsgpackFile(source) if own else source
    try:
        flat = _array_leaves(f.tree)
        plan = build_plan({p: r.shape for p, r in flat.items()}, model)
        targets = model.state_dict(keep_vars=True)
        for rule in plan.rules:
            ref = flat[rule.source]
            value = rule.transform(ref.torch())
            targets[rule.target].data.copy_(value)
            del value
            ref.release()
        for path, why in plan.dropped.items():
            log.info("not loaded: %s (%s)", path, why)
        return plan
    finally:
        if own:
            f.close()


# ------------------------------------------------------------------------------------------------
# Writing checkpoints in the original layout (tests, and checking a conversion end to end)
# ------------------------------------------------------------------------------------------------
def original_tree(shapes: Mapping[str, tuple[int, ...]],
                  fill: Callable[[str, tuple[int, ...]], Any]) -> dict[str, Any]:
    """Nested dict in the original layout; ``fill(path, shape)`` gives each leaf (an array, or a
    zero-argument callable producing it so :func:`write_flax_msgpack` can stream huge trees)."""
    tree: dict[str, Any] = {}
    for path, shape in shapes.items():
        node = tree
        *mods, leaf = path.split("/")
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = fill(path, tuple(shape))
    return tree


def write_original_checkpoint(path: str | os.PathLike, config: ModelConfig, vqgan: VQGANConfig | None = None,
                              seed: int = 0, std: float | Callable[[str], float] = 0.02) -> str:
    """Write a checkpoint with the released names, shapes and encoding for ``config`` filled with
    N(0, std) float32 values (``std`` may be a function of the path). Arrays are generated one at a
    time while writing, so a full-size file needs no full copy in memory."""
    import numpy as np

    from uio.convert.flax_msgpack import write_flax_msgpack

    shapes = original_shapes(config, vqgan)
    rng = np.random.default_rng(seed)

    def fill(p: str, shape: tuple[int, ...]):
        s = std(p) if callable(std) else std
        return lambda: (rng.standard_normal(shape, dtype=np.float32) * np.float32(s))

    write_flax_msgpack(original_tree(shapes, fill), path)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Entry points: load into memory, or convert file -> save_pretrained directory (streaming)
# ------------------------------------------------------------------------------------------------
SPIECE_HELP = ("the released models use T5's SentencePiece model (the 'spiece.model' of t5-base / "
               "t5-v1_1, 32000 pieces); pass its path with spiece=... / --spiece")


def _resolve_spiece(src: Path, spiece: str | os.PathLike | None) -> Path | None:
    if spiece is not None:
        p = Path(spiece).expanduser()
        if p.is_dir():
            p = p / "spiece.model"
        if not p.is_file():
            raise FileNotFoundError(f"SentencePiece model {str(p)!r} not found: {SPIECE_HELP}")
        return p
    beside = src.parent / "spiece.model"
    return beside if beside.is_file() else None


def _prepare(f: FlaxMsgpackFile, config: ModelConfig | None, spiece: Path | None, encoder_max_text_len: int,
             decoder_max_text_len: int):
    """(flat arrays, shapes, config, text tokenizer or None) for an opened checkpoint."""
    from uio.text_tokenizer import TextTokenizer

    flat = _array_leaves(f.tree)
    shapes = {p: r.shape for p, r in flat.items()}
    n_pieces = TextTokenizer(spiece).vocab.text_vocab if spiece is not None else None
    if config is None:
        config = infer_config(shapes, text_vocab=n_pieces, encoder_max_text_len=encoder_max_text_len,
                              decoder_max_text_len=decoder_max_text_len)
    else:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a uio.ModelConfig, got {type(config).__name__}")
        if config.image_tokenizer is None and any(p.startswith("discrete_vae/") for p in shapes):
            grid = config.image_target_grid[0]
            vq = infer_vqgan_config(shapes, resolution=grid * 2 ** (vqgan_levels(shapes) - 1))
            spec = {"name": "vqgan", "config": vq.to_dict(), "image_size": list(config.image_target_size)}
            config = dataclasses.replace(config, image_tokenizer=spec)
            log.info("config has no image tokenizer; using the checkpoint's VQ-GAN %s", vq.to_dict())
        check_config(shapes, config)
    tok = None
    if spiece is not None:
        tok = TextTokenizer(spiece, image_vocab=config.image_vocab)
        if tok.vocab.text_vocab != config.text_vocab:
            raise ValueError(f"{spiece} has {tok.vocab.text_vocab} pieces but the model's text vocabulary is for "
                             f"{config.text_vocab}: {SPIECE_HELP}")
    else:
        log.warning("no SentencePiece model given: the model works on token ids only; %s", SPIECE_HELP)
    return flat, shapes, config, tok


def check_config(shapes: Mapping[str, tuple[int, ...]], config: ModelConfig) -> None:
    """Raise :class:`ConversionError` listing every tensor whose presence or shape disagrees with
    what ``config`` (and its VQ-GAN spec) implies for an original checkpoint."""
    vq = None
    spec = config.image_tokenizer
    if spec is not None and spec.get("name") == "vqgan":
        from uio.image_tokenizer.vqgan import get_config

        vq = get_config(spec.get("config", "vqgan_imagenet_f16_16384"))
    expected = original_shapes(config, vq)
    if vq is None:  # another tokenizer: its tensors are not described here
        expected.update({p: s for p, s in shapes.items() if p.startswith("discrete_vae/")})
    lines = [f"  {p}: checkpoint {tuple(shapes[p])}, config expects {tuple(s)}"
             for p, s in expected.items() if p in shapes and tuple(shapes[p]) != tuple(s)]
    lines += [f"  {p}: config expects {tuple(s)}, not in the checkpoint" for p, s in expected.items() if p not in shapes]
    lines += [f"  {p}: checkpoint {tuple(s)}, not expected by the config" for p, s in shapes.items() if p not in expected]
    if lines:
        summary = ""
        try:  # say it in config terms first when the file's own configuration can be read
            found = infer_config(shapes, text_vocab=config.text_vocab, encoder_max_text_len=config.encoder_max_text_len,
                                 decoder_max_text_len=config.decoder_max_text_len)
            fields = [f for f in ("d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers", "num_decoder_layers",
                                  "num_segments", "vocab_size", "image_input_size", "patch_size", "image_target_grid")
                      if getattr(found, f) != getattr(config, f)]
            if fields:
                summary = "; ".join(f"{f}: checkpoint {getattr(found, f)}, config {getattr(config, f)}" for f in fields)
                summary = f"\n  in short: {summary}"
        except ValueError:
            pass
        shown = lines[:40] + ([f"  ... and {len(lines) - 40} more"] if len(lines) > 40 else [])
        raise ConversionError(f"the checkpoint does not match the given config ({len(lines)} difference(s)){summary}\n"
                              + "\n".join(shown))


def load_original(path: str | os.PathLike, config: ModelConfig | None = None, spiece: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  encoder_max_text_len: int = 256, decoder_max_text_len: int = 256):
    """A :class:`uio.Model` from a released ``{size}_1000k.bin`` (Flax msgpack, no JAX needed).

    The configuration is read off the tensor shapes (or pass ``config``). ``spiece`` is T5's
    ``spiece.model`` (default: a ``spiece.model`` beside the checkpoint, else the model has no text
    tokenizer and works on ids only). Peak memory: the model plus one tensor.
    """
    from uio.model import Model

    src = Path(path).expanduser()
    spm = _resolve_spiece(src, spiece)
    with FlaxMsgpackFile(src) as f:
        flat, shapes, config, tok = _prepare(f, config, spm, encoder_max_text_len, decoder_max_text_len)
        model = Model(config, text_tokenizer=tok, init=False)  # allocated, not initialised: every weight is loaded
        convert_checkpoint(f, model)
    if dtype is not None:
        model.network.to(dtype)
    return model.to(device).eval()


def convert_to_directory(path: str | os.PathLike, out_dir: str | os.PathLike, config: ModelConfig | None = None,
                         spiece: str | os.PathLike | None = None, encoder_max_text_len: int = 256,
                         decoder_max_text_len: int = 256, dtype: torch.dtype | None = None) -> Path:
    """Convert a released checkpoint into the :meth:`uio.Model.save_pretrained` format, streaming.

    The target model is built on the meta device (no memory), and each tensor goes from the
    memory-mapped source through its layout change straight into ``model.safetensors``; the
    process never holds more than one tensor. ``dtype`` (e.g. ``torch.bfloat16``) stores the
    network's weights in that precision (the VQ-GAN stays float32, as ``from_pretrained`` expects).
    """
    from uio.model import CONFIG_NAME, WEIGHTS_NAME, Model

    src = Path(path).expanduser()
    out = Path(out_dir).expanduser()
    spm = _resolve_spiece(src, spiece)
    with FlaxMsgpackFile(src) as f:
        flat, shapes, config, tok = _prepare(f, config, spm, encoder_max_text_len, decoder_max_text_len)
        with torch.device("meta"):
            model = Model(config, text_tokenizer=tok, init=False)
        plan = build_plan(shapes, model)
        by_target = {r.target: r for r in plan.rules}
        state = model.state_dict()
        net_keys = {"network." + k for k in model.network.state_dict()}
        dtypes = {k: (dtype if dtype is not None and k in net_keys and t.is_floating_point() else t.dtype)
                  for k, t in state.items()}
        out.mkdir(parents=True, exist_ok=True)

        def tensors():
            for key in state:
                rule = by_target[key]
                ref = flat[rule.source]
                yield key, rule.transform(ref.torch()).to(dtypes[key])
                ref.release()

        specs = {k: (dtypes[k], tuple(t.shape)) for k, t in state.items()}
        write_safetensors(out / WEIGHTS_NAME, specs, tensors(), metadata={"format": "pt", "library": "uio"})
    cfg = config.to_dict()
    if model.image_tokenizer is not None and hasattr(model.image_tokenizer, "spec"):
        cfg["image_tokenizer"] = model.image_tokenizer.spec()  # as Model.save_pretrained writes it
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    if tok is not None:
        tok.save(out)
    for p, why in plan.dropped.items():
        log.info("not loaded: %s (%s)", p, why)
    return out


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensors: Any, metadata: Mapping[str, str] | None = None) -> None:
    """Write a ``.safetensors`` file tensor by tensor. ``specs`` (name -> (dtype, shape)) fixes the
    header up front; ``tensors`` yields ``(name, tensor)`` in the same order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (dt, shape) in specs.items():
        if dt not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {dt} cannot be stored in safetensors")
        n = math.prod(shape) * torch.empty(0, dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    try:
        _write_safetensors_body(tmp, blob, specs, tensors)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_safetensors_body(tmp: Path, blob: bytes, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                            tensors: Any) -> None:
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        names = iter(specs)
        for name, t in tensors:
            want = next(names, None)
            if name != want:
                raise ValueError(f"tensor {name!r} arrived where {want!r} was expected")
            dt, shape = specs[name]
            if t.dtype != dt or tuple(t.shape) != shape:
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, the header says {dt} {shape}")
            t = t.contiguous()
            fh.write(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
            del t
        left = next(names, None)
        if left is not None:
            raise ValueError(f"no tensor was given for {left!r}")
