"""Training: the paper's optimiser and schedule, atomic checkpoints, the LightningModule, exact resume."""
from __future__ import annotations

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
