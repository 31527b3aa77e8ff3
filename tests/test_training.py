"""Training: the paper's optimiser and schedule, atomic checkpoints, the LightningModule, exact resume."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from uio.training.checkpointing import AtomicCheckpointIO, atomic_replace_dir, atomic_torch_save, recover_dir
from uio.training.optim import Adafactor, build_optimizer, build_scheduler, rsqrt_schedule


# ---- optimiser and schedule ---------------------------------------------------------------------
def test_rsqrt_schedule_is_the_papers():
    """lr 1e-2 for the first 10k steps, then 1/sqrt(k) (k = step number, 1-based)."""
    f = rsqrt_schedule(10_000)
    base = 1e-2
    assert base * f(0) == pytest.approx(1e-2)
    assert base * f(9_999) == pytest.approx(1e-2)  # step k = 10,000
    for k in (10_001, 40_000, 1_000_000):
        assert base * f(k - 1) == pytest.approx(1 / math.sqrt(k), rel=1e-12)
    w = rsqrt_schedule(100, warmup_steps=10)
    assert [round(w(i), 3) for i in range(3)] == [0.1, 0.2, 0.3]


def test_scheduler_steps_per_optimizer_step():
    opt = build_optimizer(torch.nn.Linear(2, 2), "adafactor", lr=1e-2)
    sched = build_scheduler(opt, "rsqrt", constant_steps=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [1e-2] * 4
    assert lrs[4:] == pytest.approx([1e-2 * math.sqrt(4 / k) for k in (5, 6, 7, 8)])


def test_cosine_follows_steps_or_time_whichever_is_further():
    """With a time limit, the cosine decay is driven by the larger of step and time progress."""
    from uio.training.optim import cosine_schedule

    spent = [0.0]
    f = cosine_schedule(1000, time_progress=lambda: spent[0])
    assert f(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))  # steps lead
    spent[0] = 0.5
    assert f(99) == pytest.approx(0.5)  # time leads: half the budget spent
    spent[0] = 1.0
    assert f(99) == pytest.approx(0.0) and f(2000) == pytest.approx(0.0)
    assert cosine_schedule(1000)(499) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_holds_the_rate_then_decays_linearly():
    """Warm-up, stable, decay: full rate until the last decay_fraction of steps or time, then linear."""
    from uio.training.optim import wsd_schedule

    f = wsd_schedule(1000, warmup_steps=10, min_ratio=0.1, decay_fraction=0.2)
    assert f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == f(500) == f(799) == pytest.approx(1.0)  # stable until 80% of the steps after warm-up
    assert f(899) == pytest.approx(1.0 - 0.9 * (890 / 990 - 0.8) / 0.2)
    assert f(999) == pytest.approx(0.1) and f(5000) == pytest.approx(0.1)
    spent = [0.9]  # a time budget further along than the steps drives the decay
    g = wsd_schedule(1000, decay_fraction=0.2, time_progress=lambda: spent[0])
    assert g(0) == pytest.approx(0.5)
    spent[0] = 1.0
    assert g(0) == pytest.approx(0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "wsd", total_steps=10, decay_fraction=0.5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == [1.0] * 5 and lrs[5] < 1.0 and lrs == sorted(lrs, reverse=True)
    with pytest.raises(ValueError, match="decay_fraction must be in"):
        wsd_schedule(100, decay_fraction=0.0)
    with pytest.raises(ValueError, match="wsd schedule needs total_steps"):
        build_scheduler(opt, "wsd")


def _reference_adafactor_step(p, g, state, k, lr=1e-2, beta1=0.9, decay=0.8, eps1=1e-30, eps2=1e-3, d=1.0):
    """Adafactor written out for one (R, C) matrix in float64, from the paper's algorithm."""
    beta2 = 1 - k ** -decay
    sq = g * g + eps1
    state["r"] = beta2 * state["r"] + (1 - beta2) * sq.mean(1)
    state["c"] = beta2 * state["c"] + (1 - beta2) * sq.mean(0)
    v = torch.outer(state["r"], state["c"]) / state["r"].mean()
    u = g / v.sqrt()
    u = u / max(1.0, float(u.pow(2).mean().sqrt()) / d)
    state["m"] = beta1 * state["m"] + (1 - beta1) * u
    scale = max(eps2, float(p.pow(2).mean().sqrt()))
    return p - lr * scale * state["m"]


def test_adafactor_matches_the_written_out_algorithm():
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    param = torch.nn.Parameter(w.clone())
    bias = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    opt = Adafactor([param, bias], lr=1e-2, beta1=0.9)
    ref = w.clone()
    state = {"r": torch.zeros(5, dtype=torch.float64), "c": torch.zeros(7, dtype=torch.float64),
             "m": torch.zeros(5, 7, dtype=torch.float64)}
    for k in range(1, 6):
        g = torch.randn(5, 7, dtype=torch.float64)
        param.grad = g.clone()
        bias.grad = torch.randn(7, dtype=torch.float64)
        opt.step()
        ref = _reference_adafactor_step(ref, g, state, k)
        torch.testing.assert_close(param.detach(), ref, rtol=1e-5, atol=1e-7)
    # factored: O(R + C) second-moment state for matrices, full state for vectors
    s = opt.state[param]
    assert s["row_var"].shape == (5,) and s["col_var"].shape == (7,) and "var" not in s
    assert opt.state[bias]["var"].shape == (7,)
    assert int(s["step"]) == 5


def test_adafactor_update_is_clipped_and_beta2_starts_at_zero():
    """First step: beta2 = 1 - 1^-0.8 = 0, so v = g^2 and |u| = 1 elementwise (RMS 1, no clipping)."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = Adafactor([p], lr=0.1, beta1=None, scale_parameter=False)
    p.grad = torch.tensor([1e-3, -5.0, 2.0, -1e4])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, 1.1, 0.9, 1.1]))


def test_optimizer_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(torch.nn.Linear(2, 2), "sgd", lr=1.0)
    with pytest.raises(ValueError, match="beta1"):
        Adafactor(torch.nn.Linear(2, 2).parameters(), beta1=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(build_optimizer(torch.nn.Linear(2, 2), "adamw", lr=1e-3), "cosine", total_steps=None)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        build_scheduler(build_optimizer(torch.nn.Linear(2, 2), "adamw", lr=1e-3), "linear")


def test_adamw_excludes_norms_and_vectors_from_decay():
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(m, "adamw", lr=1e-3, weight_decay=0.1)
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert len(decayed) == 1 and len(decayed[0]["params"]) == 1 and decayed[0]["params"][0] is m[0].weight


# ---- atomic checkpoints -------------------------------------------------------------------------
def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(1000)}, path)
    before = path.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *a, **kw):  # writes part of the file, then the process "dies"
        real_save(obj, f, *a, **kw)
        f.truncate(10)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.arange(2000)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == before
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind
    io.save_checkpoint({"step": 3}, path)
    assert io.load_checkpoint(path)["step"] == 3


def test_killed_writer_leaves_only_a_hidden_temporary(tmp_path):
    """A SIGKILL during the write: the real name still holds the old complete checkpoint."""
    import subprocess
    import sys

    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    code = (
        "import os, torch, sys\n"
        "from uio.training.checkpointing import atomic_write\n"
        "def w(f):\n"
        "    f.write(b'x' * 1000); f.flush(); os.kill(os.getpid(), 9)\n"
        f"atomic_write({str(path)!r}, w)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -9
    assert torch.load(path)["step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.tmp-")


def test_atomic_directory_swap(tmp_path):
    final = tmp_path / "step3.ckpt"
    for step in (1, 2):
        tmp = tmp_path / ".step3.ckpt.tmp"
        tmp.mkdir()
        (tmp / "shard0").write_text(str(step))
        atomic_replace_dir(tmp, final)
        assert (final / "shard0").read_text() == str(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step3.ckpt"]
    # a crash between the two renames: the old copy is put back
    os.replace(final, tmp_path / ".step3.ckpt.old")
    assert recover_dir(final) == final and (final / "shard0").read_text() == "2"


# ---- the LightningModule and the runner on a tiny toy world ------------------------------------
TASKS = ["image_captioning", "vqa", "object_localization", "depth", "image_classification", "span_corruption",
         "text_classification"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """A few toy-world scenes (64 px) for seven tasks covering six task groups; a few seconds."""
    from uio.data.toyworld import ensure_toyworld

    root = tmp_path_factory.mktemp("toyworld")
    ensure_toyworld(root, num_train_scenes=16, num_val_scenes=4, image_size=64, max_passages=60, progress=False,
                    tasks=TASKS, num_workers=1)
    return root


def tiny_overrides(root, tok_dir, run_dir, *extra: str) -> list[str]:
    """tiny_multitask, shrunk: a 2+2-layer 64-wide model, 4-example batches, the test VQ-GAN."""
    return ["+experiment=tiny_multitask", "tokenizer=vqgan_test", f"text_tokenizer.path={tok_dir}",
            "data.toyworld=null", f"data.roots=[{root}]", f"mixture.tasks=[{','.join(TASKS)}]",
            "model.d_model=64", "model.num_heads=2", "model.head_dim=32", "model.d_ff=128",
            "model.num_encoder_layers=2", "model.num_decoder_layers=2", "model.image_input_size=[64,64]",
            "model.encoder_max_text_len=64", "model.decoder_max_text_len=64",
            "data.batch_size=4", "data.num_workers=0", "data.val_examples_per_task=2", "train.num_patches=8",
            "trainer.max_steps=4", "trainer.log_every_n_steps=1", "trainer.val_check_interval=null",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "callbacks.checkpoint.every_n_train_steps=2", "logger=csv", "+logger.csv.flush_logs_every_n_steps=1",
            f"paths.run_dir={run_dir}", *extra]


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from uio.cli import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def read_metrics(run_dir) -> dict[int, dict[str, float]]:
    """metrics.csv -> {step: {key: value}} (non-empty cells only)."""
    import csv

    out: dict[int, dict[str, float]] = {}
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            out.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v != "" and k != "step"})
    return out


def test_tiny_steps_log_checkpoint_validate_and_export(toy_root, text_tokenizer, tmp_path):
    from uio.model import Model
    from uio.tasks import get_task
    from uio.training.module import UIOLitModule
    from uio.training.train import run

    run_dir = tmp_path / "run"
    cfg = compose_cfg(tiny_overrides(toy_root, text_tokenizer.model_file.parent, run_dir,
                                     "trainer.val_check_interval=4"))
    summary = run(cfg)
    assert summary["steps"] == 4 and summary["world_size"] == 1
    metrics = read_metrics(run_dir)
    train = [metrics[s]["train/loss"] for s in range(4)]
    assert all(math.isfinite(v) for v in train)
    groups = {get_task(t).group for t in TASKS}
    logged = {k.removeprefix("train/loss/") for m in metrics.values() for k in m if k.startswith("train/loss/")}
    assert logged and logged <= groups
    assert any("train/tokens_per_s" in m for m in metrics.values())
    assert any(k.startswith("lr-") for m in metrics.values() for k in m)
    val = {k for m in metrics.values() for k in m if k.startswith("val/")}
    assert "val/loss" in val and {f"val/{t}/loss" for t in TASKS} <= val
    for key in ("val/vqa/acc", "val/image_classification/acc", "val/object_localization/acc",
                "val/text_classification/acc"):  # the task metrics, from generation / candidate scoring
        assert key in val, sorted(val)
    # checkpoints (periodic + last) and the export in the inference format
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    exported = Model.from_pretrained(summary["export_dir"])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in exported.state_dict().items():
        assert torch.equal(v, state["state_dict"][f"model.{k}"]), k
    assert state["global_step"] == 4 and state["lr_schedulers"] and state["optimizer_states"]
    assert any("Mixture" in k or "DataModule" in k for k in state), sorted(state)  # the data position
    # the checkpoint rebuilds the module from plain hyperparameters, without Hydra
    m = UIOLitModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert torch.equal(m.model.network.token_embedder.weight, exported.network.token_embedder.weight)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


class Killed(RuntimeError):
    pass


class KillAtStep:
    """Raise at the start of optimizer step ``step`` (after the checkpoint of the step before)."""

    def __new__(cls, step: int):
        import lightning.pytorch as pl

        class _Kill(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    raise Killed(f"killed at step {step}")

        return _Kill()


def test_kill_and_resume_logs_the_same_losses(toy_root, text_tokenizer, tmp_path):
    """8 steps straight vs. killed at step 5 (last checkpoint: step 4) + resume=last: identical
    per-step losses, learning rates and final weights (optimizer, schedule, step, data position
    and patch sampling all restored)."""
    import shutil

    from uio.training.train import run

    base = tiny_overrides(toy_root, text_tokenizer.model_file.parent, "RUN", "trainer.max_steps=8",
                          "train.export=false")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(compose_cfg([o.replace("RUN", str(straight)) for o in base]))
    with pytest.raises(Killed):
        run(compose_cfg([o.replace("RUN", str(killed)) for o in base]), callbacks=[KillAtStep(5)])
    before = read_metrics(killed)
    assert max(s for s, m in before.items() if "train/loss" in m) == 4  # steps 0..4 ran, 4 was not saved
    shutil.copy(killed / "csv" / "metrics.csv", tmp_path / "before.csv")
    run(compose_cfg([o.replace("RUN", str(killed)) for o in base] + ["resume=last"]))
    after = read_metrics(killed)
    a, b = read_metrics(straight), {**before, **after}
    for step in range(8):
        assert b[step]["train/loss"] == a[step]["train/loss"], (step, b[step]["train/loss"], a[step]["train/loss"])
        for k in a[step]:
            if k.startswith(("train/loss", "lr-")):
                assert b[step][k] == a[step][k], (step, k)
    assert min(s for s, m in after.items() if "train/loss" in m) == 4  # the resumed run started at step 4
    sa = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    sb = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)
    assert sa["global_step"] == sb["global_step"] == 8
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k


# ---- module helpers ------------------------------------------------------------------------------
def test_group_losses_and_token_counts():
    from uio.training.module import UIOLitModule, _step_seed, count_tokens, select_rows

    tasks = ["vqa", "depth", "vqa", "span_corruption"]
    pel = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = {g: (float(v), n) for g, v, n in UIOLitModule._group_losses(tasks, pel)}
    assert got == {"vision_language": (2.0, 2), "dense_labelling": (2.0, 1), "language_modelling": (4.0, 1)}
    batch = {"text_inputs": torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0]]), "text_targets": torch.tensor([[8, 1], [1, 0]]),
             "image_input_masks": torch.tensor([[True] * 6, [False] * 6]),
             "image_target_masks": torch.tensor([[True, True, True], [False] * 3]),
             "tasks": ["vqa", "span_corruption"], "meta": [{"a": 1}, {"b": 2}]}
    assert count_tokens(batch, None) == 5 + 3 + 6 + 3 and count_tokens(batch, 4) == 5 + 3 + 4 + 3
    sub = select_rows(batch, [1])
    assert sub["tasks"] == ["span_corruption"] and sub["meta"] == [{"b": 2}] and sub["text_inputs"].shape == (1, 4)
    assert _step_seed(0, 5, 0) == _step_seed(0, 5, 0) != _step_seed(0, 5, 1) != _step_seed(0, 6, 0)


def test_image_targets_are_tokenized_for_their_rows_only():
    """The module encodes image targets of the rows that have one; the loss equals the model's own
    (which encodes every row)."""
    from uio.config import ModelConfig
    from uio.training.module import UIOLitModule

    mc = ModelConfig.from_size("tiny", d_model=64, num_heads=2, head_dim=32, d_ff=128, num_encoder_layers=1,
                               num_decoder_layers=1, text_vocab=200, image_vocab=64, image_input_size=(32, 32),
                               image_target_grid=(8, 8), image_target_size=(32, 32)).to_dict()
    mc.pop("image_tokenizer")
    spec = {"name": "vqgan", "config": "vqgan_test", "image_size": [32, 32], "num_codes": 64, "grid": [8, 8]}
    module = UIOLitModule(model=mc, image_tokenizer=spec)
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 64, dtype=torch.bool)
    masks[1] = True
    batch = {"text_inputs": torch.randint(3, 200, (3, 5), generator=g), "image_inputs": torch.randn(3, 3, 32, 32),
             "image_input_masks": torch.ones(3, 4, dtype=torch.bool), "text_targets": torch.tensor([[9, 1], [1, 0], [7, 1]]),
             "image_targets": torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, "image_target_masks": masks,
             "tasks": ["vqa", "depth", "vqa"], "meta": [{}, {}, {}]}
    calls = []
    tok = module.model.image_tokenizer
    real = tok.encode
    tok.encode = lambda x: calls.append(x.shape[0]) or real(x)
    b2 = module.model.tokenize_image_targets(batch)
    assert calls == [1] and "image_targets" not in b2
    assert torch.equal(b2["image_target_codes"][1], real(batch["image_targets"][1:2])[0])
    assert not b2["image_target_codes"][[0, 2]].any()
    tok.encode = real
    torch.testing.assert_close(module.model(b2).per_example_loss, module.model(batch).per_example_loss)


def _small_module(**train):
    from uio.config import ModelConfig
    from uio.training.module import UIOLitModule

    mc = ModelConfig.from_size("tiny", d_model=64, num_heads=2, head_dim=32, d_ff=128, num_encoder_layers=2,
                               num_decoder_layers=2, text_vocab=200, image_vocab=64, image_input_size=(32, 32),
                               image_target_grid=(4, 4), image_target_size=(16, 16)).to_dict()
    mc.pop("image_tokenizer")
    torch.manual_seed(0)
    return UIOLitModule(model=mc, train=train)


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"text_inputs": torch.randint(3, 200, (2, 6), generator=g), "image_inputs": torch.randn(2, 3, 32, 32, generator=g),
            "image_input_masks": torch.ones(2, 4, dtype=torch.bool), "text_targets": torch.tensor([[9, 8, 1], [7, 1, 0]]),
            "image_target_codes": torch.randint(0, 64, (2, 16), generator=g),
            "image_target_masks": torch.tensor([[True] * 16, [False] * 16]), "tasks": ["depth", "vqa"], "meta": [{}, {}]}


def test_loss_normalization_weighs_tokens_or_rows():
    from uio.training.module import training_loss

    with pytest.raises(ValueError, match="train.loss_normalization must be one of"):
        _small_module(loss_normalization="examples")
    out = _small_module().model(_batch())  # row 0: 3 text + 16 image tokens; row 1: 2 text tokens
    n = torch.tensor([19.0, 2.0])
    sums = out.per_example_loss * n
    torch.testing.assert_close(training_loss(out, "tokens"), sums.sum() / n.sum())
    torch.testing.assert_close(training_loss(out, "rows"), (sums / n).mean())
    torch.testing.assert_close(training_loss(out, "sqrt"), (sums / n.sqrt()).sum() / n.sqrt().sum())
    assert torch.equal(out.per_example_tokens, n.long())
    assert not torch.isclose(training_loss(out, "tokens"), training_loss(out, "rows"))
    with pytest.raises(ValueError, match="loss normalization must be one of"):
        training_loss(out, "examples")


def test_fsdp1_clips_the_global_norm_through_its_root_module(monkeypatch):
    """Lightning's FSDP1 precision refuses norm clipping: the module asks the root FSDP module
    (which reduces the norm over every rank's shard); other strategies keep Lightning's clipping."""
    import types

    from uio.training.module import UIOLitModule

    module, calls = _small_module(), []
    FSDPStrategy = type("FSDPStrategy", (), {})  # noqa: N806 - what is_fsdp1 recognises
    root = types.SimpleNamespace(clip_grad_norm_=lambda v: calls.append(("root", v)))
    trainer = types.SimpleNamespace(strategy=FSDPStrategy(), model=root)
    monkeypatch.setattr(UIOLitModule, "trainer", property(lambda self: trainer))
    monkeypatch.setattr(UIOLitModule, "clip_gradients", lambda self, opt, gradient_clip_val, gradient_clip_algorithm:
                        calls.append(("lightning", gradient_clip_val, gradient_clip_algorithm)))
    module.configure_gradient_clipping(None, 1.0, "norm")
    module.configure_gradient_clipping(None, 0.5, "value")  # by value: FSDP's precision plugin does it
    trainer.strategy = object()
    module.configure_gradient_clipping(None, 2.0, "norm")
    assert calls == [("root", 1.0), ("lightning", 0.5, "value"), ("lightning", 2.0, "norm")]


def test_activation_checkpointing_keeps_numbers_and_names():
    from uio.training.strategies import apply_activation_checkpointing

    plain, ckpt = _small_module(), _small_module()
    ckpt.model.load_state_dict(plain.model.state_dict())
    keys = list(plain.model.state_dict())
    assert apply_activation_checkpointing(ckpt.model.network) == 4  # 2 encoder + 2 decoder blocks
    assert list(ckpt.model.state_dict()) == keys  # checkpoints and exports keep their names
    outs = []
    for m in (plain, ckpt):
        out = m.model(_batch())
        out.loss.backward()
        outs.append((out.loss.detach(), {n: p.grad for n, p in m.model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert outs[0][1].keys() == {n.replace("_checkpoint_wrapped_module.", "") for n in outs[1][1]}
    for n, g in outs[1][1].items():
        torch.testing.assert_close(g, outs[0][1][n.replace("_checkpoint_wrapped_module.", "")], rtol=1e-5, atol=1e-6)


def test_init_from_loads_an_export(tmp_path):
    from uio.config import ModelConfig
    from uio.training.module import UIOLitModule

    src = _small_module()
    src.model.save_pretrained(tmp_path / "export")
    mc = ModelConfig.load(tmp_path / "export" / "config.json").to_dict()
    mc.pop("image_tokenizer")
    dst = UIOLitModule(model=mc, init_from=str(tmp_path / "export"))
    for (k, a), b in zip(src.model.state_dict().items(), dst.model.state_dict().values()):
        assert torch.equal(a, b), k
    bad = dict(mc, d_ff=256)
    with pytest.raises(RuntimeError, match="size mismatch"):
        UIOLitModule(model=bad, init_from=str(tmp_path / "export"))


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """train.compile=true compiles each transformer block (inductor; slow to compile on a CPU)."""
    plain, comp = _small_module(), _small_module(compile=True)
    comp.model.load_state_dict(plain.model.state_dict())
    comp._trainer = None
    comp.configure_model()
    a, b = plain.model(_batch()).loss, comp.model(_batch()).loss
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    b.backward()


def test_cpu_step_bench_times_every_phase(toy_root, text_tokenizer, tmp_path):
    """bench/cpu_step.py: the module's step pieces timed phase by phase; the shares add up."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import cpu_step

    overrides = tiny_overrides(toy_root, text_tokenizer.model_file.parent, tmp_path / "run")
    before = torch.get_num_threads()
    out = cpu_step.main(["--steps", "2", "--warmup", "1", "--threads", "1", "--json", str(tmp_path / "r.json"),
                         *overrides])
    assert out["batch_size"] == 4 and out["threads"] == 1 and out["steps"] == 2 and out["warmup_s"] > 0
    assert torch.get_num_threads() == before  # restored
    assert list(out["phases"]) == list(cpu_step.PHASES)
    assert all(r["median_s"] >= 0 and r["mean_s"] >= 0 for r in out["phases"].values())
    assert out["phases"]["forward"]["mean_s"] > 0 and out["phases"]["backward"]["mean_s"] > 0
    assert sum(r["share"] for r in out["phases"].values()) == pytest.approx(1.0)
    assert json.loads((tmp_path / "r.json").read_text())["median_step_s"] == pytest.approx(out["median_step_s"])
    with pytest.raises(SystemExit):
        cpu_step.main(["--steps", "0", *overrides])
    with pytest.raises(SystemExit):
        cpu_step.main(["not-an-override"])


def test_task_probe_trains_then_scores_against_baselines(toy_root, text_tokenizer, tmp_path):
    """bench/task_probe.py: a few steps on two tasks, then uio-eval's table with image use."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import task_probe

    overrides = [o for o in tiny_overrides(toy_root, text_tokenizer.model_file.parent, tmp_path / "run")
                 if not o.startswith("mixture.tasks=")]
    out = task_probe.main(["--tasks", "vqa,depth", "--steps", "2", "--batch", "4", "--warmup", "1",
                           "--eval-examples", "2", "--baseline-examples", "8", "--save", str(tmp_path / "m"),
                           *overrides])
    assert math.isfinite(out["train_image_use"])
    assert [r.task for r in out["results"]] == ["vqa", "depth"]
    for r in out["results"]:
        assert r.baseline and r.metrics and r.image_use is not None
    assert (tmp_path / "m" / "config.json").is_file()
    with pytest.raises(SystemExit):
        task_probe.main(["--tasks", "vqa", "not-an-override"])
