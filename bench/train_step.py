"""Training-step throughput of ``uio`` against Hugging Face T5 at equal configuration, same process.

    .venv/bin/python bench/train_step.py                          # tiny + small, original lengths, bf16
    .venv/bin/python bench/train_step.py --layout t5 --batch 8    # text only, encoder 256 / decoder 128
    .venv/bin/python bench/train_step.py --sizes small --dtype fp32 --repeats 7

One step = forward + backward + AdamW update (``fused``, the same for both models). The two
models are timed interleaved (uio, HF, uio, HF, ...) so the machine's speed drift hits both; the
table reports medians, tokens/s (encoder + decoder tokens), the ratio uio / HF, MFU against the
bf16 (or fp32) matmul peak measured in the same run (model FLOPs from ``bench/mfu.py``), and the
peak memory one step adds on top of weights and optimizer state (CPU: the process's resident-set
high-water mark, reset through ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``).

Layouts (the reference gets plain token ids of the same lengths):

* ``original``: the released model's lengths -- encoder 256 text tokens + 576 patches of a 384 px
  image, decoder 256 text slots + 256 image slots (uio: image codes as targets);
* ``t5``: text only, encoder 256 / decoder 128 (the orientation figures of the issue).

Hugging Face T5 is built by ``bench/common.hf_t5_like``: same widths, depths, heads, head_dim,
gated-GELU MLP and the 49,536-token vocabulary; transformers 5.x ties its LM head to the token
table like uio, so both have the same parameters apart from uio's position/patch extras.
"""
from __future__ import annotations

import argparse
import ctypes
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

from common import DTYPES, add_run_args, autocast, finish, hf_t5_like, start  # noqa: E402
from mfu import train_flops  # noqa: E402



# ---- memory -------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory (MiB) a block adds over what is resident when it starts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = float("nan")

    def __enter__(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self.base = _status_kb("VmRSS") * 1024
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:
            self.mib = (_status_kb("VmHWM") * 1024 - self.base) / 2**20


# ---- the two models -----------------------------------------------------------------------------
def lengths(cfg, layout: str) -> dict[str, int]:
    if layout == "original":
        return dict(enc_text=cfg.encoder_max_text_len, patches=cfg.encoder_max_image_len,
                    dec_text=cfg.decoder_max_text_len, dec_image=cfg.decoder_max_image_len)
    if layout == "t5":
        return dict(enc_text=256, patches=0, dec_text=128, dec_image=0)
    raise ValueError(f"layout must be 'original' or 't5', got {layout!r}")


def make_batches(cfg, batch: int, lens: dict[str, int], device: torch.device, seed: int = 0) -> tuple[dict, dict]:
    """A uio batch (contract 3) and the Hugging Face batch of the same lengths."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab
    text = torch.randint(3, v.text_vocab, (batch, lens["enc_text"]), generator=g)
    text[:, -1] = v.eos_id
    targets = torch.randint(3, v.text_vocab, (batch, lens["dec_text"]), generator=g)
    targets[:, -1] = v.eos_id
    ub = {"text_inputs": text, "text_targets": targets, "tasks": ["bench"] * batch}
    if lens["patches"]:
        h, w = cfg.image_input_size
        ub["image_inputs"] = torch.randn(batch, 3, h, w, generator=g)
        ub["image_input_masks"] = torch.ones(batch, cfg.encoder_max_image_len, dtype=torch.bool)
    if lens["dec_image"]:
        ub["image_target_codes"] = torch.randint(0, v.image_vocab, (batch, lens["dec_image"]), generator=g)
        ub["image_target_masks"] = torch.ones(batch, lens["dec_image"], dtype=torch.bool)
    le = lens["enc_text"] + lens["patches"]
    ld = lens["dec_text"] + lens["dec_image"]
    hb = {"input_ids": torch.randint(3, v.text_vocab, (batch, le), generator=g),
          "attention_mask": torch.ones(batch, le, dtype=torch.long),
          "labels": torch.randint(3, v.size, (batch, ld), generator=g)}
    move = lambda d: {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in d.items()}  # noqa: E731
    return move(ub), move(hb)


def make_step(model, batch: dict, hf: bool, dtype: torch.dtype, device: torch.device):
    try:  # the fused kernel (CPU and CUDA): 5x faster than foreach here, for both models alike
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    dev = device.type

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(dtype, dev):
            loss = model(**batch).loss if hf else model(batch).loss
        loss.backward()
        opt.step()
        return loss

    return step


def run(size: str, layout: str, batch: int, dtype_name: str, repeats: int, warmup: int, device: torch.device,
        compile_uio: bool = False) -> dict:
    from uio import Model, ModelConfig

    dtype = DTYPES[dtype_name]
    cfg = ModelConfig.from_size(size)
    lens = lengths(cfg, layout)
    torch.manual_seed(0)
    with torch.device(device):
        uio_model = Model(cfg).train()
        hf_model = hf_t5_like(cfg).to(device).train()
    ub, hb = make_batches(cfg, batch, lens, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if compile_uio:  # per block, as bench/gpu.py does (one compile per block class)
        from uio.training.strategies import transformer_blocks

        for block in transformer_blocks(uio_model.network):
            block.compile()
    steps = {"uio": make_step(uio_model, ub, False, dtype, device),
             "hf": make_step(hf_model, hb, True, dtype, device)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    mem: dict[str, float] = {}
    for name, step in steps.items():  # warm-up; the first step also allocates the optimizer state
        for _ in range(max(warmup, 1)):
            step()
        with PeakMemory(device) as pm:
            step()
        sync()
        mem[name] = pm.mib
    for _ in range(repeats):  # interleaved: A B A B ...
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    le = lens["enc_text"] + lens["patches"]
    ld = lens["dec_text"] + lens["dec_image"]
    tokens = batch * (le + ld)
    flops = train_flops(cfg, batch, le, ld, lens["patches"])
    med = {k: statistics.median(v) for k, v in times.items()}
    out = dict(size=size, layout=layout, batch=batch, dtype=dtype_name, enc_len=le, dec_len=ld, tokens=tokens,
               flops=flops, params_uio=sum(p.numel() for p in uio_model.parameters()),
               params_hf=sum(p.numel() for p in hf_model.parameters()),
               hf_attn=getattr(hf_model.config, "_attn_implementation", "?"))
    for k in steps:
        out[f"{k}_s"] = med[k]
        out[f"{k}_times"] = times[k]
        out[f"{k}_tok_s"] = tokens / med[k]
        out[f"{k}_mem_mib"] = mem[k]
    out["ratio"] = med["hf"] / med["uio"]
    del steps, uio_model, hf_model
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--layout", choices=["original", "t5"], default="original")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="bf16 = autocast, fp32 = plain")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile uio's transformer blocks (slow to compile)")
    add_run_args(p)
    a = p.parse_args(argv)
    device, peak = start(a, a.dtype)
    rows, results = [], []
    for size in a.sizes:
        r = run(size, a.layout, a.batch, a.dtype, a.repeats, a.warmup, device, a.compile)
        r["peak_tflops"] = peak
        results.append(r)
        for k, name in (("uio", "uio"), ("hf", "HF T5")):
            rows.append({"size": size, "model": name, "batch": a.batch, "enc+dec": f"{r['enc_len']}+{r['dec_len']}",
                         "dtype": a.dtype, "s/step": f"{r[k + '_s']:.3f}", "tokens/s": f"{r[k + '_tok_s']:.0f}",
                         "MFU": f"{r['flops'] / r[k + '_s'] / (peak * 1e12):.1%}",
                         "step mem MiB": f"{r[k + '_mem_mib']:.0f}",
                         "uio/HF": f"{r['ratio']:.2f}x" if k == "uio" else ""})
        print(f"{size}: uio {r['uio_s']:.3f} s/step, HF {r['hf_s']:.3f} s/step -> {r['ratio']:.2f}x", flush=True)
    return finish(rows, ["size", "model", "batch", "enc+dec", "dtype", "s/step", "tokens/s", "MFU", "step mem MiB",
                         "uio/HF"],
                  f"matmul peak {peak:.3f} TFLOP/s ({a.dtype}); HF attention: {results[0]['hf_attn']}; "
                  f"medians of {a.repeats} interleaved steps", results, a.json)


if __name__ == "__main__":
    main()
