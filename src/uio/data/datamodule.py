"""``UIODataModule``: the training mixture and per-task validation sets as a LightningDataModule.

Train: every ``<root>/<task>/<dataset>/manifest.json`` with a ``train_split`` (optionally only
``tasks``) plus any explicit ``sources`` become one :class:`~uio.data.mixture.MixtureDataset`,
batched by :class:`~uio.data.collate.Collator`. Its rate table is printed at start. Exact resume:
the data module observes every training batch just before it is moved to the device
(``on_before_batch_transfer`` -- so a LightningModule should not override that hook) and its
``state_dict`` (saved by Lightning in every checkpoint) is the mixture progress of every rank.

Val: one DataLoader per task (``val_task_names`` gives the order, i.e. ``dataloader_idx``), the
first ``val_examples_per_task`` examples of that task's ``val_split`` (datasets interleaved
round-robin, fixed order), encoded with ``train=False`` and split across ranks by index.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from uio.data.collate import Collator
from uio.data.mixture import TEMPERATURE, MixtureDataset, MixtureProgress, MixtureSource, _rng
from uio.data.shards import ReadStats, decode_or_count, discover, iter_raw, worker_info

log = logging.getLogger(__name__)


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (str, Path)):
        return [v]
    return list(v)


class ValTaskDataset(IterableDataset):
    """The first ``n`` examples of one task (its sources interleaved in order), encoded for
    evaluation. Example ``i`` goes to reader ``i % (world * workers)``; the order is fixed."""

    def __init__(self, task: str, sources: Sequence[MixtureSource], processor: Any, n: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        if n < 1:
            raise ValueError(f"examples per task must be >= 1, got {n}")
        self.task, self.sources, self.processor, self.n, self.seed = task, list(sources), processor, n, seed
        self.rank, self.world_size = rank, world_size
        self.stats = ReadStats()

    def _raw(self) -> Iterator[tuple[Any, bool]]:
        """(item, is_shard_sample) interleaved round-robin over the sources, at most ``n``."""
        its = []
        for s in self.sources:
            if s.urls is not None:
                its.append(((r, True) for r in iter_raw(s.urls, 0, 1, self.stats)))
            else:
                its.append(((e, False) for e in s.factory(self.seed, 0, 1)))
        count = 0
        while its and count < self.n:
            for it in list(its):
                item = next(it, None)
                if item is None:
                    its.remove(it)
                    continue
                yield item
                count += 1
                if count >= self.n:
                    return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from uio.tasks import get_task

        task = get_task(self.task)
        rank, world, worker, num_workers = worker_info(self.rank, self.world_size)
        part, num_parts = rank * num_workers + worker, world * num_workers
        for i, (item, is_raw) in enumerate(self._raw()):
            if i % num_parts != part:
                continue
            example = decode_or_count(item, self.stats) if is_raw else item
            if example is None:
                continue
            sample = task.encode(example, self.processor, _rng(self.seed, 7, i), train=False)
            sample.setdefault("meta", {})["val_index"] = i
            yield sample


class UIODataModule(pl.LightningDataModule):
    """Training mixture + validation sets from shard roots (see the module docstring).

    Give ``processor`` (a :class:`uio.processing.Processor`), or ``model_config`` and
    ``text_tokenizer`` (a TextTokenizer or a folder/``.model`` path) to build one.
    ``roots`` default to the toy world (``uio.paths.toyworld_dir()``).
    """

    def __init__(self, processor: Any = None, *, model_config: Any = None, text_tokenizer: Any = None,
                 roots: str | Sequence[str] | None = None, sources: Sequence[Any] | None = None,
                 tasks: Sequence[str] | None = None, train_split: str = "train",
                 val_roots: str | Sequence[str] | None = None, val_split: str = "val",
                 val_tasks: Sequence[str] | None = None, val_examples_per_task: int = 32,
                 batch_size: int = 8, val_batch_size: int | None = None, num_workers: int = 2, seed: int = 0,
                 temperature: float = TEMPERATURE, group_rates: Mapping[str, float] | None = None,
                 shuffle_buffer: int = 64, pin_memory: bool = False, max_input_len: int | None = None,
                 max_target_len: int | None = None):
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.processor = processor if processor is not None else self._build_processor(model_config, text_tokenizer)
        self.roots = [Path(r) for r in _as_list(roots)]
        self.val_roots = [Path(r) for r in _as_list(val_roots)] or None
        self.extra_sources = [MixtureSource.coerce(s) for s in _as_list(sources)]
        self.tasks = list(tasks) if tasks is not None else None
        self.train_split, self.val_split = train_split, val_split
        self.val_tasks = list(val_tasks) if val_tasks is not None else None
        self.val_examples_per_task = int(val_examples_per_task)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or batch_size)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.temperature, self.group_rates, self.shuffle_buffer = temperature, dict(group_rates or {}), shuffle_buffer
        self.pin_memory = pin_memory
        p = self.processor
        self.collator = Collator(max_input_len or p.max_input_len, max_target_len or p.max_target_len,
                                 p.vocab.pad_id, p.vocab.eos_id)
        self._resume: dict[str, Any] | None = None
        self.train_dataset: MixtureDataset | None = None
        self.val_task_names: list[str] = []
        self._val_sets: list[ValTaskDataset] = []

    @staticmethod
    def _build_processor(model_config: Any, text_tokenizer: Any):
        from uio.config import ModelConfig
        from uio.processing import Processor
        from uio.text_tokenizer import TextTokenizer

        if model_config is None or text_tokenizer is None:
            raise ValueError("UIODataModule needs processor=..., or both model_config and text_tokenizer")
        if isinstance(model_config, Mapping):
            model_config = ModelConfig.from_dict(dict(model_config))
        if isinstance(text_tokenizer, (str, Path)):
            path = Path(text_tokenizer)
            text_tokenizer = TextTokenizer.from_dir(path) if path.is_dir() else TextTokenizer(path)
        return Processor.from_config(model_config, text_tokenizer)

    # ---- sources --------------------------------------------------------------------------------
    def _default_roots(self) -> list[Path]:
        if self.roots:
            return self.roots
        from uio.paths import toyworld_dir

        return [toyworld_dir()]

    def _discover(self, roots: Sequence[Path], split: str, tasks: Sequence[str] | None) -> list[MixtureSource]:
        out = []
        for root in roots:
            for f in discover(root, split=split, tasks=tasks):
                out.append(MixtureSource.from_manifest(f["dir"], split))
        return out

    def train_sources(self) -> list[MixtureSource]:
        roots = self._default_roots()
        srcs = self._discover(roots, self.train_split, self.tasks) if (self.roots or not self.extra_sources) else []
        srcs += [s for s in self.extra_sources if self.tasks is None or s.task in self.tasks]
        if not srcs:
            raise FileNotFoundError(
                f"no training data: no <task>/<dataset>/manifest.json with a {self.train_split!r} split under "
                f"{[str(r) for r in roots]}" + (f" for tasks {self.tasks}" if self.tasks else "") +
                " -- build the toy world (uio-train builds it on first use) or shards with data_recipes/")
        return srcs

    def val_sources(self) -> dict[str, list[MixtureSource]]:
        roots = self.val_roots or self._default_roots()
        tasks = self.val_tasks if self.val_tasks is not None else self.tasks
        by_task: dict[str, list[MixtureSource]] = {}
        try:
            found = self._discover(roots, self.val_split, tasks)
        except FileNotFoundError:
            found = []
        for s in found:
            by_task.setdefault(s.task, []).append(s)
        if self.val_tasks is not None:
            missing = [t for t in self.val_tasks if t not in by_task]
            if missing:
                raise FileNotFoundError(f"no {self.val_split!r} split for val task(s) {missing} under "
                                        f"{[str(r) for r in roots]}; tasks with one: {sorted(by_task)}")
            return {t: by_task[t] for t in self.val_tasks}
        return dict(sorted(by_task.items()))

    # ---- Lightning hooks ------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        if t is not None:
            return int(t.global_rank), int(t.world_size)
        r, w, _, _ = worker_info()
        return r, w

    def setup(self, stage: str | None = None) -> None:
        rank, world = self._rank_world()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = MixtureDataset(
                self.train_sources(), processor=self.processor, seed=self.seed, temperature=self.temperature,
                group_rates=self.group_rates, shuffle_buffer=self.shuffle_buffer, rank=rank, world_size=world)
            rank_zero_info("training mixture rates:\n" + self.train_dataset.format_rates())
            if self._resume is not None:
                self.train_dataset.load_state_dict(self._resume)
        if stage in (None, "fit", "validate") and not self._val_sets:
            for task, srcs in self.val_sources().items():
                self.val_task_names.append(task)
                self._val_sets.append(ValTaskDataset(task, srcs, self.processor, self.val_examples_per_task,
                                                     seed=self.seed, rank=rank, world_size=world))

    def _loader(self, ds, batch_size: int) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, num_workers=self.num_workers, collate_fn=self.collator,
                          pin_memory=self.pin_memory, persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size)

    def val_dataloader(self) -> list[DataLoader]:
        if not self._val_sets:
            self.setup("validate")
        return [self._loader(ds, self.val_batch_size) for ds in self._val_sets]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        metas = batch.get("meta") if isinstance(batch, Mapping) else None
        if self.train_dataset is not None and metas and isinstance(metas[0], Mapping) and "mixture" in metas[0]:
            self.train_dataset.observe(metas)
        return batch

    # ---- state (exact resume) -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.train_dataset is None:
            return dict(self._resume or {})
        progress = self.train_dataset.progress
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, progress.state_dict())
            merged = MixtureProgress.from_state_dict(gathered[0])
            for st in gathered[1:]:
                merged.merge(MixtureProgress.from_state_dict(st))
            return merged.state_dict()
        return progress.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._resume = dict(state_dict)
        if self.train_dataset is not None:
            self.train_dataset.load_state_dict(self._resume)

    def read_stats(self) -> dict[str, int]:
        """Corrupt samples/shards reported by the training readers so far (from the batches seen)."""
        if self.train_dataset is None:
            return {"corrupt": 0, "corrupt_shards": 0}
        return self.train_dataset.progress.corrupt_totals()
