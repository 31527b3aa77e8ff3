"""WebDataset shards of raw examples: the writer, the reader, the manifest, corrupt-sample counting.

Layout (one dataset of one task)::

    <root>/<task>/<dataset>/<split>-000000.tar, <split>-000001.tar, ...
    <root>/<task>/<dataset>/manifest.json

``manifest.json``::

    {"task": "vqa", "dataset": "vqa_v2", "schema_version": 1, "source": "...", "created": "...",
     "train": {"num_examples": 1234, "shards": ["train-000000.tar", ...], "shard_sizes": [1000, 234]},
     "val":   {...}}

Each split is a top-level key (see :func:`manifest_splits`); shard names are relative to the
manifest's folder so a shard tree can be moved or synced to object storage unchanged.

A raw example (``docs/design.md`` contract 1) is serialised generically. Every array (or encoded
image ``bytes``) anywhere in the example is written as its own tar member and replaced in the JSON
by a reference ``{"__array__": "<member suffix>", "codec": ...}``:

============================  ==========================================================
value                         member
============================  ==========================================================
``image`` (uint8 H,W,3)       ``image.jpg`` (quality 95), or ``image.png`` when ``lossless``
encoded image ``bytes``       passed through unchanged (``.jpg``/``.png`` sniffed); decoded to RGB
``depth`` float (H,W) metres  16-bit PNG in units of ``scale`` metres (1 mm unless the range needs more)
``normals`` float (H,W,3)     16-bit RGB PNG, ``(n + 1) / 2 * 65535``
bool (H,W)                    1-bit PNG
uint8 (H,W[,3|4]), uint16     PNG
any other array               ``.npy``
============================  ==========================================================

Depth and normals are quantised (1 mm, 1.5e-5); ``exact_floats=True`` stores them as ``.npy``.
Lists of masks become ``masks.0.png``, ``masks.1.png``... Everything else goes to the ``json``
member. The reader returns the same dict (tuples come back as lists).

Reading: ``urls`` may be local paths, brace patterns (``train-{000000..000009}.tar``), ``pipe:``
commands (``pipe:aws s3 cp s3://b/train-000000.tar -``) or anything ``webdataset.gopen`` opens,
and a manifest path or dataset folder. Shards are split across ranks and DataLoader workers
(:func:`partition`); a corrupt sample (bad image bytes, bad JSON, a truncated tar) is skipped,
counted in ``stats`` and logged with a running count -- never fatal, never silent.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")
_META_KEYS = {"task", "dataset", "schema_version", "source", "created"}
_NAME_RE = re.compile(r"[^a-z0-9_-]+")

RawSample = dict[str, Any]  # {"__key__": str, "__url__": str, "<suffix>": bytes, ...}


class CorruptSample(ValueError):
    """A sample that cannot be decoded (bad image bytes, bad JSON, missing member)."""


# ================================================================================================
# 16-bit RGB PNG (Pillow cannot write or read 16-bit colour PNGs)
# ================================================================================================
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")


def encode_png16_rgb(arr: np.ndarray) -> bytes:
    """uint16 (H, W, 3) -> 16-bit RGB PNG bytes (filter "Up" on every row)."""
    if arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"encode_png16_rgb expects uint16 (H, W, 3), got {arr.dtype} {arr.shape}")
    h, w, _ = arr.shape
    rows = np.ascontiguousarray(arr.astype(">u2")).view(np.uint8).reshape(h, w * 6)  # (H, 6W) big-endian bytes
    up = rows.copy()
    up[1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps mod 256, as PNG filter 2 wants
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + \
        _png_chunk(b"IEND", b"")


def decode_png16_rgb(data: bytes) -> np.ndarray:
    """16-bit RGB PNG bytes -> uint16 (H, W, 3). Handles all five PNG row filters."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise CorruptSample("not a PNG file")
    pos, idat, ihdr = 8, [], None
    while pos + 8 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if len(body) != n:
            raise CorruptSample("truncated PNG chunk")
        if tag == b"IHDR":
            ihdr = body
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
        pos += 12 + n
    if ihdr is None:
        raise CorruptSample("PNG without IHDR")
    w, h = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    if ihdr[8] != 16 or ihdr[9] != 2 or ihdr[12] != 0:
        raise CorruptSample(f"expected a non-interlaced 16-bit RGB PNG, got depth {ihdr[8]} colour type {ihdr[9]}")
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as e:
        raise CorruptSample(f"bad PNG data: {e}") from e
    stride, bpp = w * 6, 6
    if raw.size != h * (stride + 1):
        raise CorruptSample(f"PNG data has {raw.size} bytes, expected {h * (stride + 1)}")
    raw = raw.reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        ftype, line = raw[y, 0], raw[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:  # Sub: cumulative sum per byte lane of bpp
            cur = np.cumsum(line.reshape(w, bpp).astype(np.int64), axis=0).astype(np.uint8).reshape(-1)
        elif ftype == 2:
            cur = line + prev
        elif ftype in (3, 4):  # Average / Paeth: sequential along the row
            cur = np.zeros(stride, np.int64)
            line_i, prev_i = line.astype(np.int64), prev.astype(np.int64)
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev_i[x]
                if ftype == 3:
                    cur[x] = (line_i[x] + (a + b) // 2) & 255
                else:
                    c = prev_i[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur[x] = (line_i[x] + pred) & 255
            cur = cur.astype(np.uint8)
        else:
            raise CorruptSample(f"unknown PNG filter type {ftype}")
        out[y] = cur
        prev = cur
    return out.view(">u2").reshape(h, w, 3).astype(np.uint16)


# ================================================================================================
# Encoding a raw example
# ================================================================================================
def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _encode_array(name: str, arr: np.ndarray, is_image: bool, lossless: bool, exact_floats: bool,
                  jpeg_quality: int) -> tuple[str, bytes, dict[str, Any]]:
    """One array -> (member extension, bytes, reference fields)."""
    leaf = name.rsplit(".", 1)[-1]
    if is_image:
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"'{name}' must be a uint8 (H, W, 3) RGB array, got {arr.dtype} {arr.shape}")
        img = Image.fromarray(arr)
        if lossless:
            return "png", _png(img, compress_level=1), {"codec": "png", "rgb": True}
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg_quality)
        return "jpg", buf.getvalue(), {"codec": "jpg", "rgb": True}
    if leaf == "depth" and arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating) and not exact_floats:
        d = np.where(np.isfinite(arr), arr, 0.0).astype(np.float64)
        if (d < 0).any():
            raise ValueError(f"'{name}' has negative depths (min {d.min():.4g}); expected metres >= 0, 0 = invalid")
        scale = max(0.001, float(d.max()) / 65535.0)
        q = np.clip(np.round(d / scale), 0, 65535).astype(np.uint16)
        return "png", _png(Image.fromarray(q)), {"codec": "depth16", "scale": scale}
    if leaf == "normals" and arr.ndim == 3 and arr.shape[2] == 3 and np.issubdtype(arr.dtype, np.floating) \
            and not exact_floats:
        n = np.clip(np.nan_to_num(arr.astype(np.float64)), -1.0, 1.0)
        q = np.round((n + 1.0) * 0.5 * 65535.0).astype(np.uint16)
        return "png", encode_png16_rgb(q), {"codec": "normals16"}
    if arr.dtype == np.bool_ and arr.ndim == 2 and arr.size:
        return "png", _png(Image.fromarray(arr)), {"codec": "png"}
    if arr.dtype == np.uint8 and arr.size and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        return "png", _png(Image.fromarray(arr), compress_level=1), {"codec": "png"}
    if arr.dtype == np.uint16 and arr.ndim == 2 and arr.size:
        return "png", _png(Image.fromarray(arr)), {"codec": "png"}
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return "npy", buf.getvalue(), {"codec": "npy"}


def encode_example(example: dict[str, Any], lossless: bool = False, exact_floats: bool = False,
                   jpeg_quality: int = 95) -> dict[str, bytes]:
    """A raw example -> ``{member suffix: bytes}`` (``json`` plus one member per array)."""
    if not isinstance(example, dict):
        raise TypeError(f"a raw example must be a dict, got {type(example).__name__}")
    members: dict[str, bytes] = {}

    def member_name(path: list[str]) -> str:
        base = ".".join(_NAME_RE.sub("_", p.lower()) or "_" for p in path) or "value"
        name, k = base, 1
        while any(m == name or m.startswith(name + ".") for m in members):
            name, k = f"{base}_{k}", k + 1
        return name

    def walk(value: Any, path: list[str]) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(f"example key {k!r} at {'.'.join(path) or '<root>'} must be a str")
                out[k] = walk(v, path + [k])
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v, path + [str(i)]) for i, v in enumerate(value)]
        if isinstance(value, (bytes, bytearray)):
            fmt = _sniff(bytes(value))
            name = member_name(path)
            if fmt is None:
                members[name + ".bin"] = bytes(value)
                return {"__array__": name + ".bin", "codec": "bin"}
            members[f"{name}.{fmt}"] = bytes(value)
            return {"__array__": f"{name}.{fmt}", "codec": fmt, "rgb": path == ["image"]}
        if isinstance(value, np.ndarray):
            name = member_name(path)
            ext, data, ref = _encode_array(".".join(path), value, path == ["image"], lossless, exact_floats,
                                           jpeg_quality)
            members[f"{name}.{ext}"] = data
            return {"__array__": f"{name}.{ext}", **ref}
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (str, int, float, bool)):
            if isinstance(value, float) and not np.isfinite(value):
                raise ValueError(f"'{'.'.join(path)}' is {value}; JSON needs finite numbers")
            return value
        raise TypeError(f"cannot serialise '{'.'.join(path)}' of type {type(value).__name__}; "
                        "expected arrays, bytes, str, numbers, lists or dicts")

    tree = walk(example, [])
    members["json"] = json.dumps(tree, separators=(",", ":")).encode()
    return members


# ================================================================================================
# Decoding
# ================================================================================================
def _decode_member(data: bytes, ref: dict[str, Any]) -> np.ndarray:
    codec = ref.get("codec")
    try:
        if codec == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
        if codec == "normals16":
            q = decode_png16_rgb(data)
            return (q.astype(np.float32) / 65535.0 * 2.0 - 1.0).astype(np.float32)
        if codec == "bin":
            return data  # type: ignore[return-value]
        if codec not in ("png", "jpg", "depth16"):
            raise CorruptSample(f"unknown codec {codec!r}")
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if ref.get("rgb"):
                img = img.convert("RGB")
            arr = np.array(img)  # writable (np.asarray of a PIL image is read-only)
        if codec == "depth16":
            return (arr.astype(np.float64) * float(ref["scale"])).astype(np.float32)
        return arr
    except CorruptSample:
        raise
    except Exception as e:  # PIL/numpy errors on bad bytes
        raise CorruptSample(f"cannot decode {ref.get('__array__')} ({codec}): {type(e).__name__}: {e}") from e


def decode_sample(raw: RawSample) -> dict[str, Any]:
    """``{suffix: bytes}`` (as read from a shard) -> the raw example that was written."""
    if "json" not in raw:
        raise CorruptSample(f"sample {raw.get('__key__')!r} has no json member (members: "
                            f"{sorted(k for k in raw if not k.startswith('__'))})")
    try:
        tree = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSample(f"bad json: {e}") from e
    if not isinstance(tree, dict):
        raise CorruptSample(f"json member is a {type(tree).__name__}, expected an object")

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if "__array__" in value:
                member = value["__array__"]
                if member not in raw:
                    raise CorruptSample(f"member {member!r} referenced by the json is missing")
                return _decode_member(raw[member], value)
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(tree)


# ================================================================================================
# Manifest
# ================================================================================================
def dataset_dir(root: str | Path, task: str, dataset: str) -> Path:
    for what, v in (("task", task), ("dataset", dataset)):
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"{what} must be a plain folder name, got {v!r}")
    return Path(root) / task / dataset


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` (a file or its dataset folder); checks the schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}")
    m = json.loads(path.read_text())
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {m.get('schema_version')!r}, this reader expects {SCHEMA_VERSION}")
    return m


def manifest_splits(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{split: {"num_examples", "shards", "shard_sizes"}}`` from a manifest."""
    return {k: v for k, v in manifest.items() if k not in _META_KEYS and isinstance(v, dict) and "shards" in v}


def manifest_urls(path: str | Path, split: str) -> list[str]:
    """Absolute shard paths of one split of a manifest (file or dataset folder)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    splits = manifest_splits(load_manifest(path))
    if split not in splits:
        raise KeyError(f"split {split!r} not in {folder / MANIFEST}; it has {sorted(splits)}")
    return [str(folder / s) for s in splits[split]["shards"]]


def discover(root: str | Path, split: str | None = None, tasks: Sequence[str] | None = None
             ) -> list[dict[str, Any]]:
    """Every ``<root>/<task>/<dataset>/manifest.json`` (optionally only ``tasks`` and datasets having
    ``split``), as ``{"task", "dataset", "dir", "manifest"}`` sorted by (task, dataset)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"shard root {root} does not exist")
    found = []
    for mpath in sorted(root.glob(f"*/*/{MANIFEST}")):
        m = load_manifest(mpath)
        task, dataset = mpath.parent.parent.name, mpath.parent.name
        if tasks is not None and task not in tasks:
            continue
        if split is not None and split not in manifest_splits(m):
            continue
        found.append({"task": task, "dataset": dataset, "dir": mpath.parent, "manifest": m})
    return found


def _update_manifest(folder: Path, task: str, dataset: str, split: str, shards: list[str], sizes: list[int],
                     source: str | None) -> dict[str, Any]:
    path = folder / MANIFEST
    m = load_manifest(path) if path.is_file() else {}
    m.update({"task": task, "dataset": dataset, "schema_version": SCHEMA_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if source is not None or "source" not in m:
        m["source"] = source
    m[split] = {"num_examples": int(sum(sizes)), "shards": shards, "shard_sizes": sizes}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    os.replace(tmp, path)
    return m


# ================================================================================================
# Writer
# ================================================================================================
class ShardWriter:
    """Writes raw examples of one (task, dataset, split) into numbered tar shards + the manifest.

    Existing shards of the same split are replaced. Each shard is written to ``.tmp`` and renamed
    when complete, so readers never see a half-written shard. Use as a context manager or call
    :meth:`close` (which writes the manifest and returns it).
    """

    def __init__(self, root: str | Path, task: str, dataset: str, split: str, maxcount: int = 1000,
                 maxsize: int = 1 << 30, lossless: bool = False, exact_floats: bool = False,
                 jpeg_quality: int = 95, source: str | None = None):
        if split in _META_KEYS or not split or "/" in split or "-" in split:
            raise ValueError(f"split must be a plain name without '-' or '/', not one of {sorted(_META_KEYS)}; "
                             f"got {split!r}")
        if maxcount < 1 or maxsize < 1:
            raise ValueError(f"maxcount and maxsize must be >= 1, got {maxcount}, {maxsize}")
        self.folder = dataset_dir(root, task, dataset)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.task, self.dataset, self.split, self.source = task, dataset, split, source
        self.maxcount, self.maxsize = maxcount, maxsize
        self.encode_kw = dict(lossless=lossless, exact_floats=exact_floats, jpeg_quality=jpeg_quality)
        for old in self.folder.glob(f"{split}-*.tar"):
            if SHARD_RE.match(old.name) and SHARD_RE.match(old.name)["split"] == split:
                old.unlink()
        self.shards: list[str] = []
        self.sizes: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._bytes = 0
        self.count = 0
        self.manifest: dict[str, Any] | None = None

    def _roll(self) -> None:
        self._finish_shard()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.folder / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w")
        self.shards.append(name)
        self.sizes.append(0)
        self._bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self.folder / self.shards[-1])
            self._tar = None

    def write(self, example: dict[str, Any]) -> None:
        """Serialise one raw example (see the module docstring) into the current shard."""
        if self.manifest is not None:
            raise RuntimeError("ShardWriter is closed")
        self.write_encoded(encode_example(example, **self.encode_kw))

    def write_encoded(self, members: Mapping[str, bytes]) -> None:
        """Store one example that :func:`encode_example` already serialised (e.g. in a worker
        process, so that the writing process only adds tar members); the same bytes as
        :meth:`write` of the raw example with this writer's encoding options."""
        if self.manifest is not None:
            raise RuntimeError("ShardWriter is closed")
        if not members or "json" not in members or not all(isinstance(v, (bytes, bytearray)) for v in members.values()):
            raise ValueError("write_encoded takes encode_example's output: {member suffix: bytes} with a 'json' member")
        size = sum(len(v) for v in members.values())
        if self._tar is None or self.sizes[-1] >= self.maxcount or (self.sizes[-1] and self._bytes + size > self.maxsize):
            self._roll()
        key = f"{self.count:09d}"
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._bytes += size
        self.sizes[-1] += 1
        self.count += 1

    def close(self) -> dict[str, Any]:
        if self.manifest is None:
            self._finish_shard()
            self.manifest = _update_manifest(self.folder, self.task, self.dataset, self.split, self.shards,
                                             self.sizes, self.source)
        return self.manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


def write_examples(examples: Iterable[dict[str, Any]], root: str | Path, task: str, dataset: str, split: str,
                   maxcount: int = 1000, **kw) -> dict[str, Any]:
    """Write all ``examples`` into ``<root>/<task>/<dataset>/<split>-NNNNNN.tar``; returns the manifest."""
    with ShardWriter(root, task, dataset, split, maxcount=maxcount, **kw) as w:
        for ex in examples:
            w.write(ex)
    return w.manifest  # type: ignore[return-value]


# ================================================================================================
# Reader
# ================================================================================================
@dataclass
class ReadStats:
    """Counters of one reader (per process: each DataLoader worker has its own)."""

    samples: int = 0
    corrupt: int = 0
    corrupt_shards: int = 0
    reasons: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "corrupt": self.corrupt, "corrupt_shards": self.corrupt_shards,
                "reasons": dict(self.reasons)}


def _log_corrupt(stats: ReadStats, what: str, reason: str) -> None:
    n = stats.corrupt + stats.corrupt_shards
    if n <= 10 or n & (n - 1) == 0:  # every one of the first 10, then at powers of two
        log.warning("skipped corrupt %s (%s); %d corrupt samples and %d corrupt shards so far",
                    what, reason, stats.corrupt, stats.corrupt_shards)


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard urls -> a flat list. Strings are split on ``::`` and brace-expanded (webdataset's rules,
    also inside ``pipe:`` commands: ``pipe:curl -s https://h/train-{000000..000009}.tar`` is ten
    commands); ``<dataset dir>/manifest.json#<split>`` becomes that split's shards."""
    if isinstance(urls, (str, Path)):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        u = str(u)
        if not u.startswith("pipe:") and "#" in u and Path(u.split("#")[0]).name == MANIFEST:
            path, split = u.rsplit("#", 1)
            out.extend(manifest_urls(path, split))
            continue
        out.extend(wds.shardlists.expand_urls(u))
    if not out:
        raise ValueError("no shard urls given")
    return out


def worker_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)``: torch.distributed, else $RANK/$WORLD_SIZE, and the
    DataLoader worker (explicit ``rank``/``world_size`` win)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, ws = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, ws = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = ws if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world_size, worker, num_workers


def partition(num_shards: int, part: int, num_parts: int) -> tuple[list[int], int, int]:
    """Which shards part ``part`` of ``num_parts`` reads, and its sample stride/offset.

    With at least as many shards as parts, shard ``i`` goes to part ``i % num_parts`` (every
    sample exactly once). With fewer shards every part reads all shards and keeps every
    ``num_parts``-th sample, offset by ``part`` (still exactly once). Returns
    ``(shard indices, sample stride, sample offset)``.
    """
    if num_shards >= num_parts:
        return list(range(part, num_shards, num_parts)), 1, 0
    return list(range(num_shards)), num_parts, part


class _TailReader:
    """File wrapper that counts bytes and keeps the last ``keep`` of them (end-of-archive check)."""

    def __init__(self, f, keep: int = 1 << 16):
        self.f, self.keep, self.pos, self.tail, self.tail_start = f, keep, 0, bytearray(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.keep:
            cut = len(self.tail) - self.keep
            del self.tail[:cut]
            self.tail_start += cut
        return data

    def block(self, offset: int, size: int) -> bytes:
        while self.pos < offset + size and self.read(1 << 16):
            pass
        lo = offset - self.tail_start
        return bytes(self.tail[lo:lo + size]) if lo >= 0 else b""


def iter_tar(url: str, stats: ReadStats) -> Iterator[RawSample]:
    """Raw samples ``{"__key__", "__url__", suffix: bytes}`` of one shard, grouped by key.

    A shard that cannot be opened, is truncated or lacks the end-of-archive marker is counted in
    ``stats.corrupt_shards`` and logged (the complete samples read before the damage are kept)."""
    current: RawSample | None = None
    try:
        with wds.gopen(url, "rb") as stream:
            reader = _TailReader(stream)
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    name = info.name.rsplit("/", 1)[-1]
                    key, dot, suffix = name.partition(".")
                    if not dot:
                        continue
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[suffix.lower()] = data
                # tarfile ends quietly on a truncated or garbled header: check for the two zero blocks
                if getattr(tar.fileobj, "comptype", "tar") == "tar":
                    end = reader.block(tar.offset, 2 * tarfile.BLOCKSIZE)
                    if len(end) < 2 * tarfile.BLOCKSIZE or any(end):
                        raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset} (truncated shard)")
    except Exception as e:  # unreadable / truncated shard: keep what was read, count it
        stats.corrupt_shards += 1
        stats.reasons[f"shard: {type(e).__name__}"] += 1
        _log_corrupt(stats, f"shard {url}", f"{type(e).__name__}: {e}")
        if current is not None and "json" in current:
            yield current  # its members before the damage are complete; decode decides
        current = None
    if current is not None:
        yield current


def iter_raw(urls: Sequence[str], part: int, num_parts: int, stats: ReadStats,
             shard_order: Sequence[int] | None = None) -> Iterator[RawSample]:
    """Undecoded samples of part ``part`` of ``num_parts`` (see :func:`partition`), shards taken in
    ``shard_order`` (indices into ``urls``; default: their order)."""
    shard_ids, stride, offset = partition(len(urls), part, num_parts)
    if shard_order is not None:
        mine = set(shard_ids)
        shard_ids = [i for i in shard_order if i in mine]
    n = 0
    for i in shard_ids:
        for raw in iter_tar(urls[i], stats):
            if n % stride == offset:
                yield raw
            n += 1


def decode_or_count(raw: RawSample, stats: ReadStats) -> dict[str, Any] | None:
    """Decode one raw sample; on failure count and log it and return None."""
    try:
        ex = decode_sample(raw)
    except CorruptSample as e:
        stats.corrupt += 1
        stats.reasons[str(e).split(":")[0][:60]] += 1
        _log_corrupt(stats, f"sample {raw.get('__key__')} in {raw.get('__url__')}", str(e))
        return None
    stats.samples += 1
    return ex


class ShardSource(IterableDataset):
    """An iterable (usable as a ``torch.utils.data.IterableDataset``) of raw examples from shards.

    Shards are split by rank and by DataLoader worker (:func:`partition`); ``rank``/``world_size``
    default to torch.distributed or $RANK/$WORLD_SIZE. ``shuffle_shards`` (a seed) permutes the
    shard order. Corrupt samples are skipped and counted in ``stats`` (per process).
    """

    def __init__(self, urls: str | Path | Sequence[str | Path], rank: int | None = None,
                 world_size: int | None = None, shuffle_shards: int | None = None, with_key: bool = False):
        self.urls = expand_urls(urls)
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards = shuffle_shards
        self.with_key = with_key
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, num_workers = worker_info(self.rank, self.world_size)
        order = None
        if self.shuffle_shards is not None:
            order = np.random.default_rng(self.shuffle_shards).permutation(len(self.urls)).tolist()
        part, num_parts = rank * num_workers + worker, world * num_workers
        if len(self.urls) < num_parts:
            log.debug("%d shards < %d readers: splitting by sample", len(self.urls), num_parts)
        for raw in iter_raw(self.urls, part, num_parts, self.stats, order):
            ex = decode_or_count(raw, self.stats)
            if ex is not None:
                if self.with_key:
                    ex["__key__"], ex["__url__"] = raw["__key__"], raw["__url__"]
                yield ex


def read_examples(urls: str | Path | Sequence[str | Path], **kw) -> list[dict[str, Any]]:
    """All examples of ``urls`` in order (single process; ``kw`` as :class:`ShardSource`)."""
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return list(ShardSource(urls, **kw))
