"""Shared benchmark helpers: timing medians, the machine's matmul peak, the Hugging Face T5 reference.

Every benchmark measures its reference in the same process and reports ratios, because this
machine's speed drifts (see README "Performance").
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, device: str = "cpu", repeats: int = 5) -> float:
    """Measured dense matmul throughput (TFLOP/s) on this machine right now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = median_time(lambda: a @ b, repeats=repeats, warmup=2, sync=sync)
    return 2 * n**3 / t / 1e12


def hf_t5_like(cfg, tie: bool = True):
    """A Hugging Face ``T5ForConditionalGeneration`` with the same widths, depths, heads, head_dim,
    gated-GELU MLP and vocabulary as a :class:`uio.ModelConfig` (random init)."""
    from transformers import T5Config, T5ForConditionalGeneration

    tc = T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.rel_num_buckets, relative_attention_max_distance=cfg.rel_max_distance,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=tie, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, use_cache=True,
    )
    return T5ForConditionalGeneration(tc)


def autocast(dtype: torch.dtype | None, device: str = "cpu"):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fmt_table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |"
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join([line, sep, *body])


# ---- the command line every ratio benchmark shares -------------------------------------------------
def add_run_args(p: argparse.ArgumentParser) -> None:
    """--repeats, --device, --threads and --json."""
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: reproducible ratios on a shared machine, see README)")
    p.add_argument("--json", default=None, help="also write the results here")


def start(a: argparse.Namespace, peak_dtype: str) -> tuple[torch.device, float]:
    """Set the threads, warn on a busy machine, measure the ``peak_dtype`` matmul peak now and say so:
    (device, peak TFLOP/s)."""
    from mfu import warn_if_busy

    torch.set_num_threads(a.threads)
    warn_if_busy(a.threads)
    device = torch.device(a.device)
    peak = matmul_peak_tflops(DTYPES[peak_dtype], device=a.device)
    print(f"device {device}, {torch.get_num_threads()} threads; {peak_dtype} matmul peak {peak:.3f} TFLOP/s "
          f"(measured now)", flush=True)
    return device, peak


def finish(rows: list[dict], cols: list[str], footer: str, results: list[dict], json_path: str | None) -> list[dict]:
    """Print the table and its footer; write ``results`` to ``json_path`` if given; return them."""
    print()
    print(fmt_table(rows, cols))
    print(f"\n{footer}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    return results


def check_overrides(ap: argparse.ArgumentParser, overrides: list[str]) -> None:
    """Arguments argparse did not know must be Hydra ``key=value`` overrides (else a usage error)."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        ap.error(f"unrecognised arguments {bad}: Hydra overrides look like key=value")


def compose_train(overrides: list[str]):
    """``uio-train``'s composed config for ``overrides``, with ``+experiment=tiny_multitask`` unless
    they name an experiment."""
    from hydra import compose, initialize_config_dir

    from uio.cli import conf_dir

    base = [] if any(o.startswith("+experiment=") for o in overrides) else ["+experiment=tiny_multitask"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=base + list(overrides))
