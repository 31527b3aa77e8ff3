"""``uio-eval``: the Unified-IO tasks and (for now) what each one is evaluated with.

    uio-eval                 # every task by group: output type, metrics, how it is decoded
    uio-eval task=depth      # one task: prompts, output format, metrics, generation settings

During training, the same per-task inference (generation or candidate scoring, decoding, the
task's metrics) runs as validation and is logged as ``val/<task>/<metric>``.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from uio.cli import conf_dir


def task_table() -> str:
    """Every registered task, grouped as in the paper."""
    from uio.tasks import TASKS
    from uio.tasks.base import GROUPS

    lines = [f"{'group':<22}{'task':<24}{'output':<12}{'decoding':<16}metrics"]
    for group in GROUPS:
        for name, task in TASKS.items():
            if task.group != group:
                continue
            how = "score options" if task.scoring else task.generation_config.method
            lines.append(f"{group:<22}{name:<24}{task.output:<12}{how:<16}{', '.join(task.metrics) or '-'}")
    return "\n".join(lines)


def describe(name: str) -> str:
    from uio.tasks import TASKS, get_task

    if name not in TASKS:
        raise SystemExit(f"uio-eval: unknown task {name!r}; run `uio-eval` to list them ({len(TASKS)} tasks)")
    t = get_task(name)
    g = t.generation_config
    parts = [f"task: {t.name}", f"group: {t.group}", f"output: {t.output}" + (f" ({t.output_format})" if t.output_format else ""),
             f"metrics: {', '.join(t.metrics) or '-'}",
             "decoding: " + ("scores the candidates (Model.score_options)" if t.scoring else
                             f"{g.method}, max_text_len={g.max_text_len}, image_output={g.image_output}"),
             "prompts:"] + [f"  {p}" for p in t.prompts]
    return "\n".join(parts)


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="eval")
def _app(cfg: DictConfig) -> None:
    print(task_table() if cfg.task is None else describe(str(cfg.task)))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
