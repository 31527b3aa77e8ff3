"""CC3M / CC12M image-text WebDataset shards -> ``image_captioning`` and ``image_generation`` shards.

Input: the tar shards that image-text downloaders (img2dataset and the like) write from the
``Train_GCC-training.tsv`` (CC3M: ``caption<TAB>url``) or ``cc12m.tsv`` (``url<TAB>caption``) lists::

    <input>/00000.tar: 000000000.jpg, 000000000.txt (the caption), 000000000.json ({"caption", "url", "key",
                       "status", "width", "height", ...}), 000000001.jpg, ...

``--input`` takes shard paths, brace patterns or a folder (all ``*.tar`` inside). Samples without an
image or caption are skipped and counted; unreadable shards are reported. Images are copied as
their original bytes.

    python data_recipes/conceptual_captions.py --input /data/cc3m/train --dataset cc3m --split train --out shards/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import RecipeWriter, parser, progress, setup_logging  # noqa: E402
from uio.data.shards import ReadStats, expand_urls, iter_tar  # noqa: E402

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def input_urls(inputs: list[str]) -> list[str]:
    urls = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            urls += [str(t) for t in sorted(p.glob("*.tar"))]
        else:
            urls += expand_urls(item)
    if not urls:
        raise FileNotFoundError(f"no tar shards in {inputs}")
    return urls


def build(inputs: list[str], out: str | Path, dataset: str = "cc3m", split: str = "train", maxcount: int = 1000,
          max_examples: int | None = None) -> dict[str, int]:
    w = RecipeWriter(out, dataset, f"{dataset} image-text shards", maxcount, max_examples)
    stats = ReadStats()
    for url in input_urls(inputs):
        for raw in progress(iter_tar(url, stats), f"{dataset} {Path(url).name}"):
            img_key = next((k for k in IMAGE_KEYS if k in raw), None)
            caption = raw["txt"].decode("utf-8", "replace").strip() if "txt" in raw else ""
            meta = {}
            if "json" in raw:
                try:
                    meta = json.loads(raw["json"])
                except ValueError:
                    meta = {}
                caption = caption or str(meta.get("caption") or "").strip()
            if img_key is None or not caption:
                w.skip("sample without image or caption")
                continue
            base = {"id": f"{dataset}:{meta.get('key', raw['__key__'])}", "image": raw[img_key]}
            if meta.get("url"):
                base["url"] = str(meta["url"])
            w.write("image_captioning", split, {**base, "captions": [caption]})
            w.write("image_generation", split, {**base, "caption": caption})
            if w.full("image_captioning", split) and w.full("image_generation", split):
                return _close(w, stats)
    return _close(w, stats)


def _close(w: RecipeWriter, stats: ReadStats) -> dict[str, int]:
    if stats.corrupt_shards:
        w.skip(f"{stats.corrupt_shards} unreadable or truncated input shard(s)")
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="input tar shards, brace patterns or folders")
    p.add_argument("--dataset", default="cc3m", help="cc3m or cc12m (the name in the shard tree)")
    p.add_argument("--split", default="train", help="shard split to write (train / val)")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.input, a.out, a.dataset, a.split, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
