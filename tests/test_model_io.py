"""Model.save_pretrained / from_pretrained, with and without an image tokenizer, and the frozen
image tokenizer inside uio.Model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from uio import Model, ModelConfig
from uio.image_tokenizer import VQGAN

SMALL = dict(image_input_size=(32, 32), d_model=128, num_heads=2, d_ff=256, num_encoder_layers=2,
             num_decoder_layers=2)


def _batch(cfg: ModelConfig, b: int = 2, pixels: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, cfg.text_vocab, (b, 5), generator=g)
    text[:, -1] = 1
    batch = dict(text_inputs=text, image_inputs=torch.randn(b, 3, *cfg.image_input_size, generator=g),
                 image_input_masks=torch.ones(b, cfg.encoder_max_image_len, dtype=torch.bool),
                 text_targets=torch.tensor([[7, 8, 1], [9, 1, 0]])[:b],
                 image_target_masks=torch.ones(b, cfg.decoder_max_image_len, dtype=torch.bool))
    if pixels:
        batch["image_targets"] = torch.rand(b, 3, *cfg.image_target_size, generator=g) * 2 - 1
    else:
        batch["image_target_codes"] = torch.randint(0, cfg.image_vocab, (b, cfg.decoder_max_image_len), generator=g)
    return batch


def _same_outputs(a: Model, b: Model, batch: dict) -> None:
    with torch.no_grad():
        la, lb = a(batch), b(batch)
    assert torch.equal(la.loss, lb.loss) and torch.equal(la.per_example_loss, lb.per_example_loss)
    ga = a.generate(batch, max_text_len=4, image_output=True)
    gb = b.generate(batch, max_text_len=4, image_output=True)
    assert torch.equal(ga.text_tokens, gb.text_tokens) and torch.equal(ga.image_codes, gb.image_codes)
    sa = a.generate(batch, max_text_len=4, method="sample", generator=torch.Generator().manual_seed(3))
    sb = b.generate(batch, max_text_len=4, method="sample", generator=torch.Generator().manual_seed(3))
    assert torch.equal(sa.text_tokens, sb.text_tokens)
    opts = [[11, 12], [13]]
    assert torch.equal(a.score_options(batch, opts), b.score_options(batch, opts))
    if ga.images is not None:
        assert torch.equal(ga.images, gb.images)


def test_round_trip_with_codes_and_text_tokenizer(tmp_path, text_tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.from_size("tiny", text_vocab=len(text_tokenizer), image_vocab=64, image_target_grid=(4, 4),
                                **SMALL)
    model = Model(cfg, text_tokenizer=text_tokenizer).eval()
    out_dir = model.save_pretrained(tmp_path / "m")
    assert {p.name for p in out_dir.iterdir()} >= {"model.safetensors", "config.json", "spiece.model"}
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["d_model"] == 128 and saved["image_tokenizer"] is None
    keys = load_file(str(out_dir / "model.safetensors")).keys()
    assert all(k.startswith("network.") for k in keys)
    assert "network.decoder.cross_position_k_linear.weight" in keys  # dead but kept for the checkpoint

    loaded = Model.from_pretrained(out_dir)
    assert loaded.config == model.config
    assert loaded.text_tokenizer is not None
    assert loaded.text_tokenizer.encode("a red cube") == text_tokenizer.encode("a red cube")
    assert all(p.requires_grad for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters())
    _same_outputs(model, loaded, _batch(cfg))
    # bf16 loading casts the network
    low = Model.from_pretrained(out_dir, dtype=torch.bfloat16)
    assert low.network.token_embedder.weight.dtype == torch.bfloat16


def test_round_trip_with_a_vqgan(tmp_path):
    torch.manual_seed(0)
    tok = VQGAN("vqgan_test")  # 32x32 images -> 8x8 codes of 64
    cfg = ModelConfig.from_size("tiny", text_vocab=300, image_vocab=64, image_target_grid=(8, 8),
                                image_target_size=(32, 32), **SMALL)
    model = Model(cfg, image_tokenizer=tok).eval()
    assert model.config.image_tokenizer["name"] == "vqgan"
    # frozen: no gradients, eval mode even after model.train()
    model.train()
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert model.num_parameters() == sum(p.numel() for p in model.network.parameters())
    batch = _batch(cfg, pixels=True)
    out = model(batch)
    out.loss.backward()
    assert all(p.grad is None for p in tok.parameters())
    # pixels are tokenised by the tokenizer under no_grad: same loss as passing its codes
    with torch.no_grad():
        codes = tok.encode(batch["image_targets"])
        by_codes = model({**{k: v for k, v in batch.items() if k != "image_targets"}, "image_target_codes": codes})
    assert torch.allclose(out.loss, by_codes.loss)
    model.eval()

    out_dir = model.save_pretrained(tmp_path / "m")
    state = load_file(str(out_dir / "model.safetensors"))
    assert any(k.startswith("image_tokenizer.encoder.") for k in state)
    assert "image_tokenizer.quantize.embedding.weight" in state
    spec = json.loads((out_dir / "config.json").read_text())["image_tokenizer"]
    assert spec["name"] == "vqgan" and "weights" not in spec

    loaded = Model.from_pretrained(out_dir)
    assert isinstance(loaded.image_tokenizer, VQGAN) and loaded.image_tokenizer.frozen
    assert not any(p.requires_grad for p in loaded.image_tokenizer.parameters())
    assert torch.equal(loaded.image_tokenizer.quantize.embedding.weight, tok.quantize.embedding.weight)
    _same_outputs(model, loaded, batch)
    gen = loaded.generate(batch, max_text_len=2, image_output=True)
    assert gen.images.shape == (2, 3, 32, 32)


def test_tokenizer_mismatches_are_clear_errors(text_tokenizer):
    cfg = ModelConfig.from_size("tiny", text_vocab=300, image_vocab=64, image_target_grid=(4, 4), **SMALL)
    with pytest.raises(ValueError, match=r"num_codes=64 does not match|grid=\(8, 8\) does not match"):
        Model(cfg, image_tokenizer=VQGAN("vqgan_test"))
    with pytest.raises(ValueError, match=f"text tokenizer has {len(text_tokenizer)} pieces.*text_vocab is 300"):
        Model(cfg, text_tokenizer=text_tokenizer)
    with pytest.raises(TypeError, match="uio.ModelConfig"):
        Model({"name": "tiny"})


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Model.from_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = ModelConfig.from_size("tiny", text_vocab=300, image_vocab=64, image_target_grid=(4, 4), **SMALL)
    out_dir = Model(cfg).save_pretrained(tmp_path / "m")
    other = json.loads((out_dir / "config.json").read_text())
    other["num_decoder_layers"] = 3
    (out_dir / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"missing \['network.decoder.layers.2"):
        Model.from_pretrained(out_dir)
