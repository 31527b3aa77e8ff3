"""The multi-task mixture: temperature-scaled sampling over (task, dataset) sources, exactly resumable.

Rates (UIO paper §3.3 and Figure 4): every task group gets a fixed share -- 1/8 each, except image
synthesis 3/16 and dense labelling 1/16 (:data:`PAPER_GROUP_RATES`); groups with no source give
their share to the others in proportion. Inside a group, a task's share is proportional to
(total examples of the task)^(1/T) and a dataset's share inside its task to size^(1/T), T = 2
(following T5), each renormalised to sum to 1. ``rate = group * task * dataset``.

Sampling: each reader (``rank``, DataLoader ``worker``) draws the source of every sample with an
RNG seeded by (seed, rank, worker), in blocks of :data:`BLOCK` uniform numbers, pulls the next raw
example of that source and encodes it with ``uio.tasks.get_task(task).encode(example, processor,
rng, train=True)``, ``rng`` seeded by (seed, rank, worker, draw). Each source is read as an endless
sequence of epochs: per epoch a fresh shard order (seeded by (seed, source, epoch) so that all
readers agree on it), the shards split across readers like :func:`uio.data.shards.partition`, and
inside each shard a seeded shuffle buffer. A draw whose sample turns out corrupt yields nothing
(the next draw picks a source again, so rates stay right); it is counted and logged.

Exact resume. Everything above is a pure function of (seed, rank, worker, draws so far), so the
only state is *how many draws each reader has made* (:class:`MixtureProgress`). Every yielded
sample carries ``meta["mixture"] = {"rank", "worker", "draw", ...}``; whoever consumes samples
calls :meth:`MixtureDataset.observe` (the data module does so for every batch that reaches the
model), and ``state_dict()`` returns the progress. On resume each reader recomputes which sources
its first ``draws`` picked (cheap block arithmetic) and fast-forwards every source by its pull
count without decoding anything: whole epochs and shards are skipped by arithmetic on the
manifest's ``shard_sizes``, and only the current shard is re-read (raw bytes) to restore its
shuffle buffer. DataLoader workers hand out batches round-robin, so the progress also records
which worker is next and the restarted workers are renumbered to continue the same interleaving.
Resume is exact when the number of workers and ranks is unchanged; otherwise it falls back to a
fresh stream with a different seed (logged). Sources without ``shard_sizes`` (plain url patterns,
generator factories) are fast-forwarded by re-reading them, which is exact but slower. A shard
whose sample count differs from its manifest (a corrupt shard) makes the arithmetic skip inexact;
that is logged when it is read.
"""
from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from uio.data.shards import (
    ReadStats,
    decode_or_count,
    expand_urls,
    iter_tar,
    load_manifest,
    manifest_splits,
    partition,
    worker_info,
)

log = logging.getLogger(__name__)

# UIO §3.3: "we equally sample each group (1/8) except image synthesis (3/16) and dense labeling
# (1/16)". "pretraining" (masked image denoising) is a separate stage in the paper: rate 0 unless set.
PAPER_GROUP_RATES: dict[str, float] = {
    "image_synthesis": 3 / 16, "sparse_labelling": 1 / 8, "dense_labelling": 1 / 16,
    "image_classification": 1 / 8, "image_captioning": 1 / 8, "vision_language": 1 / 8, "nlp": 1 / 8,
    "language_modelling": 1 / 8, "pretraining": 0.0,
}
TEMPERATURE = 2.0  # UIO §3.3, following Raffel et al. (2020)
BLOCK = 1024  # source choices are drawn in seeded blocks of this many
_TAG_CHOICE, _TAG_ENCODE, _TAG_SHARDS, _TAG_BUFFER, _TAG_FACTORY = 1, 2, 3, 4, 5

# factory(seed, part, num_parts) -> iterable of raw examples (one epoch of part `part`)
Factory = Callable[[int, int, int], Iterable[dict]]
EncodeFn = Callable[[str, dict, np.random.Generator], dict]


@dataclass
class MixtureSource:
    """One (task, dataset) stream: shard ``urls`` or a generator ``factory``; ``size`` in examples."""

    task: str
    dataset: str
    size: int
    urls: str | Sequence[str] | None = None
    factory: Factory | None = None
    group: str | None = None  # default: uio.tasks.get_task(task).group
    shard_sizes: list[int] | None = None  # per shard (from the manifest): enables arithmetic skipping

    def __post_init__(self):
        if (self.urls is None) == (self.factory is None):
            raise ValueError(f"source {self.task}/{self.dataset}: give exactly one of urls or factory")
        if not isinstance(self.size, (int, np.integer)) or self.size < 0:
            raise ValueError(f"source {self.task}/{self.dataset}: size must be an int >= 0, got {self.size!r}")
        self.size = int(self.size)
        if self.urls is not None:
            self.urls = expand_urls(self.urls)
            if self.shard_sizes is not None and len(self.shard_sizes) != len(self.urls):
                raise ValueError(f"source {self.task}/{self.dataset}: {len(self.shard_sizes)} shard_sizes for "
                                 f"{len(self.urls)} shards")

    @property
    def name(self) -> str:
        return f"{self.task}/{self.dataset}"

    @classmethod
    def coerce(cls, spec: Any) -> "MixtureSource":
        """A MixtureSource, a dict of its fields, or a tuple ``(task, dataset, size, urls_or_factory)``."""
        if isinstance(spec, MixtureSource):
            return spec
        if isinstance(spec, Mapping):
            return cls(**spec)
        if isinstance(spec, (tuple, list)) and len(spec) in (4, 5):
            task, dataset, size, what = spec[:4]
            kw = {"group": spec[4]} if len(spec) == 5 else {}
            if callable(what):
                return cls(task, dataset, size, factory=what, **kw)
            return cls(task, dataset, size, urls=what, **kw)
        raise TypeError(f"a mixture source must be a MixtureSource, a dict or (task, dataset, size, "
                        f"urls-or-factory[, group]); got {spec!r}")

    @classmethod
    def from_manifest(cls, path: str | Path, split: str = "train", group: str | None = None) -> "MixtureSource":
        """The source of one split of ``<root>/<task>/<dataset>/manifest.json`` (file or folder)."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        m = load_manifest(path)
        splits = manifest_splits(m)
        if split not in splits:
            raise KeyError(f"split {split!r} not in {folder}/manifest.json; it has {sorted(splits)}")
        s = splits[split]
        return cls(m["task"], m["dataset"], int(s["num_examples"]), urls=[str(folder / n) for n in s["shards"]],
                   group=group, shard_sizes=[int(v) for v in s.get("shard_sizes", [])] or None)


def _task_group(task: str) -> str:
    try:
        from uio.tasks import get_task
    except ImportError as e:  # pragma: no cover - uio.tasks is part of the package
        raise ValueError(f"cannot look up the group of task {task!r} ({e}); give MixtureSource(group=...)") from e
    return get_task(task).group


def compute_rates(sources: Sequence[MixtureSource], temperature: float = TEMPERATURE,
                  group_rates: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The rate table: one row per source ``{"group", "task", "dataset", "size", "group_rate",
    "task_rate", "dataset_rate", "rate"}`` in source order; rates of sampled sources sum to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gr = dict(PAPER_GROUP_RATES)
    gr.update(group_rates or {})
    groups = [s.group or _task_group(s.task) for s in sources]
    missing = sorted({g for g in groups if g not in gr})
    if missing:
        raise ValueError(f"no rate for task group(s) {missing}; known groups {sorted(gr)} -- "
                         "pass group_rates={group: rate}")
    bad = {g: r for g, r in gr.items() if not (r >= 0 and math.isfinite(r))}
    if bad:
        raise ValueError(f"group rates must be finite and >= 0, got {bad}")
    inv_t = 1.0 / temperature
    # group -> task -> dataset sizes
    tasks: dict[str, dict[str, float]] = {}
    for s, g in zip(sources, groups):
        tasks.setdefault(g, {}).setdefault(s.task, 0.0)
        tasks[g][s.task] += s.size
    live = {g for g in tasks if gr[g] > 0 and sum(tasks[g].values()) > 0}
    total = sum(gr[g] for g in live)
    rows = []
    for s, g in zip(sources, groups):
        row = {"group": g, "task": s.task, "dataset": s.dataset, "size": s.size, "group_rate": 0.0,
               "task_rate": 0.0, "dataset_rate": 0.0, "rate": 0.0}
        if g in live and s.size > 0:
            task_w = {t: n ** inv_t for t, n in tasks[g].items()}
            ds_w = [o.size ** inv_t for o in sources if o.task == s.task and (o.group or g) == g]
            row["group_rate"] = gr[g] / total
            row["task_rate"] = task_w[s.task] / sum(task_w.values())
            row["dataset_rate"] = s.size ** inv_t / sum(ds_w)
            row["rate"] = row["group_rate"] * row["task_rate"] * row["dataset_rate"]
        rows.append(row)
    if not any(r["rate"] > 0 for r in rows):
        raise ValueError("no source can be sampled: every source is empty or in a group with rate 0 "
                         f"(groups present: {sorted(tasks)})")
    return rows


def format_rates(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rate table as aligned text (printed when training starts)."""
    lines = [f"{'group':<22}{'task':<26}{'dataset':<22}{'size':>10}{'rate %':>9}"]
    for r in sorted(rows, key=lambda r: (r["group"], r["task"], -r["rate"])):
        lines.append(f"{r['group']:<22}{r['task']:<26}{r['dataset']:<22}{r['size']:>10}{100 * r['rate']:>9.3f}")
    by_group: dict[str, float] = {}
    for r in rows:
        by_group[r["group"]] = by_group.get(r["group"], 0.0) + r["rate"]
    lines.append("groups: " + ", ".join(f"{g} {100 * v:.2f}%" for g, v in sorted(by_group.items())))
    return "\n".join(lines)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


# ================================================================================================
# One source as an endless, seekable stream (inside one reader)
# ================================================================================================
class _SourceStream:
    """Epochs of one source for reader ``part`` of ``num_parts``; ``pull()`` gives the next raw
    item (undecoded shard sample or factory example) or None when this reader's part is empty."""

    def __init__(self, src: MixtureSource, index: int, seed: int, rank: int, worker: int, part: int,
                 num_parts: int, buffer: int, stats: ReadStats):
        self.src, self.index, self.seed, self.rank, self.worker = src, index, seed, rank, worker
        self.part, self.num_parts, self.buffer, self.stats = part, num_parts, max(1, buffer), stats
        self.epoch = 0
        self.empty = False
        self._it: Iterator | None = None

    # ---- epoch layout -------------------------------------------------------------------------
    def _shard_order(self, epoch: int) -> list[int]:
        return _rng(self.seed, _TAG_SHARDS, self.index, epoch).permutation(len(self.src.urls)).tolist()

    def _plan(self, epoch: int) -> list[tuple[int, int, int | None]]:
        """This reader's shards of ``epoch`` in order: (shard index, global sample offset of the
        shard in the epoch, number of its samples this reader keeps or None if unknown)."""
        order = self._shard_order(epoch)
        mine, stride, offset = partition(len(order), self.part, self.num_parts)
        sizes = self.src.shard_sizes
        plan, start = [], 0
        if stride == 1:
            keep = set(mine)
            for i in order:
                if i in keep:
                    plan.append((i, 0, sizes[i] if sizes else None))
            return plan
        for i in order:  # sample split: every reader reads every shard, keeps n % P == part
            n = sizes[i] if sizes else None
            count = None if n is None else len(range((offset - start) % stride, n, stride))
            plan.append((i, start if sizes else -1, count))
            start = start + n if n is not None else start
        return plan

    def _shard_items(self, shard: int, start: int, running: list[int]) -> Iterator[dict]:
        """Raw samples of one shard kept by this reader (sample split uses the global counter)."""
        _, stride, offset = partition(len(self.src.urls), self.part, self.num_parts)
        n_read = 0
        for raw in iter_tar(self.src.urls[shard], self.stats):
            g = (start + n_read) if start >= 0 else running[0]
            n_read += 1
            running[0] += 1
            if stride == 1 or g % stride == offset:
                yield raw
        sizes = self.src.shard_sizes
        if sizes and n_read != sizes[shard]:
            log.warning("shard %s has %d samples, its manifest says %d: resume arithmetic past it is approximate",
                        self.src.urls[shard], n_read, sizes[shard])

    def _buffered(self, items: Iterable, key: tuple[int, ...], skip: int = 0) -> Iterator:
        """Seeded shuffle buffer over ``items``; the first ``skip`` outputs are dropped."""
        rng = _rng(self.seed, _TAG_BUFFER, self.rank, self.worker, self.index, *key)
        buf: list = []
        out = 0
        for item in items:
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            item, buf[j] = buf[j], item
            if out >= skip:
                yield item
            out += 1
        while buf:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            item = buf.pop()
            if out >= skip:
                yield item
            out += 1

    def _epoch_iter(self, epoch: int, skip: int = 0) -> Iterator:
        """Items of one epoch, the first ``skip`` skipped (shards skipped whole when sizes are known)."""
        if self.src.factory is not None:
            seed = int(_rng(self.seed, _TAG_FACTORY, self.index, epoch).integers(2**31))
            yield from self._buffered(self.src.factory(seed, self.part, self.num_parts), (epoch,), skip)
            return
        running = [0]
        for pos, (shard, start, count) in enumerate(self._plan(epoch)):
            if count is not None and skip >= count:
                skip -= count
                continue
            yield from self._buffered(self._shard_items(shard, start, running), (epoch, pos), skip)
            skip = 0

    def _epoch_length(self, epoch: int) -> int | None:
        if self.src.factory is not None or not self.src.shard_sizes:
            return None
        return sum(c for _, _, c in self._plan(epoch))

    # ---- pulling ------------------------------------------------------------------------------
    def pull(self) -> Any | None:
        if self.empty:
            return None
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_iter(self.epoch)
            item = next(self._it, None)
            if item is not None:
                return item
            self._it, self.epoch = None, self.epoch + 1
        # a whole fresh epoch gave nothing: this reader's part of the source is empty
        self.empty = True
        log.warning("source %s has no examples for reader %d/%d; it is skipped", self.src.name, self.part,
                    self.num_parts)
        return None

    def fast_forward(self, pulls: int) -> None:
        """Advance by ``pulls`` pulls (as if :meth:`pull` had been called that many times)."""
        while pulls > 0:
            length = self._epoch_length(self.epoch)
            if length == 0:
                self.empty = True
                return
            if length is not None and pulls >= length:
                pulls -= length
                self.epoch += 1
                continue
            if length is not None:  # the rest lies inside this epoch
                self._it = self._epoch_iter(self.epoch, skip=pulls)
                return
            # unknown length: replay item by item (raw shard samples / factory examples)
            for _ in range(pulls):
                if self.pull() is None:
                    return
            return


# ================================================================================================
# Progress (the whole resumable state)
# ================================================================================================
@dataclass
class MixtureProgress:
    """Draws consumed per (rank, logical worker) and the next worker in the round-robin."""

    num_workers: int = 1
    world_size: int = 1
    seed: int = 0
    draws: dict[int, list[int]] = field(default_factory=dict)  # rank -> [draws per logical worker]
    next_worker: dict[int, int] = field(default_factory=dict)  # rank -> logical worker due next
    corrupt: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # running counts, not saved

    def observe(self, info: Mapping[str, Any]) -> None:
        r, w, d = int(info["rank"]), int(info["worker"]), int(info["draw"])
        old = self.corrupt.get((r, w), (0, 0))
        self.corrupt[(r, w)] = (max(old[0], int(info.get("corrupt", 0))), max(old[1], int(info.get("corrupt_shards", 0))))
        if info.get("num_workers", self.num_workers) != self.num_workers:
            self.num_workers = int(info["num_workers"])
        row = self.draws.setdefault(r, [0] * self.num_workers)
        if len(row) < self.num_workers:
            row.extend([0] * (self.num_workers - len(row)))
        row[w] = max(row[w], d + 1)
        self.next_worker[r] = (w + 1) % self.num_workers

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "num_workers": self.num_workers, "world_size": self.world_size, "seed": self.seed,
                "draws": {str(r): list(v) for r, v in self.draws.items()},
                "next_worker": {str(r): int(v) for r, v in self.next_worker.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "MixtureProgress":
        if state.get("version") != 1:
            raise ValueError(f"unknown mixture state version {state.get('version')!r}; expected 1")
        return cls(num_workers=int(state["num_workers"]), world_size=int(state["world_size"]), seed=int(state["seed"]),
                   draws={int(r): [int(x) for x in v] for r, v in state["draws"].items()},
                   next_worker={int(r): int(v) for r, v in state["next_worker"].items()})

    def merge(self, other: "MixtureProgress") -> None:
        """Take the entries of ranks that ``other`` knows (gathering per-rank states)."""
        self.draws.update(other.draws)
        self.next_worker.update(other.next_worker)

    def corrupt_totals(self) -> dict[str, int]:
        """Corrupt samples and shards the readers reported in the samples observed so far."""
        return {"corrupt": sum(c for c, _ in self.corrupt.values()),
                "corrupt_shards": sum(s for _, s in self.corrupt.values())}

    @property
    def total_draws(self) -> int:
        return int(sum(sum(v) for v in self.draws.values()))


# ================================================================================================
# The dataset
# ================================================================================================
class MixtureDataset(IterableDataset):
    """Endless multi-task stream of encoded samples (contract 2), see the module docstring.

    ``sources``: :class:`MixtureSource` specs. ``shuffle_buffer`` raw samples are held per source
    and reader (the buffer never spans shards), so memory per DataLoader worker is about
    ``shuffle_buffer x sources x encoded sample size`` -- keep it modest with many image sources. ``encode_fn(task, example, rng) -> sample`` replaces
    the task registry (``processor`` is then unused); with ``encode=False`` raw examples are yielded
    (with ``"task"`` and ``"_mixture"`` keys). ``num_workers`` is the DataLoader's worker count (only
    needed to validate a resumed state before iterating; the real count is read in the worker).
    """

    def __init__(self, sources: Sequence[Any], processor: Any = None, seed: int = 0, temperature: float = TEMPERATURE,
                 group_rates: Mapping[str, float] | None = None, shuffle_buffer: int = 64,
                 encode_fn: EncodeFn | None = None, encode: bool = True, rank: int | None = None,
                 world_size: int | None = None, max_consecutive_failures: int = 50):
        super().__init__()
        self.sources = [MixtureSource.coerce(s) for s in sources]
        if not self.sources:
            raise ValueError("a mixture needs at least one source")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate mixture sources {dup}")
        self.table = compute_rates(self.sources, temperature, group_rates)
        self.probs = np.array([r["rate"] for r in self.table], np.float64)
        self.probs /= self.probs.sum()
        self.cum = np.cumsum(self.probs)
        self.cum[-1] = 1.0
        if encode and encode_fn is None and processor is None:
            raise ValueError("MixtureDataset needs a processor (uio.processing.Processor) to encode with uio.tasks, "
                             "or encode_fn=..., or encode=False for raw examples")
        self.processor, self.encode_fn, self.encode = processor, encode_fn, encode
        self.seed, self.shuffle_buffer = int(seed), int(shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.max_consecutive_failures = max_consecutive_failures
        self.progress = MixtureProgress(seed=self.seed)
        self._pending_resume: MixtureProgress | None = None
        self.stats = ReadStats()  # of the last iteration in this process (workers keep their own)
        log.info("mixture of %d sources (T=%s, seed %d):\n%s", len(self.sources), temperature, self.seed,
                 format_rates(self.table))

    # ---- rates --------------------------------------------------------------------------------
    def rates(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.table]

    def format_rates(self) -> str:
        return format_rates(self.table)

    def choices(self, rank: int, worker: int, start: int, stop: int) -> np.ndarray:
        """Source index of draws ``start..stop-1`` of reader (rank, logical worker)."""
        out = []
        for b in range(start // BLOCK, (stop + BLOCK - 1) // BLOCK):
            u = _rng(self.seed, _TAG_CHOICE, rank, worker, b).random(BLOCK)
            out.append(np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.cum) - 1))
        if not out:
            return np.zeros(0, np.int64)
        allc = np.concatenate(out)
        base = (start // BLOCK) * BLOCK
        return allc[start - base: stop - base]

    # ---- state --------------------------------------------------------------------------------
    def observe(self, consumed: Any) -> None:
        """Record consumption of a sample, a batch dict (its ``meta`` list) or a list of metas."""
        if isinstance(consumed, Mapping) and "meta" in consumed and isinstance(consumed["meta"], list):
            metas = consumed["meta"]
        elif isinstance(consumed, Mapping):
            metas = [consumed.get("meta", consumed)]
        else:
            metas = list(consumed)
        for m in metas:
            info = m.get("mixture") if isinstance(m, Mapping) else None
            if info is None and isinstance(m, Mapping):
                info = m.get("_mixture")
            if info is None:
                raise ValueError("observed a sample without meta['mixture'] (not produced by a MixtureDataset)")
            if int(info.get("world_size", 1)) != self.progress.world_size:
                self.progress.world_size = int(info["world_size"])
            self.progress.observe(info)

    def state_dict(self) -> dict[str, Any]:
        return self.progress.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the consumption recorded in ``state`` on the next iteration."""
        prog = MixtureProgress.from_state_dict(state)
        if prog.seed != self.seed:
            log.warning("mixture state was saved with seed %d, this mixture has seed %d: using the saved seed",
                        prog.seed, self.seed)
            self.seed = prog.seed
        self.progress = prog

    # ---- iteration ----------------------------------------------------------------------------
    def _start(self, rank: int, world: int, worker: int, num_workers: int) -> tuple[int, int, int]:
        """(logical worker, first draw, seed) for this reader given the recorded progress."""
        prog = self.progress
        if prog.total_draws == 0:
            return worker, 0, self.seed
        if prog.num_workers != num_workers or prog.world_size != world:
            new_seed = self.seed + 1_000_003 * prog.total_draws
            log.warning("resuming a mixture saved with %d ranks x %d workers on %d x %d: exact resume is impossible, "
                        "continuing with a fresh stream (seed %d)", prog.world_size, prog.num_workers, world,
                        num_workers, new_seed)
            return worker, 0, new_seed
        offset = prog.next_worker.get(rank, 0)
        logical = (worker + offset) % num_workers
        return logical, prog.draws.get(rank, [0] * num_workers)[logical], self.seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, num_workers = worker_info(self.rank, self.world_size)
        logical, draw, seed = self._start(rank, world, worker, num_workers)
        saved_seed, self.seed = self.seed, seed
        try:
            yield from self._iterate(rank, world, logical, num_workers, draw)
        finally:
            self.seed = saved_seed

    def _iterate(self, rank: int, world: int, worker: int, num_workers: int, draw: int) -> Iterator[dict[str, Any]]:
        stats = self.stats = ReadStats()
        part, num_parts = rank * num_workers + worker, world * num_workers
        streams = [_SourceStream(s, i, self.seed, rank, worker, part, num_parts, self.shuffle_buffer, stats)
                   for i, s in enumerate(self.sources)]
        if draw:  # fast-forward every source by the pulls of the draws already consumed
            pulls = np.bincount(self.choices(rank, worker, 0, draw), minlength=len(streams))
            for stream, n in zip(streams, pulls):
                stream.fast_forward(int(n))
        tasks = {}
        failures: dict[int, int] = {}
        while True:
            block = self.choices(rank, worker, draw, (draw // BLOCK + 1) * BLOCK)
            for s in block:
                d, draw = draw, draw + 1
                stream = streams[s]
                item = stream.pull()
                if item is None:
                    if all(st.empty for st, p in zip(streams, self.probs) if p > 0):
                        raise RuntimeError(f"every mixture source is empty for reader rank {rank} worker {worker}")
                    continue
                example = decode_or_count(item, stats) if stream.src.urls is not None else item
                if example is None:
                    continue
                info = {"rank": rank, "worker": worker, "draw": d, "num_workers": num_workers, "world_size": world,
                        "source": stream.src.name, "corrupt": stats.corrupt, "corrupt_shards": stats.corrupt_shards}
                src = stream.src
                if not self.encode:
                    out = dict(example)
                    out["task"], out["_mixture"] = src.task, info
                    yield out
                    continue
                rng = _rng(self.seed, _TAG_ENCODE, rank, worker, d)
                try:
                    if self.encode_fn is not None:
                        sample = self.encode_fn(src.task, example, rng)
                    else:
                        if src.task not in tasks:
                            from uio.tasks import get_task

                            tasks[src.task] = get_task(src.task)
                        sample = tasks[src.task].encode(example, self.processor, rng, train=True)
                except Exception as e:  # a bad example: skip and count; a broken task: stop
                    failures[s] = failures.get(s, 0) + 1
                    stats.reasons[f"encode: {type(e).__name__}"] += 1
                    log.warning("could not encode example %r of %s: %s: %s", example.get("id"), src.name,
                                type(e).__name__, e)
                    if failures[s] >= self.max_consecutive_failures:
                        raise RuntimeError(f"{failures[s]} consecutive examples of {src.name} failed to encode; "
                                           f"last error:\n{traceback.format_exc()}") from e
                    continue
                failures[s] = 0
                sample.setdefault("meta", {})["mixture"] = info
                yield sample
