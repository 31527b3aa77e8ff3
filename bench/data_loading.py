"""Reader throughput: decoded samples per second per DataLoader worker.

    .venv/bin/python bench/data_loading.py                       # synthetic COCO-like shards, 384 px
    .venv/bin/python bench/data_loading.py --workers 1 2 4 --num-examples 400 --image-size 512
    .venv/bin/python bench/data_loading.py --shards ~/.cache/uio/toyworld   # any existing shard root

Stages measured (each with 0 = in-process, then every ``--workers`` count):

* ``read``    tar reading + decoding of every member (JPEG image, PNG masks, 16-bit depth, JSON):
              :class:`uio.data.shards.ShardSource`;
* ``mixture`` the temperature mixture drawing sources, decoding and encoding each sample with its
              task (resize, normalise, tokenise) and collating batches of ``--batch-size``.

Per-worker rate = total rate / workers (workers = 1 for the in-process row). Synthetic shards are
written once to a temporary folder: photo-like JPEG images (smooth gradients plus shapes, quality
95), three instance masks, a depth map and a question per example, spread over four tasks.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour gradients with a few flat shapes: compresses like a photograph, unlike noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([(xx / w) * rng.uniform(80, 255), (yy / h) * rng.uniform(80, 255),
                    ((xx + yy) / (h + w)) * rng.uniform(80, 255)], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(h / 12, h / 4)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic(root: Path, n: int, size: int) -> None:
    from uio.data.shards import write_examples

    rng = np.random.default_rng(0)
    per_task = max(1, n // 4)

    def gen(task: str):
        for i in range(per_task):
            img = photo_like(rng, size, size * 4 // 3)
            h, w = img.shape[:2]
            boxes = [[float(x), float(y), float(x + 40), float(y + 30)] for x, y in rng.uniform(0, h - 40, (3, 2))]
            base = {"id": f"{task}:{i}", "dataset": "synthetic", "image": img}
            if task == "detection":
                yield {**base, "boxes": boxes, "labels": ["cube", "sphere", "cone"]}
            elif task == "object_segmentation":
                masks = [np.zeros((h, w), bool) for _ in range(3)]
                for m, (x1, y1, x2, y2) in zip(masks, boxes):
                    m[int(y1):int(y2), int(x1):int(x2)] = True
                yield {**base, "label": "cube", "masks": masks}
            elif task == "depth":
                yield {**base, "depth": (np.linspace(0.5, 9.5, h * w, dtype=np.float32).reshape(h, w)),
                       "max_depth": 10.0}
            else:
                yield {**base, "question": "what color is the cube ?", "answers": ["red"] * 10}

    for task in ("detection", "object_segmentation", "depth", "vqa"):
        write_examples(gen(task), root, task, "synthetic", "train", maxcount=max(1, per_task // 4))


def identity(x):
    return x


def rate(iterable, count_fn, limit: int, warmup: int) -> float:
    """Items per second after ``warmup`` items (worker start-up is not counted)."""
    it = iter(iterable)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for item in itertools.islice(it, limit):
        n += count_fn(item)
    return n / (time.perf_counter() - t0)


def make_processor(tmp: Path):
    from uio.config import ModelConfig
    from uio.data.text_corpus import iter_corpus_lines
    from uio.processing import Processor
    from uio.text_tokenizer import TextTokenizer

    lines = list(itertools.islice(iter_corpus_lines(["pydoc"]), 5000))
    tok = TextTokenizer.train(lines, tmp / "spiece", vocab_size=1000)
    cfg = ModelConfig.from_size("small", text_vocab=tok.vocab.text_vocab)
    return Processor.from_config(cfg, tok)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=None, help="an existing shard root (default: write synthetic shards)")
    p.add_argument("--num-examples", type=int, default=200, help="synthetic examples (spread over 4 tasks)")
    p.add_argument("--image-size", type=int, default=384, help="synthetic image height (width is 4/3 of it)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to measure")
    p.add_argument("--samples", type=int, default=150, help="samples timed per measurement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-mixture", action="store_true", help="measure the reader only")
    a = p.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    from uio.data.collate import Collator
    from uio.data.mixture import MixtureDataset, MixtureSource
    from uio.data.shards import ShardSource, discover, manifest_urls

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        root = Path(a.shards).expanduser() if a.shards else tmp / "shards"
        if not a.shards:
            t0 = time.perf_counter()
            write_synthetic(root, a.num_examples, a.image_size)
            print(f"wrote {a.num_examples} synthetic examples ({a.image_size}x{a.image_size * 4 // 3}) "
                  f"in {time.perf_counter() - t0:.1f} s")
        found = discover(root, split="train")
        if not found:
            raise SystemExit(f"no <task>/<dataset>/manifest.json with a train split under {root}")
        urls = [u for f in found for u in manifest_urls(f["dir"], "train")]
        rows = []
        counts = [0] + a.workers
        for w in counts:
            src = ShardSource(urls, rank=0, world_size=1)
            loader = src if w == 0 else torch.utils.data.DataLoader(src, batch_size=None, num_workers=w,
                                                                     collate_fn=identity)
            # cycle so that small shard sets still give `samples` items
            r = rate(itertools.chain.from_iterable(itertools.repeat(loader, 1000)), lambda _: 1, a.samples, 2 * max(w, 1))
            rows.append(("read", w, r, r / max(w, 1)))
        if not a.no_mixture:
            proc = make_processor(tmp)
            sources = [MixtureSource.from_manifest(f["dir"], "train") for f in found]
            collate = Collator(proc.max_input_len, proc.max_target_len)
            for w in counts:
                ds = MixtureDataset(sources, processor=proc, seed=0, rank=0, world_size=1)
                loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=w, collate_fn=collate)
                batches = max(1, a.samples // a.batch_size)
                r = rate(loader, lambda b: len(b["tasks"]), batches, max(w, 1))
                rows.append(("mixture", w, r, r / max(w, 1)))
        print(f"\n{'stage':<10}{'workers':>8}{'samples/s':>12}{'per worker':>12}")
        for stage, w, r, per in rows:
            print(f"{stage:<10}{w if w else '0 (main)':>8}{r:>12.1f}{per:>12.1f}")
        print(f"\ncpus: {os.cpu_count()}, torch threads per process: 1; shards: {len(urls)} from {root}")


if __name__ == "__main__":
    main()
