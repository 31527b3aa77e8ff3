"""The toy world: uio's embedded default dataset, generated on the machine with no download.

Seeded scenes of shapes and stick-figure people (:mod:`uio.data.toyworld_scene`) give exact
ground truth for every Unified-IO task (:mod:`uio.data.toyworld_tasks`); span corruption uses real
text shipped with installed packages (:mod:`uio.data.text_corpus`). :func:`build_toyworld` writes
WebDataset shards ``<root>/<task>/toyworld/{train,val}-NNNNNN.tar`` (+ ``manifest.json`` each, see
:mod:`uio.data.shards`) and ``<root>/toyworld.json`` last, as the completion marker. The val split
is held out: its scenes come from a different seed stream.

Command line::

    python -m uio.data.toyworld show --out toyworld_grid.png   # a grid of annotated samples
    python -m uio.data.toyworld build [--train-scenes N] [--root DIR]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uio import paths
from uio.data.toyworld_scene import COCO_SKELETON, Scene, SceneConfig, sample_scene
from uio.data.toyworld_tasks import (
    ALL_TASKS, DATASET, IMAGE_TASKS, SCENE_TEXT_TASKS, ExampleConfig, scene_examples)

log = logging.getLogger(__name__)

BUILD_VERSION = 2  # bump when the generator changes what a (seed, index) produces (2: zoomed-in camera)
INFO_FILE = "toyworld.json"
DEFAULT_TRAIN_SCENES = 2000
DEFAULT_VAL_SCENES = 200
SPLITS = {"train": 0, "val": 1}  # the seed stream of each split
_TOKENIZER_STREAM = 2  # scenes for image-tokenizer training: neither train nor val
TOKENIZER_KINDS = ("rgb", "depth", "normals", "segmentation")


def _check_tasks(tasks: Sequence[str] | None) -> tuple[str, ...]:
    if tasks is None:
        return ALL_TASKS
    unknown = sorted(set(tasks) - set(ALL_TASKS))
    if unknown:
        raise ValueError(f"unknown toy-world task(s) {unknown}; expected some of {list(ALL_TASKS)}")
    return tuple(t for t in ALL_TASKS if t in set(tasks))


def make_scene(seed: int, split: str, index: int, image_size: int | tuple[int, int] = 128) -> Scene:
    """Scene ``index`` of ``split``: the same (seed, split, index, image size) gives the same scene."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return sample_scene(np.random.default_rng([seed, SPLITS[split], index]), SceneConfig(image_size=image_size))


def examples_for_scene(seed: int, split: str, index: int, image_size: int | tuple[int, int] = 128,
                       tasks: Sequence[str] | None = None, encode: bool = False
                       ) -> dict[str, list[dict[str, Any]]]:
    """Raw examples of every requested task (no span corruption) from one scene.

    With ``encode`` (for shard writing) images and masks are PNG bytes, which the shard writer
    stores as they are and the reader decodes back to the same arrays; the scene's image is
    encoded once and shared by all its examples."""
    tasks = [t for t in _check_tasks(tasks) if t in IMAGE_TASKS + SCENE_TEXT_TASKS]
    scene = make_scene(seed, split, index, image_size)
    image = _png_bytes(scene.image) if encode else None
    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    out = scene_examples(scene, rng, f"{DATASET}-{split}-{index:06d}", tasks, ExampleConfig(), image=image)
    if encode:
        out = {t: [_encode_masks(ex) for ex in exs] for t, exs in out.items()}
    return out


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _encode_masks(value: Any) -> Any:
    """Every bool (H, W) array inside ``value`` -> 1-bit PNG bytes (decoded back to bool arrays)."""
    if isinstance(value, np.ndarray) and value.dtype == np.bool_ and value.ndim == 2 and value.size:
        return _png_bytes(value)
    if isinstance(value, dict):
        return {k: _encode_masks(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode_masks(v) for v in value]
    return value


def iter_toyworld_examples(split: str = "train", num_scenes: int = 16, seed: int = 0, image_size: int = 128,
                           tasks: Sequence[str] | None = None, max_passages: int | None = None
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(task, raw example)`` pairs in memory (no shards): scene by scene, then span corruption
    passages (``max_passages`` of them; default one per scene)."""
    tasks = _check_tasks(tasks)
    for i in range(num_scenes):
        for task, exs in examples_for_scene(seed, split, i, image_size, tasks).items():
            for ex in exs:
                yield task, ex
    if "span_corruption" in tasks:
        limit = num_scenes if max_passages is None else max_passages
        yield from (("span_corruption", ex) for ex in _span_examples(split, limit))


def _span_examples(split: str, limit: int | None) -> Iterator[dict[str, Any]]:
    from uio.data.text_corpus import iter_passages

    for i, text in enumerate(iter_passages(split)):
        if limit is not None and i >= limit:
            return
        yield {"id": f"{DATASET}-{split}-text-{i:06d}", "dataset": DATASET, "text": text}


def _chunk_worker(job: tuple[int, str, int, int, tuple[int, int], tuple[str, ...]]):
    """Scenes ``start:stop`` as shard-ready examples: ``{task: [encode_example(...) members]}`` per
    scene, serialised here (with the shard writer's default options, which the build's writers use)
    so that the process writing the shards only adds tar members: with many workers it is the one
    process every example passes through."""
    from uio.data.shards import encode_example

    seed, split, start, stop, image_size, tasks = job
    return [{t: [encode_example(ex) for ex in exs] for t, exs in
             examples_for_scene(seed, split, i, image_size, tasks, encode=True).items()} for i in range(start, stop)]


def tokenizer_images(n: int, size: int | tuple[int, int] = (64, 64), seed: int = 0,
                     max_depth: float = 10.0) -> tuple[np.ndarray, list[str]]:
    """Images to train an image tokenizer on: uint8 ``(n, H, W, 3)`` and their kinds, cycling
    through :data:`TOKENIZER_KINDS` -- a scene's RGB image, then its dense targets drawn the way the
    dense tasks draw them: depth as grey ``depth / max_depth``, normals as ``(n + 1) / 2`` RGB,
    instances in distinct palette colours on black. Every 4 images share one scene, rendered at
    ``size`` from a seed stream separate from the train and val scenes."""
    from uio.tasks.colors import MAX_COLORS, paint, pick_colors

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    hw = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    cfg = SceneConfig(image_size=hw)
    out = np.zeros((n, hw[0], hw[1], 3), np.uint8)
    kinds: list[str] = []
    for i in range(n):
        kind = TOKENIZER_KINDS[i % len(TOKENIZER_KINDS)]
        if i % len(TOKENIZER_KINDS) == 0:
            scene = sample_scene(np.random.default_rng([seed, _TOKENIZER_STREAM, i // 4]), cfg)
            rng = np.random.default_rng([seed, _TOKENIZER_STREAM, i // 4, 1])
        if kind == "rgb":
            out[i] = scene.image
        elif kind == "depth":
            out[i] = np.round(np.clip(scene.depth / max_depth, 0, 1) * 255)[..., None]
        elif kind == "normals":
            out[i] = np.round((scene.normals + 1) / 2 * 255).clip(0, 255).astype(np.uint8)
        else:
            masks = [scene.mask(k) for k in range(len(scene.objects))][:MAX_COLORS]
            out[i] = paint(masks, pick_colors(len(masks), rng, train=True), hw)
        kinds.append(kind)
    return out, kinds


# ---- building shards ---------------------------------------------------------------------------
def _params(num_train_scenes: int, num_val_scenes: int, image_size: tuple[int, int], seed: int,
            tasks: tuple[str, ...]) -> dict[str, Any]:
    return {"version": BUILD_VERSION, "num_train_scenes": num_train_scenes, "num_val_scenes": num_val_scenes,
            "image_size": list(image_size), "seed": seed, "tasks": list(tasks)}


def read_info(root: str | Path | None = None) -> dict[str, Any] | None:
    """The completion marker of a toy-world build (None when there is no complete build)."""
    path = Path(root if root is not None else paths.toyworld_dir()) / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_toyworld(root: str | Path | None = None, num_train_scenes: int = DEFAULT_TRAIN_SCENES,
                   num_val_scenes: int = DEFAULT_VAL_SCENES, image_size: int | tuple[int, int] = 128,
                   seed: int = 0, progress: bool = True, num_workers: int | None = None,
                   tasks: Sequence[str] | None = None, force: bool = False, max_passages: int | None = None,
                   shard_size: int = 1000) -> dict[str, Any]:
    """Write the toy world's train and val shards for every task; returns the completion record
    (``root/toyworld.json``: parameters, example counts per task and split, build time).

    Skips the work when a complete build with the same parameters exists (unless ``force``).
    ``num_workers`` processes render scenes (default: the CPU count, at most 4); output does not
    depend on it. ``max_passages`` caps span-corruption passages per split (default: all).
    """
    root = Path(root if root is not None else paths.toyworld_dir())
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    tasks = _check_tasks(tasks)
    for name, n in (("num_train_scenes", num_train_scenes), ("num_val_scenes", num_val_scenes)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    SceneConfig(image_size=size)  # validates the size
    params = _params(num_train_scenes, num_val_scenes, size, seed, tasks)
    info = read_info(root)
    if info is not None and not force:
        if info.get("params") == params:
            log.info("toy world already built at %s", root)
            return info
        log.warning("toy world at %s was built with %s; rebuilding with %s", root, info.get("params"), params)
    root.mkdir(parents=True, exist_ok=True)
    (root / INFO_FILE).unlink(missing_ok=True)
    for task in ALL_TASKS:  # a previous build's datasets that this build will not rewrite
        if task not in tasks and (root / task / DATASET).is_dir():
            shutil.rmtree(root / task / DATASET)
    from uio.data.shards import ShardWriter

    t0 = time.time()
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    counts: dict[str, dict[str, int]] = {}
    scene_tasks = tuple(t for t in tasks if t != "span_corruption")
    total = num_train_scenes + num_val_scenes
    bar = _progress(total, progress)
    source = f"uio toy world v{BUILD_VERSION} (seed={seed}, image_size={list(size)})"
    pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(num_workers) \
        if num_workers > 1 else None
    try:
        for split, n_scenes in (("train", num_train_scenes), ("val", num_val_scenes)):
            writers = {t: ShardWriter(root, t, DATASET, split, maxcount=shard_size, source=source) for t in tasks}
            step = max(1, min(25, n_scenes // (4 * max(num_workers, 1)) or 1))
            jobs = [(seed, split, s, min(s + step, n_scenes), size, scene_tasks) for s in range(0, n_scenes, step)]
            results = pool.imap(_chunk_worker, jobs) if pool is not None else map(_chunk_worker, jobs)
            for chunk in results:
                for per_task in chunk:
                    for task, exs in per_task.items():
                        for members in exs:
                            writers[task].write_encoded(members)
                    bar.update(1)
            if "span_corruption" in tasks:
                for ex in _span_examples(split, max_passages):
                    writers["span_corruption"].write(ex)
            for task, w in writers.items():
                counts.setdefault(task, {})[split] = int(w.close()[split]["num_examples"])
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    info = {"params": params, "counts": counts, "seconds": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = root / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, root / INFO_FILE)
    log.info("built the toy world at %s in %.1f s: %d train / %d val examples", root, info["seconds"],
             sum(c.get("train", 0) for c in counts.values()), sum(c.get("val", 0) for c in counts.values()))
    return info


def ensure_toyworld(root: str | Path | None = None, **kw) -> Path:
    """The toy world's shard root, built first if it is missing or incomplete (see
    :func:`build_toyworld` for ``kw``; an existing complete build is reused as it is unless
    parameters are given explicitly and differ)."""
    root = Path(root if root is not None else paths.toyworld_dir())
    info = read_info(root)
    if info is None or (kw and _explicit_differs(info, kw)):
        build_toyworld(root, **kw)
    return root


def _explicit_differs(info: dict[str, Any], kw: dict[str, Any]) -> bool:
    p = info.get("params", {})
    keys = {"num_train_scenes": "num_train_scenes", "num_val_scenes": "num_val_scenes", "seed": "seed"}
    for k, pk in keys.items():
        if k in kw and kw[k] != p.get(pk):
            return True
    if "image_size" in kw:
        s = kw["image_size"]
        if list((s, s) if isinstance(s, int) else s) != p.get("image_size"):
            return True
    if "tasks" in kw and kw["tasks"] is not None and list(_check_tasks(kw["tasks"])) != p.get("tasks"):
        return True
    return False


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="building the toy world", unit="scene")


# ---- the picture -----------------------------------------------------------------------------------
def show_grid(out: str | Path = "toyworld_grid.png", num_samples: int = 4, seed: int = 0, split: str = "train",
              image_size: int = 128, start: int = 0) -> Path:
    """Draw ``num_samples`` scenes (the ones the shards hold) with their annotations: boxes and
    labels, COCO joints (green visible, red occluded), instance masks, depth and normals, plus a
    caption, a VQA pair and a referring expression. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    cols = ("image + boxes + joints", "instance masks", "depth (m)", "surface normals")
    fig, axes = plt.subplots(num_samples, 4, figsize=(16, 4.4 * num_samples), squeeze=False)
    for r in range(num_samples):
        idx = start + r
        scene = make_scene(seed, split, idx, image_size)
        exs = examples_for_scene(seed, split, idx, image_size,
                                 tasks=["image_captioning", "vqa", "referring_expression"])
        h, w = scene.image_hw
        ax = axes[r, 0]
        ax.imshow(scene.image, extent=(0, w, h, 0))
        for k, obj in enumerate(scene.objects):
            x1, y1, x2, y2 = scene.boxes[k]
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", lw=1.2))
            ax.text(x1, y1 - 1, obj.name, color="white", fontsize=7, va="bottom",
                    bbox=dict(facecolor="black", alpha=0.5, pad=0.5, lw=0))
            kp = scene.keypoints[k]
            if kp is not None:
                for a, b in COCO_SKELETON:
                    if kp[a, 2] > 0 and kp[b, 2] > 0:
                        ax.plot(kp[[a, b], 0], kp[[a, b], 1], "-", color="yellow", lw=1)
                for x, y, v in kp:
                    if v > 0:
                        ax.plot(x, y, "o", ms=3, color="lime" if v == 2 else "red")
        overlay = scene.image.astype(np.float32) / 255 * 0.35
        palette = plt.get_cmap("tab10")
        for k in range(len(scene.objects)):
            overlay[scene.mask(k)] = np.array(palette(k % 10)[:3]) * 0.85 + 0.15
        axes[r, 1].imshow(overlay, extent=(0, w, h, 0))
        im = axes[r, 2].imshow(scene.depth, cmap="magma_r", vmin=0, vmax=10, extent=(0, w, h, 0))
        fig.colorbar(im, ax=axes[r, 2], fraction=0.046, pad=0.02)
        axes[r, 3].imshow((scene.normals + 1) / 2, extent=(0, w, h, 0))
        cap = exs["image_captioning"][0]["captions"][0]
        q = exs["vqa"][0]
        ref = exs.get("referring_expression", [{}])[0]
        text = f"{cap}\nQ: {q['question']}  A: {q['answers'][0]}"
        if ref:
            text += f"\nref: {ref['expression']} -> {[round(v) for v in ref['box']]}"
        axes[r, 0].set_xlabel(text, fontsize=7, loc="left")
        for c in range(4):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=10)
        axes[r, 0].set_ylabel(f"{split} #{idx}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uio.data.toyworld", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="draw a grid of samples with their annotations")
    show.add_argument("--out", default="toyworld_grid.png")
    show.add_argument("--num", type=int, default=4, help="number of scenes (rows)")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--split", default="train", choices=list(SPLITS))
    show.add_argument("--image-size", type=int, default=128)
    show.add_argument("--start", type=int, default=0, help="index of the first scene")
    build = sub.add_parser("build", help="write the toy world's shards")
    build.add_argument("--root", default=None, help="default: $UIO_HOME/toyworld")
    build.add_argument("--train-scenes", type=int, default=DEFAULT_TRAIN_SCENES)
    build.add_argument("--val-scenes", type=int, default=DEFAULT_VAL_SCENES)
    build.add_argument("--image-size", type=int, default=128)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--workers", type=int, default=None)
    build.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "show":
        path = show_grid(args.out, args.num, args.seed, args.split, args.image_size, args.start)
        print(f"wrote {path}")
    else:
        info = build_toyworld(args.root, args.train_scenes, args.val_scenes, args.image_size, args.seed,
                              num_workers=args.workers, force=args.force)
        print(json.dumps({k: info[k] for k in ("params", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
