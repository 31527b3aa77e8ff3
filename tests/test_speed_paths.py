"""The speed paths compute what the reference paths compute.

- :class:`BiasAttention` (CPU training) and the small-query matmul path (CPU decoding) against
  ``F.scaled_dot_product_attention``, values and gradients, for every bias shape the network uses;
- :class:`TargetLogProb` (fused token loss) against ``log_softmax`` + ``gather``;
- packed bf16 weights (:class:`PackedWeight`) against ``F.linear``, their invalidation, and bf16
  generation with packed weights against the same model without them;
- bf16 decoding against the float32 model;
- the model-FLOP formula of ``bench/mfu.py`` against torch's FLOP counter.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from uio import Model, ModelConfig
from uio.modeling import layers
from uio.modeling.generation import TargetLogProb, token_log_probs
from uio.modeling.layers import SMALL_QUERY, Attention, BiasAttention, Linear, PackedWeight, can_pack, pack_linears

TINY = dict(text_vocab=500, image_vocab=64, image_input_size=(32, 32), image_target_grid=(4, 4),
            image_target_size=(32, 32), d_model=128, num_heads=2, d_ff=256, num_encoder_layers=2,
            num_decoder_layers=2)


def _qkv(b=2, h=3, lq=5, lk=7, dh=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, dh, generator=g, dtype=dtype).requires_grad_() for n in (lq, lk, lk)]


# ---- attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1 << 21, 1])  # one chunk / one batch row per chunk
@pytest.mark.parametrize("bias_shape", [(2, 3, 5, 7), (1, 3, 5, 7), (2, 1, 1, 7), (2, 1, 5, 7), (5, 7), None])
def test_bias_attention_matches_sdpa(bias_shape, chunk, monkeypatch):
    monkeypatch.setattr(layers, "CHUNK_SCORES", chunk)
    q, k, v = _qkv()
    bias = None if bias_shape is None else torch.randn(*bias_shape).requires_grad_()
    grad = torch.randn(2, 3, 5, 4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    ins = [t for t in (q, k, v, bias) if t is not None]
    ref_grads = torch.autograd.grad(ref, ins, grad)
    out = BiasAttention.apply(q, k, v, bias)
    grads = torch.autograd.grad(out, ins, grad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bias_attention_gradcheck_float64():
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(lq=3, lk=4))
    bias = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BiasAttention.apply, (q, k, v, bias))


def test_bias_attention_masked_keys_get_no_weight():
    """-1e10 on a key: its value never reaches the output, and its bias gets no gradient."""
    q, k, v = _qkv()
    bias = torch.zeros(2, 1, 1, 7)
    bias[:, :, :, -2:] = -1e10
    bias.requires_grad_()
    out = BiasAttention.apply(q, k, v, bias)
    v2 = v.detach().clone()
    v2[:, :, -2:] = 1e6
    torch.testing.assert_close(BiasAttention.apply(q, k, v2, bias), out)
    out.sum().backward()
    assert torch.all(bias.grad[..., -2:] == 0)


def test_bias_attention_bf16_close_to_float32():
    q, k, v = _qkv(lq=64, lk=64, dh=16, seed=1)
    g = torch.Generator().manual_seed(1)  # not the global RNG: its state depends on the tests run before
    bias = torch.randn(1, 3, 64, 64, generator=g).requires_grad_()
    grad = torch.randn(2, 3, 64, 16, generator=g)
    ref = BiasAttention.apply(q, k, v, bias)
    ref_g = torch.autograd.grad(ref, (q, bias), grad)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = BiasAttention.apply(qb, kb, vb, bias)
    g = torch.autograd.grad(out, (qb, bias), grad.bfloat16())
    assert out.dtype == torch.bfloat16 and g[1].dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    for a, b in zip(g, ref_g):
        assert (a.float() - b).norm() / b.norm() < 0.03


@pytest.mark.parametrize("chunk", [1 << 21, 1])
@pytest.mark.parametrize("lq", [1, 3, SMALL_QUERY])
@pytest.mark.parametrize("bias_kind", ["float", "bool", "none"])
def test_small_query_path_matches_sdpa(lq, bias_kind, chunk, monkeypatch):
    monkeypatch.setattr(layers, "CHUNK_SCORES", chunk)
    attn = Attention(8, 2, 4).eval()
    q, k, v = (t.detach() for t in _qkv(h=2, lq=lq, lk=9))
    bias = {"float": torch.randn(2, 2, lq, 9), "bool": torch.rand(2, 1, lq, 9) > 0.3, "none": None}[bias_kind]
    if bias_kind == "bool":
        bias[..., 0] = True  # SDPA gives NaN for a row without any allowed key
    with torch.no_grad():
        out = attn.attend(q, k, v, bias)  # the matmul path
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(2, lq, 8), atol=1e-5, rtol=1e-5)


def test_bf16_inference_attention_matches_sdpa(monkeypatch):
    """bf16 CPU inference over long queries runs chunked matmuls; same numbers as SDPA's kernel."""
    monkeypatch.setattr(layers, "CHUNK_SCORES", 40 * 3)  # two batch rows per chunk
    attn = Attention(8, 2, 4).eval()
    q, k, v = (t.detach().bfloat16() for t in _qkv(b=5, h=2, lq=40, lk=30))
    bias = torch.randn(1, 2, 40, 30)
    with torch.no_grad():
        out = attn.attend(q, k, v, bias)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=1.0)
    torch.testing.assert_close(out.float(), ref.transpose(1, 2).reshape(5, 40, 8), atol=0.03, rtol=0.03)


def test_attention_training_path_is_bias_attention_and_matches_sdpa():
    torch.manual_seed(0)
    attn = Attention(8, 2, 4).train()
    x = torch.randn(2, 6, 8)
    bias = torch.randn(1, 2, 6, 6, requires_grad=True)
    out = attn(x, bias)
    assert out.grad_fn is not None
    out.square().sum().backward()
    got = [p.grad.clone() for p in attn.parameters()] + [bias.grad.clone()]
    attn.zero_grad()
    bias.grad = None
    q = attn._heads(attn.query(x))
    k, v = attn.project_kv(x)
    ref = attn.out(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0).transpose(1, 2).reshape(2, 6, 8))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.square().sum().backward()
    for a, b in zip(got, [p.grad for p in attn.parameters()] + [bias.grad]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- fused token loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_log_prob_matches_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 50, generator=g) * 5).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (7,), generator=g)
    grad = torch.randn(7, generator=g)
    out = TargetLogProb.apply(logits, targets, 3.0)
    (gl,) = torch.autograd.grad(out, logits, grad)
    ref = (logits.float() / 3.0).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    (rl,) = torch.autograd.grad(ref, logits, grad)
    assert out.dtype == torch.float32 and gl.dtype == dtype
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gl.float(), rl.float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2)


def test_target_log_prob_gradcheck_float64():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 8, 3, 3])
    assert torch.autograd.gradcheck(lambda x: TargetLogProb.apply(x, targets, 2.5), (logits,))


def test_token_log_probs_chunks_match_unchunked():
    torch.manual_seed(0)
    model = Model(ModelConfig.from_size("tiny", **TINY))
    net = model.network
    hidden = torch.randn(11, 128, requires_grad=True)
    targets = torch.randint(0, net.vocab.text_vocab_size, (11,))
    small = token_log_probs(net, hidden, targets, "text", max_logit_elems=3 * net.vocab.text_vocab_size)  # 4 chunks
    full = net.logits(hidden, "text").log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(small, full, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(small.sum(), (hidden, net.token_embedder.weight))
    g2 = torch.autograd.grad(full.sum(), (hidden, net.token_embedder.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---- packed weights -----------------------------------------------------------------------------
needs_pack = pytest.mark.skipif(not can_pack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                reason="oneDNN packed linear unavailable")


@needs_pack
def test_packed_linear_matches_linear_and_goes_stale():
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=False).bfloat16()
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    assert pack_linears(lin) == 1 and isinstance(lin.packed, PackedWeight)
    with torch.no_grad():
        ref = F.linear(x, lin.weight)
        torch.testing.assert_close(lin(x), ref, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(lin(x[:, :1]), ref[:, :1], atol=1e-2, rtol=1e-2)
        lin.weight.mul_(2)  # an optimizer step: the packed copy is stale and must not be used
        assert not lin.packed.valid_for(lin.weight)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    pack_linears(lin)
    assert lin.packed.valid_for(lin.weight)
    old = lin.packed
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())  # new weights (load_state_dict(assign=True))
    assert not old.valid_for(lin.weight)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    pack_linears(lin)
    y = lin(x)  # with gradients on, the plain product (the packed copy has no autograd)
    assert y.grad_fn is not None


def test_float32_weights_are_not_packed():
    lin = Linear(8, 8, bias=False)
    assert not can_pack(lin.weight) and pack_linears(lin) == 0 and lin.packed is None


def _bf16_model(seed=0) -> Model:
    torch.manual_seed(seed)
    model = Model(ModelConfig.from_size("tiny", **TINY))
    with torch.no_grad():
        model.network.token_embedder.weight.mul_(3.0)
    return model.eval()


def _batch(cfg, b=3, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, cfg.text_vocab, (b, 6), generator=g)
    text[:, -1] = 1
    return dict(text_inputs=text, image_inputs=torch.randn(b, 3, *cfg.image_input_size, generator=g),
                image_input_masks=torch.rand(b, cfg.encoder_max_image_len, generator=g) > 0.2)


@needs_pack
def test_bf16_generation_with_packed_weights_equals_unpacked():
    model = _bf16_model()
    model.network.bfloat16()
    plain = copy.deepcopy(model)
    plain.network.pack_for_decoding = lambda: False  # the reference: no packed copies anywhere
    batch = _batch(model.config)
    a = model.generate(batch, max_text_len=6, image_output=True)
    assert model.network._packed_head and model.network.decoder.layers[0].mlp.wi_0.packed is not None
    b = plain.generate(batch, max_text_len=6, image_output=True)
    assert plain.network.decoder.layers[0].mlp.wi_0.packed is None
    assert torch.equal(a.text_tokens, b.text_tokens)
    assert torch.equal(a.image_codes, b.image_codes)
    model.network.drop_packed()
    assert not model.network._packed_head and all(getattr(m, "packed", None) is None for m in model.modules())


def test_bf16_decoding_agrees_with_float32():
    """bf16 weights change the numbers a little, not the model: the bf16 greedy prefix scores
    almost the same under the float32 model as the float32 greedy output does."""
    model = _bf16_model(seed=1)
    batch = _batch(model.config, b=4, seed=1)
    ref = model.generate(batch, max_text_len=5)
    half = copy.deepcopy(model)
    half.network.bfloat16()
    out = half.generate(batch, max_text_len=5)
    assert out.text_tokens.dtype == torch.int64
    # the first token comes from the same distribution; it must agree whenever the fp32 top-2 gap is clear
    with torch.no_grad():
        enc = model.encode(batch)
        h = model.network.decode(enc, torch.zeros(4, 1, dtype=torch.long), 1, torch.ones(4, 1, dtype=torch.bool))
        top2 = model.network.logits(h[:, 0], "text").topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert torch.equal(out.text_tokens[clear, 0], ref.text_tokens[clear, 0])
    s_ref = model.score_options(batch, [[t for t in row.tolist() if t] for row in ref.text_tokens[:, None]])
    s_half = model.score_options(batch, [[t for t in row.tolist() if t] for row in out.text_tokens[:, None]])
    assert torch.all(s_half >= s_ref - 0.5), (s_half, s_ref)


# ---- FLOP accounting ----------------------------------------------------------------------------
def test_mfu_formula_matches_flop_counter_on_hf_t5():
    pytest.importorskip("transformers")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from common import hf_t5_like
    from mfu import train_flops

    cfg = ModelConfig.from_size("tiny", text_vocab=1000, image_vocab=256, d_model=64, num_heads=2, d_ff=128,
                                num_encoder_layers=2, num_decoder_layers=3)
    hf = hf_t5_like(cfg)
    b, le, ld = 2, 24, 10
    # the math kernel: the counter does not count the CPU flash kernel's FLOPs
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        hf(input_ids=torch.randint(3, 900, (b, le)), labels=torch.randint(3, 900, (b, ld))).loss.backward()
    assert fc.get_total_flops() == train_flops(cfg, b, le, ld)


# ---- the grounding probe ------------------------------------------------------------------------
def test_grounding_probe_asks_for_the_named_square_and_logs_image_use(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import grounding_probe as gp

    vocab = ModelConfig.from_size("tiny", text_vocab=1000, image_vocab=64).vocab
    text, images, target = gp.make_batch(6, 3, torch.Generator().manual_seed(0), vocab)
    assert text.shape == (6, 4) and images.shape == (6, 3, 128, 128) and target.shape == (6, 4)
    for b in range(6):
        colour = gp.PALETTE[int(text[b, 2]) - gp.COLOUR_TOKEN]
        ys, xs = torch.nonzero((images[b] == colour[:, None, None]).all(0), as_tuple=True)
        y1, x1, y2, x2 = vocab.dequantize(vocab.loc_bin(target[b]).numpy(), 128)
        # the named square is drawn last (fully visible): its pixels fill the target box
        assert abs(y1 - ys.min().item()) <= 1 and abs(x1 - xs.min().item()) <= 1
        assert abs(y2 - (ys.max().item() + 1)) <= 1 and abs(x2 - (xs.max().item() + 1)) <= 1
    rows = gp.main(["--steps", "2", "--batch", "4", "--log-every", "1", "--sincos-init", "--cross-position-bias",
                    "--json", str(tmp_path / "log.json")])
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["image_use"]) and 0 <= r["bin_err"] < 1000 for r in rows)
    assert json.loads((tmp_path / "log.json").read_text())["rows"] == rows
