"""Where a training step of ``uio-train`` spends its time, phase by phase, on the CPU.

It composes the same Hydra config as ``uio-train`` (``+experiment=tiny_multitask`` unless given),
builds the library's data module and Lightning module, and runs the module's own step pieces in a
plain loop: the next batch from the DataLoader, the image targets through the frozen VQ-GAN
(``tokenize_image_targets``), forward + loss (bf16 autocast when the trainer's precision is
``bf16-mixed``), backward, global-norm clipping and the optimizer step. It prints the median and
mean seconds of each phase over the timed steps and their share; ``--profile K`` adds torch's
operator table (the K operators with the most self time) over three more steps.

    python bench/cpu_step.py                              # the main job's step, the torch default threads
    python bench/cpu_step.py --threads 1 data.batch_size=16
    python bench/cpu_step.py train.compile=true            # per-block torch.compile, as uio-train applies it

Trailing ``key=value`` arguments are Hydra overrides (as for ``uio-train``). The toy world and its
tokenizers are built under ``$UIO_HOME`` when missing, as for the main job. Timings on a shared CPU
drift: compare runs made one after the other on a quiet machine (``uptime``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import check_overrides, compose_train

PHASES = ("data", "image_targets", "forward", "backward", "optimizer")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--profile", type=int, default=0, metavar="K", help="also print the top K operators")
    ap.add_argument("--json", default=None, help="write the result here")
    a, overrides = ap.parse_known_args(argv)
    check_overrides(ap, overrides)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    threads_before = torch.get_num_threads()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    try:
        return _run(a, overrides)
    finally:
        torch.set_num_threads(threads_before)  # a caller (a test) keeps its own setting


def _run(a: argparse.Namespace, overrides: list[str]) -> dict:
    from uio.training.module import training_loss
    from uio.training.train import build_components

    cfg = compose_train(overrides)
    torch.manual_seed(int(cfg.seed))
    dm, module, _ = build_components(cfg)
    dm.setup("fit")
    module.configure_model()  # as Lightning does: train.compile / train.activation_checkpointing per block
    model = module.model
    opt = module.configure_optimizers()["optimizer"]
    tc = module.train_cfg
    bf16 = str(cfg.trainer.get("precision", "32-true")).startswith("bf16")
    clip = cfg.trainer.get("gradient_clip_val")
    batches = iter(dm.train_dataloader())
    model.train()

    def step() -> list[float]:
        t = [time.perf_counter()]
        batch = next(batches)
        t.append(time.perf_counter())
        batch = model.tokenize_image_targets(batch)
        t.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(batch, num_patches=tc["num_patches"], group_rows=bool(tc["group_rows"]),
                        loc_sigma=tc["loc_label_sigma"])
            loss = training_loss(out, tc["loss_normalization"])
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        return [t[i + 1] - t[i] for i in range(len(PHASES))]

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    times = [step() for _ in range(a.steps)]
    per_phase = {p: [s[i] for s in times] for i, p in enumerate(PHASES)}
    totals = [sum(s) for s in times]
    mean_total = statistics.fmean(totals)
    result = {"batch_size": int(cfg.data.batch_size), "threads": torch.get_num_threads(), "bf16": bf16,
              "steps": a.steps, "warmup_s": warmup_s, "median_step_s": statistics.median(totals), "mean_step_s": mean_total,
              "phases": {p: {"median_s": statistics.median(v), "mean_s": statistics.fmean(v),
                             "share": statistics.fmean(v) / mean_total} for p, v in per_phase.items()}}
    print(f"batch {result['batch_size']}, {result['threads']} thread(s), bf16 autocast {bf16}: "
          f"median step {result['median_step_s']:.3f} s over {a.steps} steps ({a.warmup} untimed first: "
          f"{warmup_s:.1f} s)")
    print(f"{'phase':<14} {'median s':>9} {'mean s':>9} {'share':>7}")
    for p, r in result["phases"].items():
        print(f"{p:<14} {r['median_s']:>9.4f} {r['mean_s']:>9.4f} {r['share']:>7.1%}")
    if a.profile > 0:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
