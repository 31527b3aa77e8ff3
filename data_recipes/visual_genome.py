"""Visual Genome -> region captioning, relationship, object localization and VQA shards.

Expected layout (the official v1.2/v1.4 download)::

    <root>/image_data.json             [{image_id, url, width, height, coco_id, flickr_id}]
    <root>/region_descriptions.json    [{"id": image_id, "regions": [{region_id, image_id, phrase, x, y, width, height}]}]
    <root>/relationships.json          [{"image_id", "relationships": [{predicate, subject: {x, y, w, h, name|names}, object: {...}}]}]
    <root>/objects.json                [{"image_id"|"id", "objects": [{object_id, x, y, w, h, names|name}]}]   (optional)
    <root>/question_answers.json       [{"id": image_id, "qas": [{question, answer, qa_id}]}]                 (optional)
    <root>/VG_100K/<image_id>.jpg, <root>/VG_100K_2/<image_id>.jpg   (folder as in the image's url)

Visual Genome has no official split: a stable hash of the image id puts ``--val-fraction`` of the
images into ``val``. One image has ~50 regions and ~20 relationships; ``--max-per-image`` (a
deterministic choice) keeps shards from repeating an image's bytes dozens of times.

    python data_recipes/visual_genome.py --root /data/vg --out shards/
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.common import (  # noqa: E402
    RecipeWriter, clip_box, image_bytes, parser, progress, require, setup_logging, stable_fraction,
)


def _box(o: dict[str, Any]) -> list[float]:
    w = o["w"] if "w" in o else o["width"]
    h = o["h"] if "h" in o else o["height"]
    return [float(o["x"]), float(o["y"]), float(o["x"]) + float(w), float(o["y"]) + float(h)]


def _name(o: dict[str, Any]) -> str:
    if "names" in o and o["names"]:
        return str(o["names"][0]).strip()
    return str(o.get("name", "")).strip()


def _load_list(path: Path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, list) else [data]  # some tools save a single entry unwrapped


def _pick(items: list, k: int, key: str) -> list:
    """A deterministic subset of at most ``k`` items (k < 0: all)."""
    if k < 0 or len(items) <= k:
        return items
    order = sorted(range(len(items)), key=lambda i: stable_fraction(f"{key}:{i}"))
    return [items[i] for i in sorted(order[:k])]


class _Images:
    def __init__(self, root: Path, meta: list[dict], val_fraction: float):
        self.root, self.val_fraction = root, val_fraction
        self.meta = {int(m["image_id"] if "image_id" in m else m["id"]): m for m in meta}
        self._cache: tuple[int, bytes] | None = None

    def path(self, image_id: int) -> Path | None:
        m = self.meta.get(image_id)
        candidates = []
        if m is not None and m.get("url"):
            parts = m["url"].rstrip("/").split("/")
            candidates.append(self.root / parts[-2] / parts[-1])
        candidates += [self.root / d / f"{image_id}.jpg" for d in ("VG_100K", "VG_100K_2")]
        return next((c for c in candidates if c.exists()), None)

    def hw(self, image_id: int) -> tuple[int, int] | None:
        m = self.meta.get(image_id)
        return (int(m["height"]), int(m["width"])) if m else None

    def bytes(self, image_id: int) -> bytes:
        if self._cache is None or self._cache[0] != image_id:
            self._cache = (image_id, image_bytes(self.path(image_id)))
        return self._cache[1]

    def split(self, image_id: int) -> str:
        return "val" if stable_fraction(f"vg:{image_id}") < self.val_fraction else "train"


def regions(w: RecipeWriter, imgs: _Images, path: Path, k: int) -> None:
    for entry in progress(_load_list(path), "regions"):
        image_id = int(entry.get("id", entry.get("image_id")))
        hw, p = imgs.hw(image_id), imgs.path(image_id)
        if hw is None or p is None:
            w.skip("region image missing")
            continue
        for r in _pick(entry["regions"], k, f"r{image_id}"):
            box, phrase = clip_box(_box(r), hw), str(r["phrase"]).strip()
            if box is None or not phrase:
                w.skip("empty region box or phrase")
                continue
            w.write("region_captioning", imgs.split(image_id), {
                "id": f"vg:{image_id}:{r['region_id']}", "image_id": image_id, "image": imgs.bytes(image_id),
                "box": box, "caption": phrase})


def relationships(w: RecipeWriter, imgs: _Images, path: Path, k: int) -> None:
    for entry in progress(_load_list(path), "relationships"):
        image_id = int(entry.get("image_id", entry.get("id")))
        hw, p = imgs.hw(image_id), imgs.path(image_id)
        if hw is None or p is None:
            w.skip("relationship image missing")
            continue
        for r in _pick(entry["relationships"], k, f"rel{image_id}"):
            sb, ob = clip_box(_box(r["subject"]), hw), clip_box(_box(r["object"]), hw)
            subj, obj, pred = _name(r["subject"]), _name(r["object"]), str(r["predicate"]).strip().lower()
            if sb is None or ob is None or not (subj and obj and pred):
                w.skip("incomplete relationship")
                continue
            w.write("relationship", imgs.split(image_id), {
                "id": f"vg:{image_id}:{r.get('relationship_id', '')}", "image_id": image_id,
                "image": imgs.bytes(image_id), "subject_box": sb, "object_box": ob, "subject": subj, "object": obj,
                "predicate": pred})


def objects(w: RecipeWriter, imgs: _Images, path: Path, k: int) -> None:
    for entry in progress(_load_list(path), "objects"):
        image_id = int(entry.get("image_id", entry.get("id")))
        hw, p = imgs.hw(image_id), imgs.path(image_id)
        if hw is None or p is None:
            w.skip("object image missing")
            continue
        by_name: dict[str, list] = defaultdict(list)
        for o in entry["objects"]:
            box, name = clip_box(_box(o), hw), _name(o).lower()
            if box is not None and name:
                by_name[name].append(box)
        for name in _pick(sorted(by_name), k, f"obj{image_id}"):
            w.write("object_localization", imgs.split(image_id), {
                "id": f"vg:{image_id}:{name}", "image_id": image_id, "image": imgs.bytes(image_id), "label": name,
                "boxes": by_name[name]})


def question_answers(w: RecipeWriter, imgs: _Images, path: Path) -> None:
    for entry in progress(_load_list(path), "qa"):
        for qa in entry["qas"]:
            image_id = int(qa.get("image_id", entry.get("id")))
            if imgs.path(image_id) is None:
                w.skip("qa image missing")
                continue
            answer = str(qa["answer"]).strip().rstrip(".").lower()
            w.write("vqa", imgs.split(image_id), {
                "id": f"vg:{image_id}:{qa['qa_id']}", "image_id": image_id, "image": imgs.bytes(image_id),
                "question": str(qa["question"]).strip(), "answers": [answer]})


def build(root: str | Path, out: str | Path, val_fraction: float = 0.01, max_per_image: int = 5,
          maxcount: int = 1000, max_examples: int | None = None) -> dict[str, int]:
    root = require(root, "Visual Genome root")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    imgs = _Images(root, _load_list(require(root / "image_data.json", "image_data.json")), val_fraction)
    w = RecipeWriter(out, "visual_genome", f"Visual Genome ({root})", maxcount, max_examples)
    parts = {"region_descriptions.json": lambda p: regions(w, imgs, p, max_per_image),
             "relationships.json": lambda p: relationships(w, imgs, p, max_per_image),
             "objects.json": lambda p: objects(w, imgs, p, max_per_image),
             "question_answers.json": lambda p: question_answers(w, imgs, p)}
    found = [name for name in parts if (root / name).exists()]
    if not found:
        raise FileNotFoundError(f"none of {list(parts)} in {root}")
    for name in found:
        parts[name](root / name)
    return w.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="Visual Genome folder (json files + VG_100K*/ images)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="images held out as 'val' (stable hash)")
    p.add_argument("--max-per-image", type=int, default=5, help="regions/relationships/objects per image (-1: all)")
    a = p.parse_args(argv)
    setup_logging()
    return build(a.root, a.out, a.val_fraction, a.max_per_image, a.maxcount, a.max_examples)


if __name__ == "__main__":
    main()
