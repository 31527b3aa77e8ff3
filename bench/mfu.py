"""Model FLOPs and utilisation: the FLOP count every benchmark divides by, and the measured peak.

    .venv/bin/python bench/mfu.py                  # matmul peak (bf16, fp32) + FLOPs per step of each size
    .venv/bin/python bench/mfu.py --check          # the formula against torch's FlopCounterMode on HF T5

Model FLOPs count the matrix multiplications a T5-style encoder-decoder needs (2 FLOPs per
multiply-add; training = 3 x forward), the same number for ``uio`` and for the Hugging Face
reference at equal configuration, so MFU ratios equal throughput ratios:

* per encoder layer and token: q/k/v/out projections ``8 d h`` (h = heads * head_dim), attention
  ``4 Le h`` (scores and values over all Le keys), gated MLP ``6 d f``;
* per decoder layer and token: self-attention ``8 d h + 4 Ld h``, cross-attention ``4 d h + 4 Le h``
  plus ``4 d h`` per encoder token for its keys/values, gated MLP ``6 d f``;
* logits ``2 d V`` per decoder token over the **full** vocabulary (as Hugging Face computes them;
  ``uio`` computes only the slot's modality, so it is credited with work it skips, not the reverse);
* the patch projection ``2 (3 p^2) d`` per image patch (``uio`` only; zero for text-only inputs).

Causal attention is counted in full (the kernels compute the masked half on CPU). Position biases,
norms, softmax and the optimizer are not counted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def warn_if_busy(threads: int) -> None:
    """Multi-threaded CPU timings on an oversubscribed machine measure OpenMP barrier stalls (every
    parallel op waits a scheduler time slice for the descheduled thread), not the model: say so."""
    import os

    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = os.cpu_count() or 1
    if threads > 1 and load > cores:
        print(f"WARNING: load average {load:.1f} on {cores} cores: with {threads} threads every parallel op can stall "
              f"for a time slice; rerun with --threads 1 for meaningful ratios", flush=True)


def forward_flops(cfg, batch: int, enc_len: int, dec_len: int, patches: int = 0) -> float:
    """Matmul FLOPs of one forward pass over ``batch`` rows of ``enc_len`` encoder tokens (of which
    ``patches`` are image patches) and ``dec_len`` decoder tokens, for a :class:`uio.ModelConfig`."""
    d, h, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    le, ld = enc_len, dec_len
    enc_layer = le * (8 * d * h + 4 * le * h + 6 * d * f)
    dec_layer = ld * (8 * d * h + 4 * ld * h + 4 * d * h + 4 * le * h + 6 * d * f) + le * 4 * d * h
    total = cfg.num_encoder_layers * enc_layer + cfg.num_decoder_layers * dec_layer
    total += ld * 2 * d * v + patches * 2 * 3 * cfg.patch_size**2 * d
    return float(batch * total)


def train_flops(cfg, batch: int, enc_len: int, dec_len: int, patches: int = 0) -> float:
    """Forward + backward matmul FLOPs of one training step (3 x forward)."""
    return 3.0 * forward_flops(cfg, batch, enc_len, dec_len, patches)


def decode_flops_per_token(cfg, enc_len: int, position: int) -> float:
    """Matmul FLOPs to generate one token at decoder ``position`` with a KV cache (cross keys/values
    precomputed), text logits only counted over the full vocabulary."""
    d, h, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    layer = 8 * d * h + 4 * (position + 1) * h + 4 * d * h + 4 * enc_len * h + 6 * d * f
    return float(cfg.num_decoder_layers * layer + 2 * d * v)


def _check(size: str) -> None:
    """Compare the formula with FlopCounterMode on the Hugging Face reference (text only)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from common import hf_t5_like
    from uio import ModelConfig

    cfg = ModelConfig.from_size(size)
    b, le, ld = 2, 64, 32
    hf = hf_t5_like(cfg)
    ids = torch.randint(3, 1000, (b, le))
    labels = torch.randint(3, 1000, (b, ld))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # the counter skips CPU flash
        hf(input_ids=ids, labels=labels).loss.backward()
    counted = fc.get_total_flops()
    formula = train_flops(cfg, b, le, ld)
    print(f"{size}: FlopCounterMode on HF T5 {counted / 1e9:.3f} GFLOP, formula {formula / 1e9:.3f} GFLOP "
          f"(ratio {counted / formula:.4f})")


def main(argv: list[str] | None = None) -> None:
    from common import matmul_peak_tflops

    import torch

    from uio import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare the formula with torch's FLOP counter")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "base", "large", "xl"])
    a = p.parse_args(argv)
    if a.check:
        for s in a.sizes[:2]:
            _check(s)
        return
    print(f"matmul peak: bf16 {matmul_peak_tflops(torch.bfloat16):.3f} TFLOP/s, "
          f"fp32 {matmul_peak_tflops(torch.float32):.3f} TFLOP/s ({torch.get_num_threads()} threads)")
    for s in a.sizes:
        cfg = ModelConfig.from_size(s)
        le = cfg.encoder_max_text_len + cfg.encoder_max_image_len
        ld = cfg.decoder_max_text_len + cfg.decoder_max_image_len
        fl = train_flops(cfg, 1, le, ld, cfg.encoder_max_image_len)
        print(f"{s:>6}: training step at the original lengths (encoder {le}, decoder {ld}): "
              f"{fl / 1e12:.3f} TFLOP per example")


if __name__ == "__main__":
    main()
