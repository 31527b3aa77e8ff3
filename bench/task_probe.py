"""Train a fresh model on a few tasks for a few hundred steps and ask whether it learnt to look.

A learning-dynamics probe (docs/results-toyworld-v2.md), not a speed benchmark. It composes the same
Hydra config as ``uio-train`` (``+experiment=tiny_multitask`` unless overridden), builds the
library's data module and model, and trains them in a plain loop: bf16 autocast, global-norm
clipping 1.0, ``uio-train``'s linear warm-up and cosine schedule, down to 10% of the learning rate. Then it prints:

- the training-batch image use: the loss of the next training batch with its own images, with the
  batch's images rotated by one, and with all-zero images;
- per task, ``uio-eval``'s table on held-out examples: the metric next to the best trivial
  baseline (fitted on ``--baseline-examples`` training examples) and the image use.

    python bench/task_probe.py --tasks depth --steps 600 --optimizer adafactor --eval-examples 50
    python bench/task_probe.py --tasks object_localization --steps 2000 --optimizer adamw --lr 3e-4 \\
        data.toyworld.num_train_scenes=10000 "data.toyworld.tasks=[object_localization]"

Trailing ``key=value`` arguments are Hydra overrides (as for ``uio-train``). The toy world and its
tokenizers are built under ``$UIO_HOME`` when missing, as for the main job.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import check_overrides, compose_train

from uio.evaluation import evaluate_task, format_table, load_examples, primary_rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", required=True, help="comma-separated training tasks (also the evaluated ones)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adafactor",
                    help="adafactor: the config's optim group (the paper's); adamw: uio-train's AdamW "
                         "(betas 0.9/0.98, weight decay 0.01 on matrices)")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 for adamw, the config's for adafactor")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-examples", type=int, default=100, help="held-out examples per task")
    ap.add_argument("--baseline-examples", type=int, default=500, help="training examples the baselines fit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="save_pretrained the trained model here")
    a, overrides = ap.parse_known_args(argv)
    check_overrides(ap, overrides)
    tasks = [t for t in a.tasks.split(",") if t]

    from uio.training.optim import build_optimizer, cosine_schedule
    from uio.training.train import build_components

    cfg = compose_train([f"data.batch_size={a.batch}", f"mixture.tasks=[{','.join(tasks)}]", *overrides])
    torch.manual_seed(a.seed)
    dm, module, _ = build_components(cfg)
    dm.setup("fit")
    model = module.model
    if a.optimizer == "adamw":
        opt = build_optimizer(model, "adamw", lr=a.lr or 1e-3, weight_decay=0.01, betas=(0.9, 0.98))
    else:
        opt = module.configure_optimizers()["optimizer"]
        if a.lr is not None:
            for g in opt.param_groups:
                g["lr"] = a.lr
    base_lr = [g["lr"] for g in opt.param_groups]
    lr_factor = cosine_schedule(a.steps, a.warmup, min_ratio=0.1)
    batches = iter(dm.train_dataloader())
    model.train()
    t0 = time.time()
    for step in range(a.steps):
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = lr * lr_factor(step)
        batch = model.tokenize_image_targets(next(batches))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch, num_patches=cfg.train.num_patches)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step} loss {out.loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        batch = model.tokenize_image_targets(next(batches))
        real = model(batch).loss.item()
        rolled = model({**batch, "image_inputs": batch["image_inputs"].roll(1, 0)}).loss.item()
        zero = model({**batch, "image_inputs": torch.zeros_like(batch["image_inputs"])}).loss.item()
    print(f"training batch loss: own images {real:.3f}, rotated {rolled:.3f}, zero {zero:.3f} "
          f"(image use {rolled - real:.3f})")
    if a.save:
        model.save_pretrained(a.save)
    from uio.baselines import fit_baseline

    def root(roots):  # the toy world (None) or one shard root
        roots = list(roots or [])
        if len(roots) > 1:
            raise ValueError(f"task_probe evaluates one shard root, got {roots}")
        return roots[0] if roots else None

    train_data, val_data = root(cfg.data.roots), root(cfg.data.val_roots or cfg.data.roots)
    results = []
    for task in tasks:
        examples = load_examples(val_data, task, cfg.data.val_split, a.eval_examples)
        baseline = fit_baseline(task, load_examples(train_data, task, cfg.data.train_split, a.baseline_examples))
        results.append(evaluate_task(model, task, examples, baseline=baseline, measure_image_use=True))
    print(format_table(primary_rows(results)))
    return dict(train_image_use=rolled - real, results=results)


if __name__ == "__main__":
    main()
