"""``uio-train``: train Unified-IO (or, with ``job=vqgan``, its image tokenizer) from the Hydra tree.

    uio-train +experiment=tiny_multitask                     # the embedded CPU job on the toy world
    uio-train +experiment=xl_multitask trainer=fsdp          # the paper's XL recipe on GPUs
    uio-train +experiment=tiny_multitask resume=last         # continue after a crash / preemption
    uio-train --cfg job +experiment=base_pretrain            # print the composed config, run nothing
"""
from __future__ import annotations

import time

_STARTED = time.time()  # the job's clock (train.time_budget) starts before the heavy imports

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from uio.cli import conf_dir  # noqa: E402


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def _app(cfg: DictConfig) -> None:
    from uio.training.train import run  # heavy imports only once the config composed

    run(cfg, start_time=_STARTED)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
