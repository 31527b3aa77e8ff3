"""Multi-process training on CPU (gloo): a 2-process DDP run, and FSDP2 (fully_shard per block via
ModelParallelStrategy) with sharded checkpoints, export and resume. Each run is `python -m
uio.cli.train ...` in a subprocess, as a user would launch it; it must exit 0 (the gloo
shutdown abort is cured in uio.training.train.finish_distributed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_training import read_metrics, tiny_overrides, toy_root  # noqa: F401  (toy_root is a fixture)


def _train(overrides: list[str], cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "uio.cli.train", *overrides], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    assert "terminate called" not in r.stderr
    return r


def test_ddp_two_processes(toy_root, text_tokenizer, tmp_path):  # noqa: F811
    from uio.model import Model

    run_dir = tmp_path / "ddp"
    _train(tiny_overrides(toy_root, text_tokenizer.model_file.parent, run_dir, "trainer=ddp",
                          "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3"), tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    metrics = read_metrics(run_dir)
    assert all("train/loss" in metrics[s] for s in range(3))
    # the checkpoint is a single file; the export loads and matches it
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3
    exported = Model.from_pretrained(summary["export_dir"])
    for k, v in exported.state_dict().items():
        assert torch.equal(v, state["state_dict"][f"model.{k}"]), k


@pytest.mark.slow
def test_fsdp2_on_cpu_sharded_checkpoint_export_and_resume(toy_root, text_tokenizer, tmp_path):  # noqa: F811
    from uio.model import Model

    run_dir = tmp_path / "fsdp2"
    # min_ratio: tiny_multitask's schedule reaches 0 at max_steps, so the resumed steps 2-3 of a run
    # first stopped at max_steps=2 would otherwise train at learning rate 0 and change nothing
    base = tiny_overrides(toy_root, text_tokenizer.model_file.parent, run_dir, "trainer=fsdp2",
                          "trainer.accelerator=cpu", "trainer.devices=2", "optim.min_ratio=0.5")
    _train(base + ["trainer.max_steps=2", "trainer.val_check_interval=2"], tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file() and any(last.glob("*.distcp"))
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporaries left
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    first = Model.from_pretrained(summary["export_dir"])  # full weights gathered from the shards
    metrics = read_metrics(run_dir)
    assert "val/loss" in metrics[1] and "val/vqa/acc" in metrics[1]
    _train(base + ["trainer.max_steps=4", "resume=last"], tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    second = Model.from_pretrained(summary["export_dir"])
    assert not torch.equal(first.network.token_embedder.weight, second.network.token_embedder.weight)
    assert all("train/loss" in m for s, m in read_metrics(run_dir).items() if s in (2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("trainer", ["gpu", "fsdp", "fsdp2"])
def test_gpu_strategies(trainer, toy_root, text_tokenizer, tmp_path):  # noqa: F811
    """On a GPU machine: bf16 training, Lightning's FSDPStrategy (blocks as units, sharded
    checkpoint) and FSDP2, each for a few steps with validation, a checkpoint and the export."""
    from uio.model import Model

    run_dir = tmp_path / trainer
    n = max(1, min(2, torch.cuda.device_count()))
    _train(tiny_overrides(toy_root, text_tokenizer.model_file.parent, run_dir, f"trainer={trainer}",
                          f"trainer.devices={n}", "trainer.max_steps=4", "trainer.val_check_interval=4"), tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == n
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    Model.from_pretrained(summary["export_dir"])
    assert "val/loss" in read_metrics(run_dir)[3]
