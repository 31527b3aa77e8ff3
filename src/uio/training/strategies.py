"""Distributed strategies: DDP, FSDP2 (``fully_shard`` per transformer block), Lightning FSDP on GPUs.

The trainer config names a strategy by a small spec (``trainer.strategy``)::

    auto | ddp | ddp_spawn                       # plain strings go to Lightning as they are
    {name: ddp, find_unused_parameters: true}    # DDPStrategy
    {name: fsdp2, data_parallel_size: auto, mixed_precision: bf16, reshard_after_forward: true}
        # FSDP2 via ModelParallelStrategy; works on CPU (gloo) and GPUs. The LightningModule's
        # configure_model() calls apply_fsdp2(), one fully_shard unit per transformer block.
    {name: fsdp, mixed_precision: bf16, state_dict_type: sharded}
        # Lightning's FSDPStrategy (FSDP1); GPU only (Lightning refuses it on CPU).

Multi-node runs use Lightning's cluster environments unchanged: ``torchrun --nnodes N ...
uio-train trainer.num_nodes=N`` or an ``srun`` inside an ``sbatch`` with matching
``--ntasks-per-node`` (SLURM is detected from its environment variables).
"""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch import nn

from uio.training.checkpointing import atomic_replace_dir, atomic_torch_save

__all__ = ["build_strategy", "transformer_blocks", "apply_fsdp2", "fsdp2_gathered", "apply_activation_checkpointing",
           "UIOModelParallelStrategy", "STRATEGY_KEYS"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32, None: None}

# keys each named strategy accepts (unknown keys fail with this list)
STRATEGY_KEYS: dict[str, set[str]] = {
    "ddp": {"find_unused_parameters", "static_graph", "process_group_backend", "gradient_as_bucket_view"},
    "ddp_spawn": {"find_unused_parameters", "process_group_backend"},
    "fsdp2": {"data_parallel_size", "mixed_precision", "reduce_dtype", "reshard_after_forward",
              "save_distributed_checkpoint", "process_group_backend"},
    "fsdp": {"mixed_precision", "sharding_strategy", "state_dict_type", "cpu_offload", "process_group_backend"},
}


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The encoder and decoder blocks of a network: the FSDP wrap / activation-checkpoint units.

    Uses the module's ``block_classes`` attribute if it declares one (a tuple of classes), else
    every element of an ``nn.ModuleList`` named ``layers`` or ``blocks``.
    """
    classes = None
    for m in module.modules():
        classes = getattr(m, "block_classes", None)
        if classes:
            break
    if classes:
        return [m for m in module.modules() if isinstance(m, tuple(classes))]
    blocks: list[nn.Module] = []
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "blocks"):
            blocks.extend(m)
    return blocks


def apply_activation_checkpointing(module: nn.Module) -> int:
    """Recompute each transformer block in the backward pass (non-reentrant). Returns the count."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, checkpoint_wrapper)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import \
        apply_activation_checkpointing as _apply

    blocks = transformer_blocks(module)
    if not blocks:
        raise ValueError("activation checkpointing found no transformer blocks to wrap")
    ids = {id(b) for b in blocks}
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    _apply(module, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: id(m) in ids)
    return len(blocks)


def apply_fsdp2(module: nn.Module, mesh, mixed_precision: str | None = "bf16", reduce_dtype: str | None = "fp32",
                reshard_after_forward: bool = True, skip: Iterable[nn.Module] = ()) -> int:
    """``fully_shard`` every transformer block, then ``module`` itself as the root.

    ``module`` should be the one whose ``__call__`` runs the whole step (``uio.Model``): the root's
    parameters (embeddings, norms, position tables) are gathered once per step around that call,
    however many network methods run inside it. ``skip``: submodules left unsharded (the frozen
    image tokenizer, which has no gradients). Returns the number of sharded blocks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision not in _DTYPES or reduce_dtype not in _DTYPES:
        raise ValueError(f"FSDP2 mixed_precision/reduce_dtype must be one of {list(k for k in _DTYPES if k)} "
                         f"or null, got {mixed_precision!r}/{reduce_dtype!r}")
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[mixed_precision], reduce_dtype=_DTYPES[reduce_dtype])
    skip_ids = {id(m) for s in skip for m in s.modules()}
    blocks = [b for b in transformer_blocks(module) if id(b) not in skip_ids]
    if not blocks:
        raise ValueError("FSDP2 found no transformer blocks to shard")
    for i, block in enumerate(blocks):
        # the last block's parameters are needed right away in backward: keep them gathered
        flag = reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=flag)
        block._uio_reshard_after_forward = flag
    ignored = {p for s in skip for p in s.parameters()}
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=False, ignored_params=ignored or None)
    module._uio_reshard_after_forward = False
    return len(blocks)


@contextlib.contextmanager
def fsdp2_gathered(module: nn.Module):
    """Inside: every FSDP2 unit of ``module`` holds its full parameters and forward runs no
    collective, so ranks may run different numbers of forwards (generation stops at different
    lengths, validation shards differ in size). Collective to enter and to leave."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(getattr(m, "_uio_reshard_after_forward", True))


class UIOModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose sharded checkpoints replace the previous one atomically.

    Every rank writes its shards into ``.<name>.tmp`` next to the target; after a barrier rank 0
    swaps the directory into place (:func:`uio.training.checkpointing.atomic_replace_dir`).
    Full (single-file) checkpoints go through the trainer's ``CheckpointIO``.
    """

    def __init__(self, *args, fsdp_kwargs: Mapping[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fsdp_kwargs = dict(fsdp_kwargs or {})

    def setup_environment(self) -> None:
        # pure data parallel: one mesh dimension as wide as the world (tensor_parallel_size=1)
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            tmp.mkdir(parents=True)
        self.barrier()
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(state, tmp)
        if self.global_rank == 0:
            atomic_torch_save(checkpoint, tmp / _METADATA_FILENAME)
        self.barrier()
        if self.global_rank == 0:
            atomic_replace_dir(tmp, path)
        self.barrier()

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            p = Path(filepath)
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


GPU_PROCESS_GROUP_BACKEND = "cpu:gloo,cuda:nccl"


def _on_gpus(accelerator: str) -> bool:
    """Whether a run with this ``trainer.accelerator`` runs on CUDA devices ("auto": when one is visible)."""
    a = str(accelerator).lower()
    return a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available())


def _check_keys(name: str, spec: Mapping[str, Any]) -> None:
    unknown = sorted(set(spec) - STRATEGY_KEYS[name] - {"name"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for trainer.strategy name={name!r}; "
                         f"allowed: {sorted(STRATEGY_KEYS[name])}")


def build_strategy(spec: str | Mapping[str, Any] | None, accelerator: str = "auto",
                   activation_checkpointing: bool = False) -> str | Strategy:
    """Turn ``trainer.strategy`` into what ``lightning.Trainer(strategy=...)`` takes.

    ``activation_checkpointing`` is only used by ``fsdp`` (FSDP1 applies it itself, per block);
    the other strategies get it from the LightningModule's ``configure_model``."""
    if spec is None:
        return "auto"
    if isinstance(spec, str):
        if spec in ("fsdp2",):
            spec = {"name": spec}
        else:
            return spec
    spec = dict(spec)
    name = spec.get("name")
    if name not in STRATEGY_KEYS and name not in ("auto", "single_device"):
        raise ValueError(f"trainer.strategy.name must be one of {['auto', *STRATEGY_KEYS]}, got {name!r}")
    if name in ("auto", "single_device"):
        if len(spec) > 1:
            raise ValueError(f"trainer.strategy name={name!r} takes no options, got {sorted(set(spec) - {'name'})}")
        return name
    _check_keys(name, spec)
    opts = {k: v for k, v in spec.items() if k != "name" and v is not None}
    if "process_group_backend" not in opts and _on_gpus(accelerator):
        # NCCL alone cannot reduce CPU tensors, and the validation metrics keep their states on the
        # CPU (they hold strings, boxes and masks): torchmetrics' gather then fails with "No backend
        # type associated with device type cpu" (seen on an H100 with fsdp and fsdp2). One process
        # group with a backend per device type: gloo for CPU tensors, NCCL for CUDA tensors.
        opts["process_group_backend"] = GPU_PROCESS_GROUP_BACKEND
    if name in ("ddp", "ddp_spawn"):
        return DDPStrategy(start_method="spawn" if name == "ddp_spawn" else "popen", **opts)
    if name == "fsdp2":
        fsdp_kwargs = {k: opts.pop(k) for k in ("mixed_precision", "reduce_dtype", "reshard_after_forward")
                       if k in opts}
        dp = opts.pop("data_parallel_size", "auto")
        return UIOModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=1, fsdp_kwargs=fsdp_kwargs,
                                        **opts)
    # name == "fsdp": Lightning's FSDPStrategy, one FSDP unit (and checkpoint unit) per block
    if accelerator == "cpu":
        raise ValueError("trainer.strategy name='fsdp' (Lightning FSDPStrategy) needs GPUs; on CPU use "
                         "trainer=fsdp2 (FSDP2 via ModelParallelStrategy)")
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from uio.modeling.network import UnifiedIONetwork

    mp = opts.pop("mixed_precision", "bf16")
    mixed = None
    if mp:
        if mp not in _DTYPES:
            raise ValueError(f"trainer.strategy.mixed_precision must be bf16/fp16/fp32 or null, got {mp!r}")
        dt = _DTYPES[mp]
        mixed = MixedPrecision(param_dtype=dt, reduce_dtype=torch.float32, buffer_dtype=dt)
    blocks = set(UnifiedIONetwork.block_classes)
    return FSDPStrategy(auto_wrap_policy=blocks, activation_checkpointing_policy=blocks if activation_checkpointing else None,
                        mixed_precision=mixed, sharding_strategy=opts.pop("sharding_strategy", "FULL_SHARD"),
                        state_dict_type=opts.pop("state_dict_type", "sharded"),
                        cpu_offload=opts.pop("cpu_offload", False), **opts)


def is_fsdp1(strategy: Any) -> bool:
    return type(strategy).__name__ == "FSDPStrategy"


def is_fsdp2(strategy: Any) -> bool:
    return isinstance(strategy, ModelParallelStrategy)

