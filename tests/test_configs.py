"""The Hydra tree: every experiment composes and instantiates, the paper's numbers, unknown keys fail,
and the console scripts find the tree from any working directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from uio.cli import conf_dir, list_options
from uio.training.config import ConfigError, check_config, to_dict, trainer_kwargs

EXPERIMENTS = list_options("experiment")
PAPER = [f"{s}_{stage}" for s in ("small", "base", "large", "xl") for stage in ("multitask", "pretrain")]
BIN = Path(sys.executable).parent


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_the_required_experiments_exist():
    for name in ["tiny_multitask", "vqgan_toyworld", *PAPER]:
        assert name in EXPERIMENTS, f"conf/experiment/{name}.yaml is missing"


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e != "vqgan_toyworld"])
def test_experiment_composes_and_instantiates(name, tmp_path):
    """Config check, model on the meta device (real sizes), optimiser, strategy, callbacks, loggers, trainer."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from uio.image_tokenizer import build_image_tokenizer
    from uio.model import Model
    from uio.training.optim import build_optimizer
    from uio.training.strategies import build_strategy
    from uio.training.train import model_config_from

    cfg = _compose(f"+experiment={name}", f"paths.run_dir={tmp_path}")
    check_config(cfg)
    assert cfg.job == "multitask" and cfg.name == name
    text_vocab = cfg.text_tokenizer.vocab_size or cfg.text_tokenizer.train_vocab_size
    spec = {k: v for k, v in to_dict(cfg.tokenizer).items() if k != "weights"}
    mc = model_config_from(cfg, text_vocab, spec)
    with torch.device("meta"):
        model = Model(mc, image_tokenizer=build_image_tokenizer(spec))
    assert all(p.is_meta for p in model.parameters())
    if name in PAPER:
        # transformer sizes of the release (unified-io-inference, 33152-id text table + 16384 codes)
        expected = {"small": 71.7e6, "base": 241.4e6, "large": 776.5e6, "xl": 2849.2e6}[cfg.model.name]
        assert model.num_parameters() == pytest.approx(expected, rel=2e-3)
        assert mc.vocab_size == 49536 and mc.encoder_max_image_len == 576 and mc.decoder_max_image_len == 256
    opt = build_optimizer(torch.nn.Linear(4, 4), cfg.optim.name, lr=cfg.optim.lr,
                          adafactor=to_dict(cfg.optim.adafactor) or None)
    assert opt.param_groups[0]["lr"] == cfg.optim.lr
    kw = trainer_kwargs(cfg.trainer)
    strategy = build_strategy(kw.pop("strategy"), accelerator="cuda")
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    assert loggers and callbacks
    # a Trainer on this CPU-only machine: keep the experiment's settings, run on one CPU process
    kw.update(accelerator="cpu", devices=1, num_nodes=1, precision="bf16-mixed")
    trainer = pl.Trainer(**kw, callbacks=callbacks, logger=loggers)
    assert trainer.max_steps == cfg.trainer.max_steps
    assert trainer.gradient_clip_val == 1.0 and trainer.gradient_clip_algorithm == "norm"
    del strategy


def test_vqgan_experiment_composes_into_its_recipe():
    from uio.image_tokenizer.training import VQGANTrainConfig

    cfg = _compose("+experiment=vqgan_toyworld")
    assert cfg.job == "vqgan"
    recipe = VQGANTrainConfig.from_dict(to_dict(cfg.vqgan))
    assert recipe.output_dir == cfg.tokenizer.weights


@pytest.mark.parametrize("size,batch", [("small", 2048), ("base", 2048), ("large", 2048), ("xl", 1024)])
def test_paper_recipe_numbers(size, batch):
    """UIO appendix A.2: batch 2048 (XL 1024), 256 of 576 patches multi-task, 128 pre-training,
    Adafactor lr 1e-2 constant for 10k steps then 1/sqrt(k), beta1 0.9, beta2 1 - k^-0.8, clip 1.0."""
    for stage, patches, mixture in (("multitask", 256, "uio_multitask"), ("pretrain", 128, "uio_pretrain")):
        cfg = _compose(f"+experiment={size}_{stage}")
        assert cfg.stage == stage and cfg.model.name == size
        assert cfg.data.global_batch_size == batch
        assert cfg.train.num_patches == patches
        assert cfg.optim.name == "adafactor" and cfg.optim.lr == 1e-2 and cfg.optim.schedule == "rsqrt"
        assert cfg.optim.constant_steps == 10_000 and cfg.optim.warmup_steps == 0
        assert cfg.optim.adafactor.beta1 == 0.9 and cfg.optim.adafactor.decay_rate == 0.8
        assert cfg.trainer.gradient_clip_val == 1.0 and cfg.model.dropout == 0.0
        assert cfg.trainer.max_steps == 1_000_000
        assert set(cfg.mixture.tasks or []) <= {"span_corruption", "masked_image_denoising"} or stage == "multitask"
        assert cfg.mixture.temperature == 2.0
        assert cfg.text_tokenizer.vocab_size == 32000
    assert _compose(f"+experiment={size}_multitask").init_from.endswith(f"{size}_pretrain/model")


def test_debug_preset():
    cfg = _compose("+experiment=tiny_multitask", "+debug=fast")
    check_config(cfg)
    assert cfg.trainer.max_steps == 3 and cfg.callbacks.checkpoint is None and not cfg.train.export
    assert all(v is None for v in cfg.logger.values())


def test_tiny_multitask_is_the_cpu_job():
    cfg = _compose("+experiment=tiny_multitask")
    check_config(cfg)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.text_tokenizer.path == "toy" and cfg.tokenizer.config == "vqgan_toy"
    assert cfg.data.roots is None and cfg.data.toyworld is not None
    assert "masked_image_denoising" not in cfg.mixture.tasks  # a pre-training task


# ---- unknown keys and bad values fail clearly ----------------------------------------------------
def test_unknown_key_names_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.num_patchs'.*Did you mean 'train.num_patches'"):
        check_config(_compose("+experiment=tiny_multitask", "+train.num_patchs=3"))
    with pytest.raises(ConfigError, match=r"unknown config key 'sead'.*'seed'"):
        check_config(_compose("+sead=3"))
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.adafactor.beta_1'.*'optim.adafactor.beta1'"):
        check_config(_compose("+optim.adafactor.beta_1=0.5"))
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_step'.*'trainer.max_steps'"):
        check_config(_compose("+trainer.max_step=5"))
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['d_modle'\]"):
        from uio.training.train import model_config_from

        model_config_from(_compose("+model.d_modle=3"), 100, None)


def test_bad_values_fail_clearly():
    from uio.training.strategies import build_strategy

    with pytest.raises(ConfigError, match="stage must be one of"):
        check_config(_compose("stage=finetune"))
    with pytest.raises(ConfigError, match="train.num_patches must be a positive int"):
        check_config(_compose("train.num_patches=0"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['find_unused'\] for trainer.strategy name='ddp'"):
        build_strategy({"name": "ddp", "find_unused": True})
    with pytest.raises(ValueError, match="needs GPUs; on CPU use trainer=fsdp2"):
        build_strategy({"name": "fsdp"}, accelerator="cpu")


def test_trainer_presets_build_their_strategies():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from uio.modeling.network import UnifiedIONetwork
    from uio.training.strategies import UIOModelParallelStrategy, build_strategy

    expected = {"default": str, "cpu": str, "gpu": str, "bf16": str, "ddp": DDPStrategy, "fsdp": FSDPStrategy,
                "fsdp2": UIOModelParallelStrategy}
    assert set(list_options("trainer")) == set(expected)
    for preset, kind in expected.items():
        kw = trainer_kwargs(_compose(f"trainer={preset}").trainer)
        s = build_strategy(kw["strategy"], accelerator="gpu", activation_checkpointing=True)
        assert isinstance(s, kind), (preset, s)
        if preset == "fsdp":  # one FSDP unit and one activation-checkpoint unit per transformer block
            blocks = set(UnifiedIONetwork.block_classes)
            assert s.kwargs["auto_wrap_policy"]._module_classes == blocks
            assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == blocks
        if preset == "fsdp2":
            assert s.fsdp_kwargs == {"mixed_precision": "bf16", "reduce_dtype": "fp32", "reshard_after_forward": True}
        if kind is not str:  # on GPUs one process group serves CUDA tensors (NCCL) and the CPU metric states (gloo)
            assert s._process_group_backend == "cpu:gloo,cuda:nccl", preset
            if preset != "fsdp":  # on CPUs Lightning's default (gloo)
                assert build_strategy(kw["strategy"], accelerator="cpu")._process_group_backend is None
            chosen = build_strategy({**kw["strategy"], "process_group_backend": "nccl"}, accelerator="gpu")
            assert chosen._process_group_backend == "nccl"  # a configured backend is kept


def test_model_fields_must_agree_with_the_tokenizers():
    from uio.training.train import model_config_from

    cfg = _compose("+experiment=tiny_multitask", "+model.image_vocab=1024")
    with pytest.raises(ConfigError, match=r"model.image_vocab=1024 disagrees with the tokenizers \(512\)"):
        model_config_from(cfg, 3000, to_dict(cfg.tokenizer))
    mc = model_config_from(_compose("+experiment=tiny_multitask"), 3000, to_dict(_compose().tokenizer))
    assert (mc.text_vocab, mc.image_vocab, mc.image_target_grid, mc.image_target_size) == (3000, 512, (8, 8), (64, 64))


def test_time_budget_caps_training(tmp_path):
    """train.time_budget becomes the Trainer's max_time (the smaller of it and trainer.max_time)."""
    from uio.training.train import build_trainer

    cfg = _compose("+experiment=tiny_multitask", f"paths.run_dir={tmp_path}")
    assert cfg.train.time_budget == 15
    timer = lambda t: [c for c in t.callbacks if type(c).__name__ == "Timer"]  # noqa: E731
    assert timer(build_trainer(cfg)) == []
    (t,) = timer(build_trainer(cfg, max_seconds=300))
    assert t._duration == 300
    (t,) = timer(build_trainer(_compose("+experiment=tiny_multitask", f"paths.run_dir={tmp_path}",
                                        "trainer.max_time=00:00:02:00"), max_seconds=300))
    assert t._duration == 120  # whichever limit comes first


def test_time_budget_leaves_out_artefact_building(tmp_path, monkeypatch):
    """Building missing artefacts (once per $UIO_HOME) does not eat into train.time_budget."""
    import time

    import uio.training.train as train

    class Stop(Exception):
        pass

    seen = {}

    def slow_artefacts(cfg):
        time.sleep(3.0)
        return "tok", None

    def capture(cfg, callbacks=None, max_seconds=None):
        seen["max_seconds"] = max_seconds
        raise Stop

    monkeypatch.setattr(train, "prepare_artefacts", slow_artefacts)
    monkeypatch.setattr(train, "build_components", lambda cfg, artefacts=None: (None, None, None))
    monkeypatch.setattr(train, "build_trainer", capture)
    cfg = _compose("+experiment=tiny_multitask", f"paths.run_dir={tmp_path}", "train.time_budget=1",
                   "train.time_reserve=0")
    with pytest.raises(Stop):
        train.run(cfg)
    assert 58.0 < seen["max_seconds"] <= 60.0  # the 3 s of artefact building are not counted


def test_global_batch_size_sets_accumulation(tmp_path):
    from uio.training.train import build_trainer

    cfg = _compose("+experiment=tiny_multitask", f"paths.run_dir={tmp_path}", "data.batch_size=4",
                   "data.global_batch_size=32")
    assert build_trainer(cfg).accumulate_grad_batches == 8
    with pytest.raises(ConfigError, match="not a multiple of data.batch_size x world size = 4 x 1"):
        build_trainer(_compose(f"paths.run_dir={tmp_path}", "data.batch_size=4", "data.global_batch_size=30"))


# ---- the console scripts -------------------------------------------------------------------------
def _run(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="0", UIO_HOME=str(cwd / "home"))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_uio_train_composes_from_any_directory(tmp_path):
    """The installed `uio-train` finds the packaged tree; `+experiment=` works, `experiment=` explains."""
    r = _run([str(BIN / "uio-train"), "--cfg", "job", "+experiment=xl_multitask"], tmp_path)
    assert r.returncode == 0, r.stderr
    printed = OmegaConf.create(r.stdout)
    assert printed.model.d_model == 2048 and printed.data.global_batch_size == 1024
    r = _run([str(BIN / "uio-train"), "experiment=xl_multitask"], tmp_path)
    assert r.returncode != 0 and "+experiment=xl_multitask" in r.stderr
    r = _run([str(BIN / "uio-train"), "+experiment=tiny_multitask", "+train.num_patchs=3"], tmp_path)
    assert r.returncode != 0 and "Did you mean 'train.num_patches'" in r.stderr
    assert not (tmp_path / "home" / "toyworld").exists()  # nothing was built for a bad config


def test_uio_eval_lists_tasks_when_bare(tmp_path):
    from uio.tasks import TASKS

    r = _run([str(BIN / "uio-eval")], tmp_path)
    assert r.returncode == 0, r.stderr
    for name in TASKS:
        assert name in r.stdout
    r = _run([str(BIN / "uio-eval"), "task=depth", "describe=true"], tmp_path)
    assert r.returncode == 0 and "group: dense_labelling" in r.stdout
    assert list(tmp_path.iterdir()) == [] or [p.name for p in tmp_path.iterdir()] == ["home"]


@pytest.mark.slow
def test_wheel_ships_the_config_tree(tmp_path):
    """`pip wheel .` (of a copy of the checkout) contains uio/conf/**.yaml; the tree is a symlink
    in the source checkout."""
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", "outputs"))
    assert (src / "src" / "uio" / "conf").is_symlink()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("uio-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ["train.yaml", "eval.yaml", "experiment/tiny_multitask.yaml", "experiment/xl_multitask.yaml",
                "model/xl.yaml", "trainer/fsdp2.yaml", "tokenizer/vqgan_toy.yaml"]:
        assert f"uio/conf/{rel}" in names, f"uio/conf/{rel} missing from {wheel.name}"
