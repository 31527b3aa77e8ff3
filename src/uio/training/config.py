"""The training config's schema: which keys exist, and turning sections into objects.

Hydra composes ``conf/train.yaml`` (+ an experiment); :func:`check_config` then rejects any key
that is not part of the schema with a message naming the key, the closest known key and the
allowed ones — a typo in an experiment file or on the command line never silently does nothing.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from uio.config import ModelConfig

__all__ = ["ConfigError", "check_config", "to_dict", "trainer_kwargs", "SCHEMA"]


class ConfigError(ValueError):
    """A composed training config has an unknown key or a bad value."""


# Sections with a closed set of keys (values may be anything; see the yaml files for meaning).
SCHEMA: dict[str, set[str] | None] = {
    "job": None, "stage": None, "seed": None, "name": None, "resume": None, "init_from": None,
    "model": set(f.name for f in ModelConfig.__dataclass_fields__.values()),
    "tokenizer": None,  # the image-tokenizer spec, checked by uio.image_tokenizer.build_image_tokenizer
    "text_tokenizer": {"path", "vocab_size", "train_vocab_size"},
    "data": None,  # checked against the datamodule's signature (uio.training.train.build_datamodule)
    "mixture": None,  # likewise
    "trainer": None,  # checked against lightning.Trainer's signature in trainer_kwargs()
    "callbacks": None, "logger": None,
    "optim": {"name", "lr", "weight_decay", "schedule", "constant_steps", "warmup_steps", "min_ratio",
              "decay_fraction", "betas", "eps", "adafactor"},
    "paths": {"runs_root", "run_dir"},
    "train": {"num_patches", "activation_checkpointing", "compile", "export", "export_dir", "log_group_losses",
              "step_seed", "group_rows", "loss_normalization", "loc_label_sigma", "time_budget",
              "time_reserve"},
    "val": {"enabled", "max_text_len", "num_beams", "image_output"},
    "artefacts": {"image_tokenizer_recipe", "image_tokenizer_overrides"},
}
STAGES = ("pretrain", "multitask")
JOBS = ("multitask", "vqgan")
ADAFACTOR_KEYS = {"beta1", "decay_rate", "clip_threshold", "scale_parameter", "eps1", "eps2", "factored"}


def _unknown(keys, allowed, where: str) -> None:
    unknown = [k for k in keys if k not in allowed]
    if not unknown:
        return
    k = unknown[0]
    close = difflib.get_close_matches(str(k), [str(a) for a in allowed], n=1)
    hint = f" Did you mean '{where}{close[0]}'?" if close else ""
    raise ConfigError(f"unknown config key '{where}{k}'.{hint} Allowed keys here: {sorted(map(str, allowed))}")


def to_dict(node: Any) -> Any:
    """A plain, resolved Python container (dict/list) of a config node."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for unknown keys or impossible values of a ``job=multitask`` config."""
    _unknown(list(cfg.keys()), set(SCHEMA), "")
    for section, allowed in SCHEMA.items():
        if allowed is None or section not in cfg or cfg[section] is None:
            continue
        node = cfg[section]
        if not isinstance(node, DictConfig):
            raise ConfigError(f"config section '{section}' must be a mapping, got {type(node).__name__}")
        _unknown(list(node.keys()), allowed, f"{section}.")
    if "optim" in cfg and cfg.optim.get("adafactor"):
        _unknown(list(cfg.optim.adafactor.keys()), ADAFACTOR_KEYS, "optim.adafactor.")
    if cfg.get("job", "multitask") not in JOBS:
        raise ConfigError(f"job must be one of {list(JOBS)}, got {cfg.job!r}")
    if cfg.get("stage", "multitask") not in STAGES:
        raise ConfigError(f"stage must be one of {list(STAGES)}, got {cfg.stage!r}")
    if "train" in cfg:
        n = cfg.train.get("num_patches")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ConfigError(f"train.num_patches must be a positive int or null (all patches), got {n!r}")
    if "trainer" in cfg:
        trainer_kwargs(cfg.trainer)  # raises on unknown Trainer arguments
    for group in ("callbacks", "logger"):
        for name, spec in (cfg.get(group) or {}).items():
            if spec is not None and "_target_" not in spec:
                raise ConfigError(f"{group}.{name} needs a '_target_' (the class to build), got keys {list(spec)}")


def trainer_kwargs(trainer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``trainer`` section -> ``lightning.Trainer`` keyword arguments (strategy still a spec)."""
    from lightning.pytorch import Trainer

    kw = dict(to_dict(trainer_cfg))
    allowed = set(inspect.signature(Trainer.__init__).parameters) - {"self", "callbacks", "logger", "plugins"}
    _unknown(list(kw), allowed, "trainer.")
    return kw
