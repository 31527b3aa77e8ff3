"""The Unified-IO network: position buckets, parameter counts, masks, parity with a literal
transcription of the original forward pass, forward/backward, input errors."""
from __future__ import annotations

import math
import time

import einops
import numpy as np
import pytest
import torch

from uio import Model, ModelConfig
from uio.modeling.layers import RMSNorm
from uio.modeling.network import UnifiedIONetwork
from uio.modeling.position import (RelativePositionBiases, image_relative_position_bucket, relative_position_bucket,
                                   resize_position_embeddings)

TINY = dict(text_vocab=500, image_vocab=64, image_input_size=(64, 64), image_target_grid=(4, 4),
            image_target_size=(32, 32))


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig.from_size("tiny", **{**TINY, **kw})


def make_batch(cfg: ModelConfig, b: int = 3, seed: int = 0, image_targets: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab
    text = torch.randint(3, v.text_vocab, (b, 7), generator=g)
    text[:, -1] = v.eos_id
    text[0, 4:] = 0  # padding
    text[0, 3] = v.eos_id
    targets = torch.randint(3, v.text_vocab, (b, 5), generator=g)
    targets[:, -1] = v.eos_id
    targets[1, 2] = v.eos_id
    targets[1, 3:] = 0
    p = cfg.encoder_max_image_len
    masks = torch.rand(b, p, generator=g) > 0.3
    masks[-1] = False  # a text-only row
    batch = dict(text_inputs=text, image_inputs=torch.randn(b, 3, *cfg.image_input_size, generator=g),
                 image_input_masks=masks, text_targets=targets, tasks=["t"] * b, meta=[{}] * b)
    if image_targets:
        ni = cfg.decoder_max_image_len
        batch["image_target_codes"] = torch.randint(0, cfg.image_vocab, (b, ni), generator=g)
        tm = torch.ones(b, ni, dtype=torch.bool)
        tm[0] = False  # a row without an image target
        batch["image_target_masks"] = tm
    return batch


@pytest.fixture(scope="module")
def tiny_model() -> Model:
    torch.manual_seed(0)
    return Model(tiny_config())


# ---- relative position buckets (hand-computed from the original formulas) ---------------------
def test_t5_buckets_bidirectional_by_hand():
    # 32 buckets, max distance 128 -> 16 per direction, 8 exact; n = query - key
    # n >= 8: 8 + int(log(n / 8) / log(16) * 8): n=16 -> 8 + int(2.0000x) = 10, n=20 -> 8 + int(2.64) = 10,
    # n=50 -> 8 + int(5.29) = 13, n=127 -> 8 + int(7.97) = 15, n=500 -> min(8 + 13, 15) = 15.
    # keys after the query (n < 0) add 16.
    rel = torch.tensor([0, -1, -7, -8, -16, -20, -50, -127, -500, 1, 7, 8, 16, 20, 50, 500])
    want = [0, 1, 7, 8, 10, 10, 13, 15, 15, 17, 23, 24, 26, 26, 29, 31]
    assert relative_position_bucket(rel, bidirectional=True).tolist() == want


def test_t5_buckets_causal_by_hand():
    # causal: 32 buckets, 16 exact; n >= 16: 16 + int(log(n / 16) / log(8) * 16);
    # n=32 -> 16 + int(5.33) = 21, n=100 -> 16 + int(14.1) = 30, n=128 -> min(32, 31); future keys -> 0
    rel = torch.tensor([0, -1, -15, -16, -32, -100, -128, -1000, 1, 5, 300])
    want = [0, 1, 15, 16, 21, 30, 31, 31, 0, 0, 0]
    assert relative_position_bucket(rel, bidirectional=False).tolist() == want


def test_image_buckets_by_hand():
    # 8 buckets per axis, 4 exact, max distance 20: b(n) = n for n < 4, else 4 + int(log(n/4)/log(5)*4)
    # (b(5)=4, b(7)=5, b(10)=6, b(14)=7, b(20)=7). nx/ny = query - key; quadrant offsets 64/128/192.
    cases = [  # (query (x, y), key (x, y), bucket)
        ((0, 0), (0, 0), 0),
        ((5, 5), (0, 0), 4 + 8 * 4),          # nx=ny=5 > 0: quadrant 0
        ((0, 0), (5, 3), 192 + 4 + 8 * 3),    # nx=-5<=0, ny=-3<0: quadrant 3
        ((3, 0), (0, 2), 64 + 3 + 8 * 2),     # nx=3>0, ny=-2<=0: quadrant 1
        ((0, 2), (3, 0), 128 + 3 + 8 * 2),    # nx=-3<0, ny=2>=0: quadrant 2
        ((0, 0), (0, 10), 192 + 0 + 8 * 6),   # nx=0, ny=-10: quadrant 3
        ((10, 0), (0, 0), 64 + 6),            # nx=10, ny=0: quadrant 1
        ((0, 7), (14, 0), 128 + 7 + 8 * 5),   # nx=-14, ny=7: quadrant 2
        ((20, 20), (0, 0), 7 + 8 * 7),
    ]
    qx = torch.tensor([c[0][0] for c in cases])
    qy = torch.tensor([c[0][1] for c in cases])
    kx = torch.tensor([c[1][0] for c in cases])
    ky = torch.tensor([c[1][1] for c in cases])
    got = image_relative_position_bucket(kx - qx, ky - qy)
    assert got.tolist() == [c[2] for c in cases]
    assert int(got.max()) < 256


def test_relative_bias_block_structure():
    rp = RelativePositionBiases(num_heads=2)
    rp.reset_parameters()
    grid = (3, 4)
    bias = rp(5, None, grid, bidirectional=True)  # (1, H, 5 + 12, 5 + 12)
    assert bias.shape == (1, 2, 17, 17)
    assert torch.all(bias[:, :, :5, 5:] == 0) and torch.all(bias[:, :, 5:, :5] == 0)  # no text<->image bias
    # text block: rel_embedding[h, bucket(key - query)]
    assert torch.equal(bias[0, 1, 4, 0], rp.rel_embedding[1, 4])  # n = 4 -> bucket 4
    assert torch.equal(bias[0, 0, 0, 3], rp.rel_embedding[0, 16 + 3])  # key after query
    # image block: patch 0 = (x0, y0) queries patch 6 = (x2, y1): nx=-2, ny=-1 -> quadrant 3
    assert torch.equal(bias[0, 1, 5 + 0, 5 + 6], rp.image_rel_embedding[1, 192 + 2 + 8 * 1])
    # a subset of patch ids gathers the same entries
    ids = torch.tensor([[0, 6, 11]])
    sub = rp(5, ids, grid, bidirectional=True)
    full_idx = torch.tensor([0, 1, 2, 3, 4, 5 + 0, 5 + 6, 5 + 11])
    assert torch.equal(sub[0], bias[0][:, full_idx][:, :, full_idx])
    # tables are cached per (length, grid)
    assert rp.index(5, None, grid, True, torch.device("cpu")) is rp.index(5, None, grid, True, torch.device("cpu"))


# ---- sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,millions", [("small", 71.7), ("base", 241.4), ("large", 776.5), ("xl", 2849.2)])
def test_parameter_counts_on_meta(size, millions):
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Model(ModelConfig.from_size(size))
    n = model.num_parameters()
    assert all(p.is_meta for p in model.parameters())
    assert abs(n / 1e6 - millions) / millions < 0.005, n
    cfg = model.config
    assert model.network.encoder.layers[0].attention.query.weight.shape == (cfg.num_heads * 64, cfg.d_model)
    assert time.perf_counter() - t0 < 60  # generous: no weights are allocated or initialised


def test_released_geometry_and_names():
    with torch.device("meta"):
        net = UnifiedIONetwork(ModelConfig.from_size("small"))
    names = dict(net.named_parameters())
    assert names["encoder.position_embedding.weight"].shape == (256 + 576, 512)
    assert names["decoder.position_embedding.weight"].shape == (256 + 256, 512)
    assert names["token_embedder.weight"].shape == (49536, 512)
    assert names["encoder.image_projection.weight"].shape == (512, 768)
    assert names["encoder.relpos_bias.image_rel_embedding"].shape == (6, 256)
    assert names["decoder.relpos_bias.rel_embedding"].shape == (6, 32)
    assert names["encoder.layers.0.attention.out.weight"].shape == (512, 384)  # 6 heads x 64 != 512
    for key in ("decoder.segments_embedding.weight", "encoder.segment_embedding.weight",
                "decoder.cross_position_q_linear.weight", "decoder.layers.7.encoder_decoder_attention.key.weight",
                "decoder.layers.0.pre_cross_attention_layer_norm.weight", "encoder.txt_emb_pre_ln.weight",
                "encoder.img_emb_pre_ln.weight", "encoder.pe_pre_ln.weight", "decoder.pre_ln.weight"):
        assert key in names, key
    assert not any(n.endswith(".bias") for n in names)


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown model size 'huge'.*'xl'"):
        ModelConfig.from_size("huge")


def test_init_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig.from_size("tiny", text_vocab=500, image_vocab=64)
    net = Model(cfg).network
    d, dh = cfg.d_model, cfg.head_dim
    q = net.encoder.layers[0].attention.query.weight
    k = net.encoder.layers[0].attention.key.weight
    assert q.std().item() == pytest.approx((d * dh) ** -0.5, rel=0.05)  # 1/sqrt(head_dim) folded in
    assert k.std().item() == pytest.approx(d**-0.5, rel=0.05)
    assert net.token_embedder.weight.std().item() == pytest.approx(1.0, rel=0.02)
    wo = net.encoder.layers[0].mlp.wo.weight
    assert wo.std().item() == pytest.approx(cfg.d_ff**-0.5, rel=0.05)
    assert wo.abs().max().item() <= 2 * cfg.d_ff**-0.5 / 0.8796 + 1e-6  # truncated at 2 std
    for m in net.modules():
        if isinstance(m, RMSNorm):
            assert torch.all(m.weight == 1)


def test_sincos_init_ties_patches_slots_and_location_bins():
    """``sincos_init`` replaces the N(0, 1) rows of the image positions (encoder patches, decoder
    image slots) and of the location tokens by sin-cos codes in location-bin units: same scale, and
    a patch's column (row) code matches best the location bins of its own column (row) centre."""
    torch.manual_seed(0)
    cfg = tiny_config(image_input_size=(128, 128), image_target_grid=(8, 8), sincos_init=True)
    net = Model(cfg).network
    v, d = cfg.vocab, cfg.d_model
    enc = net.encoder.position_embedding.weight[cfg.encoder_max_text_len:].detach()
    dec = net.decoder.position_embedding.weight[cfg.decoder_max_text_len:].detach()
    loc = net.token_embedder.weight[v.loc_id(torch.arange(v.num_loc_bins))].detach()  # row b = bin b
    for table in (enc, dec, loc):
        assert table.pow(2).mean().item() == pytest.approx(1.0, rel=0.02)  # the scale of N(0, 1)
    assert torch.allclose(enc, dec)  # the 8x8 slots over the 8x8 patches start with the patches' codes
    assert torch.equal(loc[:, : d // 2], loc[:, d // 2 :])  # x and y share the bins
    gh, gw = cfg.patch_grid
    half = d // 2
    for pid in (0, 9, 27, 63):
        r, c = divmod(pid, gw)
        best_row = int((loc[:, :half] @ enc[pid, :half]).argmax())
        best_col = int((loc[:, half:] @ enc[pid, half:]).argmax())
        assert abs(best_row - (r + 0.5) * 1000 / gh) <= 2 and abs(best_col - (c + 0.5) * 1000 / gw) <= 2
    # the rest is the original initialisation, and without the option nothing changes
    torch.manual_seed(0)
    plain = Model(tiny_config(image_input_size=(128, 128), image_target_grid=(8, 8))).network
    assert torch.equal(plain.token_embedder.weight[: v.text_vocab], net.token_embedder.weight[: v.text_vocab])
    assert torch.equal(plain.encoder.layers[0].attention.query.weight, net.encoder.layers[0].attention.query.weight)
    plain_enc = plain.encoder.position_embedding.weight[cfg.encoder_max_text_len:]
    assert plain_enc.std().item() == pytest.approx(1.0, rel=0.1) and not torch.allclose(plain_enc, enc)
    with pytest.raises(ValueError, match="sincos_init needs d_model divisible by 4"):
        Model(tiny_config(d_model=258, sincos_init=True))


# ---- a literal transcription of the original forward (float64) ---------------------------------
def _ref_bucket(n: np.ndarray, num_buckets: int, max_distance: int, bidirectional: bool) -> np.ndarray:
    ret = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    eps = np.finfo(np.float32).eps
    large = max_exact + (np.log(n.astype(np.float32) / max_exact + eps) / np.log(np.float32(max_distance / max_exact))
                         * (num_buckets - max_exact)).astype(np.int64)
    return ret + np.where(n < max_exact, n, np.minimum(large, num_buckets - 1))


def _ref_relpos(rp, t_len: int, img_ids: np.ndarray, width: int, bidirectional: bool) -> torch.Tensor:
    """``RelativePositionBiases.__call__``: text buckets, 2-D image buckets, zero-padded blocks."""
    t = np.arange(t_len)
    tb = _ref_bucket(t[:, None] - t[None, :], 32, 128, bidirectional)  # n = query - key
    x, y = img_ids % width, img_ids // width
    nx, ny = x[:, None] - x[None, :], y[:, None] - y[None, :]
    ib = (((nx <= 0) & (ny < 0)) * 192 + ((nx < 0) & (ny >= 0)) * 128 + ((nx > 0) & (ny <= 0)) * 64
          + _ref_bucket(np.abs(nx), 8, 20, False) + 8 * _ref_bucket(np.abs(ny), 8, 20, False))
    h = rp.rel_embedding.shape[0]
    n = t_len + len(img_ids)
    out = torch.zeros(h, n, n, dtype=torch.float64)
    out[:, :t_len, :t_len] = rp.rel_embedding.double()[:, torch.from_numpy(tb)]
    out[:, t_len:, t_len:] = rp.image_rel_embedding.double()[:, torch.from_numpy(ib)]
    return out


def _ref_ln(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w.double()


def _ref_attention(attn, xq, xkv, mask, bias, cfg):
    h, dh = cfg.num_heads, cfg.head_dim
    q = (xq @ attn.query.weight.double().T).unflatten(-1, (h, dh))
    k = (xkv @ attn.key.weight.double().T).unflatten(-1, (h, dh))
    v = (xkv @ attn.value.weight.double().T).unflatten(-1, (h, dh))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k)  # no 1/sqrt(d)
    att_bias = torch.where(mask > 0, 0.0, -1e10)
    if bias is not None:
        att_bias = att_bias + bias
    w = torch.softmax(logits + att_bias, -1)
    return torch.einsum("bhqk,bkhd->bqhd", w, v).flatten(2) @ attn.out.weight.double().T


def _ref_mlp(mlp, x):
    gelu = torch.nn.functional.gelu(x @ mlp.wi_0.weight.double().T, approximate="tanh")
    return (gelu * (x @ mlp.wi_1.weight.double().T)) @ mlp.wo.weight.double().T


def reference_logits(net: UnifiedIONetwork, text, image, img_mask, dec_in, text_len, dec_mask) -> torch.Tensor:
    cfg = net.config
    enc, dec = net.encoder, net.decoder
    E = net.token_embedder.weight.double()
    d, h = cfg.d_model, cfg.num_heads
    lt = text.shape[1]
    # ---- Encoder.__call__
    img = einops.rearrange(image.double().permute(0, 2, 3, 1), "b (h dh) (w dw) c -> b (h w) (dh dw c)",
                           dh=cfg.patch_size, dw=cfg.patch_size)
    P = enc.position_embedding.weight.double()
    txt_pos = P[:lt][None]
    img_pos = P[cfg.encoder_max_text_len + torch.arange(img.shape[1])][None]
    img_emb = img @ enc.image_projection.weight.double().T
    seg = enc.segment_embedding.weight.double()
    txt_emb = _ref_ln(E[text] + seg[0] + txt_pos, enc.txt_emb_pre_ln.weight)
    img_emb = _ref_ln(img_emb + seg[1] + img_pos, enc.img_emb_pre_ln.weight)
    pe = _ref_ln(torch.cat([txt_pos, img_pos], 1), enc.pe_pre_ln.weight)
    pq = (pe @ enc.position_q_linear.weight.double().T).unflatten(-1, (h, -1))
    pk = (pe @ enc.position_k_linear.weight.double().T).unflatten(-1, (h, -1))
    abs_bias = torch.einsum("bqhd,bkhd->bhqk", pq, pk) * (d / h) ** -0.5
    rel = _ref_relpos(enc.relpos_bias, lt, np.arange(img.shape[1]), cfg.patch_grid[1], True)[None]
    m = torch.cat([text > 0, img_mask], 1).double()
    mask = (m[:, :, None] * m[:, None, :])[:, None]  # make_attention_mask(query AND key)
    x = torch.cat([txt_emb, img_emb], 1)
    for layer in enc.layers:
        y = _ref_attention(layer.attention, _ref_ln(x, layer.pre_attention_layer_norm.weight),
                           _ref_ln(x, layer.pre_attention_layer_norm.weight), mask, rel + abs_bias, cfg)
        x = x + y
        x = x + _ref_mlp(layer.mlp, _ref_ln(x, layer.pre_mlp_layer_norm.weight))
    encoded = _ref_ln(x, enc.encoder_norm.weight)
    # ---- Transformer.decode / Decoder.__call__
    li = dec_in.shape[1] - text_len
    positions = torch.cat([torch.arange(text_len), cfg.decoder_max_text_len + torch.arange(li)])
    segments = torch.cat([torch.zeros(text_len, dtype=torch.long), torch.ones(li, dtype=torch.long)])
    DP = dec.position_embedding.weight.double()
    y = E[dec_in] + DP[positions][None] + dec.segments_embedding.weight.double()[segments][None]
    y = _ref_ln(y, dec.pre_ln.weight)
    pe = _ref_ln(DP[positions][None], dec.pe_pre_ln.weight)
    pq = (pe @ dec.self_position_q_linear.weight.double().T).unflatten(-1, (h, -1))
    pk = (pe @ dec.self_position_k_linear.weight.double().T).unflatten(-1, (h, -1))
    self_abs = torch.einsum("bqhd,bkhd->bhqk", pq, pk) * (d / h) ** -0.5
    rel = _ref_relpos(dec.relpos_bias, text_len, np.arange(li), cfg.image_target_grid[1], False)[None]
    dm = dec_mask.double()
    n = dec_in.shape[1]
    causal = torch.tril(torch.ones(n, n, dtype=torch.float64))
    self_mask = (causal[None] * dm[:, :, None] * dm[:, None, :])[:, None]
    cross_mask = (dm[:, :, None] * m[:, None, :])[:, None]
    for layer in dec.layers:
        z = _ref_ln(y, layer.pre_self_attention_layer_norm.weight)
        y = y + _ref_attention(layer.self_attention, z, z, self_mask, rel + self_abs, cfg)
        z = _ref_ln(y, layer.pre_cross_attention_layer_norm.weight)
        y = y + _ref_attention(layer.encoder_decoder_attention, z, encoded, cross_mask, None, cfg)
        y = y + _ref_mlp(layer.mlp, _ref_ln(y, layer.pre_mlp_layer_norm.weight))
    y = _ref_ln(y, dec.decoder_norm.weight)
    logits = y @ E.T / math.sqrt(d)
    split = cfg.vocab.text_vocab_size
    logits[:, :text_len, split:] = -1e10
    logits[:, text_len:, :split] = -1e10
    return logits


def test_forward_matches_literal_transcription_of_the_original(tiny_model):
    cfg = tiny_model.config
    net = tiny_model.network
    batch = make_batch(cfg)
    v = cfg.vocab
    tt, codes, tmask = batch["text_targets"], batch["image_target_codes"], batch["image_target_masks"]
    dec_in = torch.cat([torch.zeros_like(tt[:, :1]), tt[:, :-1], torch.full_like(codes[:, :1], v.image_bos_id),
                        codes[:, :-1] + v.image_offset], 1)
    dec_mask = torch.cat([tt > 0, tmask], 1)
    with torch.no_grad():
        got = net(batch["text_inputs"], batch["image_inputs"], batch["image_input_masks"], dec_in, tt.shape[1],
                  dec_mask)
        want = reference_logits(net, batch["text_inputs"], batch["image_inputs"], batch["image_input_masks"], dec_in,
                                tt.shape[1], dec_mask)
    assert got.shape == (3, tt.shape[1] + 16, v.size)
    diff = (got.double() - want)[dec_mask]  # valid decoder slots (padding rows are never read)
    assert diff.abs().max().item() < 2e-4, diff.abs().max().item()
    # the model loss is the cross-entropy of those masked logits
    out = tiny_model(batch)
    logp = torch.log_softmax(want, -1)
    targets = torch.cat([tt, codes + v.image_offset], 1)
    nll = -logp.gather(-1, targets[..., None])[..., 0][dec_mask]
    assert out.loss.item() == pytest.approx(nll.mean().item(), abs=1e-4)
    rows = [(-logp.gather(-1, targets[..., None])[..., 0] * dec_mask)[i].sum() / dec_mask[i].sum() for i in range(3)]
    torch.testing.assert_close(out.per_example_loss.double(), torch.stack(rows), atol=1e-4, rtol=0)


def test_cross_position_projections_are_dead(tiny_model):
    batch = make_batch(tiny_model.config)
    with torch.no_grad():
        a = tiny_model(batch).loss
        dec = tiny_model.network.decoder
        saved = dec.cross_position_q_linear.weight.clone()
        dec.cross_position_q_linear.weight.mul_(7.0)
        b = tiny_model(batch).loss
        dec.cross_position_q_linear.weight.copy_(saved)
    assert torch.equal(a, b)


# ---- masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_vocab", [500, 1000])
def test_modality_masks_follow_the_vocabulary(text_vocab):
    torch.manual_seed(0)
    cfg = tiny_config(text_vocab=text_vocab, num_encoder_layers=1, num_decoder_layers=1)
    model = Model(cfg)
    v = model.vocab
    assert v.image_offset == ((text_vocab + 1100 + 127) // 128) * 128
    out = model(make_batch(cfg), return_logits=True)
    ld = 5
    assert out.logits.shape[-1] == v.size
    assert torch.all(out.logits[:, :ld, v.image_offset :] == -1e10)
    assert torch.all(out.logits[:, ld:, : v.image_offset] == -1e10)
    assert torch.all(out.logits[:, :ld, : v.image_offset] > -1e9)
    assert torch.all(out.logits[:, ld:, v.image_offset :] > -1e9)
    gen = model.generate(make_batch(cfg), max_text_len=4, image_output=True)
    assert torch.all(gen.text_tokens < v.text_vocab_size)
    assert torch.all((gen.image_codes >= 0) & (gen.image_codes < v.image_vocab))


def test_masked_patches_and_padding_change_nothing_valid(tiny_model):
    """Invisible patches and text padding only reach masked positions."""
    cfg = tiny_model.config
    batch = make_batch(cfg, image_targets=False)
    with torch.no_grad():
        base = tiny_model(batch).per_example_loss
        b2 = dict(batch)
        img = batch["image_inputs"]
        # scramble the pixels of every invisible patch and append more text padding
        patches = tiny_model.network.patchify(img)[0]
        noise = torch.randn_like(patches) * (~batch["image_input_masks"])[..., None]
        gh, gw = cfg.patch_grid
        p = cfg.patch_size
        noise_img = noise.view(3, gh, gw, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(img.shape)
        b2["image_inputs"] = img + noise_img
        b2["text_inputs"] = torch.cat([batch["text_inputs"], torch.zeros(3, 4, dtype=torch.long)], 1)
        changed = tiny_model(b2).per_example_loss
    torch.testing.assert_close(changed, base, atol=1e-5, rtol=1e-5)


def test_patch_subsampling_keeps_positions(tiny_model):
    cfg = tiny_model.config
    batch = make_batch(cfg, image_targets=False)
    net = tiny_model.network
    masks = batch["image_input_masks"]
    ids = net.select_patches(masks, num_patches=5, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 5)
    for r in range(2):  # rows with at least 5 visible patches keep only visible ones, in order
        assert bool(masks[r, ids[r]].all()) and bool((ids[r].diff() > 0).all())
    # keeping every patch through the per-row path equals the default path
    with torch.no_grad():
        full = net.encode(batch["text_inputs"], batch["image_inputs"], masks)
        every = net.encode(batch["text_inputs"], batch["image_inputs"], masks, num_patches=cfg.encoder_max_image_len)
        nt = batch["text_inputs"].shape[1]
        torch.testing.assert_close(every.hidden[:, :nt][every.mask[:, :nt]], full.hidden[:, :nt][full.mask[:, :nt]],
                                   atol=1e-5, rtol=1e-5)
        out = tiny_model(make_batch(cfg), num_patches=6)
    assert torch.isfinite(out.loss)


def test_position_embedding_resize():
    table = torch.randn(16, 8)
    assert torch.equal(resize_position_embeddings(table, (4, 4), (4, 4)), table)
    const = torch.ones(16, 3) * 2.5
    for new in [(2, 2), (8, 8), (3, 5)]:
        out = resize_position_embeddings(const, (4, 4), new)
        assert out.shape == (new[0] * new[1], 3)
        torch.testing.assert_close(out, torch.full_like(out, 2.5))  # weights are normalised
    ramp = torch.arange(4.0)[None, :].expand(4, 4).reshape(16, 1)  # x coordinate
    up = resize_position_embeddings(ramp, (4, 4), (8, 8)).view(8, 8)
    assert torch.all(up[:, 1:].diff(dim=1) > -1e-6)  # still increasing along x
    assert torch.allclose(up[0], up[5])  # and constant along y
    # the network accepts another patch grid by resizing (the original's bicubic path)
    torch.manual_seed(0)
    net = Model(tiny_config(num_encoder_layers=1, num_decoder_layers=1)).network
    enc = net.encode(torch.tensor([[5, 6, 1]]), torch.randn(1, 3, 32, 48))
    assert enc.hidden.shape == (1, 3 + 2 * 3, 256)


# ---- forward / backward -------------------------------------------------------------------------
def test_forward_backward_tiny(tiny_model):
    cfg = tiny_model.config
    model = Model(cfg)
    model.train()
    out = model(make_batch(cfg))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # untrained: about log(V_modality) per token
    assert 0.5 * math.log(cfg.vocab.text_vocab_size) < out.text_loss.item() < 3 * math.log(cfg.vocab.text_vocab_size)
    assert out.per_example_loss.shape == (3,)
    assert int(out.num_text_tokens) == 5 + 3 + 5 - 0 and int(out.num_image_tokens) == 32
    out.loss.backward()
    dead = {"network.decoder.cross_position_q_linear.weight", "network.decoder.cross_position_k_linear.weight"}
    for name, p in model.named_parameters():
        if name in dead:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_bf16_autocast_and_bf16_weights(tiny_model):
    cfg = tiny_model.config
    batch = make_batch(cfg)
    with torch.no_grad():
        ref = tiny_model(batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = tiny_model(batch).loss
    assert amp.dtype == torch.float32
    assert amp.item() == pytest.approx(ref.item(), rel=0.05)
    model = Model(cfg)
    model.load_state_dict(tiny_model.state_dict())
    model.network.to(torch.bfloat16)
    with torch.no_grad():
        low = model(batch).loss
    assert low.item() == pytest.approx(ref.item(), rel=0.05)
    gen = model.generate(batch, max_text_len=3, image_output=True)
    assert gen.image_codes.shape == (3, 16)


# ---- bad input ----------------------------------------------------------------------------------
def _bad(batch: dict, **changes) -> dict:
    return {**batch, **changes}


@pytest.mark.parametrize("change,error,match", [
    (lambda b, c: _bad(b, image_inputs=torch.zeros(3, 3, 32, 32)), ValueError, r"\(B, 3, 64, 64\)"),
    (lambda b, c: _bad(b, image_inputs=torch.zeros(3, 64, 64, 3)), ValueError, r"\(B, 3, 64, 64\)"),
    (lambda b, c: _bad(b, image_inputs=torch.zeros(3, 3, 64, 64, dtype=torch.uint8)), TypeError, "floating"),
    (lambda b, c: _bad(b, image_inputs=torch.zeros(3, 64, 64)), ValueError, "4 dimensions"),
    (lambda b, c: _bad(b, text_inputs=torch.ones(3, 300, dtype=torch.long)), ValueError, "encoder_max_text_len=256"),
    (lambda b, c: _bad(b, text_inputs=torch.ones(3, 7)), TypeError, "integer"),
    (lambda b, c: _bad(b, text_targets=torch.ones(3, 257, dtype=torch.long)), ValueError, "decoder_max_text_len=256"),
    (lambda b, c: _bad(b, image_input_masks=torch.ones(3, 15, dtype=torch.bool)), ValueError, r"\(B, 16\)"),
    (lambda b, c: _bad(b, image_input_masks=torch.ones(3, 16)), TypeError, "torch.bool"),
    (lambda b, c: _bad(b, image_target_codes=torch.full((3, 16), 64)), ValueError, r"\[0, 64\).*Vocab.image_offset"),
    (lambda b, c: _bad(b, image_target_codes=torch.zeros(3, 15, dtype=torch.long)), ValueError, r"\(B, 16\)"),
    (lambda b, c: _bad(b, text_inputs=torch.full((3, 4), 99999)), ValueError, r"\[0, 1664\)"),
    (lambda b, c: _bad(b, text_targets=torch.ones(2, 5, dtype=torch.long)), ValueError, "2 rows.*3"),
    (lambda b, c: {k: v for k, v in b.items() if k != "text_targets"}, ValueError, "missing 'text_targets'"),
    (lambda b, c: _bad({k: v for k, v in b.items() if k != "image_target_codes"},
                       image_targets=torch.zeros(3, 3, 32, 32)), ValueError, "no image tokenizer"),
])
def test_bad_input_errors(tiny_model, change, error, match):
    batch = change(make_batch(tiny_model.config), tiny_model.config)
    with pytest.raises(error, match=match):
        tiny_model(batch)


def test_bad_generation_arguments(tiny_model):
    batch = make_batch(tiny_model.config)
    with pytest.raises(ValueError, match=r"max_text_len must be an int in \[1, 256\]"):
        tiny_model.generate(batch, max_text_len=300)
    with pytest.raises(ValueError, match="method must be"):
        tiny_model.generate(batch, method="nucleus")
    with pytest.raises(ValueError, match="num_patches must be in"):
        tiny_model(batch, num_patches=17)


@pytest.mark.parametrize("autocast", [False, True])
def test_sliced_logit_gradients_match_autograd(tiny_model, autocast):
    """The tied head's lean backward gives autograd's gradients of ``hidden @ E[a:b]^T``."""
    net = tiny_model.network
    v = net.vocab
    hidden = torch.randn(2, 3, net.config.d_model, requires_grad=True)
    for modality, rows in (("text", slice(0, v.text_vocab_size)), ("image", slice(v.image_offset, v.size))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = net.logits(hidden, modality)
            w = net.token_embedder.weight
            want = torch.nn.functional.linear(hidden, w[rows]).float() / math.sqrt(net.config.d_model)
        upstream = torch.randn_like(got)
        g_got = torch.autograd.grad((got * upstream).sum(), [hidden, w])
        g_want = torch.autograd.grad((want * upstream).sum(), [hidden, w])
        tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, want, **tol)
        for a, b in zip(g_got, g_want):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)
        assert torch.all(g_got[1][: rows.start] == 0) and torch.all(g_got[1][rows.stop :] == 0)


def test_text_only_batches_skip_the_image(tiny_model):
    """All patches invisible (the collate contract for text-only rows) == no image at all."""
    cfg = tiny_model.config
    batch = make_batch(cfg, image_targets=False)
    batch["image_input_masks"] = torch.zeros_like(batch["image_input_masks"])
    no_image = {k: v for k, v in batch.items() if k not in ("image_inputs", "image_input_masks")}
    with torch.no_grad():
        a, b = tiny_model(batch), tiny_model(no_image)
    torch.testing.assert_close(a.per_example_loss, b.per_example_loss, atol=1e-5, rtol=1e-5)


def test_grouped_rows_give_the_same_loss_and_gradients():
    """group_rows=True (each layout with its own padding) computes what the whole batch computes."""
    from uio.model import layout_groups

    torch.manual_seed(0)
    model = Model(tiny_config())
    cfg = model.config
    batch = make_batch(cfg, b=6, seed=3)
    batch["image_target_masks"][1] = False  # rows 0, 1: no image target; 2-5: an image target
    batch["image_input_masks"][4] = False  # rows 4, 5: no input image (text-only rows)
    batch["text_targets"][2:, 1:] = 0  # image rows: the EOS-only text segment of image tasks
    batch["text_targets"][2:, 0] = cfg.vocab.eos_id
    groups = [g.tolist() for g in layout_groups(model._check_batch(batch, targets=True))]
    assert groups == [[0, 1], [2, 3], [4, 5]]

    def run(group_rows):
        model.zero_grad()
        out = model(batch, group_rows=group_rows)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (whole, g_whole), (grouped, g_grouped) = run(False), run(True)
    for key in ("loss", "per_example_loss", "text_loss", "image_loss", "num_text_tokens", "num_image_tokens"):
        torch.testing.assert_close(getattr(grouped, key), getattr(whole, key), atol=1e-5, rtol=1e-5)
    assert g_grouped.keys() == g_whole.keys()
    for name in g_whole:
        torch.testing.assert_close(g_grouped[name], g_whole[name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="group_rows"):
        model(batch, group_rows=True, return_logits=True)


def test_location_label_smoothing():
    """loc_sigma > 0: each location target's loss is the cross-entropy against a Gaussian over the
    bins around it (under the text slots' softmax), the other targets are unchanged, the grouped
    path agrees, a vanishing sigma is the one-hot loss, bad sigmas are refused."""
    torch.manual_seed(0)
    model = Model(tiny_config())
    cfg, v = model.config, model.config.vocab
    batch = make_batch(cfg, b=3, seed=5)
    tt = batch["text_targets"]
    tt[0, :4] = torch.tensor([v.loc_id(10), v.loc_id(500), v.loc_id(0), v.loc_id(999)])  # bins at the ends too
    tt[2, 1] = v.loc_id(250)
    plain = model(batch, return_logits=True)
    sigma = 4.0
    smooth = model(batch, loc_sigma=sigma)
    # by hand from the masked logits: log-softmax over the text ids, bins ordered b = loc_end - 1 - id
    logp = torch.log_softmax(plain.logits[:, : tt.shape[1], : v.text_vocab_size], -1)
    bins = torch.arange(v.num_loc_bins, dtype=torch.float32)
    expected_rows = []
    for r in range(3):
        total = 0.0
        for j in range(tt.shape[1]):
            t = int(tt[r, j])
            if t == 0:
                continue
            if v.is_loc(t):
                q = torch.exp(-0.5 * ((bins - v.loc_bin(t)) / sigma) ** 2) * ((bins - v.loc_bin(t)).abs() <= 3 * sigma)
                q = q / q.sum()
                total += -(q * logp[r, j, v.loc_end - 1 - bins.long()]).sum()
            else:
                total += -logp[r, j, t]
        expected_rows.append(total)
    image_tokens = batch["image_target_masks"].sum(1)  # per row
    n_tokens = (tt != 0).sum(1) + image_tokens
    image_part = plain.per_example_loss * plain.per_example_tokens - torch.stack(
        [-(logp[r][(tt[r] != 0)].gather(-1, tt[r][tt[r] != 0][:, None])).sum() for r in range(3)])
    torch.testing.assert_close(smooth.per_example_loss, (torch.stack(expected_rows) + image_part) / n_tokens,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(smooth.image_loss, plain.image_loss)
    assert smooth.text_loss > plain.text_loss - 1e-6  # the Gaussian's entropy is a floor on those tokens
    grouped = model(batch, loc_sigma=sigma, group_rows=True)
    torch.testing.assert_close(grouped.per_example_loss, smooth.per_example_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(batch, loc_sigma=1e-3).loss, plain.loss)  # one-hot again
    for bad in (-1, float("nan"), float("inf"), "4", True):
        with pytest.raises(ValueError, match="loc_label_sigma"):
            model(batch, loc_sigma=bad)


def test_relative_tables_stay_bounded():
    rp = RelativePositionBiases(num_heads=2)
    rp.reset_parameters()
    for n in range(1, 60):
        rp(n, None, (2, 2), bidirectional=False)
    assert len(rp._index_cache) == rp.max_cached_layouts
    assert rp.text_buckets(40, False, torch.device("cpu")).shape == (40, 40)
    assert torch.equal(rp.text_buckets(5, True, torch.device("cpu")),
                       relative_position_bucket(torch.arange(5)[None, :] - torch.arange(5)[:, None]))
