"""GPU benchmarks: bf16 training MFU for ``large``, ``xl`` under FSDP2 + activation checkpointing on
one GPU, and cached generation against Hugging Face -- on a CUDA machine (``bench/gpu.sh``).

    bash bench/gpu.sh                                         # all of it, tables at the end
    python bench/gpu.py train --size large --batch 16         # one training measurement
    python bench/gpu.py train --size xl --fsdp --checkpointing --batch auto
    python bench/gpu.py generate --sizes small large
    python bench/gpu.py all --dry-run                         # CPU: every code path on toy sizes

Training: the original lengths (encoder 256 text + 576 patches, decoder 256 text + 256 image
slots), bf16 autocast over float32 master weights (FSDP2: a bf16 ``MixedPrecisionPolicy``
instead), fused AdamW, optional per-block ``torch.compile``. MFU = model FLOPs (``bench/mfu.py``)
per second over (a) the matmul peak measured in the same run and (b) the device's nominal dense
bf16 peak when known (H100 SXM 989, H200 989, A100 312 TFLOP/s). ``--batch auto`` takes the
largest of 64, 32, 16, ... that runs without running out of memory. Generation: ``bench/generate.py``
on the GPU (bf16 weights, greedy, KV cache, interleaved with Hugging Face ``generate``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt_table, matmul_peak_tflops  # noqa: E402
from mfu import train_flops  # noqa: E402

NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
# toy configuration of the CPU dry run: every code path, seconds instead of minutes
DRY = dict(text_vocab=1000, image_vocab=512, image_input_size=(64, 64), image_target_grid=(4, 4),
           image_target_size=(64, 64), encoder_max_text_len=32, decoder_max_text_len=16, d_model=64, num_heads=2,
           head_dim=32, d_ff=128, num_encoder_layers=2, num_decoder_layers=2)


def nominal_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def single_process_group(device: torch.device):
    """A world of one process (FSDP2 wants a process group even on one GPU)."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def build(cfg, device: torch.device, fsdp: bool, checkpointing: bool, compile_blocks: bool):
    """The model (float32 master weights) prepared for training: activation checkpointing, FSDP2, compile."""
    from uio import Model
    from uio.training.strategies import apply_activation_checkpointing, apply_fsdp2, transformer_blocks

    with torch.device("meta"):
        model = Model(cfg)
    model.to_empty(device=device)
    model.network.init_weights()
    model.train()
    if checkpointing:
        apply_activation_checkpointing(model.network)
    if compile_blocks:
        for block in transformer_blocks(model.network):
            block.compile()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (1,))
        apply_fsdp2(model, mesh, mixed_precision="bf16", reduce_dtype="fp32")
    return model


def synthetic_batch(cfg, batch: int, device: torch.device, seed: int = 0) -> dict:
    """A contract-3 batch at the configuration's full lengths (random ids, pixels and codes)."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab
    text = torch.randint(3, v.text_vocab, (batch, cfg.encoder_max_text_len), generator=g)
    targets = torch.randint(3, v.text_vocab, (batch, cfg.decoder_max_text_len), generator=g)
    text[:, -1] = targets[:, -1] = v.eos_id
    ni = cfg.decoder_max_image_len
    out = {"text_inputs": text, "text_targets": targets,
           "image_inputs": torch.randn(batch, 3, *cfg.image_input_size, generator=g),
           "image_input_masks": torch.ones(batch, cfg.encoder_max_image_len, dtype=torch.bool),
           "image_target_codes": torch.randint(0, v.image_vocab, (batch, ni), generator=g),
           "image_target_masks": torch.ones(batch, ni, dtype=torch.bool)}
    return {k: t.to(device) for k, t in out.items()} | {"tasks": ["bench"] * batch}


def train_once(cfg, batch: int, device: torch.device, fsdp: bool, checkpointing: bool, compile_blocks: bool,
               steps: int, warmup: int) -> dict:
    model = build(cfg, device, fsdp, checkpointing, compile_blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    data = synthetic_batch(cfg, batch, device)
    # FSDP2's policy already computes in bf16; otherwise autocast over the float32 weights
    amp = contextlib.nullcontext() if fsdp else torch.autocast(device.type, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = model(data).loss
        loss.backward()
        opt.step()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    loss = loss.item()
    if not loss == loss or abs(loss) == float("inf"):
        raise RuntimeError(f"non-finite loss {loss}")
    le = cfg.encoder_max_text_len + cfg.encoder_max_image_len
    ld = cfg.decoder_max_text_len + cfg.decoder_max_image_len
    med = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.parameters())
    return dict(size=cfg.name, params=params, batch=batch, enc_len=le, dec_len=ld, fsdp=fsdp,
                checkpointing=checkpointing,
                compile=compile_blocks, step_s=med, times=times, warmup_s=warm_s, tokens_s=batch * (le + ld) / med,
                flops=train_flops(cfg, batch, le, ld, cfg.encoder_max_image_len), peak_mem_gib=mem, loss=loss)


def train(size: str, batch: str, device: torch.device, fsdp: bool, checkpointing: bool, compile_blocks: bool,
          steps: int, warmup: int, dry_run: bool) -> dict:
    from uio import ModelConfig

    cfg = ModelConfig.from_size(size, **(DRY if dry_run else {}))
    sizes = [64, 32, 16, 8, 4, 2, 1] if batch == "auto" else [int(batch)]
    if dry_run and batch == "auto":
        sizes = [2, 1]
    ctx = single_process_group(device) if fsdp else contextlib.nullcontext()
    with ctx:
        for b in sizes:
            try:
                r = train_once(cfg, b, device, fsdp, checkpointing, compile_blocks, steps, warmup)
            except torch.OutOfMemoryError:
                print(f"{size}: batch {b} runs out of memory", flush=True)
                r = None
            gc.collect()  # the model and optimizer of the attempt go before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if r is not None:
                break
        else:
            raise RuntimeError(f"{size}: not even batch {sizes[-1]} fits")
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["train", "generate", "all"])
    p.add_argument("--size", default="large", help="train: model size")
    p.add_argument("--batch", default="auto", help="train: batch size or 'auto' (largest that fits)")
    p.add_argument("--fsdp", action="store_true", help="train: FSDP2 (one process) with a bf16 policy")
    p.add_argument("--checkpointing", action="store_true", help="train: activation checkpointing per block")
    p.add_argument("--no-compile", action="store_true", help="train: eager blocks (default: torch.compile per block)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sizes", nargs="+", default=["small", "large"], help="generate: model sizes")
    p.add_argument("--dry-run", action="store_true", help="toy sizes, any device: check that every path runs")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.dry_run:
        raise SystemExit("no CUDA device: use bench/train_step.py and bench/generate.py on CPU, or --dry-run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak_tflops(torch.bfloat16, n=8192 if device.type == "cuda" else 1024, device=device.type)
    nominal = nominal_peak(device)
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; measured bf16 matmul peak {peak:.1f} TFLOP/s"
          + (f", nominal {nominal:.0f}" if nominal else ""), flush=True)
    results: dict = {"device": name, "torch": torch.__version__, "peak_tflops": peak, "nominal_tflops": nominal}
    compile_blocks = not a.no_compile and device.type == "cuda"

    runs = []
    if a.what in ("train", "all"):
        plan = [(a.size, a.batch, a.fsdp, a.checkpointing)] if a.what == "train" else \
            [("large", a.batch, False, False), ("xl", "auto", True, True)]
        for size, batch, fsdp, ckpt in plan:
            r = train(size, batch, device, fsdp, ckpt, compile_blocks, 2 if a.dry_run else a.steps,
                      1 if a.dry_run else a.warmup, a.dry_run)
            r["mfu_measured"] = r["flops"] / r["step_s"] / (peak * 1e12)
            r["mfu_nominal"] = r["flops"] / r["step_s"] / (nominal * 1e12) if nominal else None
            runs.append(r)
            print(f"{size}: batch {r['batch']}, {r['step_s']:.3f} s/step, {r['tokens_s']:.0f} tokens/s, "
                  f"MFU {r['mfu_measured']:.1%} of measured peak"
                  + (f", {r['mfu_nominal']:.1%} of nominal" if nominal else "") + f", {r['peak_mem_gib']:.1f} GiB",
                  flush=True)
        results["train"] = runs
    gen = []
    if a.what in ("generate", "all"):
        import generate as gen_bench

        models: dict = {}
        for size in (["tiny"] if a.dry_run else a.sizes):
            for mode in ("text", "image"):
                for b in (1, 16):
                    if a.dry_run:
                        r = gen_bench.run(size, b, mode, "bf16", 4, 8, 1, device, models, overrides=DRY)
                    else:
                        r = gen_bench.run(size, b, mode, "bf16", 64, 32, 3, device, models)
                    gen.append(r)
                    print(f"generate {size} {mode} batch {b}: uio {r['uio_tok_s']:.0f} tok/s, "
                          f"HF {r['hf_tok_s']:.0f} tok/s -> {r['ratio']:.2f}x", flush=True)
            models.clear()
            gc.collect()
        results["generate"] = gen

    print(f"\n### {name} (torch {torch.__version__})\n")
    if runs:
        print(fmt_table([{"size": r["size"], "batch": r["batch"], "FSDP2": "yes" if r["fsdp"] else "no",
                          "act. ckpt": "yes" if r["checkpointing"] else "no",
                          "compile": "yes" if r["compile"] else "no",
                          "s/step": f"{r['step_s']:.3f}", "tokens/s": f"{r['tokens_s']:.0f}",
                          "MFU (measured peak)": f"{r['mfu_measured']:.1%}",
                          "MFU (nominal)": f"{r['mfu_nominal']:.1%}" if r["mfu_nominal"] else "n/a",
                          "peak GiB": f"{r['peak_mem_gib']:.1f}"} for r in runs],
                        ["size", "batch", "FSDP2", "act. ckpt", "compile", "s/step", "tokens/s", "MFU (measured peak)",
                         "MFU (nominal)", "peak GiB"]))
        print(f"\nbf16 matmul peak measured {peak:.1f} TFLOP/s; encoder {runs[0]['enc_len']} / decoder "
              f"{runs[0]['dec_len']} tokens per example; medians of {len(runs[0]['times'])} steps")
    if gen:
        print()
        print(fmt_table([{"size": r["size"], "output": r["mode"], "batch": r["batch"], "new tokens": r["new_tokens"],
                          "uio tok/s": f"{r['uio_tok_s']:.0f}", "HF tok/s": f"{r['hf_tok_s']:.0f}",
                          "uio/HF": f"{r['ratio']:.2f}x"} for r in gen],
                        ["size", "output", "batch", "new tokens", "uio tok/s", "HF tok/s", "uio/HF"]))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
