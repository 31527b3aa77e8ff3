"""What every recipe shares: one shard writer per (task, split), image bytes, masks, CLI plumbing.

Recipes turn a public dataset in its standard on-disk layout into raw examples (docs/design.md
contract 1) and write them with :class:`uio.data.shards.ShardWriter` under
``<out>/<task>/<dataset>/<split>-NNNNNN.tar``. Source images are stored as their original encoded
bytes (no re-encoding); annotations become JSON, masks 1-bit PNGs, depth 16-bit PNGs.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import pickle
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uio.data.shards import ShardWriter

log = logging.getLogger("uio.recipes")


class RecipeWriter:
    """Lazily opened :class:`ShardWriter` per (task, split) of one dataset; counts what it wrote."""

    def __init__(self, out: str | Path, dataset: str, source: str, maxcount: int = 1000, max_examples: int | None = None,
                 lossless: bool = False):
        self.out, self.dataset, self.source = Path(out), dataset, source
        self.maxcount, self.max_examples, self.lossless = maxcount, max_examples, lossless
        self.writers: dict[tuple[str, str], ShardWriter] = {}
        self.skipped: Counter = Counter()

    def full(self, task: str, split: str) -> bool:
        w = self.writers.get((task, split))
        return self.max_examples is not None and w is not None and w.count >= self.max_examples

    def write(self, task: str, split: str, example: dict[str, Any]) -> None:
        if self.full(task, split):
            return
        key = (task, split)
        if key not in self.writers:
            self.writers[key] = ShardWriter(self.out, task, self.dataset, split, maxcount=self.maxcount,
                                            lossless=self.lossless, source=self.source)
        example.setdefault("dataset", self.dataset)
        self.writers[key].write(example)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def close(self) -> dict[str, int]:
        """Close every writer (writing manifests); returns ``{"task/split": examples}``."""
        counts = {}
        for (task, split), w in sorted(self.writers.items()):
            w.close()
            counts[f"{task}/{split}"] = w.count
        for k, v in sorted(counts.items()):
            log.info("%s/%s: %d examples", k.split("/")[0], self.dataset + "/" + k.split("/")[1], v)
        for reason, n in sorted(self.skipped.items()):
            log.warning("skipped %d (%s)", n, reason)
        return counts


# ---- files ---------------------------------------------------------------------------------------
def image_bytes(path: str | Path) -> bytes:
    """An image file's bytes, unchanged when JPEG/PNG; other formats are converted to PNG."""
    data = Path(path).read_bytes()
    if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()


def image_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) from the image header (no full decode)."""
    with Image.open(path) as img:
        return img.height, img.width


def open_text(path: str | Path):
    """Open a text file for reading, transparently gunzipping ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def require(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}")
    return path


def stable_fraction(key: str) -> float:
    """A deterministic number in [0, 1) from a key (hash-based held-out splits)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8


def xywh_to_xyxy(b: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def clip_box(box: Sequence[float], hw: tuple[int, int]) -> list[float] | None:
    """Clip ``[x1, y1, x2, y2]`` to the image; None if nothing is left."""
    h, w = hw
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
    y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return [x1, y1, x2, y2]


def segmentation_mask(segmentation: Any, hw: tuple[int, int]) -> np.ndarray:
    """COCO polygons / RLE (compressed or not) -> bool (H, W)."""
    from pycocotools import mask as mask_utils

    h, w = hw
    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
    elif isinstance(segmentation, dict):
        rle = segmentation
    else:
        raise ValueError(f"unknown COCO segmentation {type(segmentation).__name__}; expected polygons or RLE")
    return mask_utils.decode(rle).astype(bool)


class _BuiltinsOnly(pickle.Unpickler):
    """Unpickler that refuses every global: the REFER ``refs(*).p`` files are plain lists of dicts,
    so anything else is not that file (and would run code)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only plain data is allowed here")


def load_plain_pickle(path: str | Path) -> Any:
    """Load a pickle of builtins only (Python 2 pickles too, strings as latin-1)."""
    with open(path, "rb") as f:
        return _BuiltinsOnly(f, encoding="latin1").load()


# ---- CLI -----------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="shard root: writes <out>/<task>/<dataset>/<split>-NNNNNN.tar")
    p.add_argument("--maxcount", type=int, default=1000, help="examples per shard")
    p.add_argument("--max-examples", type=int, default=None, help="stop each task/split after this many (debugging)")
    return p


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, total=total, unit="ex", mininterval=2.0, disable=None)
    except ImportError:  # pragma: no cover
        return items
