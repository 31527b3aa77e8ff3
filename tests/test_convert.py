"""Converting the released Unified-IO checkpoints (Flax msgpack) into uio.Model.

The released files cannot be downloaded here, so every test writes its own checkpoint in the
original layout: the real parameter names and shapes (at reduced widths), arrays in Flax's msgpack
encoding. The encoding is checked byte for byte against an independent encoder built on
``msgpack.packb`` exactly as ``flax.serialization.msgpack_serialize`` calls it (and against Flax itself
when it is installed).
"""
from __future__ import annotations

import dataclasses
import math
import re

import msgpack
import numpy as np
import pytest
import torch

from uio.convert.flax_msgpack import (
    FlaxFormatError,
    is_flax_msgpack,
    load_flax_msgpack,
    read_flax_msgpack,
    write_flax_msgpack,
)


# ================================================================================================
# An independent Flax-style encoder (what flax.serialization.msgpack_serialize does)
# ================================================================================================
def _flax_ext(x):
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
    if isinstance(x, np.generic):
        a = np.asarray(x)
        return msgpack.ExtType(3, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))
    if isinstance(x, complex):
        return msgpack.ExtType(2, msgpack.packb((x.real, x.imag)))
    return x


def _flax_chunk(tree, max_chunk):
    """flax.serialization._chunk_array_leaves_in_place on a copy."""
    if isinstance(tree, dict):
        return {k: _flax_chunk(v, max_chunk) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and tree.nbytes > max_chunk:
        step = max(1, int(max_chunk / tree.dtype.itemsize))
        flat = tree.reshape(-1)
        return {"__msgpack_chunked_array__": True,
                "shape": {str(i): d for i, d in enumerate(tree.shape)},
                "chunks": {str(i): flat[s:s + step] for i, s in enumerate(range(0, flat.size, step))}}
    return tree


def flax_bytes(tree, max_chunk=2**30) -> bytes:
    return msgpack.packb(_flax_chunk(tree, max_chunk), default=_flax_ext, strict_types=True)


def _sample_tree(rng):
    return {
        "token_embedder": {"embedding": rng.standard_normal((37, 8)).astype(np.float32)},
        "encoder": {
            "layers_0": {"attention": {"query": {"kernel": rng.standard_normal((8, 12)).astype(np.float32)}}},
            "empty": np.zeros((0, 3), np.float32),
            "ints": np.arange(-5, 300, dtype=np.int64),
            "f64": rng.standard_normal((2, 3, 4)),
            "u8": np.arange(7, dtype=np.uint8),
        },
        "step": np.int32(1000),  # numpy scalar -> ext 3
        "lr": np.float32(0.5),
        "n": 7, "neg": -3, "big": 2**40, "x": 1.25, "flag": True, "none": None, "name": "uio",
        "c": 1.5 - 2j,
        "large": rng.standard_normal(70000).astype(np.float32),  # > 65535 bytes: ext32 / bin32 headers
    }


# ================================================================================================
# Reader / writer
# ================================================================================================
def test_writer_matches_flax_encoding_byte_for_byte(tmp_path):
    tree = _sample_tree(np.random.default_rng(0))
    path = write_flax_msgpack(tree, tmp_path / "a.bin")
    assert path.read_bytes() == flax_bytes(tree)


def test_writer_chunks_large_arrays_like_flax(tmp_path):
    rng = np.random.default_rng(1)
    tree = {"w": rng.standard_normal((10, 30)).astype(np.float32), "small": np.ones(3, np.float32)}
    path = write_flax_msgpack(tree, tmp_path / "c.bin", max_chunk_size=256)
    assert path.read_bytes() == flax_bytes(tree, max_chunk=256)
    with read_flax_msgpack(path) as f:
        ref = f.tree["w"]
        assert ref.shape == (10, 30) and len(ref.segments) == math.ceil(300 / 64)
        np.testing.assert_array_equal(ref.numpy(), tree["w"])
        np.testing.assert_array_equal(f.tree["small"].numpy(), tree["small"])


def test_reader_round_trip_values_and_types(tmp_path):
    tree = _sample_tree(np.random.default_rng(2))
    path = tmp_path / "r.bin"
    path.write_bytes(flax_bytes(tree))  # written by the independent encoder
    got = load_flax_msgpack(path)
    for k in ("n", "neg", "big", "x", "flag", "none", "name", "c"):
        assert got[k] == tree[k] and type(got[k]) is type(tree[k]), k
    assert got["step"] == 1000 and got["step"].dtype == np.int32
    assert got["lr"] == np.float32(0.5)
    np.testing.assert_array_equal(got["token_embedder"]["embedding"], tree["token_embedder"]["embedding"])
    for k, v in tree["encoder"].items():
        if isinstance(v, np.ndarray):
            assert got["encoder"][k].dtype == v.dtype and got["encoder"][k].shape == v.shape, k
            np.testing.assert_array_equal(got["encoder"][k], v)
    np.testing.assert_array_equal(got["large"], tree["large"])


def test_reader_is_lazy_and_zero_copy(tmp_path):
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = write_flax_msgpack({"a": {"kernel": w}}, tmp_path / "z.bin")
    raw = path.read_bytes()
    with read_flax_msgpack(path) as f:
        ref = f.flat()["a/kernel"]
        (offset, nbytes), = ref.segments
        assert nbytes == w.nbytes and raw[offset:offset + nbytes] == w.tobytes()  # points at the raw data
        t = ref.torch()
        t2 = ref.torch()
        assert t.data_ptr() == t2.data_ptr()  # both are views of the same mapped bytes, not copies
        np.testing.assert_array_equal(t.numpy(), w)
        ref.release()  # pages dropped; reading again re-faults them from the file
        np.testing.assert_array_equal(ref.torch().numpy(), w)
        del t, t2


def test_reader_bfloat16(tmp_path):
    x = torch.randn(5, 3).to(torch.bfloat16)
    payload = msgpack.packb(((5, 3), "bfloat16", x.view(torch.int16).numpy().tobytes()), use_bin_type=True)
    path = tmp_path / "bf.bin"
    path.write_bytes(msgpack.packb({"w": msgpack.ExtType(1, payload)}))
    with read_flax_msgpack(path) as f:
        t = f.tree["w"].torch()
        assert t.dtype == torch.bfloat16 and torch.equal(t, x)
        np.testing.assert_array_equal(f.tree["w"].numpy(), x.float().numpy())


@pytest.mark.parametrize("case, message", [
    ("truncated", "file ends inside"),
    ("trailing", "trailing bytes"),
    ("not_map", "expected a map"),
    ("ext_code", "unknown msgpack ext type 9"),
    ("size_mismatch", "needs 24 bytes, found 20"),
    ("empty", "is empty"),
    ("bad_tag", "is not a msgpack type tag"),
    ("empty_ext", "empty ndarray record"),
    ("not_triple", "not a \\(shape, dtype, data\\) triple"),
])
def test_reader_rejects_malformed_files(tmp_path, case, message):
    good = flax_bytes({"a": np.ones((2, 3), np.float32)})
    data = {
        "truncated": good[:-5],
        "trailing": good + b"\x00\x00",
        "not_map": msgpack.packb([1, 2, 3]),
        "ext_code": msgpack.packb({"a": msgpack.ExtType(9, b"xyz")}),
        "size_mismatch": msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((2, 3), "float32", b"\0" * 20)))}),
        "empty": b"",
        "bad_tag": b"\x81\xa1a\xc1",
        "empty_ext": b"\x81\xa1a\xc7\x00\x01",
        "not_triple": msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((2,), "float32")))}),
    }[case]
    path = tmp_path / f"{case}.bin"
    path.write_bytes(data)
    with pytest.raises(FlaxFormatError, match=message):
        read_flax_msgpack(path)


def test_sniff_and_missing_file(tmp_path):
    path = write_flax_msgpack({"a": np.zeros(2, np.float32)}, tmp_path / "s.bin")
    assert is_flax_msgpack(path)
    assert not is_flax_msgpack(tmp_path)  # a directory (save_pretrained format) is not
    (tmp_path / "t.txt").write_text("hello")
    assert not is_flax_msgpack(tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_flax_msgpack(tmp_path / "nope.bin")


def test_real_flax_reads_our_files_and_we_read_its_files(tmp_path):
    serialization = pytest.importorskip("flax.serialization")
    tree = _sample_tree(np.random.default_rng(3))
    ours = write_flax_msgpack(tree, tmp_path / "ours.bin").read_bytes()
    assert serialization.to_bytes(tree) == ours
    back = serialization.msgpack_restore(ours)
    np.testing.assert_array_equal(back["large"], tree["large"])
    (tmp_path / "theirs.bin").write_bytes(serialization.to_bytes(tree))
    np.testing.assert_array_equal(load_flax_msgpack(tmp_path / "theirs.bin")["encoder"]["f64"], tree["encoder"]["f64"])


# ================================================================================================
# A NumPy transcription of the original network (float64), reading the ORIGINAL tree layout.
# Written from allenai/unified-io-inference uio/network.py + uio/t5x_layers.py semantics; it
# shares no code with uio, so a mis-mapped tensor shows up as a numerical difference.
# ================================================================================================
F32_EPS = np.float32(np.finfo(np.float32).eps)


def _rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _gelu_tanh(x):  # flax nn.gelu default (approximate=True)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _mha(p, xq, xkv, bias, heads):
    """MultiHeadDotProductAttention: 2-D kernels (in, heads*hd), no 1/sqrt(d) scaling."""
    b, lq, _ = xq.shape
    lk = xkv.shape[1]
    q = (xq @ p["query"]["kernel"]).reshape(b, lq, heads, -1)
    k = (xkv @ p["key"]["kernel"]).reshape(b, lk, heads, -1)
    v = (xkv @ p["value"]["kernel"]).reshape(b, lk, heads, -1)
    w = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
    o = np.einsum("bhqk,bkhd->bqhd", _softmax(w), v).reshape(b, lq, -1)
    return o @ p["out"]["kernel"]


def _mlp(p, x):
    return (_gelu_tanh(x @ p["wi_0"]["kernel"]) * (x @ p["wi_1"]["kernel"])) @ p["wo"]["kernel"]


def _log_bucket(n, max_exact, max_distance, num_buckets):
    # float32 as in JAX: log(n / max_exact + eps) / log(max_distance / max_exact) * (nb - max_exact)
    val = np.log(n.astype(np.float32) / np.float32(max_exact) + F32_EPS) / np.float32(np.log(max_distance / max_exact))
    val = (val * np.float32(num_buckets - max_exact)).astype(np.int64)
    return np.minimum(max_exact + val, num_buckets - 1)


def _t5_bucket(rel, bidirectional, num_buckets=32, max_distance=128):
    ret = np.zeros_like(rel)
    n = -rel
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    return ret + np.where(n < max_exact, n, _log_bucket(n, max_exact, max_distance, num_buckets))


def _img_bucket(rx, ry, num_buckets=8, max_distance=20):
    nx, ny = -rx, -ry
    total = num_buckets**2
    ret = ((nx <= 0) & (ny < 0)) * total * 3 + ((nx < 0) & (ny >= 0)) * total * 2 + ((nx > 0) & (ny <= 0)) * total
    nx, ny = np.abs(nx), np.abs(ny)
    me = num_buckets // 2
    xx = np.where(nx < me, nx, _log_bucket(nx, me, max_distance, num_buckets))
    yy = np.where(ny < me, ny, _log_bucket(ny, me, max_distance, num_buckets))
    return ret + xx + num_buckets * yy


def _relpos(p, n_txt, n_img, grid_w, bidirectional):
    """(H, L, L): text block from rel_embedding, image block from image_rel_embedding, zero across."""
    t = np.arange(n_txt)
    tb = _t5_bucket(t[None, :] - t[:, None], bidirectional)
    i = np.arange(n_img)
    x, y = i % grid_w, i // grid_w
    ib = _img_bucket(x[None, :] - x[:, None], y[None, :] - y[:, None])
    h = p["rel_embedding"].shape[0]
    out = np.zeros((h, n_txt + n_img, n_txt + n_img))
    out[:, :n_txt, :n_txt] = p["rel_embedding"][:, tb]
    out[:, n_txt:, n_txt:] = p["image_rel_embedding"][:, ib]
    return out


def ref_encode(P, text_ids, image_nhwc, image_mask, heads, patch=16, text_max=256):
    """Encoder.__call__ + Transformer.encode. Returns (hidden (B, L, d), mask (B, L))."""
    e = P["encoder"]
    E = P["token_embedder"]["embedding"]
    b, nt = text_ids.shape
    _, h, w, c = image_nhwc.shape
    gh, gw = h // patch, w // patch
    # space_to_depth: 'b (h dh) (w dw) c -> b (h w) (dh dw c)'
    patches = image_nhwc.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    ni = gh * gw
    pos = e["position_embedding"]["embedding"]
    seg = e["segment_embedding"]["embedding"]
    pos_t, pos_i = pos[np.arange(nt)], pos[text_max + np.arange(ni)]
    txt = _rms(E[text_ids] + seg[0] + pos_t, e["txt_emb_pre_ln"]["scale"])
    img = _rms(patches @ e["image_projection"]["kernel"] + seg[1] + pos_i, e["img_emb_pre_ln"]["scale"])
    pe = _rms(np.concatenate([pos_t, pos_i]), e["pe_pre_ln"]["scale"])
    d = pe.shape[-1]
    pq = (pe @ e["position_q_linear"]["kernel"]).reshape(nt + ni, heads, -1)
    pk = (pe @ e["position_k_linear"]["kernel"]).reshape(nt + ni, heads, -1)
    abs_bias = np.einsum("qhd,khd->hqk", pq, pk) * (d / heads) ** -0.5
    mask = np.concatenate([text_ids > 0, image_mask], axis=1)
    mask_bias = np.where(mask[:, None, :, None] & mask[:, None, None, :], 0.0, -1e10)
    bias = mask_bias + _relpos(e["relpos_bias"], nt, ni, gw, True)[None] + abs_bias[None]
    x = np.concatenate([txt, img], axis=1)
    for i in range(len([k for k in e if k.startswith("layers_")])):
        lp = e[f"layers_{i}"]
        hdn = _rms(x, lp["pre_attention_layer_norm"]["scale"])
        x = x + _mha(lp["attention"], hdn, hdn, bias, heads)
        x = x + _mlp(lp["mlp"], _rms(x, lp["pre_mlp_layer_norm"]["scale"]))
    return _rms(x, e["encoder_norm"]["scale"]), mask


def ref_decode(P, encoded, enc_mask, text_in, text_mask, image_in, image_mask, heads, grid_w,
               text_max=256, vocab_size=33152):
    """Decoder.__call__ + Transformer.decode: masked logits (B, Ld+Ni, V)."""
    g = P["decoder"]
    E = P["token_embedder"]["embedding"]
    nt, ni = text_in.shape[1], image_in.shape[1]
    ids = np.concatenate([text_in, image_in], axis=1)
    positions = np.concatenate([np.arange(nt), text_max + np.arange(ni)])
    segments = np.concatenate([np.zeros(nt, int), np.ones(ni, int)])
    pos = g["position_embedding"]["embedding"][positions]
    y = _rms(E[ids] + pos + g["segments_embedding"]["embedding"][segments], g["pre_ln"]["scale"])
    pe = _rms(pos, g["pe_pre_ln"]["scale"])
    d = pe.shape[-1]
    sq = (pe @ g["self_position_q_linear"]["kernel"]).reshape(nt + ni, heads, -1)
    sk = (pe @ g["self_position_k_linear"]["kernel"]).reshape(nt + ni, heads, -1)
    self_abs = np.einsum("qhd,khd->hqk", sq, sk) * (d / heads) ** -0.5
    m = np.concatenate([text_mask, image_mask], axis=1)
    causal = np.tril(np.ones((nt + ni, nt + ni), bool))
    self_bias = np.where(causal[None, None] & m[:, None, :, None] & m[:, None, None, :], 0.0, -1e10)
    self_bias = self_bias + _relpos(g["relpos_bias"], nt, ni, grid_w, False)[None] + self_abs[None]
    cross_bias = np.where(m[:, None, :, None] & enc_mask[:, None, None, :], 0.0, -1e10)
    for i in range(len([k for k in g if k.startswith("layers_")])):
        lp = g[f"layers_{i}"]
        hdn = _rms(y, lp["pre_self_attention_layer_norm"]["scale"])
        y = y + _mha(lp["self_attention"], hdn, hdn, self_bias, heads)
        hdn = _rms(y, lp["pre_cross_attention_layer_norm"]["scale"])
        y = y + _mha(lp["encoder_decoder_attention"], hdn, encoded, cross_bias, heads)  # no position bias
        y = y + _mlp(lp["mlp"], _rms(y, lp["pre_mlp_layer_norm"]["scale"]))
    y = _rms(y, g["decoder_norm"]["scale"])
    logits = y @ E.T / np.sqrt(d)
    col = np.arange(logits.shape[-1])
    row = np.arange(nt + ni)[:, None]
    masked = ((row >= nt) & (col < vocab_size)) | ((row < nt) & (col >= vocab_size))
    return np.where(masked[None], -1e10, logits)


# ---- the VQ-GAN (uio/network.py DiscreteVAE), NHWC, lax 'SAME' convolutions --------------------
def _conv(x, p, stride=1):
    k = p["kernel"]
    kh, kw, cin, cout = k.shape
    b, h, w, _ = x.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
    x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride][:, :oh, :ow]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(b, oh, ow, kh * kw * cin)  # (kh, kw, cin) order = HWIO rows
    return cols @ k.reshape(kh * kw * cin, cout) + p["bias"]


def _gn(x, p, groups=32):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = np.maximum((g * g).mean(axis=(1, 2, 4), keepdims=True) - mean**2, 0.0)
    return ((g - mean) / np.sqrt(var + 1e-6)).reshape(b, h, w, c) * p["scale"] + p["bias"]


def _swish(x):
    return x / (1.0 + np.exp(-x))


def _res(x, p):
    h = _conv(_swish(_gn(x, p["norm1"])), p["conv1"])
    h = _conv(_swish(_gn(h, p["norm2"])), p["conv2"])
    if "nin_shortcut" in p:
        x = _conv(x, p["nin_shortcut"])
    return x + h


def _attn(x, p):
    b, h, w, c = x.shape
    y = _gn(x, p["norm"])
    q, k, v = (_conv(y, p[n]).reshape(b, h * w, c) for n in ("q", "k", "v"))
    a = _softmax(np.einsum("bqc,bkc->bqk", q, k) * c**-0.5)
    return x + _conv(np.einsum("bqk,bkc->bqc", a, v).reshape(b, h, w, c), p["proj_out"])


def ref_vq_encode(V, images_nhwc):
    """get_codebook_indices: codes (B, gh*gw)."""
    p = V["encoder"]
    h = _conv(images_nhwc, p["conv_in"])
    i = 0
    while f"down_{i}_block_0" in p:
        j = 0
        while f"down_{i}_block_{j}" in p:
            h = _res(h, p[f"down_{i}_block_{j}"])
            if f"down_{i}_attn_{j}" in p:
                h = _attn(h, p[f"down_{i}_attn_{j}"])
            j += 1
        if f"down_{i}_downsample" in p:
            h = _conv(h, p[f"down_{i}_downsample"]["conv"], stride=2)
        i += 1
    h = _res(_attn(_res(h, p["mid_block_1"]), p["mid_attn_1"]), p["mid_block_2"])
    h = _conv(_swish(_gn(h, p["norm_out"])), p["conv_out"])
    z = _conv(h, V["quant_conv"]).reshape(h.shape[0], -1, V["quantize"]["embedding"].shape[1])
    e = V["quantize"]["embedding"]
    d = (z * z).sum(-1, keepdims=True) + (e * e).sum(-1) - 2 * z @ e.T
    return d.argmin(-1)


def ref_vq_decode(V, codes, grid):
    """decode_code: images (B, H, W, 3)."""
    p = V["decoder"]
    z = V["quantize"]["embedding"][codes].reshape(codes.shape[0], grid[0], grid[1], -1)
    h = _conv(_conv(z, V["post_quant_conv"]), p["conv_in"])
    h = _res(_attn(_res(h, p["mid_block_1"]), p["mid_attn_1"]), p["mid_block_2"])
    k = 0
    while f"up_{k}_block_0" in p:  # up_0 = lowest resolution, runs first
        j = 0
        while f"up_{k}_block_{j}" in p:
            h = _res(h, p[f"up_{k}_block_{j}"])
            if f"up_{k}_attn_{j}" in p:
                h = _attn(h, p[f"up_{k}_attn_{j}"])
            j += 1
        if f"up_{k}_upsample" in p:
            h = _conv(h.repeat(2, axis=1).repeat(2, axis=2), p[f"up_{k}_upsample"]["conv"])
        k += 1
    return _conv(_swish(_gn(h, p["norm_out"])), p["conv_out"])


# ================================================================================================
# Checkpoints in the original layout at a reduced width
# ================================================================================================
from uio.config import ModelConfig  # noqa: E402
from uio.convert import original as orig  # noqa: E402
from uio.image_tokenizer.vqgan import VQGANConfig, get_config  # noqa: E402

VQ = get_config("vqgan_test")  # 32x32 -> 8x8 codes of 64, ch 32, levels (1, 1, 2), attention at 8


def reduced_config(**kw) -> ModelConfig:
    """Real names, vocabulary layout and position-table structure; small widths and images."""
    base = dict(name="original", d_model=64, num_heads=2, head_dim=24, d_ff=96, num_encoder_layers=2,
                num_decoder_layers=2, num_segments=2, text_vocab=32000, image_vocab=VQ.n_embed,
                image_input_size=(64, 64), image_target_grid=(8, 8), image_target_size=(32, 32))
    return ModelConfig(**{**base, **kw})


def realistic_fill(seed: int):
    """Random values with roughly the scales of a trained model (so numerics are meaningful)."""
    rng = np.random.default_rng(seed)

    def fill(path, shape):
        leaf = path.split("/")[-1]
        if leaf == "scale":
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if leaf == "bias":
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if leaf in ("embedding", "rel_embedding", "image_rel_embedding"):
            return rng.standard_normal(shape).astype(np.float32)
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return fill


def index_fill(shapes):
    """Every element holds its own global index (exact in float32 below 2**24): value -> (tensor, element)."""
    offsets, total = {}, 0
    for path, shape in shapes.items():
        offsets[path] = total
        total += int(np.prod(shape))
    assert total < 2**24

    def fill(path, shape):
        return (offsets[path] + np.arange(int(np.prod(shape)), dtype=np.float64)).astype(np.float32).reshape(shape)
    return fill, offsets


def to_float64(tree):
    return {k: to_float64(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree, np.float64)


@pytest.fixture(scope="module")
def realistic_ckpt(tmp_path_factory):
    cfg = reduced_config()
    path = tmp_path_factory.mktemp("orig") / "reduced_1000k.bin"
    write_flax_msgpack(orig.original_tree(orig.original_shapes(cfg, VQ), realistic_fill(0)), path)
    return cfg, path


# ------------------------------------------------------------------------------------------------
def test_original_tree_has_the_released_parameter_counts():
    """Names/shapes table vs the sizes computed independently from uio/network.py (M params)."""
    vq = get_config("vqgan_imagenet_f16_16384")
    counts = {s: sum(math.prod(v) for v in orig.original_transformer_shapes(ModelConfig.from_size(s)).values())
              for s in ("small", "base", "large", "xl")}
    assert {s: round(n / 1e6, 1) for s, n in counts.items()} == {"small": 71.7, "base": 241.4, "large": 776.5,
                                                                 "xl": 2849.2}
    assert round(sum(math.prod(v) for v in orig.original_vqgan_shapes(vq).values()) / 1e6, 2) == 76.07
    # fp32 file sizes in the README: small 0.6gb ... xl 10.9gb (transformer + VQ-GAN)
    xl = (counts["xl"] + sum(math.prod(v) for v in orig.original_vqgan_shapes(vq).values())) * 4 / 2**30
    assert round(xl, 1) == 10.9


@pytest.mark.parametrize("size", ["small", "base", "large", "xl"])
def test_config_inferred_from_shapes_is_the_released_one(size):
    want = ModelConfig.from_size(size)
    shapes = orig.original_shapes(want, get_config("vqgan_imagenet_f16_16384"))
    got = orig.infer_config(shapes)
    for f in ("d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers", "num_decoder_layers", "num_segments",
              "text_vocab", "image_vocab", "image_input_size", "patch_size", "image_target_grid", "image_target_size",
              "rel_num_buckets", "img_rel_num_buckets", "encoder_max_text_len", "decoder_max_text_len"):
        assert getattr(got, f) == getattr(want, f), f
    assert got.name == size and got.vocab_size == 49536
    assert VQGANConfig.from_dict(got.image_tokenizer["config"]) == get_config("vqgan_imagenet_f16_16384")
    assert got.image_tokenizer["image_size"] == [256, 256]


def test_every_tensor_lands_in_its_place_and_orientation(tmp_path):
    cfg = reduced_config()
    shapes = orig.original_shapes(cfg, VQ)
    fill, offsets = index_fill(shapes)
    path = write_flax_msgpack(orig.original_tree(shapes, fill), tmp_path / "index_1000k.bin")
    model = orig.load_original(path)
    assert model.config.d_model == 64 and model.config.head_dim == 24 and model.config.image_vocab == 64

    starts = np.array(sorted(offsets.values()))
    by_start = {o: p for p, o in offsets.items()}
    modules = dict(model.named_modules())
    levels = len(VQ.ch_mult)
    used = {}

    def normalise_source(p):
        parts = []
        for m in p.split("/")[:-1]:
            if (hit := re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", m)):
                i = int(hit[2]) if hit[1] == "down" else levels - 1 - int(hit[2])  # decoder up_k is reversed
                parts += [hit[1], str(i), hit[3], hit[4]]
            elif (hit := re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", m)):
                i = int(hit[2]) if hit[1] == "down" else levels - 1 - int(hit[2])
                parts += [hit[1], str(i), hit[3]]
            elif (hit := re.fullmatch(r"mid_(block_1|attn_1|block_2)", m)):
                parts += ["mid", hit[1]]
            elif (hit := re.fullmatch(r"layers_(\d+)", m)):
                parts += ["layers", hit[1]]
            else:
                parts.append(m)
        if parts[0] == "discrete_vae":
            return ".".join(["image_tokenizer"] + parts[1:])
        return ".".join(["network"] + parts)

    for key, t in model.state_dict().items():
        vals = t.double().numpy()
        first = int(vals.reshape(-1)[0]) if vals.ndim else int(vals)
        src = by_start[starts[np.searchsorted(starts, first, side="right") - 1]]
        off, sshape = offsets[src], shapes[src]
        assert vals.size == math.prod(sshape), key
        local = vals - off
        assert local.min() >= 0 and local.max() < vals.size, f"{key} mixes tensors"
        used[src] = key
        assert key.rsplit(".", 1)[0] == normalise_source(src) or key == "image_tokenizer.quantize.embedding.weight", (key, src)
        mod = modules.get(key.rsplit(".", 1)[0])
        if key == "network.encoder.image_projection.weight":
            # one pixel (channel c, row y, col x inside a patch) lit -> the projection returns the original
            # kernel's row (y * 16 + x) * 3 + c: the (ph, pw, c) flattening of space_to_depth
            net = model.network
            for c, y, x in [(0, 0, 0), (2, 0, 1), (1, 5, 3), (0, 15, 14), (2, 15, 15)]:
                img = torch.zeros(1, 3, *cfg.image_input_size)
                img[0, c, y, x] = 1.0
                patches, _ = net.patchify(img)
                row = net.encoder.image_projection(patches)[0, 0].detach().double().numpy() - off
                np.testing.assert_array_equal(row, ((y * 16 + x) * 3 + c) * 64 + np.arange(64))
        elif isinstance(mod, torch.nn.Linear):  # Dense kernel (in, out) -> weight (out, in)
            o, i = np.meshgrid(np.arange(vals.shape[0]), np.arange(vals.shape[1]), indexing="ij")
            np.testing.assert_array_equal(local, i * vals.shape[0] + o, err_msg=key)
        elif isinstance(mod, torch.nn.Conv2d) and key.endswith("weight"):  # HWIO -> OIHW
            cout, cin, kh, kw = vals.shape
            o, c, y, x = np.meshgrid(*map(np.arange, vals.shape), indexing="ij")
            np.testing.assert_array_equal(local, ((y * kw + x) * cin + c) * cout + o, err_msg=key)
        else:  # tables, norms, biases, relative tables: same layout
            np.testing.assert_array_equal(local.reshape(-1), np.arange(vals.size), err_msg=key)
    assert set(used) == set(shapes)  # every checkpoint tensor used, each by one parameter
    # spot checks written out by hand
    assert used["discrete_vae/decoder/up_0_block_0/conv1/kernel"] == "image_tokenizer.decoder.up.2.block.0.conv1.weight"
    assert used["discrete_vae/decoder/up_0_upsample/conv/kernel"] == "image_tokenizer.decoder.up.2.upsample.conv.weight"
    assert used["discrete_vae/decoder/up_0_attn_1/norm/scale"] == "image_tokenizer.decoder.up.2.attn.1.norm.weight"
    assert used["discrete_vae/encoder/down_1_downsample/conv/bias"] == "image_tokenizer.encoder.down.1.downsample.conv.bias"
    assert used["discrete_vae/quantize/embedding"] == "image_tokenizer.quantize.embedding.weight"
    assert used["decoder/segments_embedding/embedding"] == "network.decoder.segments_embedding.weight"
    assert used["decoder/cross_position_k_linear/kernel"] == "network.decoder.cross_position_k_linear.weight"
    assert used["token_embedder/embedding"] == "network.token_embedder.weight"


def test_converted_model_reproduces_the_original_numerics(realistic_ckpt):
    """Encoder states, teacher-forced logits, VQ-GAN codes and decodes against the NumPy transcription."""
    cfg, path = realistic_ckpt
    model = orig.load_original(path)
    P = to_float64(load_flax_msgpack(path))
    rng = np.random.default_rng(1)
    heads = cfg.num_heads
    b, gh, gw = 2, 4, 4

    # ---- VQ-GAN: codes of target images, and decodes of codes
    targets = rng.uniform(-1, 1, (b, 32, 32, 3))
    codes_ref = ref_vq_encode(P["discrete_vae"], targets)
    codes = model.encode_image_targets(torch.tensor(targets, dtype=torch.float32).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(codes.numpy(), codes_ref)
    dec_ref = ref_vq_decode(P["discrete_vae"], codes_ref, (8, 8))
    dec = model.decode_image_codes(torch.tensor(codes_ref)).permute(0, 2, 3, 1).double().numpy()
    np.testing.assert_allclose(dec, dec_ref, rtol=0, atol=2e-5 * np.abs(dec_ref).max())

    # ---- encoder: text with padding, image with masked patches
    text = rng.integers(3, 33100, (b, 7))
    text[1, 5:] = 0
    image = rng.standard_normal((b, 64, 64, 3))
    imask = np.ones((b, gh * gw), bool)
    imask[0, 3] = imask[1, 10:] = False
    enc_ref, emask = ref_encode(P, text, image, imask, heads)
    batch = {"text_inputs": torch.tensor(text), "image_inputs": torch.tensor(image, dtype=torch.float32).permute(0, 3, 1, 2),
             "image_input_masks": torch.tensor(imask)}
    with torch.no_grad():
        enc = model.encode(batch)
    h = enc.hidden.double().numpy()
    np.testing.assert_allclose(h[emask], enc_ref[emask], rtol=0, atol=1e-5 * np.abs(enc_ref).max())

    # ---- decoder: teacher-forced text + image slots, image targets tokenised inside the model
    tt = rng.integers(3, 33100, (b, 5))
    tt[1, 3:] = 0
    batch.update(text_targets=torch.tensor(tt), image_targets=torch.tensor(targets, dtype=torch.float32).permute(0, 3, 1, 2),
                 image_target_masks=torch.tensor(np.ones((b, 64), bool)))
    text_in = np.concatenate([np.zeros((b, 1), int), tt[:, :-1]], 1)  # shift right, 0 start
    image_in = np.concatenate([np.full((b, 1), 33151), codes_ref[:, :-1] + 33152], 1)  # BOS 33151, code + 33152
    dmask = np.concatenate([tt > 0, np.ones((b, 64), bool)], 1)
    logits_ref = ref_decode(P, enc_ref, emask, text_in, tt > 0, image_in, np.ones((b, 64), bool), heads, gw * 2)
    with torch.no_grad():
        out = model(batch, return_logits=True)
    logits = out.logits.double().numpy()
    live = logits_ref > -1e9
    assert np.array_equal(logits <= -1e9, ~live)  # the same modality masks
    np.testing.assert_allclose(logits[dmask][live[dmask]], logits_ref[dmask][live[dmask]], rtol=0,
                               atol=1e-5 * np.abs(logits_ref[live]).max())
    # the loss is the cross-entropy of those logits
    full = np.concatenate([tt, codes_ref + 33152], 1)
    lse = np.log(np.exp(logits_ref - logits_ref.max(-1, keepdims=True)).sum(-1)) + logits_ref.max(-1)
    nll = lse - np.take_along_axis(logits_ref, full[..., None], -1)[..., 0]
    assert float(out.loss) == pytest.approx(nll[dmask].mean(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# The save_pretrained directory, the CLI and from_pretrained
# ------------------------------------------------------------------------------------------------
def _tiny_batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"text_inputs": torch.randint(3, 30000, (2, 6), generator=g),
            "image_inputs": torch.randn(2, 3, *cfg.image_input_size, generator=g),
            "image_input_masks": torch.ones(2, cfg.encoder_max_image_len, dtype=torch.bool),
            "text_targets": torch.randint(3, 30000, (2, 4), generator=g),
            "image_target_codes": torch.randint(0, cfg.image_vocab, (2, cfg.decoder_max_image_len), generator=g),
            "image_target_masks": torch.ones(2, cfg.decoder_max_image_len, dtype=torch.bool)}


def test_cli_writes_the_save_pretrained_format(realistic_ckpt, tmp_path, capsys):
    from safetensors import safe_open

    from uio import Model
    from uio.cli.convert import main

    cfg, path = realistic_ckpt
    assert main([str(path), str(tmp_path / "converted")]) == 0
    assert "load it with" in capsys.readouterr().out
    ref = orig.load_original(path)
    ref.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "converted/config.json").read_text() == (tmp_path / "saved/config.json").read_text()
    with safe_open(tmp_path / "converted/model.safetensors", "pt") as a, \
            safe_open(tmp_path / "saved/model.safetensors", "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k

    batch = _tiny_batch(cfg)
    loaded = Model.from_pretrained(tmp_path / "converted")
    direct = Model.from_pretrained(path)  # the .bin itself: converted on the fly
    with torch.no_grad():
        want = ref(batch, return_logits=True).logits
        assert torch.equal(loaded(batch, return_logits=True).logits, want)
        assert torch.equal(direct(batch, return_logits=True).logits, want)


def test_cli_bfloat16_storage_and_errors(realistic_ckpt, tmp_path, capsys):
    from safetensors import safe_open

    from uio.cli.convert import main

    cfg, path = realistic_ckpt
    assert main([str(path), str(tmp_path / "bf16"), "--dtype", "bfloat16", "-q"]) == 0
    with safe_open(tmp_path / "bf16/model.safetensors", "pt") as f:
        assert f.get_slice("network.encoder.layers.0.mlp.wo.weight").get_dtype() == "BF16"
        assert f.get_slice("image_tokenizer.decoder.conv_out.weight").get_dtype() == "F32"
    # a released size that is not this checkpoint: every disagreement is named
    assert main([str(path), str(tmp_path / "x"), "--size", "small", "-q"]) == 1
    err = capsys.readouterr().err
    assert "encoder/layers_0/mlp/wi_0/kernel: checkpoint (64, 96), config expects (512, 1024)" in err
    assert "d_model: checkpoint 64, config 512" in err and "num_decoder_layers: checkpoint 2, config 8" in err
    assert "discrete_vae/quantize/embedding: checkpoint (64, 16), config expects (16384, 256)" not in err  # from file
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main([str(tmp_path / "notes.txt"), str(tmp_path / "y")]) == 2
    assert "not a Flax msgpack checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.bin"), str(tmp_path / "y")]) == 2
    assert main([str(path), str(tmp_path / "z"), "--spiece", str(tmp_path / "nope.model")]) == 1
    assert "T5's SentencePiece model" in capsys.readouterr().err


def test_spiece_sets_the_text_vocabulary(tmp_path, text_tokenizer, capsys):
    from uio import Model
    from uio.cli.convert import main

    n = text_tokenizer.vocab.text_vocab
    cfg = reduced_config(text_vocab=n, num_encoder_layers=1, num_decoder_layers=1)
    path = write_flax_msgpack(orig.original_tree(orig.original_shapes(cfg, VQ), realistic_fill(2)),
                              tmp_path / "ckpt" / "custom_1000k.bin")
    # N cannot be read off a padded table that is not T5's: the error asks for the spiece.model
    with pytest.raises(ValueError, match="pass the spiece.model"):
        orig.load_original(path)
    model = orig.load_original(path, spiece=text_tokenizer.model_file)
    assert model.config.text_vocab == n and model.text_tokenizer is not None
    assert model.text_tokenizer.encode("a red cube") == text_tokenizer.encode("a red cube")
    # a spiece.model beside the checkpoint is picked up
    text_tokenizer.save(path.parent)
    assert orig.load_original(path).config.text_vocab == n
    assert main([str(path), str(tmp_path / "out"), "-q"]) == 0
    loaded = Model.from_pretrained(tmp_path / "out")
    assert loaded.text_tokenizer is not None and loaded.config.text_vocab == n


def test_wrong_spiece_is_rejected(realistic_ckpt, text_tokenizer):
    _, path = realistic_ckpt
    with pytest.raises(ValueError, match=r"wrong spiece.model for this checkpoint"):
        orig.load_original(path, spiece=text_tokenizer.model_file)


def _write_variant(tmp_path, name, cfg, edit=None):
    tree = orig.original_tree(orig.original_shapes(cfg, VQ), realistic_fill(3))
    if edit:
        edit(tree)
    return write_flax_msgpack(tree, tmp_path / f"{name}.bin")


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    cfg = reduced_config(num_encoder_layers=1, num_decoder_layers=2)
    missing = _write_variant(tmp_path, "missing", cfg, lambda t: t["decoder"]["layers_1"]["mlp"].pop("wo"))
    with pytest.raises(orig.ConversionError, match=r"network.decoder.layers.1.mlp.wo.weight \(64, 96\): missing"):
        orig.load_original(missing)
    extra = _write_variant(tmp_path, "extra", cfg,
                           lambda t: t["encoder"].update(logits_dense={"kernel": np.zeros((64, 5), np.float32)}))
    with pytest.raises(orig.ConversionError, match=r"encoder/logits_dense/kernel \(64, 5\) -> network.encoder.logits_dense.weight: no such parameter"):
        orig.load_original(extra)
    stray_vae = _write_variant(tmp_path, "stray", cfg,
                               lambda t: t["discrete_vae"]["encoder"].update(extra_block={"scale": np.ones(3, np.float32)}))
    with pytest.raises(orig.ConversionError, match="discrete_vae/encoder/extra_block/scale"):
        orig.load_original(stray_vae)
    good = _write_variant(tmp_path, "good", cfg)
    with pytest.raises(orig.ConversionError, match=r"encoder/layers_0/mlp/wi_0/kernel: checkpoint \(64, 96\), "
                                                   r"config expects \(64, 128\)"):
        orig.load_original(good, config=dataclasses.replace(cfg, d_ff=128))
    # the model-side check names the parameter too (a model built by hand for the same file)
    from uio import Model

    wrong = Model(dataclasses.replace(cfg, d_ff=128, image_tokenizer={"name": "vqgan", "config": VQ.to_dict()}),
                  init=False)
    with pytest.raises(orig.ConversionError, match=r"network.encoder.layers.0.mlp.wi_0.weight: converts to \(96, 64\), "
                                                   r"model expects \(128, 64\)"):
        orig.convert_checkpoint(good, wrong)
    scalars = _write_variant(tmp_path, "scalars", cfg, lambda t: t.update(step=np.int32(1000)))
    with pytest.raises(orig.ConversionError, match="non-array leaves"):
        orig.load_original(scalars)
    # an explicit config that matches loads; a Flax "params" wrapper is unwrapped
    wrapped = write_flax_msgpack({"params": load_flax_msgpack(good)}, tmp_path / "wrapped.bin")
    a = orig.load_original(good, config=cfg).state_dict()
    b = orig.load_original(wrapped).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dead_cross_position_tensors_are_dropped_with_a_note_when_the_model_lacks_them(tmp_path, caplog):
    from uio import Model

    cfg = reduced_config(num_encoder_layers=1, num_decoder_layers=1)
    path = _write_variant(tmp_path, "dead", cfg)
    model = Model(dataclasses.replace(cfg, image_tokenizer={"name": "vqgan", "config": VQ.to_dict()}), init=False)
    del model.network.decoder.cross_position_q_linear, model.network.decoder.cross_position_k_linear
    with caplog.at_level("INFO", logger="uio.convert.original"):
        plan = orig.convert_checkpoint(path, model)
    assert set(plan.dropped) == {"decoder/cross_position_q_linear/kernel", "decoder/cross_position_k_linear/kernel"}
    assert all("never applied" in why for why in plan.dropped.values())
    assert "not loaded: decoder/cross_position_q_linear/kernel" in caplog.text
    # the same model with them keeps them (loaded, though the original never uses them)
    full = orig.load_original(path)
    ref = load_flax_msgpack(path)["decoder"]["cross_position_q_linear"]["kernel"]
    assert torch.equal(full.network.decoder.cross_position_q_linear.weight, torch.from_numpy(ref).t())


# ------------------------------------------------------------------------------------------------
# Full size: the real `small` checkpoint layout, converted in bounded memory
# ------------------------------------------------------------------------------------------------
_MEASURE = r"""
import json, resource, sys
import torch
import uio.convert.original as o
from uio.config import ModelConfig
src, out, mode, warm = sys.argv[1:5]
o.convert_to_directory(warm, out + "_warm")  # imports and one-off allocations happen here, not below
o.load_original(warm)
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
base = hwm()
if mode == "stream":
    o.convert_to_directory(src, out)
else:
    model = o.load_original(src)
print(json.dumps({"base": base, "peak": hwm(), "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.slow
def test_full_size_small_converts_in_bounded_memory(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    from uio import Model

    small = ModelConfig.from_size("small")
    vq = get_config("vqgan_imagenet_f16_16384")
    src = tmp_path / "small_1000k.bin"
    code = ("import sys; from uio.config import ModelConfig; from uio.image_tokenizer.vqgan import get_config; "
            "from uio.convert.original import write_original_checkpoint as w; "
            "w(sys.argv[1], ModelConfig.from_size('small'), get_config('vqgan_imagenet_f16_16384'), seed=5); "
            "w(sys.argv[2], ModelConfig(name='t', d_model=64, num_heads=2, d_ff=96, num_encoder_layers=1, "
            "num_decoder_layers=1, image_vocab=64, image_input_size=(64, 64), image_target_grid=(8, 8), "
            "image_target_size=(32, 32)), get_config('vqgan_test'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "warm.bin")], check=True, env=env)
    size = src.stat().st_size
    n_params = sum(math.prod(s) for s in orig.original_shapes(small, vq).values())
    assert size > 4 * n_params  # the real thing: 147.8M float32 parameters (~0.59 GB)

    peaks = {}
    for mode in ("stream", "memory"):
        res = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / f"out_{mode}"), mode,
                              str(tmp_path / "warm.bin")], check=True, env=env, capture_output=True, text=True)
        peaks[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    largest = 49536 * 512 * 4  # the token table, the biggest single tensor (101 MB)
    stream = peaks["stream"]["peak"] - peaks["stream"]["base"]
    memory = peaks["memory"]["peak"] - peaks["memory"]["base"]
    # streaming to safetensors: about one tensor in flight, never the checkpoint
    assert stream < largest + 100 * 2**20, (stream, size)
    # into memory: the model itself plus about one tensor, not a second copy of the checkpoint
    assert memory < 4 * n_params + largest + 150 * 2**20, (memory, size)

    out = tmp_path / "out_stream"
    model = Model.from_pretrained(out)
    assert model.config.name == "small"
    assert sum(p.numel() for p in model.parameters()) == n_params
    with read_flax_msgpack(src) as f, safe_open(out / "model.safetensors", "pt") as st:
        flat = f.flat()
        assert torch.equal(st.get_tensor("network.token_embedder.weight"), flat["token_embedder/embedding"].torch())
        assert torch.equal(st.get_tensor("network.decoder.layers.7.encoder_decoder_attention.out.weight"),
                           flat["decoder/layers_7/encoder_decoder_attention/out/kernel"].torch().t())
        assert torch.equal(st.get_tensor("image_tokenizer.decoder.up.4.attn.2.proj_out.weight"),
                           flat["discrete_vae/decoder/up_0_attn_2/proj_out/kernel"].torch().permute(3, 2, 0, 1))
    with torch.no_grad():
        out = model(_tiny_batch(model.config))
    assert torch.isfinite(out.loss)
