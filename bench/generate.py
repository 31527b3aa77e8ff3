"""Cached generation throughput of ``uio`` against Hugging Face ``generate``, same process.

    .venv/bin/python bench/generate.py                              # small, bf16 weights, batch 1 and 16
    .venv/bin/python bench/generate.py --sizes tiny small --batches 1 8 16 --repeats 5
    .venv/bin/python bench/generate.py --modes text --dtype fp32

Greedy decoding with the KV cache, both models with their weights cast to the benchmark dtype
(bf16 weights decode faster than autocast on CPU). Each row forces the same number of new tokens
on both sides (EOS is disallowed: uio through ``allowed_tokens``, HF through ``min_new_tokens``):

* ``text``: ``--text-tokens`` (64) new text tokens;
* ``image``: one text token then the 256 image tokens of the 16x16 VQ-GAN grid (uio's image
  segment; HF generates 257 tokens of the same vocabulary).

The encoder input is ``--enc-text`` (32) text tokens plus the 576 patches of a 384 px image for
uio, and the same number of token ids for HF. The encoder runs once per call and is timed apart:
"decode tok/s" = batch x new tokens / wall time of decoding from precomputed encoder outputs
(uio: ``uio.modeling.generation.generate``; HF: ``generate(encoder_outputs=...)``); "with encoder"
adds the encoder's median time. All calls are interleaved (uio, HF, uio, HF, ...); medians.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: see README "CPU allocation"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DTYPES, add_run_args, finish, hf_t5_like, start  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

from uio.modeling.generation import generate  # noqa: E402



def make_inputs(cfg, batch: int, enc_text: int, device: torch.device, seed: int = 0) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab
    text = torch.randint(3, v.text_vocab, (batch, enc_text), generator=g)
    text[:, -1] = v.eos_id
    h, w = cfg.image_input_size
    ub = {"text_inputs": text.to(device), "image_inputs": torch.randn(batch, 3, h, w, generator=g).to(device),
          "image_input_masks": torch.ones(batch, cfg.encoder_max_image_len, dtype=torch.bool, device=device)}
    ids = torch.randint(3, v.text_vocab, (batch, enc_text + cfg.encoder_max_image_len), generator=g).to(device)
    return ub, ids


def run(size: str, batch: int, mode: str, dtype_name: str, text_tokens: int, enc_text: int, repeats: int,
        device: torch.device, models: dict | None = None, overrides: dict | None = None) -> dict:
    """One row: uio and HF (cached in ``models`` between rows of one size), interleaved."""
    from uio import Model, ModelConfig

    dtype = DTYPES[dtype_name]
    cfg = ModelConfig.from_size(size, **(overrides or {}))
    if models is None or models.get("size") != size:
        torch.manual_seed(0)
        with torch.device(device):
            uio_model = Model(cfg).eval()
            hf_model = hf_t5_like(cfg).to(device).eval()
        uio_model.network.to(dtype)
        hf_model.to(dtype)
        if models is not None:
            models.update(size=size, uio=uio_model, hf=hf_model)
    else:
        uio_model, hf_model = models["uio"], models["hf"]
    ub, ids = make_inputs(cfg, batch, enc_text, device)
    v = cfg.vocab
    no_eos = torch.ones(v.size, dtype=torch.bool, device=device)
    no_eos[v.eos_id] = False
    image = mode == "image"
    new = 1 + cfg.decoder_max_image_len if image else text_tokens
    attn = torch.ones_like(ids)
    with torch.inference_mode():
        enc = uio_model.encode(ub)
        hf_enc = BaseModelOutput(last_hidden_state=hf_model.get_encoder()(input_ids=ids, attention_mask=attn)[0])

    def uio_encode():
        uio_model.encode(ub)

    def hf_encode():
        hf_model.get_encoder()(input_ids=ids, attention_mask=attn)

    def uio_decode():
        out = generate(uio_model.network, enc, max_text_len=1 if image else text_tokens, image_output=image,
                       allowed_tokens=None if image else no_eos)
        got = out.text_tokens.shape[1] + (out.image_codes.shape[1] if image else 0)
        assert got == new, f"uio generated {got} tokens, expected {new}"

    def hf_decode():
        out = hf_model.generate(encoder_outputs=hf_enc, attention_mask=attn, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, num_beams=1, use_cache=True)
        assert out.shape[1] - 1 == new, f"HF generated {out.shape[1] - 1} tokens, expected {new}"

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fns = {"uio_enc": uio_encode, "hf_enc": hf_encode, "uio": uio_decode, "hf": hf_decode}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):  # interleaved: uio, HF, uio, HF, ...
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    total = {k: med[k] + med[k + "_enc"] for k in ("uio", "hf")}
    return dict(size=size, batch=batch, mode=mode, dtype=dtype_name, new_tokens=new,
                enc_len=enc_text + cfg.encoder_max_image_len, uio_s=med["uio"], hf_s=med["hf"],
                uio_enc_s=med["uio_enc"], hf_enc_s=med["hf_enc"], times=times,
                uio_tok_s=batch * new / med["uio"], hf_tok_s=batch * new / med["hf"], ratio=med["hf"] / med["uio"],
                uio_e2e_tok_s=batch * new / total["uio"], hf_e2e_tok_s=batch * new / total["hf"],
                e2e_ratio=total["hf"] / total["uio"])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["small"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--modes", nargs="+", choices=["text", "image"], default=["text", "image"])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights cast to this dtype")
    p.add_argument("--text-tokens", type=int, default=64, help="new text tokens per row (text mode)")
    p.add_argument("--enc-text", type=int, default=32, help="encoder text tokens (plus 576 patches)")
    add_run_args(p)
    a = p.parse_args(argv)
    device, peak = start(a, "bf16")
    results, rows, models = [], [], {}
    for size in a.sizes:
        for mode in a.modes:
            for b in a.batches:
                r = run(size, b, mode, a.dtype, a.text_tokens, a.enc_text, a.repeats, device, models)
                r["peak_tflops"] = peak
                results.append(r)
                print(f"{size} {mode} batch {b}: decode uio {r['uio_tok_s']:.0f} tok/s, HF {r['hf_tok_s']:.0f} tok/s "
                      f"-> {r['ratio']:.2f}x; with encoder {r['e2e_ratio']:.2f}x", flush=True)
                rows.append({"size": size, "output": mode, "batch": b, "new tokens": r["new_tokens"],
                             "dtype": a.dtype, "uio tok/s": f"{r['uio_tok_s']:.0f}",
                             "HF tok/s": f"{r['hf_tok_s']:.0f}", "uio/HF": f"{r['ratio']:.2f}x",
                             "uio w/ enc": f"{r['uio_e2e_tok_s']:.0f}", "HF w/ enc": f"{r['hf_e2e_tok_s']:.0f}",
                             "uio/HF w/ enc": f"{r['e2e_ratio']:.2f}x"})
        models.clear()
        gc.collect()
    return finish(rows, ["size", "output", "batch", "new tokens", "dtype", "uio tok/s", "HF tok/s", "uio/HF",
                         "uio w/ enc", "HF w/ enc", "uio/HF w/ enc"],
                  f"bf16 matmul peak {peak:.3f} TFLOP/s; greedy, KV cache, {a.dtype} weights; "
                  f"medians of {a.repeats} interleaved runs", results, a.json)


if __name__ == "__main__":
    main()
