"""Decoding: cached == uncached, greedy / beam / top-p, allowed-token masks, answer scoring."""
from __future__ import annotations

import pytest
import torch

from uio import Model, ModelConfig
from uio.modeling.generation import top_p_filter

TINY = dict(text_vocab=500, image_vocab=64, image_input_size=(32, 32), image_target_grid=(4, 4),
            image_target_size=(32, 32), d_model=128, num_heads=2, d_ff=256, num_encoder_layers=2,
            num_decoder_layers=2)


def make_model(seed: int = 0, **kw) -> Model:
    torch.manual_seed(seed)
    model = Model(ModelConfig.from_size("tiny", **{**TINY, **kw}))
    # sharper than the N(0, 1)-embedding init so that EOS and masks matter within a few steps
    with torch.no_grad():
        model.network.token_embedder.weight.mul_(3.0)
    return model.eval()


def make_batch(model: Model, b: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    text = torch.randint(3, cfg.text_vocab, (b, 6), generator=g)
    text[:, -1] = 1
    text[0, 3:] = 0
    masks = torch.rand(b, cfg.encoder_max_image_len, generator=g) > 0.2
    return dict(text_inputs=text, image_inputs=torch.randn(b, 3, *cfg.image_input_size, generator=g),
                image_input_masks=masks)


@pytest.fixture(scope="module")
def model() -> Model:
    return make_model()


# ---- cache exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("greedy", {}), ("beam", {"num_beams": 3}), ("sample", {"top_p": 0.9})])
def test_cached_equals_uncached(model, method, kw):
    batch = make_batch(model)
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(model.generate(batch, max_text_len=7, image_output=True, method=method, generator=g,
                                   use_cache=use_cache, **kw))
    a, b = outs
    assert torch.equal(a.text_tokens, b.text_tokens)
    assert torch.equal(a.image_codes, b.image_codes)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-5)


def test_cross_position_bias_is_dead_as_released_and_exact_when_applied():
    """As released, cross_position_{q,k}_linear change nothing; with ``cross_position_bias`` they
    change the outputs, and every decoding path (cache, beams, grouped answer scoring) still agrees
    with teacher forcing."""
    batch = make_batch(make_model())
    targets = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 10, 1]])

    def logits(m):
        with torch.no_grad():
            return m({**batch, "text_targets": targets, "image_target_codes": torch.zeros(3, 16, dtype=torch.long)},
                     return_logits=True).logits

    for applied in (False, True):
        m = make_model(cross_position_bias=applied)
        before = logits(m)
        with torch.no_grad():
            m.network.decoder.cross_position_q_linear.weight.mul_(-3.0)
        assert torch.equal(logits(m), before) is not applied
    m = make_model(cross_position_bias=True)
    outs = [m.generate(batch, max_text_len=6, image_output=True, method="beam", num_beams=2, use_cache=c)
            for c in (True, False)]
    assert torch.equal(outs[0].text_tokens, outs[1].text_tokens)
    assert torch.equal(outs[0].image_codes, outs[1].image_codes)
    gen = m.generate(batch, max_text_len=6, image_output=True)
    with torch.no_grad():
        out = m({**batch, "text_targets": torch.nn.functional.pad(gen.text_tokens, (0, 6 - gen.text_tokens.shape[1])),
                 "image_target_codes": gen.image_codes}, return_logits=True)
    assert torch.equal(out.logits[:, 6:].argmax(-1) - m.vocab.image_offset, gen.image_codes)
    opts = [[5, 6, 7], [8], [9, 10, 1]]
    from uio.modeling.generation import score_options

    shared = m.score_options(batch, opts)  # three options share each encoder row (grouped queries)
    with torch.no_grad():
        chunked = score_options(m.network, m.encode(batch), opts, max_rows=3, max_logit_elems=5000)
    torch.testing.assert_close(chunked, shared, atol=1e-5, rtol=1e-5)
    for j, o in enumerate(opts):  # one option per row: no grouping
        torch.testing.assert_close(m.score_options(batch, [[o]] * 3).squeeze(1), shared[:, j], atol=1e-4, rtol=1e-5)


def test_greedy_agrees_with_teacher_forced_forward(model):
    """Every greedy token is the argmax of the training-path logits on the generated prefix."""
    batch = make_batch(model)
    gen = model.generate(batch, max_text_len=6, image_output=True)
    text, codes = gen.text_tokens, gen.image_codes
    targets = torch.nn.functional.pad(text, (0, 6 - text.shape[1]))
    valid = targets != 0
    with torch.no_grad():
        out = model({**batch, "text_targets": targets, "image_target_codes": codes}, return_logits=True)
    v = model.vocab
    text_logits = out.logits[:, :6].clone()
    text_logits[..., v.pad_id] = -1e10  # generation never emits pad
    pred_text = text_logits.argmax(-1)
    assert torch.equal(pred_text[valid], targets[valid])
    assert torch.equal(out.logits[:, 6:].argmax(-1) - v.image_offset, codes)
    # and the returned score is the text's log-likelihood
    ll = model.score_options(batch, [[t.tolist()] for t in text]).squeeze(1)
    has_eos = (text == v.eos_id).any(1)
    torch.testing.assert_close(gen.scores[has_eos], ll[has_eos], atol=1e-4, rtol=1e-5)


def test_early_stop_changes_no_image_token(model):
    """Text slots after EOS are masked, so stopping the text loop early (checked every step) gives
    the same image as running it to max_text_len."""
    batch = make_batch(model)
    from uio.modeling.generation import generate

    with torch.no_grad():
        enc = model.encode(batch)
        early = generate(model.network, enc, max_text_len=12, image_output=True, check_every=1)
        late = generate(model.network, enc, max_text_len=12, image_output=True, check_every=1000)
    assert late.text_tokens.shape[1] == 12
    n = early.text_tokens.shape[1]
    assert torch.equal(late.text_tokens[:, :n], early.text_tokens) and not late.text_tokens[:, n:].any()
    assert torch.equal(early.image_codes, late.image_codes)


# ---- methods --------------------------------------------------------------------------------------
def test_output_shapes_and_eos_padding(model):
    batch = make_batch(model)
    v = model.vocab
    for method, kw in [("greedy", {}), ("beam", {"num_beams": 4}), ("sample", {"generator": torch.Generator()})]:
        out = model.generate(batch, max_text_len=10, method=method, **kw)
        assert out.text_tokens.dtype == torch.int64 and out.text_tokens.shape[0] == 3
        assert out.text_tokens.shape[1] <= 10 and out.image_codes is None and out.images is None
        for row in out.text_tokens.tolist():
            if v.eos_id in row:
                assert not any(row[row.index(v.eos_id) + 1 :])  # 0-padded after EOS
            assert all(0 < t < v.text_vocab_size for t in row[: row.index(v.eos_id) if v.eos_id in row else None])
        img = model.generate(batch, max_text_len=2, image_output=True, method=method, **kw)
        assert img.image_codes.shape == (3, 16) and img.image_codes.dtype == torch.int64
        assert img.images is None  # no image tokenizer


def test_beam_search(model):
    batch = make_batch(model)
    greedy = model.generate(batch, max_text_len=8)
    one = model.generate(batch, max_text_len=8, method="beam", num_beams=1)
    assert torch.equal(one.text_tokens, greedy.text_tokens)
    beam = model.generate(batch, max_text_len=8, method="beam", num_beams=5)
    v = model.vocab
    finished = (beam.text_tokens == v.eos_id).any(1)
    ll = model.score_options(batch, [[t.tolist()] for t in beam.text_tokens]).squeeze(1)
    torch.testing.assert_close(beam.scores[finished], ll[finished], atol=1e-4, rtol=1e-5)
    # a wider beam never returns a finished hypothesis worse than greedy's finished one
    both = finished & (greedy.text_tokens == v.eos_id).any(1)
    assert torch.all(beam.scores[both] >= greedy.scores[both] - 1e-4)


def test_sampling_is_seeded_and_top_p_small_is_greedy(model):
    batch = make_batch(model)
    run = lambda seed, **kw: model.generate(batch, max_text_len=6, method="sample", top_p=1.0,
                                            generator=torch.Generator().manual_seed(seed), **kw).text_tokens
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    tiny_p = model.generate(batch, max_text_len=6, method="sample", top_p=1e-6,
                            generator=torch.Generator().manual_seed(3)).text_tokens
    assert torch.equal(tiny_p, model.generate(batch, max_text_len=6).text_tokens)


def test_top_p_filter_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (cumulative 0.5 < 0.7 <= 0.8)
    logits = torch.tensor([[0.5, 0.05, 0.3, 0.15]]).log()
    kept = top_p_filter(logits, 0.7) > -1e6
    assert kept.tolist() == [[True, False, True, False]]
    assert (top_p_filter(logits, 0.85) > -1e6).tolist() == [[True, False, True, True]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


# ---- allowed-token masks -----------------------------------------------------------------------------
def test_location_only_mask(model):
    batch = make_batch(model)
    v = model.vocab
    for method, kw in [("greedy", {}), ("beam", {"num_beams": 3}), ("sample", {"generator": torch.Generator()})]:
        out = model.generate(batch, max_text_len=4, allowed_tokens=v.loc_mask(), method=method, **kw)
        assert out.text_tokens.shape == (3, 4)
        assert bool(v.is_loc(out.text_tokens).all()), out.text_tokens


def test_per_row_mask_and_callable(model):
    batch = make_batch(model)
    v = model.vocab
    mask = torch.zeros(3, v.size, dtype=torch.bool)
    allowed = [[10, 11], [20], [30, 31, 1]]
    for r, ids in enumerate(allowed):
        mask[r, ids] = True
    out = model.generate(batch, max_text_len=5, allowed_tokens=mask)
    for r, row in enumerate(out.text_tokens.tolist()):
        assert set(row) - {0} <= set(allowed[r])
    # a callable sees the step and the prefix and can force a sequence
    forced = [40, 41, 42, 1]
    seen = []

    def fn(step: int, prefix: torch.Tensor) -> torch.Tensor:
        seen.append(prefix.clone())
        m = torch.zeros(v.size, dtype=torch.bool)
        m[forced[min(step, len(forced) - 1)]] = True
        return m

    out = model.generate(batch, max_text_len=6, allowed_tokens=fn, method="beam", num_beams=2)
    assert out.text_tokens.tolist() == [forced] * 3
    assert seen[2].shape == (6, 2) and seen[2][0].tolist() == [40, 41]
    with pytest.raises(ValueError, match=r"allowed_tokens must have shape \(" + str(v.size)):
        model.generate(batch, max_text_len=2, allowed_tokens=torch.ones(7, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        model.generate(batch, max_text_len=2, allowed_tokens=torch.ones(v.size))


# ---- answer scoring ----------------------------------------------------------------------------------
def test_score_options_forms(model):
    batch = make_batch(model)
    opts = [[5, 6, 7], [8], [9, 10, 1]]
    shared = model.score_options(batch, opts)
    assert shared.shape == (3, 3) and torch.all(shared < 0)
    per_row = model.score_options(batch, [opts, opts[::-1], opts])
    torch.testing.assert_close(per_row[1], shared[1].flip(0))
    mean = model.score_options(batch, opts, average=True)
    torch.testing.assert_close(mean, shared / torch.tensor([4.0, 2.0, 3.0]))  # EOS appended to the first two
    # chunked teacher forcing gives the same numbers
    from uio.modeling.generation import score_options

    with torch.no_grad():
        chunked = score_options(model.network, model.encode(batch), opts, max_rows=3, max_logit_elems=5000)
    torch.testing.assert_close(chunked, shared, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no pad 0"):
        model.score_options(batch, [[5, 0, 6]])
    with pytest.raises(ValueError, match="one list per batch row"):
        model.score_options(batch, [opts, opts])


def test_score_options_picks_the_answer_after_overfitting():
    """Four images, one question, four answers: after a few hundred Adam steps answer scoring
    (the paper's classification rule) and greedy decoding both recover each image's answer."""
    torch.manual_seed(0)
    model = Model(ModelConfig.from_size("tiny", **TINY))
    g = torch.Generator().manual_seed(1)
    n = 4
    question = torch.tensor([[17, 23, 29, 1]]).repeat(n, 1)
    answers = [[101, 102, 1], [103, 1, 0], [104, 105, 1], [106, 107, 1]]
    batch = dict(text_inputs=question, image_inputs=torch.randn(n, 3, 32, 32, generator=g),
                 image_input_masks=torch.ones(n, 4, dtype=torch.bool), text_targets=torch.tensor(answers))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(150):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    options = [[t for t in a if t] for a in answers]
    scores = model.score_options(batch, options)
    assert scores.argmax(1).tolist() == [0, 1, 2, 3]
    gen = model.generate(batch, max_text_len=4)
    assert [[t for t in row if t] for row in gen.text_tokens.tolist()] == options
