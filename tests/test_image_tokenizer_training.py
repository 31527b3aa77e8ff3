"""VQ-GAN training recipe: losses, dead-code restarts, the discriminator path, the Hydra entry, evaluation."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from uio.image_tokenizer import VQGAN, build_image_tokenizer
from uio.image_tokenizer.training import (
    VQGANLitModule,
    VQGANTrainConfig,
    evaluate_tokenizer,
    load_images,
    main,
    psnr,
    run,
    shapes_images,
    train_vqgan,
)

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **kw) -> VQGANTrainConfig:
    base = dict(config="vqgan_test", data="shapes", steps=40, batch_size=8, num_train_images=96, num_val_images=16,
                restart_every=10, warmup_steps=5, lr=2e-3, output_dir=str(tmp_path / "tok"), max_minutes=None,
                log_every=0, precision="bf16-mixed", accelerator="cpu", threads=1)
    base.update(kw)
    return VQGANTrainConfig(**base)


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.2  # 0.1 in [0, 1] -> mse 0.01 -> 20 dB
    torch.testing.assert_close(psnr(y, x), torch.full((2,), 20.0))
    assert float(psnr(x, x)[0]) == pytest.approx(100.0)  # clamped mse 1e-10


def test_training_improves_reconstruction_restarts_codes_and_saves(tmp_path):
    cfg = _cfg(tmp_path, steps=80)
    val, _ = load_images("shapes", 32, (32, 32), seed=99)
    torch.manual_seed(0)
    before = evaluate_tokenizer(VQGAN("vqgan_test"), val)
    metrics = train_vqgan(cfg)
    assert metrics["steps"] == 80
    assert metrics["restarted_codes"] > 0  # the first check initialises the codebook from encoder outputs
    tok = VQGAN.from_pretrained(tmp_path / "tok")
    after = evaluate_tokenizer(tok, val)
    assert after["psnr"] > before["psnr"] + 3.0, (before, after)
    assert after["codebook_usage"] >= 0.5
    saved = json.loads((tmp_path / "tok" / "train_metrics.json").read_text())
    assert saved["psnr"] == metrics["psnr"] and 0 < saved["codebook_usage"] <= 1
    # the logged per-step metrics exist (CSV logger under the output dir)
    rows = list(csv.DictReader(open(next((tmp_path / "tok" / "logs").rglob("metrics.csv")))))
    assert any(r.get("train/rec_loss") for r in rows) and any(r.get("train/codebook_usage") for r in rows)


def test_restart_dead_codes_replaces_only_unused_codes_from_recent_outputs(tmp_path):
    module = VQGANLitModule(_cfg(tmp_path, buffer_size=64))
    emb = module.vqgan.quantize.embedding.weight
    before = emb.detach().clone()
    torch.manual_seed(0)
    z = torch.randn(2, 16, 4, 4) * 5 + 100  # far from the initial codebook
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    codes[0, 0, :3] = torch.tensor([5, 7, 9])
    module._track(codes, z)
    assert module.z_filled == 32
    n = module.restart_dead_codes()
    live = [0, 5, 7, 9]
    assert n == 64 - len(live)
    assert torch.equal(emb[live], before[live])
    dead = [i for i in range(64) if i not in live]
    pool = z.permute(0, 2, 3, 1).reshape(-1, 16)
    dist = torch.cdist(emb[dead].detach(), pool).min(1).values
    assert float(dist.max()) < 0.5  # each restarted code sits on a recent encoder output (+ small noise)
    assert float(module.window_counts.sum()) == 0  # a new window starts


def test_schedule_follows_steps_or_the_time_budget_whichever_is_further(tmp_path):
    module = VQGANLitModule(_cfg(tmp_path, steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1, max_minutes=10))
    module.steps_done = 49
    assert module.lr_factor() == pytest.approx(0.5)  # linear warm-up
    module.steps_done, module.t_start, module.elapsed = 100, 0.0, 0.0
    assert module.progress() == pytest.approx(0.1) and module.lr_factor() == pytest.approx(1.0)
    module.steps_done = 550  # half-way through the decay by steps
    assert module.lr_factor() == pytest.approx(0.1 + 0.9 * 0.5)
    module.elapsed = 0.9 * 600  # but 90% of the 10-minute budget is spent: the clock leads
    assert module.progress() == pytest.approx(0.9)
    assert module.lr_factor() < 0.2
    module.elapsed = 700.0
    assert module.progress() == 1.0 and module.lr_factor() == pytest.approx(0.1)
    unbounded = VQGANLitModule(_cfg(tmp_path, steps=1000, max_minutes=None))
    unbounded.steps_done, unbounded.t_start, unbounded.elapsed = 250, 0.0, 1e6
    assert unbounded.progress() == pytest.approx(0.25)


def test_discriminator_path_trains(tmp_path):
    cfg = _cfg(tmp_path, steps=6, disc_start=3, restart_every=0)
    metrics = train_vqgan(cfg)
    assert metrics["steps"] == 6  # counted in batches, not in optimiser steps (two optimisers here)
    rows = list(csv.DictReader(open(next((tmp_path / "tok" / "logs").rglob("metrics.csv")))))
    d = [float(r["train/d_loss"]) for r in rows if r.get("train/d_loss")]
    assert d and all(np.isfinite(d))


def test_config_validation_is_clear():
    with pytest.raises(ValueError, match=r"unknown vqgan training key\(s\) \['step'\]"):
        VQGANTrainConfig.from_dict({"step": 3})
    with pytest.raises(ValueError, match="vqgan.data must be one of"):
        VQGANTrainConfig(data="imagenet")
    with pytest.raises(ValueError, match="unknown VQ-GAN config"):
        VQGANTrainConfig(config="vqgan_huge")


def test_shapes_source_is_seeded_and_has_all_kinds():
    a, kinds = shapes_images(8, (32, 48), seed=1)
    b, _ = shapes_images(8, (32, 48), seed=1)
    c, _ = shapes_images(8, (32, 48), seed=2)
    assert a.shape == (8, 32, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(kinds) == {"rgb", "depth", "normals", "segmentation"}


def test_experiment_yaml_runs_through_the_entry_point(tmp_path, monkeypatch):
    """Compose the experiment over the selected tokenizer the way uio-train does and run a few steps."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("UIO_HOME", str(tmp_path / "home"))
    exp = OmegaConf.load(REPO / "conf" / "experiment" / "vqgan_toyworld.yaml")
    assert exp.job == "vqgan"
    tok_spec = OmegaConf.load(REPO / "conf" / "tokenizer" / "vqgan_test.yaml")
    tok_spec.weights = "tokenizers/vqgan_test_trained"
    cfg = OmegaConf.merge({"seed": 0, "tokenizer": tok_spec}, exp,
                          {"vqgan": {"data": "shapes", "steps": 4, "num_train_images": 32, "num_val_images": 8,
                                     "batch_size": 8, "max_minutes": None, "accelerator": "cpu",
                                     "threads": 1}})
    VQGANTrainConfig.from_dict(OmegaConf.to_container(cfg.vqgan, resolve=True))  # every key is known
    metrics = run(cfg)
    assert metrics["steps"] == 4
    out = tmp_path / "home" / "tokenizers" / "vqgan_test_trained"
    assert (out / "model.safetensors").is_file()
    assert build_image_tokenizer(cfg.tokenizer).weights_source == str(out)
    # with no weights path to train into, the error says what to do
    cfg.tokenizer.weights = None
    with pytest.raises(ValueError, match="vqgan.output_dir is null"):
        run(cfg)


def test_evaluate_command_prints_psnr_and_usage(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UIO_HOME", str(tmp_path))
    torch.manual_seed(0)
    tok = VQGAN("vqgan_test")
    tok.save_pretrained(tmp_path / "tokenizers" / "t")
    main(["--evaluate", "tokenizers/t", "--data", "shapes", "--num-images", "12"])
    out = json.loads(capsys.readouterr().out)
    assert out["num_images"] == 12 and out["num_codes"] == 64
    assert set(out["psnr_by_kind"]) == {"rgb", "depth", "normals", "segmentation"}
    assert 0 < out["codebook_usage"] <= 1 and out["codes_used"] == round(out["codebook_usage"] * 64)
    assert np.isfinite(out["psnr"])


@pytest.mark.slow
def test_toy_recipe_reaches_targets(tmp_path):
    """The full recipe (about 10 minutes on 2 CPU cores): PSNR >= 24 dB and >= 50% codebook usage."""
    from omegaconf import OmegaConf

    exp = OmegaConf.load(REPO / "conf" / "experiment" / "vqgan_toyworld.yaml")
    spec = OmegaConf.load(REPO / "conf" / "tokenizer" / "vqgan_toy.yaml")
    cfg = OmegaConf.merge({"seed": 0, "tokenizer": spec}, exp, {"vqgan": {"output_dir": str(tmp_path / "toy")}})
    metrics = train_vqgan(VQGANTrainConfig.from_dict(OmegaConf.to_container(cfg.vqgan, resolve=True)))
    assert metrics["psnr"] >= 24.0 and metrics["codebook_usage"] >= 0.5, metrics
